"""tasks/segmentation.py: test-time augmentation, the training recipe, the CLI and checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import MobileNetV2
from tasks.segmentation import DeepLabV3Segmentation, Segmenter, deeplabv3_mobilenetv2, segment_probs
from tools import summary
from tools.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
VOC_CONFIG = ROOT / "configs" / "deeplabv3_mobilenetv2_voc.yaml"
SYNTHETIC_CONFIG = ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml"


class PixelwiseModel(nn.Module):
    """A 1x1 conv: every pixel's logits depend on that pixel only, so it commutes with flips."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {"logits": self.conv(images)}


class RampModel(nn.Module):
    """Ignores the image and favours class 0 more and more towards the right."""

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        n, _, h, w = images.shape
        logits = torch.zeros(n, 2, h, w)
        logits[:, 0] = torch.linspace(-3, 3, w)
        return {"logits": logits}


def test_flip_and_scale_averaging_change_nothing_they_should_not() -> None:
    torch.manual_seed(0)
    images = torch.randn(2, 3, 17, 23)
    pixelwise = PixelwiseModel()
    plain = pixelwise(images)["logits"].softmax(dim=1)
    assert torch.allclose(segment_probs(pixelwise, images, flip=True), plain, atol=1e-6)
    model = deeplabv3_mobilenetv2(num_classes=4, width_mult=0.35).eval()
    real_images = torch.randn(1, 3, 97, 131)
    single = segment_probs(model, real_images)
    assert torch.equal(single, model(real_images)["logits"].softmax(dim=1))
    # Flipped predictions are flipped back before averaging: a position-only model becomes symmetric.
    ramp = segment_probs(RampModel(), images, flip=True)
    assert torch.allclose(ramp, ramp.flip(-1), atol=1e-6)
    assert not torch.allclose(segment_probs(RampModel(), images), ramp)


@pytest.mark.parametrize("size", [(97, 131), (65, 65)])
def test_multi_scale_flip_probabilities(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = deeplabv3_mobilenetv2(num_classes=4, width_mult=0.35).eval()
    images = torch.randn(2, 3, *size)
    probs = segment_probs(model, images, scales=(0.5, 0.75, 1.25), flip=True)
    assert tuple(probs.shape) == (2, 4, *size)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, *size), atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        segment_probs(model, images, scales=(0.0,))


def test_task_exposes_the_network_and_loads_backbone_weights_only_for_fit(tmp_path: Path) -> None:
    task = DeepLabV3Segmentation(width_mult=0.35, weights_backbone=str(tmp_path / "missing.pth"))
    assert isinstance(task.model, Segmenter)  # built without reading the weights
    out = task.model(torch.randn(1, 3, 33, 47))
    assert set(out) == {"logits"} and tuple(out["logits"].shape) == (1, 21, 33, 47)
    with pytest.raises(FileNotFoundError, match="missing.pth: weights file not found"):
        task.setup("fit")
    source = MobileNetV2(width_mult=0.35, output_stride=16, out_features=("c5",))
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    task = DeepLabV3Segmentation(width_mult=0.35, weights_backbone=str(tmp_path / "backbone.pth"))
    assert not torch.equal(task.model.backbone.stem.conv.weight, source.stem.conv.weight)
    task.setup("validate")
    assert not torch.equal(task.model.backbone.stem.conv.weight, source.stem.conv.weight)
    task.setup("fit")
    assert torch.equal(task.model.backbone.stem.conv.weight, source.stem.conv.weight)


def test_poly_schedule_and_weight_decay_groups() -> None:
    task = DeepLabV3Segmentation(width_mult=0.35, lr=0.01, max_steps=10, weight_decay=4e-5)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.model.parameters()))
    assert optimizer.defaults["momentum"] == 0.9
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.01 * (1 - step / 10) ** 0.9 for step in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    adamw = DeepLabV3Segmentation(width_mult=0.35, optimizer="adamw", lr=1e-3, max_steps=5)
    optimizer = adamw.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 4e-5
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    ("batch_size", "world_size", "accumulate", "expected"),
    [(16, 1, 1, 0.007), (2, 8, 1, 0.007), (8, 1, 1, 0.0035), (4, 2, 4, 0.014)],
)
def test_lr_scales_with_the_effective_batch(batch_size: int, world_size: int, accumulate: int, expected: float) -> None:
    # A DataModule that keeps batch_size only in its hparams works too.
    data = type("Data", (), {"hparams": {"batch_size": batch_size}})()
    trainer = type(
        "Trainer", (), {"datamodule": data, "world_size": world_size, "accumulate_grad_batches": accumulate}
    )()
    task = DeepLabV3Segmentation(width_mult=0.35, lr=0.007, lr_reference_batch=16, max_steps=10)
    task._trainer = trainer
    optimizer = task.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2)
    task = DeepLabV3Segmentation(width_mult=0.35, lr=0.007, max_steps=10)  # no reference: as given
    task._trainer = trainer
    assert task.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.007)
    for config, reference in ((VOC_CONFIG, 16), (SYNTHETIC_CONFIG, 8)):
        text = config.read_text()
        assert f"lr_reference_batch: {reference}" in text and f"batch_size: {reference}\n" in text


