"""tasks/networks/torchvision_detectors.py: torchvision's SSDLite pieces behind our network contract
(issue 14's ablation), checked against torchvision's own model, and trained through the real CLI."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from backbones import MobileNetV2
from tasks.checkpoints import load_task
from tasks.detection import SSDLiteDetection
from tasks.networks import MobileNetV3LargeFeatures, SSDLiteMobileNetV2, SSDLiteMobileNetV3, TorchvisionSSDLite
from tools.train import main

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
# torchvision's SSDLite is built for 320x320: its default boxes match ours only at that size.
SIZE = 320


def binary_pixels(batch: int, size: int = SIZE) -> Tensor:
    """Random 0 / 255 RGB pixels: ``x / 255`` and both normalisations are exact on them, so our
    pipeline and torchvision's see bit-identical inputs."""
    return torch.randint(0, 2, (batch, 3, size, size)).float() * 255


def targets() -> list[dict[str, Tensor]]:
    """Two boxes in the first image, none in the second (torchvision's -1 matches)."""
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 100.0, 200.0], [150.0, 150.0, 300.0, 310.0]]), "labels": torch.tensor([1, 5])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


@pytest.fixture(scope="module")
def torchvision_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6)


# ------------------------------------------------------------------------------ MobileNetV3 features
def test_mobilenet_v3_features_are_torchvisions_stages(torchvision_model: torch.nn.Module) -> None:
    torch.manual_seed(1)  # other initial weights: only load_state_dict makes them equal
    backbone = MobileNetV3LargeFeatures()
    stages = torchvision_model.backbone.features
    backbone.load_state_dict(stages.state_dict(prefix="features."))
    backbone.eval()
    stages.eval()
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        maps = backbone(images)
        c4_expand = stages[0](images)
        final_conv = stages[1](c4_expand)
    assert list(maps) == ["c4_expand", "final_conv"]
    assert torch.equal(maps["c4_expand"], c4_expand) and torch.equal(maps["final_conv"], final_conv)
    # Declared at construction, and what forward gives: 672 channels at 16, 480 (reduced tail) at 32.
    shape = backbone.output_shape()
    assert [(s.channels, s.stride) for s in shape.values()] == [(672, 16), (480, 32)]
    for name, spec in shape.items():
        assert maps[name].shape[1:] == (spec.channels, 96 // spec.stride, 128 // spec.stride)
    # torchvision's from-scratch SSDLite BatchNorm (TF's eps and momentum), not PyTorch's defaults.
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.eps == 0.001 and m.momentum == 0.03 for m in norms)


