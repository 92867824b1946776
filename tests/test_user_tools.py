"""tools/test.py and tools/predict.py on checkpoints trained here, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.data.coco import COCODetectionDataModule
from tasks.detection import SSDLiteDetection
from tasks.inference import Predictor
from tasks.segmentation import DeepLabV3Segmentation
from tasks.checkpoints import load_task
from tools import predict

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip


def test_test_tool_detection_agrees_with_eval_coco(detection_checkpoint: Path, synthetic_coco: Path, tmp_path: Path) -> None:
    result = run_tool("test.py", detection_checkpoint, "--out", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Average Precision" in result.stdout
    detections = json.loads((tmp_path / "detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])
    assert {d["category_id"] for d in detections} <= {1, 3, 7, 12, 44}  # labels mapped back to COCO ids
    gt = synthetic_coco / "annotations" / "instances_val2017.json"
    again = run_tool("eval_coco.py", gt, tmp_path / "detections.json", "--json")
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in json.loads(again.stdout).items() if k != "per_class"} == metrics


def test_test_tool_segmentation_agrees_with_eval_miou(
    segmentation_checkpoint: Path, synthetic_voc: Path, tmp_path: Path
) -> None:
    result = run_tool("test.py", segmentation_checkpoint, "--out", tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    voc = synthetic_voc / "VOCdevkit" / "VOC2012"
    val = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    labels = sorted(p.stem for p in (tmp_path / "labels").glob("*.png"))
    assert labels == sorted(val)
    with Image.open(tmp_path / "labels" / f"{val[0]}.png") as image, Image.open(voc / "JPEGImages" / f"{val[0]}.jpg") as photo:
        assert image.mode == "P" and image.size == photo.size
    again = run_tool(
        "eval_miou.py", voc / "SegmentationClass", tmp_path / "labels", "--num-classes", "21",
        "--split-file", voc / "ImageSets" / "Segmentation" / "val.txt", "--json",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == metrics


def test_predict_draws_pictures_for_both_tasks(
    detection_checkpoint: Path, segmentation_checkpoint: Path, synthetic_coco: Path, synthetic_voc: Path, tmp_path: Path
) -> None:
    images = sorted((synthetic_coco / "val2017").glob("*.jpg"))[:2]
    result = run_tool("predict.py", detection_checkpoint, *images, "--out", tmp_path / "det", "--score-threshold", "0")
    assert result.returncode == 0, result.stderr
    for image in images:
        with Image.open(tmp_path / "det" / f"{image.stem}.png") as picture, Image.open(image) as original:
            assert picture.size == original.size and picture.mode == "RGB"
    assert (tmp_path / "det" / "grid.png").is_file()
    # Names travel in the checkpoint (labels 1..5 <-> category ids 1, 3, 7, 12, 44).
    assert load_task(detection_checkpoint).class_names == {1: "circle", 2: "square", 3: "triangle", 4: "cross", 5: "ring"}

    folder = synthetic_voc / "VOCdevkit" / "VOC2012" / "JPEGImages"
    result = run_tool("predict.py", segmentation_checkpoint, folder, "--out", tmp_path / "seg", "--limit", "2")
    assert result.returncode == 0, result.stderr
    drawn = sorted((tmp_path / "seg").glob("2007_*.png"))
    assert len(drawn) == 2
    with Image.open(drawn[0]) as picture, Image.open(folder / f"{drawn[0].stem}.jpg") as original:
        assert picture.height == original.height and picture.width > original.width  # legend on the right


def validation_detections(checkpoint: Path, root: Path) -> dict[int, dict]:
    """Detections of the val split through validation's path: DataModule loader, transfer hooks,
    the task's predict_step (one image per batch)."""
    task = load_task(checkpoint)
    data = COCODetectionDataModule(
        str(root), image_size=task.network.image_size, eval_batch_size=1, num_workers=0, persistent_workers=False
    )
    data.setup("validate")
    found = {}
    with torch.no_grad():
        for batch in data.val_dataloader():
            batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
            for detection in task.predict_step(batch, 0):
                found[int(detection["image_id"])] = detection
    return found


