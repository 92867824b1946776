"""Score predicted label PNGs against ground-truth label PNGs: per-class IoU, mIoU, pixel accuracy.

    python tools/eval_miou.py GT_DIR PRED_DIR --num-classes 21 [--ignore-index 255] [--split-file F] [--json]

Files are matched by stem (``2007_000033.png`` with ``2007_000033.png``). Both folders hold
single-channel label maps: palette PNGs (VOC's ``SegmentationClass``; the *indices* are read,
never the colours) or plain 8-bit grey PNGs of class indices. One confusion matrix is
accumulated over all images (memory does not grow with their number), the standard protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.evaluation.label_files import (  # noqa: E402
    as_json,
    default_class_names,
    evaluate_folders,
    format_report,
    read_split_file,
)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gt_dir", type=Path, help="folder of ground-truth label PNGs")
    parser.add_argument("pred_dir", type=Path, help="folder of predicted label PNGs (same stems)")
    parser.add_argument("--num-classes", type=int, required=True, help="K (21 for PASCAL VOC)")
    parser.add_argument("--ignore-index", type=int, default=255, help="unlabelled ground-truth value")
    parser.add_argument("--split-file", type=Path, help="score only the stems listed here (e.g. VOC's val.txt)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.num_classes < 2:
        parser.error(f"--num-classes must be at least 2, got {args.num_classes}")
    names = default_class_names(args.num_classes)
    try:
        stems = read_split_file(args.split_file) if args.split_file else None
        metric = evaluate_folders(args.gt_dir, args.pred_dir, args.num_classes, args.ignore_index, names, stems)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    result = as_json(metric)
    print(json.dumps(result) if args.json else format_report(metric, names))
    return result


if __name__ == "__main__":
    main()
