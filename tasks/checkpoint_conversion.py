"""Checkpoints written before tasks received their network (December 2026) in today's layout.

Those checkpoints kept every network option flat in ``model.init_args`` (``num_classes``,
``width_mult``, ``min_scale``...) and the network under ``model.`` in the state dict. Today a
task takes ``network`` (a ``{class_path, init_args}`` config), an ``optimizer`` recipe and an
``lr_schedule``, and the network's weights live under ``network.``. :func:`convert_checkpoint`
rewrites the first layout into the second; the weights are untouched, so a converted checkpoint
predicts exactly what it predicted before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backbones import IMAGENET_MEAN, IMAGENET_STD

DETECTION = "tasks.detection.SSDLiteDetection"
SEGMENTATION = "tasks.segmentation.DeepLabV3Segmentation"

# Old flat names -> where they go now.
_DETECTION_NETWORK = ("num_classes", "image_size", "width_mult", "frozen_stages", "extra_depths", "min_depth")
_DEFAULT_BOXES = (
    "min_scale", "max_scale", "aspect_ratios", "interpolated_scale_aspect_ratio", "reduce_boxes_in_lowest_layer",
)
_DETECTION_HEAD = (
    "box_coder_weights", "iou_threshold", "loss_type", "neg_pos_ratio", "min_negatives_per_image", "focal_alpha",
    "focal_gamma", "score_threshold", "nms_threshold", "topk_candidates", "detections_per_image",
)
_SEGMENTATION_NETWORK = ("num_classes", "output_stride", "use_final_conv", "width_mult", "aux_loss")
_SEGMENTATION_HEAD = {"aspp": "aspp", "atrous_rates": "atrous_rates", "head_channels": "channels",
                      "dropout": "dropout", "aux_weight": "aux_weight", "ignore_index": "ignore_index"}


def is_legacy(hyper_parameters: dict[str, Any]) -> bool:
    """Whether saved hyper-parameters are of a task that built its own network."""
    return "network" not in hyper_parameters and "num_classes" in hyper_parameters


def convert_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` (a dict from ``torch.load``) in today's layout; unchanged if it already is.

    Raises:
        ValueError: hyper-parameters of neither task (the message says what was found).
    """
    saved = dict(checkpoint.get("hyper_parameters", {}))
    if not is_legacy(saved):
        return checkpoint
    class_path = saved.get("_class_path") or (DETECTION if "min_scale" in saved else SEGMENTATION)
    if class_path == DETECTION:
        hyper_parameters = _detection(saved)
    elif class_path == SEGMENTATION:
        hyper_parameters = _segmentation(saved)
    else:
        raise ValueError(f"old-layout checkpoint of an unknown task {class_path!r}")
    hyper_parameters["_class_path"] = class_path
    if "_instantiator" in saved:
        hyper_parameters["_instantiator"] = saved["_instantiator"]
    converted = dict(checkpoint)
    converted["hyper_parameters"] = hyper_parameters
    data = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(data, Mapping) and str(data.get("_class_path", "")).endswith("VOCSegmentationDataModule"):
        converted["datamodule_hyper_parameters"] = upgrade_voc_options(data)
    converted["state_dict"] = {
        ("network." + key[len("model."):] if key.startswith("model.") else key): value
        for key, value in checkpoint.get("state_dict", {}).items()
    }
    return converted


def _pick(saved: dict[str, Any], names: tuple[str, ...] | dict[str, str]) -> dict[str, Any]:
    pairs = names.items() if isinstance(names, dict) else ((name, name) for name in names)
    return {new: saved[old] for old, new in pairs if old in saved}


def _optimizer(saved: dict[str, Any], default_lr: float) -> dict[str, Any]:
    name = saved.get("optimizer", "sgd")
    common = {"lr": saved.get("lr", default_lr), "weight_decay": saved.get("weight_decay", 4e-5)}
    if name == "adamw":
        return {"class_path": "tasks.optimization.AdamW", "init_args": common}
    if name == "rmsprop":
        extra = {"alpha": saved.get("rmsprop_alpha", 0.9), "eps": saved.get("rmsprop_eps", 1.0),
                 "momentum": saved.get("momentum", 0.9)}
        return {"class_path": "tasks.optimization.RMSProp", "init_args": {**common, **extra}}
    extra = {"momentum": saved.get("momentum", 0.9), "nesterov": saved.get("nesterov", False)}
    return {"class_path": "tasks.optimization.SGD", "init_args": {**common, **extra}}


