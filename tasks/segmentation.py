"""Mobile DeepLabv3 semantic segmentation (Sandler et al., 2018, section 6.3, Table 7): the Lightning task.

:class:`DeepLabV3Segmentation` trains and evaluates a segmenter network (see
:mod:`tasks.networks.segmenter`; a config gives it as ``model.init_args.network``) with TF
DeepLab's MobileNetV2 recipe by default (cross-entropy ignoring 255, SGD momentum 0.9, weight
decay 4e-5, "poly" learning rate with power 0.9), mIoU over the validation set, optional
multi-scale / flip evaluation. Batches follow :mod:`tasks.data.contract`: ``images`` (uint8
RGB), ``masks`` (int64, 255 = ignore), ``image_sizes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.evaluation.miou import MeanIoU
from tasks.networks.segmenter import Segmenter, segment_probs
from tasks.optimization import SGD, Poly
from tasks.training import DenseTask


class DeepLabV3Segmentation(DenseTask):
    """Train and evaluate a segmenter network with mIoU.

    Args:
        network: the segmenter (:class:`~tasks.networks.DeepLabV3MobileNetV2` for the paper's).
        training: ``weights_backbone``, ``optimizer``, ``lr_schedule``, ``lr_reference_batch``,
            ``freeze_bn``, ``bn_momentum``, ``channels_last``: see :class:`~tasks.training.DenseTask`.
            The default recipe is TF DeepLab's: SGD 0.007 for batch 16, poly schedule (the VOC
            config adds ``freeze_bn: null``, BatchNorm trained only with >= 12 images).
        eval_scales: input scales averaged at validation / test time (``[1.0]``: single scale).
        eval_flip: also average left-right flipped inputs at validation / test time. Neither is
            stored in checkpoints: pass them again when loading one.
    """

    default_optimizer = SGD(lr=0.007)  # TF DeepLab: for batch 16
    default_lr_schedule = Poly(power=0.9)

    def __init__(
        self,
        network: Segmenter,
        *,
        eval_scales: list[float] = [1.0],  # noqa: B006 - LightningCLI shows the default
        eval_flip: bool = False,
        **training: Any,
    ) -> None:
        if not eval_scales:
            raise ValueError("eval_scales must not be empty")
        super().__init__(network, **training)
        # Evaluation choices are not hyperparameters of the trained model: kept out of the
        # checkpoint so that `validate --ckpt_path X --model.eval_flip true` applies them
        # (LightningCLI restores a checkpoint's hyperparameters over the command line's).
        for name in ("eval_scales", "eval_flip"):
            self.hparams.pop(name, None)
        self.eval_scales = [float(scale) for scale in eval_scales]
        self.eval_flip = eval_flip

    def make_metric(self) -> MeanIoU:
        return MeanIoU(self.network.num_classes, ignore_index=self.network.head.ignore_index)

    # ------------------------------------------------------------------ training
    def training_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        losses = self.network.loss(outputs, batch["masks"])
        return {**losses, "loss": sum(losses.values())}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self.training_losses(self.network(batch["images"]), batch)
        loss = losses.pop("loss")
        batch_size = batch["images"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if len(losses) > 1:
            self.log_dict({f"train/{name}": value for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ evaluation
    def predict_probs(self, images: Tensor) -> Tensor:
        """Probabilities ``[N, K, H, W]`` with this module's ``eval_scales`` / ``eval_flip``."""
        return segment_probs(self.network, images, scales=self.eval_scales, flip=self.eval_flip)

    def evaluation_step(self, batch: Mapping[str, Any], metric: MeanIoU, stage: str) -> list[Tensor]:
        images, masks = batch["images"], batch["masks"]
        if self.eval_scales == [1.0] and not self.eval_flip:
            logits = self.network(images)["logits"]
            loss = self.network.loss({"logits": logits}, masks)["loss_ce"]
            self.log(f"{stage}/loss", loss, batch_size=images.shape[0])
            preds = logits.argmax(dim=1)
        else:
            preds = self.predict_probs(images).argmax(dim=1)
        # Padded pixels carry the ignore label: the metric skips them, no cropping needed.
        metric.update(preds, masks)
        return [labels[: int(height), : int(width)] for labels, (height, width) in zip(preds, batch["image_sizes"])]

    def log_metric(self, metric: MeanIoU, stage: str) -> None:
        result = metric.compute()
        self.log(f"{stage}/mIoU", result["mIoU"].float(), prog_bar=stage == "val")
        self.log(f"{stage}/pixel_acc", result["pixel_acc"].float())
        self.log(f"{stage}/mean_acc", result["mean_acc"].float())

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Tensor]:
        """Per-image label maps ``Tensor[H, W]`` int64, cropped to ``batch["image_sizes"]``."""
        images = batch["images"]
        sizes = batch.get("image_sizes")
        if sizes is None:
            sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.network.postprocess({"logits": self.predict_probs(images)}, sizes)

    def network_input(self, image: np.ndarray, *, max_size: int | None = None) -> Tensor:
        """What validation feeds the network for an RGB ``uint8[H, W, 3]`` array: the image itself,
        ``uint8[3, H, W]`` (``eval_transforms``: full resolution). An image whose longest side
        exceeds ``max_size`` is scaled down to it (area interpolation), so huge photos do not
        need gigabytes."""
        height, width = image.shape[:2]
        longest = max(height, width)
        if max_size is not None and longest > max_size:
            size = (max(1, round(width * max_size / longest)), max(1, round(height * max_size / longest)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return torch.from_numpy(image.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def predict_images(
        self, images: Sequence[np.ndarray], *, max_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Label maps of RGB ``uint8[H, W, 3]`` arrays through validation's own steps.

        Each image is segmented at full resolution, one at a time (like ``eval_batch_size: 1``),
        by :meth:`predict_step`. An image whose longest
        side exceeds ``max_size`` is scaled down for the network (area interpolation) and its
        label map scaled back with nearest neighbours, so huge photos do not need gigabytes.

        Returns:
            Per image ``{"labels": Int64Tensor[H, W], "inference_size": (h, w)}``.
        """
        predictions = []
        for image in images:
            height, width = image.shape[:2]
            tensor = self.network_input(image, max_size=max_size)[None].to(self.device)
            inference_size = tuple(int(v) for v in tensor.shape[-2:])
            (labels,) = self.predict_step({"images": tensor, "image_sizes": [inference_size]}, 0)
            if inference_size != (height, width):
                labels = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
            predictions.append({"labels": labels.cpu(), "inference_size": inference_size})
        return predictions
