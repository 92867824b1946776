"""SSDLite object detection (MobileNetV2 paper, section 6.2, Table 6): the Lightning task.

:class:`SSDLiteDetection` trains and evaluates a detector network (see
:mod:`tasks.networks.detector`; a config gives it as ``model.init_args.network``) with COCO box
mAP. Batches follow :mod:`tasks.data.contract`: ``images`` (uint8 RGB), ``targets`` (absolute
xyxy boxes in the network input, labels ``1..K``, crowd regions), ``image_ids`` and
``image_sizes`` (the original images'). COCO mAP takes its ground truth and the label ->
category-id map from the DataModule's ``dataset_info()``; the task never opens a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from tasks.data.contract import DatasetInfo
from tasks.data.detection_transforms import detection_eval_transform
from tasks.evaluation.coco_map import SUMMARY_KEYS, Backend, COCOMeanAveragePrecision
from tasks.networks.detector import SSDLite
from tasks.networks.torchvision_detectors import TorchvisionSSDLite
from tasks.optimization import SGD, WarmupCosine
from tasks.training import DenseTask


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
        return f"{problem}; set --model.network.num_classes {data_num_classes}"
    count = len(labels)
    return (
        f"{problem}: its {count} categories are labelled by their ids (data.contiguous_labels false); "
        f"either number them 1..{count} with --data.contiguous_labels true --model.network.num_classes {count + 1}, "
        f"or keep one logit per id with --model.network.num_classes {data_num_classes} (the "
        f"{data_num_classes - 1 - count} ids without a category are masked out)"
    )


class SSDLiteDetection(DenseTask):
    """Train and evaluate an SSDLite network on COCO-style data with COCO box mAP.

    Args:
        network: the detector (:class:`~tasks.networks.SSDLiteMobileNetV2` for the paper's).
        training: ``weights_backbone``, ``optimizer``, ``lr_schedule``, ``lr_reference_batch``,
            ``freeze_bn``, ``bn_momentum``, ``channels_last``: see :class:`~tasks.training.DenseTask`.
            The default recipe is torchvision's SSDLite one: SGD 0.15 for batch 192, 1000
            warm-up steps, cosine.
        box_loss_weight: weight of ``loss_box`` in the total (1 in SSD and the TF configs).
        eval_backend: COCOeval implementation (see :func:`~tasks.evaluation.coco_map.evaluate_detections`).
    """

    default_optimizer = SGD(lr=0.15)  # torchvision's SSDLite: for batch 192 (8 GPUs x 24)
    default_lr_schedule = WarmupCosine(warmup_steps=1000, warmup_factor=0.001)

    def __init__(
        self,
        network: SSDLite | TorchvisionSSDLite,
        *,
        box_loss_weight: float = 1.0,
        eval_backend: Backend = "auto",
        **training: Any,
    ) -> None:
        self.eval_backend = eval_backend
        super().__init__(network, **training)

    def make_metric(self) -> COCOMeanAveragePrecision:
        return COCOMeanAveragePrecision(backend=self.eval_backend)

    # ------------------------------------------------------------------ data wiring
    def num_classes_advice(self, info: DatasetInfo) -> str:
        return num_classes_advice(info.num_classes, self.num_classes, info.label_to_category_id)

    def check_data(self, info: DatasetInfo, stage: str) -> None:
        if info.label_to_category_id and stage in ("fit", "validate", "test"):
            # Label slots without a category (the 10 unused COCO ids with 91 logits) are masked
            # out of the loss and the scores: the detector never emits a label it cannot name.
            # A checkpoint restored after setup brings the same mask (it is a buffer).
            self.network.set_valid_labels(info.label_to_category_id)
            unused = (~self.network.valid_labels[1:]).nonzero().flatten().add(1).tolist()
            if unused:
                rank_zero_info(
                    f"{len(unused)} of {self.num_classes - 1} label slots have no category and are masked out: {unused}"
                )
        if info.image_size is not None and info.image_size != self.network.image_size:
            rank_zero_warn(
                f"the data's image_size {info.image_size} differs from the network's {self.network.image_size}: "
                "the network runs at the data's size (it is fully convolutional), but its anchors were "
                "designed for its own"
            )
        for split, metric in self.metrics.items():
            if split in info.coco_ground_truth:
                metric.set_ground_truth(info.coco_ground_truth[split], info.label_to_category_id)

    # ------------------------------------------------------------------ steps
    def training_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        losses = self.network.loss(outputs, batch["targets"], tuple(batch["images"].shape[-2:]))
        losses["loss"] = losses["loss_cls"] + self.hparams.box_loss_weight * losses["loss_box"]
        return losses

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self.training_losses(self.network(batch["images"]), batch)
        batch_size = batch["images"].shape[0]
        for name in ("loss", "loss_cls", "loss_box"):
            self.log(f"train/{name}", losses[name], prog_bar=True, batch_size=batch_size)
        return losses["loss"]

    def evaluation_step(
        self, batch: Mapping[str, Any], metric: COCOMeanAveragePrecision, stage: str
    ) -> list[dict[str, Any]]:
        if metric.coco_gt is None:
            raise RuntimeError(
                "COCO mAP needs the ground truth: use a DataModule whose dataset_info() has "
                f"coco_ground_truth['{stage}'] (tasks.data.coco.COCODetectionDataModule), or call "
                f"task.metrics['{stage}'].set_ground_truth(...)"
            )
        outputs = self.network(batch["images"])
        losses = self.training_losses(outputs, batch)
        self.log(f"{stage}/loss", losses["loss"], batch_size=batch["images"].shape[0], sync_dist=True)
        # Normalised boxes map straight onto the original images: COCO results need their pixels.
        detections = self.network.postprocess(outputs, batch["image_sizes"])
        metric.update(batch["image_ids"], detections)
        return [{"image_id": image_id, **detection} for image_id, detection in zip(batch["image_ids"], detections)]

    def log_metric(self, metric: COCOMeanAveragePrecision, stage: str) -> None:
        # compute() gathers every rank's detections, so each rank evaluates the whole set and
        # logs the same numbers (no further reduction; ModelCheckpoint sees them on every rank).
        results = metric.compute()
        for key in SUMMARY_KEYS:
            self.log(f"{stage}/{key}", results[key], prog_bar=key in ("AP", "AP50"))

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per image: ``image_id`` and ``boxes`` (xyxy, original pixels), ``scores``, ``labels``."""
        detections = self.network.postprocess(self.network(batch["images"]), batch["image_sizes"])
        return [{"image_id": image_id, **detection} for image_id, detection in zip(batch["image_ids"], detections)]

    def network_input(self, image: np.ndarray, *, max_size: int | None = None) -> Tensor:
        """What validation feeds the network for an RGB ``uint8[H, W, 3]`` array: ``uint8[3, S, S]``
        after ``detection_eval_transform`` (the fixed SSD resize to the network's ``image_size``).
        ``max_size`` is unused: the input is resized anyway."""
        no_boxes = {"bboxes": np.zeros((0, 4), dtype=np.float32), "labels": [], "is_crowd": []}
        resized = detection_eval_transform(self.network.image_size)(image=image, **no_boxes)["image"]
        return torch.from_numpy(resized.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def predict_images(self, images: Sequence[np.ndarray], *, max_size: int | None = None) -> list[dict[str, Any]]:
        """Detections on RGB ``uint8[H, W, 3]`` arrays through validation's own steps.

        :meth:`network_input` (the validation transform) and :meth:`predict_step`, so a picture from
        ``tools/predict.py`` shows what validation scored. ``max_size`` is unused: the input is
        resized anyway.

        Returns:
            Per image ``boxes`` (FloatTensor[D, 4] absolute xyxy in the image), ``scores``, ``labels``.
        """
        inputs = [self.network_input(image) for image in images]
        batch = {
            "images": torch.stack(inputs).to(self.device),
            "image_sizes": torch.tensor([image.shape[:2] for image in images], dtype=torch.int64),
            "image_ids": list(range(len(images))),
        }
        return [
            {key: value for key, value in detection.items() if key != "image_id"}
            for detection in self.predict_step(batch, 0)
        ]
