"""Training logs a person can read without code: CSV and TensorBoard in one folder, and a plot.

* :class:`CSVAndTensorBoardLogger`: Lightning's ``CSVLogger`` (``metrics.csv``, what the
  resume machinery of :mod:`tasks.callbacks` keeps whole) that also writes every metric as
  TensorBoard events into the same ``version_N`` folder (Lightning's ``TensorBoardLogger``), so
  ``tensorboard --logdir runs/`` shows the run. One logger in the config, one folder per run:
  two loggers side by side would each count ``version_N`` on their own and could disagree.
* :func:`plot_training_curves`: ``curves.png`` from a ``metrics.csv``: the training and
  validation losses, and the validation scores, against the optimiser step (what
  :class:`tasks.callbacks.TrainingCurves` writes at the end of every ``fit``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVES_FILE = "curves.png"
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"

Series = tuple[list[int], list[float]]  # (steps, values)


class CSVAndTensorBoardLogger(CSVLogger):
    """``metrics.csv`` and TensorBoard events of the same metrics, in one ``version_N`` folder.

    Arguments are ``CSVLogger``'s; the TensorBoard writer (created on first use) logs into
    ``log_dir`` too, so ``--ckpt_path last`` (which logs on in the resumed run's folder) adds a
    new events file beside the earlier one, and TensorBoard shows both.
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._tensorboard: TensorBoardLogger | None = None

    @property
    def tensorboard(self) -> TensorBoardLogger:
        """The TensorBoard logger, writing into this logger's ``log_dir``."""
        if self._tensorboard is None:
            # Same save_dir / name / version: the same folder (an int version is "version_N" in both).
            self._tensorboard = TensorBoardLogger(
                self.save_dir, name=self.name, version=self.version, prefix=self._prefix, default_hp_metric=False
            )
        return self._tensorboard

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        super().log_metrics(dict(metrics), step)
        self.tensorboard.log_metrics(dict(metrics), step)

    @rank_zero_only
    def log_hyperparams(self, params: Any = None) -> None:
        super().log_hyperparams(params)
        if params is not None:
            self.tensorboard.log_hyperparams(params)

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._tensorboard is not None:
            self._tensorboard.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._tensorboard is not None:
            self._tensorboard.finalize(status)


def read_metrics_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a Lightning ``metrics.csv`` (empty cells where a row did not log a column)."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def series(rows: Sequence[Mapping[str, str]], column: str) -> Series:
    """``(steps, values)`` of the rows that logged ``column`` (a number), in step order."""
    points = []
    for row in rows:
        value, step = row.get(column) or "", row.get("step") or ""
        if value and step:
            number = float(value)
            if math.isfinite(number):
                points.append((int(float(step)), number))
    points.sort(key=lambda point: point[0])
    return [step for step, _ in points], [value for _, value in points]


def validation_metrics(columns: Sequence[str]) -> list[str]:
    """The validation scores of a ``metrics.csv``: every ``val/`` column but the losses."""
    return [column for column in columns if column.startswith("val/") and "loss" not in column.split("/", 1)[1]]


def curves(rows: Sequence[Mapping[str, str]], metrics: Sequence[str] | None = None) -> dict[str, dict[str, Series]]:
    """What :func:`plot_training_curves` draws: ``{"loss": {...}, "validation": {...}}``, each
    ``{column: (steps, values)}`` for the columns with at least one value.

    Args:
        rows: ``metrics.csv`` rows.
        metrics: the validation scores to draw (e.g. ``["val/AP"]``); None: every ``val/``
            column except the losses.
    """
    columns = list(rows[0]) if rows else []
    wanted = {"loss": [TRAIN_LOSS, VAL_LOSS], "validation": list(metrics) if metrics is not None else validation_metrics(columns)}
    drawn: dict[str, dict[str, Series]] = {}
    for panel, names in wanted.items():
        drawn[panel] = {name: points for name in names if (points := series(rows, name))[0]}
    return drawn


def training_curves_figure(
    rows: Sequence[Mapping[str, str]], metrics: Sequence[str] | None = None, title: str = ""
) -> Figure:
    """A figure of two panels: the losses (left) and the validation scores (right) against step.

    Args:
        rows: ``metrics.csv`` rows.
        metrics: the validation scores to draw; see :func:`curves`.
        title: the figure's title.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import MaxNLocator

    drawn = curves(rows, metrics)
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, score_axes = figure.subplots(1, 2)
    for axes, panel, label in ((loss_axes, "loss", "loss"), (score_axes, "validation", "score")):
        for name, (steps, values) in drawn[panel].items():
            sparse = name != TRAIN_LOSS  # validation: a point per validation
            axes.plot(steps, values, label=name, marker="o" if sparse else None, markersize=3, linewidth=1.2)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if drawn[panel]:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, f"no {panel} logged", ha="center", va="center", transform=axes.transAxes)
    figure.suptitle(title)
    return figure


def plot_training_curves(
    metrics_csv: str | Path, out: str | Path, metrics: Sequence[str] | None = None, title: str | None = None
) -> Path:
    """Write :func:`training_curves_figure` of a ``metrics.csv`` as a PNG; return its path.

    Args:
        metrics_csv: a Lightning ``metrics.csv``.
        out: the PNG to write (replaced atomically: a reader never sees half a file).
        metrics: the validation scores to draw; see :func:`curves`.
        title: the figure's title (default: ``<run name>/<version folder>`` of the CSV).
    """
    metrics_csv, out = Path(metrics_csv), Path(out)
    folder = metrics_csv.resolve().parent
    figure = training_curves_figure(
        read_metrics_csv(metrics_csv), metrics, title if title is not None else f"{folder.parent.name}/{folder.name}"
    )
    temporary = out.with_name(f".{out.name}.tmp")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, out)
    return out
