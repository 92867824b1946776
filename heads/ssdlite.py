"""SSDLite (MobileNetV2 paper, Sandler et al. 2018, section 6.2): SSD with separable convolutions.

Section 6.2: "we replace all the regular convolutions with separable convolutions (depthwise
followed by 1x1 projection) in SSD prediction layers", and "the first layer of SSDLite is
attached to the expansion of layer 15 (with output stride of 16). The second and the rest of
SSDLite layers are attached on top of the last layer (with output stride of 32)."

:class:`SSDLiteHead` takes the backbone's named maps (by default ``c4_expand`` and
``final_conv``), adds the extra layers of the TF Object Detection API's SSD MobileNetV2 feature
extractor (depths 512, 256, 256, 128; each a 1x1 conv to half depth, a 3x3 depthwise conv of
stride 2 and a 1x1 conv, with BatchNorm + ReLU6; BatchNorm eps 1e-3 and momentum 0.03 as
torchvision's SSDLite), and predicts class logits and box deltas on the
six maps (19x19, 10x10, 5x5, 3x3, 2x2, 1x1 at 300x300) with separable predictors.

Head contract: ``forward(features) -> {"cls_logits", "bbox_regression", "anchors"}`` (tensors
only), ``loss(outputs, targets, image_size) -> {"loss_cls", "loss_box"}``, ``postprocess(outputs,
image_sizes) -> [{"boxes", "scores", "labels"}]``. Targets and detections are absolute xyxy
pixels (one frame); inside, box geometry works in normalised coordinates (see :mod:`heads.anchors`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from backbones.base import FeatureSpec
from backbones.layers import ConvBNAct
from heads.detection_postprocess import batched_detections
from heads.anchors import (
    BOX_CODER_WEIGHTS,
    IGNORE,
    DefaultBoxGenerator,
    decode_boxes,
    encode_boxes,
    match_anchors,
    DefaultBoxes,
)

LossType = Literal["hard_negative_mining", "focal"]
LossNormalization = Literal["batch", "image"]
# BatchNorm of the extra layers and predictors: torchvision's SSDLite (eps 1e-3, momentum 0.03;
# the TF configs use eps 1e-3 and decay 0.9997). The backbone keeps PyTorch's defaults.
HEAD_BN_EPS = 1e-3
HEAD_BN_MOMENTUM = 0.03
# TF's SSD configs initialise sigmoid class biases to -4.6 = -log((1 - 0.01) / 0.01): every
# anchor starts as background with probability 0.99, so focal loss does not explode (RetinaNet 3.3).
FOCAL_PRIOR_PROBABILITY = 0.01


class ExtraBlock(nn.Sequential):
    """One SSDLite extra layer: 1x1 conv to ``depth // 2``, 3x3 depthwise stride 2, 1x1 conv to ``depth``.

    Each conv is followed by BatchNorm and ReLU6 (TF's ``multi_resolution_feature_maps`` with
    ``use_depthwise``). The map shrinks to ``ceil(H / 2)``.
    """

    def __init__(
        self, in_channels: int, depth: int, *, bn_eps: float = HEAD_BN_EPS, bn_momentum: float = HEAD_BN_MOMENTUM
    ) -> None:
        mid = depth // 2
        bn = {"bn_eps": bn_eps, "bn_momentum": bn_momentum}
        super().__init__(
            ConvBNAct(in_channels, mid, 1, **bn),
            ConvBNAct(mid, mid, 3, stride=2, groups=mid, **bn),
            ConvBNAct(mid, depth, 1, **bn),
        )


class SeparablePredictor(nn.Sequential):
    """SSDLite's predictor: 3x3 depthwise conv + BatchNorm + ReLU6, then a 1x1 conv (with bias)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bn_eps: float = HEAD_BN_EPS,
        bn_momentum: float = HEAD_BN_MOMENTUM,
    ) -> None:
        super().__init__(
            ConvBNAct(in_channels, in_channels, 3, groups=in_channels, bn_eps=bn_eps, bn_momentum=bn_momentum),
            nn.Conv2d(in_channels, out_channels, 1),
        )


