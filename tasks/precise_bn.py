"""Precise BatchNorm: re-estimate BatchNorm statistics on training images before validation.

BatchNorm's running averages follow the weights with a lag (momentum 0.1 or less, 0.03 in the
SSDLite head): after a short or from-scratch run they describe weights of many steps ago, and a
validation with them can score far below what the weights deliver (AP50 0.016 with the running
averages against 0.70 re-estimated, on one of our short runs). detectron2's ``PreciseBN`` hook
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, section 3) fixes this by recomputing the
statistics as true averages over a few hundred training images with the current weights; so does
:class:`PreciseBatchNorm`, before every validation of ``fit``.

What it guarantees:

* only BatchNorm layers that train are re-estimated: frozen stages and ``freeze_bn`` stay as they are;
* nothing else changes: no weight, no optimiser state, no RNG stream (Python, NumPy, torch and
  CUDA states are restored), no position of the training loader (a separate loader over the
  same dataset reads the images), so a run stays exactly resumable;
* the images are a fixed function of (seed, global step) with the training augmentation;
  under DDP every rank reads its own share and the statistics are averaged over ranks, so all
  ranks hold the same numbers;
* the re-estimated statistics are saved with the checkpoints written after the validation, so
  ``validate``, ``tools/test.py`` and ``tools/predict.py`` on those checkpoints use them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset

from tasks.data.sampling import SKIPPED_KEY, derived_seed, global_seed


@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Run a block without moving any global random stream (Python, NumPy, torch, CUDA)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def training_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers that are in training mode and track running statistics (not frozen ones)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Replace the running mean / variance of ``model``'s training BatchNorms by their average over ``batches``.

    ``model`` must be in training mode (frozen BatchNorms in eval mode are left alone). Uses
    PyTorch's cumulative average (``momentum=None``): every batch weighs the same.

    Returns:
        The number of batches used (0 leaves the statistics unchanged).
    """
    layers = training_batchnorms(model)
    if not layers:
        return 0
    saved = [(layer.momentum, layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    count = 0
    for images in batches:
        model(images)
        count += 1
    for layer, (momentum, mean, var) in zip(layers, saved):
        layer.momentum = momentum
        if count == 0:  # nothing seen: keep what was there
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    return count


class PreciseBatchNorm(Callback):
    """Before every validation of ``fit``, re-estimate BatchNorm statistics on training images.

    Add it to a config's ``trainer.callbacks`` (``- class_path: tasks.precise_bn.PreciseBatchNorm``);
    the synthetic configs and the demo do. See the module docs for what it guarantees.

    Args:
        num_images: training images used in total (across DDP ranks); detectron2 uses 200
            batches, a few hundred images is enough for MobileNetV2's layers.
        batch_size: images per forward pass (the training loader's batch size when None;
            BatchNorm statistics are per-batch, so keep it like training's).
    """

    def __init__(self, num_images: int = 256, batch_size: int | None = None) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        self.num_images = num_images
        self.batch_size = batch_size

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            return  # several training loaders: nothing sensible to pick
        was_training = pl_module.training
        pl_module.train()  # the task's own train(): frozen layers stay in eval mode
        layers = training_batchnorms(pl_module)
        try:
            with preserved_rng_states():
                count = self._estimate(trainer, pl_module, loader)
        finally:
            pl_module.train(was_training)
        if count:
            average_over_ranks(trainer, layers)
            rank_zero_info(f"precise BatchNorm: statistics re-estimated on {count} training batches")

    def _estimate(self, trainer: Trainer, pl_module: LightningModule, loader: DataLoader) -> int:
        seed = derived_seed(global_seed() or 0, trainer.global_step)
        return reestimate_from_loader(
            pl_module, loader, num_images=self.num_images, batch_size=self.batch_size, seed=seed,
            datamodule=trainer.datamodule, rank=trainer.global_rank, world_size=trainer.world_size,
        )  # fmt: skip


def reestimate_from_loader(
    pl_module: LightningModule,
    loader: DataLoader,
    *,
    num_images: int,
    seed: int,
    batch_size: int | None = None,
    datamodule: LightningDataModule | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Re-estimate ``pl_module``'s training BatchNorms on ``num_images`` images of ``loader``'s dataset.

    The images are ``loader``'s dataset at a permutation drawn from ``seed`` (with its
    augmentation), read by a loader of their own, so ``loader``'s position is untouched; each of
    ``world_size`` ranks reads its share. ``pl_module`` must be in training mode.

    Returns:
        The number of batches used.
    """
    dataset: Dataset = loader.dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    share = order[:num_images][rank::world_size].tolist()
    if not share:
        return 0
    images_loader = DataLoader(
        Subset(dataset, share),
        batch_size=batch_size or loader.batch_size or 1,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        worker_init_fn=loader.worker_init_fn,
    )

    def images() -> Iterator[torch.Tensor]:
        for batch in images_loader:
            if isinstance(batch, dict):
                batch = {key: value for key, value in batch.items() if key != SKIPPED_KEY}
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            if datamodule is not None:
                batch = datamodule.on_after_batch_transfer(batch, 0)
            yield batch["images"]

    return update_bn_stats(pl_module, images())


def average_over_ranks(trainer: Trainer, layers: list[_BatchNorm]) -> None:
    """Average the running statistics of ``layers`` over DDP ranks (each estimated its own share)."""
    if trainer.world_size <= 1:
        return
    for layer in layers:
        layer.running_mean.copy_(trainer.strategy.reduce(layer.running_mean, reduce_op="mean"))
        layer.running_var.copy_(trainer.strategy.reduce(layer.running_var, reduce_op="mean"))
