"""Interrupted training resumes exactly and keeps its log; checkpoints are atomic and readable.

The resume tests SIGKILL ``tools/train.py fit`` of each shipped synthetic config (shrunk to tiny
sizes, one thread: two uninterrupted runs are bitwise equal) right after it wrote a checkpoint
inside an epoch or at an epoch's end, resume it with ``--ckpt_path``, and compare with a run that
was never stopped: the batches trained on (epoch, batch index, step, image ids, pixel sums,
learning rate), the final weights and optimiser state (bitwise) and ``metrics.csv`` (every row).

Detection (``max_steps``; 24 images of batch 4: 6 steps per epoch; validation every 4 steps
across epochs): checkpoints at validations after steps 4 (inside epoch 0), 8 (inside epoch 1), 12
(epoch 1's last step) and 14 (the end), ``last.ckpt`` at each epoch's end. Segmentation
(``max_epochs``; 16 images of batch 4: 4 steps per epoch; validation every 3 steps): validations
after steps 3, 6, 9, 12 (epoch 2's last step) and 15. Besides the configs' own checkpoints
(``best``: only when the score improves) a ``ModelCheckpoint`` keeps one file per validation
(``val-step=N.ckpt``), written at the same moments.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tasks.callbacks import KeepLogHistory
from tasks.checkpoint_io import AtomicCheckpointIO, atomic_save, remove_orphans

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Setup:
    """One shipped config at tiny sizes."""

    config: str
    args: tuple[str, ...]
    mid_epoch_step: int  # a validation inside an epoch (not its last step)
    epoch_end_step: int  # the end of the first epoch (last.ckpt)
    last_batch_step: int  # a validation on an epoch's last step


DETECTION = Setup(
    "ssdlite_mobilenetv2_synthetic.yaml",
    ("--model.network.image_size", "128", "--data.batch_size", "4", "--data.eval_batch_size", "10",
     "--data.num_workers", "1", "--model.network.width_mult", "0.35", "--trainer.max_steps", "14",
     "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "2"),
    mid_epoch_step=4, epoch_end_step=6, last_batch_step=12,
)  # fmt: skip
SEGMENTATION = Setup(
    "deeplabv3_mobilenetv2_synthetic.yaml",
    ("--data.crop_size", "65", "--data.batch_size", "4", "--data.num_workers", "1", "--data.val_limit", "2",
     "--model.network.width_mult", "0.35", "--trainer.max_epochs", "4", "--trainer.val_check_interval", "3",
     "--trainer.check_val_every_n_epoch", "null", "--trainer.log_every_n_steps", "2"),
    mid_epoch_step=3, epoch_end_step=4, last_batch_step=12,
)  # fmt: skip
EVERY_VALIDATION = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    # mode is unused without a monitor; "max" only makes its state key differ from last.ckpt's callback.
    "init_args": {"filename": "val-{step}", "save_top_k": -1, "mode": "max", "enable_version_counter": False},
}


def fit(setup: Setup, data_root: Path, out: Path, record: Path, *extra: str, kill_at: int | None = None) -> None:
    """``tools/train.py fit`` in a fresh process, recording its batches; SIGKILLed at the start
    of the step after ``kill_at`` steps when given."""
    callbacks = [EVERY_VALIDATION, {"class_path": "pause.RecordBatches", "init_args": {"path": str(record)}}]
    if kill_at is not None:
        callbacks.append({"class_path": "pause.KillAtStep", "init_args": {"step": kill_at}})
    command = [
        sys.executable, str(ROOT / "tools" / "train.py"), "fit", "--config", str(ROOT / "configs" / setup.config),
        "--data.root", str(data_root), *setup.args, "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out),
        *(f"--trainer.callbacks+={json.dumps(callback)}" for callback in callbacks), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    expected = -signal.SIGKILL if kill_at is not None else 0
    assert result.returncode == expected, result.stdout[-2000:] + result.stderr[-3000:]


def records(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_folder(out: Path, version: int) -> Path:
    (folder,) = out.glob(f"*/version_{version}")
    return folder


@pytest.fixture(scope="module")
def detection_reference(synthetic_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detection_reference")
    fit(DETECTION, synthetic_coco, out, out / "batches.jsonl")
    return out


@pytest.fixture(scope="module")
def segmentation_reference(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("segmentation_reference")
    fit(SEGMENTATION, synthetic_voc, out, out / "batches.jsonl")
    return out


def assert_same_run(reference: Path, resumed: Path) -> None:
    """The resumed run folder ends where the reference run ends, bitwise, with the same log."""
    expected = torch.load(next(reference.glob("*/version_0/checkpoints/last.ckpt")), weights_only=True)
    actual = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert (actual["epoch"], actual["global_step"]) == (expected["epoch"], expected["global_step"])
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], value), key  # bitwise: no tolerance needed
    states = zip(expected["optimizer_states"][0]["state"].values(), actual["optimizer_states"][0]["state"].values())
    for state, other in states:
        assert all(torch.equal(state[name], other[name]) for name in state)
    assert expected["lr_schedulers"] == actual["lr_schedulers"]
    # Every row of the uninterrupted run's log, once, in order: the rows before the checkpoint
    # kept, none of the killed run's later ones, no extra batch, no repeated epoch.
    assert (resumed / "metrics.csv").read_text() == next(reference.glob("*/version_0/metrics.csv")).read_text()


def assert_continues(reference: Path, record: Path, step: int, until: int | None = None) -> None:
    """The resumed process trained on exactly the reference's batches from ``step`` on (same
    epoch, batch index, images, augmentation and learning rate), up to step ``until``."""
    rows = records(reference / "batches.jsonl")
    expected = [row for row in rows if step <= row[2] <= (until if until is not None else rows[-1][2])]
    assert records(record) == expected


@pytest.mark.parametrize("setup", [DETECTION, SEGMENTATION], ids=["detection", "segmentation"])
def test_killed_inside_an_epoch_resumes_exactly(
    setup: Setup, synthetic_coco: Path, synthetic_voc: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reference = request.getfixturevalue(f"{'detection' if setup is DETECTION else 'segmentation'}_reference")
    data = synthetic_coco if setup is DETECTION else synthetic_voc
    step = setup.mid_epoch_step
    fit(setup, data, tmp_path, tmp_path / "killed.jsonl", kill_at=step + 1)  # one step after the checkpoint
    checkpoint = run_folder(tmp_path, 0) / "checkpoints" / f"val-step={step}.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == step and 0 < step % setup.epoch_end_step  # written inside an epoch
    assert records(tmp_path / "killed.jsonl")[-1][2] == step + 1  # killed as that step started

    fit(setup, data, tmp_path, tmp_path / "resumed.jsonl", "--ckpt_path", str(checkpoint))
    assert_continues(reference, tmp_path / "resumed.jsonl", step)
    assert_same_run(reference, run_folder(tmp_path, 1))  # a new version_1, with version_0's rows


@pytest.mark.parametrize("setup", [DETECTION, SEGMENTATION], ids=["detection", "segmentation"])
def test_killed_between_epochs_resumes_exactly(
    setup: Setup, synthetic_coco: Path, synthetic_voc: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    reference = request.getfixturevalue(f"{'detection' if setup is DETECTION else 'segmentation'}_reference")
    data = synthetic_coco if setup is DETECTION else synthetic_voc
    # 1. Killed one step into epoch 1: `--ckpt_path last` resumes last.ckpt of epoch 0's end in
    #    the same run folder.
    fit(setup, data, tmp_path, tmp_path / "killed.jsonl", kill_at=setup.epoch_end_step + 1)
    last = torch.load(run_folder(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, setup.epoch_end_step)
    # 2. Killed again just after the validation of an epoch's last step (written before the
    #    epoch's end), and resumed from that checkpoint.
    fit(setup, data, tmp_path, tmp_path / "resumed.jsonl", "--ckpt_path", "last", kill_at=setup.last_batch_step + 1)
    assert_continues(reference, tmp_path / "resumed.jsonl", setup.epoch_end_step, until=setup.last_batch_step + 1)
    assert not list(tmp_path.glob("*/version_1"))  # logged on in version_0
    checkpoint = run_folder(tmp_path, 0) / "checkpoints" / f"val-step={setup.last_batch_step}.ckpt"
    fit(setup, data, tmp_path, tmp_path / "resumed_again.jsonl", "--ckpt_path", str(checkpoint))
    assert_continues(reference, tmp_path / "resumed_again.jsonl", setup.last_batch_step)
    assert_same_run(reference, run_folder(tmp_path, 1))


def test_resume_keeps_the_rows_of_the_earlier_run_before_its_checkpoint(tmp_path: Path) -> None:
    """``KeepLogHistory`` alone: which rows of the interrupted run come back, by checkpoint kind."""
    folder = tmp_path / "run" / "version_0"
    (folder / "checkpoints").mkdir(parents=True)
    rows = [(0, "1.0"), (1, "2.0"), (1, "epoch"), (2, "3.0")]  # step 1's epoch-end row follows the checkpoint
    (folder / "metrics.csv").write_text("loss,step\n" + "".join(f"{loss},{step}\n" for step, loss in rows))
    checkpoint = folder / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(b"")

    class Trainer:  # what the callback reads of a trainer
        ckpt_path = str(checkpoint)

        class state:  # noqa: N801
            fn = "fit"

    def kept(saved: dict) -> list[str]:
        callback = KeepLogHistory()
        callback.read_history(checkpoint)
        callback.on_load_checkpoint(Trainer(), None, saved)
        return [row["loss"] for row in callback._kept]

    assert kept({"global_step": 2, KeepLogHistory.KEY: {"rows": 2, "epoch_end": False}}) == ["1.0", "2.0"]
    assert kept({"global_step": 2, KeepLogHistory.KEY: {"rows": 2, "epoch_end": True}}) == ["1.0", "2.0", "epoch"]
    assert kept({"global_step": 2}) == ["1.0", "2.0", "epoch"]  # a checkpoint of another writer: by step


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tasks.checkpoint_io.os.fsync", disk_full)  # fails after the bytes are written
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_checkpoints_get_the_users_umask_not_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_save({"w": torch.ones(2)}, tmp_path / "a.ckpt")
        os.umask(0o007)
        atomic_save({"w": torch.ones(2)}, tmp_path / "b.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == 0o644  # group and others may read
    assert stat.S_IMODE((tmp_path / "b.ckpt").stat().st_mode) == 0o660


def test_orphaned_temporary_files_are_removed_when_a_run_starts(
    synthetic_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tools.train import main

    folder = tmp_path / "run" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    orphans = [folder / ".last.ckpt.k2j4l5ab.tmp", folder / ".best-epoch=0-step=4.ckpt.0f3e9a1c.tmp"]
    others = [folder / "last.ckpt.tmp", folder / ".last.ckpt.notes.txt", folder / "notes.tmp", folder / ".x.ckpt.ab.tmp"]
    for path in orphans + others:
        path.write_bytes(b"partial")
    assert sorted(remove_orphans(folder)) == sorted(orphans)
    assert all(path.exists() for path in others)  # only our own pattern

    for path in orphans:
        path.write_bytes(b"partial")  # left by a killed save of an earlier run
    monkeypatch.setattr(sys, "argv", ["tools/train.py"])
    main(["fit", "--config", str(ROOT / "configs" / DETECTION.config), "--data.root", str(synthetic_coco),
          "--model.network.image_size", "128", "--data.batch_size", "4", "--data.eval_batch_size", "10",
          "--data.num_workers", "0", "--model.network.width_mult", "0.35", "--trainer.max_steps", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "run",
          "--trainer.logger.init_args.version", "version_0", "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert not any(path.exists() for path in orphans)
    assert all(path.exists() for path in others)


KILLED_WRITER = """
import sys, torch
from tasks.checkpoint_io import atomic_save
step = 0
while True:
    step += 1
    atomic_save({"step": step, "w": torch.full((3_000_000,), float(step))}, sys.argv[1])
    print(step, flush=True)
"""


def test_sigkill_while_saving_never_leaves_a_broken_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    for attempt in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2 + attempt):  # a few complete saves, then a kill at some point of the next
            assert process.stdout.readline()
        time.sleep(0.01 * attempt)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        checkpoint = torch.load(path, weights_only=True)
        assert torch.equal(checkpoint["w"], torch.full((3_000_000,), float(checkpoint["step"])))
