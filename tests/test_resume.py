"""Interrupted training resumes exactly; checkpoints are written atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tasks.checkpoint_io import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml"
EPOCHS = 4


def train(out: Path, data_root: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    """``tools/train.py fit`` of a tiny DeepLabv3 in a fresh process (one thread: bitwise repeatable)."""
    command = [
        sys.executable, str(ROOT / "tools" / "train.py"), "fit", "--config", str(CONFIG),
        "--data.root", str(data_root), "--data.crop_size", "33", "--data.batch_size", "4",
        "--data.num_workers", "1", "--data.val_limit", "2", "--model.width_mult", "0.35",
        "--trainer.max_epochs", str(EPOCHS), "--trainer.check_val_every_n_epoch", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests" / "helpers")}
    log = (out / f"log-{len(list(out.glob('log-*')))}.txt").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if wait:
        assert process.wait(timeout=300) == 0, Path(log.name).read_text()[-3000:]
    return process


def last_checkpoint(out: Path) -> dict:
    (path,) = out.glob("*/version_*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


def test_sigkill_then_resume_equals_the_uninterrupted_run(synthetic_voc: Path, tmp_path: Path) -> None:
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    resumed.mkdir()

    def record(path: Path) -> str:  # every training batch's epoch, step, image ids, pixel sum and lr
        return "--trainer.callbacks+=" + json.dumps({"class_path": "pause.RecordBatches", "init_args": {"path": str(path)}})

    train(full, synthetic_voc, record(tmp_path / "full.jsonl"))

    marker = tmp_path / "paused"
    pause = {"class_path": "pause.PauseAtEpoch", "init_args": {"epoch": 2, "marker": str(marker)}}
    process = train(
        resumed, synthetic_voc, record(tmp_path / "resumed.jsonl"), f"--trainer.callbacks+={json.dumps(pause)}", wait=False
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, (resumed / "log-0.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached epoch 2"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # from outside, in the middle of the run
    process.wait(timeout=60)
    interrupted = last_checkpoint(resumed)
    assert interrupted["epoch"] == 1 and interrupted["global_step"] == int(marker.read_text())

    train(resumed, synthetic_voc, record(tmp_path / "resumed.jsonl"), "--ckpt_path", "last")
    # Same images in the same order with the same augmentations (pixel sums) and learning rates.
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    expected, actual = last_checkpoint(full), last_checkpoint(resumed)  # one run folder: logs continue
    assert actual["epoch"] == expected["epoch"] == EPOCHS - 1
    assert actual["global_step"] == expected["global_step"]
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], value), key  # bitwise: no tolerance needed
    states = zip(expected["optimizer_states"][0]["state"].values(), actual["optimizer_states"][0]["state"].values())
    for state, other in states:
        assert all(torch.equal(state[name], other[name]) for name in state)
    assert expected["lr_schedulers"] == actual["lr_schedulers"]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def disk_full(_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tasks.checkpoint_io.os.fsync", disk_full)  # fails after the bytes are written
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


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
        checkpoint = torch.load(path, weights_only=False)
        assert torch.equal(checkpoint["w"], torch.full((3_000_000,), float(checkpoint["step"])))
