"""How both DataModules load: training order and augmentation randomness that depend only on
(seed, epoch), worker seeding, DDP-safe evaluation sampling, and skipping unreadable samples.

A run resumed from a checkpoint (at the end of an epoch or in the middle of one) must see the
same images in the same order with the same augmentations as the run that was never stopped.
PyTorch's defaults do not allow that: ``RandomSampler`` and the DataLoader's worker seeds draw
from the global RNG, whose state is not in the checkpoint, and a pipeline's own RNG runs on
across epochs (and per worker). So:

* :class:`EpochSampler` shuffles with ``(seed, epoch)`` (a ``DistributedSampler``, so Lightning
  keeps it under DDP instead of injecting its own, and each rank takes its share), tells the
  dataset the epoch, and can start an epoch part-way (:meth:`EpochSampler.resume_at`);
* :class:`SampleSeeds` gives sample ``index`` of ``epoch`` the augmentation seed
  ``f(seed, epoch, index)``, through shared memory so persistent workers see the new epoch.
  The same images come out whatever ``num_workers`` is;
* :func:`load_skipping` replaces an unreadable sample by the next readable one when asked to,
  and records what it skipped (the batch carries the messages; see ``SkippedSamplesReport``);
* :class:`SeededAugmentation` (both datasets) seeds the pipeline per sample in training and from
  torch's seed of the process otherwise; :func:`seed_worker` is both loaders' ``worker_init_fn``;
* :class:`DenseDataModule` puts these together for the DataModules (the base of both): one way
  to build loaders from the same options, an evaluation sampler that never repeats an image
  under DDP, and a checkpoint state that is the epoch and the number of samples already
  trained on in it (:func:`sampler_position`).
"""

from __future__ import annotations

import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from tasks.data.contract import DatasetInfo
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


class SeededAugmentation:
    """Where a dataset's augmentation randomness comes from (a mixin of both datasets).

    albumentations' ``Compose`` owns its random generator, so forked DataLoader workers would all
    inherit one state and repeat each other's augmentations. :meth:`seed_transform`, called
    before each sample, seeds the pipeline

    * with ``seeds(index)`` (:class:`SampleSeeds`) once the training sampler has set an epoch:
      the same augmentation whatever ``num_workers`` is, and after a resume;
    * otherwise from ``torch.initial_seed()`` whenever that changes: torch gives every worker
      (and every epoch) its own, and in the main process it is ``torch.manual_seed``'s (so
      ``seed_everything`` makes the augmentations reproducible).

    Needs ``transform`` (a pipeline with ``set_random_seed``, or None) and ``seeds``.
    """

    transform: Any
    seeds: SampleSeeds | None
    _torch_seed: int | None = None  # the torch seed the pipeline was last seeded from

    def set_epoch(self, epoch: int) -> None:
        """Per-sample augmentation seeds from now on follow ``(seed, epoch, index)``."""
        if self.seeds is not None:
            self.seeds.set_epoch(epoch)

    def seed_transform(self, index: int) -> None:
        """Seed the pipeline for sample ``index`` (see the class)."""
        seed = self.seeds(index) if self.seeds is not None else None
        if seed is None:
            self.reseed_from_torch()
        elif self.transform is not None:
            self.transform.set_random_seed(seed)

    def reseed_from_torch(self) -> None:
        """Restart the pipeline's own stream from ``torch.initial_seed()`` if that changed."""
        seed = torch.initial_seed()
        if self.transform is not None and seed != self._torch_seed:
            self.transform.set_random_seed(seed % 2**32)
            self._torch_seed = seed


def seed_worker(worker_id: int) -> None:
    """The ``worker_init_fn`` of both DataModules' loaders: the worker's own augmentation stream.

    Seeds the worker's copy of the dataset (also inside a ``Subset``) from its torch seed, which
    derives from the main process's (reproducible under ``seed_everything``). The datasets
    also do it themselves on their first sample (:class:`SeededAugmentation`); this makes it
    explicit at the worker's start, for any loader built around them.
    """
    info = get_worker_info()
    dataset = info.dataset if info is not None else None
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, SeededAugmentation):
        dataset.reseed_from_torch()


def global_seed(default: int | None = 0) -> int | None:
    """The seed ``seed_everything`` exported (``PL_GLOBAL_SEED``), or ``default`` without one."""
    try:
        return int(os.environ["PL_GLOBAL_SEED"])
    except (KeyError, ValueError):
        return default


class EpochSampler(DistributedSampler):
    """Shuffled indices that depend only on ``(seed, epoch)``; one rank's share under DDP.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also after a resume, with
    the restored epoch); the dataset's ``set_epoch`` is called too, when it has one. After
    :meth:`resume_at` the first ``skip`` indices of that one epoch are left out, so a run resumed
    from a mid-epoch checkpoint trains on the rest of the epoch's order, not on its beginning.
    ``len()`` stays the whole share: Lightning counts the resumed epoch's batches from the
    restored batch index up to the full epoch length.

    Args:
        dataset: the training set.
        num_replicas, rank: the DDP world size and this process's global rank (1 and 0 alone).
        seed: base seed of the permutation.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip_epoch = -1
        self._skip = 0

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start at ``epoch``, leaving out the first ``skip`` indices of this rank's share of it."""
        self._skip_epoch, self._skip = int(epoch), max(int(skip), 0)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        set_dataset_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_dataset_epoch):
            set_dataset_epoch(epoch)

    def __iter__(self):  # noqa: ANN204 - the base class's iterator
        self.set_epoch(self.epoch)  # the dataset follows even when nobody called set_epoch
        indices = super().__iter__()
        if self.epoch != self._skip_epoch or not self._skip:
            return indices
        return iter(list(indices)[self._skip :])


