"""The Mobile DeepLabv3 head (Sandler et al., 2018, section 6.3, Table 7).

DeepLabv3 (Chen et al., 2017) puts an Atrous Spatial Pyramid Pooling (ASPP) module on a backbone
run at output stride 16 or 8. For MobileNetV2 the paper removes the atrous 3x3 branches and keeps
only a 1x1 conv branch and an image-level pooling branch ("ASPP-lite"): 75.32% mIoU on VOC 2012
val for 2.11M parameters and 2.75B multiply-adds, against 75.70% for 4.52M / 5.8B with full ASPP.
The layers and widths are those of TF DeepLab's MobileNetV2 model (``model.py``, no
``atrous_rates``): ``image_pooling`` and ``aspp0`` (320 -> 256 each), ``concat_projection``
(512 -> 256), dropout 0.1 and a 1x1 ``logits`` conv with bias.

The head is built from the backbone's ``output_shape()`` and reads its input by name, so widths
follow the backbone's width multiplier and output stride without any hand-copied channel count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.base import FeatureSpec
from backbones.layers import ConvBNAct

# DeepLabv3 section 3.3: atrous rates (6, 12, 18) at output stride 16, doubled at output stride 8.
ASPP_RATES_AT_OS16: tuple[int, int, int] = (6, 12, 18)


def default_atrous_rates(stride: int) -> tuple[int, ...]:
    """The full-ASPP rates for a feature map of ``stride``: (6, 12, 18) at 16, (12, 24, 36) at 8."""
    if stride not in (8, 16, 32):
        raise ValueError(f"no default ASPP rates for a feature stride of {stride}; pass atrous_rates")
    return tuple(max(1, rate * 16 // stride) for rate in ASPP_RATES_AT_OS16)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize ``logits[N, K, h, w]`` to ``size`` = (H, W).

    ``align_corners=True`` as TF DeepLab: with "same" padding, output pixel ``i`` of a stride-``s``
    network is centred on input pixel ``s * i``, so corners align exactly for sizes ``s * k + 1``
    (513 at stride 16) and drift by less than ``s`` pixels at the far edge otherwise;
    ``align_corners=False`` would shift the whole map by ``(s - 1) / 2`` input pixels.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


class PoolingBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for the image-pooling branch, whose map has a single value per channel and image.

    In training, a batch of one image gives one value per channel: PyTorch's BatchNorm refuses it
    ("Expected more than 1 value per channel") and TF would normalise it to zero. Then this layer
    normalises with its running statistics and leaves them untouched, so batch size 1 trains
    (e.g. fine-tuning on large crops) and statistics are only learnt from real batches.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.numel() // x.shape[1] <= 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, *, dilation: int = 1
) -> ConvBNAct:
    """Conv (no bias) + BatchNorm + ReLU: DeepLab's ASPP layer (ReLU, not ReLU6, as TF DeepLab)."""
    return ConvBNAct(in_channels, out_channels, kernel_size, dilation=dilation, activation=nn.ReLU)


