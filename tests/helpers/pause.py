"""Callbacks for tests that stop a training process at a known point and record what it trained on."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAtStep(Callback):
    """SIGKILL this process at the start of the training batch that follows ``step`` optimiser
    steps: no hook, no ``finally`` and no logger flush runs, as when a job is killed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(Callback):
    """Append ``[epoch, batch_idx, step, image ids, image checksum, lr]`` of every training batch
    to ``path`` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int) -> None:
        row = [
            trainer.current_epoch,
            batch_idx,
            trainer.global_step,
            [str(i) for i in batch["image_ids"]],
            float(batch["images"].double().sum()),
            trainer.optimizers[0].param_groups[0]["lr"],
        ]
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
