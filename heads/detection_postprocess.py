"""Detection post-processing for a whole batch at once, with no Python loop (exportable).

The same steps as :meth:`heads.ssdlite.SSDLiteHead.postprocess` (per-class top-k, score
threshold, per-class NMS, at most N detections per image) written as one graph over the batch,
so ONNX and TorchScript exports keep a dynamic batch size: images are kept apart in a single
``batched_nms`` call by giving every (image, class) pair its own group.
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
        score_threshold, nms_threshold, topk_candidates, detections_per_image: as the head's.

    Returns:
        ``boxes`` FloatTensor[D, 4] (xyxy), ``scores`` FloatTensor[D], ``labels`` Int64Tensor[D]
        in ``1..C`` and ``batch_index`` Int64Tensor[D], ordered by image and, within an image,
        by descending score.
    """
    batch, num_anchors, num_classes = scores.shape
    k = min(topk_candidates, num_anchors)
    top_scores, top_anchors = scores.topk(k, dim=1)  # [N, k, C]: the best anchors of each class
    flat_anchors = top_anchors.reshape(batch, k * num_classes)
    top_boxes = boxes.gather(1, flat_anchors.unsqueeze(-1).expand(-1, -1, 4)).reshape(-1, 4)
    labels = torch.arange(1, num_classes + 1, device=scores.device).expand(batch, k, num_classes).reshape(-1)
    images = torch.arange(batch, device=scores.device).unsqueeze(1).expand(batch, k * num_classes).reshape(-1)
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
