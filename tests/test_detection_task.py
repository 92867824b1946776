"""tasks/detection.py: the real CLI and configs, checkpoint round trip, optimiser recipes and schedules
(tasks/optimization.py), linear lr scaling."""

from __future__ import annotations

import csv
import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from backbones import MobileNetV2
from heads.ssdlite import SSDLiteHead, normalised_targets
from tasks.checkpoints import load_task
from tasks.data.coco import COCODetectionDataModule
from tasks.detection import SSDLiteDetection, num_classes_advice
from tasks.networks import SSDLite, SSDLiteMobileNetV2
from tasks.optimization import SGD, AdamW, OptimizerRecipe, RMSProp, WarmupCosine, WarmupExponential, lr_lambda
from tools import summary
from tools.train import main

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
COCO_CONFIG = ROOT / "configs" / "ssdlite_mobilenetv2_coco.yaml"
# The data's image_size follows the network's (tools/train.py links them): set it once.
SMALL = [
    "--model.network.image_size", "128", "--model.network.width_mult", "0.35",
    "--data.num_workers", "0", "--data.batch_size", "4", "--data.eval_batch_size", "4",
]  # fmt: skip


def small_network(num_classes: int = 6, image_size: int = 96) -> SSDLiteMobileNetV2:
    return SSDLiteMobileNetV2(num_classes=num_classes, image_size=image_size, width_mult=0.35)


def pixels(*shape: int) -> Tensor:
    """Random RGB images in 0..255, what the networks take."""
    return torch.rand(*shape) * 255


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI compares its args with sys.argv (pytest's here); run as `python tools/train.py ...`.
    monkeypatch.setattr("sys.argv", ["tools/train.py"])


def test_fit_fast_dev_run_through_the_real_config(synthetic_coco: Path, tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            SYNTHETIC_CONFIG,
            "--data.root",
            str(synthetic_coco),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            *SMALL,
        ]
    )
    assert isinstance(cli.model, SSDLiteDetection) and isinstance(cli.datamodule, COCODetectionDataModule)
    assert isinstance(cli.model.network, SSDLiteMobileNetV2) and cli.model.network.image_size == 128
    assert cli.datamodule.image_size == 128  # taken from the network
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    for key in (
        "train/loss",
        "train/loss_cls",
        "train/loss_box",
        "val/loss",
        "val/AP",
        "val/AP50",
        "val/AP75",
        "val/APs",
        "val/APm",
        "val/APl",
        "val/AR100",
    ):
        assert key in metrics and math.isfinite(metrics[key].item()), key
    assert 0.0 <= metrics["val/AP"].item() <= 1.0
    # The task reads the label space from its DataModule: 5 shapes + background.
    assert cli.model.metrics["val"].label_to_category_id == {1: 1, 2: 3, 3: 7, 4: 12, 5: 44}
    assert cli.model.label_names() == ["background", "circle", "square", "triangle", "cross", "ring"]


