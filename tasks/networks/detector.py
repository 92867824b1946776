"""SSDLite detectors (MobileNetV2 paper, section 6.2, Table 6) as plain ``nn.Module``s.

* :class:`SSDLite`: normalisation + backbone + :class:`~heads.ssdlite.SSDLiteHead`. It takes RGB
  pixels (uint8 or float, 0..255), returns the head's raw tensors, and owns the loss and the
  post-processing, both in absolute pixels.
* :class:`SSDLiteMobileNetV2`: the paper's "MNet V2 + SSDLite" (4.3M parameters, 0.8B
  multiply-adds at 300x300 with 91 classes) and its width-multiplier variants, built from plain
  arguments (what a config's ``model.init_args.network`` holds).

No Lightning here: export, benchmark and a user's own loop import this module alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from backbones import Backbone, MobileNetV2
from heads.ssdlite import SSDLiteHead
from tasks.buildable import Buildable
from tasks.networks.normalize import Normalize

# TF's SSD feature extractors: extra-layer depths scale with the width multiplier but never
# drop below 16 channels (``min_depth``).
SSDLITE_EXTRA_DEPTHS: tuple[int, ...] = (512, 256, 256, 128)
MIN_DEPTH = 16
# Label spaces for COCO: category ids used directly (1..90, TF's 90 classes + background) or the
# 80 categories numbered contiguously, each plus the background logit.
COCO_NUM_CLASSES_CATEGORY_IDS = 91
COCO_NUM_CLASSES_CONTIGUOUS = 81


class SSDLite(nn.Module):
    """Normalisation, a backbone and an SSDLite head.

    Args:
        backbone: returns at least the maps the head's ``in_features`` name.
        head: built from ``backbone.output_shape()``.
        image_size: the square input side the network is meant for (300 in the paper, 320 in
            torchvision): what inference resizes to. The network is fully convolutional and its
            anchors are normalised, so it runs at any size.
    """

    def __init__(self, backbone: Backbone, head: SSDLiteHead, image_size: int) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone
        self.head = head
        self.image_size = int(image_size)

    @property
    def num_classes(self) -> int:
        """Logits per anchor, background included."""
        return self.head.num_classes

    @property
    def valid_labels(self) -> Tensor:
        """BoolTensor[num_classes]: which logits are classes (see :meth:`set_valid_labels`)."""
        return self.head.valid_labels

    def set_valid_labels(self, labels: Iterable[int]) -> None:
        """Keep only ``labels`` (and the background) as classes: the head's :meth:`~heads.ssdlite.SSDLiteHead.set_valid_labels`."""
        self.head.set_valid_labels(labels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images``: ``[N, 3, H, W]`` RGB, uint8 or float in 0..255. Returns ``cls_logits``
        [N, A, C], ``bbox_regression`` [N, A, 4] and ``anchors`` [A, 4] (normalised xyxy)."""
        return self.head(self.backbone(self.normalize(images)))

    def loss(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], image_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """``loss_cls`` and ``loss_box`` for targets in absolute xyxy pixels of the ``(H, W)`` input."""
        return self.head.loss(outputs, targets, image_size)

    def postprocess(
        self, outputs: Mapping[str, Tensor], image_sizes: Tensor | Sequence[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image ``boxes`` (absolute xyxy in its ``image_sizes`` frame), ``scores``, ``labels``."""
        return self.head.postprocess(outputs, image_sizes)

    @torch.no_grad()
    def detect(
        self, images: Tensor, image_sizes: Tensor | Sequence[tuple[int, int]] | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image in ``image_sizes`` pixel coordinates (default: the input's size)."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.postprocess(self(images), image_sizes)


def apply_backbone_init(backbone: nn.Module, init: Literal["kaiming", "normal"]) -> None:
    """Keep ``backbone``'s own (Kaiming) init, or draw every conv weight from N(0, 0.03) for
    ``"normal"``: torchvision's SSDLite init for a backbone trained from scratch, which learned
    0.05 AP faster on the synthetic set (README, "Learning speed against torchvision's SSDLite")."""
    if init not in ("kaiming", "normal"):
        raise ValueError(f"backbone_init must be 'kaiming' or 'normal', got {init!r}")
    if init == "normal":
        for module in backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.03)


class SSDLiteMobileNetV2(Buildable, SSDLite):
    """MobileNetV2 + SSDLite (section 6.2): taps ``c4_expand`` (layer 15's expansion, stride 16)
    and ``final_conv`` (the 1280-channel conv, stride 32), then four extra layers.

    Args:
        num_classes: logits per anchor, background included: 91 (COCO category ids as labels,
            the paper's TF model), 81 (80 contiguous COCO classes), K + 1 in general.
        image_size: the input side the network is meant for (300: the paper; 320: torchvision).
        width_mult: the backbone's width multiplier; the extra layers scale with it
            (``max(int(depth * width_mult), min_depth)``, as the TF feature extractor).
        frozen_stages: backbone rows kept frozen (see :class:`~backbones.MobileNetV2`).
        extra_depths: output depths of the extra layers at width 1.0.
        min_depth: the smallest extra-layer depth.
        backbone_init: ``"kaiming"`` (the reference MobileNetV2 init) or ``"normal"``: every
            backbone conv drawn from N(0, 0.03), what torchvision's SSDLite does to a backbone
            trained from scratch. Pretrained weights replace either when training starts.
        head_options: default boxes, matching, loss and post-processing: the keyword
            arguments of :class:`~heads.ssdlite.SSDLiteHead` (its defaults are TF's).

    At 300x300 the head has 1917 anchors, at 320x320 2034.
    """

    def __init__(
        self,
        *,
        num_classes: int = COCO_NUM_CLASSES_CATEGORY_IDS,
        image_size: int = 320,
        width_mult: float = 1.0,
        frozen_stages: int = 0,
        extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS,
        min_depth: int = MIN_DEPTH,
        backbone_init: Literal["kaiming", "normal"] = "kaiming",
        **head_options: Any,
    ) -> None:
        backbone = MobileNetV2(
            width_mult=width_mult, out_features=("c4_expand", "final_conv"), frozen_stages=frozen_stages
        )
        apply_backbone_init(backbone, backbone_init)
        depths = [max(int(depth * width_mult), min_depth) for depth in extra_depths]
        head = SSDLiteHead(backbone.output_shape(), num_classes=num_classes, extra_depths=depths, **head_options)
        super().__init__(backbone, head, image_size)
