"""tasks/networks: plain modules (no Lightning), normalisation inside, one box frame, configs and
checkpoints written before the networks were given to the tasks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import box_iou

from heads.anchors import DefaultBoxes
from heads.deeplabv3 import upsample_logits
from tasks.buildable import build, config_of
from tasks.networks import DeepLabV3MobileNetV2, Segmenter, SSDLite, SSDLiteMobileNetV2

ROOT = Path(__file__).resolve().parents[1]
DET_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
# ImageNet's statistics (torchvision, RGB, 0-1), written out here so a wrong constant in the
# package is caught rather than copied.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_networks_import_no_lightning() -> None:
    code = "import tasks.networks, sys; assert not any(m.startswith('lightning') for m in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ normalisation
def _detector() -> SSDLite:
    return SSDLiteMobileNetV2(num_classes=4, image_size=96, width_mult=0.35)


def _segmenter() -> Segmenter:
    return DeepLabV3MobileNetV2(num_classes=5, width_mult=0.35)


def _detector_by_hand(network: SSDLite, normalised: Tensor) -> dict[str, Tensor]:
    return network.head(network.backbone(normalised))


def _segmenter_by_hand(network: Segmenter, normalised: Tensor) -> dict[str, Tensor]:
    outputs = network.head(network.backbone(normalised))
    return {"logits": upsample_logits(outputs["logits"], normalised.shape[-2:])}


@pytest.mark.parametrize(
    ("make", "by_hand"),
    [(_detector, _detector_by_hand), (_segmenter, _segmenter_by_hand)],
    ids=["detector", "segmenter"],
)
def test_networks_normalise_pixels_themselves(make: Callable[[], nn.Module], by_hand: Callable) -> None:
    torch.manual_seed(0)
    network = make().eval()
    images = torch.randint(0, 256, (2, 3, 96, 112), dtype=torch.uint8)
    pixels = images.float()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    # (x / 255 - mean) / std, the textbook form, and the same with the 255 moved into the
    # constants (one rounding fewer per pixel): equal to float32 rounding.
    textbook = (pixels / 255 - mean) / std
    scaled = (pixels - mean * 255) / (std * 255)
    torch.testing.assert_close(scaled, textbook, rtol=0, atol=1e-6)
    with torch.no_grad():
        from_uint8, from_float = network(images), network(pixels)
        expected = by_hand(network, scaled)
    assert set(from_uint8) == set(expected)
    for key in expected:
        assert torch.equal(from_uint8[key], from_float[key]), key
        assert torch.equal(from_uint8[key], expected[key]), key
    # Constants, not weights: checkpoints hold no normalisation.
    assert not any("normalize" in key for key in network.state_dict())


def test_normalize_refuses_images_that_are_not_rgb_batches() -> None:
    network = _detector().eval()
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\[3, 96, 96\]"):
        network(torch.zeros(3, 96, 96, dtype=torch.uint8))


# ------------------------------------------------------------------------------ one box frame
def _apart(detections: dict[str, Tensor], count: int) -> dict[str, Tensor]:
    """The first ``count`` detections that overlap none before them (IoU < 0.3): targets that
    cannot take each other's anchors."""
    keep: list[int] = []
    for index, box in enumerate(detections["boxes"]):
        if not keep or box_iou(box[None], detections["boxes"][keep]).max() < 0.3:
            keep.append(index)
    assert len(keep) >= count
    return {"boxes": detections["boxes"][keep[:count]], "labels": detections["labels"][keep[:count]]}


