"""Export a trained model for deployment (ONNX or TorchScript) and check the export against PyTorch.

    python tools/export.py CHECKPOINT --out model.onnx                     # detection after NMS / seg labels
    python tools/export.py CHECKPOINT --out raw.onnx --raw                 # detection heads + anchors
    python tools/export.py CHECKPOINT --out seg.onnx --output logits       # segmentation logits
    python tools/export.py CHECKPOINT --out model.pt                       # TorchScript (.pt, .ts)

The format follows the extension (``--format`` must agree with it). Inputs are ``images``
Float[N, 3, H, W], RGB 0..255 (the model normalises inside); the batch is dynamic (and, for
segmentation, the height and width too). Detection runs at the checkpoint's ``image_size``.
The file carries its class names, input size and normalisation as metadata
(``tasks.deploy.read_metadata``). After export the file is loaded again (ONNX Runtime or
``torch.jit.load``), run on a batch of three random images and compared with eager PyTorch:
detections must agree box for box after NMS, other outputs to rounding; the latency of both
is reported.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch's exporters are imported

from tasks import deploy  # noqa: E402
from tasks.checkpoints import load_task  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--out", type=Path, required=True, help="the file to write (.onnx, or .pt / .ts for TorchScript)")
    parser.add_argument("--format", choices=list(deploy.EXTENSIONS), help="default: from the --out extension")
    parser.add_argument("--raw", action="store_true", help="detection: raw heads + anchors, no NMS")
    parser.add_argument("--output", choices=["labels", "logits"], default="labels", help="segmentation output")
    parser.add_argument("--input-size", type=int, help="square side of the example input (and detection's input)")
    parser.add_argument("--threads", type=int, default=2, help="threads for the latency comparison")
    args = parser.parse_args(argv)
    try:
        export_format = deploy.check_output_path(args.out, args.format)
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
    return report


if __name__ == "__main__":
    main()
