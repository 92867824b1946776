"""Training order and augmentation randomness that depend only on (seed, epoch), and skipping.

A run resumed from an end-of-epoch checkpoint must see the same images in the same order with
the same augmentations as the run that was never stopped. PyTorch's defaults do not allow that:
``RandomSampler`` and the DataLoader's worker seeds draw from the global RNG, whose state is not
in the checkpoint, and a pipeline's own RNG runs on across epochs (and per worker). So:

* :class:`EpochSampler` shuffles with ``(seed, epoch)`` (a ``DistributedSampler``, so Lightning
  keeps it under DDP instead of injecting its own, and each rank takes its share), and tells
  the dataset the epoch;
* :class:`SampleSeeds` gives sample ``index`` of ``epoch`` the augmentation seed
  ``f(seed, epoch, index)``, through shared memory so persistent workers see the new epoch.
  The same images come out whatever ``num_workers`` is;
* :func:`load_skipping` replaces an unreadable sample by the next readable one when asked to,
  and records what it skipped (the batch carries the messages; see ``SkippedSamplesReport``);
* :class:`ResumableTrainingData` puts these together for the DataModules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from tasks.data.files import UnreadableSampleError

logger = logging.getLogger(__name__)

SKIPPED_KEY = "skipped_samples"


def derived_seed(*keys: int) -> int:
    """A 32-bit seed from integers (NumPy's ``SeedSequence``: well mixed, no collisions in practice)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class SampleSeeds:
    """Per-sample augmentation seeds ``f(seed, epoch, index)`` once an epoch is set.

    Before :meth:`set_epoch` is first called (a dataset used outside the training loader)
    ``__call__`` returns None and the pipeline keeps its own free-running RNG.

    Args:
        seed: the run's seed (``seed_everything``'s, see :func:`global_seed`).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        # Shared memory: DataLoader workers (persistent or not) read the epoch the main process set.
        self._epoch = torch.full((), -1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int | None:
        epoch = int(self._epoch)
        return None if epoch < 0 else epoch

    def __call__(self, index: int) -> int | None:
        epoch = self.epoch
        return None if epoch is None else derived_seed(self.seed, epoch, index)


def global_seed(default: int | None = 0) -> int | None:
    """The seed ``seed_everything`` exported (``PL_GLOBAL_SEED``), or ``default`` without one."""
    try:
        return int(os.environ["PL_GLOBAL_SEED"])
    except (KeyError, ValueError):
        return default


class EpochSampler(DistributedSampler):
    """Shuffled indices that depend only on ``(seed, epoch)``; one rank's share under DDP.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also after a resume, with
    the restored epoch); the dataset's ``set_epoch`` is called too, when it has one.

    Args:
        dataset: the training set.
        num_replicas, rank: the DDP world size and this process's global rank (1 and 0 alone).
        seed: base seed of the permutation.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(epoch)

    def __iter__(self):  # noqa: ANN204 - the base class's iterator
        self.set_epoch(self.epoch)  # the dataset follows even when nobody called set_epoch
        return super().__iter__()


def epoch_sampler(dataset: Dataset, trainer: Any = None, *, epoch: int = 0) -> EpochSampler:
    """The training sampler: this rank's share (``trainer.world_size`` / ``global_rank``; the
    whole set without a trainer) of a shuffle seeded by ``(seed_everything's seed, epoch)``,
    starting at ``epoch`` (see :func:`sampler_epoch_state`)."""
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=global_seed())
    sampler.set_epoch(epoch)
    return sampler


def sampler_epoch_state(trainer: Any) -> dict[str, int]:
    """What a DataModule's ``state_dict`` saves so that a resumed run starts at the right order.

    Lightning creates the first training iterator (and, with workers, prefetches its indices)
    *before* it calls ``sampler.set_epoch`` with the restored epoch, so the first epoch after a
    resume would otherwise follow the sampler's initial epoch 0. The DataModule's state is
    restored before that iterator exists: it hands the saved value to :func:`epoch_sampler`.
    The value is the one the fit loop passes to ``set_epoch`` after a restore.
    """
    loop = getattr(trainer, "fit_loop", None)
    return {"train_sampler_epoch": int(loop.epoch_progress.current.processed) if loop is not None else 0}


def load_skipping(
    index: int, length: int, load: Callable[[int], dict[str, Any]], *, skip: bool
) -> dict[str, Any]:
    """``load(index)``; with ``skip``, unreadable samples are replaced by the next readable one.

    Replacing (rather than dropping) keeps every batch full and every DDP rank at the same
    number of steps. The sample gets ``SKIPPED_KEY``: the messages of the samples it replaced.

    Raises:
        UnreadableSampleError: when ``skip`` is off, or when no sample at all can be read.
    """
    skipped: list[str] = []
    for offset in range(length):
        candidate = (index + offset) % length
        try:
            sample = load(candidate)
        except UnreadableSampleError as error:
            if not skip:
                raise
            message = str(error).splitlines()[0]
            logger.warning("%s; skipped (data.skip_unreadable is on)", message)
            skipped.append(message)
            continue
        sample[SKIPPED_KEY] = skipped
        return sample
    raise UnreadableSampleError(f"none of the {length} samples can be read; the last error: {skipped[-1]}")


def attach_skipped(batch: dict[str, Any], samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``batch`` with all skip messages of its ``samples`` under ``SKIPPED_KEY``, when there are any
    (only when ``skip_unreadable`` replaced something; the DataModule removes them again)."""
    skipped = [message for sample in samples for message in sample.get(SKIPPED_KEY, ())]
    if skipped:
        batch[SKIPPED_KEY] = skipped
    return batch


class SkipCounter:
    """Counts skipped samples in the main process (a DataModule's ``on_before_batch_transfer``)."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, batch: Any) -> Any:
        """Remove the skip messages from ``batch`` (tasks never see them) and count them."""
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            batch = dict(batch)
            self.count += len(batch.pop(SKIPPED_KEY))
        return batch

    def reset(self) -> int:
        """The count so far; starts again from 0."""
        count, self.count = self.count, 0
        return count


class ResumableTrainingData:
    """What both DataModules add for exact resume and ``skip_unreadable`` (a mixin, listed before
    ``LightningDataModule``): the training sampler, its epoch in checkpoints, skip counting."""

    trainer: Any

    def _init_resumable(self) -> None:
        self.skipped = SkipCounter()
        self._start_epoch = 0  # the training sampler's first epoch (after a resume: load_state_dict)

    def train_sampler(self, dataset: Dataset) -> EpochSampler:
        """This rank's share of the ``(seed, epoch)`` shuffle, from the restored epoch on."""
        return epoch_sampler(dataset, self.trainer, epoch=self._start_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch the training sampler resumes at."""
        return sampler_epoch_state(self.trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("train_sampler_epoch", 0))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count (and remove) the training set's skip messages, in the main process."""
        return self.skipped.take(batch)
