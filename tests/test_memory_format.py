"""Both tasks keep their networks channels-last by default; the numbers are those of NCHW."""

from __future__ import annotations

import pytest
import torch

from tasks.detection import SSDLiteDetection
from tasks.networks import DeepLabV3MobileNetV2, SSDLiteMobileNetV2
from tasks.segmentation import DeepLabV3Segmentation
from tasks.training import DenseTask


def build(task: str, channels_last: bool) -> DenseTask:
    torch.manual_seed(0)
    if task == "detection":
        network = SSDLiteMobileNetV2(num_classes=4, image_size=128, width_mult=0.35)
        return SSDLiteDetection(network, channels_last=channels_last)
    network = DeepLabV3MobileNetV2(num_classes=5, width_mult=0.35)
    return DeepLabV3Segmentation(network, freeze_bn=False, channels_last=channels_last)


def test_channels_last_is_the_default() -> None:
    for task in (
        SSDLiteDetection(SSDLiteMobileNetV2(num_classes=4, width_mult=0.35)),
        DeepLabV3Segmentation(DeepLabV3MobileNetV2(num_classes=5, width_mult=0.35)),
    ):
        convs = [m for m in task.network.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_channels_last_network_gives_the_numbers_and_gradients_of_nchw(task: str) -> None:
    fast, plain = build(task, True), build(task, False)
    convs = [m for m in fast.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    assert all(m.weight.is_contiguous() for m in plain.network.modules() if isinstance(m, torch.nn.Conv2d))
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)  # RGB pixels, as the loaders give
    # Eval mode: no dropout draws, and BatchNorm's batch statistics over the 1x1 maps of a
    # two-image batch would magnify summation-order rounding into visible differences.
    outputs = [model.eval().network(images) for model in (fast, plain)]
    key = "cls_logits" if task == "detection" else "logits"
    scale = outputs[1][key].abs().max().item()
    assert scale > 0
    # Summation order only: close relative to the outputs' own size (an untrained detector's
    # logits are tiny in eval mode).
    torch.testing.assert_close(outputs[0][key], outputs[1][key], atol=1e-5 * scale, rtol=1e-4)
    for output in outputs:
        (output[key] / scale).square().mean().backward()
    for (name, a), (_, b) in zip(fast.network.named_parameters(), plain.network.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name  # the box predictors take no part in cls_logits
        if b.grad is not None:
            atol = 1e-5 * b.grad.abs().max().item()
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-3, msg=name)
    # Checkpoints move between the two formats: a state dict is values, not layouts.
    plain.network.load_state_dict(fast.network.state_dict())
    assert all(m.weight.is_contiguous() for m in plain.network.modules() if isinstance(m, torch.nn.Conv2d))
