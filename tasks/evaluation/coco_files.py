"""A COCO results file scored against a COCO ground-truth file, and the report people read.

:func:`evaluate_files` checks both JSON files entry by entry (an error names the file and the
entry) and scores them with :func:`~tasks.evaluation.coco_map.evaluate_detections`;
:func:`format_report` prints COCOeval's twelve summary lines and a per-class AP table. Used by
``tools/eval_coco.py`` and by :mod:`tasks.evaluation.checkpoint` (``tools/test.py``), so the two
always print and score the same way.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from tasks.evaluation.coco_map import SUMMARY_KEYS, evaluate_detections

# The lines of COCOeval.summarize(), in the order of its ``stats``.
SUMMARY_LINES = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, or fail with one line naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read {what} file ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def check_ground_truth(path: Path, dataset: Any) -> None:
    """Refuse a file that is not a COCO annotation file (one line naming it)."""
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= set(dataset):
        raise ValueError(f"{path}: not a COCO annotation file (needs images, annotations, categories)")


REQUIRED_KEYS = ("image_id", "category_id", "bbox", "score")


def _is_number(value: Any) -> bool:
    """An int or float from JSON; ``true``/``false`` are not numbers (Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` as the JSON file spells it (NaN, Infinity, true, "5"), shortened."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_detections(path: Path, detections: Any, ground_truth: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate a COCO results list as strictly as the training data; errors name the file and entry.

    Each entry needs an integer ``image_id`` of the ground truth, an integer ``category_id``,
    ``bbox`` ``[x, y, w, h]`` of four finite numbers with ``w, h >= 0`` and a finite number
    ``score`` (booleans, strings and lists are refused). A ``category_id`` that the ground truth
    does not have is allowed: COCOeval does not score it, and the summary counts it.
    """
    if not isinstance(detections, list):
        raise ValueError(f"{path}: expected a JSON list of detections, got {type(detections).__name__}")
    image_ids = {image["id"] for image in ground_truth["images"]}
    for index, detection in enumerate(detections):
        where = f"{path}: detection {index}"
        if not isinstance(detection, dict):
            raise ValueError(
                f"{where} is {_shown(detection)}, expected an object with image_id, category_id, bbox and score"
            )
        missing = [key for key in REQUIRED_KEYS if key not in detection]
        if missing:
            raise ValueError(f"{where} has no {', '.join(missing)} (needs image_id, category_id, bbox and score)")
        for key in ("image_id", "category_id"):
            value = detection[key]
            if not (_is_number(value) and math.isfinite(value) and float(value).is_integer()):
                raise ValueError(f"{where}: {key} must be an integer, got {_shown(value)} ({type(value).__name__})")
        bbox, score = detection["bbox"], detection["score"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise ValueError(f"{where}: bbox must be [x, y, w, h], four numbers, got {_shown(bbox)}")
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{where}: bbox {_shown(bbox)} is not finite")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: bbox {_shown(bbox)} has a negative width or height")
        if not _is_number(score) or not math.isfinite(score):
            raise ValueError(f"{where}: score must be a finite number, got {_shown(score)} ({type(score).__name__})")
        if detection["image_id"] not in image_ids:
            raise ValueError(f"{where}: image_id {detection['image_id']} is not in the ground truth")
    return detections


def format_report(summary: dict[str, Any], category_names: dict[int, str]) -> str:
    """COCOeval's 12 summary lines, a per-class AP table, then the count of unscored detections."""
    lines = [f" {line} = {summary[key]:.3f}" for line, key in zip(SUMMARY_LINES, SUMMARY_KEYS)]
    width = max(len(name) for name in category_names.values()) + 2
    lines += ["", f"{'id':>4}  {'class':<{width}}{'AP':>7}", "-" * (width + 13)]
    for category_id, ap in summary["per_class"].items():
        shown = "-" if ap < 0 else f"{ap:.3f}"
        lines.append(f"{category_id:>4}  {category_names[category_id]:<{width}}{shown:>7}")
    unscored = summary.get("unscored_detections", 0)
    ids = summary.get("unscored_category_ids", [])
    lines += ["", f"unscored detections (category id not in the ground truth, ignored as by COCOeval): {unscored}"]
    if ids:
        lines[-1] += f", category ids {ids}"
    return "\n".join(lines)


def evaluate_files(gt_path: Path, results_path: Path, backend: str = "auto") -> dict[str, Any]:
    """Check both files and return the COCO summary plus per-class AP (``evaluate_detections``)."""
    ground_truth = read_json(gt_path, "ground-truth")
    check_ground_truth(gt_path, ground_truth)
    detections = check_detections(results_path, read_json(results_path, "detections"), ground_truth)
    if not detections:
        warnings.warn(f"{results_path}: no detections; every AP is 0", stacklevel=2)
    return evaluate_detections(ground_truth, detections, backend=backend)


def as_json(summary: dict[str, Any], category_names: dict[int, str]) -> dict[str, Any]:
    """The summary as ``tools/eval_coco.py --json`` prints it: per-class AP with each class's name."""
    output: dict[str, Any] = {key: summary[key] for key in SUMMARY_KEYS}
    output["per_class"] = [
        {"category_id": cid, "name": category_names[cid], "AP": ap} for cid, ap in summary["per_class"].items()
    ]
    output["unscored_detections"] = summary["unscored_detections"]
    output["unscored_category_ids"] = summary["unscored_category_ids"]
    return output
