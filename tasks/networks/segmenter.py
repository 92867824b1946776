"""Mobile DeepLabv3 segmenters (MobileNetV2 paper, section 6.3, Table 7) as plain ``nn.Module``s.

* :class:`Segmenter`: normalisation + backbone + dense head; logits come back at the input
  resolution. RGB pixels in (uint8 or float, 0..255), ``{"logits": [N, K, H, W]}`` out.
* :class:`DeepLabV3MobileNetV2`: the paper's model (MobileNetV2 at output stride 16 without the
  1280 conv, "MNet V2*", plus ASPP-lite) or its variants, built from plain arguments.
* :func:`segment_probs`: multi-scale / flipped evaluation (Table 7's "MF").

No Lightning here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import Backbone, MobileNetV2
from heads.deeplabv3 import DeepLabV3Head, upsample_logits
from tasks.buildable import Buildable
from tasks.networks.normalize import Normalize


class Segmenter(nn.Module):
    """Normalisation, a backbone and a dense head; logits come back at the input resolution.

    Args:
        backbone: returns the named maps the head reads.
        head: built from ``backbone.output_shape()``; its ``forward`` returns ``logits``
            (and, in training, maybe ``aux_logits``) at its feature stride.
    """

    def __init__(self, backbone: Backbone, head: DeepLabV3Head) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone
        self.head = head

    @property
    def num_classes(self) -> int:
        """K, background included."""
        return self.head.num_classes

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` RGB 0..255 -> ``{"logits": Tensor[N, K, H, W]}`` (+ ``aux_logits``, coarse)."""
        outputs = self.head(self.backbone(self.normalize(images)))
        outputs["logits"] = upsample_logits(outputs["logits"], images.shape[-2:])
        return outputs

    def loss(self, outputs: Mapping[str, Tensor], masks: Tensor) -> dict[str, Tensor]:
        """Cross-entropy (``loss_ce``, plus ``loss_aux``) against ``masks[N, H, W]`` (255 ignored)."""
        return self.head.loss(outputs, masks)

    def postprocess(self, outputs: Mapping[str, Tensor], image_sizes: Tensor | Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per-image label maps ``int64[H, W]`` cropped to ``image_sizes``."""
        return self.head.postprocess(outputs, image_sizes)


class DeepLabV3MobileNetV2(Buildable, Segmenter):
    """Mobile DeepLabv3: MobileNetV2 at output stride 16 (or 8) + ASPP-lite (or full ASPP).

    The defaults are Table 7's "MNet V2*, OS 16, no ASPP" row: 2.11M parameters, 2.75B
    multiply-adds at 512x512, 75.32% mIoU on VOC 2012 val (with COCO pre-training).

    Args:
        num_classes: K, background included (21 for VOC).
        output_stride: 16 or 8; later strides become dilation in the backbone.
        use_final_conv: feed the head from the 1280-channel final conv instead of the last
            320-channel bottleneck (the paper's "*" variant drops it: fewer parameters, same mIoU).
        width_mult: backbone width multiplier.
        aux_loss: add an auxiliary FCN classifier on ``c4`` (training only; not in the paper).
        head_options: ``aspp`` (``"lite"`` or ``"full"``), ``atrous_rates``, ``channels``,
            ``dropout``, ``aux_weight``, ``ignore_index``: see :class:`~heads.deeplabv3.DeepLabV3Head`.
    """

    def __init__(
        self,
        *,
        num_classes: int = 21,
        output_stride: int = 16,
        use_final_conv: bool = False,
        width_mult: float = 1.0,
        aux_loss: bool = False,
        **head_options: Any,
    ) -> None:
        if output_stride not in (8, 16):
            raise ValueError(f"segmentation uses output_stride 16 or 8 (DeepLab), got {output_stride}")
        in_feature = "final_conv" if use_final_conv else "c5"
        out_features = ("c4", in_feature) if aux_loss else (in_feature,)
        backbone = MobileNetV2(width_mult=width_mult, output_stride=output_stride, out_features=out_features)
        head = DeepLabV3Head(
            backbone.output_shape(),
            num_classes=num_classes,
            in_feature=in_feature,
            aux_feature="c4" if aux_loss else None,
            **head_options,
        )
        super().__init__(backbone, head)


def scaled_size(size: int, scale: float) -> int:
    """TF DeepLab's ``scale_dimension``: ``(size - 1) * scale + 1`` keeps 513-style sizes aligned."""
    return max(1, int((size - 1) * scale + 1))


@torch.no_grad()
def segment_probs(
    model: nn.Module, images: Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False
) -> Tensor:
    """Class probabilities averaged over input scales and left-right flips (Table 7's "MF").

    As TF DeepLab's ``predict_labels_multi_scale``: each scaled (and flipped) copy of the batch is
    segmented, its logits resized to the input size (and flipped back), softmaxed, and the
    probabilities averaged.

    Args:
        model: any module with ``forward(images) -> {"logits": Tensor[N, K, h, w]}``.
        images: ``Tensor[N, 3, H, W]`` RGB 0..255 (what the model takes).
        scales: input scales, e.g. ``(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)`` as the paper.
        flip: also segment the mirrored images.

    Returns:
        ``Tensor[N, K, H, W]`` probabilities (each pixel sums to 1).
    """
    if not scales:
        raise ValueError("scales must not be empty")
    height, width = images.shape[-2:]
    total: Tensor | None = None
    runs = 0
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"scales must be positive, got {list(scales)}")
        size = (scaled_size(height, scale), scaled_size(width, scale))
        scaled = images if size == (height, width) else F.interpolate(
            images.float(), size=size, mode="bilinear", align_corners=True
        )
        for mirrored in (False, True) if flip else (False,):
            logits = model(scaled.flip(-1) if mirrored else scaled)["logits"]
            logits = upsample_logits(logits, (height, width))
            probs = (logits.flip(-1) if mirrored else logits).softmax(dim=1)
            total = probs if total is None else total + probs
            runs += 1
    return total / runs