class SSDLiteHead(nn.Module):
    """SSDLite extra layers, class/box predictors, anchors, loss and post-processing.

    Valid labels: ``valid_labels`` (BoolTensor[num_classes], a persistent buffer, so checkpoints
    and exports keep it) says which logits are classes; all by default. With COCO category ids as
    labels (91 logits) the 10 ids COCO never uses (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are
    slots without a category: :meth:`set_valid_labels` masks them out of the loss (softmax over
    the valid classes only; the focal loss ignores them) and gives them score 0 in
    post-processing, so the detector never emits a label that has no category.

    Args:
        input_shape: the backbone's ``output_shape()``.
        num_classes: number of class logits per anchor, background included (index 0): 91 for
            COCO category ids used as labels (1..90, unused ids masked with
            :meth:`set_valid_labels`), 81 for 80 contiguous COCO classes.
        in_features: backbone maps the first SSDLite layers attach to, finest first; the extra
            layers grow from the last one.
        extra_depths: output channels of the extra layers (TF: 512, 256, 256, 128).
        default_boxes: scales and aspect ratios of the default boxes (TF's SSD defaults).
        box_coder_weights: ``(wx, wy, ww, wh)`` of the box coder.
        iou_threshold: IoU at which an anchor becomes positive for a ground-truth box.
        force_match: every ground-truth box also takes the anchor it overlaps most, whatever the
            IoU (TF's ``force_match_for_each_row``, torchvision's ``SSDMatcher``).
        loss_type: ``"hard_negative_mining"`` (softmax cross-entropy over the positives and the
            hardest ``neg_pos_ratio`` negatives per positive, SSD section 2.2) or ``"focal"``
            (sigmoid focal loss over all anchors, RetinaNet).
        neg_pos_ratio: negatives kept per positive by hard negative mining (3 in SSD).
        min_negatives_per_image: negatives kept even in an image without objects (TF: 3), so
            empty images still teach the background (torchvision: 0).
        loss_normalization: ``"batch"`` divides both losses by the positives of the whole batch
            (SSD, TF's ``normalize_loss_by_num_matches``, torchvision); ``"image"`` divides each
            image's losses by its own positives and averages over the images.
        focal_alpha, focal_gamma: focal loss parameters.
        score_threshold: detections must score above it (>= 0, so masked labels, scored 0,
            never pass).
        nms_threshold: IoU of per-class non-maximum suppression.
        topk_candidates: best-scoring (anchor, class) pairs of an image kept before NMS, over all
            classes (mmdet's ``nms_pre``): NMS work stays bounded however many boxes pass the threshold.
        detections_per_image: maximum detections returned per image.
    """

    def __init__(
        self,
        input_shape: Mapping[str, FeatureSpec],
        *,
        num_classes: int,
        in_features: Sequence[str] = ("c4_expand", "final_conv"),
        extra_depths: Sequence[int] = (512, 256, 256, 128),
        default_boxes: DefaultBoxes = DefaultBoxes(),
        box_coder_weights: Sequence[float] = BOX_CODER_WEIGHTS,
        iou_threshold: float = 0.5,
        force_match: bool = True,
        loss_type: LossType = "hard_negative_mining",
        neg_pos_ratio: float = 3.0,
        min_negatives_per_image: int = 3,
        loss_normalization: LossNormalization = "batch",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_threshold: float = 0.001,
        nms_threshold: float = 0.55,
        topk_candidates: int = 1000,
        detections_per_image: int = 100,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        missing = [name for name in in_features if name not in input_shape]
        if missing or not in_features:
            raise ValueError(
                f"in_features {list(in_features)} must be non-empty names among the backbone's "
                f"outputs {list(input_shape)}"
            )
        if loss_type not in ("hard_negative_mining", "focal"):
            raise ValueError(f"loss_type must be 'hard_negative_mining' or 'focal', got {loss_type!r}")
        if loss_normalization not in ("batch", "image"):
            raise ValueError(f"loss_normalization must be 'batch' or 'image', got {loss_normalization!r}")
        if len(box_coder_weights) != 4:
            raise ValueError(f"box_coder_weights needs 4 values, got {list(box_coder_weights)}")
        if score_threshold < 0:
            raise ValueError(f"score_threshold must be >= 0, got {score_threshold}")
        self.num_classes = num_classes
        self.in_features = tuple(in_features)
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.iou_threshold = iou_threshold
        self.force_match = force_match
        self.loss_normalization = loss_normalization
        self.loss_type = loss_type
        self.neg_pos_ratio = neg_pos_ratio
        self.min_negatives_per_image = min_negatives_per_image
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.topk_candidates = topk_candidates
        self.detections_per_image = detections_per_image
        # Which logits are classes (index 0, the background, always is); see set_valid_labels.
        self.register_buffer("valid_labels", torch.ones(num_classes, dtype=torch.bool))

        # Declared shapes of the maps the predictors see (taps, then the extra layers).
        shapes = {name: input_shape[name] for name in self.in_features}
        channels, stride = shapes[self.in_features[-1]].channels, shapes[self.in_features[-1]].stride
        extras = []
        for index, depth in enumerate(extra_depths, start=1):
            extras.append(ExtraBlock(channels, depth))
            channels, stride = depth, stride * 2
            shapes[f"extra{index}"] = FeatureSpec(channels, stride)
        self.extra = nn.ModuleList(extras)
        self._feature_shape = shapes

        self.anchor_generator = DefaultBoxGenerator(default_boxes.specs(len(shapes)))
        boxes_per_cell = self.anchor_generator.num_anchors_per_location()
        specs = list(shapes.values())
        self.cls_predictors = nn.ModuleList(
            SeparablePredictor(spec.channels, n * num_classes) for spec, n in zip(specs, boxes_per_cell)
        )
        self.box_predictors = nn.ModuleList(
            SeparablePredictor(spec.channels, n * 4) for spec, n in zip(specs, boxes_per_cell)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # TF's SSDLite configs: truncated normal (std 0.03) convs, as torchvision's SSDLite.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.03)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.loss_type == "focal":
            prior = -math.log((1 - FOCAL_PRIOR_PROBABILITY) / FOCAL_PRIOR_PROBABILITY)
            for predictor in self.cls_predictors:
                nn.init.constant_(predictor[-1].bias, prior)

    def set_valid_labels(self, labels: Iterable[int]) -> None:
        """Make ``labels`` (foreground, in ``1..num_classes-1``) the only classes; the background stays.

        Every other logit is left out of the loss and scores 0 in post-processing: what a head
        with category ids as labels needs for the ids its dataset does not use.
        """
        labels = sorted({int(label) for label in labels})
        outside = [label for label in labels if not 1 <= label < self.num_classes]
        if outside or not labels:
            raise ValueError(
                f"valid labels must be a non-empty set in 1..{self.num_classes - 1} (num_classes="
                f"{self.num_classes}, background 0 excluded), got {outside or labels}"
            )
        valid = torch.zeros_like(self.valid_labels)
        valid[0] = True
        valid[labels] = True
        self.valid_labels.copy_(valid)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before valid_labels existed have no such entry: keep the current
        # mask (all labels valid on a new head; what setup() set from the data otherwise).
        state_dict.setdefault(prefix + "valid_labels", self.valid_labels.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def feature_shape(self) -> dict[str, FeatureSpec]:
        """Channels and stride of the maps the predictors see: taps then ``extra1``.. (declared).

        A map of stride ``s`` is ``ceil(H / s)`` high: 19, 10, 5, 3, 2, 1 at 300x300.
        """
        return dict(self._feature_shape)

    def num_anchors(self, image_size: tuple[int, int]) -> int:
        """Anchors for an ``(H, W)`` input, from the declared strides (1917 at 300, 2034 at 320)."""
        sizes = [
            (math.ceil(image_size[0] / spec.stride), math.ceil(image_size[1] / spec.stride))
            for spec in self._feature_shape.values()
        ]
        return self.anchor_generator.num_anchors(sizes)

    # ------------------------------------------------------------------ forward
    def feature_maps(self, features: Mapping[str, Tensor]) -> list[Tensor]:
        """The maps the predictors see: the backbone taps, then each extra layer's output."""
        maps = [features[name] for name in self.in_features]
        x = maps[-1]
        for block in self.extra:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Predict class logits and box deltas for every default box.

        Args:
            features: the backbone's maps; ``in_features`` are used.

        Returns:
            ``cls_logits``: Tensor[N, A, num_classes] (column 0 is the background);
            ``bbox_regression``: Tensor[N, A, 4] deltas ``(dx, dy, dw, dh)`` to the anchors;
            ``anchors``: Tensor[A, 4] normalised xyxy default boxes (fractions of the input's
            width and height), ordered layer, row, column, box like the predictions.
        """
        maps = self.feature_maps(features)
        cls_logits = torch.cat(
            [_flatten_predictions(p(x), self.num_classes) for p, x in zip(self.cls_predictors, maps)], dim=1
        )
        bbox_regression = torch.cat(
            [_flatten_predictions(p(x), 4) for p, x in zip(self.box_predictors, maps)], dim=1
        )
        anchors = self.anchor_generator(
            [tuple(x.shape[-2:]) for x in maps], device=bbox_regression.device, dtype=bbox_regression.dtype
        )
        return {"cls_logits": cls_logits, "bbox_regression": bbox_regression, "anchors": anchors}

    # ------------------------------------------------------------------ loss
    def match(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-anchor training targets of a batch whose boxes are normalised xyxy (the anchors'
        frame: see :func:`normalised_targets`).

        Returns:
            ``labels`` Int64Tensor[N, A] (0 = background), ``boxes`` Tensor[N, A, 4] (the matched
            ground truth, normalised xyxy; zeros where unmatched) and ``ignore`` BoolTensor[N, A]
            (anchors inside crowd regions, neither positive nor negative).
        """
        anchors = outputs["anchors"].float()
        labels, boxes, ignore = [], [], []
        for target in targets:  # one matching per image; everything inside is vectorised
            gt_boxes = target["boxes"].to(anchors)
            matches = match_anchors(
                gt_boxes,
                anchors,
                iou_threshold=self.iou_threshold,
                force_match=self.force_match,
                crowd_boxes=target["crowd_boxes"].to(anchors) if "crowd_boxes" in target else None,
            )
            matched = matches >= 0
            if gt_boxes.shape[0] > 0:
                index = matches.clamp(min=0)
                labels.append(torch.where(matched, target["labels"].to(matches.device)[index], 0))
                boxes.append(gt_boxes[index] * matched[:, None])
            else:
                labels.append(torch.zeros_like(matches))
                boxes.append(torch.zeros_like(anchors))
            ignore.append(matches == IGNORE)
        return torch.stack(labels), torch.stack(boxes), torch.stack(ignore)

    def loss(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        image_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        """Classification and localisation losses, each normalised by the number of positives
        (of the batch, or of each image: ``loss_normalization``).

        Targets are in the frame :meth:`postprocess` answers in: absolute pixels.

        Args:
            outputs: :meth:`forward`'s dict.
            targets: one dict per image: ``boxes`` (FloatTensor[G, 4], absolute xyxy in the
                network input), ``labels`` (Int64Tensor[G] in ``1..num_classes-1``) and
                optionally ``crowd_boxes`` (FloatTensor[C, 4], absolute xyxy). G may be 0: the
                image then contributes only negatives.
            image_size: ``(height, width)`` of the network input the boxes are in.

        Returns:
            ``loss_cls`` (hard-negative-mined cross-entropy or focal loss) and ``loss_box``
            (smooth L1 on the encoded deltas of positive anchors). Logits of labels that are
            not valid (:meth:`set_valid_labels`) take no part: target labels must be valid.
        """
        cls_logits = outputs["cls_logits"].float()
        deltas = outputs["bbox_regression"].float()
        anchors = outputs["anchors"].float()
        labels, gt_boxes, ignore = self.match(outputs, normalised_targets(targets, image_size))
        positive = labels > 0

        # Every anchor is encoded and the unmatched ones masked out, rather than selecting the
        # positives by boolean indexing: the same sum without a host-device sync on a GPU.
        box_targets = encode_boxes(gt_boxes, anchors.expand_as(gt_boxes), self.box_coder_weights)
        per_anchor_box = F.smooth_l1_loss(deltas, box_targets, beta=1.0, reduction="none").sum(dim=-1)
        loss_box = self._normalised_sum(per_anchor_box.masked_fill(~positive, 0.0), positive)

        if self.loss_type == "focal":
            one_hot = F.one_hot(labels, self.num_classes)[..., 1:].to(cls_logits.dtype)
            per_class = sigmoid_focal_loss(
                cls_logits[..., 1:], one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
            )
            per_anchor = per_class.masked_fill(~self.valid_labels[1:], 0.0).sum(dim=-1)
            loss_cls = self._normalised_sum(per_anchor.masked_fill(ignore, 0.0), positive)
        else:
            # Softmax over the valid classes only: the others' logits become -inf (probability 0).
            cls_logits = cls_logits.masked_fill(~self.valid_labels, -math.inf)
            loss_cls = self._normalised_sum(self._hard_negative_mining_loss(cls_logits, labels, positive, ignore), positive)
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def _normalised_sum(self, per_anchor: Tensor, positive: Tensor) -> Tensor:
        """Sum of ``per_anchor`` [N, A] over the positives of the batch, or the mean over images
        of each image's sum over its own positives (``loss_normalization``); at least 1 positive."""
        if self.loss_normalization == "batch":
            return per_anchor.sum() / positive.sum().clamp(min=1).to(per_anchor.dtype)
        return (per_anchor.sum(dim=1) / positive.sum(dim=1).clamp(min=1).to(per_anchor.dtype)).mean()

    def _hard_negative_mining_loss(
        self, cls_logits: Tensor, labels: Tensor, positive: Tensor, ignore: Tensor
    ) -> Tensor:
        """Per-anchor cross-entropy of positives and of the hardest negatives of each image (SSD 2.2),
        zero elsewhere: Tensor[N, A]."""
        batch, num_anchors, num_classes = cls_logits.shape
        cross_entropy = F.cross_entropy(
            cls_logits.reshape(-1, num_classes), labels.reshape(-1), reduction="none"
        ).view(batch, num_anchors)
        candidates = ~positive & ~ignore
        num_negative = (self.neg_pos_ratio * positive.sum(dim=1)).long()
        num_negative = num_negative.clamp(min=self.min_negatives_per_image)
        num_negative = torch.minimum(num_negative, candidates.sum(dim=1))
        # Rank every candidate negative of an image by its loss; keep the top num_negative.
        negative_loss = cross_entropy.detach().masked_fill(~candidates, -math.inf)
        order = negative_loss.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        negative = rank < num_negative[:, None]
        return cross_entropy.masked_fill(~(positive | negative), 0.0)

    # ------------------------------------------------------------------ inference
    def scores(self, cls_logits: Tensor) -> Tensor:
        """Per-class probabilities without the background: Tensor[N, A, num_classes - 1].

        Labels that are not valid score exactly 0 (softmax over the valid classes only).
        """
        if self.loss_type == "focal":
            return cls_logits[..., 1:].sigmoid().masked_fill(~self.valid_labels[1:], 0.0)
        return cls_logits.masked_fill(~self.valid_labels, -math.inf).softmax(dim=-1)[..., 1:]

    @torch.no_grad()
    def postprocess(
        self, outputs: Mapping[str, Tensor], image_sizes: Tensor | Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Detections per image: top-k candidates, score threshold, per-class NMS, at most N boxes.

        Args:
            outputs: :meth:`forward`'s dict.
            image_sizes: ``(height, width)`` of the image each set of boxes is wanted in: the
                network input, or the original image it was resized from (the normalised
                boxes map onto both).

        Returns:
            One dict per image: ``boxes`` (FloatTensor[D, 4], absolute xyxy in that image),
            ``scores`` (FloatTensor[D], descending) and ``labels`` (Int64Tensor[D], valid labels
            in ``1..num_classes-1``), D <= ``detections_per_image``.
        """
        device = outputs["cls_logits"].device
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device).reshape(-1, 2)
        det_boxes, det_scores, det_labels, det_images = self.detections(outputs, sizes)
        counts = torch.bincount(det_images, minlength=len(sizes)).tolist()
        return [
            {"boxes": b, "scores": s, "labels": l}
            for b, s, l in zip(det_boxes.split(counts), det_scores.split(counts), det_labels.split(counts))
        ]

    def detections(self, outputs: Mapping[str, Tensor], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`postprocess` for the whole batch as flat tensors, loop-free (what exports run).

        Args:
            outputs: :meth:`forward`'s dict.
            image_sizes: Tensor[N, 2] ``(height, width)`` each image's boxes are wanted in.

        Returns:
            ``boxes`` [D, 4] absolute xyxy, ``scores`` [D], ``labels`` [D] and ``batch_index`` [D],
            as :func:`heads.detection_postprocess.batched_detections`.
        """
        scores = self.scores(outputs["cls_logits"].float())
        boxes = decode_boxes(
            outputs["bbox_regression"].float(), outputs["anchors"].float(), self.box_coder_weights
        ).clamp(0.0, 1.0)
        boxes = boxes * image_sizes.to(boxes)[:, [1, 0, 1, 0]].unsqueeze(1)  # normalised -> pixels
        return batched_detections(
            scores,
            boxes,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            topk_candidates=self.topk_candidates,
            detections_per_image=self.detections_per_image,
        )


def normalised_targets(
    targets: Sequence[Mapping[str, Tensor]], image_size: tuple[int, int]
) -> list[dict[str, Tensor]]:
    """Targets with absolute xyxy boxes (and crowd regions) as fractions of ``(height, width)``:
    the frame of the anchors (see :mod:`heads.anchors`)."""
    height, width = (float(v) for v in image_size)
    normalised = []
    for target in targets:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=target["boxes"].device)
        item = {"boxes": target["boxes"] / scale, "labels": target["labels"]}
        if "crowd_boxes" in target:
            item["crowd_boxes"] = target["crowd_boxes"] / scale
        normalised.append(item)
    return normalised


def _flatten_predictions(x: Tensor, values_per_box: int) -> Tensor:
    """``[N, B * V, H, W]`` -> ``[N, H * W * B, V]``, ordered (row, column, box) like the anchors."""
    batch, _, height, width = x.shape
    x = x.view(batch, -1, values_per_box, height, width)
    return x.permute(0, 3, 4, 1, 2).reshape(batch, -1, values_per_box)
