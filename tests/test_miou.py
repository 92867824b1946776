"""tasks/evaluation/miou.py against an independent numpy computation of the VOC protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.evaluation.miou import MeanIoU, confusion_matrix, miou_from_confusion


def numpy_miou(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int) -> dict[str, object]:
    """Per-class IoU by set counting over all images, written without a confusion matrix."""
    pred = np.concatenate([p.ravel() for p in preds])
    gt = np.concatenate([t.ravel() for t in targets])
    keep = gt != 255
    pred, gt = pred[keep], gt[keep]
    ious = []
    for c in range(num_classes):
        inter = np.sum((pred == c) & (gt == c))
        union = np.sum((pred == c) | (gt == c))
        ious.append(inter / union if union else np.nan)
    ious_arr = np.array(ious)
    return {"iou": ious_arr, "mIoU": np.nanmean(ious_arr), "pixel_acc": np.mean(pred == gt)}


def test_hand_made_predictions_match_numpy() -> None:
    # 4 classes: class 3 never appears anywhere (NaN, excluded); class 2 is predicted but absent
    # from the ground truth (IoU 0, counted); 255 pixels are ignored whatever is predicted there.
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 2, 1], [3, 1, 0, 0]])
    metric = MeanIoU(num_classes=4)
    metric.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])
    result = metric.compute()
    expected = numpy_miou([pred], [target], 4)
    # By hand: class 0: TP 5, FP 0, FN 1 -> 5/6; class 1: TP 3, FP 1, FN 1 -> 3/5; class 2: 0/1.
    hand = np.array([5 / 6, 3 / 5, 0.0, np.nan])
    np.testing.assert_allclose(result["iou"].numpy(), hand)
    np.testing.assert_allclose(result["iou"].numpy(), expected["iou"])
    assert result["mIoU"].item() == pytest.approx((5 / 6 + 3 / 5 + 0) / 3)
    assert result["mIoU"].item() == pytest.approx(expected["mIoU"])
    assert result["pixel_acc"].item() == pytest.approx(8 / 10)
    assert result["mean_acc"].item() == pytest.approx((5 / 6 + 3 / 4) / 2)


def test_accumulates_one_matrix_over_the_set_not_a_mean_of_images() -> None:
    rng = np.random.default_rng(0)
    preds, targets = [], []
    metric = MeanIoU(num_classes=5)
    per_image = []
    for height, width in [(7, 9), (20, 13), (4, 4)]:
        target = rng.integers(0, 5, size=(height, width))
        target[rng.random((height, width)) < 0.1] = 255
        pred = np.where(rng.random((height, width)) < 0.6, target % 255, rng.integers(0, 5, size=(height, width)))
        pred[target == 255] = rng.integers(0, 5)
        preds.append(pred)
        targets.append(target)
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(target)[None])
        per_image.append(numpy_miou([pred], [target], 5)["mIoU"])
    expected = numpy_miou(preds, targets, 5)
    result = metric.compute()
    np.testing.assert_allclose(result["iou"].numpy(), expected["iou"], rtol=1e-12)
    assert result["mIoU"].item() == pytest.approx(expected["mIoU"])
    assert result["pixel_acc"].item() == pytest.approx(expected["pixel_acc"])
    assert result["mIoU"].item() != pytest.approx(float(np.mean(per_image)))
    metric.reset()
    assert int(metric.confusion.sum()) == 0


def test_logits_are_argmaxed_and_states_merge_by_sum() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    assert torch.equal(confusion_matrix(logits, target, 3), confusion_matrix(logits.argmax(1), target, 3))
    # Two "ranks" each see one image; merging their states (DDP's sum) equals one metric on both.
    rank0, rank1, whole = MeanIoU(3), MeanIoU(3), MeanIoU(3)
    rank0.update(logits[:1], target[:1])
    rank1.update(logits[1:], target[1:])
    whole.update(logits, target)
    rank0.merge_state(rank1)
    assert torch.equal(rank0.confusion, whole.confusion)
    assert rank0.compute()["mIoU"] == whole.compute()["mIoU"]


def test_confusion_matrix_layout_and_empty_cases() -> None:
    target = torch.tensor([0, 0, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 2])
    matrix = confusion_matrix(pred, target, 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]  # rows: ground truth
    nothing = miou_from_confusion(torch.zeros(3, 3, dtype=torch.long))
    assert torch.isnan(nothing["mIoU"]) and torch.isnan(nothing["iou"]).all()
    names = MeanIoU(2, class_names=["bg", "fg"])
    names.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert names.per_class() == {"bg": 1.0, "fg": 1.0}


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\) or 255, got \[7\]"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 255]), 3)
    with pytest.raises(ValueError, match="logits"):
        confusion_matrix(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="class names"):
        MeanIoU(3, class_names=["a"])
