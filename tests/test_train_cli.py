"""``tools/train.py`` as a user meets it: every fit ends validated with a summary, curves and TensorBoard
logs; a quiet start; ``--help`` says what the CLI adds; errors in one line."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.callbacks import fit_summary
from tasks.logs import read_metrics_csv
from tools.train import main, run

ROOT = Path(__file__).resolve().parents[1]
DET_CONFIG = str(ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml")
SEG_CONFIG = str(ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml")
DET_SMALL = ["--model.network.image_size", "128", "--data.batch_size", "4", "--data.eval_batch_size", "10",
             "--model.network.width_mult", "0.35", "--trainer.enable_progress_bar", "false"]  # fmt: skip
SEG_SMALL = ["--data.crop_size", "65", "--data.batch_size", "4", "--data.val_limit", "2", "--model.network.width_mult", "0.35",
             "--trainer.enable_progress_bar", "false"]  # fmt: skip
# What the configs log with (tasks.logs): metrics.csv and TensorBoard events in one folder.
BOTH_LOGS = ["--trainer.logger.class_path", "tasks.logs.CSVAndTensorBoardLogger"]


@pytest.fixture(autouse=True)
def _command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])  # LightningCLI compares with sys.argv


def train_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600,
    )  # fmt: skip


def test_a_run_shorter_than_the_validation_interval_ends_validated_and_says_where_things_are(
    synthetic_coco: Path, tmp_path: Path
) -> None:
    # 3 steps, validation every 50 (the config's): Lightning alone would end with no metric at all.
    result = train_process(
        "fit", "--config", DET_CONFIG, "--data.root", str(synthetic_coco), *DET_SMALL, "--data.num_workers", "0",
        "--trainer.max_steps", "3", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_folder,) = tmp_path.glob("*/version_0")
    rows = list(csv.DictReader((run_folder / "metrics.csv").open()))
    assert [row["step"] for row in rows if row.get("val/AP")] == ["2"]  # once, after the last step (logger step 2)
    (best,) = (run_folder / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-epoch=0-step=3.ckpt"
    output = result.stdout + result.stderr
    assert f"checkpoints: {run_folder / 'checkpoints'} (best-epoch=0-step=3.ckpt, last.ckpt)" in output
    assert f"logs: {run_folder} (metrics.csv)" in output
    score = float(next(row["val/AP"] for row in rows if row.get("val/AP")))
    assert f"best val/AP: {score:.4f} at {best}" in output
    # The curves of the run, drawn when fit ended.
    assert f"curves: {run_folder / 'curves.png'}" in output
    with Image.open(run_folder / "curves.png") as picture:
        assert picture.format == "PNG" and picture.size[0] > 0 and picture.size[1] > 0
    # A quiet start: no adverts, no deprecation warnings from inside the libraries.
    assert "💡" not in output and "litlogger" not in output and "LeafSpec" not in output, output[-3000:]
    assert "FutureWarning" not in output and "DeprecationWarning" not in output


def test_an_epoch_schedule_shorter_than_the_validation_interval_ends_validated(synthetic_voc: Path, tmp_path: Path) -> None:
    # Validation every 5 epochs (the config's), 2 epochs trained.
    cli = main(["fit", "--config", SEG_CONFIG, "--data.root", str(synthetic_voc), *SEG_SMALL, "--data.num_workers", "0",
                "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    rows = list(csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open()))
    assert [row["epoch"] for row in rows if row.get("val/mIoU")] == ["1"]
    best = cli.trainer.checkpoint_callback
    assert best.best_model_score is not None and Path(best.best_model_path).is_file()
    assert cli.trainer.check_val_every_n_epoch == 5  # the trainer's own setting is left as it was
    lines = fit_summary(cli.trainer)
    assert f"best val/mIoU: {float(best.best_model_score):.4f} at {best.best_model_path}" in lines


def test_a_validated_last_step_is_validated_once_and_logged_for_tensorboard_too(synthetic_coco: Path, tmp_path: Path) -> None:
    cli = main(["fit", "--config", DET_CONFIG, "--data.root", str(synthetic_coco), *DET_SMALL, "--data.num_workers", "0",
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path),
                *BOTH_LOGS, "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    folder = Path(cli.trainer.log_dir)
    rows = read_metrics_csv(folder / "metrics.csv")
    assert [row["step"] for row in rows if row.get("val/AP")] == ["1", "3"]
    events = EventAccumulator(str(folder))  # beside metrics.csv, the same numbers
    events.Reload()
    logged = [(int(row["step"]), float(row["val/AP"])) for row in rows if row.get("val/AP")]
    scalars = events.Scalars("val/AP")
    assert [e.step for e in scalars] == [step for step, _ in logged]
    assert [e.value for e in scalars] == pytest.approx([value for _, value in logged])
    assert "train/loss" in events.Tags()["scalars"]
    lines = fit_summary(cli.trainer)
    assert f"tensorboard: tensorboard --logdir {folder.parent}" in lines and f"curves: {folder / 'curves.png'}" in lines


def test_help_starts_with_what_the_cli_adds(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help text is wrapped to the terminal
    description = text[: text.index("options:")]
    for promise in ("LightningCLI", "checkpoints written atomically and read safely", "exact resume",
                    "'--ckpt_path last'", "one line"):  # fmt: skip
        assert promise in description, description


@pytest.fixture
def truncated_voc(synthetic_voc: Path, tmp_path: Path) -> Path:
    root = Path(shutil.copytree(synthetic_voc, tmp_path / "voc"))
    for image in (root / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"):
        image.write_bytes(image.read_bytes()[:300])
    return root


def test_a_data_error_is_one_line_without_traceback(truncated_voc: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", SEG_CONFIG, "--data.root", str(truncated_voc), *SEG_SMALL, "--data.num_workers", "1",
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    result = train_process(*args)  # raised in a DataLoader worker, re-raised by PyTorch in the main process
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert str(truncated_voc) in errors[0] and ".jpg: corrupt or truncated image" in errors[0]

    verbose = train_process(*args, env={"MOBILEDENSE_VERBOSE": "1"})
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert "UnreadableSampleError" in verbose.stderr


def test_set_up_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-voc"
    code = run(["fit", "--config", SEG_CONFIG, "--data.root", str(missing), *SEG_SMALL,
                "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {missing}"), error


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only errors the project raises for people are shortened; anything else propagates."""

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("internal")

    monkeypatch.setattr("tasks.cli.main", broken)  # run() calls the library's main
    with pytest.raises(KeyError):
        run(["fit"])
