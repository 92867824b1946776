"""backbones/layers.py: ConvBNAct's ReLU6 runs out of place in training, in place in inference, same numbers."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.profiler import profile

from backbones.layers import ConvBNAct
from tasks.benchmarking.training_step import synthetic_batch
from tasks.networks import SSDLiteMobileNetV2


def test_relu6_is_out_of_place_in_training_and_in_place_in_inference() -> None:
    net = SSDLiteMobileNetV2(num_classes=6)
    relu6 = [m for m in net.modules() if isinstance(m, nn.ReLU6)]
    assert relu6 and not any(m.inplace for m in relu6)  # built in training mode
    net.eval()
    assert all(m.inplace for m in relu6)
    net.train()
    assert not any(m.inplace for m in relu6)
    relu = ConvBNAct(4, 4, activation=nn.ReLU)  # relu_ never clones: it stays in place
    assert relu.act.inplace and relu.eval().act.inplace


def test_training_forward_clones_no_activation_input() -> None:
    layer = ConvBNAct(8, 8, 3).to(memory_format=torch.channels_last)
    images = torch.randn(2, 8, 16, 16).to(memory_format=torch.channels_last)
    with profile() as profiler:
        layer(images).sum().backward()
    names = [event.name for event in profiler.events()]
    assert "aten::hardtanh_backward" in names and "aten::clone" not in names  # in place: hardtanh_ clones its input
    with torch.inference_mode(), profile() as profiler:
        layer.eval()(images)
    assert "aten::hardtanh_" in [event.name for event in profiler.events()]  # no allocation in inference


def test_out_of_place_relu6_gives_bit_identical_outputs_gradients_and_statistics() -> None:
    torch.manual_seed(0)
    images, targets = synthetic_batch(2, 128)
    ours = SSDLiteMobileNetV2(num_classes=6).to(memory_format=torch.channels_last).train()
    in_place = copy.deepcopy(ours)
    for module in in_place.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True  # the layer as it was
    results = []
    for net in (ours, in_place):
        outputs = net(images)
        losses = net.loss(outputs, targets, (128, 128))
        (losses["loss_cls"] + losses["loss_box"]).backward()
        results.append((outputs, losses, [p.grad for p in net.parameters()], list(net.buffers())))
    (outputs, losses, grads, buffers), (outputs_, losses_, grads_, buffers_) = results
    assert all(torch.equal(outputs[key], outputs_[key]) for key in outputs)
    assert all(torch.equal(losses[key], losses_[key]) for key in losses)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_, strict=True))  # BatchNorm running statistics
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ours.eval()(images).values(), in_place.eval()(images).values()))
