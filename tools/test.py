"""Evaluate a trained checkpoint on its dataset's validation split, writing the predictions too.

    python tools/test.py CHECKPOINT [--data-root DIR] [--out runs/test] [--json]

Runs Lightning's validation loop with the task's own metric (the numbers
``tools/train.py validate --ckpt_path CHECKPOINT`` logs) and writes what the task predicts:
detection ``OUT/detections.json`` (COCO results format), segmentation one palette PNG of
predicted labels per image in ``OUT/labels/``. The files are scored as ``tools/eval_coco.py`` /
``tools/eval_miou.py`` score them (the same numbers, and a per-class table), and the numbers
are written to ``OUT/metrics.json`` too. The dataset settings come from the checkpoint (what
it was trained with); ``--data-root`` points them at another copy of the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported

from tasks.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--out", type=Path, default=Path("runs/test"), help="folder for predictions and metrics.json")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu...")
    parser.add_argument("--backend", choices=["auto", "pycocotools", "faster"], default="auto", help="COCOeval of the files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    args = parser.parse_args(argv)
    try:
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
