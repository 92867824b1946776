"""Export a trained model for deployment (ONNX or TorchScript) and check the export against PyTorch.

    python tools/export.py CHECKPOINT --out model.onnx                     # detection after NMS / seg labels
    python tools/export.py CHECKPOINT --out raw.onnx --raw                 # detection heads + anchors
    python tools/export.py CHECKPOINT --out seg.onnx --output logits       # segmentation logits
    python tools/export.py CHECKPOINT --out model.pt                       # TorchScript (.pt, .ts)
    python tools/export.py CHECKPOINT --out model.onnx --int8              # and model.int8.onnx
        [--calibration-images 256] [--calibration-data DIR] [--calibrator minmax|entropy|percentile]
        [--qat-steps 300 [--qat-lr 1e-4] [--qat-update-bn]]                # quantisation-aware first

The format follows the extension (``--format`` must agree with it). Inputs are ``images``
Float[N, 3, H, W], RGB 0..255 (the model normalises inside); the batch is dynamic (and, for
segmentation, the height and width too). Detection runs at the checkpoint's ``image_size``.
The file carries its class names, input size and normalisation as metadata
(``tasks.deploy.read_metadata``). After export the file is loaded again (ONNX Runtime or
``torch.jit.load``), run on a batch of three random images and compared with eager PyTorch:
detections must agree box for box after NMS, other outputs to rounding; the latency of both
is reported.

``--int8`` also writes the post-training INT8 quantisation of the ONNX file beside it
(``model.onnx`` -> ``model.int8.onnx``, QDQ format: ``tasks.quantization`` says which layers
stay float), calibrated on ``--calibration-images`` images of the checkpoint's training split
(``--data-root`` if the data has moved) or of ``--calibration-data`` (a folder or files), each
through validation's preprocessing. It then runs the INT8 file in ONNX Runtime on other images
of the same source and prints its parity report against the float file (matched detections and
box / score differences, or pixel agreement), the sizes on disk and both latencies; an INT8
file that disagrees beyond quantisation noise stops the tool with exit status 1 (the file stays,
for inspection). Its accuracy on the validation split: ``tools/test.py model.int8.onnx --data CHECKPOINT``.

``--qat-steps N`` first fine-tunes a copy of the network for N steps on the training split with
fake quantisation (torchao's PT2E QAT, ``tasks.qat``), for when post-training quantisation loses
too much accuracy; the INT8 file is then quantised from that copy, calibrated the same way, and
its parity report is still against ``model.onnx``, the checkpoint's own float model.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch's exporters are imported
    keep_freed_memory()  # no page faults on every step's activations (tasks/allocator.py)

from tasks import deploy  # noqa: E402
from tasks.checkpoints import load_task  # noqa: E402
from tasks.prediction_files import image_paths  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.onnx, or .pt / .ts for TorchScript)")
    parser.add_argument("--format", choices=list(deploy.EXTENSIONS), help="default: from the --out extension")
    parser.add_argument("--raw", action="store_true", help="detection: raw heads + anchors, no NMS")
    parser.add_argument("--output", choices=["labels", "logits"], default="labels", help="segmentation output")
    parser.add_argument("--input-size", type=int, help="square side of the example input (and detection's input)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the latency comparison")
    int8 = parser.add_argument_group("INT8 (post-training static quantisation of the ONNX file)")
    int8.add_argument("--int8", action="store_true", help="also write NAME.int8.onnx beside --out NAME.onnx")
    int8.add_argument("--calibration-images", type=int, default=256, help="images to calibrate on")
    int8.add_argument(
        "--calibration-data", type=Path, nargs="+", help="image folders or files (default: the training split)"
    )
    int8.add_argument("--data-root", help="the training data's folder, when it has moved since training")
    int8.add_argument(
        "--calibrator", choices=["minmax", "entropy", "percentile"], default="minmax", help="activation ranges"
    )
    int8.add_argument("--activations", choices=["uint8", "int8"], default="uint8", help="activation type (weights: int8)")
    int8.add_argument(
        "--qat-steps", type=int, default=0,
        help="quantisation-aware fine-tuning steps on the training split before quantising (default 0: none)",
    )  # fmt: skip
    int8.add_argument("--qat-lr", type=float, help="its starting learning rate (default: tasks.qat.LEARNING_RATE)")
    int8.add_argument(
        "--qat-update-bn", action="store_true",
        help="let BatchNorm use and update batch statistics during the fine-tune (default: frozen running statistics)",
    )  # fmt: skip
    int8.add_argument(
        "--min-agreement", type=float,
        help="least share of the float model's detections (score >= 0.3) found by INT8, or of pixels labelled "
        "alike (default 0.9); below it the tool fails",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        export_format = deploy.check_output_path(args.out, args.format)
        if args.int8 and export_format != "onnx":
            raise ValueError(f"{args.out}: --int8 quantises ONNX files; name the output NAME.onnx")
        if args.int8 and args.calibration_images < 1:
            raise ValueError(f"calibration needs at least one image, got --calibration-images {args.calibration_images}")
        if args.qat_steps and not args.int8:
            raise ValueError("--qat-steps fine-tunes for the INT8 file: add --int8")
        if args.qat_steps < 0:
            raise ValueError(f"--qat-steps must be 0 (none) or more, got {args.qat_steps}")
        task = load_task(args.checkpoint)
        module, example, dynamic_size = deploy.exportable(
            task.network, task.label_names(), raw=args.raw, output=args.output, input_size=args.input_size
        )
        torch.set_num_threads(args.threads)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        deploy.export(module, example, args.out, export_format, dynamic_size)
        run = deploy.load_runner(args.out, export_format, args.threads)
        check = torch.rand(3, *example.shape[1:], generator=torch.Generator().manual_seed(1)) * 255  # another batch size
        report = deploy.verify(module, run, check)
    except (ValueError, OSError) as error:  # FileNotFoundError included
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    one = check[:1]
    with torch.no_grad():
        report["pytorch_ms"] = deploy.median_ms(lambda: module(one))
    report[f"{export_format}_ms"] = deploy.median_ms(lambda: run(one.numpy()))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, outputs: {', '.join(module.output_names)})")
    for line in deploy.parity_report(report):
        print(f"  {line}")
    if args.int8:
        report["int8"] = export_int8(args, task)
    return report


def export_int8(args: argparse.Namespace, task: Any) -> dict[str, Any]:
    """Quantise ``args.out`` beside it, print the parity report; exit 1 when it fails."""
    from tasks import quantization  # onnxruntime's quantiser: only for --int8

    out = quantization.int8_file_name(args.out)
    try:
        if args.calibration_data:
            paths, kind = image_paths(args.calibration_data), "given"
        else:
            paths, kind = quantization.training_image_files(args.checkpoint, args.data_root), "training"
        calibration, held_out = quantization.split_images(paths, args.calibration_images)
        images = quantization.calibration_images(task, calibration)
        with tempfile.TemporaryDirectory(prefix="mobiledense-qat-") as folder:
            source, fine_tuning = args.out, None
            if args.qat_steps:
                source, fine_tuning = quantization_aware_export(args, task, Path(folder))
            quantization.quantize(
                source, out, images, calibrator=args.calibrator, activations=args.activations, fine_tuning=fine_tuning
            )
        checks = quantization.calibration_images(task, held_out)
        report = quantization.parity(args.out, out, checks, threads=args.threads)  # against the checkpoint's own
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    float_run, int8_run = (deploy.load_runner(path, "onnx", args.threads) for path in (args.out, out))
    one = checks[0]
    report["onnx_ms"] = deploy.median_ms(lambda: float_run(one))
    report["int8_ms"] = deploy.median_ms(lambda: int8_run(one))
    held = "the calibration images" if held_out == calibration else "held out"
    tuned = ""
    if fine_tuning:
        tuned = f"after {fine_tuning['steps']} quantisation-aware steps (last loss {fine_tuning['loss']:.3f}), "
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, INT8: {tuned}calibrated on {len(images)} {kind} images, "
        f"{args.calibrator}, {args.activations} activations; parity on {len(checks)} images, {held})"
    )
    for line in deploy.parity_report(report):
        print(f"  {line}")
    try:
        limit = quantization.MIN_AGREEMENT if args.min_agreement is None else args.min_agreement
        quantization.check_parity(report, out, min_agreement=limit)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if fine_tuning:
        report["qat"] = fine_tuning
    return report


def quantization_aware_export(args: argparse.Namespace, task: Any, folder: Path) -> tuple[Path, dict[str, Any]]:
    """Fine-tune a copy of ``task`` with fake quantisation (:func:`tasks.qat.finetune`) on its
    training split and export it as ``args.out`` is exported, into ``folder``; return the file
    and the fine-tune's report. ``args.out`` stays the checkpoint's own float model."""
    from tasks import qat
    from tasks.evaluation.checkpoint import load_datamodule

    tuned = copy.deepcopy(task)
    datamodule = load_datamodule(args.checkpoint, root=args.data_root, persistent_workers=False)
    lr = qat.LEARNING_RATE if args.qat_lr is None else args.qat_lr
    report = qat.finetune(tuned, datamodule, args.qat_steps, lr, update_batch_norm=args.qat_update_bn)
    module, example, dynamic_size = deploy.exportable(
        tuned.network, tuned.label_names(), raw=args.raw, output=args.output, input_size=args.input_size
    )
    path = folder / args.out.name
    deploy.export(module, example, path, "onnx", dynamic_size)
    return path, report


if __name__ == "__main__":
    main()
