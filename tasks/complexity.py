"""Parameters and multiply-adds of a network, counted as the MobileNetV2 paper counts them.

Multiply-adds come from ``torch.utils.flop_counter`` (one multiply-add = 2 FLOPs) on one image of
``input_size`` x ``input_size``, the convention of the paper's Tables 4, 6 and 7. Used by
``tools/summary.py`` and ``tools/benchmark.py``, so their tables give the same numbers.

:class:`MobileNetV2Classifier` and :class:`BackboneFeatures` are the two networks of Table 4
that no training config builds (the ImageNet classifier, the feature extractor alone): they
exist to be counted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from backbones.mobilenetv2 import MobileNetV2


class MobileNetV2Classifier(nn.Module):
    """The paper's ImageNet network (Table 2): MobileNetV2 features, global average pool, linear to K."""

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = MobileNetV2(width_mult=width_mult, out_features=("final_conv",))
        channels = self.backbone.output_shape()["final_conv"].channels
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """``images`` [N, 3, H, W] -> logits [N, K]."""
        features = self.backbone(images)["final_conv"]
        return self.classifier(features.mean(dim=(2, 3)))


class BackboneFeatures(nn.Module):
    """MobileNetV2 up to its 1280-channel final conv, for counting the feature extractor alone."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = MobileNetV2(width_mult=width_mult, out_features=("final_conv",))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images`` [N, 3, H, W] -> ``{"final_conv": [N, 1280 * width, H / 32, W / 32]}``."""
        return self.backbone(images)


def count(model: nn.Module, input_size: int) -> dict[str, object]:
    """Parameters and multiply-adds of ``model`` on one ``input_size``-square image, per part."""
    model.eval()
    with FlopCounterMode(display=False, depth=2) as counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    flops = counter.get_flop_counts()
    root = type(model).__name__
    parts = []
    for name, child in model.named_children():
        child_flops = sum(flops.get(f"{root}.{name}", {}).values())
        parts.append(
            {
                "name": name,
                "params": sum(p.numel() for p in child.parameters()),
                "madds": int(child_flops // 2),
            }
        )
    return {
        "model": root,
        "input_size": input_size,
        "params": sum(p.numel() for p in model.parameters()),
        "madds": int(counter.get_total_flops() // 2),
        "parts": parts,
    }
