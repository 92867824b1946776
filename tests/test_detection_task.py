"""tasks/detection.py: the real CLI and configs, checkpoint round trip, optimiser and schedule."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from torch import nn

from tasks.data.coco import COCODetectionDataModule
from tasks.detection import SSDLite, SSDLiteDetection, WarmupSchedule, num_classes_advice
from tools import summary
from tools.train import main

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
COCO_CONFIG = ROOT / "configs" / "ssdlite_mobilenetv2_coco.yaml"
SMALL = [
    "--data.image_size", "128", "--model.image_size", "128", "--model.width_mult", "0.35",
    "--data.num_workers", "0", "--data.batch_size", "4", "--data.eval_batch_size", "4",
]  # fmt: skip


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
    assert cli.model.val_map.label_to_category_id == {1: 1, 2: 3, 3: 7, 4: 12, 5: 44}


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
        assert isinstance(loaded, SSDLiteDetection)
        assert loaded.hparams.width_mult == 0.35 and loaded.hparams.num_classes == 6
        trained = cli.model.state_dict()
        assert all(torch.equal(trained[k].cpu(), v) for k, v in loaded.state_dict().items())
    images = torch.randn(2, 3, 128, 128)
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


def test_coco_config_is_the_paper_model() -> None:
    network = summary.model_from_config(COCO_CONFIG)  # what tools/summary.py counts; no download
    assert isinstance(network, SSDLite)
    assert network.head.num_classes == 91
    counts = summary.count(network, 300)
    assert abs(counts["params"] - 4.3e6) <= 0.1 * 4.3e6  # Table 6: 4.3M
    assert abs(counts["madds"] - 0.8e9) <= 0.1 * 0.8e9  # Table 6: 0.8B
    assert network.head.num_anchors((300, 300)) == 1917


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_on_images_without_objects() -> None:
    task = SSDLiteDetection(num_classes=6, image_size=96, width_mult=0.35)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "crowd_boxes": torch.zeros(0, 4),
    }
    batch = {
        "images": torch.randn(2, 3, 96, 96),
        "targets": [empty, empty],
        "image_ids": torch.tensor([1, 2]),
        "orig_sizes": torch.tensor([[200, 300], [96, 96]]),
    }
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    with pytest.raises(TypeError, match="normalised floats"):
        task.training_step(dict(batch, images=torch.zeros(2, 3, 96, 96, dtype=torch.uint8)), 0)
    # Pixel boxes become fractions of the input for the head.
    batch["targets"][0] = {"boxes": torch.tensor([[9.6, 19.2, 48.0, 96.0]]), "labels": torch.tensor([2])}
    assert task.normalised_targets(batch)[0]["boxes"][0].tolist() == pytest.approx([0.1, 0.2, 0.5, 1.0])


def _trainer_stub(total_steps: int, **attributes: object):
    return type("Trainer", (), {"estimated_stepping_batches": total_steps, **attributes})()


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw"])
def test_optimizer_excludes_batchnorm_and_biases_from_weight_decay(optimizer: str) -> None:
    task = SSDLiteDetection(num_classes=6, width_mult=0.35, optimizer=optimizer, lr=0.2, weight_decay=4e-5)
    task._trainer = _trainer_stub(100)
    config = task.configure_optimizers()
    opt = config["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    bn_and_bias = {id(p) for m in task.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    bn_and_bias |= {id(m.bias) for m in task.modules() if isinstance(m, nn.Conv2d) and m.bias is not None}
    conv_weights = {id(m.weight) for m in task.modules() if isinstance(m, nn.Conv2d)}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias
    assert {id(p) for p in decay["params"]} == conv_weights
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"
    expected_type = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[
        optimizer
    ]
    assert isinstance(opt, expected_type)
    if optimizer == "rmsprop":
        assert opt.defaults["alpha"] == 0.9 and opt.defaults["eps"] == 1.0 and opt.defaults["momentum"] == 0.9


def test_warmup_and_schedules_by_hand() -> None:
    cosine = WarmupSchedule("cosine", total_steps=110, warmup_steps=10, warmup_factor=0.001)
    assert cosine(0) == pytest.approx(0.001)
    assert cosine(5) == pytest.approx(0.001 + 0.999 * 0.5)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.5)  # half-way through the cosine
    assert cosine(110) == pytest.approx(0.0, abs=1e-12)
    floor = WarmupSchedule("cosine", total_steps=110, warmup_steps=10, warmup_factor=0.1, min_lr_ratio=0.1)
    assert floor(110) == pytest.approx(0.1)
    exponential = WarmupSchedule(
        "exponential", total_steps=0, warmup_steps=0, warmup_factor=1.0, decay_rate=0.95, decay_steps=100
    )
    assert [exponential(s) for s in (0, 99, 100, 250)] == pytest.approx([1.0, 1.0, 0.95, 0.95**2])
    constant = WarmupSchedule("constant", total_steps=0, warmup_steps=4, warmup_factor=0.5)
    assert [constant(s) for s in (0, 2, 4, 1000)] == pytest.approx([0.5, 0.75, 1.0, 1.0])
    task = SSDLiteDetection(num_classes=6, width_mult=0.35, lr=0.2, warmup_steps=10, warmup_factor=0.001)
    task._trainer = _trainer_stub(110)
    config = task.configure_optimizers()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.2 * 0.001)
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
    assert "--data.contiguous_labels true --model.num_classes 6" in message
    assert "--model.num_classes 45" in message and "39 ids without a category are masked out" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"; set --model.num_classes 6$"):
        main([*args[:-2], "--model.num_classes", "4"])  # contiguous labels: one answer


def test_category_ids_as_labels_train_and_validate_without_unused_ids(synthetic_coco: Path, tmp_path: Path) -> None:
    # The id-slot mode the refusal above suggests (what the 91-logit COCO config does): the
    # slots without a category are masked, so validation never meets a label it cannot map.
    cli = main(
        ["fit", "--config", SYNTHETIC_CONFIG, "--data.root", str(synthetic_coco), "--trainer.fast_dev_run", "1",
         "--trainer.default_root_dir", str(tmp_path), *SMALL, "--data.contiguous_labels", "false",
         "--model.num_classes", "45"]
    )  # fmt: skip
    head = cli.model.model.head
    assert head.valid_labels.nonzero().flatten().tolist() == [0, 1, 3, 7, 12, 44]
    assert cli.model.val_map.label_to_category_id == {1: 1, 3: 3, 7: 7, 12: 12, 44: 44}
    assert math.isfinite(cli.trainer.callback_metrics["val/AP"].item())
    head.eval()
    with torch.no_grad():
        detections = cli.model.model.detect(torch.randn(2, 3, 128, 128))
    labels = torch.cat([d["labels"] for d in detections])
    assert len(labels) > 0 and set(labels.tolist()) <= {1, 3, 7, 12, 44}


def test_checkpoint_without_the_label_mask_still_loads(detection_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(detection_checkpoint, weights_only=True)
    assert checkpoint["state_dict"]["model.head.valid_labels"].all()  # 5 contiguous labels + background
    del checkpoint["state_dict"]["model.head.valid_labels"]  # as written before the mask existed
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    loaded = SSDLiteDetection.load_from_checkpoint(old)
    assert loaded.model.head.valid_labels.tolist() == [True] * 6


def test_num_classes_advice_by_hand() -> None:
    contiguous = num_classes_advice(6, 4, {1: 1, 2: 3, 3: 7, 4: 12, 5: 44})
    assert contiguous.endswith("; set --model.num_classes 6")
    ids = num_classes_advice(91, 45, {i: i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}})
    assert "--data.contiguous_labels true --model.num_classes 81" in ids and "--model.num_classes 91 (the 10 ids" in ids


# ------------------------------------------------------------------------------ lr scaling
class _Data:
    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size


@pytest.mark.parametrize(
    ("batch_size", "world_size", "accumulate", "expected"),
    [(24, 8, 1, 0.15), (24, 1, 1, 0.15 / 8), (4, 2, 3, 0.15 * 24 / 192), (48, 8, 1, 0.3)],
)
def test_lr_scales_with_the_effective_batch(
    batch_size: int, world_size: int, accumulate: int, expected: float, caplog: pytest.LogCaptureFixture
) -> None:
    task = SSDLiteDetection(num_classes=6, width_mult=0.35, lr=0.15, lr_reference_batch=192, warmup_steps=0)
    task._trainer = _trainer_stub(
        100, datamodule=_Data(batch_size), world_size=world_size, accumulate_grad_batches=accumulate
    )
    with caplog.at_level("INFO"):
        optimizer = task.configure_optimizers()["optimizer"]
    assert [group["initial_lr"] for group in optimizer.param_groups] == pytest.approx([expected] * 2)
    effective = batch_size * world_size * accumulate
    assert f"learning rate {expected:g} = lr 0.15 x effective batch {effective}" in caplog.text


def test_lr_is_unscaled_without_a_reference_or_a_batch_size() -> None:
    task = SSDLiteDetection(num_classes=6, width_mult=0.35, lr=0.15, warmup_steps=0)
    task._trainer = _trainer_stub(100, datamodule=_Data(4), world_size=2, accumulate_grad_batches=1)
    assert task.configure_optimizers()["optimizer"].param_groups[0]["initial_lr"] == pytest.approx(0.15)
    task = SSDLiteDetection(num_classes=6, width_mult=0.35, lr=0.15, lr_reference_batch=192, warmup_steps=0)
    task._trainer = _trainer_stub(100, datamodule=None, world_size=8, accumulate_grad_batches=1)
    with pytest.warns(UserWarning, match="no DataModule with a batch_size"):
        optimizer = task.configure_optimizers()["optimizer"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.15)


def test_configs_state_the_batch_their_lr_is_for() -> None:
    coco = yaml.safe_load(COCO_CONFIG.read_text())
    assert coco["model"]["init_args"]["lr"] == 0.15 and coco["model"]["init_args"]["lr_reference_batch"] == 192
    synthetic = yaml.safe_load(Path(SYNTHETIC_CONFIG).read_text())
    # The synthetic recipe was tuned at its own batch: at that batch nothing is rescaled.
    assert synthetic["model"]["init_args"]["lr_reference_batch"] == synthetic["data"]["init_args"]["batch_size"]
