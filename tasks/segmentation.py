"""Mobile DeepLabv3 semantic segmentation (Sandler et al., 2018, section 6.3, Table 7).

Three layers, each usable alone:

* :class:`Segmenter` - the plain network: backbone -> head -> logits bilinearly upsampled to the
  input, ``forward(images[N, 3, H, W]) -> {"logits": [N, K, H, W]}``. Exportable, counted by
  ``tools/summary.py``.
* :func:`deeplabv3_mobilenetv2` - builds the paper's model (MobileNetV2 at output stride 16
  without the 1280 conv, "MNet V2*", plus ASPP-lite) or its variants.
* :class:`DeepLabV3Segmentation` - the LightningModule: TF DeepLab's MobileNetV2 training recipe
  (cross-entropy ignoring 255, SGD momentum 0.9, weight decay 4e-5, "poly" learning rate with
  power 0.9), mIoU over the validation set, optional multi-scale / flip evaluation.

Batches are ``{"images": Tensor[N, 3, H, W] normalised, "masks": Tensor[N, H, W] int64 with 255
= ignore, "image_sizes": list[(H, W)]}`` (see :mod:`tasks.data.voc`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from backbones import Backbone, MobileNetV2
from heads.deeplabv3 import DeepLabV3Head, upsample_logits
from tasks.data.segmentation_transforms import eval_transforms
from tasks.data.voc import VOC_CLASSES
from tasks.evaluation.miou import MeanIoU
from tasks.lr_scaling import scaled_lr

# TF DeepLab (train.py): "Set to True if one wants to fine-tune the batch norm parameters in
# DeepLabv3 ... it is recommended to use train_batch_size >= 12".
MIN_BATCH_TO_TRAIN_BN = 12


class Segmenter(nn.Module):
    """A backbone and a dense head; logits come back at the input resolution.

    Args:
        backbone: returns the named maps the head reads.
        head: built from ``backbone.output_shape()``; its ``forward`` returns ``logits``
            (and, in training, maybe ``aux_logits``) at its feature stride.
    """

    def __init__(self, backbone: Backbone, head: DeepLabV3Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` (normalised) -> ``{"logits": Tensor[N, K, H, W]}`` (+ ``aux_logits``, coarse)."""
        outputs = self.head(self.backbone(images))
        outputs["logits"] = upsample_logits(outputs["logits"], images.shape[-2:])
        return outputs


def deeplabv3_mobilenetv2(
    *,
    num_classes: int = 21,
    output_stride: int = 16,
    aspp: Literal["lite", "full"] = "lite",
    atrous_rates: Sequence[int] | None = None,
    use_final_conv: bool = False,
    width_mult: float = 1.0,
    weights_backbone: str | None = None,
    head_channels: int = 256,
    dropout: float = 0.1,
    aux_loss: bool = False,
    aux_weight: float = 0.4,
    ignore_index: int = 255,
) -> Segmenter:
    """Mobile DeepLabv3: MobileNetV2 at output stride 16 (or 8) + ASPP-lite (or full ASPP).

    The defaults are Table 7's "MNet V2*, OS 16, no ASPP" row: 2.11M parameters, 2.75B
    multiply-adds at 512x512, 75.32% mIoU on VOC 2012 val (with COCO pre-training).

    Args:
        num_classes: K, background included (21 for VOC).
        output_stride: 16 or 8; later strides become dilation in the backbone.
        aspp: ``"lite"`` (1x1 + image pooling) or ``"full"`` (plus 3x3 atrous branches).
        atrous_rates: full-ASPP rates; default (6, 12, 18) at OS 16, (12, 24, 36) at OS 8.
        use_final_conv: feed the head from the 1280-channel final conv instead of the last
            320-channel bottleneck (the paper's "*" variant drops it: fewer parameters, same mIoU).
        width_mult: backbone width multiplier.
        weights_backbone: ``None``, ``"imagenet"`` or a state-dict path for the backbone.
        head_channels: ASPP width (256).
        dropout: dropout before the classifier (0.1).
        aux_loss: add an auxiliary FCN classifier on ``c4`` (training only; not in the paper).
        aux_weight: its loss weight.
        ignore_index: label the loss ignores.
    """
    if output_stride not in (8, 16):
        raise ValueError(f"segmentation uses output_stride 16 or 8 (DeepLab), got {output_stride}")
    in_feature = "final_conv" if use_final_conv else "c5"
    out_features = ("c4", in_feature) if aux_loss else (in_feature,)
    backbone = MobileNetV2(
        width_mult=width_mult, output_stride=output_stride, out_features=out_features, weights=weights_backbone
    )
    head = DeepLabV3Head(
        backbone.output_shape(),
        num_classes=num_classes,
        in_feature=in_feature,
        aspp=aspp,
        atrous_rates=atrous_rates,
        channels=head_channels,
        dropout=dropout,
        aux_feature="c4" if aux_loss else None,
        aux_weight=aux_weight,
        ignore_index=ignore_index,
    )
    return Segmenter(backbone, head)