def bn_layers(task: DeepLabV3Segmentation) -> list[_BatchNorm]:
    return [m for m in task.model.modules() if isinstance(m, _BatchNorm)]


def test_batch_norm_policy() -> None:
    small = DeepLabV3Segmentation(width_mult=0.35)  # freeze_bn=None: TF DeepLab's rule
    small.on_train_batch_start({"images": torch.zeros(4, 3, 33, 33)}, 0)
    small.train()
    assert small.bn_frozen is True
    assert all(not bn.training and not bn.weight.requires_grad for bn in bn_layers(small))
    assert small.model.head.aspp.project.conv.weight.requires_grad and small.model.training
    before = [bn.running_mean.clone() for bn in bn_layers(small)]
    small.model(torch.randn(4, 3, 33, 33))
    assert all(torch.equal(bn.running_mean, old) for bn, old in zip(bn_layers(small), before))

    large = DeepLabV3Segmentation(width_mult=0.35)
    large.on_train_batch_start({"images": torch.zeros(12, 3, 33, 33)}, 0)
    large.train()
    assert large.bn_frozen is False and all(bn.training for bn in bn_layers(large))

    forced = DeepLabV3Segmentation(width_mult=0.35, freeze_bn=False, bn_momentum=0.0003)
    forced.on_train_batch_start({"images": torch.zeros(2, 3, 33, 33)}, 0)
    forced.train()
    assert all(bn.training and bn.momentum == 0.0003 for bn in bn_layers(forced))
    frozen = DeepLabV3Segmentation(width_mult=0.35, freeze_bn=True).train()
    assert all(not bn.training for bn in bn_layers(frozen))


def test_summary_of_the_voc_config_is_the_papers_model() -> None:
    network = summary.model_from_config(VOC_CONFIG)  # weights_backbone: imagenet is not downloaded
    counts = summary.count(network, 513)
    assert abs(counts["params"] - 2.11e6) <= 0.1 * 2.11e6  # Table 7: 2.11M
    assert abs(counts["madds"] - 2.75e9) <= 0.1 * 2.75e9  # Table 7: 2.75B
    full = summary.count(deeplabv3_mobilenetv2(aspp="full"), 513)
    assert full["params"] > counts["params"] + 2e6 and full["madds"] > counts["madds"] + 2e9
    synthetic = summary.model_from_config(SYNTHETIC_CONFIG)
    assert sum(p.numel() for p in synthetic.parameters()) == counts["params"]


def test_fit_validate_and_checkpoint_round_trip_through_the_cli(
    synthetic_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # pytest's own arguments are not the CLI's
    small = [
        "--data.root", str(synthetic_voc),
        "--data.crop_size", "65",
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        "--model.width_mult", "0.35",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    cli = train_main(["fit", "--config", str(SYNTHETIC_CONFIG), "--trainer.fast_dev_run", "2", *small])
    task = cli.model
    assert isinstance(task, DeepLabV3Segmentation) and task.hparams.width_mult == 0.35
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0 and 0.0 <= float(metrics["val/pixel_acc"]) <= 1.0
    assert cli.trainer.global_step == 2
    assert "_instantiator" in task.hparams  # what lets LightningModule.load_from_checkpoint rebuild it

    checkpoint = tmp_path / "round_trip.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    images = torch.randn(1, 3, 49, 57)
    expected = task.eval().model(images)["logits"]
    for loader in (DeepLabV3Segmentation, LightningModule):  # by class, and by the stored class path
        restored = loader.load_from_checkpoint(checkpoint, map_location="cpu")
        assert type(restored) is DeepLabV3Segmentation
        assert restored.hparams.width_mult == 0.35
        assert torch.allclose(restored.eval().model(images)["logits"], expected, atol=1e-6)
    with_flip = DeepLabV3Segmentation.load_from_checkpoint(checkpoint, map_location="cpu", eval_flip=True)
    assert with_flip.eval_flip is True and "eval_flip" not in with_flip.hparams

    # Validation of the checkpoint with flip + multi-scale evaluation, through the same entry point.
    cli = train_main(
        [
            "validate", "--config", str(SYNTHETIC_CONFIG), *small,
            "--data.val_limit", "2",
            "--model.eval_scales", "[0.75, 1.0]",
            "--model.eval_flip", "true",
            "--ckpt_path", str(checkpoint),
        ]
    )  # fmt: skip
    assert cli.model.eval_flip is True and cli.model.eval_scales == [0.75, 1.0]
    assert cli.model.hparams.width_mult == 0.35
    assert 0.0 <= float(cli.trainer.callback_metrics["val/mIoU"]) <= 1.0