def test_loss_takes_the_frame_postprocess_answers_in(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    network = SSDLiteMobileNetV2(num_classes=4, image_size=128, width_mult=0.35).eval()
    height, width = 96, 160  # not square: a swapped height and width would show
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    detections = network.detect(images)  # absolute xyxy pixels of the input
    targets = [_apart(d, 3) for d in detections]
    targets[0]["crowd_boxes"] = detections[0]["boxes"][-1:]
    with torch.no_grad():
        outputs = network(images)

    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    match = network.head.match

    def recorded_match(*args: object) -> tuple[Tensor, Tensor, Tensor]:  # what the loss matched
        seen.append(match(*args))
        return seen[-1]

    monkeypatch.setattr(network.head, "match", recorded_match)
    losses = network.loss(outputs, targets, (height, width))
    assert len(seen) == 1 and all(torch.isfinite(value) for value in losses.values())

    # The head's own matching on the targets normalised by hand: fractions of width and height.
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    normalised = [{key: value / scale if "boxes" in key else value for key, value in t.items()} for t in targets]
    labels, boxes, ignore = match(outputs, normalised)
    assert torch.equal(seen[0][0], labels) and torch.equal(seen[0][1], boxes) and torch.equal(seen[0][2], ignore)
    # Every target found its anchors (each detection was decoded from one), under its label,
    # and the crowd region ignores anchors of the first image only.
    for image, target in enumerate(targets):
        positive = labels[image] > 0
        assert set(labels[image][positive].tolist()) == set(target["labels"].tolist())
        matched = (boxes[image][positive] * scale).unique(dim=0)
        torch.testing.assert_close(matched, target["boxes"].unique(dim=0))
    assert ignore[0].any() and not ignore[1].any()

    # The same boxes in a picture twice as wide and half as high: the same loss, bit for bit.
    stretch = torch.tensor([2.0, 0.5, 2.0, 0.5])
    stretched = [{key: value * stretch if "boxes" in key else value for key, value in t.items()} for t in targets]
    again = network.loss(outputs, stretched, (height // 2, width * 2))
    assert all(torch.equal(again[key], losses[key]) for key in losses)
    # ... and not with the size of another picture.
    other = network.loss(outputs, stretched, (height, width))
    assert not torch.equal(other["loss_box"], losses["loss_box"])


def test_detect_reports_boxes_in_the_sizes_asked_for() -> None:
    torch.manual_seed(0)
    network = SSDLiteMobileNetV2(num_classes=4, image_size=128, width_mult=0.35).eval()
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    (own,) = network.detect(images)
    (original,) = network.detect(images, image_sizes=[(256, 384)])  # the picture it was resized from
    assert len(own["boxes"]) > 0
    torch.testing.assert_close(original["boxes"], own["boxes"] * torch.tensor([3.0, 2.0, 3.0, 2.0]))
    assert torch.equal(original["scores"], own["scores"]) and torch.equal(original["labels"], own["labels"])


# ------------------------------------------------------------------------------ configs
def _small_detector() -> nn.Module:
    return SSDLiteMobileNetV2(
        num_classes=5, image_size=96, width_mult=0.35, extra_depths=(256, 128, 128, 64),
        default_boxes=DefaultBoxes(min_scale=0.15, max_scale=0.9, aspect_ratios=(1.0, 2.0, 0.5)),
        loss_type="focal", nms_threshold=0.45, detections_per_image=50,
    )  # fmt: skip


def _small_segmenter() -> nn.Module:
    return DeepLabV3MobileNetV2(
        num_classes=7, width_mult=0.35, aux_loss=True, channels=64, atrous_rates=(3, 6, 9), aspp="full"
    )


@pytest.mark.parametrize(
    ("make", "base"), [(_small_detector, SSDLite), (_small_segmenter, Segmenter)], ids=["detector", "segmenter"]
)
def test_config_round_trip_rebuilds_the_same_network(make: Callable[[], nn.Module], base: type) -> None:
    torch.manual_seed(0)
    network = make().eval()
    config = config_of(network)
    assert config["class_path"] == f"{type(network).__module__}.{type(network).__name__}"
    # Plain data: what a YAML file and a weights-only checkpoint can hold (tuples become lists).
    saved = yaml.safe_load(yaml.safe_dump(config))
    assert saved == config
    torch.manual_seed(1)  # other initial weights: only load_state_dict makes them equal
    rebuilt = build(saved, base).eval()
    assert type(rebuilt) is type(network)
    # The options given, each as given (the rebuilt one also lists the head's defaults).
    again = config_of(rebuilt)["init_args"]
    assert {key: again[key] for key in config["init_args"]} == config["init_args"]
    shapes = {key: value.shape for key, value in network.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(network.state_dict())
    images = torch.randint(0, 256, (2, 3, 97, 97), dtype=torch.uint8)
    with torch.no_grad():
        expected, actual = network(images), rebuilt(images)
    assert set(actual) == set(expected) and all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"class_path": "os.system", "init_args": {"command": "touch /tmp/never"}}, "'os.system'"),
        ({"class_path": "builtins.eval", "init_args": {}}, "'builtins.eval'"),
        ({"class_path": "this.Zen", "init_args": {}}, "'this.Zen'"),  # importing `this` prints: it must not happen
        (
            {"class_path": "tasks.networks.SSDLiteMobileNetV2",
             "init_args": {"num_classes": 3, "default_boxes": {"class_path": "builtins.exec", "init_args": {}}}},
            "'builtins.exec'",
        ),  # fmt: skip
    ],
    ids=["os.system", "builtins.eval", "unimported-module", "nested"],
)
def test_configs_naming_classes_outside_the_project_are_refused(config: dict, named: str) -> None:
    already = "this" in sys.modules
    with pytest.raises(ValueError) as refused:
        build(config, SSDLite, source="runs/x/config.yaml")
    message = str(refused.value)
    assert message.startswith("runs/x/config.yaml: refused") and named in message and "\n" not in message
    assert already or "this" not in sys.modules