def scaled_size(size: int, scale: float) -> int:
    """TF DeepLab's ``scale_dimension``: ``(size - 1) * scale + 1`` keeps 513-style sizes aligned."""
    return max(1, int((size - 1) * scale + 1))


@torch.no_grad()
def segment_probs(
    model: nn.Module, images: Tensor, *, scales: Sequence[float] = (1.0,), flip: bool = False
) -> Tensor:
    """Class probabilities averaged over input scales and left-right flips (Table 7's "MF").

    As TF DeepLab's ``predict_labels_multi_scale``: each scaled (and flipped) copy of the batch is
    segmented, its logits resized to the input size (and flipped back), softmaxed, and the
    probabilities averaged.

    Args:
        model: any module with ``forward(images) -> {"logits": Tensor[N, K, h, w]}``.
        images: ``Tensor[N, 3, H, W]``, normalised.
        scales: input scales, e.g. ``(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)`` as the paper.
        flip: also segment the mirrored images.

    Returns:
        ``Tensor[N, K, H, W]`` probabilities (each pixel sums to 1).
    """
    if not scales:
        raise ValueError("scales must not be empty")
    height, width = images.shape[-2:]
    total: Tensor | None = None
    runs = 0
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"scales must be positive, got {list(scales)}")
        size = (scaled_size(height, scale), scaled_size(width, scale))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=True
        )
        for mirrored in (False, True) if flip else (False,):
            logits = model(scaled.flip(-1) if mirrored else scaled)["logits"]
            logits = upsample_logits(logits, (height, width))
            probs = (logits.flip(-1) if mirrored else logits).softmax(dim=1)
            total = probs if total is None else total + probs
            runs += 1
    return total / runs


