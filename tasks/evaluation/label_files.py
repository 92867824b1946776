"""Folders of label PNGs scored against each other (mIoU), and the report people read.

Files are matched by stem; both folders hold single-channel label maps (palette PNGs, whose
*indices* are read, or 8-bit grey PNGs of class indices), read by the DataModule's reader
(:func:`tasks.data.files.read_label_png`), so what trains and what is scored read alike. :func:`evaluate_folders`
accumulates every pair into one :class:`~tasks.evaluation.miou.MeanIoU`; :func:`format_report`
prints the per-class table. Used by ``tools/eval_miou.py`` and by
:mod:`tasks.evaluation.checkpoint` (``tools/test.py``), so the two always agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tasks.data.files import read_label_png
from tasks.evaluation.miou import MeanIoU


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
        target, prediction = (read_label_png(path).astype(np.int64) for path in (gt_path, pred_path))
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
    """mIoU, pixel accuracy and per-class IoU as plain numbers (``None`` for a class never seen)."""
    numbers = metric.compute()
    return {
        "mIoU": float(numbers["mIoU"]),
        "pixel_acc": float(numbers["pixel_acc"]),
        "per_class": [None if math.isnan(v) else v for v in numbers["iou"].tolist()],
    }


def default_class_names(num_classes: int) -> list[str]:
    """VOC's names at VOC's 21 classes, the indices as text otherwise."""
    from tasks.data.constants import VOC_CLASSES

    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else [str(i) for i in range(num_classes)]
