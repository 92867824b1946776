"""Image normalisation as the first layer of every network (as torchvision keeps ``image_mean`` /
``image_std`` in its detection models), so loaders, tools and exported models all feed pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from backbones import IMAGENET_MEAN, IMAGENET_STD


class Normalize(nn.Module):
    """``uint8`` or float RGB images in 0..255 -> ``(x / 255 - mean) / std`` in float32.

    The statistics are non-persistent buffers: they follow the module's device and never enter
    a state dict (they are constants, not weights).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """``images``: ``[N, 3, H, W]`` RGB, uint8 or float, 0..255."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] RGB, got shape {list(images.shape)}")
        return (images.float() - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={[round(v / 255, 4) for v in self.mean.flatten().tolist()]}, std={[round(v / 255, 4) for v in self.std.flatten().tolist()]}"
