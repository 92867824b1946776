"""The layer every network here is made of: convolution, BatchNorm, activation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, "same" padding) + BatchNorm2d + activation (``conv``, ``bn``, ``act``).

    Args:
        activation: the activation's class: ReLU6 in MobileNetV2 and SSDLite, ReLU in DeepLab's
            ASPP; None for the linear bottleneck projection (MobileNetV2, section 3.2).
        bn_eps, bn_momentum: PyTorch's BatchNorm2d defaults (the backbone's); SSDLite's head
            uses TF's 1e-3 / 0.03.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: Callable[..., nn.Module] | None = nn.ReLU6,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            bn=nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
        )
        if activation is not None:
            layers["act"] = activation(inplace=True)
        super().__init__(layers)
        self.train()  # a ReLU6 starts out of place: see train()

    def train(self, mode: bool = True) -> ConvBNAct:
        """Training or inference mode; a ReLU6 (any ``nn.Hardtanh``) also runs out of place in
        training and in place in inference. The numbers are the same either way (tested).

        Why: the backward of ``hardtanh_`` needs the activation's input, which the in-place op
        overwrites, so in training autograd clones the input first: one extra copy per activation,
        about 4% of an SSDLite training step on CPU (``tasks/benchmarking/training_step.py``'s
        profile). Out of place there is no copy. Without autograd nothing is cloned and in place
        saves an allocation, about 5% of an inference forward pass. ReLU needs no switch: the
        backward of ``relu_`` uses its output, so in place never clones.
        """
        super().train(mode)
        act = self._modules.get("act")
        if isinstance(act, nn.Hardtanh):
            act.inplace = not mode
        return self
