"""tasks/segmentation.py and tasks/training.py: test-time augmentation, the training recipe
(optimiser recipes and schedules of tasks/optimization.py, BatchNorm policy), the CLI, class names
from the data, and checkpoints."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import MobileNetV2
from tasks.checkpoints import load_task
from tasks.data.constants import VOC_CLASSES
from tasks.data.synthetic import SYNTHETIC_VOC_CLASS_NAMES
from tasks.data.voc import VOCSegmentationDataModule
from tasks.detection import SSDLiteDetection
from tasks.networks import DeepLabV3MobileNetV2, Segmenter, SSDLiteMobileNetV2, segment_probs
from tasks.optimization import SGD, AdamW, Poly, lr_lambda
from tasks.segmentation import DeepLabV3Segmentation
from tasks.training import MIN_BATCH_TO_TRAIN_BN, TASK_CLASS_KEY, DenseTask
from tools import summary
from tools.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
VOC_CONFIG = ROOT / "configs" / "deeplabv3_mobilenetv2_voc.yaml"
SYNTHETIC_CONFIG = ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml"


def small_network(num_classes: int = 21) -> DeepLabV3MobileNetV2:
    return DeepLabV3MobileNetV2(num_classes=num_classes, width_mult=0.35)


def pixels(*shape: int) -> Tensor:
    """Random RGB images in 0..255, what the networks take."""
    return torch.rand(*shape) * 255


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
    model = small_network(4).eval()
    real_images = pixels(1, 3, 97, 131)
    single = segment_probs(model, real_images)
    assert torch.equal(single, model(real_images)["logits"].softmax(dim=1))
    # Flipped predictions are flipped back before averaging: a position-only model becomes symmetric.
    ramp = segment_probs(RampModel(), images, flip=True)
    assert torch.allclose(ramp, ramp.flip(-1), atol=1e-6)
    assert not torch.allclose(segment_probs(RampModel(), images), ramp)


@pytest.mark.parametrize("size", [(97, 131), (65, 65)])
def test_multi_scale_flip_probabilities(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = small_network(4).eval()
    images = pixels(2, 3, *size)
    probs = segment_probs(model, images, scales=(0.5, 0.75, 1.25), flip=True)
    assert tuple(probs.shape) == (2, 4, *size)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, *size), atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        segment_probs(model, images, scales=(0.0,))


def test_task_exposes_the_network_and_loads_backbone_weights_only_for_fit(tmp_path: Path) -> None:
    task = DeepLabV3Segmentation(small_network(), weights_backbone=str(tmp_path / "missing.pth"))
    assert isinstance(task.network, Segmenter)  # built without reading the weights
    out = task.network(pixels(1, 3, 33, 47))
    assert set(out) == {"logits"} and tuple(out["logits"].shape) == (1, 21, 33, 47)
    with pytest.raises(FileNotFoundError, match="missing.pth: weights file not found"):
        task.setup("fit")
    source = MobileNetV2(width_mult=0.35, output_stride=16, out_features=("c5",))
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    task = DeepLabV3Segmentation(small_network(), weights_backbone=str(tmp_path / "backbone.pth"))
    assert not torch.equal(task.network.backbone.stem.conv.weight, source.stem.conv.weight)
    task.setup("validate")
    assert not torch.equal(task.network.backbone.stem.conv.weight, source.stem.conv.weight)
    task.setup("fit")
    assert torch.equal(task.network.backbone.stem.conv.weight, source.stem.conv.weight)


@pytest.mark.parametrize(("power", "total"), [(0.9, 10), (1.0, 7), (2.0, 30000)])
def test_poly_factors_follow_the_closed_form(power: float, total: int) -> None:
    schedule = Poly(power=power)
    assert schedule.needs_total_steps
    for step in (0, 1, total // 3, total // 2, total - 1, total):
        assert schedule(step, total) == pytest.approx((1 - step / total) ** power, rel=1e-12, abs=0.0)
    assert schedule(total + 5, total) == 0.0  # past the end: stays at zero, never negative or complex
    # max_steps fixes the length whatever the run's is (TF DeepLab's training_number_of_steps).
    fixed = Poly(power=power, max_steps=total)
    assert not fixed.needs_total_steps
    assert [fixed(step, 5 * total) for step in range(total)] == [schedule(step, total) for step in range(total)]
    assert lr_lambda(fixed, float("inf"))(total // 2) == schedule(total // 2, total)
    with pytest.raises(ValueError, match="Poly schedule needs a finite run"):
        lr_lambda(schedule, float("inf"))


def test_poly_schedule_and_weight_decay_groups() -> None:
    task = DeepLabV3Segmentation(small_network(), optimizer=SGD(lr=0.01, weight_decay=4e-5), lr_schedule=Poly(max_steps=10))
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.network.parameters()))
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is False
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.01 * (1 - step / 10) ** 0.9 for step in range(10)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # max_steps None: the run's own length (the trainer's estimated optimiser steps).
    run = DeepLabV3Segmentation(small_network(), optimizer=SGD(lr=0.01))
    run._trainer = SimpleNamespace(estimated_stepping_batches=4, datamodule=None)
    scheduler = run.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [scheduler.lr_lambdas[0](step) for step in range(5)] == pytest.approx([(1 - s / 4) ** 0.9 for s in range(5)])
    adamw = DeepLabV3Segmentation(small_network(), optimizer=AdamW(lr=1e-3), lr_schedule=Poly(max_steps=5))
    optimizer = adamw.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 4e-5
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    ("batch_size", "world_size", "accumulate", "expected"),
    [(16, 1, 1, 0.007), (2, 8, 1, 0.007), (8, 1, 1, 0.0035), (4, 2, 4, 0.014)],
)
def test_lr_scales_with_the_effective_batch(batch_size: int, world_size: int, accumulate: int, expected: float) -> None:
    # A DataModule that keeps batch_size only in its hparams works too.
    data = SimpleNamespace(hparams={"batch_size": batch_size})
    trainer = SimpleNamespace(
        datamodule=data, world_size=world_size, accumulate_grad_batches=accumulate, estimated_stepping_batches=10
    )
    task = DeepLabV3Segmentation(small_network(), optimizer=SGD(lr=0.007), lr_reference_batch=16)
    task._trainer = trainer
    optimizer = task.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2)
    task = DeepLabV3Segmentation(small_network(), optimizer=SGD(lr=0.007))  # no reference: as given
    task._trainer = trainer
    assert task.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.007)
    for config, reference in ((VOC_CONFIG, 16), (SYNTHETIC_CONFIG, 8)):
        text = config.read_text()
        assert f"lr_reference_batch: {reference}" in text and f"batch_size: {reference}\n" in text


def bn_layers(task: DenseTask) -> list[_BatchNorm]:
    return [m for m in task.network.modules() if isinstance(m, _BatchNorm)]


def segmentation_task(**options: object) -> DenseTask:
    return DeepLabV3Segmentation(small_network(), **options)


def detection_task(**options: object) -> DenseTask:
    return SSDLiteDetection(SSDLiteMobileNetV2(num_classes=6, image_size=96, width_mult=0.35), **options)


@pytest.mark.parametrize("make_task", [segmentation_task, detection_task], ids=["segmentation", "detection"])
def test_batch_norm_policy(make_task: Callable[..., DenseTask]) -> None:
    # TF DeepLab's rule, in tasks/training.py for both tasks: train BatchNorm only over >= 12 images.
    assert MIN_BATCH_TO_TRAIN_BN == 12
    small = make_task(freeze_bn=None)
    assert small.bn_frozen is None  # decided on the first training batch
    small.on_train_batch_start({"images": torch.zeros(11, 3, 33, 33, dtype=torch.uint8)}, 0)
    small.train()
    assert small.bn_frozen is True
    assert all(not bn.training and not bn.weight.requires_grad for bn in bn_layers(small))
    bn_parameters = {id(p) for bn in bn_layers(small) for p in bn.parameters()}
    others = [p for p in small.network.parameters() if id(p) not in bn_parameters]
    assert others and all(p.requires_grad for p in others) and small.network.training
    before = [bn.running_mean.clone() for bn in bn_layers(small)]
    small.network(pixels(4, 3, 64, 64))
    assert all(torch.equal(bn.running_mean, old) for bn, old in zip(bn_layers(small), before))
    small.on_train_batch_start({"images": torch.zeros(16, 3, 33, 33)}, 1)  # decided once
    assert small.bn_frozen is True

    large = make_task(freeze_bn=None)
    large.on_train_batch_start({"images": torch.zeros(12, 3, 33, 33)}, 0)
    large.train()
    assert large.bn_frozen is False and all(bn.training and bn.weight.requires_grad for bn in bn_layers(large))

    # SyncBatchNorm normalises over every device's images: 6 per device x 2 devices = 12.
    for world_size, frozen in ((2, False), (1, True)):
        synced = make_task(freeze_bn=None)
        nn.SyncBatchNorm.convert_sync_batchnorm(synced.network)
        synced._trainer = SimpleNamespace(world_size=world_size)
        synced.on_train_batch_start({"images": torch.zeros(6, 3, 33, 33)}, 0)
        assert synced.bn_frozen is frozen, world_size

    forced = make_task(freeze_bn=False, bn_momentum=0.0003)
    forced.on_train_batch_start({"images": torch.zeros(2, 3, 33, 33)}, 0)
    forced.train()
    assert all(bn.training and bn.momentum == 0.0003 for bn in bn_layers(forced))
    frozen = make_task(freeze_bn=True).train()
    assert all(not bn.training for bn in bn_layers(frozen))


def test_segmentation_defaults_are_tf_deeplabs_recipe() -> None:
    task = segmentation_task()
    assert isinstance(task.optimizer_recipe, SGD) and task.optimizer_recipe.lr == 0.007
    assert task.optimizer_recipe.momentum == 0.9 and task.optimizer_recipe.weight_decay == 4e-5
    assert isinstance(task.lr_schedule, Poly) and task.lr_schedule.power == 0.9 and task.lr_schedule.max_steps is None
    assert "freeze_bn: null" in VOC_CONFIG.read_text()  # the paper config applies TF's BatchNorm rule


def test_summary_of_the_voc_config_is_the_papers_model() -> None:
    network = summary.model_from_config(VOC_CONFIG)  # weights_backbone: imagenet is not downloaded
    counts = summary.count(network, 513)
    assert abs(counts["params"] - 2.11e6) <= 0.1 * 2.11e6  # Table 7: 2.11M
    assert abs(counts["madds"] - 2.75e9) <= 0.1 * 2.75e9  # Table 7: 2.75B
    full = summary.count(DeepLabV3MobileNetV2(aspp="full"), 513)
    assert full["params"] > counts["params"] + 2e6 and full["madds"] > counts["madds"] + 2e9
    synthetic = summary.model_from_config(SYNTHETIC_CONFIG)
    assert sum(p.numel() for p in synthetic.parameters()) == counts["params"]


def test_class_names_come_from_the_data_not_voc() -> None:
    # Without data a task names object labels by number (label 0 is the background): no VOC default.
    untrained = DeepLabV3Segmentation(small_network(4))
    assert untrained.label_names() == ["background", "1", "2", "3"]
    assert untrained.class_names == {}


def synthetic_names_check(task: DenseTask) -> None:
    """The task's names are the synthetic generator's (circle at 1, ...), none of VOC's objects."""
    names = task.label_names()
    assert len(names) == 21
    assert {label: names[label] for label in SYNTHETIC_VOC_CLASS_NAMES} == SYNTHETIC_VOC_CLASS_NAMES
    assert not set(names) & set(VOC_CLASSES[1:])


