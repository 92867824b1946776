"""The shipped paper configs themselves, end to end, on data with the real datasets' quirks.

``configs/ssdlite_mobilenetv2_coco.yaml`` and ``configs/deeplabv3_mobilenetv2_voc.yaml`` run
through ``fit`` (Lightning's sanity validation on), ``validate``, ``tools/test.py``,
``tools/eval_coco.py``, ``tools/predict.py`` and ``tools/export.py`` on the realistic synthetic
sets (COCO's 80 categories under ids 1..90 with gaps, crowd RLE, grey / CMYK / RGBA / empty
images; VOC palette masks with 255 borders and SBD's layout). Only the data root, image size,
batch size, step counts, loader workers and ``weights_backbone`` (no downloads here) are overridden.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import train

ROOT = Path(__file__).resolve().parents[1]
COCO_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_coco.yaml")
VOC_CONFIG = str(ROOT / "configs" / "deeplabv3_mobilenetv2_voc.yaml")
# COCO's ids that name no category: a detector must never emit them.
UNUSED_COCO_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
STEPS = [
    "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "2",
    "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_progress_bar", "false",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])


def run_tool(name: str, *args: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=900
    )  # fmt: skip
    assert result.returncode == 0, f"{name}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result


def fit_and_validate(config: str, data: list[str], out: Path) -> tuple[Path, dict[str, float]]:
    """``fit`` with sanity validation, then ``validate`` of its last.ckpt; the checkpoint and metrics."""
    common = ["--config", config, *data, "--model.weights_backbone", "null", *STEPS]
    cli = train.main(
        ["fit", *common, "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out)]
    )
    assert cli.trainer.global_step == 2 and cli.trainer.num_sanity_val_steps > 0
    (checkpoint,) = out.glob("*/version_*/checkpoints/last.ckpt")
    validated = train.main(
        ["validate", *common, "--trainer.logger", "false", "--trainer.default_root_dir", str(out / "validate"),
         "--ckpt_path", str(checkpoint)]
    )  # fmt: skip
    return checkpoint, {key: float(value) for key, value in validated.trainer.callback_metrics.items()}


@pytest.mark.parametrize(
    "label_mode",
    [
        pytest.param([], id="91-category-id-slots"),
        pytest.param(["--data.contiguous_labels", "true", "--model.network.num_classes", "81"], id="80-contiguous"),
    ],
)
def test_coco_paper_config_end_to_end(realistic_coco: Path, tmp_path: Path, label_mode: list[str]) -> None:
    # The network's image_size is the data's too (tasks.cli.link_image_size): set it once.
    data = ["--data.root", str(realistic_coco), "--model.network.image_size", "128",
            "--data.batch_size", "2", "--data.eval_batch_size", "4", "--data.num_workers", "0",
            "--data.persistent_workers", "false", *label_mode]  # fmt: skip
    checkpoint, metrics = fit_and_validate(COCO_CONFIG, data, tmp_path / "fit")
    assert {"val/AP", "val/AP50", "val/AR100"} <= set(metrics)

    tested = run_tool("test.py", checkpoint, "--out", tmp_path / "test", "--json")
    scores = json.loads(tested.stdout.strip().splitlines()[-1])
    assert scores["AP"] == pytest.approx(metrics["val/AP"], abs=1e-6)
    detections = json.loads((tmp_path / "test" / "detections.json").read_text())
    categories = {c["id"] for c in json.loads((realistic_coco / "annotations" / "instances_val2017.json").read_text())["categories"]}
    assert detections and {d["category_id"] for d in detections} <= categories
    assert not {d["category_id"] for d in detections} & UNUSED_COCO_IDS
    rescored = run_tool(
        "eval_coco.py", realistic_coco / "annotations" / "instances_val2017.json", tmp_path / "test" / "detections.json", "--json"
    )  # fmt: skip
    assert json.loads(rescored.stdout.strip().splitlines()[-1])["AP"] == pytest.approx(scores["AP"], abs=1e-9)

    if label_mode:
        return  # pictures and export once: they do not depend on the label mode
    images = sorted((realistic_coco / "val2017").iterdir())
    run_tool("predict.py", checkpoint, *images, "--out", tmp_path / "pictures", "--score-threshold", "0")
    assert len(list((tmp_path / "pictures").glob("*.png"))) == len(images) + 1  # + grid.png
    predicted = json.loads((tmp_path / "pictures" / "predictions.json").read_text())
    assert predicted and {d["category_id"] for d in predicted} <= categories
    run_tool("export.py", checkpoint, "--out", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000


def test_voc_paper_config_end_to_end(realistic_voc: Path, tmp_path: Path) -> None:
    data = ["--data.root", str(realistic_voc), "--data.crop_size", "65", "--data.batch_size", "2",
            "--data.num_workers", "0"]  # fmt: skip
    checkpoint, metrics = fit_and_validate(VOC_CONFIG, data, tmp_path / "fit")
    assert {"val/mIoU", "val/pixel_acc"} <= set(metrics)

    tested = run_tool("test.py", checkpoint, "--out", tmp_path / "test", "--json")
    scores = json.loads(tested.stdout.strip().splitlines()[-1])
    assert scores["mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-6)
    voc = realistic_voc / "VOCdevkit" / "VOC2012"
    rescored = run_tool(
        "eval_miou.py", voc / "SegmentationClass", tmp_path / "test" / "labels", "--num-classes", "21",
        "--split-file", voc / "ImageSets" / "Segmentation" / "val.txt", "--json",
    )  # fmt: skip
    assert json.loads(rescored.stdout.strip().splitlines()[-1]) == scores

    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    run_tool("predict.py", checkpoint, *images, "--out", tmp_path / "pictures")
    assert len(list((tmp_path / "pictures" / "labels").glob("*.png"))) == 2
    run_tool("export.py", checkpoint, "--out", tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 1_000_000