def epoch_sampler(dataset: Dataset, trainer: Any = None, *, epoch: int = 0, skip: int = 0) -> EpochSampler:
    """The training sampler: this rank's share (``trainer.world_size`` / ``global_rank``; the
    whole set without a trainer) of a shuffle seeded by ``(seed_everything's seed, epoch)``,
    starting at ``epoch`` after ``skip`` samples of it (see :func:`sampler_position`)."""
    world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=global_seed())
    sampler.resume_at(epoch, skip)
    return sampler


def sampler_position(trainer: Any, batch_size: int) -> dict[str, int]:
    """What a DataModule's ``state_dict`` saves so that a resumed run continues the same order.

    ``train_sampler_epoch``: the epoch the fit loop passes to ``set_epoch`` after a restore
    (the next one when the checkpoint was written at the end of an epoch).
    ``train_samples_done``: this rank's samples of that epoch already trained on, when the
    checkpoint was written inside it (by validation every N steps, or ``every_n_train_steps``);
    Lightning resumes the batch count there (``batch_progress.current``), and the sampler must
    skip as many samples. Batches are full (the training loaders drop the last partial one).

    Lightning creates the first training iterator (and, with workers, prefetches its indices)
    *before* it calls ``sampler.set_epoch`` with the restored epoch, so the first epoch after a
    resume would otherwise follow the sampler's initial state. The DataModule's state is
    restored before that iterator exists and is handed to :func:`epoch_sampler`.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return {"train_sampler_epoch": 0, "train_samples_done": 0}
    epochs = loop.epoch_progress.current
    # Inside an epoch its "processed" count is not yet increased (it is by the time the
    # end-of-epoch hooks, where last.ckpt is written, run).
    inside_epoch = epochs.processed < epochs.started
    batches = loop.epoch_loop.batch_progress.current.processed if inside_epoch else 0
    return {"train_sampler_epoch": int(epochs.processed), "train_samples_done": int(batches) * int(batch_size)}


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


class DenseDataModule(LightningDataModule, ABC):
    """What both DataModules share: loaders built one way from the same options, the training
    sampler and its position in checkpoints, DDP-safe evaluation sampling, skip counting.

    Subclasses call ``save_hyperparameters()`` with (at least) these options, so the same names
    mean the same thing in both: ``batch_size`` (training images per batch and device),
    ``eval_batch_size`` (validation/test/predict; ``batch_size`` when None), ``num_workers``,
    ``pin_memory`` (ignored without CUDA), ``persistent_workers`` (with workers only),
    ``prefetch_factor`` (with workers only). They implement :meth:`dataset_info`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.skipped = SkipCounter()
        # Where the training sampler starts (after a resume: load_state_dict).
        self._start_epoch = 0
        self._start_skip = 0

    @abstractmethod
    def dataset_info(self) -> DatasetInfo:
        """What the task needs to know about the data (after ``setup``; see :mod:`tasks.data.contract`)."""

    @property
    def eval_batch_size(self) -> int:
        """Images per validation, test and predict batch."""
        return int(self.hparams.eval_batch_size or self.hparams.batch_size)

    def train_sampler(self, dataset: Dataset) -> EpochSampler:
        """This rank's share of the ``(seed, epoch)`` shuffle, from the restored position on."""
        return epoch_sampler(dataset, self.trainer, epoch=self._start_epoch, skip=self._start_skip)

    def eval_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        """Under DDP, this rank's disjoint share of an evaluation split; None (in order) alone.

        Lightning's ``DistributedSampler`` pads the last ranks with repeated images, which the
        summed metrics (COCO results, confusion matrices) would count twice. Each rank takes a
        disjoint share instead, so every image is scored once (ranks may then run one batch
        fewer: evaluation must not need per-step collectives). Lightning keeps the sampler, as
        it is a ``DistributedSampler``.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def loader(
        self, dataset: Dataset, *, train: bool, collate_fn: Callable[[Sequence[Any]], dict[str, Any]]
    ) -> DataLoader:
        """The DataLoader of ``dataset``: the training sampler, or the evaluation one."""
        hp = self.hparams
        workers = int(hp.num_workers)
        batch_size = int(hp.batch_size) if train else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.train_sampler(dataset) if train else self.eval_sampler(dataset),
            # Equal batches keep BatchNorm statistics sane, unless that would leave no batch.
            drop_last=train and len(dataset) >= batch_size,
            num_workers=workers,
            pin_memory=bool(hp.pin_memory) and torch.cuda.is_available(),
            persistent_workers=bool(hp.persistent_workers) and workers > 0,
            prefetch_factor=hp.prefetch_factor if workers > 0 else None,
            collate_fn=collate_fn,
            worker_init_fn=seed_worker if workers > 0 else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the epoch and the samples of it already trained on."""
        return sampler_position(self.trainer, self.hparams.batch_size)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._start_epoch = int(state_dict.get("train_sampler_epoch", 0))
        self._start_skip = int(state_dict.get("train_samples_done", 0))
        if self._start_skip:
            # Lightning warns that a mid-epoch resume repeats data unless the DataLoader itself
            # has a state_dict; here the DataModule carries the sampler's position instead.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count (and remove) the training set's skip messages, in the main process."""
        return self.skipped.take(batch)