def test_predict_gives_the_detections_validation_scores(
    detection_checkpoint: Path, synthetic_coco: Path, tmp_path: Path
) -> None:
    expected = validation_detections(detection_checkpoint, synthetic_coco)
    images = sorted((synthetic_coco / "val2017").glob("*.jpg"))
    assert len(images) == len(expected) >= 5

    predictor = Predictor.from_checkpoint(detection_checkpoint)
    for image in images:
        got, want = predictor(image), expected[int(image.stem)]
        assert len(want["scores"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(got[key], want[key]), (image.name, key)

    predict.main([str(detection_checkpoint), *map(str, images), "--out", str(tmp_path), "--score-threshold", "0"])
    rows = json.loads((tmp_path / "predictions.json").read_text())
    to_category = {1: 1, 2: 3, 3: 7, 4: 12, 5: 44}
    for image in images:
        want = expected[int(image.stem)]
        mine = [r for r in rows if r["image_id"] == int(image.stem)]
        assert [r["category_id"] for r in mine] == [to_category[int(label)] for label in want["labels"]]
        assert [r["score"] for r in mine] == pytest.approx(want["scores"].tolist(), abs=1e-6)
        xywh = want["boxes"].clone()
        xywh[:, 2:] -= xywh[:, :2]
        assert [v for r in mine for v in r["bbox"]] == pytest.approx(xywh.flatten().tolist(), abs=1e-4)


def test_tools_reject_bad_checkpoints_and_images(
    detection_checkpoint: Path, segmentation_checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="checkpoint of a DeepLabV3Segmentation, but this needs a SSDLiteDetection"):
        load_task(segmentation_checkpoint, SSDLiteDetection)
    assert isinstance(load_task(segmentation_checkpoint, DeepLabV3Segmentation), DeepLabV3Segmentation)

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(detection_checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match="broken.ckpt: not a readable checkpoint"):
        load_task(broken)

    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = run_tool("predict.py", detection_checkpoint, bad_image, "--out", tmp_path / "out")
    assert result.returncode == 1 and "none of the 1 images could be read" in result.stderr
    assert "bad.jpg: corrupt or truncated image" in result.stdout + result.stderr
    result = run_tool("test.py", tmp_path / "missing.ckpt")
    assert result.returncode == 1 and "missing.ckpt: checkpoint not found" in result.stderr


def test_predict_writes_predictions_skips_unreadable_images_and_caps_huge_inputs(
    detection_checkpoint: Path, segmentation_checkpoint: Path, synthetic_coco: Path, tmp_path: Path
) -> None:
    source = sorted((synthetic_coco / "val2017").glob("*.jpg"))[0]
    for folder in ("a", "b"):  # two inputs with one name
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "photo.jpg").write_bytes(source.read_bytes())
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    result = run_tool("predict.py", detection_checkpoint, tmp_path / "a", tmp_path / "b", "--out", tmp_path / "det")
    assert result.returncode == 0, result.stderr
    assert "broken.jpg: not a readable image" in result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "det").glob("photo*.png")) == ["photo.png", "photo_1.png"]
    rows = json.loads((tmp_path / "det" / "predictions.json").read_text())
    assert {r["file_name"] for r in rows} == {str(tmp_path / "a" / "photo.jpg"), str(tmp_path / "b" / "photo.jpg")}

    huge = tmp_path / "huge.png"
    with Image.open(source) as image:
        image.convert("RGB").resize((900, 700)).save(huge)
    result = run_tool("predict.py", segmentation_checkpoint, huge, "--out", tmp_path / "seg", "--max-size", "160")
    assert result.returncode == 0, result.stderr
    assert "huge.png: 900x700 segmented at 160x124 (--max-size)" in result.stdout + result.stderr
    with Image.open(tmp_path / "seg" / "labels" / "huge.png") as labels:
        assert labels.size == (900, 700) and labels.mode == "P"