def test_checkpoint_round_trip_and_validate_from_it(synthetic_coco: Path, tmp_path: Path) -> None:
    args = [
        "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_coco), *SMALL,
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    cli = main(["fit", *args])
    log_dir = Path(cli.trainer.log_dir)
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and (log_dir / "config.yaml").is_file()
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    assert any(row.get("val/AP") for row in rows) and any(row.get("train/loss") for row in rows)

    hparams = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert "_instantiator" in hparams  # LightningCLI's: class_path arguments re-instantiate
    for loaded in (
        SSDLiteDetection.load_from_checkpoint(checkpoint),
        LightningModule.load_from_checkpoint(checkpoint),
    ):
        assert isinstance(loaded, SSDLiteDetection) and type(loaded.network) is SSDLiteMobileNetV2
        network = loaded.hparams.network
        assert network["class_path"] == "tasks.networks.detector.SSDLiteMobileNetV2"
        assert network["init_args"]["width_mult"] == 0.35 and loaded.num_classes == 6
        assert isinstance(loaded.optimizer_recipe, AdamW) and isinstance(loaded.lr_schedule, WarmupCosine)
        trained = cli.model.state_dict()
        assert all(key.startswith("network.") for key in trained)
        assert trained.keys() == loaded.state_dict().keys()
        assert all(torch.equal(trained[k].cpu(), v) for k, v in loaded.state_dict().items())
    images = pixels(2, 3, 128, 128)
    cli.model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, actual = cli.model(images), loaded(images)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])

    validated = main(["validate", *args, "--ckpt_path", str(checkpoint)])
    assert "val/AP" in validated.trainer.callback_metrics
    tested = main(["test", *args, "--ckpt_path", str(checkpoint)])
    assert "test/AP" in tested.trainer.callback_metrics
    predicted = main(
        ["predict", *args, "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "1"]
    )
    (first,) = predicted.trainer.predict_loop.predictions[:1]
    assert {"image_id", "boxes", "scores", "labels"} <= set(first[0])
    assert len(first[0]["scores"]) <= 100


def test_a_task_built_in_python_round_trips_through_its_checkpoint(synthetic_coco: Path, tmp_path: Path) -> None:
    # No LightningCLI: the network and recipe are plain objects, recorded as configs by the task.
    task = SSDLiteDetection(
        small_network(image_size=128), optimizer=RMSProp(lr=0.01), lr_schedule=WarmupExponential(decay_steps=10)
    )
    data = COCODetectionDataModule(
        str(synthetic_coco), image_size=128, batch_size=4, num_workers=0, persistent_workers=False
    )
    trainer = Trainer(
        max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(task, datamodule=data)
    assert trainer.global_step == 1
    checkpoint = tmp_path / "python.ckpt"
    trainer.save_checkpoint(checkpoint)
    task.eval()
    images = pixels(2, 3, 128, 128)
    with torch.no_grad():
        expected = task.network.detect(images)
    for restored in (
        SSDLiteDetection.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True),
        load_task(checkpoint),
    ):
        assert type(restored.network) is SSDLiteMobileNetV2 and restored.network.image_size == 128
        assert isinstance(restored.optimizer_recipe, RMSProp) and restored.optimizer_recipe.lr == 0.01
        assert restored.lr_schedule.decay_steps == 10
        assert restored.label_to_category_id == {1: 1, 2: 3, 3: 7, 4: 12, 5: 44}
        assert restored.label_names() == task.label_names()
        restored.eval()
        with torch.no_grad():
            actual = restored.network.detect(images)
        for want, got in zip(expected, actual):
            assert all(torch.equal(got[key], want[key]) for key in want)


def test_coco_config_is_the_paper_model() -> None:
    network = summary.model_from_config(COCO_CONFIG)  # what tools/summary.py counts; no download
    assert isinstance(network, SSDLite) and network.image_size == 300
    assert network.head.num_classes == 91
    counts = summary.count(network, 300)
    assert abs(counts["params"] - 4.3e6) <= 0.1 * 4.3e6  # Table 6: 4.3M
    assert abs(counts["madds"] - 0.8e9) <= 0.1 * 0.8e9  # Table 6: 0.8B
    assert network.head.num_anchors((300, 300)) == 1917


def test_the_task_takes_a_network_and_only_training_arguments() -> None:
    # Issue #13: the network's options live in the network; the task keeps the training concerns.
    task_args = set(inspect.signature(SSDLiteDetection.__init__).parameters) - {"self", "network"}
    network_args = set(inspect.signature(SSDLiteMobileNetV2.__init__).parameters)
    network_args |= set(inspect.signature(SSDLiteHead.__init__).parameters)
    assert len(task_args) <= 12 and not task_args & (network_args - {"self"})


def test_a_network_composed_by_hand_trains_but_is_not_saved_as_a_config() -> None:
    backbone = MobileNetV2(width_mult=0.35, out_features=("c4_expand", "final_conv"))
    network = SSDLite(backbone, SSDLiteHead(backbone.output_shape(), num_classes=3, extra_depths=(64, 32, 32, 16)), 96)
    with pytest.warns(UserWarning, match="network SSDLite does not record its arguments"):
        task = SSDLiteDetection(network)
    assert task.network is network and "network" not in task.hparams
    sgd = {"lr": 0.15, "momentum": 0.9, "nesterov": False, "weight_decay": 4e-5}  # the default recipe, recorded
    assert task.hparams.optimizer == {"class_path": "tasks.optimization.SGD", "init_args": sgd}


def _empty_target() -> dict[str, Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "crowd_boxes": torch.zeros(0, 4)}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_on_images_without_objects() -> None:
    torch.manual_seed(0)
    task = SSDLiteDetection(small_network(), box_loss_weight=2.0)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)  # what the DataModules give
    batch = {
        "images": images,
        "targets": [_empty_target(), _empty_target()],
        "image_ids": [1, 2],
        "image_sizes": torch.tensor([[200, 300], [96, 96]]),
    }
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    # The network normalises: the same pixels as floats give the same loss.
    with torch.no_grad():
        assert torch.equal(task.training_step(dict(batch, images=images.float()), 0), loss.detach())
    # Targets are pixels of the input; the loss is loss_cls + box_loss_weight x loss_box.
    box = {"boxes": torch.tensor([[9.6, 19.2, 48.0, 96.0]]), "labels": torch.tensor([2])}
    assert normalised_targets([box], (96, 96))[0]["boxes"][0].tolist() == pytest.approx([0.1, 0.2, 0.5, 1.0])
    assert normalised_targets([box], (192, 96))[0]["boxes"][0].tolist() == pytest.approx([0.1, 0.1, 0.5, 0.5])
    batch["targets"][0] = box
    with torch.no_grad():
        total = task.training_step(batch, 0)
        losses = task.network.loss(task.network(images), batch["targets"], (96, 96))
    assert losses["loss_box"] > 0
    assert total.item() == pytest.approx((losses["loss_cls"] + 2.0 * losses["loss_box"]).item(), rel=1e-6)


