"""Export: the batched (exportable) post-processing, ONNX and TorchScript files checked against eager,
the metadata the files carry, the parity report and the refusal of a mismatched extension."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import nms

from heads.anchors import decode_boxes
from heads.detection_postprocess import batched_detections
from tasks import deploy
from tasks.checkpoints import load_task
from tasks.deploy import ExportableDetector, ExportableSegmenter
from tasks.networks import DeepLabV3MobileNetV2, SSDLiteMobileNetV2
from tools import export

ROOT = Path(__file__).resolve().parents[1]


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random RGB images in 0..255, what the networks take."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 255


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
    model = SSDLiteMobileNetV2(num_classes=6, width_mult=0.35, detections_per_image=20, topk_candidates=50).eval()
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
    model = SSDLiteMobileNetV2(num_classes=4, width_mult=0.35, image_size=160).eval()
    with torch.no_grad():  # decisive scores, as a trained network has: random init gives near-ties
        for predictor in model.head.cls_predictors:
            predictor[-1].weight.mul_(30)
    module = ExportableDetector(model).eval()
    deploy.export_onnx(module, pixels(1, 3, 160, 160), tmp_path / "det.onnx", dynamic_size=False)
    run = deploy.load_runner(tmp_path / "det.onnx", "onnx", threads=1)
    report = deploy.verify(module, run, pixels(3, 3, 160, 160, seed=1))
    assert report["detections_matched"] >= 0.99 and report["detections"] > 0
    boxes, scores, labels, batch_index = run(pixels(2, 3, 160, 160, seed=2).numpy())
    assert boxes.shape[1] == 4 and set(np.unique(batch_index)) <= {0, 1} and labels.min() >= 1
    assert (np.bincount(batch_index) <= 100).all()
    # One NonMaxSuppression over scores laid out (image, class, anchor): each class of each image
    # is suppressed on its own (heads/detection_postprocess.py), not the whole batch as one class.
    graph_file = onnx.load(str(tmp_path / "det.onnx"))
    (nms,) = [node for node in graph_file.graph.node if node.op_type == "NonMaxSuppression"]
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in nms.input[:2]]
    graph_file.graph.output.extend(inputs)
    onnx.save(graph_file, str(tmp_path / "nms_inputs.onnx"))
    run_to_nms = deploy.load_runner(tmp_path / "nms_inputs.onnx", "onnx", threads=1)
    nms_boxes, nms_scores = run_to_nms(pixels(2, 3, 160, 160).numpy())[4:]
    num_anchors = model(pixels(1, 3, 160, 160))["anchors"].shape[0]
    assert nms_boxes.shape == (2, num_anchors, 4) and nms_scores.shape == (2, 3, num_anchors)


def test_exported_segmenter_accepts_other_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ExportableSegmenter(DeepLabV3MobileNetV2(num_classes=5, width_mult=0.35).eval(), output="logits").eval()
    deploy.export_onnx(module, pixels(1, 3, 65, 65), tmp_path / "seg.onnx", dynamic_size=True)
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    images = pixels(2, 3, 97, 131, seed=1)
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected = module(images)[0].numpy()
    assert logits.shape == (2, 5, 97, 131)
    assert np.abs(logits - expected).max() < 1e-4


def test_export_verify_catches_a_wrong_file(tmp_path: Path) -> None:
    module = ExportableSegmenter(DeepLabV3MobileNetV2(num_classes=5, width_mult=0.35).eval(), output="logits").eval()
    with pytest.raises(ValueError, match="logits differs"):
        deploy.verify(module, lambda images: [np.zeros((1, 5, 33, 33), np.float32) + 5], pixels(1, 3, 33, 33))


def export_process(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
        timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_export_tool_on_checkpoints_writes_metadata_and_a_readable_report(
    detection_checkpoint: Path, segmentation_checkpoint: Path, tmp_path: Path, suffix: str
) -> None:
    for name, checkpoint, extra in (("det", detection_checkpoint, []), ("seg", segmentation_checkpoint, ["--input-size", "96"])):
        out = tmp_path / f"{name}{suffix}"
        result = export_process(checkpoint, "--out", out, *extra)  # the format follows the extension
        assert result.returncode == 0, result.stderr
        assert out.is_file() and f"wrote {out}" in result.stdout
        lines = result.stdout.splitlines()
        report = lines[next(i for i, line in enumerate(lines) if line.startswith("wrote ")) + 1 :]
        assert report and all(re.fullmatch(r" +[A-Za-z][\w ()]*: \S.*", line) for line in report), report
        assert len({line.index(": ") for line in report}) == 1  # the colons line up
        runtime = "ONNX Runtime" if suffix == ".onnx" else "TorchScript"
        assert re.search(rf"^ +{runtime} latency: \d+\.\d ms$", result.stdout, re.M)
        if name == "det":
            assert re.search(r"^ +matched detections: \d+(\.\d+)?%$", result.stdout, re.M)
        else:
            assert re.search(r"^ +labels differing: \d+(\.\d+)?%$", result.stdout, re.M)

        task = load_task(checkpoint)
        metadata = deploy.read_metadata(out)
        assert json.loads(metadata["class_names"]) == task.label_names()
        if name == "det":
            assert metadata["task"] == "detection" and json.loads(metadata["input_size"]) == [128, 128]
            assert task.network.image_size == 128
        else:
            assert metadata["task"] == "segmentation" and metadata["input_size"] == "dynamic"
        assert "0..255" in metadata["input_format"] and "inside the model" in metadata["input_format"]
        assert json.loads(metadata["mean"]) == [0.485, 0.456, 0.406] and json.loads(metadata["std"]) == [0.229, 0.224, 0.225]
        if suffix == ".onnx":  # what a deployment reads with ONNX Runtime alone
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            assert session.get_modelmeta().custom_metadata_map == metadata


@pytest.mark.parametrize(
    ("out", "fmt", "message"),
    [
        ("model.pt", "onnx", "model.pt: --format onnx writes .onnx files"),
        ("model.onnx", "torchscript", "model.onnx: --format torchscript writes .pt or .ts or .torchscript files"),
        ("model.bin", None, "model.bin: unknown extension .bin"),
        ("model", "onnx", "model: --format onnx writes .onnx files"),
    ],
)
def test_an_extension_that_does_not_match_the_format_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str, fmt: str | None, message: str
) -> None:
    with pytest.raises(SystemExit) as stop:  # refused before the checkpoint is read (it does not exist)
        export.main([str(tmp_path / "none.ckpt"), "--out", str(tmp_path / out), *(["--format", fmt] if fmt else [])])
    assert stop.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / out).exists()


def test_the_parity_report_is_aligned_with_a_space_before_each_number() -> None:
    report = {"detections": 312, "detections_matched": 1.0, "bbox_regression_max_abs_diff": 2.5e-06,
              "labels_mismatch": 0.000125, "pytorch_ms": 12.345, "onnx_ms": 7.0}  # fmt: skip
    assert deploy.parity_report(report) == [
        "              detections (PyTorch): 312",
        "                matched detections: 100%",
        "bbox_regression max abs difference: 2.5e-06",
        "                  labels differing: 0.0125%",
        "                   PyTorch latency: 12.3 ms",
        "              ONNX Runtime latency: 7.0 ms",
    ]


def test_the_metadata_says_the_model_normalises_0_255_pixels(tmp_path: Path) -> None:
    network = DeepLabV3MobileNetV2(num_classes=3, width_mult=0.35).eval()
    module, example, dynamic = deploy.exportable(network, ["background", "cat", "dog"], input_size=33)
    assert dynamic and example.shape == (2, 3, 33, 33) and 1.0 < float(example.max()) <= 255.0
    deploy.export_torchscript(module, example, tmp_path / "seg.pt", dynamic_size=True)
    metadata = deploy.read_metadata(tmp_path / "seg.pt")
    assert json.loads(metadata["class_names"]) == ["background", "cat", "dog"] and metadata["input_size"] == "dynamic"
    assert metadata["input_format"].startswith("RGB float32 [N, 3, H, W], 0..255")
    with pytest.raises(ValueError, match="cannot export a Linear"):
        deploy.exportable(torch.nn.Linear(2, 2), [])


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_fused_model_gives_the_same_outputs_without_batchnorm(task: str) -> None:
    torch.manual_seed(0)
    if task == "detection":
        model, size = SSDLiteMobileNetV2(num_classes=4, width_mult=0.5), 160
    else:
        model, size = DeepLabV3MobileNetV2(num_classes=5, width_mult=0.5, aux_loss=True), 129
    model.train()
    with torch.no_grad():  # non-trivial running statistics for the folding to get right
        for seed in range(3):
            model(pixels(4, 3, size, size, seed=seed))
    model.eval()
    fused = deploy.fuse_conv_bn(model)
    optimized = deploy.optimize_for_inference(model)
    assert model.training is False and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for copy in (fused, optimized):
        assert not [m for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in optimized.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    images = pixels(2, 3, size, size, seed=5)
    with torch.no_grad():
        expected = model(images)
        for copy in (fused, optimized):
            got = copy(images)
            for name in expected:
                torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4)


def test_the_parity_report_formats_the_int8_numbers() -> None:
    report = {"images": 16, "float_detections": 18, "detections_matched": 0.9444, "box_mean_abs_diff": 1.46,
              "float_file_bytes": 12_528_457, "int8_size_vs_float_share": 0.3033, "int8_ms": 22.51}  # fmt: skip
    assert deploy.parity_report(report) == [
        "                   images: 16",
        "         float detections: 18",
        "       matched detections: 94.44%",
        "  box mean abs difference: 1.46",
        "               float file: 12.53 MB",
        "       int8 size vs float: 30.33%",
        "ONNX Runtime INT8 latency: 22.5 ms",
    ]


def test_detection_matches_find_each_detection_by_image_label_and_overlap() -> None:
    expected = (
        np.array([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 10, 10]], np.float32),
        np.array([0.9, 0.8, 0.7], np.float32),
        np.array([1, 2, 1]),
        np.array([0, 0, 1]),
    )
    actual = (
        np.array([[21, 21, 40, 40], [0, 0, 10, 11], [0, 0, 10, 10]], np.float32),  # IoU 0.9, 0.91 and 1
        np.array([0.5, 0.88, 0.7], np.float32),
        np.array([2, 1, 3]),
        np.array([0, 0, 1]),
    )
    assert deploy.detection_matches(expected, actual, min_iou=0.5, score_tolerance=None).tolist() == [1, 0, -1]
    assert deploy.detection_matches(expected, actual, min_iou=0.5, score_tolerance=0.05).tolist() == [1, -1, -1]
    assert deploy.detection_matches(expected, actual).tolist() == [-1, -1, -1]  # export parity: IoU >= 0.99
    assert deploy.matched_detections(expected, expected) == 1.0


def test_file_predictions_are_in_the_frame_validation_reports() -> None:
    boxes = np.array([[10, 20, 50, 60], [0, 0, 100, 100], [5, 5, 10, 10]], np.float32)  # in the 100x100 input
    outputs = [boxes, np.array([0.9, 0.5, 0.4], np.float32), np.array([1, 2, 1]), np.array([0, 0, 1])]
    sizes = torch.tensor([[200, 300], [50, 100]])  # (height, width) of the original images
    first, second = deploy.file_predictions(deploy.DETECTION_OUTPUTS, outputs, (100, 100), sizes)
    torch.testing.assert_close(first["boxes"], torch.tensor([[30.0, 40, 150, 120], [0, 0, 300, 200]]))
    assert first["labels"].tolist() == [1, 2] and second["scores"].tolist() == [pytest.approx(0.4)]
    torch.testing.assert_close(second["boxes"], torch.tensor([[5.0, 2.5, 10, 5]]))

    logits = np.zeros((2, 3, 4, 6), np.float32)
    logits[:, 2] = 1.0
    maps = deploy.file_predictions(["logits"], [logits], (4, 6), torch.tensor([[4, 6], [3, 2]]))
    assert [m["labels"].shape for m in maps] == [(4, 6), (3, 2)] and int(maps[1]["labels"].max()) == 2
    with pytest.raises(ValueError, match="without --raw"):
        deploy.file_predictions(deploy.RAW_DETECTION_OUTPUTS, [], (100, 100), sizes)
