"""Lightning callbacks for long runs: per-epoch seeding (exact resume) and skipped-sample reports.

``tools/train.py`` adds both to every run; with the Python API pass them to ``Trainer(callbacks=...)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from tasks.data.sampling import derived_seed, global_seed


class SeedEveryEpoch(Callback):
    """Re-seed Python, NumPy and torch (CPU and CUDA) at the start of every training epoch.

    The seed is ``f(seed, epoch, global rank)``. Dropout and anything else drawing from the global
    RNGs then depends on the epoch only, not on what ran before in the process (the RNG state is
    not in checkpoints): a run resumed from an end-of-epoch checkpoint continues exactly as the
    uninterrupted run. Ranks get different streams (different dropout masks per rank).

    Args:
        seed: the base seed; ``seed_everything``'s (``PL_GLOBAL_SEED``) when None. Without
            either the callback does nothing (the run is not meant to be reproducible).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        base = int(self.seed) if self.seed is not None else global_seed(default=None)
        if base is None:
            return
        seed = derived_seed(base, trainer.current_epoch, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA device


class SkippedSamplesReport(Callback):
    """At the end of every training epoch, log how many samples ``skip_unreadable`` skipped.

    Reads (and resets) the DataModule's ``skipped`` counter (:class:`~tasks.data.sampling.
    SkipCounter`), sums it over DDP ranks, logs ``train/skipped_samples`` and warns when it is
    not zero. Does nothing for DataModules without the counter.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        counter = getattr(trainer.datamodule, "skipped", None) if trainer.datamodule is not None else None
        if counter is None or not hasattr(counter, "reset"):
            return
        count = torch.tensor(float(counter.reset()), device=pl_module.device)
        total = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        pl_module.log("train/skipped_samples", float(total), rank_zero_only=True)
        if total:
            rank_zero_warn(
                f"epoch {trainer.current_epoch}: skipped {total} unreadable training samples "
                "(data.skip_unreadable is on; each was logged with its path above)"
            )