def _trainer_stub(total_steps: float, **attributes: object):
    return type("Trainer", (), {"estimated_stepping_batches": total_steps, **attributes})()


@pytest.mark.parametrize(
    ("recipe", "torch_class", "settings"),
    [
        (SGD(lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-4), torch.optim.SGD,
         {"momentum": 0.8, "nesterov": True}),
        (RMSProp(lr=0.2, alpha=0.8, eps=0.5, momentum=0.7, weight_decay=1e-4), torch.optim.RMSprop,
         {"alpha": 0.8, "eps": 0.5, "momentum": 0.7}),
        (AdamW(lr=0.2, weight_decay=1e-4), torch.optim.AdamW, {"betas": (0.9, 0.999)}),
    ],
    ids=["sgd", "rmsprop", "adamw"],
)  # fmt: skip
def test_optimizer_recipes_decay_weights_only(recipe: OptimizerRecipe, torch_class: type, settings: dict) -> None:
    task = SSDLiteDetection(small_network(), optimizer=recipe, lr_schedule=WarmupCosine(warmup_steps=0))
    task._trainer = _trainer_stub(100)
    config = task.configure_optimizers()
    opt = config["optimizer"]
    assert type(opt) is torch_class and config["lr_scheduler"]["interval"] == "step"
    assert {key: opt.defaults[key] for key in settings} == settings
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [decay["lr"], no_decay["lr"]] == pytest.approx([0.2, 0.2])
    network = task.network
    bn_and_bias = {id(p) for m in network.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    bn_and_bias |= {id(m.bias) for m in network.modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    conv_weights = {id(m.weight) for m in network.modules() if isinstance(m, nn.Conv2d)}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert {id(p) for p in decay["params"]} == conv_weights
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))