def test_a_config_of_another_kind_of_network_is_refused() -> None:
    config = config_of(DeepLabV3MobileNetV2(num_classes=3, width_mult=0.35))
    wrong_kind = r"^saved network: tasks\.networks\.segmenter\.DeepLabV3MobileNetV2 is not a SSDLite$"
    with pytest.raises(ValueError, match=wrong_kind):
        build(config, SSDLite, source="saved network")
    misspelt = {"class_path": "tasks.networks.SSDLiteMobileNetV2", "init_args": {"num_clases": 3}}
    with pytest.raises(ValueError, match="saved network: .*cannot be built from its saved arguments"):
        build(misspelt, SSDLite, source="saved network")


# ------------------------------------------------------------------------------ old checkpoints
# The hyper-parameters the SSDLiteDetection of December 2026 saved (every network option flat),
# as checked against a checkpoint that code wrote.
LEGACY_DETECTION_KEYS = {
    "num_classes", "image_size", "width_mult", "weights_backbone", "frozen_stages", "freeze_bn", "extra_depths",
    "min_depth", "min_scale", "max_scale", "aspect_ratios", "interpolated_scale_aspect_ratio",
    "reduce_boxes_in_lowest_layer", "box_coder_weights", "iou_threshold", "loss_type", "neg_pos_ratio",
    "min_negatives_per_image", "focal_alpha", "focal_gamma", "box_loss_weight", "score_threshold", "nms_threshold",
    "topk_candidates", "detections_per_image", "optimizer", "lr", "lr_reference_batch", "momentum", "nesterov",
    "weight_decay", "rmsprop_alpha", "rmsprop_eps", "lr_schedule", "warmup_steps", "warmup_factor", "min_lr_ratio",
    "lr_decay_rate", "lr_decay_steps", "eval_backend", "channels_last", "_class_path", "_instantiator",
}  # fmt: skip
# Head options away from their defaults (none changes a parameter's shape), so a conversion that
# dropped one would change the detections.
CHANGED_HEAD_OPTIONS = {
    "box_coder_weights": [5.0, 5.0, 2.0, 2.0], "score_threshold": 0.05, "nms_threshold": 0.4,
    "detections_per_image": 20, "topk_candidates": 300,
}  # fmt: skip
CHANGED_DEFAULT_BOXES = {"min_scale": 0.15, "max_scale": 0.9}


def _legacy_hyper_parameters(new: dict) -> dict:
    """``new``'s hyper-parameters as the old SSDLiteDetection saved them."""
    network = new["network"]["init_args"]
    boxes = network["default_boxes"]
    optimizer, schedule = new["optimizer"], new["lr_schedule"]
    assert optimizer["class_path"] == "tasks.optimization.AdamW"
    assert schedule["class_path"] == "tasks.optimization.WarmupCosine"
    legacy = {
        "_class_path": new["_class_path"],
        **{key: network[key] for key in ("num_classes", "image_size", "width_mult")},
        "weights_backbone": new["weights_backbone"],
        "frozen_stages": network.get("frozen_stages", 0),
        "freeze_bn": new["freeze_bn"],
        "extra_depths": network["extra_depths"],
        "min_depth": network.get("min_depth", 16),
        **{key: boxes[key] for key in ("min_scale", "max_scale", "aspect_ratios", "interpolated_scale_aspect_ratio",
                                       "reduce_boxes_in_lowest_layer")},
        **{key: network[key] for key in ("box_coder_weights", "iou_threshold", "loss_type", "neg_pos_ratio",
                                         "min_negatives_per_image")},
        "focal_alpha": network.get("focal_alpha", 0.25),
        "focal_gamma": network.get("focal_gamma", 2.0),
        "box_loss_weight": new["box_loss_weight"],
        **{key: network[key] for key in ("score_threshold", "nms_threshold", "topk_candidates",
                                         "detections_per_image")},
        "optimizer": "adamw",
        "lr": optimizer["init_args"]["lr"],
        "lr_reference_batch": new["lr_reference_batch"],
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": optimizer["init_args"]["weight_decay"],
        "rmsprop_alpha": 0.9,
        "rmsprop_eps": 1.0,
        "lr_schedule": "cosine",
        **{key: schedule["init_args"][key] for key in ("warmup_steps", "warmup_factor", "min_lr_ratio")},
        "lr_decay_rate": 0.95,
        "lr_decay_steps": 800720,
        "eval_backend": new["eval_backend"],
        "channels_last": new["channels_last"],
        "_instantiator": new["_instantiator"],
    }  # fmt: skip
    assert set(legacy) == LEGACY_DETECTION_KEYS
    return legacy


