"""The backbone contract: named feature maps whose shapes are declared at construction."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn

# torchvision's ImageNet statistics (RGB, 0-1 scale): the pixels the backbone's ImageNet weights
# were trained on were normalised with these. The one definition: networks normalise their
# 0..255 input with them, data pads with the mean pixel.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FeatureSpec:
    """What one named output of a backbone looks like.

    Attributes:
        channels: number of channels of the map.
        stride: input pixels per output pixel (the map is ``ceil(H / stride)`` high).
    """

    channels: int
    stride: int


class Backbone(nn.Module, ABC):
    """A feature extractor whose ``forward`` returns ``{name: Tensor[N, C, H/stride, W/stride]}``.

    Subclasses fill ``self._output_shape`` while they build their layers, so heads can be built
    from :meth:`output_shape` before any image has been seen (declared, never discovered).
    """

    def __init__(self) -> None:
        super().__init__()
        self._output_shape: dict[str, FeatureSpec] = {}

    def output_shape(self) -> dict[str, FeatureSpec]:
        """The channels and stride of every map ``forward`` returns, in the order it returns them."""
        return dict(self._output_shape)

    @abstractmethod
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Run the network on ``images[N, 3, H, W]`` and return the declared maps."""