def _detection(saved: dict[str, Any]) -> dict[str, Any]:
    network = {**_pick(saved, _DETECTION_NETWORK), **_pick(saved, _DETECTION_HEAD)}
    network["default_boxes"] = _pick(saved, _DEFAULT_BOXES)
    warmup = {"warmup_steps": saved.get("warmup_steps", 1000), "warmup_factor": saved.get("warmup_factor", 0.001)}
    schedule_name = saved.get("lr_schedule", "cosine")
    if schedule_name == "exponential":
        schedule = {"class_path": "tasks.optimization.WarmupExponential", "init_args": {
            "decay_rate": saved.get("lr_decay_rate", 0.95), "decay_steps": saved.get("lr_decay_steps", 800720), **warmup}}
    elif schedule_name == "constant":
        schedule = {"class_path": "tasks.optimization.WarmupExponential", "init_args": {"decay_rate": 1.0, **warmup}}
    else:
        schedule = {"class_path": "tasks.optimization.WarmupCosine",
                    "init_args": {"min_lr_ratio": saved.get("min_lr_ratio", 0.0), **warmup}}
    return {
        "network": {"class_path": "tasks.networks.detector.SSDLiteMobileNetV2", "init_args": network},
        "weights_backbone": saved.get("weights_backbone"),
        "optimizer": _optimizer(saved, 0.15),
        "lr_schedule": schedule,
        "lr_reference_batch": saved.get("lr_reference_batch"),
        "freeze_bn": bool(saved.get("freeze_bn", False)),
        "bn_momentum": None,
        "box_loss_weight": saved.get("box_loss_weight", 1.0),
        "eval_backend": saved.get("eval_backend", "auto"),
        "channels_last": saved.get("channels_last", True),
    }


def _segmentation(saved: dict[str, Any]) -> dict[str, Any]:
    network = {**_pick(saved, _SEGMENTATION_NETWORK), **_pick(saved, _SEGMENTATION_HEAD)}
    return {
        "network": {"class_path": "tasks.networks.segmenter.DeepLabV3MobileNetV2", "init_args": network},
        "weights_backbone": saved.get("weights_backbone"),
        "optimizer": _optimizer(saved, 0.007),
        "lr_schedule": {"class_path": "tasks.optimization.Poly",
                        "init_args": {"power": saved.get("poly_power", 0.9), "max_steps": saved.get("max_steps")}},
        "lr_reference_batch": saved.get("lr_reference_batch"),
        "freeze_bn": saved.get("freeze_bn"),
        "bn_momentum": saved.get("bn_momentum"),
        "channels_last": saved.get("channels_last", True),
    }


def upgrade_voc_options(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Options of a VOC DataModule saved before issue #13 (a checkpoint's
    ``datamodule_hyper_parameters``) under today's names.

    ``val_batch_size`` is now ``eval_batch_size`` and ``hflip`` (bool) ``hflip_p`` (0.5 or 0);
    ``mean`` / ``std`` are gone (the network normalises, with ImageNet's statistics).

    Raises:
        ValueError: the saved ``mean`` / ``std`` are not ImageNet's (the data would no longer
            be normalised the way the model was trained).
    """
    options = dict(saved)
    if "val_batch_size" in options:
        options.setdefault("eval_batch_size", options.pop("val_batch_size"))
    if "hflip" in options:
        options.setdefault("hflip_p", 0.5 if options.pop("hflip") else 0.0)
    for key, imagenet in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = options.pop(key, None)
        if value is not None and not np.allclose(value, imagenet):
            raise ValueError(
                f"data.{key} {list(value)} is no longer an option: the network normalises with ImageNet's "
                f"{list(imagenet)}; this checkpoint was trained on other statistics"
            )
    return options
