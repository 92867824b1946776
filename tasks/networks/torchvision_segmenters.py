"""torchvision's LR-ASPP segmenter behind this project's segmentation-network contract (issue 15).

:class:`TorchvisionLRASPP` is ``lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)``
(MobileNetV3 paper, section 6.4: Lite R-ASPP on a dilated MobileNetV3-Large) as a
:class:`~tasks.networks.Segmenter`: RGB pixels in 0..255 in (normalised inside, with torchvision's
ImageNet statistics), ``{"logits": [N, K, H, W]}`` out, its own loss and post-processing. So
:class:`tasks.segmentation.DeepLabV3Segmentation` trains and evaluates it, checkpoints rebuild it
(:class:`~tasks.buildable.Buildable`) and :mod:`tasks.deploy` / :mod:`tasks.quantization` export
and quantise it exactly as they do ours: the side-by-side comparison of the issue runs through
one path.

It is torchvision's model with the same layers, split along this project's seams:

* :class:`MobileNetV3LargeDilated` (``network.backbone``): the layers of torchvision's
  ``IntermediateLayerGetter``, with the same names, returning ``low`` (C2, stride 8) and ``high``
  (the last 1x1 conv, stride 16: the last stage dilated instead of strided).
* :class:`LRASPPSegmentationHead` (``network.head``): torchvision's ``LRASPPHead`` plus the head
  contract (``{"logits"}`` out, ``loss``, ``postprocess``, ``num_classes``, ``ignore_index``).

State dicts therefore differ from torchvision's only in ``classifier.`` being ``head.``
(:func:`from_torchvision_state_dict`), and ``forward`` runs torchvision's ``LRASPP.forward``
(logits upsampled with ``align_corners=False``, as torchvision does; ours use TF's ``True``).
No weights are downloaded here: both parts start from torchvision's own initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation import lraspp_mobilenet_v3_large
from torchvision.models.segmentation.lraspp import LRASPPHead

from backbones import Backbone, FeatureSpec
from tasks.buildable import Buildable
from tasks.networks.segmenter import Segmenter

# torchvision's segmentation weights take ImageNet-normalised pixels (their ``SemanticSegmentation``
# transform), which Normalize's defaults are; VOC's label space and unlabelled value.
VOC_NUM_CLASSES = 21
IGNORE_INDEX = 255
# Where torchvision's LRASPP keeps its head, and where this project's segmenters keep theirs.
TORCHVISION_HEAD_PREFIX, HEAD_PREFIX = "classifier.", "head."


def _stride(module: nn.Module) -> int:
    """Input pixels per output pixel of a chain of convolutions (dilated ones have stride 1)."""
    return math.prod(layer.stride[0] for layer in module.modules() if isinstance(layer, nn.Conv2d))


class MobileNetV3LargeDilated(Backbone):
    """The backbone of torchvision's LR-ASPP: ``mobilenet_v3_large(dilated=True).features`` up to
    its last layer, as its ``IntermediateLayerGetter`` keeps them (children ``"0"``..``"16"``).

    Args:
        layers: the features of torchvision's model in order (``LRASPP.backbone``'s children).
        taps: which layer names give which output, ``{"4": "low", "16": "high"}`` (its
            ``return_layers``).

    Outputs (declared from the layers themselves): ``low`` (40 channels, stride 8) and ``high``
    (960 channels, stride 16).
    """

    def __init__(self, layers: Mapping[str, nn.Module], taps: Mapping[str, str]) -> None:
        super().__init__()
        self.taps = {str(name): str(output) for name, output in taps.items()}
        stride = 1
        for name, layer in layers.items():
            self.add_module(name, layer)
            stride *= _stride(layer)
            if name in self.taps:
                # torchvision's blocks declare their width (InvertedResidual, Conv2dNormActivation).
                self._output_shape[self.taps[name]] = FeatureSpec(int(layer.out_channels), stride)
        missing = set(self.taps) - set(layers)
        if missing:
            raise ValueError(f"taps {sorted(missing)} are not layers of the backbone ({', '.join(layers)})")

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` normalised -> ``{"low", "high"}``."""
        outputs: dict[str, Tensor] = {}
        x = images
        for name, layer in self.named_children():
            x = layer(x)
            if name in self.taps:
                outputs[self.taps[name]] = x
                if len(outputs) == len(self.taps):
                    break
        return outputs

    def load_weights(self, weights: str) -> None:
        """Refused: ImageNet or state-dict weights are only loaded into our MobileNetV2."""
        raise ValueError(
            f"TorchvisionLRASPP's backbone cannot load weights_backbone={weights!r}: it trains from scratch here "
            "(set --model.weights_backbone null), or load torchvision's whole model with from_torchvision_state_dict"
        )


