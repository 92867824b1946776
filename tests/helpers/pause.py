"""A callback for tests that must stop a training process from outside at a known point."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class PauseAtEpoch(Callback):
    """At the start of training epoch ``epoch``, write ``marker`` and sleep (to be killed there).

    Sleeping changes no number: the test kills the process during the pause, with the
    checkpoint of the epoch before already written.
    """

    def __init__(self, epoch: int, marker: str, seconds: float = 120.0) -> None:
        self.epoch = epoch
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)


class RecordBatches(Callback):
    """Append ``[epoch, step, image ids, image checksum, lr]`` of every training batch to ``path`` (JSON lines)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int) -> None:
        import json

        row = [
            trainer.current_epoch,
            trainer.global_step,
            [str(i) for i in batch["image_ids"]],
            float(batch["images"].double().sum()),
            trainer.optimizers[0].param_groups[0]["lr"],
        ]
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
