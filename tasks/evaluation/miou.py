"""Mean intersection-over-union from one confusion matrix over the whole evaluation set.

The standard VOC / Cityscapes / mmsegmentation protocol: pixels of every image are accumulated
into a single K x K confusion matrix (rows = ground truth, columns = prediction), ignored pixels
(255) left out, and only then are per-class IoU ``TP / (TP + FP + FN)`` and their mean computed.
Averaging per-image IoUs instead weights small images like large ones and is not comparable
with published numbers. Classes absent from both ground truth and prediction have no IoU (NaN)
and are left out of the mean, as mmsegmentation's ``nanmean``; a class that is predicted but never
present counts with IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def confusion_matrix(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Count (ground truth, prediction) pairs over all labelled pixels, in one ``bincount``.

    Args:
        preds: predicted class indices, any shape; or logits ``[N, K, H, W]`` (argmax over K).
        target: ground-truth class indices, the shape of the label maps; ``ignore_index`` pixels
            are skipped.
        num_classes: K.
        ignore_index: the label of unlabelled pixels.

    Returns:
        ``Tensor[K, K]`` int64, ``[i, j]`` = pixels of class ``i`` predicted as ``j``.
    """
    if preds.is_floating_point():
        if preds.dim() != target.dim() + 1 or preds.shape[1] != num_classes:
            raise ValueError(
                f"float preds must be logits [N, {num_classes}, H, W] for targets {tuple(target.shape)}, "
                f"got {tuple(preds.shape)}"
            )
        preds = preds.argmax(dim=1)
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.reshape(-1).long()
    preds = preds.reshape(-1).long()
    valid = target != ignore_index
    target, preds = target[valid], preds[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target labels must be in [0, {num_classes}) or {ignore_index}, got "
            f"{sorted(set(target.unique().tolist()) - set(range(num_classes)))[:8]}"
        )
    if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):
        raise ValueError(f"predicted labels must be in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def miou_from_confusion(confusion: Tensor) -> dict[str, Tensor]:
    """mIoU, per-class IoU and pixel accuracy of a confusion matrix.

    Args:
        confusion: ``Tensor[K, K]``, rows = ground truth, columns = prediction.

    Returns:
        ``mIoU`` (mean of the defined IoUs; NaN if none), ``iou`` (``Tensor[K]``, NaN for
        classes neither present nor predicted), ``pixel_acc`` (correct / labelled pixels) and
        ``mean_acc`` (mean per-class recall over present classes), all float64.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    ground_truth = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    union = ground_truth + predicted - true_positive
    nan = torch.full_like(true_positive, float("nan"))
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
    recall = torch.where(ground_truth > 0, true_positive / ground_truth.clamp(min=1), nan)
    total = confusion.sum()
    pixel_acc = true_positive.sum() / total if total > 0 else torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "mIoU": iou.nanmean(),
        "iou": iou,
        "pixel_acc": pixel_acc,
        "mean_acc": recall.nanmean(),
    }


class MeanIoU(Metric):
    """A torchmetrics ``Metric`` accumulating one confusion matrix (summed over DDP ranks).

    The same class serves ``validation_step`` and ``tools/eval_miou.py``::

        metric = MeanIoU(num_classes=21)
        metric.update(logits_or_labels, masks)   # per batch
        metric.compute()["mIoU"]                 # over everything seen since reset()

    Args:
        num_classes: K.
        ignore_index: the label of unlabelled pixels (255 in VOC).
        class_names: optional names, only used by :meth:`per_class`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confusion: Tensor

    def __init__(
        self, num_classes: int, *, ignore_index: int = 255, class_names: Sequence[str] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` label maps ``[N, H, W]`` (or logits ``[N, K, H, W]``), ``target`` ``[N, H, W]``."""
        self.confusion += confusion_matrix(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        """``mIoU``, ``iou[K]``, ``pixel_acc``, ``mean_acc`` of everything accumulated (see :func:`miou_from_confusion`)."""
        return miou_from_confusion(self.confusion)

    def per_class(self) -> dict[str, float]:
        """``{class name (or index): IoU}`` for reports; NaN for classes never seen."""
        iou = self.compute()["iou"].tolist()
        names = self.class_names or [str(index) for index in range(self.num_classes)]
        return dict(zip(names, iou))
