"""Detection post-processing for a whole batch at once, with no Python loop (exportable).

Steps, per image: the ``topk_candidates`` best (anchor, class) scores over all classes (mmdet's
``nms_pre``; it bounds the NMS work whatever the score distribution), the score threshold,
per-class NMS, at most ``detections_per_image`` detections. Written as one graph over the batch,
so ONNX and TorchScript exports keep a dynamic batch size: images are kept apart in a single
``batched_nms`` call by giving every (image, class) pair its own group.
:meth:`heads.ssdlite.SSDLiteHead.postprocess` splits the result by image.
"""

from __future__ import annotations

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
    anchor_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = (flat_index - anchor_index * num_classes + 1).reshape(-1)
    top_boxes = boxes.gather(1, anchor_index.unsqueeze(-1).expand(-1, -1, 4)).reshape(-1, 4)
    images = torch.arange(batch, device=scores.device).unsqueeze(1).expand(batch, k).reshape(-1)
    top_scores = top_scores.reshape(-1)
    nonempty = (top_boxes[:, 2] > top_boxes[:, 0]) & (top_boxes[:, 3] > top_boxes[:, 1])
    keep = torch.where((top_scores > score_threshold) & nonempty)[0]
    top_boxes, top_scores, labels, images = top_boxes[keep], top_scores[keep], labels[keep], images[keep]
    kept = batched_nms(top_boxes, top_scores, images * (num_classes + 1) + labels, nms_threshold)
    top_boxes, top_scores, labels, images = top_boxes[kept], top_scores[kept], labels[kept], images[kept]
    # batched_nms returns descending scores; group by image keeping that order (an integer key,
    # unique per row, so no sort stability or float rounding is relied on), keep N per image.
    position = torch.arange(images.shape[0], device=scores.device)
    order = (images * images.shape[0] + position).argsort()
    top_boxes, top_scores, labels, images = top_boxes[order], top_scores[order], labels[order], images[order]
    per_image = (images.unsqueeze(1) == torch.arange(batch, device=scores.device).unsqueeze(0)).sum(0)
    first = per_image.cumsum(0) - per_image
    rank = position - first[images]
    within = torch.where(rank < detections_per_image)[0]
    return top_boxes[within], top_scores[within], labels[within], images[within]
