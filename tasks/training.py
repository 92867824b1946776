"""What both Lightning tasks share: a network given from outside, and only the training concerns.

:class:`DenseTask` receives its network (a plain ``nn.Module`` from :mod:`tasks.networks`,
written in a config as ``model.init_args.network: {class_path: ..., init_args: ...}``) and
adds the optimiser recipe and schedule (:mod:`tasks.optimization`), linear lr scaling, the
BatchNorm policy, backbone weight loading, the val/test hooks around one metric per stage, and
what a checkpoint must remember about the data (class names, label -> category ids, input size).
Subclasses implement the steps that differ: the loss, one evaluation step, and inference on images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import Metric

from backbones.mobilenetv2 import imagenet_state_dict
from tasks.buildable import Buildable, build, config_of
from tasks.data.contract import DatasetInfo, DescribesData
from tasks.lr_scaling import scaled_lr
from tasks.optimization import OptimizerRecipe, Schedule, lr_lambda

# TF DeepLab (train.py): "Set to True if one wants to fine-tune the batch norm parameters ...
# it is recommended to use train_batch_size >= 12".
MIN_BATCH_TO_TRAIN_BN = 12
STAGES = ("val", "test")
# The checkpoint key that names the task's class (see DenseTask.on_save_checkpoint).
TASK_CLASS_KEY = "task_class_path"


def built(value: Any, expected: type, name: str) -> Any:
    """``value`` itself, or the object a saved ``{class_path, init_args}`` config describes."""
    return build(value, expected, source=f"saved {name}") if isinstance(value, Mapping) else value


class DenseTask(LightningModule, ABC):
    """A network plus its training recipe.

    Args:
        network: the network to train (see :mod:`tasks.networks`).
        weights_backbone: ``None``, ``"imagenet"`` (torchvision's weights) or a state-dict path,
            loaded into ``network.backbone`` when ``fit`` starts (so building the task to count,
            load or export it never downloads).
        optimizer: the optimiser recipe; its ``lr`` is for ``lr_reference_batch`` images. None:
            the task's paper recipe (``default_optimizer``).
        lr_schedule: the learning-rate factor per optimiser step. None: the task's
            (``default_lr_schedule``).
        lr_reference_batch: the effective batch ``optimizer.lr`` is given for; the lr used is
            ``lr x batch_size x world_size x accumulate_grad_batches / lr_reference_batch``
            (linear scaling, logged once when fitting starts). None: ``lr`` as given.
        freeze_bn: keep every BatchNorm in inference mode with fixed scale and shift. ``None``
            (the VOC config's)
            decides as TF DeepLab on the first training batch: train BatchNorm only if it
            normalises over 12 images or more (per device, or across devices with
            ``--trainer.sync_batchnorm true``).
        bn_momentum: BatchNorm running-statistics momentum (None: the network's own).
        channels_last: keep the weights, and so the activations, channels-last: the same
            numbers, faster on CPUs (oneDNN's depthwise convolutions; ``tools/benchmark.py
            --only models`` times ours both ways for inference), tensor-core friendly on GPUs.
    """

    # The recipe a task trains with when the config names none (set by each task).
    default_optimizer: ClassVar[OptimizerRecipe]
    default_lr_schedule: ClassVar[Schedule]

    def __init__(
        self,
        network: nn.Module,
        *,
        weights_backbone: str | None = None,
        optimizer: OptimizerRecipe | None = None,
        lr_schedule: Schedule | None = None,
        lr_reference_batch: int | None = None,
        freeze_bn: bool | None = False,
        bn_momentum: float | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        # load_from_checkpoint passes the saved configs back: rebuild them (allow-listed).
        network = built(network, nn.Module, "network")
        optimizer = built(optimizer, OptimizerRecipe, "optimizer") or self.default_optimizer
        lr_schedule = built(lr_schedule, Schedule, "lr_schedule") or self.default_lr_schedule
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_schedule"])
        # Saved as plain configs (class path + arguments), never as pickled objects: a
        # checkpoint rebuilds them through tasks.buildable's allow-list.
        for name, value in (("network", network), ("optimizer", optimizer), ("lr_schedule", lr_schedule)):
            if isinstance(value, Buildable):
                self.hparams[name] = config_of(value)
            else:
                self.hparams.pop(name, None)
                rank_zero_warn(
                    f"{name} {type(value).__name__} does not record its arguments (tasks.buildable.Buildable): "
                    f"checkpoints will need it passed again, as load_from_checkpoint(path, {name}=...)"
                )
        self.network = network
        self.optimizer_recipe = optimizer
        self.lr_schedule = lr_schedule
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        if bn_momentum is not None:
            for module in self.batch_norms():
                module.momentum = bn_momentum
        self.bn_frozen: bool | None = freeze_bn
        if freeze_bn:
            self.freeze_batch_norm()
        self.metrics = nn.ModuleDict({stage: self.make_metric() for stage in STAGES})
        # What the data told the task (saved in checkpoints): names for pictures and tools,
        # category ids for COCO results files, the input size predict resizes to.
        self.class_names: dict[int, str] = {}
        self.label_to_category_id: dict[int, int] = {}
        self._backbone_weights_loaded = False

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's, after the checkpoint passed this project's safety checks (weights only,
        allow-listed class paths: see :mod:`tasks.checkpoints`), so no class a file names is
        imported before it is checked."""
        from tasks.checkpoints import check_before_loading

        check_before_loading(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ subclass contract
    @abstractmethod
    def make_metric(self) -> Metric:
        """A fresh evaluation metric (one per stage)."""

    @abstractmethod
    def evaluation_step(self, batch: Mapping[str, Any], metric: Metric, stage: str) -> list[Any]:
        """Update ``metric`` with one batch (and log the ``{stage}/loss`` if it has one); return
        the batch's predictions as :meth:`predict_step` gives them (callbacks such as
        ``tools/test.py``'s prediction files reuse them)."""

    @abstractmethod
    def training_losses(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The losses of a training batch from the network's ``outputs`` on ``batch["images"]``,
        their total under ``"loss"``: what :meth:`training_step` and quantisation-aware
        fine-tuning (:mod:`tasks.qat`, another network's outputs) minimise."""

    @abstractmethod
    def log_metric(self, metric: Metric, stage: str) -> None:
        """Log ``metric.compute()`` under ``{stage}/...``."""

    def check_data(self, info: DatasetInfo, stage: str) -> None:
        """Refuse data the network cannot learn (e.g. more labels than logits); adapt to it."""

    @abstractmethod
    def predict_images(self, images: Sequence[np.ndarray], *, max_size: int | None = None) -> list[dict[str, Any]]:
        """Predictions on RGB ``uint8[H, W, 3]`` arrays through validation's own steps."""

    @abstractmethod
    def network_input(self, image: np.ndarray, *, max_size: int | None = None) -> Tensor:
        """What validation feeds the network for an RGB ``uint8[H, W, 3]`` array (``uint8[3, h, w]``):
        the one preprocessing of predictions, exports and INT8 calibration."""

    # ------------------------------------------------------------------ network
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``images[N, 3, H, W]`` RGB 0..255 -> the network's outputs."""
        return self.network(images)

    @property
    def num_classes(self) -> int:
        return int(self.network.num_classes)

    def label_names(self) -> list[str]:
        """Class names by label, as the training data named them ("background" for label 0 when
        the data names no background); the label number otherwise."""
        names = {0: "background", **self.class_names}
        return [names.get(label, str(label)) for label in range(self.num_classes)]

    # ------------------------------------------------------------------ data
    def dataset_info(self) -> DatasetInfo | None:
        """The trainer's DataModule's description of its data, if it gives one."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule.dataset_info() if isinstance(datamodule, DescribesData) else None

    def prepare_data(self) -> None:
        """Download the ImageNet backbone weights once per node before the ranks load them."""
        if self.hparams.weights_backbone == "imagenet":
            imagenet_state_dict()

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.weights_backbone and not self._backbone_weights_loaded:
            # Before a checkpoint is restored (Lightning restores after setup): --ckpt_path wins.
            self.network.backbone.load_weights(self.hparams.weights_backbone)
            self._backbone_weights_loaded = True
        info = self.dataset_info()
        if info is None:
            return
        if info.num_classes > self.num_classes:
            raise ValueError(self.num_classes_advice(info))
        if info.class_names:
            self.class_names = {int(label): str(name) for label, name in info.class_names.items()}
        if info.label_to_category_id:
            self.label_to_category_id = {int(k): int(v) for k, v in info.label_to_category_id.items()}
        self.check_data(info, stage)

    def num_classes_advice(self, info: DatasetInfo) -> str:
        """One line for a network with too few logits for the data."""
        return (
            f"the data has labels up to {info.num_classes - 1} but the network has num_classes="
            f"{self.num_classes} (background included); set --model.network.num_classes {info.num_classes}"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The task's class, also when no LightningCLI recorded it as hyper_parameters["_class_path"]
        # (a task built in Python): tasks.checkpoints.load_task rebuilds it from there (allow-listed).
        # Not a hyper-parameter: load_from_checkpoint would pass it to __init__.
        checkpoint[TASK_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["class_names"] = dict(self.class_names)
        checkpoint["label_to_category_id"] = dict(self.label_to_category_id)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = {int(k): str(v) for k, v in checkpoint.get("class_names", {}).items()}
        self.label_to_category_id = {int(k): int(v) for k, v in checkpoint.get("label_to_category_id", {}).items()}

    # ------------------------------------------------------------------ batch norm policy
    def batch_norms(self) -> list[_BatchNorm]:
        return [module for module in self.network.modules() if isinstance(module, _BatchNorm)]

    def freeze_batch_norm(self) -> None:
        """Every BatchNorm in inference mode, its scale and shift fixed."""
        self.bn_frozen = True
        for module in self.batch_norms():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> DenseTask:
        """Switch mode; frozen BatchNorm layers stay in inference mode."""
        super().train(mode)
        if mode and self.bn_frozen:
            for module in self.batch_norms():
                module.eval()
        return self

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.bn_frozen is None:  # freeze_bn=None: TF DeepLab's rule, decided once
            per_device = int(batch["images"].shape[0])
            synced = any(isinstance(module, nn.SyncBatchNorm) for module in self.network.modules())
            normalised_over = per_device * (self.trainer.world_size if synced else 1)
            if normalised_over < MIN_BATCH_TO_TRAIN_BN:
                self.freeze_batch_norm()
            else:
                self.bn_frozen = False

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        recipe = self.optimizer_recipe
        optimizer = recipe.build(self.network, scaled_lr(recipe.lr, self.hparams.lr_reference_batch, self._trainer))
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.lr_schedule, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation hooks
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Any]:
        return self.evaluation_step(batch, self.metrics["val"], "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Any]:
        return self.evaluation_step(batch, self.metrics["test"], "test")

    def on_validation_epoch_end(self) -> None:
        self.log_metric(self.metrics["val"], "val")
        self.metrics["val"].reset()

    def on_test_epoch_end(self) -> None:
        self.log_metric(self.metrics["test"], "test")
        self.metrics["test"].reset()