class ImagePooling(nn.Module):
    """DeepLabv3's image-level feature: global average pool, 1x1 conv, BN, ReLU, broadcast back.

    The pool is global (``mean`` over H, W) whatever the map's size, so any input size works.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = PoolingBatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.act(self.bn(self.conv(x.mean(dim=(2, 3), keepdim=True))))
        # Resizing a 1x1 map bilinearly is a broadcast; expand keeps it exportable and free.
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: parallel branches, concatenated and projected.

    ``rates=()`` is the paper's ASPP-lite (1x1 branch + image pooling); otherwise one 3x3 conv
    branch with dilation ``rate`` is added per rate (regular convs: with (6, 12, 18) this gives the
    4.52M parameters of Table 7's ASPP row).

    Args:
        in_channels: channels of the input map.
        channels: width of every branch and of the projection (256 in DeepLab).
        rates: dilation rates of the 3x3 branches.
        dropout: element-wise dropout after the projection (TF DeepLab's ``keep_prob=0.9``).
    """

    def __init__(
        self, in_channels: int, channels: int = 256, *, rates: Sequence[int] = (), dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.image_pooling = ImagePooling(in_channels, channels)
        branches = [conv_bn_relu(in_channels, channels, 1)]
        branches += [conv_bn_relu(in_channels, channels, 3, dilation=rate) for rate in rates]
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(channels * (len(branches) + 1), channels, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # TF order: image pooling first, then aspp0, aspp1.. (matters only for weight conversion).
        outputs = [self.image_pooling(x)] + [branch(x) for branch in self.branches]
        return self.dropout(self.project(torch.cat(outputs, dim=1)))


class FCNAuxHead(nn.Module):
    """The auxiliary classifier of PSPNet / mmseg's ``FCNHead``: 3x3 conv, BN, ReLU, dropout, 1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.block = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))


class DeepLabV3Head(nn.Module):
    """ASPP(-lite) on one backbone map, then a 1x1 classifier; an optional auxiliary classifier.

    Outputs are logits at the stride of the input feature (``ceil(H / stride)``); the segmenter
    that owns the backbone upsamples them to the image (:func:`upsample_logits`), and
    :meth:`loss` / :meth:`postprocess` accept either resolution.

    Args:
        input_shape: the backbone's ``output_shape()``.
        num_classes: K, including background (21 for PASCAL VOC).
        in_feature: the map ASPP reads: ``"c5"`` (the paper's MNet V2*, 320 channels at width 1)
            or ``"final_conv"`` (the 1280-channel conv of the classification network).
        aspp: ``"lite"`` (1x1 + image pooling, the paper's model) or ``"full"`` (plus 3x3 atrous
            branches at ``atrous_rates``).
        atrous_rates: rates of the full ASPP; default (6, 12, 18) at stride 16, doubled at 8.
        channels: width of the ASPP branches and projection (256).
        dropout: dropout before the classifier (0.1, TF DeepLab's ``keep_prob=0.9``).
        aux_feature: a backbone map for an auxiliary FCN classifier used in training only
            (e.g. ``"c4"``), or ``None`` for none (the paper has none).
        aux_channels: width of the auxiliary head's 3x3 conv.
        aux_weight: weight of the auxiliary loss (0.4 as PSPNet / mmseg).
        ignore_index: the label the loss ignores (255 in VOC: object borders, padding).
    """

    def __init__(
        self,
        input_shape: Mapping[str, FeatureSpec],
        *,
        num_classes: int,
        in_feature: str = "c5",
        aspp: Literal["lite", "full"] = "lite",
        atrous_rates: Sequence[int] | None = None,
        channels: int = 256,
        dropout: float = 0.1,
        aux_feature: str | None = None,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if aspp not in ("lite", "full"):
            raise ValueError(f"aspp must be 'lite' or 'full', got {aspp!r}")
        for name in (in_feature, aux_feature):
            if name is not None and name not in input_shape:
                raise ValueError(
                    f"feature {name!r} is not a backbone output; available: {list(input_shape)} "
                    "(add it to the backbone's out_features)"
                )
        spec = input_shape[in_feature]
        if aspp == "full":
            rates = tuple(atrous_rates) if atrous_rates is not None else default_atrous_rates(spec.stride)
        else:
            if atrous_rates:
                raise ValueError(f"atrous_rates {list(atrous_rates)} need aspp='full'")
            rates = ()
        self.in_feature = in_feature
        self.aux_feature = aux_feature
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.stride = spec.stride
        self.aspp = ASPP(spec.channels, channels, rates=rates, dropout=dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.aux_head = (
            FCNAuxHead(input_shape[aux_feature].channels, aux_channels, num_classes, dropout)
            if aux_feature is not None
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Classifiers start near uniform (TF DeepLab's logits: truncated normal, stddev 0.01).
        classifiers = [self.classifier] + ([self.aux_head.classifier] if self.aux_head is not None else [])
        for classifier in classifiers:
            nn.init.trunc_normal_(classifier.weight, std=0.01, a=-0.02, b=0.02)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Classify every position of the input map.

        Args:
            features: the backbone's outputs, ``{name: Tensor[N, C, h, w]}``.

        Returns:
            ``{"logits": Tensor[N, K, h, w]}`` at the input feature's stride, plus
            ``"aux_logits"`` (at the auxiliary feature's stride) in training mode with an
            auxiliary head: it costs nothing at inference and is not exported.
        """
        outputs = {"logits": self.classifier(self.aspp(features[self.in_feature]))}
        if self.aux_head is not None and self.training:
            outputs["aux_logits"] = self.aux_head(features[self.aux_feature])
        return outputs

    def loss(self, outputs: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Per-pixel cross-entropy over the labelled pixels.

        Args:
            outputs: :meth:`forward`'s dict; logits of any resolution are bilinearly resized to
                the masks' (TF DeepLab's ``upsample_logits``).
            targets: ``masks[N, H, W]`` int64 class indices, ``ignore_index`` where unlabelled.

        Returns:
            ``{"loss_ce": ...}`` (mean over labelled pixels of the batch; 0, with gradient, when
            none is labelled) and ``"loss_aux"`` (already weighted) when ``aux_logits`` is present.
        """
        losses = {"loss_ce": self._cross_entropy(outputs["logits"], targets)}
        if "aux_logits" in outputs:
            losses["loss_aux"] = self.aux_weight * self._cross_entropy(outputs["aux_logits"], targets)
        return losses

    def _cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() != 3:
            raise ValueError(f"targets must be masks[N, H, W], got shape {tuple(targets.shape)}")
        logits = upsample_logits(logits, targets.shape[-2:])
        total = F.cross_entropy(logits, targets.long(), ignore_index=self.ignore_index, reduction="sum")
        # Mean over labelled pixels; an all-ignore batch gives 0 instead of cross_entropy's NaN.
        labelled = (targets != self.ignore_index).sum().clamp(min=1)
        return total / labelled

    @torch.no_grad()
    def postprocess(
        self, outputs: Mapping[str, Tensor], image_sizes: Sequence[Sequence[int]]
    ) -> list[Tensor]:
        """Per-image label maps from logits.

        Args:
            outputs: ``{"logits": Tensor[N, K, h, w]}`` for a batch whose images lie at the top
                left of a (possibly padded) canvas. Logits at the canvas resolution are cropped;
                coarser logits (the head's own stride) are first resized to the largest image,
                i.e. the batch is assumed padded to its largest image.
            image_sizes: ``(H, W)`` of each image.

        Returns:
            One ``Tensor[H, W]`` int64 of class indices per image.
        """
        logits = outputs["logits"]
        if len(image_sizes) != logits.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {logits.shape[0]}")
        max_h = max(int(size[0]) for size in image_sizes)
        max_w = max(int(size[1]) for size in image_sizes)
        if logits.shape[-2] < max_h or logits.shape[-1] < max_w:
            logits = upsample_logits(logits, (max_h, max_w))
        labels = logits.argmax(dim=1)
        return [label[: int(h), : int(w)] for label, (h, w) in zip(labels, image_sizes)]
