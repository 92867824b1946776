"""tasks/networks/torchvision_segmenters.py: torchvision's LR-ASPP behind our segmentation contract
(issue 15's side by side), checked against torchvision's own model, trained through the real CLI,
reloaded from its checkpoint and exported through tasks.deploy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from backbones import IMAGENET_MEAN, IMAGENET_STD
from tasks import deploy
from tasks.checkpoints import load_task
from tasks.networks import Segmenter, TorchvisionLRASPP
from tasks.networks.torchvision_segmenters import from_torchvision_state_dict
from tasks.quantization import quantized_nodes
from tasks.segmentation import DeepLabV3Segmentation
from tools.train import main

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = str(ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml")
NETWORK = {"class_path": "tasks.networks.TorchvisionLRASPP", "init_args": {"num_classes": 21}}


def pixels(batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def torchvision_input(images: Tensor) -> Tensor:
    """What torchvision's segmentation transforms give its model: ImageNet-normalised 0..1 pixels."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (images / 255 - mean) / std


def test_outputs_equal_torchvisions_model_given_its_weights() -> None:
    torch.manual_seed(0)
    theirs = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=6).eval()
    torch.manual_seed(1)  # other initial weights: only the state-dict copy makes them equal
    ours = TorchvisionLRASPP(num_classes=6)
    assert isinstance(ours, Segmenter)
    ours.load_state_dict(from_torchvision_state_dict(theirs.state_dict()))
    ours.eval()
    images = pixels(2, 97, 131)  # odd sizes: the strided and dilated stages round up
    with torch.no_grad():
        logits = ours(images)["logits"]
        expected = theirs(torchvision_input(images))["out"]
    assert logits.shape == (2, 6, 97, 131)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_seeded_construction_is_torchvisions_initialisation() -> None:
    torch.manual_seed(3)
    theirs = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    torch.manual_seed(3)
    ours = TorchvisionLRASPP()
    expected = from_torchvision_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(expected)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_declared_backbone_outputs_match_the_real_maps() -> None:
    network = TorchvisionLRASPP(num_classes=3).eval()
    with torch.no_grad():
        maps = network.backbone(torch.randn(1, 3, 65, 97))
    declared = network.backbone.output_shape()
    assert list(maps) == list(declared) == ["low", "high"]
    for name, spec in declared.items():
        assert maps[name].shape[1] == spec.channels
        assert tuple(maps[name].shape[-2:]) == (-(-65 // spec.stride), -(-97 // spec.stride)), name
    assert (declared["low"].stride, declared["high"].stride) == (8, 16)


def test_loss_skips_ignored_pixels_and_postprocess_crops() -> None:
    network = TorchvisionLRASPP(num_classes=4)
    outputs = network(pixels(2, 33, 40))
    masks = torch.randint(0, 4, (2, 33, 40))
    loss = network.loss(outputs, masks)["loss_ce"]
    expected = torch.nn.functional.cross_entropy(outputs["logits"], masks)
    torch.testing.assert_close(loss, expected)
    ignored = network.loss(outputs, torch.full((2, 33, 40), 255))["loss_ce"]
    assert ignored.item() == 0.0 and ignored.requires_grad  # no NaN from an all-ignore batch
    labels = network.postprocess(outputs, [(33, 40), (20, 31)])
    assert [tuple(map.shape) for map in labels] == [(33, 40), (20, 31)]
    assert torch.equal(labels[1], outputs["logits"][1].argmax(0)[:20, :31])


def test_trains_one_step_through_the_cli_and_reloads(
    synthetic_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["tools/train.py"])  # LightningCLI compares its args with sys.argv
    cli = main([
        "fit", "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_voc), "--model.network", json.dumps(NETWORK),
        "--data.num_workers", "0", "--data.batch_size", "2", "--data.crop_size", "65",
        "--trainer.max_steps", "1", "--trainer.max_epochs", "-1", "--trainer.val_check_interval", "1",
        "--trainer.check_val_every_n_epoch", "null", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])  # fmt: skip
    assert type(cli.model.network) is TorchvisionLRASPP and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/mIoU" in cli.trainer.callback_metrics
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"

    loaded = load_task(checkpoint, DeepLabV3Segmentation)
    assert type(loaded.network) is TorchvisionLRASPP
    assert loaded.network.init_args == {"num_classes": 21, "inter_channels": 128, "ignore_index": 255}
    images = pixels(1, 65, 81)
    with torch.no_grad():
        expected, actual = cli.model.eval()(images)["logits"], loaded.eval()(images)["logits"]
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("output", ["logits", "labels"])
def test_exports_to_onnx_through_tasks_deploy_and_matches_pytorch(output: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = TorchvisionLRASPP(num_classes=5).eval()
    names = [f"class{i}" for i in range(5)]
    module, example, dynamic = deploy.exportable(network, names, output=output, input_size=64)
    assert dynamic
    path = tmp_path / "lraspp.onnx"
    deploy.export_onnx(module, example, path, dynamic)
    run = deploy.load_runner(path, "onnx", threads=1)
    report = deploy.verify(module, run, pixels(2, 72, 100, seed=1))  # another size than traced: dynamic H, W
    if output == "logits":
        assert report["logits_max_abs_diff"] < 1e-3
        with torch.no_grad():
            eager = network(pixels(1, 49, 57, seed=2))["logits"].numpy()
        np.testing.assert_allclose(run(pixels(1, 49, 57, seed=2).numpy())[0], eager, rtol=1e-3, atol=1e-3)
    else:
        assert report["labels_mismatch"] <= 1e-3
    metadata = deploy.read_metadata(path)
    assert json.loads(metadata["class_names"]) == names and metadata["task"] == "segmentation"
    # The INT8 path (tasks.quantization) finds the body's convolutions under its scopes.
    nodes = quantized_nodes(onnx.load(str(path)))
    assert any(n.startswith("/network/backbone/") for n in nodes) and any(n.startswith("/network/head/") for n in nodes)
