"""tools/eval_coco.py and tools/eval_miou.py run as a user runs them, against independent numbers."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools import eval_coco, eval_miou

ROOT = Path(__file__).resolve().parents[1]


def run_in_process(main, *args: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Call a tool's ``main`` like its command line does; return (exit code, stdout, stderr)."""
    try:
        main([str(arg) for arg in args])
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


# ------------------------------------------------------------------------------- eval_coco
@pytest.fixture(scope="module")
def coco_files(synthetic_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic val ground truth and a noisy detections file for it."""
    gt_path = synthetic_coco / "annotations" / "instances_val2017.json"
    gt = json.loads(gt_path.read_text())
    rng = np.random.default_rng(0)
    category_ids = [c["id"] for c in gt["categories"]]
    detections = []
    for annotation in gt["annotations"]:
        x, y, w, h = annotation["bbox"]
        jitter = rng.uniform(-0.15, 0.15, size=4) * [w, h, w, h]
        detections.append(
            {
                "image_id": annotation["image_id"],
                "category_id": annotation["category_id"],
                "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                "score": float(rng.uniform(0.3, 1.0)),
            }
        )
        detections.append(
            {
                "image_id": annotation["image_id"],
                "category_id": int(rng.choice(category_ids)),
                "bbox": [x + w / 3, y, w, h / 2],
                "score": float(rng.uniform(0.0, 0.6)),
            }
        )
    path = tmp_path_factory.mktemp("results") / "detections.json"
    path.write_text(json.dumps(detections))
    return gt_path, path


def pycocotools_stats(gt_path: Path, results_path: Path) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        evaluator = COCOeval(gt, gt.loadRes(str(results_path)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_eval_coco_equals_pycocotools(coco_files: tuple[Path, Path], backend: str) -> None:
    gt_path, results_path = coco_files
    result = run_tool("eval_coco.py", gt_path, results_path, "--backend", backend, "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert list(numbers)[:12] == keys
    expected = pycocotools_stats(gt_path, results_path)
    assert np.abs(np.array([numbers[k] for k in keys]) - expected).max() <= 1e-6
    assert 0.2 < numbers["AP"] < 0.95  # the jittered boxes are neither all right nor all wrong
    assert {entry["name"] for entry in numbers["per_class"]} == {"circle", "square", "triangle", "cross", "ring"}


def test_eval_coco_prints_summary_and_class_table(coco_files: tuple[Path, Path]) -> None:
    result = run_tool("eval_coco.py", *coco_files)
    assert result.returncode == 0, result.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] =" in result.stdout
    assert "triangle" in result.stdout and "class" in result.stdout


def write(tmp_path: Path, name: str, content: object) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_eval_coco_bad_inputs_fail_with_one_line(
    coco_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gt_path, results_path = coco_files
    good = json.loads(results_path.read_text())[0]
    image_id, category_id = good["image_id"], good["category_id"]
    no_score = {k: v for k, v in good.items() if k != "score"}
    # Each bad entry comes second, after a good one: the message names entry 1 and the problem.
    cases = {
        "image.json": (dict(good, image_id=987654), "detection 1: image_id 987654 is not in the ground truth"),
        "negative.json": (dict(good, bbox=[1, 2, 3, -4]), "detection 1: bbox [1, 2, 3, -4] has a negative width or height"),
        "negative_w.json": (dict(good, bbox=[1, 2, -3, 4]), "negative width or height"),
        "string_id.json": (dict(good, image_id=str(image_id)), f'detection 1: image_id must be an integer, got "{image_id}" (str)'),
        "list_id.json": (dict(good, image_id=[image_id]), f"detection 1: image_id must be an integer, got [{image_id}] (list)"),
        "list_category.json": (dict(good, category_id=[category_id]), "detection 1: category_id must be an integer"),
        "fraction_id.json": (dict(good, image_id=image_id + 0.5), "detection 1: image_id must be an integer"),
        "list_score.json": (dict(good, score=[0.5]), "detection 1: score must be a finite number, got [0.5] (list)"),
        "bool_score.json": (dict(good, score=True), "detection 1: score must be a finite number, got true (bool)"),
        "bool_bbox.json": (dict(good, bbox=[1, 2, True, 4]), "detection 1: bbox must be [x, y, w, h], four numbers"),
        "short_bbox.json": (dict(good, bbox=[1, 2, 3]), "detection 1: bbox must be [x, y, w, h], four numbers"),
        "missing.json": (no_score, "detection 1 has no score (needs image_id, category_id, bbox and score)"),
        "not_object.json": ([1, 2, 3, 4], "detection 1 is [1, 2, 3, 4], expected an object"),
    }
    raw = {
        "broken.json": ("{not json", "not valid JSON"),
        "nan.json": ('[{"image_id": %d, "category_id": %d, "bbox": [1, 2, 3, 4], "score": NaN}]'
                     % (image_id, category_id), "detection 0: score must be a finite number, got NaN (float)"),
        "inf_bbox.json": ('[{"image_id": %d, "category_id": %d, "bbox": [1, 2, Infinity, 4], "score": 1}]'
                          % (image_id, category_id), "detection 0: bbox [1, 2, Infinity, 4] is not finite"),
        "dict.json": ({"detections": []}, "expected a JSON list"),
    }  # fmt: skip
    raw.update({name: ([good, entry], message) for name, (entry, message) in cases.items()})
    for name, (content, message) in raw.items():
        code, _, stderr = run_in_process(eval_coco.main, gt_path, write(tmp_path, name, content), capsys=capsys)
        assert code == 1, name
        assert f"{tmp_path / name}" in stderr and message in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
    missing = run_tool("eval_coco.py", tmp_path / "nothere.json", results_path)
    assert missing.returncode == 1 and "nothere.json: ground-truth file not found" in missing.stderr


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_eval_coco_counts_unknown_categories_and_scores_as_pycocotools(
    coco_files: tuple[Path, Path], tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Category 2 is not in the synthetic ground truth (ids 1, 3, 7, 12, 44): pycocotools keeps
    # such results and never scores them; so does eval_coco, and it says how many there were.
    gt_path, results_path = coco_files
    detections = json.loads(results_path.read_text())
    mixed = detections + [dict(d, category_id=2, score=1.0) for d in detections[:5]]
    path = write(tmp_path, "mixed.json", mixed)
    code, out, err = run_in_process(eval_coco.main, gt_path, path, "--backend", backend, "--json", capsys=capsys)
    assert code == 0, err
    numbers = json.loads(out)
    assert numbers["unscored_detections"] == 5 and numbers["unscored_category_ids"] == [2]
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert np.abs(np.array([numbers[k] for k in keys]) - pycocotools_stats(gt_path, path)).max() <= 1e-6
    code, out, err = run_in_process(eval_coco.main, gt_path, path, "--backend", backend, capsys=capsys)
    assert code == 0 and "unscored detections (category id not in the ground truth" in out
    assert out.rstrip().endswith(": 5, category ids [2]")


def test_test_tool_writes_only_detections_with_a_category(
    detection_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tools/test.py (tasks.evaluation.checkpoint) converts labels with the metric validation uses:
    # a label without a category id (here 9, beyond the 5 classes) is dropped and reported, not a KeyError.
    from tasks.detection import SSDLiteDetection
    from tasks.evaluation import checkpoint as evaluation

    validation_step = SSDLiteDetection.validation_step  # what the prediction files are written from

    def with_a_stray_label(self: SSDLiteDetection, batch: dict, batch_idx: int) -> list[dict]:
        detections = validation_step(self, batch, batch_idx)
        first = detections[0]
        first["boxes"] = torch.cat([first["boxes"], torch.tensor([[1.0, 2.0, 20.0, 30.0]])])
        first["scores"] = torch.cat([first["scores"], torch.tensor([0.99])])
        first["labels"] = torch.cat([first["labels"], torch.tensor([9])])
        return detections

    monkeypatch.setattr(SSDLiteDetection, "validation_step", with_a_stray_label)
    with pytest.warns(UserWarning, match=r"detections have labels without a COCO category id \[9\]"):
        summary, report = evaluation.evaluate_checkpoint(detection_checkpoint, tmp_path, backend="pycocotools", progress=False)
    written = json.loads((tmp_path / "detections.json").read_text())
    categories = {1, 3, 7, 12, 44}  # the synthetic set's category ids
    assert written and {d["category_id"] for d in written} <= categories
    assert summary["unscored_detections"] == 0 and 0.0 <= summary["AP"] <= 1.0
    assert "unscored detections" in report


# ------------------------------------------------------------------------------- test.py
def validate_with_train_py(config: str, checkpoint: Path, data_root: Path, tmp_path: Path) -> dict[str, float]:
    """What ``tools/train.py validate --ckpt_path CHECKPOINT`` logs (in-process, as its command line runs)."""
    from tools.train import main as train_main

    cli = train_main(["validate", "--config", str(ROOT / "configs" / config), "--ckpt_path", str(checkpoint),
                      "--data.root", str(data_root), "--data.num_workers", "0", "--model.network.width_mult", "0.35",
                      "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
                      "--trainer.logger", "false"])  # fmt: skip
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def test_test_tool_equals_validate_and_eval_coco_and_writes_metrics_json(
    detection_checkpoint: Path, synthetic_coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tools import test as test_tool

    out = tmp_path / "test"
    code, stdout, stderr = run_in_process(test_tool.main, detection_checkpoint, "--out", out, "--json", capsys=capsys)
    assert code == 0, stderr
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "metrics.json").read_text()) == metrics  # the same numbers in a file
    assert f"wrote the metrics to {out / 'metrics.json'}" in stdout
    assert "test: 100%" in stderr and "batch" in stderr  # progress, on stderr: stdout stays the report

    gt = synthetic_coco / "annotations" / "instances_val2017.json"
    code, again, _ = run_in_process(eval_coco.main, gt, out / "detections.json", "--json", capsys=capsys)
    assert code == 0 and {k: v for k, v in json.loads(again).items() if k != "per_class"} == metrics

    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # LightningCLI compares with sys.argv
    logged = validate_with_train_py("ssdlite_mobilenetv2_synthetic.yaml", detection_checkpoint, synthetic_coco, tmp_path)
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[key] == pytest.approx(logged[f"val/{key}"], abs=1e-6)  # float32 when logged
    assert f"val/AP {logged['val/AP']:.4f}, val/loss {logged['val/loss']:.4f}" in stdout


def test_test_tool_segmentation_equals_validate_and_eval_miou(
    segmentation_checkpoint: Path, synthetic_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tools import test as test_tool

    out = tmp_path / "test"
    code, stdout, stderr = run_in_process(test_tool.main, segmentation_checkpoint, "--out", out, "--json", capsys=capsys)
    assert code == 0, stderr
    metrics = json.loads(stdout.strip().splitlines()[-1])
    assert json.loads((out / "metrics.json").read_text()) == metrics
    voc = synthetic_voc / "VOCdevkit" / "VOC2012"
    split = voc / "ImageSets" / "Segmentation" / "val.txt"
    assert sorted(path.stem for path in (out / "labels").glob("*.png")) == sorted(split.read_text().split())
    code, again, _ = run_in_process(
        eval_miou.main, voc / "SegmentationClass", out / "labels", "--num-classes", len(metrics["per_class"]),
        "--split-file", split, "--json", capsys=capsys,
    )  # fmt: skip
    assert code == 0 and json.loads(again) == metrics

    monkeypatch.setattr(sys, "argv", ["tools/train.py"])
    logged = validate_with_train_py("deeplabv3_mobilenetv2_synthetic.yaml", segmentation_checkpoint, synthetic_voc, tmp_path)
    assert metrics["mIoU"] == pytest.approx(logged["val/mIoU"], abs=1e-6)
    assert metrics["pixel_acc"] == pytest.approx(logged["val/pixel_acc"], abs=1e-6)


def with_data_root(checkpoint: Path, root: Path, out: Path) -> Path:
    """A copy of ``checkpoint`` whose saved data settings name ``root``."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["datamodule_hyper_parameters"]["root"] = str(root)
    torch.save(saved, out)
    return out


def test_test_tool_points_to_data_root_when_the_data_has_moved(
    detection_checkpoint: Path, synthetic_coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools import test as test_tool

    moved = tmp_path / "moved" / "coco"
    checkpoint = with_data_root(detection_checkpoint, moved, tmp_path / "moved.ckpt")
    code, _, stderr = run_in_process(test_tool.main, checkpoint, "--out", tmp_path / "a", "--no-progress", capsys=capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {moved}: "), lines
    assert "--data-root" in lines[0]

    # The folder is there but a file it should hold is not.
    partial = Path(shutil.copytree(synthetic_coco, tmp_path / "partial"))
    (partial / "annotations" / "instances_val2017.json").unlink()
    checkpoint = with_data_root(detection_checkpoint, partial, tmp_path / "partial.ckpt")
    code, _, stderr = run_in_process(test_tool.main, checkpoint, "--out", tmp_path / "b", "--no-progress", capsys=capsys)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith(("GPU available", "TPU available"))]
    assert code == 1 and len(lines) == 1 and "instances_val2017.json" in lines[0] and "--data-root" in lines[0], lines

    code, stdout, stderr = run_in_process(
        test_tool.main, checkpoint, "--data-root", synthetic_coco, "--out", tmp_path / "c", "--no-progress", capsys=capsys
    )
    assert code == 0, stderr
    assert (tmp_path / "c" / "detections.json").is_file() and (tmp_path / "c" / "metrics.json").is_file()


def test_eval_coco_empty_detections_warn_and_score_zero(coco_files: tuple[Path, Path], tmp_path: Path) -> None:
    result = run_tool("eval_coco.py", coco_files[0], write(tmp_path, "empty.json", []), "--json")
    assert result.returncode == 0, result.stderr
    assert "no detections" in result.stderr
    assert json.loads(result.stdout)["AP"] == 0.0


# ------------------------------------------------------------------------------- eval_miou
def independent_miou(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[float, float, list]:
    """mIoU by per-class set counting over all pixels, with no confusion matrix."""
    target = np.concatenate([t.ravel() for t, _ in pairs])
    prediction = np.concatenate([p.ravel() for _, p in pairs])
    keep = target != 255
    target, prediction = target[keep], prediction[keep]
    ious = []
    for c in range(num_classes):
        union = np.sum((target == c) | (prediction == c))
        ious.append(np.sum((target == c) & (prediction == c)) / union if union else None)
    defined = [v for v in ious if v is not None]
    return float(np.mean(defined)), float(np.mean(target == prediction)), ious


def save_labels(path: Path, labels: np.ndarray, palette: bool) -> None:
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    image.save(path)


@pytest.fixture()
def label_folders(tmp_path: Path) -> tuple[Path, Path, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(1)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    pairs = []
    for index, (h, w) in enumerate([(31, 47), (64, 64), (20, 90)]):
        target = rng.integers(0, 5, size=(h, w))
        target[rng.random((h, w)) < 0.1] = 255
        prediction = np.where(rng.random((h, w)) < 0.7, np.where(target == 255, 0, target), rng.integers(0, 6, (h, w)))
        save_labels(gt_dir / f"img{index}.png", target, palette=True)
        save_labels(pred_dir / f"img{index}.png", prediction, palette=False)
        pairs.append((target, prediction))
    return gt_dir, pred_dir, pairs


def test_eval_miou_equals_independent_computation(label_folders: tuple[Path, Path, list]) -> None:
    gt_dir, pred_dir, pairs = label_folders
    result = run_tool("eval_miou.py", gt_dir, pred_dir, "--num-classes", "8", "--json")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout)
    miou, pixel_acc, per_class = independent_miou(pairs, 8)
    assert numbers["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert numbers["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-12)
    assert numbers["per_class"][6:] == [None, None]  # never present, never predicted
    assert numbers["per_class"][:6] == pytest.approx(per_class[:6], abs=1e-12)


def test_eval_miou_table_has_voc_names(label_folders: tuple[Path, Path, list]) -> None:
    gt_dir, pred_dir, _ = label_folders
    result = run_tool("eval_miou.py", gt_dir, pred_dir, "--num-classes", "21")
    assert result.returncode == 0, result.stderr
    assert "aeroplane" in result.stdout and "mIoU" in result.stdout and "pixel acc" in result.stdout


def test_eval_miou_bad_inputs(label_folders: tuple[Path, Path, list], capsys: pytest.CaptureFixture[str]) -> None:
    gt_dir, pred_dir, _ = label_folders
    (pred_dir / "img1.png").unlink()
    result = run_tool("eval_miou.py", gt_dir, pred_dir, "--num-classes", "8")
    assert result.returncode == 1 and "no prediction for img1.png" in result.stderr

    def run() -> tuple[int, str]:
        code, _, stderr = run_in_process(eval_miou.main, gt_dir, pred_dir, "--num-classes", 8, capsys=capsys)
        return code, stderr

    save_labels(pred_dir / "img1.png", np.zeros((10, 10)), palette=False)
    code, stderr = run()
    assert code == 1 and "img1.png: size (10, 10) differs" in stderr

    save_labels(pred_dir / "img1.png", np.full((64, 64), 9), palette=False)
    code, stderr = run()
    assert code == 1 and "img1.png: label values [9] outside 0..7" in stderr

    Image.new("RGB", (64, 64)).save(pred_dir / "img1.png")
    code, stderr = run()
    assert code == 1 and "img1.png: mode RGB, expected a label map" in stderr


@pytest.mark.parametrize("tool", [eval_coco, eval_miou])
def test_tools_have_help(tool, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run_in_process(tool.main, "--help", capsys=capsys)
    assert code == 0 and "usage:" in stdout
