"""SSD default boxes, box coding and anchor matching as pure tensor functions.

Everything here works in *normalised* image coordinates, the convention of the TF Object
Detection API's SSD meta-architecture: a box is ``[x1, y1, x2, y2]`` with x as a fraction of the
input's width and y as a fraction of its height. Anchors then depend on the feature-map sizes
alone, and a detection maps back to any image (the network input, or the original picture SSD's
fixed-size resize came from) by one multiplication by that image's width and height.

* :class:`DefaultBoxes` / :class:`DefaultBoxGenerator`: the default boxes of SSD (Liu et al.,
  2016, section 2.2) with the TF API's ``ssd_anchor_generator`` parameters (``num_layers: 6,
  min_scale: 0.2, max_scale: 0.95``, aspect ratios 1, 2, 1/2, 3, 1/3 plus one box at the
  interpolated scale, three boxes on the first layer), cached per feature-map size.
* :func:`encode_boxes` / :func:`decode_boxes`: the Faster R-CNN box coder with weights
  ``(10, 10, 5, 5)`` (TF's ``faster_rcnn_box_coder`` scale factors).
* :func:`match_anchors`: TF's ``argmax_matcher`` (IoU >= 0.5, ``force_match_for_each_row``: every
  ground-truth box also takes its best anchor), with anchors inside crowd regions ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

# TF's faster_rcnn_box_coder scale factors (y, x, h, w) = (10, 10, 5, 5), written here in
# torchvision's (x, y, w, h) order: both centre weights are 10 and both size weights are 5.
BOX_CODER_WEIGHTS: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
# exp() of a larger log-ratio would overflow float16/float32 for a badly trained network.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

# Match labels written by match_anchors besides ground-truth indices.
BACKGROUND = -1
IGNORE = -2


@dataclass(frozen=True)
class DefaultBoxes:
    """SSD's default boxes, as TF's ``ssd_anchor_generator`` describes them (the one definition).

    Scales are spaced linearly from ``min_scale`` to ``max_scale`` over the layers (SSD, eq. 4);
    each layer gets one box per aspect ratio at its scale plus, when
    ``interpolated_scale_aspect_ratio > 0``, one box of that ratio at ``sqrt(s_k * s_{k+1})``
    (with ``s_{L} = 1``). With ``reduce_boxes_in_lowest_layer`` the first layer has only three
    boxes, ``(0.1, 1)``, ``(s_0, 2)`` and ``(s_0, 1/2)``, as the TF API's SSD configs.

    Attributes:
        min_scale: scale of the first layer, as a fraction of the shorter image side.
        max_scale: scale of the last layer.
        scales: explicit per-layer scales, overriding ``min_scale``/``max_scale``.
        aspect_ratios: width / height of the boxes at each layer's own scale.
        interpolated_scale_aspect_ratio: aspect ratio of the extra box between two scales,
            or ``<= 0`` for none.
        reduce_boxes_in_lowest_layer: give the first layer the three boxes above.
    """

    min_scale: float = 0.2
    max_scale: float = 0.95
    scales: Sequence[float] | None = None
    aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True

    def specs(self, num_layers: int = 6) -> list[list[tuple[float, float]]]:
        """The ``(scale, aspect_ratio)`` of every box of every layer (TF's ``create_ssd_anchors``).

        Returns:
            ``specs[layer] = [(scale, aspect_ratio), ...]`` in the order the head predicts them.
        """
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        scales = self.scales
        if scales is None or len(scales) == 0:
            if num_layers == 1:
                layer_scales = [self.min_scale]
            else:
                step = (self.max_scale - self.min_scale) / (num_layers - 1)
                layer_scales = [self.min_scale + step * i for i in range(num_layers)]
        else:
            if len(scales) != num_layers:
                raise ValueError(f"got {len(scales)} scales for {num_layers} layers")
            layer_scales = list(scales)
        if any(ratio <= 0 for ratio in self.aspect_ratios) or not self.aspect_ratios:
            raise ValueError(f"aspect_ratios must be positive and non-empty, got {list(self.aspect_ratios)}")
        layer_scales = [*layer_scales, 1.0]
        specs: list[list[tuple[float, float]]] = []
        for layer, (scale, next_scale) in enumerate(zip(layer_scales[:-1], layer_scales[1:])):
            if layer == 0 and self.reduce_boxes_in_lowest_layer:
                specs.append([(0.1, 1.0), (scale, 2.0), (scale, 0.5)])
                continue
            boxes = [(scale, float(ratio)) for ratio in self.aspect_ratios]
            if self.interpolated_scale_aspect_ratio > 0:
                boxes.append((math.sqrt(scale * next_scale), float(self.interpolated_scale_aspect_ratio)))
            specs.append(boxes)
        return specs


def ssd_box_specs(num_layers: int = 6, **default_boxes: Any) -> list[list[tuple[float, float]]]:
    """``DefaultBoxes(**default_boxes).specs(num_layers)``: the boxes of every layer."""
    return DefaultBoxes(**default_boxes).specs(num_layers)


def grid_anchors(
    feature_size: tuple[int, int],
    box_specs: Sequence[tuple[float, float]],
    *,
    aspect_correction: tuple[float, float] = (1.0, 1.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Default boxes of one feature map, normalised xyxy, ordered (row, column, box).

    The box of spec ``(s, a)`` at cell ``(i, j)`` is centred on ``((j + 0.5) / W, (i + 0.5) / H)``
    and is ``s * sqrt(a)`` wide and ``s / sqrt(a)`` high (TF's ``grid_anchor_generator``), each
    multiplied by ``aspect_correction`` = ``(min_side / width, min_side / height)`` so that a
    box of ratio 1 is square in pixels on a non-square input.

    Args:
        feature_size: ``(H, W)`` of the map.
        box_specs: ``(scale, aspect_ratio)`` of each box at a cell.

    Returns:
        Tensor[H * W * len(box_specs), 4]: boxes in the order the head's outputs are flattened.
    """
    height, width = feature_size
    specs = torch.tensor(box_specs, dtype=torch.float64, device=device)  # [B, 2]
    sqrt_ratio = specs[:, 1].sqrt()
    box_w = specs[:, 0] * sqrt_ratio * aspect_correction[0]
    box_h = specs[:, 0] / sqrt_ratio * aspect_correction[1]
    cy = (torch.arange(height, dtype=torch.float64, device=device) + 0.5) / height
    cx = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) / width
    cy, cx = torch.meshgrid(cy, cx, indexing="ij")  # [H, W]
    centers = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)  # [H*W, 1, 2]
    sizes = torch.stack([box_w, box_h], dim=-1).reshape(1, -1, 2)  # [1, B, 2]
    boxes = torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)  # [H*W, B, 4]
    return boxes.reshape(-1, 4).to(dtype)


