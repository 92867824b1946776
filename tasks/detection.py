"""SSDLite object detection (MobileNetV2 paper, section 6.2, Table 6): network, builders, task.

* :class:`SSDLite`: a plain ``nn.Module``, backbone + :class:`~heads.ssdlite.SSDLiteHead`,
  ``forward(images) -> {"cls_logits", "bbox_regression", "anchors"}`` on an ImageNet-normalised
  batch (what export, benchmark and summary tools run).
* :func:`ssdlite_mobilenetv2` / :func:`ssdlite_mobilenetv2_coco`: the paper's "MNet V2 +
  SSDLite" (4.3M parameters, 0.8B multiply-adds at 300x300 with 91 classes) and its
  width-multiplier variants.
* :class:`SSDLiteDetection`: the LightningModule that trains and evaluates it. Its ``__init__``
  arguments are what a config's ``model.init_args`` sets.

Batches come from :mod:`tasks.data.coco` (see its docs): ``images``, ``targets`` (pixel xyxy
boxes in the network input, labels ``1..K``, crowd regions), ``image_ids`` and ``orig_sizes``.
For COCO mAP the task takes the ground truth and the label -> category-id map from its
DataModule (``trainer.datamodule.val_coco`` / ``test_coco`` and ``label_to_category_id``) at the
start of each evaluation; it never opens a file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from backbones import Backbone, MobileNetV2
from backbones.mobilenetv2 import imagenet_state_dict
from heads.anchors import BOX_CODER_WEIGHTS
from heads.ssdlite import LossType, SSDLiteHead
from tasks.data.detection_transforms import detection_eval_transform, normalize_images
from tasks.evaluation.coco_map import SUMMARY_KEYS, Backend, COCOMeanAveragePrecision
from tasks.lr_scaling import scaled_lr

# TF's SSD feature extractors: extra-layer depths scale with the width multiplier but never
# drop below 16 channels (``min_depth``).
SSDLITE_EXTRA_DEPTHS: tuple[int, ...] = (512, 256, 256, 128)
MIN_DEPTH = 16
# Label spaces for COCO: category ids used directly (1..90, TF's 90 classes + background) or the
# 80 categories numbered contiguously, each plus the background logit.
COCO_NUM_CLASSES_CATEGORY_IDS = 91
COCO_NUM_CLASSES_CONTIGUOUS = 81


class SSDLite(nn.Module):
    """A backbone and an SSDLite head: ``forward(images) -> dict`` of raw head tensors.

    Args:
        backbone: returns at least the maps the head's ``in_features`` name.
        head: built from ``backbone.output_shape()``.
    """

    def __init__(self, backbone: Backbone, head: SSDLiteHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images``: Tensor[N, 3, H, W] normalised. Returns ``cls_logits`` [N, A, C],
        ``bbox_regression`` [N, A, 4] and ``anchors`` [A, 4] (normalised xyxy)."""
        return self.head(self.backbone(images))

    @torch.no_grad()
    def detect(
        self, images: Tensor, image_sizes: Tensor | Sequence[tuple[int, int]] | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections per image in ``image_sizes`` (default: the input's size) pixel coordinates."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.head.postprocess(self(images), image_sizes)


def ssdlite_mobilenetv2(
    *,
    num_classes: int = COCO_NUM_CLASSES_CATEGORY_IDS,
    width_mult: float = 1.0,
    weights_backbone: str | None = None,
    frozen_stages: int = 0,
    freeze_bn: bool = False,
    extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS,
    min_depth: int = MIN_DEPTH,
    **head_options: Any,
) -> SSDLite:
    """MobileNetV2 + SSDLite (section 6.2): taps ``c4_expand`` (layer 15's expansion, stride 16)
    and ``final_conv`` (the 1280-channel conv, stride 32), then four extra layers.

    Args:
        num_classes: logits per anchor, background included: 91 (COCO category ids as labels,
            the paper's TF model) or 81 (80 contiguous COCO classes); K + 1 in general.
        width_mult: the backbone's width multiplier; the extra layers scale with it
            (``max(int(depth * width_mult), min_depth)``, as the TF feature extractor).
        weights_backbone: None, ``"imagenet"`` or a state-dict path (see :class:`MobileNetV2`).
        frozen_stages, freeze_bn: see :class:`MobileNetV2`.
        extra_depths: output depths of the extra layers at width 1.0.
        head_options: anchors, loss and post-processing options of :class:`SSDLiteHead`.

    The network is fully convolutional and its anchors are normalised, so the same model runs
    at 300x300 (the paper) or 320x320 (torchvision's SSDLite): 1917 or 2034 anchors.
    """
    backbone = MobileNetV2(
        width_mult=width_mult,
        out_features=("c4_expand", "final_conv"),
        weights=weights_backbone,
        frozen_stages=frozen_stages,
        freeze_bn=freeze_bn,
    )
    depths = [max(int(depth * width_mult), min_depth) for depth in extra_depths]
    head = SSDLiteHead(backbone.output_shape(), num_classes=num_classes, extra_depths=depths, **head_options)
    return SSDLite(backbone, head)


def ssdlite_mobilenetv2_coco(*, contiguous_labels: bool = False, **kwargs: Any) -> SSDLite:
    """The paper's COCO detector: MobileNetV2 1.0 + SSDLite with 91 outputs (background + COCO
    category ids 1..90, as the TF model) or, with ``contiguous_labels``, 81 (background + the 80
    categories numbered 1..80). Run it at 300x300 (the paper) or 320x320 (torchvision)."""
    num_classes = COCO_NUM_CLASSES_CONTIGUOUS if contiguous_labels else COCO_NUM_CLASSES_CATEGORY_IDS
    return ssdlite_mobilenetv2(num_classes=num_classes, **kwargs)


def num_classes_advice(
    data_num_classes: int, model_num_classes: int, label_to_category_id: Mapping[int, int] | None
) -> str:
    """One line for a model with too few logits for its data, naming the settings that fit.

    With contiguous labels (``1..K``) the fix is ``num_classes K + 1``. With category ids as
    labels there are two: number the categories contiguously, or keep one logit per id up to
    the largest (the ids without a category are then masked out, see ``set_valid_labels``).
    """
    problem = (
        f"the data has labels up to {data_num_classes - 1} but the model has num_classes="
        f"{model_num_classes} (background included)"
    )
    labels = sorted(label_to_category_id or {})
    if not labels or labels == list(range(1, len(labels) + 1)):
        return f"{problem}; set --model.num_classes {data_num_classes}"
    count = len(labels)
    return (
        f"{problem}: its {count} categories are labelled by their ids (data.contiguous_labels false); "
        f"either number them 1..{count} with --data.contiguous_labels true --model.num_classes {count + 1}, "
        f"or keep one logit per id with --model.num_classes {data_num_classes} (the "
        f"{data_num_classes - 1 - count} ids without a category are masked out)"
    )


class WarmupSchedule:
    """Learning-rate factor per optimiser step: linear warm-up, then cosine, exponential or constant.

    Args:
        schedule: ``"cosine"`` (to ``min_lr_ratio`` at ``total_steps``, torchvision's SSDLite
            recipe), ``"exponential"`` (``decay_rate ** (step // decay_steps)``, the TF
            recipe's staircase decay) or ``"constant"``.
        total_steps: optimiser steps of the run (cosine only).
        warmup_steps: steps of the linear ramp from ``warmup_factor`` to 1.
    """

    def __init__(
        self,
        schedule: str,
        *,
        total_steps: int,
        warmup_steps: int,
        warmup_factor: float,
        min_lr_ratio: float = 0.0,
        decay_rate: float = 0.95,
        decay_steps: int = 1,
    ) -> None:
        self.schedule = schedule
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.min_lr_ratio = min_lr_ratio
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps

    def __call__(self, step: int) -> float:
        factor = 1.0
        if step < self.warmup_steps:
            factor = self.warmup_factor + (1 - self.warmup_factor) * step / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, max(0, step - self.warmup_steps) / span)
            factor *= self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.schedule == "exponential":
            factor *= self.decay_rate ** (step // self.decay_steps)
        return factor


class SSDLiteDetection(LightningModule):
    """Train and evaluate :func:`ssdlite_mobilenetv2` on COCO-style data with COCO box mAP.

    Model:
        num_classes: logits per anchor with the background (91: category ids; 81: contiguous
            COCO; K + 1 for a dataset of K classes with ``contiguous_labels``).
        image_size: the square input side the model is meant for (300 in the paper, 320 in
            torchvision); the DataModule resizes to its own ``image_size``, which should match.
        width_mult, frozen_stages, freeze_bn, extra_depths, min_depth: see
            :func:`ssdlite_mobilenetv2`.
        weights_backbone: None, ``"imagenet"`` (torchvision's weights) or a state-dict path,
            loaded into the backbone when ``fit`` starts (so building the task never downloads).
        min_scale, max_scale, aspect_ratios, interpolated_scale_aspect_ratio,
            reduce_boxes_in_lowest_layer: default boxes (TF ``ssd_anchor_generator``).
        box_coder_weights, iou_threshold, loss_type, neg_pos_ratio, min_negatives_per_image,
            focal_alpha, focal_gamma: matching and loss, see :class:`SSDLiteHead`.
        box_loss_weight: weight of ``loss_box`` in the total (1 in SSD and the TF configs).
        score_threshold, nms_threshold, topk_candidates, detections_per_image: post-processing.
    Optimisation:
        optimizer: ``"sgd"`` (momentum; torchvision's SSDLite recipe), ``"rmsprop"`` (the TF
            recipe: ``rmsprop_alpha`` = TF's decay 0.9, ``rmsprop_eps`` = 1.0, momentum 0.9) or
            ``"adamw"``.
        lr, momentum, nesterov, weight_decay: weight decay (L2, 4e-5 as the paper) is applied
            to conv/linear weights only, never to BatchNorm parameters or biases.
        lr_reference_batch: the effective batch ``lr`` is given for (torchvision's SSDLite: 0.15
            for 192 = 8 GPUs x 24). The lr used is ``lr x batch_size x world_size x
            accumulate_grad_batches / lr_reference_batch`` (linear scaling, see
            :mod:`tasks.lr_scaling`; logged once when fitting starts). None: ``lr`` as given.
        lr_schedule, warmup_steps, warmup_factor, min_lr_ratio, lr_decay_rate, lr_decay_steps:
            per-step schedule, see :class:`WarmupSchedule`.
        eval_backend: COCOeval implementation (see :func:`evaluate_detections`).
        channels_last: keep the network's weights, and so its activations, in channels-last
            memory format: the same numbers, about 2x faster training and inference on CPUs
            (oneDNN's depthwise convolutions) and tensor-core friendly on GPUs.
    """

    def __init__(
        self,
        *,
        num_classes: int = COCO_NUM_CLASSES_CATEGORY_IDS,
        image_size: int = 320,
        width_mult: float = 1.0,
        weights_backbone: str | None = None,
        frozen_stages: int = 0,
        freeze_bn: bool = False,
        extra_depths: Sequence[int] = SSDLITE_EXTRA_DEPTHS,
        min_depth: int = MIN_DEPTH,
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 1.0 / 3.0),
        interpolated_scale_aspect_ratio: float = 1.0,
        reduce_boxes_in_lowest_layer: bool = True,
        box_coder_weights: Sequence[float] = BOX_CODER_WEIGHTS,
        iou_threshold: float = 0.5,
        loss_type: LossType = "hard_negative_mining",
        neg_pos_ratio: float = 3.0,
        min_negatives_per_image: int = 3,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss_weight: float = 1.0,
        score_threshold: float = 0.001,
        nms_threshold: float = 0.55,
        topk_candidates: int = 1000,
        detections_per_image: int = 100,
        optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd",
        lr: float = 0.15,
        lr_reference_batch: int | None = None,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 4e-5,
        rmsprop_alpha: float = 0.9,
        rmsprop_eps: float = 1.0,
        lr_schedule: Literal["cosine", "exponential", "constant"] = "cosine",
        warmup_steps: int = 1000,
        warmup_factor: float = 0.001,
        min_lr_ratio: float = 0.0,
        lr_decay_rate: float = 0.95,
        lr_decay_steps: int = 800720,
        eval_backend: Backend = "auto",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("sgd", "rmsprop", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'rmsprop' or 'adamw', got {optimizer!r}")
        if lr_schedule not in ("cosine", "exponential", "constant"):
            raise ValueError(
                f"lr_schedule must be 'cosine', 'exponential' or 'constant', got {lr_schedule!r}"
            )
        self.image_size = image_size
        # Backbone weights are loaded when fitting starts (setup), not here: building the task
        # (summary tools, load_from_checkpoint, predict from a checkpoint) never downloads.
        self.model = ssdlite_mobilenetv2(
            num_classes=num_classes,
            width_mult=width_mult,
            weights_backbone=None,
            frozen_stages=frozen_stages,
            freeze_bn=freeze_bn,
            extra_depths=extra_depths,
            min_depth=min_depth,
            min_scale=min_scale,
            max_scale=max_scale,
            aspect_ratios=aspect_ratios,
            interpolated_scale_aspect_ratio=interpolated_scale_aspect_ratio,
            reduce_boxes_in_lowest_layer=reduce_boxes_in_lowest_layer,
            box_coder_weights=box_coder_weights,
            iou_threshold=iou_threshold,
            loss_type=loss_type,
            neg_pos_ratio=neg_pos_ratio,
            min_negatives_per_image=min_negatives_per_image,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            topk_candidates=topk_candidates,
            detections_per_image=detections_per_image,
        )
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._backbone_weights_loaded = False
        self.val_map = COCOMeanAveragePrecision(backend=eval_backend)
        self.test_map = COCOMeanAveragePrecision(backend=eval_backend)
        # {label: class name}, from the DataModule at save time: pictures and tools need the
        # names long after the annotation files are gone.
        self.class_names: dict[int, str] = {}
        # {label: COCO category id}, likewise: predictions files of tools/predict.py use it.
        self.label_to_category_id: dict[int, int] = {}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.model(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names:
            self.class_names = {int(label): str(name) for label, name in dict(names).items()}
        checkpoint["class_names"] = self.class_names
        to_category = getattr(datamodule, "label_to_category_id", None)
        if to_category:
            self.label_to_category_id = {int(label): int(category) for label, category in dict(to_category).items()}
        checkpoint["label_to_category_id"] = self.label_to_category_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = {int(label): name for label, name in checkpoint.get("class_names", {}).items()}
        self.label_to_category_id = {
            int(label): int(category) for label, category in checkpoint.get("label_to_category_id", {}).items()
        }

    # ------------------------------------------------------------------ data wiring
    def prepare_data(self) -> None:
        """Download the ImageNet backbone weights once per node before the ranks load them."""
        if self.hparams.weights_backbone == "imagenet":
            imagenet_state_dict()

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.weights_backbone and not self._backbone_weights_loaded:
            # Before a checkpoint is restored (Lightning restores after setup), so a resumed run
            # keeps its trained weights.
            self.model.backbone.load_weights(self.hparams.weights_backbone)
            self._backbone_weights_loaded = True
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        num_classes = getattr(datamodule, "num_classes", None)
        label_to_category_id = getattr(datamodule, "label_to_category_id", None)
        if num_classes is not None and num_classes > self.hparams.num_classes:
            raise ValueError(num_classes_advice(num_classes, self.hparams.num_classes, label_to_category_id))
        if label_to_category_id and stage in ("fit", "validate", "test"):
            # Label slots without a category (the 10 unused COCO ids with 91 logits) are masked
            # out of the loss and the scores: the detector never emits a label it cannot name.
            # A checkpoint restored after setup brings the same mask (it is a buffer).
            self.model.head.set_valid_labels(label_to_category_id)
            unused = (~self.model.head.valid_labels[1:]).nonzero().flatten().add(1).tolist()
            if unused:
                rank_zero_info(
                    f"{len(unused)} of {self.hparams.num_classes - 1} label slots have no category and "
                    f"are masked out: {unused}"
                )
        data_size = getattr(datamodule, "image_size", None)
        if data_size is not None and data_size != self.image_size:
            rank_zero_warn(
                f"data.image_size={data_size} differs from model.image_size={self.image_size}: the "
                "network runs at the data's size (it is fully convolutional), but its anchors were "
                "designed for the model's"
            )

    def _attach_ground_truth(self, metric: COCOMeanAveragePrecision, attribute: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, attribute):
            metric.set_ground_truth(
                getattr(datamodule, attribute), getattr(datamodule, "label_to_category_id", None)
            )
        elif metric.coco_gt is None:
            raise RuntimeError(
                f"COCO mAP needs the ground truth: use a DataModule with `{attribute}` and "
                "`label_to_category_id` (tasks.data.coco.COCODetectionDataModule), or call "
                f"{type(self).__name__}.{'val_map' if 'val' in attribute else 'test_map'}"
                ".set_ground_truth(...)"
            )

    @staticmethod
    def normalised_targets(batch: Mapping[str, Any]) -> list[dict[str, Tensor]]:
        """The batch's pixel boxes as fractions of the input's width and height (the head's frame)."""
        height, width = batch["images"].shape[-2:]
        scale = torch.tensor(
            [width, height, width, height], dtype=torch.float32, device=batch["images"].device
        )
        targets = []
        for target in batch["targets"]:
            normalised = {"boxes": target["boxes"] / scale, "labels": target["labels"]}
            if "crowd_boxes" in target:
                normalised["crowd_boxes"] = target["crowd_boxes"] / scale
            targets.append(normalised)
        return targets

    # ------------------------------------------------------------------ steps
    @staticmethod
    def _images(batch: Mapping[str, Any]) -> Tensor:
        images = batch["images"]
        if not torch.is_floating_point(images):
            raise TypeError(
                f"batch images are {images.dtype}, expected normalised floats: COCODetectionDataModule "
                "normalises in on_after_batch_transfer, so pass it as `datamodule=` (or apply "
                "tasks.data.detection_transforms.normalize_images to loader batches yourself)"
            )
        return images

    def _losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        losses = self.model.head.loss(outputs, self.normalised_targets(batch))
        losses["loss"] = losses["loss_cls"] + self.hparams.box_loss_weight * losses["loss_box"]
        return losses

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self._losses(self.model(self._images(batch)), batch)
        batch_size = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=batch_size)
        self.log("train/loss_cls", losses["loss_cls"], prog_bar=True, batch_size=batch_size)
        self.log("train/loss_box", losses["loss_box"], prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def _evaluation_step(
        self, batch: Mapping[str, Any], metric: COCOMeanAveragePrecision, prefix: str
    ) -> None:
        outputs = self.model(self._images(batch))
        losses = self._losses(outputs, batch)
        self.log(f"{prefix}/loss", losses["loss"], batch_size=batch["images"].shape[0], sync_dist=True)
        # Normalised boxes map straight onto the original images: COCO results need their pixels.
        detections = self.model.head.postprocess(outputs, batch["orig_sizes"])
        metric.update(batch["image_ids"], detections)

    def _log_map(self, metric: COCOMeanAveragePrecision, prefix: str) -> None:
        # compute() gathers every rank's detections, so each rank evaluates the whole set and
        # logs the same numbers (no further reduction; ModelCheckpoint sees them on every rank).
        results = metric.compute()
        for key in SUMMARY_KEYS:
            self.log(f"{prefix}/{key}", results[key], prog_bar=key in ("AP", "AP50"))
        metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._attach_ground_truth(self.val_map, "val_coco")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_start(self) -> None:
        self._attach_ground_truth(self.test_map, "test_coco")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``image_id`` and ``boxes`` (xyxy, original pixels), ``scores``, ``labels``."""
        outputs = self.model(self._images(batch))
        detections = self.model.head.postprocess(outputs, batch["orig_sizes"])
        return [{"image_id": int(i), **d} for i, d in zip(batch["image_ids"], detections)]

    @torch.no_grad()
    def predict_images(
        self, images: Sequence[np.ndarray], *, max_size: int | None = None
    ) -> list[dict[str, Tensor]]:
        """Detections on RGB ``uint8[H, W, 3]`` arrays through validation's own steps.

        The validation transform (``detection_eval_transform``: the fixed SSD resize), the
        DataModule's normalisation and :meth:`predict_step`, so a picture from
        ``tools/predict.py`` shows what validation scored. ``max_size`` is unused: the input is
        resized to ``image_size`` anyway.

        Returns:
            Per image ``boxes`` (FloatTensor[D, 4] absolute xyxy in the image), ``scores``, ``labels``.
        """
        transform = detection_eval_transform(self.image_size)
        no_boxes = {"bboxes": np.zeros((0, 4), dtype=np.float32), "labels": [], "is_crowd": []}
        inputs = [torch.from_numpy(transform(image=image, **no_boxes)["image"].transpose(2, 0, 1).copy()) for image in images]
        batch = {
            "images": normalize_images(torch.stack(inputs).to(self.device)),
            "orig_sizes": torch.tensor([image.shape[:2] for image in images], dtype=torch.int64),
            "image_ids": torch.arange(len(images)),
        }
        return [
            {key: value for key, value in detection.items() if key != "image_id"}
            for detection in self.predict_step(batch, 0)
        ]

    def label_names(self) -> list[str]:
        """Class names by label (saved from the DataModule), the label number where none is known."""
        return [self.class_names.get(label, str(label)) for label in range(self.hparams.num_classes)]

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weights with weight decay; BatchNorm parameters and biases (all 1-d) without."""
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim > 1 else no_decay).append(parameter)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.parameter_groups()
        lr = scaled_lr(hp.lr, hp.lr_reference_batch, self._trainer)
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum, nesterov=hp.nesterov)
        elif hp.optimizer == "rmsprop":
            # TF's RMSProp puts epsilon inside the square root and starts its mean square at 1;
            # with TF's eps = 1.0 both start as momentum SGD at about lr, as here.
            optimizer = torch.optim.RMSprop(
                groups, lr=lr, alpha=hp.rmsprop_alpha, eps=hp.rmsprop_eps, momentum=hp.momentum
            )
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr)
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if hp.lr_schedule == "cosine" and not math.isfinite(total_steps):
            raise ValueError(
                "lr_schedule='cosine' needs a finite run: set trainer.max_steps or trainer.max_epochs"
            )
        schedule = WarmupSchedule(
            hp.lr_schedule,
            total_steps=int(total_steps),
            warmup_steps=hp.warmup_steps,
            warmup_factor=hp.warmup_factor,
            min_lr_ratio=hp.min_lr_ratio,
            decay_rate=hp.lr_decay_rate,
            decay_steps=hp.lr_decay_steps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