class DeepLabV3Segmentation(LightningModule):
    """Mobile DeepLabv3 trained and evaluated as TF DeepLab's MobileNetV2 recipe.

    The network is :attr:`model`, a :class:`Segmenter` (normalised images in, full-resolution
    logits out). Model arguments are those of :func:`deeplabv3_mobilenetv2`.

    Args:
        num_classes, output_stride, aspp, atrous_rates, use_final_conv, width_mult, head_channels,
        dropout, aux_loss, aux_weight, ignore_index: see :func:`deeplabv3_mobilenetv2`.
        weights_backbone: backbone initialisation for training. Loaded in ``setup("fit")``,
            not at construction, so building the model to count it, to load a checkpoint or to
            export never downloads or reads them.
        optimizer: ``"sgd"`` (with momentum: the paper's recipe) or ``"adamw"`` (decoupled
            weight decay, default betas), which leaves the all-background plateau much sooner when
            training from scratch on a small budget (the synthetic config).
        lr: base learning rate (TF DeepLab: 0.007 for SGD at batch 16 on train_aug).
        lr_reference_batch: the effective batch ``lr`` is given for (16 for TF DeepLab's 0.007).
            The lr used is ``lr x batch_size x world_size x accumulate_grad_batches /
            lr_reference_batch`` (linear scaling, see :mod:`tasks.lr_scaling`; logged once when
            fitting starts). None: ``lr`` as given.
        momentum: SGD momentum (0.9).
        weight_decay: on conv weights (4e-5, TF's MobileNetV2 value); none on BN and biases.
        poly_power: the "poly" schedule ``lr * (1 - step / max_steps) ** power``, per step.
        max_steps: steps of the schedule; default the trainer's (``estimated_stepping_batches``).
        freeze_bn: keep every BatchNorm in inference mode with fixed scale and shift. ``None``
            decides as TF DeepLab on the first training batch: train BatchNorm only if it
            normalises over 12 images or more (per device, or across devices with
            ``--trainer.sync_batchnorm true``, which converts it to SyncBatchNorm under DDP).
        bn_momentum: BatchNorm running-statistics momentum (PyTorch's 0.1 when None; TF's
            decay 0.9997 is momentum 0.0003).
        eval_scales: input scales averaged at validation / test time (``[1.0]``: single scale).
        eval_flip: also average left-right flipped inputs at validation / test time. Neither is
            stored in checkpoints: pass them again when loading one.
        channels_last: keep the network's weights, and so its activations, in channels-last
            memory format: the same numbers, faster training and inference on CPUs (oneDNN's
            depthwise convolutions) and tensor-core friendly on GPUs.
    """

    def __init__(
        self,
        num_classes: int = 21,
        output_stride: int = 16,
        aspp: Literal["lite", "full"] = "lite",
        atrous_rates: list[int] | None = None,
        use_final_conv: bool = False,
        width_mult: float = 1.0,
        weights_backbone: str | None = None,
        head_channels: int = 256,
        dropout: float = 0.1,
        aux_loss: bool = False,
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.007,
        lr_reference_batch: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 4e-5,
        poly_power: float = 0.9,
        max_steps: int | None = None,
        freeze_bn: bool | None = None,
        bn_momentum: float | None = None,
        eval_scales: list[float] = [1.0],  # noqa: B006 - LightningCLI shows the default
        eval_flip: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        # Evaluation choices are not hyperparameters of the trained model: kept out of the
        # checkpoint so that `validate --ckpt_path X --model.eval_flip true` applies them
        # (LightningCLI restores a checkpoint's hyperparameters over the command line's).
        self.save_hyperparameters(ignore=["eval_scales", "eval_flip"])
        self.eval_scales = [float(scale) for scale in eval_scales]
        self.eval_flip = eval_flip
        self.model = deeplabv3_mobilenetv2(
            num_classes=num_classes,
            output_stride=output_stride,
            aspp=aspp,
            atrous_rates=atrous_rates,
            use_final_conv=use_final_conv,
            width_mult=width_mult,
            weights_backbone=None,  # loaded in setup("fit"), see the class docstring
            head_channels=head_channels,
            dropout=dropout,
            aux_loss=aux_loss,
            aux_weight=aux_weight,
            ignore_index=ignore_index,
        )
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if bn_momentum is not None:
            for module in self.model.modules():
                if isinstance(module, _BatchNorm):
                    module.momentum = bn_momentum
        if not eval_scales:
            raise ValueError("eval_scales must not be empty")
        self.val_miou = MeanIoU(num_classes, ignore_index=ignore_index)
        self.test_miou = MeanIoU(num_classes, ignore_index=ignore_index)
        self.bn_frozen: bool | None = freeze_bn
        # {label: class name}, from the DataModule at save time (see on_save_checkpoint).
        self.class_names: dict[int, str] = {}
        self._backbone_weights_loaded = False
        if freeze_bn:
            self._freeze_bn()

    # ------------------------------------------------------------------ network
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` -> ``{"logits": Tensor[N, K, H, W]}``."""
        return self.model(images)

    def setup(self, stage: str) -> None:
        weights = self.hparams.weights_backbone
        if stage == "fit" and weights is not None and not self._backbone_weights_loaded:
            # Before a resumed checkpoint is restored, so --ckpt_path still wins.
            self.model.backbone.load_weights(weights)
            self._backbone_weights_loaded = True
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes > self.hparams.num_classes:
            raise ValueError(
                f"the data has labels up to {data_classes - 1} but the model has num_classes="
                f"{self.hparams.num_classes} (background included); set model.init_args.num_classes: "
                f"{data_classes} (or data.init_args.num_classes for a dataset with fewer classes)"
            )

    # ------------------------------------------------------------------ batch norm policy
    def _freeze_bn(self) -> None:
        self.bn_frozen = True
        for module in self.model.modules():
            if isinstance(module, _BatchNorm):
                module.requires_grad_(False)
                module.eval()

    def train(self, mode: bool = True) -> DeepLabV3Segmentation:
        """Switch mode; frozen BatchNorm layers stay in inference mode."""
        super().train(mode)
        if mode and self.bn_frozen:
            for module in self.model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.bn_frozen is None:  # freeze_bn=None: TF DeepLab's rule, decided once
            per_device = int(batch["images"].shape[0])
            synced = any(isinstance(module, nn.SyncBatchNorm) for module in self.model.modules())
            normalised_over = per_device * (self.trainer.world_size if synced else 1)
            if normalised_over < MIN_BATCH_TO_TRAIN_BN:
                self._freeze_bn()
            else:
                self.bn_frozen = False

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        images, masks = batch["images"], batch["masks"]
        losses = self.model.head.loss(self.model(images), masks)
        loss = sum(losses.values())
        batch_size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if len(losses) > 1:
            self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                # Weight decay on conv weights only, not on BatchNorm scales/shifts or biases.
                (decay if param.ndim > 1 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        lr = scaled_lr(hp.lr, hp.lr_reference_batch, self._trainer)
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=hp.momentum)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {hp.optimizer!r}")
        total_steps = hp.max_steps if hp.max_steps is not None else int(self.trainer.estimated_stepping_batches)
        if total_steps < 1:
            raise ValueError(f"the poly schedule needs max_steps >= 1, got {total_steps}")
        # The "poly" policy of DeepLab: lr * (1 - step / total) ** power, updated every step.
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=hp.poly_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def predict_probs(self, images: Tensor) -> Tensor:
        """Probabilities ``[N, K, H, W]`` with this module's ``eval_scales`` / ``eval_flip``."""
        return segment_probs(self.model, images, scales=self.eval_scales, flip=self.eval_flip)

    def _evaluation_step(self, batch: Mapping[str, Any], metric: MeanIoU, prefix: str) -> None:
        images, masks = batch["images"], batch["masks"]
        if self.eval_scales == [1.0] and not self.eval_flip:
            logits = self.model(images)["logits"]
            loss = self.model.head.loss({"logits": logits}, masks)["loss_ce"]
            self.log(f"{prefix}/loss", loss, batch_size=images.shape[0])
            preds = logits.argmax(dim=1)
        else:
            preds = self.predict_probs(images).argmax(dim=1)
        # Padded pixels carry the ignore label: the metric skips them, no cropping needed.
        metric.update(preds, masks)

    def _log_miou(self, metric: MeanIoU, prefix: str) -> None:
        result = metric.compute()
        self.log(f"{prefix}/mIoU", result["mIoU"].float(), prog_bar=prefix == "val")
        self.log(f"{prefix}/pixel_acc", result["pixel_acc"].float())
        self.log(f"{prefix}/mean_acc", result["mean_acc"].float())
        metric.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, self.val_miou, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_miou(self.val_miou, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch, self.test_miou, "test")

    def on_test_epoch_end(self) -> None:
        self._log_miou(self.test_miou, "test")

    @torch.no_grad()
    def predict_images(
        self, images: Sequence[np.ndarray], *, max_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Label maps of RGB ``uint8[H, W, 3]`` arrays through validation's own steps.

        Each image is normalised by the validation transform (full resolution, one at a time
        like ``val_batch_size: 1``) and segmented by :meth:`predict_step`. An image whose longest
        side exceeds ``max_size`` is scaled down for the network (area interpolation) and its
        label map scaled back with nearest neighbours, so huge photos do not need gigabytes.

        Returns:
            Per image ``{"labels": Int64Tensor[H, W], "inference_size": (h, w)}``.
        """
        transform = eval_transforms()
        predictions = []
        for image in images:
            height, width = image.shape[:2]
            longest = max(height, width)
            network_input = image
            if max_size is not None and longest > max_size:
                size = (max(1, round(width * max_size / longest)), max(1, round(height * max_size / longest)))
                network_input = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            tensor = transform(image=network_input)["image"].float()[None].to(self.device)
            inference_size = tuple(int(v) for v in network_input.shape[:2])
            (labels,) = self.predict_step({"images": tensor, "image_sizes": [inference_size]}, 0)
            if inference_size != (height, width):
                labels = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
            predictions.append({"labels": labels.cpu(), "inference_size": inference_size})
        return predictions

    def label_names(self) -> list[str]:
        """Class names by label: saved from the DataModule at training time, else VOC's for 21
        classes, else the label numbers."""
        saved = dict(self.class_names)
        if not saved and self.hparams.num_classes == len(VOC_CLASSES):
            return list(VOC_CLASSES)
        return [saved.get(label, str(label)) for label in range(self.hparams.num_classes)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        if names:
            self.class_names = dict(enumerate(str(name) for name in names))
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = {int(label): str(name) for label, name in checkpoint.get("class_names", {}).items()}

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Tensor]:
        """Per-image label maps ``Tensor[H, W]`` int64, cropped to ``batch["image_sizes"]``."""
        images = batch["images"]
        sizes = batch.get("image_sizes") or [tuple(images.shape[-2:])] * images.shape[0]
        return self.model.head.postprocess({"logits": self.predict_probs(images)}, sizes)
