"""Training curves from a metrics.csv, and CSV + TensorBoard logging into one folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.logs import CSVAndTensorBoardLogger, curves, plot_training_curves, read_metrics_csv, training_curves_figure

COLUMNS = ["epoch", "lr-AdamW", "step", "train/loss", "train/loss_cls", "val/AP", "val/AP50", "val/loss"]


def write_metrics_csv(path: Path) -> Path:
    """A metrics.csv as Lightning writes it: training rows every step, validation rows at 4 and 9.

    Rows restored on resume may come out of step order, and a row may miss a value: both happen.
    """
    rows = [{"epoch": "0", "step": str(step), "train/loss": f"{10 - step}", "train/loss_cls": f"{5 - step / 2}",
             "lr-AdamW": "0.001"} for step in range(10)]  # fmt: skip
    rows[3]["train/loss"] = ""
    rows += [
        {"epoch": "0", "step": "9", "val/AP": "0.25", "val/AP50": "0.5", "val/loss": "3.5"},
        {"epoch": "0", "step": "4", "val/AP": "0.125", "val/AP50": "0.375", "val/loss": "4.0"},
    ]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_figure_draws_the_losses_and_each_validation_score(tmp_path: Path) -> None:
    rows = read_metrics_csv(write_metrics_csv(tmp_path / "metrics.csv"))
    loss_axes, score_axes = training_curves_figure(rows).axes
    losses = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss_axes.get_lines()}
    scores = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in score_axes.get_lines()}
    train_steps = [0, 1, 2, 4, 5, 6, 7, 8, 9]  # step 3 logged no loss
    assert losses == {"train/loss": (train_steps, [10.0 - s for s in train_steps]), "val/loss": ([4, 9], [4.0, 3.5])}
    assert scores == {"val/AP": ([4, 9], [0.125, 0.25]), "val/AP50": ([4, 9], [0.375, 0.5])}

    (only_ap,) = training_curves_figure(rows, metrics=["val/AP", "val/mIoU"]).axes[1].get_lines()
    assert only_ap.get_label() == "val/AP"  # the asked scores that were logged
    assert curves(rows, metrics=[])["validation"] == {}


def test_the_png_is_written_and_opens(tmp_path: Path) -> None:
    out = plot_training_curves(write_metrics_csv(tmp_path / "metrics.csv"), tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and out.stat().st_size > 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary left


def test_csv_and_tensorboard_share_one_version_folder(tmp_path: Path) -> None:
    (tmp_path / "run" / "version_0").mkdir(parents=True)  # an earlier run: this one is version_1
    logger = CSVAndTensorBoardLogger(tmp_path, name="run")
    logger.log_hyperparams({"lr": 0.1, "network": {"class_path": "x.Y", "init_args": {"width": 0.35}}})
    for step in range(3):
        logger.log_metrics({"train/loss": 3.0 - step}, step)
    logger.log_metrics({"val/AP": 0.5}, 2)
    logger.finalize("success")
    folder = tmp_path / "run" / "version_1"
    assert Path(logger.log_dir) == folder == Path(logger.tensorboard.log_dir)
    assert [row["train/loss"] for row in read_metrics_csv(folder / "metrics.csv") if row["train/loss"]] == ["3.0", "2.0", "1.0"]
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/AP")] == [(2, 0.5)]


@pytest.mark.parametrize("version", ["version_7", 7])
def test_a_given_version_is_the_same_folder_for_both(tmp_path: Path, version: str | int) -> None:
    logger = CSVAndTensorBoardLogger(tmp_path, name="run", version=version)
    logger.log_metrics({"train/loss": 1.0}, 0)
    logger.save()
    assert Path(logger.log_dir) == Path(logger.tensorboard.log_dir) == tmp_path / "run" / "version_7"
    assert list((tmp_path / "run" / "version_7").glob("events.out.tfevents.*"))
