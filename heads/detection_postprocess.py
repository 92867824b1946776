"""Detection post-processing for a whole batch at once, with no Python loop (exportable).

Steps, per image: the ``topk_candidates`` best (anchor, class) scores over all classes (mmdet's
``nms_pre``; it bounds the NMS work whatever the score distribution), the score threshold,
per-class NMS, at most ``detections_per_image`` detections. Written as one graph over the batch,
so ONNX and TorchScript exports keep a dynamic batch size.
:meth:`heads.ssdlite.SSDLiteHead.postprocess` splits the result by image.

The candidates reach NMS as a score tensor ``[N, C, A]`` (image, class, anchor) that is zero
outside them (:func:`nms_detections`), ONNX's own ``NonMaxSuppression`` layout: in an ONNX file the
suppression is that one operator, which compares a box only with the kept boxes of its image and
class. (torchvision's ``batched_nms`` exports as one class over every image and class at once, by
offsetting the boxes: each box is then compared with every box kept so far in the batch, 22 ms of
ONNX Runtime's 88 for our INT8 SSDLite at batch 8.) In PyTorch the same candidates go through
``batched_nms`` with one group per (image, class).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torchvision.ops import batched_nms


def batched_detections(
    scores: Tensor,
    boxes: Tensor,
    *,
    score_threshold: float,
    nms_threshold: float,
    topk_candidates: int,
    detections_per_image: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Detections of a batch as flat tensors.

    Args:
        scores: Tensor[N, A, C] per-class probabilities without the background.
        boxes: Tensor[N, A, 4] decoded boxes, xyxy, in the coordinates wanted out.
        score_threshold: candidates must score above it.
        nms_threshold: IoU above which NMS drops the lower-scoring box of the same class.
        topk_candidates: (anchor, class) pairs kept per image before NMS, best first.
        detections_per_image: detections kept per image after NMS, best first.

    Returns:
        ``boxes`` FloatTensor[D, 4] (xyxy), ``scores`` FloatTensor[D], ``labels`` Int64Tensor[D]
        in ``1..C`` and ``batch_index`` Int64Tensor[D], ordered by image and, within an image,
        by descending score.
    """
    batch, num_anchors, num_classes = scores.shape
    k = min(topk_candidates, num_anchors * num_classes)
    top_scores, flat_index = scores.reshape(batch, -1).topk(k, dim=1)  # [N, k], anchor-major
    candidates = torch.zeros_like(scores.reshape(batch, -1)).scatter(1, flat_index, top_scores)
    nonempty = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # [N, A]
    candidates = candidates.reshape(batch, num_anchors, num_classes) * nonempty.unsqueeze(-1).to(scores.dtype)
    return nms_detections(
        boxes,
        candidates.transpose(1, 2),
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        detections_per_image=detections_per_image,
    )


def nms_detections(
    boxes: Tensor, candidates: Tensor, *, score_threshold: float, nms_threshold: float, detections_per_image: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-class NMS of the candidates of a batch, at most ``detections_per_image`` per image.

    Args:
        boxes: Tensor[N, A, 4] xyxy boxes of every anchor.
        candidates: Tensor[N, C, A] the candidates' scores by class, zero for an (anchor, class)
            pair that is not one (``score_threshold`` >= 0 leaves those out).
        score_threshold: candidates must score above it.
        nms_threshold: IoU above which NMS drops the lower-scoring box of the same image and class.
        detections_per_image: detections kept per image after NMS, best first.

    Returns:
        ``boxes`` FloatTensor[D, 4], ``scores`` FloatTensor[D], ``labels`` Int64Tensor[D] in ``1..C``
        and ``batch_index`` Int64Tensor[D], ordered by image and, within an image, by descending score.
    """
    batch, num_classes, num_anchors = candidates.shape
    if torch.onnx.is_in_onnx_export():
        selected = _OnnxNonMaxSuppression.apply(boxes, candidates, nms_threshold, score_threshold)
    else:
        selected = _non_max_suppression(boxes, candidates, nms_threshold, score_threshold)
    images, classes, anchors = selected.unbind(1)
    scores = candidates.reshape(-1)[(images * num_classes + classes) * num_anchors + anchors]
    # Best first over the batch, then grouped by image keeping that order (an integer key, unique
    # per row, so no sort stability or float rounding is relied on); N per image.
    by_score = scores.argsort(descending=True)
    images, classes, anchors, scores = images[by_score], classes[by_score], anchors[by_score], scores[by_score]
    position = torch.arange(images.shape[0], device=candidates.device)
    order = (images * images.shape[0] + position).argsort()
    images, classes, anchors, scores = images[order], classes[order], anchors[order], scores[order]
    per_image = (images.unsqueeze(1) == torch.arange(batch, device=candidates.device).unsqueeze(0)).sum(0)
    rank = position - (per_image.cumsum(0) - per_image)[images]
    within = torch.where(rank < detections_per_image)[0]
    images, classes, anchors, scores = images[within], classes[within], anchors[within], scores[within]
    return boxes[images, anchors], scores, classes + 1, images


def _non_max_suppression(boxes: Tensor, candidates: Tensor, nms_threshold: float, score_threshold: float) -> Tensor:
    """ONNX ``NonMaxSuppression``'s result in PyTorch: the kept ``(image, class, anchor)`` rows,
    Int64Tensor[K, 3], of the candidates above ``score_threshold`` (one ``batched_nms`` group per
    image and class)."""
    images, classes, anchors = torch.where(candidates > score_threshold)
    groups = images * candidates.shape[1] + classes
    kept = batched_nms(boxes[images, anchors], candidates[images, classes, anchors], groups, nms_threshold)
    return torch.stack([images[kept], classes[kept], anchors[kept]], dim=1)


class _OnnxNonMaxSuppression(torch.autograd.Function):
    """:func:`_non_max_suppression` that exports as ONNX's ``NonMaxSuppression`` operator."""

    @staticmethod
    def forward(ctx: object, boxes: Tensor, candidates: Tensor, nms_threshold: float, score_threshold: float) -> Tensor:
        return _non_max_suppression(boxes, candidates, nms_threshold, score_threshold)

    @staticmethod
    def symbolic(g: object, boxes: object, candidates: object, nms_threshold: float, score_threshold: float) -> object:
        every_box = g.op("Constant", value_t=torch.tensor([sys.maxsize], dtype=torch.int64))
        iou = g.op("Constant", value_t=torch.tensor([nms_threshold], dtype=torch.float32))
        score = g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32))
        return g.op("NonMaxSuppression", boxes, candidates, every_box, iou, score)
