"""Score predicted label PNGs against ground-truth label PNGs: per-class IoU, mIoU, pixel accuracy.

    python tools/eval_miou.py GT_DIR PRED_DIR --num-classes 21 [--ignore-index 255] [--split-file F] [--json]

Files are matched by stem (``2007_000033.png`` with ``2007_000033.png``). Both folders hold
single-channel label maps: palette PNGs (VOC's ``SegmentationClass``; the *indices* are read,
never the colours) or plain 8/16-bit grey PNGs of class indices. One confusion matrix is
accumulated over all images (memory does not grow with their number), the standard protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.evaluation.miou import MeanIoU  # noqa: E402

LABEL_MODES = ("P", "L", "I;16", "I")


def read_label_map(path: Path) -> np.ndarray:
    """A label PNG as an int64 array of class indices; an error naming the file otherwise."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            labels = np.asarray(image, dtype=np.int64) if mode in LABEL_MODES else None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error
    if labels is None:
        raise ValueError(f"{path}: mode {mode}, expected a label map (P or L) of class indices, not colours")
    return labels


def read_split_file(path: Path) -> list[str]:
    """Stems listed one per line (VOC's ``ImageSets/Segmentation/val.txt``)."""
    if not path.is_file():
        raise ValueError(f"{path}: split file not found")
    stems = path.read_text().split()
    if not stems:
        raise ValueError(f"{path}: split file lists no images")
    return stems


def match_files(gt_dir: Path, pred_dir: Path, stems: Sequence[str] | None = None) -> list[tuple[Path, Path]]:
    """Pairs (ground truth, prediction) by stem; every ground truth (of ``stems``) needs its prediction."""
    for folder in (gt_dir, pred_dir):
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a directory")
    ground_truth = {path.stem: path for path in sorted(gt_dir.glob("*.png"))}
    if stems is not None:
        absent = [stem for stem in stems if stem not in ground_truth]
        if absent:
            raise ValueError(f"{gt_dir}: no ground truth for {', '.join(absent[:5])}")
        ground_truth = {stem: ground_truth[stem] for stem in stems}
    if not ground_truth:
        raise ValueError(f"{gt_dir}: no .png label maps found")
    predictions = {path.stem: path for path in sorted(pred_dir.glob("*.png"))}
    missing = sorted(set(ground_truth) - set(predictions))
    if missing:
        shown = ", ".join(f"{stem}.png" for stem in missing[:5])
        more = f" ... ({len(missing)} in all)" if len(missing) > 5 else ""
        raise ValueError(f"{pred_dir}: no prediction for {shown}{more}")
    return [(ground_truth[stem], predictions[stem]) for stem in ground_truth]


def evaluate_folders(
    gt_dir: Path,
    pred_dir: Path,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
    stems: Sequence[str] | None = None,
) -> MeanIoU:
    """Accumulate every pair into one :class:`MeanIoU` and return it (``.compute()`` for the numbers)."""
    metric = MeanIoU(num_classes, ignore_index=ignore_index, class_names=class_names)
    for gt_path, pred_path in match_files(gt_dir, pred_dir, stems):
        target, prediction = read_label_map(gt_path), read_label_map(pred_path)
        if target.shape != prediction.shape:
            raise ValueError(f"{pred_path}: size {prediction.shape[::-1]} differs from {gt_path} {target.shape[::-1]}")
        for path, labels, allowed_ignore in ((gt_path, target, True), (pred_path, prediction, False)):
            bad = (labels >= num_classes) & ~((labels == ignore_index) & allowed_ignore)
            if bad.any() or (labels < 0).any():
                values = sorted(set(np.unique(labels[bad | (labels < 0)]).tolist()))[:8]
                raise ValueError(
                    f"{path}: label values {values} outside 0..{num_classes - 1}"
                    + (f" (ignore index {ignore_index})" if allowed_ignore else "")
                )
        metric.update(torch.from_numpy(prediction), torch.from_numpy(target))
    return metric


def format_report(metric: MeanIoU, class_names: Sequence[str]) -> str:
    """Per-class IoU table, then mIoU and pixel accuracy, in percent."""
    numbers = metric.compute()
    width = max(len(name) for name in class_names) + 2
    lines = [f"{'class':<{width}}{'IoU %':>8}", "-" * (width + 8)]
    for name, iou in zip(class_names, numbers["iou"].tolist()):
        lines.append(f"{name:<{width}}{'-' if math.isnan(iou) else f'{100 * iou:.2f}':>8}")
    lines.append("-" * (width + 8))
    lines.append(f"{'mIoU':<{width}}{100 * float(numbers['mIoU']):>8.2f}")
    lines.append(f"{'pixel acc':<{width}}{100 * float(numbers['pixel_acc']):>8.2f}")
    return "\n".join(lines)


def as_json(metric: MeanIoU) -> dict[str, object]:
    numbers = metric.compute()
    return {
        "mIoU": float(numbers["mIoU"]),
        "pixel_acc": float(numbers["pixel_acc"]),
        "per_class": [None if math.isnan(v) else v for v in numbers["iou"].tolist()],
    }


def default_class_names(num_classes: int) -> list[str]:
    from tasks.data.voc import VOC_CLASSES

    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [str(i) for i in range(num_classes)]


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
