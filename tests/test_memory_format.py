"""Both tasks keep their networks channels-last by default; the numbers are those of NCHW."""

from __future__ import annotations

import pytest
import torch

from tasks.detection import SSDLiteDetection
from tasks.segmentation import DeepLabV3Segmentation


def build(task: str, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "detection":
        return SSDLiteDetection(num_classes=4, image_size=128, width_mult=0.35, channels_last=channels_last)
    return DeepLabV3Segmentation(num_classes=5, width_mult=0.35, freeze_bn=False, channels_last=channels_last)


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_channels_last_network_gives_the_numbers_and_gradients_of_nchw(task: str) -> None:
    fast, plain = build(task, True), build(task, False)
    convs = [m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)
    assert all(m.weight.is_contiguous() for m in plain.model.modules() if isinstance(m, torch.nn.Conv2d))
    images = torch.randn(2, 3, 128, 128)
    # Eval mode: no dropout draws, and BatchNorm's batch statistics over the 1x1 maps of a
    # two-image batch would magnify summation-order rounding into visible differences.
    outputs = [model.eval().model(images) for model in (fast, plain)]
    key = "cls_logits" if task == "detection" else "logits"
    torch.testing.assert_close(outputs[0][key], outputs[1][key], atol=1e-5, rtol=1e-4)  # summation order only
    for output in outputs:
        output[key].square().mean().backward()
    for (name, a), (_, b) in zip(fast.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3, msg=name)
    # Checkpoints move between the two formats: a state dict is values, not layouts.
    plain.model.load_state_dict(fast.model.state_dict())
    assert all(m.weight.is_contiguous() for m in plain.model.modules() if isinstance(m, torch.nn.Conv2d))