class DefaultBoxGenerator:
    """SSD default boxes for a list of feature maps, cached per feature-map sizes.

    The anchors depend only on the sizes of the maps (not on the batch), so they are computed
    once per ``(sizes, device, dtype)`` and reused: training at a fixed input size never
    recomputes them.

    Args:
        box_specs: per layer, the ``(scale, aspect_ratio)`` of its boxes (see :func:`ssd_box_specs`).
    """

    def __init__(self, box_specs: Sequence[Sequence[tuple[float, float]]]) -> None:
        self.box_specs = [[(float(s), float(a)) for s, a in layer] for layer in box_specs]
        self._cache: dict[tuple, Tensor] = {}

    @classmethod
    def ssd(cls, num_layers: int = 6, **kwargs) -> DefaultBoxGenerator:
        """The generator of :func:`ssd_box_specs` (the TF API's ``ssd_anchor_generator``)."""
        return cls(ssd_box_specs(num_layers, **kwargs))

    @property
    def num_layers(self) -> int:
        return len(self.box_specs)

    def num_anchors_per_location(self) -> list[int]:
        """Boxes per cell of each layer: ``[3, 6, 6, 6, 6, 6]`` for the default SSDLite setting."""
        return [len(layer) for layer in self.box_specs]

    def num_anchors(self, feature_sizes: Sequence[tuple[int, int]]) -> int:
        """Total boxes for maps of ``feature_sizes``: 1917 at 300x300, 2034 at 320x320."""
        return sum(h * w * n for (h, w), n in zip(feature_sizes, self.num_anchors_per_location()))

    def __call__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """All default boxes for maps of ``feature_sizes`` (largest first).

        Returns:
            Tensor[A, 4]: normalised xyxy boxes, layer by layer, each ordered (row, column, box).
        """
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        if len(sizes) != self.num_layers:
            raise ValueError(f"got {len(sizes)} feature maps for {self.num_layers} anchor layers")
        key = (sizes, str(torch.device(device) if device is not None else "cpu"), dtype)
        anchors = self._cache.get(key)
        # Boxes made under torch.inference_mode (a validation loop) cannot be saved for backward
        # or traced later: outside inference mode such a cached tensor is made anew.
        if anchors is None or (anchors.is_inference() and not torch.is_inference_mode_enabled()):
            # The first (finest) map has the input's aspect ratio: correct widths and heights
            # so that ratio-1 boxes are square in pixels (TF scales by min(H, W) / H and / W).
            first_h, first_w = sizes[0]
            shortest = min(first_h, first_w)
            correction = (shortest / first_w, shortest / first_h)
            anchors = torch.cat(
                [
                    grid_anchors(size, specs, aspect_correction=correction, device=device, dtype=dtype)
                    for size, specs in zip(sizes, self.box_specs)
                ]
            )
            self._cache[key] = anchors
        return anchors

    def __getstate__(self) -> dict:
        # Cached tensors may live on a GPU; pickles (checkpoints, DDP spawn) carry only the specs.
        return {"box_specs": self.box_specs, "_cache": {}}


