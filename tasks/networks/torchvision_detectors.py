"""torchvision's SSDLite pieces behind this project's detection-network contract (issue 14's ablation).

Trained through :class:`tasks.detection.SSDLiteDetection` on the same data as ours, they split the
accuracy gap between ours and torchvision's ``ssdlite320_mobilenet_v3_large`` into its parts:

* :class:`MobileNetV3LargeFeatures`: the MobileNetV3-Large feature extractor of that model (from
  scratch: reduced tail, BatchNorm eps 1e-3 / momentum 0.03, normal(0.03) init), as a
  :class:`~backbones.Backbone` with ``c4_expand`` and ``final_conv`` maps.
* :class:`SSDLiteMobileNetV3`: our SSDLite head (extras, default boxes, matching, loss,
  post-processing) on those features: how much of the gap is the backbone.
* :class:`TorchvisionSSDLite`: torchvision's whole SSDLite pipeline (extras, head, default boxes,
  matcher, loss, post-processing) on its MobileNetV3 or on our MobileNetV2: how much is the head
  and the loss.

torchvision's private helpers used here (``ssdlite._extra_block``, ``ssdlite._normal_init``) are
those of torchvision 0.29.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead as TorchvisionSSDLiteHead
from torchvision.models.detection.ssdlite import _extra_block, _normal_init
from torchvision.models.detection.transform import resize_boxes
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops import box_iou

from backbones import Backbone, FeatureSpec, MobileNetV2
from heads.ssdlite import SSDLiteHead
from tasks.buildable import Buildable
from tasks.networks.detector import (
    COCO_NUM_CLASSES_CATEGORY_IDS,
    MIN_DEPTH,
    SSDLITE_EXTRA_DEPTHS,
    SSDLite,
    apply_backbone_init,
)
from tasks.networks.normalize import Normalize

# torchvision's SSDLite-MobileNetV3 normalisation: [0, 1] pixels to [-1, 1] (its image_mean / image_std).
TORCHVISION_SSDLITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TORCHVISION_SSDLITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
# BatchNorm of torchvision's SSDLite (backbone, extras and head): TF's eps and momentum.
TORCHVISION_SSDLITE_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


def _stride(module: nn.Module) -> int:
    """Input pixels per output pixel of a chain of convolutions (the product of their strides)."""
    return math.prod(layer.stride[0] for layer in module.modules() if isinstance(layer, nn.Conv2d))


class MobileNetV3LargeFeatures(Backbone):
    """MobileNetV3-Large as ``ssdlite320_mobilenet_v3_large(weights_backbone=None)`` builds it.

    ``reduced_tail=True`` (MobileNetV3 paper, Table 6: the last stage at half width), torchvision's
    SSDLite BatchNorm and normal(0.03) conv init, split where torchvision's ``_mobilenet_extractor``
    splits it (MobileNetV3 section 6.3): ``features[0]`` runs up to the expansion layer of the last
    stride-2 block ("C4"), ``features[1]`` from its depthwise conv to the last 1x1 conv. The state
    dict keys are those of ``ssd.backbone.features`` (``features.0.*``, ``features.1.*``).

    Outputs: ``c4_expand`` (672 channels, stride 16) and ``final_conv`` (480 channels, stride 32).
    """

    def __init__(self) -> None:
        super().__init__()
        network = mobilenet_v3_large(weights=None, norm_layer=TORCHVISION_SSDLITE_NORM, reduced_tail=True)
        _normal_init(network)  # torchvision's init when no backbone weights are given
        layers = network.features
        c4 = max(i for i, layer in enumerate(layers) if isinstance(layer, InvertedResidual) and _stride(layer) > 1)
        expansion = layers[c4].block[0]
        self.features = nn.Sequential(
            nn.Sequential(*layers[:c4], expansion),
            nn.Sequential(layers[c4].block[1:], *layers[c4 + 1 :]),
        )
        stride = _stride(self.features[0])
        self._output_shape = {
            "c4_expand": FeatureSpec(expansion.out_channels, stride),
            "final_conv": FeatureSpec(layers[-1].out_channels, stride * _stride(self.features[1])),
        }

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` normalised -> ``{"c4_expand", "final_conv"}``."""
        c4_expand = self.features[0](images)
        return {"c4_expand": c4_expand, "final_conv": self.features[1](c4_expand)}


