"""Evaluate a trained checkpoint, or an exported ONNX file, on a validation split, writing the predictions too.

    python tools/test.py CHECKPOINT [--data-root DIR] [--out runs/test] [--json]
    python tools/test.py MODEL.onnx --data CHECKPOINT_OR_CONFIG [--data-root DIR] [--out runs/test] [--json]

Runs Lightning's validation loop with the task's own metric (the numbers
``tools/train.py validate --ckpt_path CHECKPOINT`` logs) and writes what the task predicts:
detection ``OUT/detections.json`` (COCO results format), segmentation one palette PNG of
predicted labels per image in ``OUT/labels/``. The files are scored as ``tools/eval_coco.py`` /
``tools/eval_miou.py`` score them (the same numbers, and a per-class table), and the numbers
are written to ``OUT/metrics.json`` too. The dataset settings come from the checkpoint (what
it was trained with); ``--data-root`` points them at another copy of the data.

An ONNX file written by ``tools/export.py`` (float or INT8) is run in ONNX Runtime on the
validation batches of ``--data`` (a checkpoint's saved data settings or a training config's),
with the same preprocessing, metric classes and files (``tasks.evaluation.exported``): the
accuracy of the file that ships.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported
    keep_freed_memory()  # no page faults on every step's activations (tasks/allocator.py)

from tasks.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402
from tasks.evaluation.exported import evaluate_exported  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint written by tools/train.py, or a .onnx file of tools/export.py"
    )
    parser.add_argument("--data", type=Path, help="a .onnx file: the checkpoint or config whose data settings to use")
    parser.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--out", type=Path, default=Path("runs/test"), help="folder for predictions and metrics.json")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu...")
    parser.add_argument("--backend", choices=["auto", "pycocotools", "faster"], default="auto", help="COCOeval of the files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    parser.add_argument("--threads", type=int, default=2, help="a .onnx file: ONNX Runtime threads")
    args = parser.parse_args(argv)
    exported = args.checkpoint.suffix.lower() == ".onnx"
    if exported and args.data is None:
        parser.error(f"{args.checkpoint}: an ONNX file needs --data CHECKPOINT_OR_CONFIG for its validation data")
    if not exported and args.data is not None:
        parser.error(f"{args.checkpoint}: --data is for .onnx files; a checkpoint brings its own data settings")
    try:
        if exported:
            metrics, report = evaluate_exported(
                args.checkpoint, args.data, args.out, args.data_root, args.num_workers, args.backend,
                threads=args.threads, progress=not args.no_progress,
            )  # fmt: skip
        else:
            metrics, report = evaluate_checkpoint(
                args.checkpoint, args.out, args.data_root, args.num_workers, args.backend,
                accelerator=args.accelerator, progress=not args.no_progress,
            )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(report)
    if args.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