def encode_boxes(boxes: Tensor, anchors: Tensor, weights: Sequence[float] = BOX_CODER_WEIGHTS) -> Tensor:
    """Regression targets of ``boxes`` relative to ``anchors`` (Faster R-CNN coding).

    ``dx = wx * (cx - cx_a) / w_a``, ``dy = wy * (cy - cy_a) / h_a``, ``dw = ww * log(w / w_a)``,
    ``dh = wh * log(h / h_a)``. The code is invariant to scaling x and y, so normalised and pixel
    coordinates give the same targets.

    Args:
        boxes: Tensor[..., 4] xyxy.
        anchors: Tensor[..., 4] xyxy, broadcastable against ``boxes``.
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        Tensor[..., 4]: ``(dx, dy, dw, dh)``.
    """
    wx, wy, ww, wh = weights
    eps = torch.finfo(boxes.dtype).eps
    box = box_convert(boxes, "xyxy", "cxcywh")
    anchor = box_convert(anchors, "xyxy", "cxcywh")
    anchor_wh = anchor[..., 2:].clamp(min=eps)
    dxy = (box[..., :2] - anchor[..., :2]) / anchor_wh * box.new_tensor([wx, wy])
    dwh = torch.log(box[..., 2:].clamp(min=eps) / anchor_wh) * box.new_tensor([ww, wh])
    return torch.cat([dxy, dwh], dim=-1)


def decode_boxes(deltas: Tensor, anchors: Tensor, weights: Sequence[float] = BOX_CODER_WEIGHTS) -> Tensor:
    """Invert :func:`encode_boxes`: boxes (xyxy) from ``(dx, dy, dw, dh)`` and their anchors.

    Args:
        deltas: Tensor[..., 4].
        anchors: Tensor[..., 4] xyxy, broadcastable against ``deltas``.

    Returns:
        Tensor[..., 4] xyxy in the anchors' coordinates; size deltas are clamped at
        ``log(1000 / 16)`` so an untrained network cannot overflow ``exp``.
    """
    wx, wy, ww, wh = weights
    anchor = box_convert(anchors, "xyxy", "cxcywh")
    dxy = deltas[..., :2] / deltas.new_tensor([wx, wy])
    dwh = (deltas[..., 2:] / deltas.new_tensor([ww, wh])).clamp(max=BBOX_XFORM_CLIP)
    center = anchor[..., :2] + dxy * anchor[..., 2:]
    size = anchor[..., 2:] * dwh.exp()
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def match_anchors(
    gt_boxes: Tensor,
    anchors: Tensor,
    *,
    iou_threshold: float = 0.5,
    force_match: bool = True,
    crowd_boxes: Tensor | None = None,
    crowd_ioa_threshold: float = 0.5,
) -> Tensor:
    """Assign every anchor a ground-truth box, background or "ignore" (SSD section 2.2).

    An anchor is matched to the box it overlaps most when that IoU is at least ``iou_threshold``;
    with ``force_match`` every box also takes the anchor it overlaps most, so no object goes
    without a positive (TF's ``force_match_for_each_row``). Unmatched anchors that lie mostly
    inside a crowd region (intersection over anchor area >= ``crowd_ioa_threshold``) are ignored
    rather than used as negatives: COCO's ``iscrowd`` regions hold objects nobody boxed.

    Args:
        gt_boxes: Tensor[G, 4] xyxy (G may be 0).
        anchors: Tensor[A, 4] xyxy, same coordinates.
        crowd_boxes: optional Tensor[C, 4] xyxy crowd regions.

    Returns:
        Int64Tensor[A]: index into ``gt_boxes``, :data:`BACKGROUND` (-1) or :data:`IGNORE` (-2).
    """
    num_anchors = anchors.shape[0]
    matches = torch.full((num_anchors,), BACKGROUND, dtype=torch.int64, device=anchors.device)
    if gt_boxes.numel() > 0:
        iou = box_iou(gt_boxes, anchors)  # [G, A]
        best_iou, best_gt = iou.max(dim=0)
        matches = torch.where(best_iou >= iou_threshold, best_gt, matches)
        if force_match:
            best_anchor_iou, best_anchor = iou.max(dim=1)  # [G]
            # A box that overlaps no anchor at all (degenerate) cannot be forced onto one: it is
            # written into a spare slot past the end (no boolean indexing: no host sync on a GPU).
            target = torch.where(best_anchor_iou > 0, best_anchor, num_anchors)
            spare = torch.cat([matches, matches.new_full((1,), BACKGROUND)])
            spare[target] = torch.arange(gt_boxes.shape[0], device=anchors.device)
            matches = spare[:num_anchors]
    if crowd_boxes is not None and crowd_boxes.numel() > 0:
        ioa = intersection_over_area(anchors, crowd_boxes).amax(dim=1)  # [A]
        matches = torch.where((matches == BACKGROUND) & (ioa >= crowd_ioa_threshold), IGNORE, matches)
    return matches


def intersection_over_area(boxes: Tensor, regions: Tensor) -> Tensor:
    """Fraction of each box's area inside each region: Tensor[len(boxes), len(regions)]."""
    top_left = torch.max(boxes[:, None, :2], regions[None, :, :2])
    bottom_right = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=-1)
    return inter / area.clamp(min=torch.finfo(boxes.dtype).eps)[:, None]