class SSDLiteMobileNetV3(Buildable, SSDLite):
    """Our SSDLite head on torchvision's MobileNetV3-Large features, normalised as torchvision does.

    Args:
        num_classes: logits per anchor, background included (see :class:`~tasks.networks.SSDLiteMobileNetV2`).
        image_size: the input side the network is meant for.
        extra_depths: output depths of the extra layers.
        min_depth: the smallest extra-layer depth.
        head_options: keyword arguments of :class:`~heads.ssdlite.SSDLiteHead`.

    At 320x320 the head has 2034 anchors, as on MobileNetV2 (same strides).
    """

    def __init__(
        self,
        *,
        num_classes: int = COCO_NUM_CLASSES_CATEGORY_IDS,
        image_size: int = 320,
        extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS,
        min_depth: int = MIN_DEPTH,
        **head_options: Any,
    ) -> None:
        backbone = MobileNetV3LargeFeatures()
        depths = [max(int(depth), min_depth) for depth in extra_depths]
        head = SSDLiteHead(backbone.output_shape(), num_classes=num_classes, extra_depths=depths, **head_options)
        super().__init__(backbone, head, image_size)
        self.normalize = Normalize(TORCHVISION_SSDLITE_MEAN, TORCHVISION_SSDLITE_STD)


class MobileNetV2TorchvisionExtras(nn.Module):
    """Our MobileNetV2 (``c4_expand``, ``final_conv``) plus torchvision's SSDLite extra layers.

    What ``SSDLiteFeatureExtractorMobileNet`` is to torchvision's MobileNetV3: the extras are its
    ``_extra_block`` (1x1 to half depth, 3x3 depthwise stride 2, 1x1; BatchNorm eps 1e-3 / momentum
    0.03 + ReLU6) with its normal(0.03) init; the backbone keeps its own layers and init.
    ``forward`` returns the six maps in an OrderedDict, finest first; ``out_channels`` declares them.
    """

    def __init__(self, backbone: MobileNetV2, extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS) -> None:
        super().__init__()
        shapes = backbone.output_shape()
        self.features = backbone
        self.out_channels = [shapes["c4_expand"].channels, shapes["final_conv"].channels, *extra_depths]
        self.extra = nn.ModuleList(
            _extra_block(channels, depth, TORCHVISION_SSDLITE_NORM)
            for channels, depth in zip(self.out_channels[1:], extra_depths)
        )
        _normal_init(self.extra)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.features(images)
        outputs = OrderedDict(c4_expand=maps["c4_expand"], final_conv=maps["final_conv"])
        x = outputs["final_conv"]
        for index, block in enumerate(self.extra, start=1):
            x = block(x)
            outputs[f"extra{index}"] = x
        return outputs