def test_frozen_parameters_are_not_given_to_the_optimizer() -> None:
    network = SSDLiteMobileNetV2(num_classes=6, width_mult=0.35, frozen_stages=2)
    task = SSDLiteDetection(network, freeze_bn=True)
    task._trainer = _trainer_stub(100)
    groups = task.configure_optimizers()["optimizer"].param_groups
    optimised = [id(p) for group in groups for p in group["params"]]
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert len(optimised) == len(set(optimised)) and set(optimised) == trainable
    batch_norms = [m for m in network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and not any(id(p) in trainable for m in batch_norms for p in m.parameters())
    assert not any(p.requires_grad for p in network.backbone.stem.parameters())
    assert trainable and len(trainable) < len(list(task.parameters()))


def test_schedule_factors_by_hand() -> None:
    cosine = WarmupCosine(warmup_steps=10, warmup_factor=0.001)
    assert cosine.needs_total_steps
    assert cosine(0, 110) == pytest.approx(0.001)
    assert cosine(5, 110) == pytest.approx(0.001 + 0.999 * 0.5)
    assert cosine(10, 110) == pytest.approx(1.0)
    assert cosine(60, 110) == pytest.approx(0.5)  # half-way through the cosine
    assert cosine(110, 110) == pytest.approx(0.0, abs=1e-12)
    assert cosine(150, 110) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at the floor
    floor = WarmupCosine(warmup_steps=10, warmup_factor=0.1, min_lr_ratio=0.1)
    assert floor(60, 110) == pytest.approx(0.1 + 0.9 * 0.5) and floor(110, 110) == pytest.approx(0.1)
    exponential = WarmupExponential(decay_rate=0.95, decay_steps=100, warmup_steps=0, warmup_factor=1.0)
    assert not exponential.needs_total_steps
    assert [exponential(s, 0) for s in (0, 99, 100, 250)] == pytest.approx([1.0, 1.0, 0.95, 0.95**2])
    constant = WarmupExponential(decay_rate=1.0, warmup_steps=4, warmup_factor=0.5)  # the old "constant"
    assert [constant(s, 0) for s in (0, 2, 4, 1000)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    both = WarmupExponential(decay_rate=0.5, decay_steps=10, warmup_steps=4, warmup_factor=0.5)
    assert [both(s, 0) for s in (2, 9, 10, 25)] == pytest.approx([0.75, 1.0, 0.5, 0.25])
    # LambdaLR's function: the run's length given once; a schedule that needs it needs a finite run.
    assert lr_lambda(cosine, 110)(60) == pytest.approx(0.5)
    assert lr_lambda(exponential, float("inf"))(100) == pytest.approx(0.95)
    with pytest.raises(ValueError, match="WarmupCosine schedule needs a finite run"):
        lr_lambda(cosine, float("inf"))
    with pytest.raises(ValueError, match="needs at least 1 step, got 0"):
        lr_lambda(cosine, 0)


def test_the_task_steps_the_schedule_every_optimizer_step() -> None:
    schedule = WarmupCosine(warmup_steps=10, warmup_factor=0.001)
    task = SSDLiteDetection(small_network(), optimizer=SGD(lr=0.2), lr_schedule=schedule)
    task._trainer = _trainer_stub(110)
    config = task.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(111):
        rates += [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.2 * schedule(step // 2, 110) for step in range(2 * 111)], abs=1e-12)
    assert rates[0] == pytest.approx(0.2 * 0.001) and rates[2 * 60] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="finite run"):
        task._trainer = _trainer_stub(float("inf"))
        task.configure_optimizers()


def test_num_classes_must_cover_the_data(synthetic_coco: Path, tmp_path: Path) -> None:
    # The synthetic categories have ids 1, 3, 7, 12, 44: as labels they need 45 logits; numbered
    # 1..5 they need 6. The refusal names both ways out, each a pair that works.
    args = ["fit", "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_coco), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path), *SMALL, "--data.contiguous_labels", "false"]  # fmt: skip
    with pytest.raises(ValueError) as refused:
        main(args)
    message = str(refused.value)
    assert "--data.contiguous_labels true --model.network.num_classes 6" in message
    assert "--model.network.num_classes 45" in message and "39 ids without a category are masked out" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"; set --model.network.num_classes 6$"):
        main([*args[:-2], "--model.network.num_classes", "4"])  # contiguous labels: one answer


def test_category_ids_as_labels_train_and_validate_without_unused_ids(synthetic_coco: Path, tmp_path: Path) -> None:
    # The id-slot mode the refusal above suggests (what the 91-logit COCO config does): the
    # slots without a category are masked, so validation never meets a label it cannot map.
    cli = main(
        ["fit", "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_coco), "--trainer.fast_dev_run", "1",
         "--trainer.default_root_dir", str(tmp_path), *SMALL, "--data.contiguous_labels", "false",
         "--model.network.num_classes", "45"]
    )  # fmt: skip
    head = cli.model.network.head
    assert head.valid_labels.nonzero().flatten().tolist() == [0, 1, 3, 7, 12, 44]
    assert cli.model.metrics["val"].label_to_category_id == {1: 1, 3: 3, 7: 7, 12: 12, 44: 44}
    assert math.isfinite(cli.trainer.callback_metrics["val/AP"].item())
    cli.model.eval()
    detections = cli.model.network.detect(pixels(2, 3, 128, 128))
    labels = torch.cat([d["labels"] for d in detections])
    assert len(labels) > 0 and set(labels.tolist()) <= {1, 3, 7, 12, 44}


def test_checkpoint_without_the_label_mask_still_loads(detection_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(detection_checkpoint, weights_only=True)
    assert checkpoint["state_dict"]["network.head.valid_labels"].all()  # 5 contiguous labels + background
    del checkpoint["state_dict"]["network.head.valid_labels"]  # as written before the mask existed
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    loaded = SSDLiteDetection.load_from_checkpoint(old, weights_only=True)
    assert loaded.network.head.valid_labels.tolist() == [True] * 6


def test_num_classes_advice_by_hand() -> None:
    contiguous = num_classes_advice(6, 4, {1: 1, 2: 3, 3: 7, 4: 12, 5: 44})
    assert contiguous.endswith("; set --model.network.num_classes 6")
    ids = num_classes_advice(91, 45, {i: i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}})
    assert "--data.contiguous_labels true --model.network.num_classes 81" in ids
    assert "--model.network.num_classes 91 (the 10 ids" in ids


# ------------------------------------------------------------------------------ lr scaling
class _Data:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size


def _scaled_task(**options: object) -> SSDLiteDetection:
    schedule = WarmupCosine(warmup_steps=0)
    return SSDLiteDetection(small_network(), optimizer=SGD(lr=0.15), lr_schedule=schedule, **options)


@pytest.mark.parametrize(
    ("batch_size", "world_size", "accumulate", "expected"),
    [(24, 8, 1, 0.15), (24, 1, 1, 0.15 / 8), (4, 2, 3, 0.15 * 24 / 192), (48, 8, 1, 0.3)],
)
def test_lr_scales_with_the_effective_batch(
    batch_size: int, world_size: int, accumulate: int, expected: float, caplog: pytest.LogCaptureFixture
) -> None:
    task = _scaled_task(lr_reference_batch=192)
    task._trainer = _trainer_stub(
        100, datamodule=_Data(batch_size), world_size=world_size, accumulate_grad_batches=accumulate
    )
    with caplog.at_level("INFO"):
        optimizer = task.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2)
    effective = batch_size * world_size * accumulate
    assert f"learning rate {expected:g} = lr 0.15 x effective batch {effective}" in caplog.text


def test_lr_is_unscaled_without_a_reference_or_a_batch_size() -> None:
    task = _scaled_task()
    task._trainer = _trainer_stub(100, datamodule=_Data(4), world_size=2, accumulate_grad_batches=1)
    assert task.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.15)
    task = _scaled_task(lr_reference_batch=192)
    task._trainer = _trainer_stub(100, datamodule=None, world_size=8, accumulate_grad_batches=1)
    with pytest.warns(UserWarning, match="no DataModule with a batch_size"):
        optimizer = task.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.15)


def test_configs_state_the_batch_their_lr_is_for() -> None:
    coco = yaml.safe_load(COCO_CONFIG.read_text())["model"]["init_args"]
    assert coco["optimizer"] == {"class_path": "tasks.optimization.SGD",
                                 "init_args": {"lr": 0.15, "momentum": 0.9, "weight_decay": 4e-5}}  # fmt: skip
    assert coco["lr_reference_batch"] == 192
    synthetic = yaml.safe_load(Path(SYNTHETIC_CONFIG).read_text())
    # The synthetic recipe was tuned at its own batch: at that batch nothing is rescaled.
    assert synthetic["model"]["init_args"]["lr_reference_batch"] == synthetic["data"]["init_args"]["batch_size"]
