"""COCO box mAP of a detections file against a COCO ground-truth file.

    python tools/eval_coco.py annotations/instances_val2017.json detections.json [--backend auto] [--json]

``detections.json`` is the COCO results format: a list of ``{"image_id", "category_id",
"bbox": [x, y, w, h], "score"}`` in original-image pixels. The numbers are those of the official
``pycocotools.COCOeval`` (``--backend pycocotools``); ``faster`` (faster-coco-eval) computes the
same numbers in a fraction of the time and is the default (``auto``) when installed.

The results file is checked entry by entry first (a bad entry is one line naming its index and
the problem). Detections whose ``category_id`` is not in the ground truth are not scored, as
COCOeval does; the report ends with their count (``unscored_detections`` with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.evaluation.coco_files import as_json, evaluate_files, format_report, read_json  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gt_json", type=Path, help="COCO annotations (instances_*.json)")
    parser.add_argument("results_json", type=Path, help="detections in COCO results format")
    parser.add_argument("--backend", choices=["auto", "pycocotools", "faster"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    try:
        summary = evaluate_files(args.gt_json, args.results_json, args.backend)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    names = {c["id"]: c["name"] for c in read_json(args.gt_json, "ground-truth")["categories"]}
    if args.json:
        print(json.dumps(as_json(summary, names)))
    else:
        print(format_report(summary, names))
    return summary


if __name__ == "__main__":
    main()