class TorchvisionSSDLite(Buildable, nn.Module):
    """torchvision's SSDLite detection pipeline behind this project's network contract.

    ``backbone="mobilenet_v3_large"``: ``ssdlite320_mobilenet_v3_large(weights=None,
    weights_backbone=None, num_classes=...)`` itself (the ``SSD`` object is ``self.ssd``), fed
    pixels normalised as torchvision does (``x / 255``, mean 0.5, std 0.5). ``"mobilenet_v2"``:
    the same SSD parts (torchvision's extras, ``SSDLiteHead``, ``DefaultBoxGenerator([[2, 3]] * 6,
    0.2, 0.95)``, ``SSDMatcher``, box coder, loss, post-processing) on our
    :class:`~backbones.MobileNetV2`, with our ImageNet normalisation.

    The input arrives resized (torchvision's ``GeneralizedRCNNTransform`` resize is not run: only
    its normalisation). Crowd regions in the targets are ignored (torchvision has none), and every
    label ``1..num_classes-1`` is a class (torchvision cannot mask labels).

    Args:
        num_classes: logits per anchor, background included.
        image_size: the input side the network is meant for (torchvision's: 320).
        backbone: ``"mobilenet_v3_large"`` (torchvision's model) or ``"mobilenet_v2"`` (ours).
        backbone_init: for ``"mobilenet_v2"``: ``"kaiming"`` (its reference init) or ``"normal"``
            (N(0, 0.03), what torchvision does to a backbone trained from scratch, as
            :class:`~tasks.networks.SSDLiteMobileNetV2`'s option); MobileNetV3 always gets ``"normal"``.
        score_threshold, nms_threshold, topk_candidates, detections_per_image: torchvision's
            ``score_thresh``, ``nms_thresh``, ``topk_candidates`` (per class, before NMS) and
            ``detections_per_img``; the defaults are its SSDLite's.
    """

    def __init__(
        self,
        *,
        num_classes: int = COCO_NUM_CLASSES_CATEGORY_IDS,
        image_size: int = 320,
        backbone: Literal["mobilenet_v3_large", "mobilenet_v2"] = "mobilenet_v3_large",
        backbone_init: Literal["kaiming", "normal"] = "normal",
        score_threshold: float = 0.001,
        nms_threshold: float = 0.55,
        topk_candidates: int = 300,
        detections_per_image: int = 300,
    ) -> None:
        super().__init__()
        if backbone == "mobilenet_v3_large":
            ssd = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
            self.normalize = Normalize(TORCHVISION_SSDLITE_MEAN, TORCHVISION_SSDLITE_STD)
        elif backbone == "mobilenet_v2":
            ours = MobileNetV2(out_features=("c4_expand", "final_conv"))
            apply_backbone_init(ours, backbone_init)
            features = MobileNetV2TorchvisionExtras(ours)
            anchor_generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)
            head = TorchvisionSSDLiteHead(
                features.out_channels, anchor_generator.num_anchors_per_location(), num_classes, TORCHVISION_SSDLITE_NORM
            )
            ssd = SSD(features, anchor_generator, (image_size, image_size), num_classes, head=head)
            self.normalize = Normalize()
        else:
            raise ValueError(f"backbone must be 'mobilenet_v3_large' or 'mobilenet_v2', got {backbone!r}")
        ssd.score_thresh = score_threshold
        ssd.nms_thresh = nms_threshold
        ssd.topk_candidates = topk_candidates
        ssd.detections_per_img = detections_per_image
        self.ssd = ssd
        self.image_size = int(image_size)
        self._num_classes = int(num_classes)
        # A constant (torchvision scores every label), kept for the contract's readers.
        self.register_buffer("valid_labels", torch.ones(num_classes, dtype=torch.bool), persistent=False)

    @property
    def num_classes(self) -> int:
        """Logits per anchor, background included."""
        return self._num_classes

    def set_valid_labels(self, labels: Iterable[int]) -> None:
        """Accept only the full label set ``1..num_classes-1``: torchvision's SSD cannot mask labels."""
        given = {int(label) for label in labels}
        missing = sorted(set(range(1, self.num_classes)) - given)
        outside = sorted(label for label in given if not 1 <= label < self.num_classes)
        if missing or outside:
            raise ValueError(
                f"TorchvisionSSDLite scores every label 1..{self.num_classes - 1} and cannot mask any, but the data "
                f"{'has no category for labels ' + str(missing) if missing else 'uses labels ' + str(outside)}: "
                "number the classes 1..K (--data.contiguous_labels true) and set --model.network.num_classes K+1"
            )

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images``: ``[N, 3, H, W]`` RGB, uint8 or float in 0..255.

        Returns:
            ``cls_logits`` [N, A, C], ``bbox_regression`` [N, A, 4], ``anchors`` [A, 4] (absolute
            xyxy pixels of the input; the same for every image) and ``input_size`` (Int64Tensor[2],
            CPU: the input's ``(H, W)``, which torchvision's post-processing clips to).
        """
        x = self.normalize(images)
        features = list(self.ssd.backbone(x).values())
        outputs = self.ssd.head(features)
        # One image size in the list: one copy of the anchors, shared by the batch.
        (anchors,) = self.ssd.anchor_generator(ImageList(x, [tuple(x.shape[-2:])]), features)
        return {**outputs, "anchors": anchors, "input_size": torch.tensor(tuple(x.shape[-2:]))}

    def loss(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """torchvision's matching (``SSD.forward``) and ``SSD.compute_loss`` for targets in absolute
        xyxy pixels of the input: ``loss_cls`` (its "classification"), ``loss_box`` (its "bbox_regression").
        ``image_size`` is not needed: the anchors are in the input's pixels already."""
        anchors = outputs["anchors"]
        head_outputs = {key: outputs[key].float() for key in ("cls_logits", "bbox_regression")}
        boxes = [target["boxes"].to(anchors) for target in targets]
        matched = [
            self.ssd.proposal_matcher(box_iou(gt, anchors))
            if gt.numel() > 0
            else torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
            for gt in boxes
        ]
        tv_targets = [{"boxes": gt, "labels": target["labels"].to(anchors.device)} for gt, target in zip(boxes, targets)]
        losses = self.ssd.compute_loss(tv_targets, head_outputs, [anchors] * len(boxes), matched)
        return {"loss_cls": losses["classification"], "loss_box": losses["bbox_regression"]}

    @torch.no_grad()
    def postprocess(
        self, outputs: Mapping[str, Tensor], image_sizes: Tensor | Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """``SSD.postprocess_detections`` at the input's size, then boxes rescaled to each
        ``image_sizes[i]`` = ``(H, W)`` (torchvision's ``transform.postprocess``)."""
        input_size = tuple(int(v) for v in outputs["input_size"].tolist())
        sizes = [tuple(size) for size in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        head_outputs = {key: outputs[key].float() for key in ("cls_logits", "bbox_regression")}
        anchors = [outputs["anchors"]] * len(sizes)
        detections = self.ssd.postprocess_detections(head_outputs, anchors, [input_size] * len(sizes))
        for detection, size in zip(detections, sizes):
            detection["boxes"] = resize_boxes(detection["boxes"], list(input_size), list(size))
        return detections

    @torch.no_grad()
    def detect(
        self, images: Tensor, image_sizes: Tensor | Sequence[tuple[int, int]] | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image in ``image_sizes`` pixel coordinates (default: the input's size)."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.postprocess(self(images), image_sizes)