@pytest.fixture(scope="module")
def new_and_legacy(detection_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint of today's layout with head options off their defaults, and the same
    checkpoint written by hand in the layout of December 2026."""
    folder = tmp_path_factory.mktemp("legacy")
    checkpoint = torch.load(detection_checkpoint, weights_only=True)
    network = checkpoint["hyper_parameters"]["network"]["init_args"]
    network.update(CHANGED_HEAD_OPTIONS)
    network["backbone_init"] = "kaiming"  # the legacy layout predates the option: its default then
    network["default_boxes"] = {**network["default_boxes"], **CHANGED_DEFAULT_BOXES}
    torch.save(checkpoint, folder / "new.ckpt")
    legacy = dict(checkpoint)
    legacy["hyper_parameters"] = _legacy_hyper_parameters(checkpoint["hyper_parameters"])
    assert all(key.startswith("network.") for key in checkpoint["state_dict"])
    legacy["state_dict"] = {"model." + key[len("network."):]: value for key, value in checkpoint["state_dict"].items()}
    torch.save(legacy, folder / "legacy.ckpt")
    return folder / "new.ckpt", folder / "legacy.ckpt"


def _val_images(root: Path) -> list[np.ndarray]:
    paths = sorted((root / "val2017").glob("*.jpg"))[:4]
    assert paths
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def test_legacy_checkpoints_load_as_they_predicted(new_and_legacy: tuple[Path, Path], synthetic_coco: Path) -> None:
    from tasks.checkpoints import load_task
    from tasks.detection import SSDLiteDetection

    new_path, legacy_path = new_and_legacy
    new, legacy = load_task(new_path, SSDLiteDetection), load_task(legacy_path, SSDLiteDetection)
    for name in ("network", "optimizer", "lr_schedule", "lr_reference_batch", "box_loss_weight", "freeze_bn"):
        assert legacy.hparams[name] == new.hparams[name], name
    head = legacy.network.head
    assert (head.nms_threshold, head.detections_per_image, head.box_coder_weights) == (0.4, 20, (5.0, 5.0, 2.0, 2.0))
    assert legacy.class_names == new.class_names and legacy.label_to_category_id == new.label_to_category_id
    state = new.state_dict()
    assert legacy.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in legacy.state_dict().items())

    images = _val_images(synthetic_coco)
    expected, actual = new.predict_images(images), legacy.predict_images(images)
    assert sum(len(d["scores"]) for d in expected) > 0
    for want, got in zip(expected, actual):
        assert all(torch.equal(got[key], want[key]) for key in ("boxes", "scores", "labels"))


@pytest.fixture
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # LightningCLI compares its args with sys.argv


@pytest.mark.usefixtures("_command_line")
def test_train_refuses_a_legacy_checkpoint_until_it_is_converted(
    new_and_legacy: tuple[Path, Path], synthetic_coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tasks.cli import main, run
    from tools import convert_checkpoint

    _, legacy = new_and_legacy
    args = [
        "validate", "--config", DET_CONFIG, "--data.root", str(synthetic_coco), "--data.num_workers", "0",
        "--data.batch_size", "4", "--data.eval_batch_size", "4", "--model.network.width_mult", "0.35",
        "--model.network.image_size", "128", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    assert run([*args, "--ckpt_path", str(legacy)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(legacy) in lines[0] and "tools/convert_checkpoint.py" in lines[0], lines

    converted = tmp_path / "converted.ckpt"
    assert convert_checkpoint.main([str(legacy), str(converted)]) == 0
    assert f"{converted}: converted" in capsys.readouterr().out
    saved = torch.load(converted, weights_only=True)
    assert saved["hyper_parameters"]["network"]["class_path"] == "tasks.networks.detector.SSDLiteMobileNetV2"
    assert all(key.startswith("network.") for key in saved["state_dict"])
    cli = main([*args, "--ckpt_path", str(converted)])
    assert 0.0 <= cli.trainer.callback_metrics["val/AP"].item() <= 1.0
    assert cli.model.network.head.nms_threshold == 0.4  # the checkpoint's options, not the config's
    # Converting a checkpoint of today's layout copies it unchanged.
    assert convert_checkpoint.main([str(converted), str(tmp_path / "again.ckpt")]) == 0
    assert "already in the current layout" in capsys.readouterr().out
