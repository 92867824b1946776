"""Export: the batched (exportable) post-processing, ONNX and TorchScript files checked against eager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import nms

from heads.anchors import decode_boxes
from heads.detection_postprocess import batched_detections
from tasks import deploy
from tasks.deploy import ExportableDetector, ExportableSegmenter
from tasks.detection import ssdlite_mobilenetv2
from tasks.segmentation import deeplabv3_mobilenetv2
from tools import export
from tasks.checkpoints import load_task

ROOT = Path(__file__).resolve().parents[1]


def reference_detections(
    scores: torch.Tensor, boxes: torch.Tensor, *, score_threshold: float, nms_threshold: float, topk: int, keep: int
) -> list[list[tuple[float, int, list[float]]]]:
    """The post-processing spelt out with loops: per image, top-k over (anchor, class), threshold,
    NMS one class at a time, best ``keep`` of what survives -> [(score, label, box)] per image."""
    results = []
    for image_scores, image_boxes in zip(scores, boxes):
        num_classes = image_scores.shape[1]
        top, flat = image_scores.flatten().topk(topk)
        anchors, classes = flat // num_classes, flat % num_classes
        detections = []
        for label in range(num_classes):
            chosen = (classes == label) & (top > score_threshold)
            class_boxes, class_scores = image_boxes[anchors[chosen]], top[chosen]
            for index in nms(class_boxes, class_scores, nms_threshold).tolist():
                detections.append((float(class_scores[index]), label + 1, class_boxes[index].tolist()))
        results.append(sorted(detections, key=lambda d: -d[0])[:keep])
    return results


def test_batched_postprocess_equals_a_per_image_reference() -> None:
    torch.manual_seed(0)
    model = ssdlite_mobilenetv2(num_classes=6, width_mult=0.35, detections_per_image=20, topk_candidates=50).eval()
    head = model.head
    outputs = {
        "cls_logits": torch.randn(3, 2034, 6) * 3,  # distinct scores: no ties to order differently
        "bbox_regression": torch.randn(3, 2034, 4),
        "anchors": model(torch.zeros(1, 3, 320, 320))["anchors"],
    }
    boxes = decode_boxes(outputs["bbox_regression"], outputs["anchors"], head.box_coder_weights).clamp(0, 1) * 320
    scores = head.scores(outputs["cls_logits"])
    expected = reference_detections(scores, boxes, score_threshold=0.001, nms_threshold=0.55, topk=50, keep=20)
    got = batched_detections(
        scores, boxes, score_threshold=0.001, nms_threshold=0.55, topk_candidates=50, detections_per_image=20
    )
    from_head = head.postprocess(outputs, [(320, 320)] * 3)
    for index, reference in enumerate(expected):
        mine = got[3] == index
        assert int(mine.sum()) == len(reference) == len(from_head[index]["scores"]) > 10
        for result in (
            (got[0][mine], got[1][mine], got[2][mine]),
            (from_head[index]["boxes"], from_head[index]["scores"], from_head[index]["labels"]),
        ):
            assert result[2].tolist() == [label for _, label, _ in reference]
            torch.testing.assert_close(result[1], torch.tensor([score for score, _, _ in reference]))
            torch.testing.assert_close(result[0], torch.tensor([box for _, _, box in reference]), atol=1e-4, rtol=0)


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


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_fused_model_gives_the_same_outputs_without_batchnorm(task: str) -> None:
    torch.manual_seed(0)
    if task == "detection":
        model, size = ssdlite_mobilenetv2(num_classes=4, width_mult=0.5), 160
    else:
        model, size = deeplabv3_mobilenetv2(num_classes=5, width_mult=0.5, aux_loss=True), 129
    model.train()
    with torch.no_grad():  # non-trivial running statistics for the folding to get right
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 2 + 0.5)
    model.eval()
    fused = deploy.fuse_conv_bn(model)
    optimized = deploy.optimize_for_inference(model)
    assert model.training is False and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for copy in (fused, optimized):
        assert not [m for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in optimized.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(images)
        for copy in (fused, optimized):
            got = copy(images)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)
