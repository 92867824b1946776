"""Lightning callbacks for long runs: exact resume, kept logs, a final validation, a closing summary.

``tools/train.py`` adds all of them to every run (:func:`long_run_callbacks`); with the Python
API pass them to ``Trainer(callbacks=...)``.

* :class:`SeedEveryStep`: global RNGs seeded per training step (exact resume, also mid-epoch);
* :class:`ResumeAfterEpochEnd`: an end-of-epoch checkpoint resumes at the next epoch's start;
* :class:`SkippedSamplesReport`: per-epoch count of ``data.skip_unreadable``;
* :class:`KeepLogHistory`: a resumed run's ``metrics.csv`` starts with the earlier rows;
* :class:`RemoveOrphanedTempFiles`: temporary files of killed checkpoint saves are deleted;
* :class:`ValidateAtEnd`: the last step is always validated (so every run ends with a score);
* :class:`TrainingCurves`: ``curves.png`` of the losses and validation scores, written when
  ``fit`` ends;
* :class:`FitSummary`: where the checkpoints, logs and best score are, printed when ``fit`` ends.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tasks.checkpoint_io import remove_orphans
from tasks.data.sampling import derived_seed, global_seed
from tasks.logs import CURVES_FILE, CSVAndTensorBoardLogger, plot_training_curves


def long_run_callbacks() -> list[Callback]:
    """One of each callback of this module, as ``tools/train.py`` adds them."""
    return [
        SeedEveryStep(),
        ResumeAfterEpochEnd(),
        SkippedSamplesReport(),
        KeepLogHistory(),
        RemoveOrphanedTempFiles(),
        ValidateAtEnd(),
        TrainingCurves(),  # before FitSummary, which names the file
        FitSummary(),
    ]


def _local_file(path: Any) -> Path | None:
    """``path`` as a local file, or None (Lightning's "last"/"best"..., a URL, nothing)."""
    if path is None or "://" in str(path):
        return None
    path = Path(path)
    return path if path.is_file() else None


class SeedEveryStep(Callback):
    """Re-seed Python, NumPy and torch (CPU and CUDA) at the start of every training epoch and
    of every training batch.

    The seeds are ``f(seed, epoch, global rank)`` and ``f(seed, epoch, batch index, global rank)``.
    Dropout and anything else drawing from the global RNGs in a training step then depends on
    the step only, not on what ran before in the process (the RNG state is not in checkpoints):
    a run resumed from any checkpoint, including one written in the middle of an epoch,
    continues exactly as the uninterrupted run. Ranks get different streams (different dropout
    masks per rank).

    Args:
        seed: the base seed; ``seed_everything``'s (``PL_GLOBAL_SEED``) when None. Without
            either the callback does nothing (the run is not meant to be reproducible).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _seed(self, *keys: int) -> None:
        base = int(self.seed) if self.seed is not None else global_seed(default=None)
        if base is None:
            return
        seed = derived_seed(base, *keys)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also every CUDA device

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seed(trainer.current_epoch, trainer.global_rank)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # batch_idx counts within the epoch; Lightning restores it on resume (batch_progress).
        self._seed(trainer.current_epoch, batch_idx, trainer.global_rank)


class ResumeAfterEpochEnd(Callback):
    """Resume an end-of-epoch checkpoint at the start of the next epoch, as Lightning should.

    ``last.ckpt`` is written in ``on_train_epoch_end``, after the epoch's last step. When the
    run is bounded by ``max_steps`` (the detection configs), Lightning 2.6 restores such a
    checkpoint as "restarted on epoch end" (its ``FitLoop.restarting`` stays on for
    iteration-based training, where an epoch-bounded run is "resumed on epoch end" and goes on
    correctly) and the epoch loop as "restarted on its last batch". It then waits for a
    validation that is not due (validation every N steps, not at the epoch's end), trains one
    *extra* batch as batch ``N_epoch`` of the finished epoch, and runs the epoch's end again,
    counting the epoch twice: the sampler's epoch runs one ahead of ``current_epoch`` from then
    on (the "extra batch, restarted epoch" of a SIGKILLed detection run). Nothing of the
    finished epoch is left to do (the tasks have no ``on_train_epoch_end`` and step their
    schedulers per step), so when training starts after such a restore this callback marks
    the epoch completed and lets the epoch loop start afresh, as in the uninterrupted run.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loop = trainer.fit_loop
        if not (loop.restarted_on_epoch_end and loop.epoch_loop.restarted_on_last):
            return
        loop.epoch_progress.increment_completed()  # the end-of-epoch hooks ran before the save
        loop.reset_restart_stage()
        loop.epoch_loop.restarting = False  # a fresh epoch (its validation loop too)
        loop.epoch_loop.reset_restart_stage()


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


class KeepLogHistory(Callback):
    """A resumed run's ``metrics.csv`` holds the interrupted run's rows, then its own.

    Lightning's ``CSVLogger`` deletes ``metrics.csv`` of the folder it logs into ("Previous log
    files in this directory will be deleted"), which is the folder of the run being resumed
    with ``tools/train.py ... --ckpt_path last``. This callback writes back, when ``fit``
    starts, the rows of the run that wrote the checkpoint (``<log dir>/metrics.csv`` next to
    ``<log dir>/checkpoints/``) that the resumed run does not log again:

    * every row written before the checkpoint (the loggers are flushed when a checkpoint is
      saved, and the number of rows on disk is saved with it as ``metrics_csv_rows``);
    * for a checkpoint written at the end of an epoch (``last.ckpt``), also the rows the
      epoch's end logged just after it (epoch-level metrics, steps before the checkpoint's
      ``global_step``): the resumed run starts with the next epoch and does not repeat them.

    Rows the interrupted run logged after that belong to work the resumed run redoes and logs
    again, so a resumed run's ``metrics.csv`` equals the uninterrupted run's. Resuming from
    another run's checkpoint (into a new ``version_N``) copies that run's rows the same way,
    so each ``metrics.csv`` is a whole curve.

    The logger deletes the file as ``fit`` starts, before any callback hook: when the resumed
    run logs into the checkpoint's own folder, call :meth:`read_history` before ``Trainer.fit``
    (``tools/train.py`` does). Loggers are also flushed at each epoch start.
    """

    KEY = "metrics_csv_rows"

    def __init__(self) -> None:
        self._checkpoint: Path | None = None
        self._source: Path | None = None
        self._rows: list[dict[str, str]] = []
        self._kept: list[dict[str, str]] | None = None

    def read_history(self, ckpt_path: Any) -> None:
        """Read now the ``metrics.csv`` of the run that wrote ``ckpt_path`` (Lightning's layout
        ``<log dir>/checkpoints/<name>.ckpt``; nothing otherwise)."""
        self._checkpoint, self._source, self._rows = None, None, []
        path = _local_file(ckpt_path)
        if path is None or path.parent.name != "checkpoints":
            return
        source = path.parent.parent / "metrics.csv"
        if source.is_file():
            with source.open(newline="") as file:
                self._checkpoint, self._source, self._rows = path.resolve(), source, list(csv.DictReader(file))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            logger.save()
        logger = trainer.logger  # the one whose folder holds the checkpoints (Lightning's layout)
        if trainer.is_global_zero and isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            rows = 0
            if path.is_file():
                with path.open(newline="") as file:
                    rows = sum(1 for _ in csv.DictReader(file))
            epochs = trainer.fit_loop.epoch_progress.current
            checkpoint[self.KEY] = {"rows": rows, "epoch_end": bool(epochs.processed >= epochs.started)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._kept = None
        path = _local_file(trainer.ckpt_path)
        if trainer.state.fn != "fit" or path is None:
            return
        if self._checkpoint != path.resolve():  # not read before fit: another run's folder is still intact
            self.read_history(path)
        step = int(checkpoint.get("global_step", 0))
        saved = checkpoint.get(self.KEY)
        if not isinstance(saved, dict):  # not written with this callback: go by the step alone
            self._kept = [row for row in self._rows if _step(row) < step]
            return
        count = int(saved.get("rows", 0))
        after = [row for row in self._rows[count:] if _step(row) < step] if saved.get("epoch_end") else []
        self._kept = self._rows[:count] + after

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._source is None or self._kept is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            writer = logger.experiment
            for row in self._kept:
                writer.log_metrics({key: value for key, value in row.items() if key != "step" and value != ""}, _step(row))
            writer.save()
            rank_zero_info(f"{Path(logger.log_dir) / 'metrics.csv'}: continues {self._source} ({len(self._kept)} rows)")
        self._checkpoint, self._source, self._rows, self._kept = None, None, [], None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            logger.save()


def _step(row: dict[str, str]) -> int:
    """The ``step`` column of a ``metrics.csv`` row (-1 when missing)."""
    value = row.get("step") or ""
    return int(value) if value.isdigit() else -1


class RemoveOrphanedTempFiles(Callback):
    """At the start of ``fit``, delete temporary files that killed checkpoint saves left behind
    (``.<name>.ckpt.<8 characters>.tmp``, :func:`tasks.checkpoint_io.remove_orphans`) in this
    run's checkpoint folders and in the folder of the checkpoint it resumes. Global rank zero
    only, before the run's first save: no save of this run can be in progress."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {Path(callback.dirpath) for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)}
        resumed = _local_file(trainer.ckpt_path)
        if resumed is not None:
            folders.add(resumed.parent)
        for folder in sorted(folders):
            removed = remove_orphans(folder)
            if removed:
                rank_zero_info(f"{folder}: removed {len(removed)} temporary file(s) of interrupted checkpoint saves")


class ValidateAtEnd(Callback):
    """Validate after the last training step when the schedule would not.

    With ``val_check_interval`` in steps (or ``check_val_every_n_epoch`` in epochs), a run whose
    ``max_steps`` (or ``max_epochs``) is not a multiple of the interval would end with no
    validation since its last one, or none at all: no metric, no best checkpoint. At the last
    step this callback sets ``trainer.should_stop``, for which Lightning validates before it
    stops (and the monitoring checkpoints see the score); a last step that is validated anyway
    is validated once.
    """

    def __init__(self) -> None:
        self._check_val_every_n_epoch: Any = None
        self._changed = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.enable_validation or trainer.sanity_checking:
            return
        last_step = trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        last_epoch = (
            trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and trainer.current_epoch + 1 >= trainer.max_epochs
            and batch_idx + 1 >= trainer.num_training_batches
        )
        if not (last_step or last_epoch):
            return
        every = trainer.check_val_every_n_epoch
        if every is not None and (trainer.current_epoch + 1) % every != 0:
            # Lightning validates on should_stop only in validation epochs: make this one.
            self._check_val_every_n_epoch, self._changed = every, True
            trainer.check_val_every_n_epoch = None
        trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._changed:
            trainer.check_val_every_n_epoch = self._check_val_every_n_epoch
            self._changed = False


class TrainingCurves(Callback):
    """When ``fit`` ends, plot the run's ``metrics.csv`` as ``curves.png`` beside it (rank zero).

    Left: ``train/loss`` and ``val/loss`` against the optimiser step; right: the validation
    scores (:func:`tasks.logs.plot_training_curves`). The CSV is read after the loggers are
    flushed, so it holds the whole curve, a resumed run's earlier rows included
    (:class:`KeepLogHistory`). Runs without a ``CSVLogger`` get no plot.

    Args:
        metrics: the validation scores to draw; None: the scores the run's ``ModelCheckpoint``
            callbacks monitor (``val/AP``, ``val/mIoU`` in the configs), or every ``val/``
            column but the losses when none monitors one.
    """

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = metrics

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            logger.save()
            source = Path(logger.log_dir) / "metrics.csv"
            if not source.is_file():
                continue
            metrics = self.metrics
            if metrics is None:
                monitored = [c.monitor for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
                metrics = list(dict.fromkeys(monitored)) or None
            try:
                plot_training_curves(source, source.with_name(CURVES_FILE), metrics)
            except (OSError, ValueError) as error:  # a plot is not worth failing a finished run for
                rank_zero_warn(f"{source}: no {CURVES_FILE} written ({error})")


class FitSummary(Callback):
    """When ``fit`` ends, print (rank zero) where the checkpoints and logs are and the best score."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for line in fit_summary(trainer):
            rank_zero_info(line)


def fit_summary(trainer: Trainer) -> list[str]:
    """The lines :class:`FitSummary` prints: checkpoint folder(s) and files, log folder, and the
    best monitored score with its checkpoint (or why there is none)."""
    lines = []
    checkpoints = [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    folders = sorted({str(callback.dirpath) for callback in checkpoints if callback.dirpath})
    for folder in folders:
        files = sorted(path.name for path in Path(folder).glob("*.ckpt")) if Path(folder).is_dir() else []
        lines.append(f"checkpoints: {folder} ({', '.join(files) if files else 'none written'})")
    if not folders:
        lines.append("checkpoints: none (no ModelCheckpoint callback)")
    if trainer.loggers:
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None) or logger.save_dir
            name = " (metrics.csv)" if isinstance(logger, CSVLogger) else ""
            lines.append(f"logs: {log_dir}{name}")
            if isinstance(logger, CSVAndTensorBoardLogger):
                lines.append(f"tensorboard: tensorboard --logdir {logger.root_dir}")
            curves = Path(str(log_dir)) / CURVES_FILE
            if isinstance(logger, CSVLogger) and curves.is_file():
                lines.append(f"curves: {curves}")
    else:
        lines.append("logs: none (no logger)")
    monitored = [callback for callback in checkpoints if callback.monitor]
    for callback in monitored:
        if callback.best_model_score is None:
            lines.append(f"best {callback.monitor}: none (never validated)")
        else:
            lines.append(f"best {callback.monitor}: {float(callback.best_model_score):.4f} at {callback.best_model_path}")
    if not monitored:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        last = ", ".join(f"{key} {value:.4f}" for key, value in sorted(metrics.items()))
        lines.append(f"last validation: {last}" if last else "last validation: none")
    return lines
