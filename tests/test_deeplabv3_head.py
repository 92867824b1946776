"""heads/deeplabv3.py and the segmenter network: shapes, the paper's sizes, BatchNorm at batch 1, the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones import FeatureSpec, MobileNetV2
from heads.deeplabv3 import DeepLabV3Head, PoolingBatchNorm2d, default_atrous_rates, upsample_logits
from tasks.networks import DeepLabV3MobileNetV2

SMALL = {"width_mult": 0.35}  # tests run on a small network; channels still come from output_shape()


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(321, 321), (97, 131)])
def test_logits_match_declared_stride_and_input_size(output_stride: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = DeepLabV3MobileNetV2(num_classes=5, output_stride=output_stride, aux_loss=True, **SMALL).eval()
    images = torch.randn(2, 3, *size)
    features = model.backbone(images)
    declared = model.backbone.output_shape()
    assert declared["c5"].stride == output_stride
    head_out = model.head(features)
    expected = tuple(-(-side // output_stride) for side in size)  # ceil(H / stride)
    assert tuple(head_out["logits"].shape) == (2, 5, *expected)
    assert "aux_logits" not in head_out  # training only
    out = model(images)
    assert set(out) == {"logits"}
    assert tuple(out["logits"].shape) == (2, 5, *size)
    assert torch.isfinite(out["logits"]).all()

    model.train()
    train_out = model(images)
    assert tuple(train_out["aux_logits"].shape) == (2, 5, *expected)  # c4 is at stride <= 16
    assert tuple(train_out["logits"].shape) == (2, 5, *size)


def test_paper_model_size_and_full_aspp_costs_more() -> None:
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    lite = DeepLabV3MobileNetV2()
    # Table 7: 2.11M parameters; TF DeepLab's layers give exactly this count.
    assert count(lite) == 2_113_557
    assert count(lite.backbone) == 1_811_712  # MobileNetV2 up to the 320-channel c5, no 1280 conv
    full = DeepLabV3MobileNetV2(aspp="full")
    assert abs(count(full) - 4.52e6) < 0.01 * 4.52e6  # Table 7's ASPP row: 4.52M
    with_final_conv = DeepLabV3MobileNetV2(use_final_conv=True)
    assert with_final_conv.head.in_feature == "final_conv"
    assert with_final_conv.head.aspp.branches[0].conv.in_channels == 1280
    assert count(with_final_conv) > count(lite) + 400_000  # the 1280 conv and wider 1x1 layers


def test_head_reads_channels_and_rates_from_output_shape() -> None:
    backbone = MobileNetV2(width_mult=0.5, output_stride=8, out_features=("c4", "c5"))
    shape = backbone.output_shape()
    head = DeepLabV3Head(shape, num_classes=3, aspp="full", aux_feature="c4", channels=32, aux_channels=16)
    assert head.aspp.branches[0].conv.in_channels == shape["c5"].channels
    assert head.aux_head.block.conv.in_channels == shape["c4"].channels
    assert [branch.conv.dilation for branch in head.aspp.branches[1:]] == [(12, 12), (24, 24), (36, 36)]
    assert default_atrous_rates(16) == (6, 12, 18)
    assert head.aspp.project.conv.in_channels == 32 * 5  # 1x1 + 3 atrous + pooling
    custom = DeepLabV3Head({"x": FeatureSpec(7, 16)}, num_classes=2, in_feature="x", aspp="full", atrous_rates=[2])
    assert len(custom.aspp.branches) == 2 and custom.aspp.branches[1].conv.dilation == (2, 2)


def test_clear_errors() -> None:
    shape = {"c5": FeatureSpec(32, 16)}
    with pytest.raises(ValueError, match="'c4' is not a backbone output"):
        DeepLabV3Head(shape, num_classes=3, aux_feature="c4")
    with pytest.raises(ValueError, match="aspp must be"):
        DeepLabV3Head(shape, num_classes=3, aspp="huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need aspp='full'"):
        DeepLabV3Head(shape, num_classes=3, atrous_rates=[6])
    with pytest.raises(ValueError, match="output_stride 16 or 8"):
        DeepLabV3MobileNetV2(output_stride=32)
    head = DeepLabV3Head(shape, num_classes=3)
    with pytest.raises(ValueError, match=r"masks\[N, H, W\]"):
        head.loss({"logits": torch.zeros(1, 3, 4, 4)}, torch.zeros(1, 1, 4, 4, dtype=torch.long))


def test_batch_of_one_trains_and_pooling_bn_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    model = DeepLabV3MobileNetV2(num_classes=4, **SMALL).train()
    pooling_bn = model.head.aspp.image_pooling.bn
    assert isinstance(pooling_bn, PoolingBatchNorm2d)
    before = pooling_bn.running_mean.clone()
    out = model(torch.randn(1, 3, 65, 81))  # one image: one value per channel in the pooling branch
    loss = model.head.loss(out, torch.randint(0, 4, (1, 65, 81)))["loss_ce"]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.head.aspp.image_pooling.conv.weight.grad is not None
    assert torch.equal(pooling_bn.running_mean, before)  # no statistics from a single value
    # The other BatchNorms learn from the batch's pixels as usual.
    assert not torch.equal(model.head.aspp.branches[0].bn.running_mean, torch.zeros_like(before))
    model(torch.randn(2, 3, 65, 81))  # two images: ordinary batch statistics
    assert not torch.equal(pooling_bn.running_mean, before)


def test_image_pooling_is_global_for_any_size() -> None:
    torch.manual_seed(0)
    head = DeepLabV3Head({"c5": FeatureSpec(8, 16)}, num_classes=3, channels=4).eval()
    pooling = head.aspp.image_pooling
    for size in [(1, 1), (3, 7), (33, 33)]:
        x = torch.randn(2, 8, *size)
        out = pooling(x)
        assert tuple(out.shape) == (2, 4, *size)
        reference = F.relu(pooling.bn(pooling.conv(x.mean(dim=(2, 3), keepdim=True))))
        assert torch.allclose(out, reference.expand_as(out))


def test_upsampling_aligns_corners_like_tf_deeplab() -> None:
    # Feature i of a stride-16 map of a 513 input is centred on pixel 16 i: values must land there.
    coarse = torch.randn(1, 2, 33, 33)
    fine = upsample_logits(coarse, (513, 513))
    assert torch.allclose(fine[..., ::16, ::16], coarse, atol=1e-5)
    assert upsample_logits(coarse, (33, 33)) is coarse


def test_loss_ignores_255_and_resizes_coarse_logits() -> None:
    torch.manual_seed(0)
    head = DeepLabV3Head({"c5": FeatureSpec(8, 16)}, num_classes=3)
    logits = torch.randn(2, 3, 6, 5, requires_grad=True)
    masks = torch.randint(0, 3, (2, 6, 5))
    masks[0, :2] = 255
    loss = head.loss({"logits": logits}, masks)["loss_ce"]
    keep = masks != 255
    reference = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert torch.allclose(loss, reference)
    # Changing logits of ignored pixels changes nothing.
    altered = logits.detach().clone()
    altered[0, :, :2] = 100.0
    assert torch.allclose(head.loss({"logits": altered}, masks)["loss_ce"], reference)
    # All pixels ignored: zero loss with a gradient, not NaN.
    empty = head.loss({"logits": logits}, torch.full_like(masks, 255))["loss_ce"]
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    # Coarse logits are upsampled to the masks before the loss.
    coarse = torch.randn(2, 3, 3, 3)
    full_masks = torch.randint(0, 3, (2, 33, 33))
    expected = F.cross_entropy(upsample_logits(coarse, (33, 33)), full_masks)
    assert torch.allclose(head.loss({"logits": coarse}, full_masks)["loss_ce"], expected)


def test_aux_loss_is_weighted_and_only_in_training() -> None:
    torch.manual_seed(0)
    model = DeepLabV3MobileNetV2(num_classes=4, aux_loss=True, aux_weight=0.5, **SMALL).train()
    images, masks = torch.randn(2, 3, 65, 65), torch.randint(0, 4, (2, 65, 65))
    outputs = model(images)
    losses = model.head.loss(outputs, masks)
    assert set(losses) == {"loss_ce", "loss_aux"}
    raw = F.cross_entropy(upsample_logits(outputs["aux_logits"], (65, 65)), masks)
    assert torch.allclose(losses["loss_aux"], 0.5 * raw)
    assert set(model.head.loss(model.eval()(images), masks)) == {"loss_ce"}


def test_postprocess_crops_each_image() -> None:
    head = DeepLabV3Head({"c5": FeatureSpec(8, 16)}, num_classes=3)
    logits = torch.zeros(2, 3, 10, 12)
    logits[0, 2] = 1.0  # image 0: class 2 everywhere
    logits[1, 1, :, 6:] = 1.0  # image 1: class 1 on the right half
    labels = head.postprocess({"logits": logits}, [(10, 12), (7, 9)])
    assert [tuple(label.shape) for label in labels] == [(10, 12), (7, 9)]
    assert labels[0].dtype == torch.int64 and (labels[0] == 2).all()
    assert (labels[1][:, 6:] == 1).all() and (labels[1][:, :6] == 0).all()
    coarse = head.postprocess({"logits": torch.randn(1, 3, 3, 3)}, [(33, 33)])
    assert tuple(coarse[0].shape) == (33, 33)
    with pytest.raises(ValueError, match="2 image sizes for a batch of 1"):
        head.postprocess({"logits": torch.zeros(1, 3, 4, 4)}, [(4, 4), (4, 4)])
