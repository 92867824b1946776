"""Export a trained model for deployment (ONNX or TorchScript) and check the export against PyTorch.

    python tools/export.py CHECKPOINT --out model.onnx                     # detection after NMS / seg labels
    python tools/export.py CHECKPOINT --out raw.onnx --raw                 # detection heads + anchors
    python tools/export.py CHECKPOINT --out seg.onnx --output logits       # segmentation logits
    python tools/export.py CHECKPOINT --out model.pt --format torchscript

Inputs are ``images`` Float[N, 3, H, W] normalised with ImageNet's mean/std; the batch is
dynamic (and, for segmentation, the height and width too). Detection runs at the checkpoint's
``image_size``. After export the file is loaded again (ONNX Runtime or ``torch.jit.load``), run
on a batch of two random images and compared with eager PyTorch: the maximum absolute
difference is printed, detections must agree box for box after NMS, and the latency of both
is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.checkpoints import load_task  # noqa: E402
from tasks.deploy import (  # noqa: E402
    DETECTION_OUTPUTS,
    ExportableDetector,
    ExportableSegmenter,
    export_onnx,
    export_torchscript,
    load_runner,
    optimize_for_inference,
)
from tasks.detection import SSDLiteDetection  # noqa: E402
from tasks.segmentation import DeepLabV3Segmentation  # noqa: E402
from tasks.timing import timed_runs  # noqa: E402


def median_ms(call: Callable[[], Any], runs: int = 10) -> float:
    """Median latency in milliseconds, after one untimed call."""
    return 1000 * float(np.median(timed_runs(call, runs, warmup=1)))


def matched_detections(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Share of PyTorch's detections that the export also finds: same image and label, IoU >= 0.99.

    Compared as sets, not row by row: near-tied scores (an untrained network has many) may be
    ordered differently by two runtimes without any detection being different.
    """
    boxes, scores, labels, images = expected
    if len(scores) == 0:
        return 1.0 if len(actual[1]) == 0 else 0.0
    same = (labels[:, None] == actual[2][None]) & (images[:, None] == actual[3][None])
    overlap = box_iou(torch.from_numpy(boxes), torch.from_numpy(actual[0])).numpy() >= 0.99
    close = np.abs(scores[:, None] - actual[1][None]) <= 1e-4
    return float(np.mean((same & overlap & close).any(axis=1)))


def verify(module: torch.nn.Module, run: Callable[[np.ndarray], list[np.ndarray]], images: torch.Tensor) -> dict[str, Any]:
    """Compare the export with eager PyTorch on ``images``; raise if they disagree."""
    with torch.no_grad():
        expected = [t.numpy() for t in module(images)]
    actual = run(images.numpy())
    report: dict[str, Any] = {}
    if tuple(module.output_names) == DETECTION_OUTPUTS:
        report["detections"] = len(expected[1])
        report["detections_matched"] = matched_detections(expected, actual)
        if report["detections_matched"] < 0.98 or abs(len(actual[1]) - len(expected[1])) > 0.02 * len(expected[1]):
            raise ValueError(
                f"export disagrees with PyTorch: {len(actual[1])} detections, {len(expected[1])} expected, "
                f"{100 * report['detections_matched']:.1f}% matched (an untrained network's near-equal scores "
                "can order differently in two runtimes; --raw exports and checks the heads alone)"
            )
        return report
    for name, want, got in zip(module.output_names, expected, actual):
        if want.shape != got.shape:
            raise ValueError(f"export disagrees with PyTorch: {name} has shape {got.shape}, expected {want.shape}")
        if np.issubdtype(want.dtype, np.integer):
            mismatched = float(np.mean(want != got))
            report[f"{name}_mismatch"] = mismatched
            # Labels of a segmentation argmax may flip where two logits tie to rounding error.
            limit = 1e-3 if name == "labels" and want.ndim == 3 else 0.0
            if mismatched > limit:
                raise ValueError(f"export disagrees with PyTorch: {100 * mismatched:.3f}% of {name} differ")
        else:
            difference = float(np.abs(want - got).max()) if want.size else 0.0
            report[f"{name}_max_abs_diff"] = difference
            if difference > 1e-3 * max(1.0, float(np.abs(want).max()) if want.size else 1.0):
                raise ValueError(f"export disagrees with PyTorch: {name} differs by {difference:.3g}")
    return report


def build(task: torch.nn.Module, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, bool]:
    """(the wrapper to export, an example batch, whether height/width are dynamic)."""
    if isinstance(task, SSDLiteDetection):
        size = args.input_size or task.image_size
        module: torch.nn.Module = ExportableDetector(optimize_for_inference(task.model), postprocess=not args.raw)
        return module.eval(), torch.randn(2, 3, size, size), False
    size = args.input_size or 513
    module = ExportableSegmenter(optimize_for_inference(task.model), output=args.output)
    return module.eval(), torch.randn(2, 3, size, size), True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.onnx or .pt)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--raw", action="store_true", help="detection: raw heads + anchors, no NMS")
    parser.add_argument("--output", choices=["labels", "logits"], default="labels", help="segmentation output")
    parser.add_argument("--input-size", type=int, help="square side of the example input (and detection's input)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the latency comparison")
    args = parser.parse_args(argv)
    try:
        task = load_task(args.checkpoint, (SSDLiteDetection, DeepLabV3Segmentation))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    torch.set_num_threads(args.threads)
    module, example, dynamic_size = build(task, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "onnx":
        export_onnx(module, example, args.out, dynamic_size)
    else:
        export_torchscript(module, example, args.out)
    run = load_runner(args.out, args.format, args.threads)
    torch.manual_seed(0)
    check = torch.randn(3, *example.shape[1:])  # another batch size than the example's
    report = verify(module, run, check)
    one = check[:1]
    with torch.no_grad():
        report["pytorch_ms"] = median_ms(lambda: module(one))
    report[f"{args.format}_ms"] = median_ms(lambda: run(one.numpy()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, outputs: {', '.join(module.output_names)})")
    for key, value in report.items():
        print(f"  {key:<28}{value:.6g}")
    return report


if __name__ == "__main__":
    main()