def test_our_head_on_mobilenet_v3(torchvision_model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    network = SSDLiteMobileNetV3(num_classes=6).eval()
    assert isinstance(network.backbone, MobileNetV3LargeFeatures) and network.image_size == 320
    images = binary_pixels(2)
    with torch.no_grad():
        outputs = network(images)
    anchors = network.head.num_anchors((SIZE, SIZE))
    assert anchors == 2034  # our default boxes (3 on the first map, 6 after), as on MobileNetV2
    assert outputs["cls_logits"].shape == (2, anchors, 6) and outputs["bbox_regression"].shape == (2, anchors, 4)
    assert outputs["anchors"].shape == (anchors, 4)
    # torchvision's normalisation ([0, 1] pixels, mean 0.5, std 0.5), not ImageNet's.
    expected = torchvision_model.transform.normalize(images[0] / 255)
    assert torch.equal(network.normalize(images)[0], expected)
    network.backbone.load_state_dict(torchvision_model.backbone.features.state_dict(prefix="features."))
    with torch.no_grad():
        maps = network.backbone(network.normalize(images))
        c4_expand = torchvision_model.backbone.features.eval()[0](expected[None])
    assert torch.equal(maps["c4_expand"][:1], c4_expand)


# ------------------------------------------------------------------------------ torchvision's SSDLite
def test_torchvision_ssdlite_is_torchvisions_model(torchvision_model: torch.nn.Module) -> None:
    torch.manual_seed(1)
    network = TorchvisionSSDLite(num_classes=6)
    network.ssd.load_state_dict(torchvision_model.state_dict())
    reference = copy.deepcopy(torchvision_model)  # both from the same state, BatchNorm included
    images = binary_pixels(2)

    # Training: the same matching and loss, BatchNorm in training mode on both.
    network.train()
    reference.train()
    losses = network.loss(network(images), targets(), (SIZE, SIZE))
    expected = reference([image / 255 for image in images], targets())
    assert set(losses) == {"loss_cls", "loss_box"}
    torch.testing.assert_close(losses["loss_cls"], expected["classification"])
    torch.testing.assert_close(losses["loss_box"], expected["bbox_regression"])

    # Inference: the same detections, at the input's size (torchvision's resize is the identity).
    network.eval()
    reference.eval()
    detections = network.detect(images)
    with torch.no_grad():
        expected_detections = reference([image / 255 for image in images])
    for ours, theirs in zip(detections, expected_detections, strict=True):
        assert len(ours["boxes"]) == len(theirs["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    # Boxes for the pictures the inputs were resized from: one multiplication per axis.
    rescaled = network.detect(images, image_sizes=[(640, 480), (160, 320)])
    for ours, scaled, (height, width) in zip(detections, rescaled, [(640, 480), (160, 320)]):
        factor = torch.tensor([width / SIZE, height / SIZE, width / SIZE, height / SIZE])
        torch.testing.assert_close(scaled["boxes"], ours["boxes"] * factor)
        assert torch.equal(scaled["scores"], ours["scores"]) and torch.equal(scaled["labels"], ours["labels"])


def test_torchvision_head_on_our_mobilenet_v2() -> None:
    torch.manual_seed(0)
    network = TorchvisionSSDLite(num_classes=6, backbone="mobilenet_v2").train()
    (ours,) = [m for m in network.modules() if isinstance(m, MobileNetV2)]
    names = {name for name, _ in network.named_parameters()}
    assert {f"ssd.backbone.features.{name}" for name, _ in ours.named_parameters()} <= names
    images = binary_pixels(2)
    outputs = network(images)
    anchors = 3234  # torchvision's default boxes: 6 per cell on 20, 10, 5, 3, 2, 1 maps
    assert outputs["cls_logits"].shape == (2, anchors, 6) and outputs["bbox_regression"].shape == (2, anchors, 4)
    assert outputs["anchors"].shape == (anchors, 4)
    losses = network.loss(outputs, targets(), (SIZE, SIZE))
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())
    # Our ImageNet normalisation for our backbone.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(network.normalize(images), (images / 255 - mean) / std)


def test_torchvision_ssdlite_cannot_mask_labels() -> None:
    network = TorchvisionSSDLite(num_classes=6, backbone="mobilenet_v2")
    network.set_valid_labels([1, 2, 3, 4, 5])
    assert network.valid_labels.all() and network.valid_labels.shape == (6,)
    with pytest.raises(ValueError, match=r"cannot mask.*\[3\].*contiguous_labels") as error:
        network.set_valid_labels([1, 2, 4, 5])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"\[6\]"):
        network.set_valid_labels([1, 2, 3, 4, 5, 6])


# ------------------------------------------------------------------------------ through the CLI
NETWORKS = {
    "torchvision-mnv3": {"class_path": "tasks.networks.TorchvisionSSDLite", "init_args": {"backbone": "mobilenet_v3_large"}},
    "torchvision-head-mnv2": {"class_path": "tasks.networks.TorchvisionSSDLite", "init_args": {"backbone": "mobilenet_v2"}},
    "our-head-mnv3": {"class_path": "tasks.networks.SSDLiteMobileNetV3", "init_args": {}},
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_trains_through_the_cli_and_reloads(
    name: str, synthetic_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["tools/train.py"])  # LightningCLI compares its args with sys.argv
    network = copy.deepcopy(NETWORKS[name])
    network["init_args"].update(num_classes=6, image_size=128)
    cli = main([
        "fit", "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_coco), "--model.network", json.dumps(network),
        "--data.num_workers", "0", "--data.batch_size", "4", "--data.eval_batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    cls = {"TorchvisionSSDLite": TorchvisionSSDLite, "SSDLiteMobileNetV3": SSDLiteMobileNetV3}[
        network["class_path"].rsplit(".", 1)[1]
    ]
    assert type(cli.model.network) is cls and cli.trainer.global_step == 2
    assert cli.datamodule.image_size == 128  # the data follows the network
    assert "val/AP" in cli.trainer.callback_metrics
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"

    loaded = load_task(checkpoint, SSDLiteDetection)
    assert type(loaded.network) is cls
    assert {key: loaded.network.init_args[key] for key in network["init_args"]} == network["init_args"]
    images = binary_pixels(2, 128)
    trained = cli.model.eval()
    with torch.no_grad():
        expected, actual = trained(images), loaded(images)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


@pytest.mark.parametrize(
    "make",
    [
        lambda init: SSDLiteMobileNetV2(num_classes=6, backbone_init=init),
        lambda init: TorchvisionSSDLite(num_classes=6, backbone="mobilenet_v2", backbone_init=init),
    ],
    ids=["ours", "torchvision_head_on_ours"],
)
def test_backbone_init_is_the_reference_kaiming_or_torchvisions_normal(make: Callable[[str], nn.Module]) -> None:
    def backbone_convs(network: nn.Module) -> list[torch.Tensor]:
        (backbone,) = [m for m in network.modules() if isinstance(m, MobileNetV2)]
        return [m.weight.detach() for m in backbone.modules() if isinstance(m, nn.Conv2d)]

    torch.manual_seed(0)
    normal = backbone_convs(make("normal"))
    pooled = torch.cat([w.flatten() for w in normal])
    assert pooled.std().item() == pytest.approx(0.03, abs=5e-4) and abs(pooled.mean().item()) < 5e-4
    # Kaiming (fan_out, as torchvision's MobileNetV2): the stem's 32 3x3 filters have std sqrt(2 / 288).
    stem = backbone_convs(make("kaiming"))[0]
    assert stem.shape == (32, 3, 3, 3) and stem.std().item() == pytest.approx((2 / 288) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="backbone_init must be 'kaiming' or 'normal', got 'xavier'"):
        make("xavier")
