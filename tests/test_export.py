"""Export: the batched (exportable) post-processing, ONNX and TorchScript files checked against eager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from heads.anchors import decode_boxes
from heads.detection_postprocess import batched_detections
from tasks.deploy import ExportableDetector, ExportableSegmenter
from tasks.detection import ssdlite_mobilenetv2
from tasks.segmentation import deeplabv3_mobilenetv2
from tools import export
from tools.checkpoints import load_task

ROOT = Path(__file__).resolve().parents[1]


def test_batched_postprocess_equals_the_heads_per_image_loop() -> None:
    torch.manual_seed(0)
    model = ssdlite_mobilenetv2(num_classes=6, width_mult=0.35, detections_per_image=20, topk_candidates=50).eval()
    head = model.head
    outputs = {
        "cls_logits": torch.randn(3, 2034, 6) * 3,  # distinct scores: no ties to order differently
        "bbox_regression": torch.randn(3, 2034, 4),
        "anchors": model(torch.zeros(1, 3, 320, 320))["anchors"],
    }
    expected = head.postprocess(outputs, [(320, 320)] * 3)
    boxes = decode_boxes(outputs["bbox_regression"], outputs["anchors"], head.box_coder_weights).clamp(0, 1) * 320
    got = batched_detections(
        head.scores(outputs["cls_logits"]), boxes, score_threshold=head.score_threshold,
        nms_threshold=head.nms_threshold, topk_candidates=50, detections_per_image=20,
    )  # fmt: skip
    for index, detection in enumerate(expected):
        mine = got[3] == index
        assert int(mine.sum()) == len(detection["scores"]) == 20
        assert torch.equal(got[2][mine], detection["labels"])
        assert torch.allclose(got[1][mine], detection["scores"])
        assert torch.allclose(got[0][mine], detection["boxes"], atol=1e-4)


def test_exported_detector_matches_eager_with_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ssdlite_mobilenetv2(num_classes=4, width_mult=0.35).eval()
    with torch.no_grad():  # decisive scores, as a trained network has: random init gives near-ties
        for predictor in model.head.cls_predictors:
            predictor[-1].weight.mul_(30)
    module = ExportableDetector(model).eval()
    export.export_onnx(module, torch.randn(1, 3, 160, 160), tmp_path / "det.onnx", dynamic_size=False)
    run = export.load_runner(tmp_path / "det.onnx", "onnx", threads=1)
    report = export.verify(module, run, torch.randn(3, 3, 160, 160))
    assert report["detections_matched"] >= 0.99 and report["detections"] > 0
    boxes, scores, labels, batch_index = run(np.random.default_rng(0).standard_normal((2, 3, 160, 160), dtype=np.float32))
    assert boxes.shape[1] == 4 and set(np.unique(batch_index)) <= {0, 1} and labels.min() >= 1
    assert (np.bincount(batch_index) <= 100).all()


def test_exported_segmenter_accepts_other_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ExportableSegmenter(deeplabv3_mobilenetv2(num_classes=5, width_mult=0.35).eval(), output="logits").eval()
    export.export_onnx(module, torch.randn(1, 3, 65, 65), tmp_path / "seg.onnx", dynamic_size=True)
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 97, 131)
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = module(images)[0].numpy()
    assert logits.shape == (2, 5, 97, 131)
    assert np.abs(logits - expected).max() < 1e-4


def test_export_verify_catches_a_wrong_file(tmp_path: Path) -> None:
    module = ExportableSegmenter(deeplabv3_mobilenetv2(num_classes=5, width_mult=0.35).eval(), output="logits").eval()
    with pytest.raises(ValueError, match="logits differs"):
        export.verify(module, lambda images: [np.zeros((1, 5, 33, 33), np.float32) + 5], torch.randn(1, 3, 33, 33))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_tool_on_checkpoints(
    detection_checkpoint: Path, segmentation_checkpoint: Path, tmp_path: Path, fmt: str
) -> None:
    suffix = "onnx" if fmt == "onnx" else "pt"
    for name, checkpoint in (("det", detection_checkpoint), ("seg", segmentation_checkpoint)):
        out = tmp_path / f"{name}.{suffix}"
        result = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "export.py"), str(checkpoint), "--out", str(out),
             "--format", fmt, "--input-size", "96"],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert out.is_file() and f"wrote {out}" in result.stdout
        assert ("detections_matched" if name == "det" else "labels_mismatch") in result.stdout
    task = load_task(detection_checkpoint)
    assert task.image_size == 128
