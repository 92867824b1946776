"""MobileNetV2 backbone: declared shapes, torchvision equivalence, weight loading and freezing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from backbones import FeatureSpec, MobileNetV2
from backbones.mobilenetv2 import OUTPUT_NAMES, make_divisible

ALL = OUTPUT_NAMES


def randomised_torchvision(width_mult: float = 1.0, seed: int = 0) -> nn.Module:
    """A torchvision MobileNetV2 whose BatchNorm statistics are not the trivial 0/1 defaults."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(width_mult=width_mult)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1, 0.2)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


def torchvision_taps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The intermediate outputs of ``model.features`` that our names stand for."""
    taps: dict[str, torch.Tensor] = {}
    index_of = {1: "c1", 3: "c2", 6: "c3", 13: "c4", 17: "c5", 18: "final_conv"}
    x = images
    for index, layer in enumerate(model.features):
        if index == 14:
            taps["c4_expand"] = layer.conv[0](x)  # the 1x1 expansion ConvBNReLU of layer 15
        x = layer(x)
        if index in index_of:
            taps[index_of[index]] = x
    return taps


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = randomised_torchvision()
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("width_mult", [0.35, 1.0])
@pytest.mark.parametrize("size", [(321, 321), (97, 131)])
def test_declared_shapes_match_real_outputs(output_stride: int, width_mult: float, size: tuple[int, int]) -> None:
    model = MobileNetV2(width_mult=width_mult, output_stride=output_stride, out_features=ALL).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, *size))
    declared = model.output_shape()
    assert list(outputs) == list(declared) == list(ALL)
    for name, feature in outputs.items():
        spec = declared[name]
        expected = (1, spec.channels, math.ceil(size[0] / spec.stride), math.ceil(size[1] / spec.stride))
        assert tuple(feature.shape) == expected, name
    assert max(spec.stride for spec in declared.values()) == output_stride


def test_declared_channels_and_strides_at_width_1() -> None:
    shapes = MobileNetV2(out_features=ALL).output_shape()
    assert shapes == {
        "c1": FeatureSpec(16, 2),
        "c2": FeatureSpec(24, 4),
        "c3": FeatureSpec(32, 8),
        "c4": FeatureSpec(96, 16),
        "c4_expand": FeatureSpec(576, 16),
        "c5": FeatureSpec(320, 32),
        "final_conv": FeatureSpec(1280, 32),
    }
    assert MobileNetV2(output_stride=16, out_features=ALL).output_shape()["c5"] == FeatureSpec(320, 16)
    os8 = MobileNetV2(output_stride=8, out_features=ALL).output_shape()
    assert os8["c4"] == FeatureSpec(96, 8) and os8["c4_expand"] == FeatureSpec(576, 8)


def test_width_multiplier_rounding_and_unreduced_final_conv() -> None:
    assert make_divisible(32 * 0.35) == 16 and make_divisible(96 * 0.35) == 32
    narrow = MobileNetV2(width_mult=0.35, out_features=ALL).output_shape()
    assert narrow["c5"].channels == 112 and narrow["final_conv"].channels == 1280  # section 6.1
    wide = MobileNetV2(width_mult=1.4, out_features=ALL).output_shape()
    assert wide["c5"].channels == 448 and wide["final_conv"].channels == 1792


def test_residuals_only_where_shape_is_kept() -> None:
    model = MobileNetV2(out_features=ALL)
    residual = [block.use_residual for block in model.blocks]
    # Rows of Table 2 with n > 1 have n - 1 residual blocks each: 1 + 2 + 3 + 2 + 2 = 10.
    assert sum(residual) == 10
    assert not residual[0] and not residual[1] and residual[2]
    assert all(isinstance(block.project.bn, nn.BatchNorm2d) for block in model.blocks)
    assert all(len(block.project) == 2 for block in model.blocks)  # linear bottleneck: no ReLU6


@pytest.mark.parametrize("width_mult", [1.0, 0.5])
def test_equals_torchvision_after_loading_its_state_dict(width_mult: float, tmp_path: Path) -> None:
    reference = randomised_torchvision(width_mult, seed=1)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    ours = MobileNetV2(width_mult=width_mult, out_features=ALL, weights=str(path)).eval()
    images = torch.randn(2, 3, 161, 175)
    with torch.no_grad():
        expected = torchvision_taps(reference, images)
        actual = ours(images)
    for name in ALL:
        assert actual[name].shape == expected[name].shape, name
        assert (actual[name] - expected[name]).abs().max().item() <= 1e-5, name
    assert sum(p.numel() for p in ours.parameters()) + sum(
        p.numel() for p in reference.classifier.parameters()
    ) == sum(p.numel() for p in reference.parameters())


def test_dilated_variants_share_weights_and_early_stages(torchvision_weights: tuple[nn.Module, Path]) -> None:
    _, path = torchvision_weights
    images = torch.randn(1, 3, 128, 128)
    os32 = MobileNetV2(out_features=ALL, weights=str(path)).eval()
    os16 = MobileNetV2(output_stride=16, out_features=ALL, weights=str(path)).eval()
    os8 = MobileNetV2(output_stride=8, out_features=ALL, weights=str(path)).eval()
    with torch.no_grad():
        a, b, c = os32(images), os16(images), os8(images)
    # Dilation changes only layers after the removed stride.
    for name in ("c1", "c2", "c3", "c4", "c4_expand"):
        assert torch.equal(a[name], b[name]), name
    for name in ("c1", "c2", "c3"):
        assert torch.equal(a[name], c[name]), name
    assert b["c5"].shape[-1] == 8 and c["c5"].shape[-1] == 16
    assert os16.blocks[13].depthwise.conv.stride == (1, 1)
    assert os16.blocks[13].depthwise.conv.dilation == (1, 1)  # the block that lost its stride
    assert os16.blocks[14].depthwise.conv.dilation == (2, 2)
    assert os8.blocks[16].depthwise.conv.dilation == (4, 4)


def test_imagenet_weights_load_through_torchvision_enum(
    torchvision_weights: tuple[nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, path = torchvision_weights
    # torch.hub looks in $TORCH_HOME/hub/checkpoints before downloading: put the file there.
    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / url.rsplit("/", 1)[-1]).write_bytes(path.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ours = MobileNetV2(out_features=("c5",), weights="imagenet").eval()
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (ours(images)["c5"] - torchvision_taps(reference, images)["c5"]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="width_mult=1.0"):
        MobileNetV2(width_mult=0.5, weights="imagenet")


def test_offline_imagenet_weights_fail_with_one_line_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.error

    from backbones.mobilenetv2 import WeightsUnavailableError

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as caught:
        MobileNetV2(weights="imagenet")
    message = str(caught.value)
    assert "\n" not in message
    cache = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert str(cache) in message
    assert "--model.weights_backbone null" in message and "--model.weights_backbone PATH" in message
    assert "Temporary failure in name resolution" in message


def test_own_format_state_dict_round_trip(tmp_path: Path) -> None:
    source = MobileNetV2(out_features=ALL).eval()
    path = tmp_path / "ours.pth"
    torch.save(source.state_dict(), path)
    loaded = MobileNetV2(out_features=ALL, weights=str(path)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(images)["final_conv"], loaded(images)["final_conv"])


def test_bad_weights_give_errors_naming_keys(torchvision_weights: tuple[nn.Module, Path], tmp_path: Path) -> None:
    reference, full = torchvision_weights
    state = reference.state_dict()
    missing = dict(state)
    del missing["features.5.conv.1.0.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: missing keys.*features\.5\.conv\.1\.0\.weight"):
        MobileNetV2(weights=str(tmp_path / "missing.pth"))

    extra = dict(state, **{"head.fc.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys.*head\.fc\.weight"):
        MobileNetV2(weights=str(tmp_path / "extra.pth"))

    with pytest.raises(ValueError, match="shape mismatch.*width_mult"):
        MobileNetV2(width_mult=0.5, weights=str(full))

    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt\.pth: not a readable"):
        MobileNetV2(weights=str(tmp_path / "corrupt.pth"))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        MobileNetV2(weights=str(tmp_path / "nothere.pth"))


def test_unbuilt_layers_are_skipped_and_cost_nothing(torchvision_weights: tuple[nn.Module, Path]) -> None:
    _, path = torchvision_weights
    without_final = MobileNetV2(out_features=("c5",), weights=str(path))
    with_final = MobileNetV2(out_features=("c5", "final_conv"))
    assert without_final.final_conv is None
    difference = sum(p.numel() for p in with_final.parameters()) - sum(
        p.numel() for p in without_final.parameters()
    )
    assert difference == 320 * 1280 + 2 * 1280
    assert len(MobileNetV2(out_features=("c3",)).blocks) == 6


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        MobileNetV2(output_stride=4)
    with pytest.raises(ValueError, match="c6"):
        MobileNetV2(out_features=("c6",))
    with pytest.raises(ValueError, match="frozen_stages"):
        MobileNetV2(frozen_stages=12)


def test_frozen_stages_have_no_gradient_and_fixed_statistics() -> None:
    model = MobileNetV2(out_features=ALL, frozen_stages=3).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for block in model.blocks[:3] for p in block.parameters())
    assert all(p.requires_grad for block in model.blocks[3:] for p in block.parameters())
    assert not model.stem.bn.training and not model.blocks[2].project.bn.training
    assert model.blocks[3].project.bn.training
    before = model.blocks[1].depthwise.bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.blocks[1].depthwise.bn.running_mean)