def test_fit_validate_and_checkpoint_round_trip_through_the_cli(
    synthetic_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # pytest's own arguments are not the CLI's
    small = [
        "--data.root", str(synthetic_voc),
        "--data.crop_size", "65",
        "--data.batch_size", "2",
        "--data.num_workers", "0",
        "--model.network.width_mult", "0.35",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    cli = train_main(["fit", "--config", str(SYNTHETIC_CONFIG), "--trainer.fast_dev_run", "2", *small])
    task = cli.model
    assert isinstance(task, DeepLabV3Segmentation) and isinstance(task.network, DeepLabV3MobileNetV2)
    assert task.hparams.network["init_args"]["width_mult"] == 0.35
    assert task.network.backbone.output_shape()["c5"].channels == MobileNetV2(width_mult=0.35).output_shape()["c5"].channels
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0 and 0.0 <= float(metrics["val/pixel_acc"]) <= 1.0
    assert cli.trainer.global_step == 2
    assert "_instantiator" in task.hparams  # what lets LightningModule.load_from_checkpoint rebuild it
    synthetic_names_check(task)  # the config's data is the synthetic set

    checkpoint = tmp_path / "round_trip.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    images = pixels(1, 3, 49, 57)
    expected = task.eval().network(images)["logits"]
    for loader in (DeepLabV3Segmentation, LightningModule):  # by class, and by the stored class path
        restored = loader.load_from_checkpoint(checkpoint, map_location="cpu")
        assert type(restored) is DeepLabV3Segmentation
        assert restored.hparams.network["init_args"]["width_mult"] == 0.35
        assert torch.allclose(restored.eval().network(images)["logits"], expected, atol=1e-6)
        assert restored.label_names() == task.label_names()  # the names travel in the checkpoint
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
    assert cli.model.hparams.network["init_args"]["width_mult"] == 0.35
    assert 0.0 <= float(cli.trainer.callback_metrics["val/mIoU"]) <= 1.0


def test_a_task_built_in_python_round_trips_through_its_checkpoint(synthetic_voc: Path, tmp_path: Path) -> None:
    # No LightningCLI: the network and recipe are plain objects, recorded as configs by the task.
    # num_classes 21: the synthetic masks use VOC's label space (labels up to 20).
    task = DeepLabV3Segmentation(DeepLabV3MobileNetV2(num_classes=21, width_mult=0.35), optimizer=AdamW(lr=1e-3))
    data = VOCSegmentationDataModule(
        str(synthetic_voc), synthetic=True, train_split="train", crop_size=65, batch_size=2, num_workers=0,
        persistent_workers=False,
    )  # fmt: skip
    trainer = Trainer(
        max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 1
    synthetic_names_check(task)
    checkpoint = tmp_path / "python.ckpt"
    trainer.save_checkpoint(checkpoint)

    torch.manual_seed(0)
    images = pixels(2, 3, 49, 57)
    task.eval()
    with torch.no_grad():
        expected = task.network(images)["logits"]
    reference = task.network.state_dict()
    for restored in (
        DeepLabV3Segmentation.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True),
        load_task(checkpoint),
    ):
        assert type(restored) is DeepLabV3Segmentation and type(restored.network) is DeepLabV3MobileNetV2
        rebuilt = restored.network.init_args  # the head's defaults may be spelled out too
        assert {key: rebuilt[key] for key in task.network.init_args} == task.network.init_args
        assert isinstance(restored.optimizer_recipe, AdamW) and restored.optimizer_recipe.lr == 1e-3
        state = restored.network.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
        restored.eval()
        with torch.no_grad():
            assert torch.equal(restored.network(images)["logits"], expected)
        assert restored.label_names() == task.label_names()
    # The class it names is allow-listed like LightningCLI's record: nothing else is imported.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved[TASK_CLASS_KEY] == "tasks.segmentation.DeepLabV3Segmentation" and "_class_path" not in saved["hyper_parameters"]
    saved[TASK_CLASS_KEY] = "os.system"
    torch.save(saved, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"other.ckpt: refused: the checkpoint names the class 'os.system'"):
        load_task(tmp_path / "other.ckpt")