class LRASPPSegmentationHead(LRASPPHead):
    """torchvision's ``LRASPPHead`` (``cbr``, ``scale``, ``low_classifier``, ``high_classifier``)
    with this project's head contract.

    Args:
        input_shape: the backbone's ``output_shape()``; the head reads ``low`` and ``high``.
        num_classes: K, background included.
        inter_channels: width of the ``high`` branch (torchvision's 128).
        ignore_index: the mask value the loss skips (255 in VOC).
    """

    def __init__(
        self,
        input_shape: Mapping[str, FeatureSpec],
        *,
        num_classes: int,
        inter_channels: int = 128,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(input_shape["low"].channels, input_shape["high"].channels, num_classes, inter_channels)
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        """``{"low", "high"}`` -> ``{"logits": Tensor[N, K, h, w]}`` at the ``low`` map's stride (8)."""
        return {"logits": super().forward(features)}

    def loss(self, outputs: Mapping[str, Tensor], masks: Tensor) -> dict[str, Tensor]:
        """``{"loss_ce"}``: cross-entropy averaged over the labelled pixels of ``masks[N, H, W]``
        (torchvision's reference recipe; 0 with a gradient, not NaN, when none is labelled)."""
        if masks.dim() != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
        logits = outputs["logits"]
        if tuple(logits.shape[-2:]) != tuple(masks.shape[-2:]):
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits.float(), masks.long(), ignore_index=self.ignore_index, reduction="sum")
        return {"loss_ce": total / (masks != self.ignore_index).sum().clamp(min=1)}

    @torch.no_grad()
    def postprocess(self, outputs: Mapping[str, Tensor], image_sizes: Tensor | Sequence[Sequence[int]]) -> list[Tensor]:
        """Per-image label maps ``int64[H, W]``: the argmax, cropped to each ``image_sizes[i]`` =
        ``(H, W)`` (images at the top left of a padded batch; coarser logits are first resized
        to the largest image)."""
        logits = outputs["logits"]
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(image_sizes).reshape(-1, 2).tolist()]
        if len(sizes) != logits.shape[0]:
            raise ValueError(f"{len(sizes)} image sizes for a batch of {logits.shape[0]}")
        largest = (max(h for h, _ in sizes), max(w for _, w in sizes))
        if logits.shape[-2] < largest[0] or logits.shape[-1] < largest[1]:
            logits = F.interpolate(logits, size=largest, mode="bilinear", align_corners=False)
        labels = logits.argmax(dim=1)
        return [label[:h, :w] for label, (h, w) in zip(labels, sizes)]


class TorchvisionLRASPP(Buildable, Segmenter):
    """``lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K)`` as a segmenter.

    Args:
        num_classes: K, background included (21: VOC's label space, torchvision's default).
        inter_channels: width of the head's ``high`` branch (torchvision's 128).
        ignore_index: the mask value the loss skips.

    torchvision builds the model (its MobileNetV3-Large, dilated last stage, BatchNorm eps 1e-3 /
    momentum 0.01, its init), so after ``torch.manual_seed(s)`` this network and torchvision's
    builder hold the same weights. Train it with ``--model.network=tasks.networks.TorchvisionLRASPP``.
    """

    def __init__(
        self, *, num_classes: int = VOC_NUM_CLASSES, inter_channels: int = 128, ignore_index: int = IGNORE_INDEX
    ) -> None:
        model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        backbone = MobileNetV3LargeDilated(dict(model.backbone.named_children()), model.backbone.return_layers)
        head = LRASPPSegmentationHead(
            backbone.output_shape(), num_classes=num_classes, inter_channels=inter_channels, ignore_index=ignore_index
        )
        if inter_channels == model.classifier.cbr[0].out_channels:
            head.load_state_dict(model.classifier.state_dict())  # torchvision's initial weights, not new draws
        # Segmenter's Normalize: ImageNet statistics, as torchvision's segmentation transforms.
        super().__init__(backbone, head)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` RGB 0..255 -> ``{"logits": Tensor[N, K, H, W]}`` (torchvision's
        ``LRASPP.forward``: bilinear upsampling with ``align_corners=False``)."""
        outputs = self.head(self.backbone(self.normalize(images)))
        logits = outputs["logits"]
        outputs["logits"] = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return outputs


def from_torchvision_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of torchvision's ``LRASPP`` (e.g. its COCO-with-VOC-labels weights, loaded
    elsewhere) renamed for :class:`TorchvisionLRASPP` (``classifier.*`` -> ``head.*``)."""
    renamed = {}
    for key, value in state_dict.items():
        if key.startswith(TORCHVISION_HEAD_PREFIX):
            key = HEAD_PREFIX + key.removeprefix(TORCHVISION_HEAD_PREFIX)
        renamed[key] = value
    return renamed
