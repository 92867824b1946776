"""Evaluate a trained checkpoint on its dataset's validation split, writing the predictions too.

    python tools/test.py CHECKPOINT [--data-root DIR] [--out runs/test] [--json]

Detection writes ``OUT/detections.json`` (COCO results format) and scores it with
``tools/eval_coco.py``'s evaluator; segmentation writes one palette PNG of predicted labels per
image to ``OUT/labels/`` and scores them with ``tools/eval_miou.py``'s. So this tool and the two
standalone evaluators always agree, and the files can be re-scored or inspected later.
The dataset settings come from the checkpoint (what it was trained with); ``--data-root``
points them at another copy of the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--out", type=Path, default=Path("runs/test"), help="folder for predictions")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--backend", choices=["auto", "pycocotools", "faster"], default="auto", help="COCOeval")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    args = parser.parse_args(argv)
    try:
        metrics, report = evaluate_checkpoint(args.checkpoint, args.out, args.data_root, args.num_workers, args.backend)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(report)
    if args.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
