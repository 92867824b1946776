"""Training throughput: full Lightning training steps, and the training data pipeline alone.

Both use the synthetic configs as they are (model, sizes, batch, workers; built by
:func:`tasks.configs.instantiate_config`, as ``tools/train.py`` builds them) on synthetic data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from tasks.configs import instantiate_config

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC_CONFIGS = {
    "detection": ROOT / "configs" / "ssdlite_mobilenetv2_synthetic.yaml",
    "segmentation": ROOT / "configs" / "deeplabv3_mobilenetv2_synthetic.yaml",
}


def synthetic_root(folder: Path) -> Path:
    """``folder`` with a synthetic COCO (``coco/``) and VOC (``voc/``) of 160 training images each."""
    from tasks.data.synthetic import make_coco, make_voc

    if not (folder / "coco" / "annotations").is_dir():
        make_coco(folder / "coco", num_train=160, num_val=8)
    if not (folder / "voc" / "VOCdevkit").is_dir():
        make_voc(folder / "voc", num_train=160, num_val=8)
    return folder


def task_and_data(
    task: str, root: Path, batch_size: int | None, workers: int | None
) -> tuple[LightningModule, LightningDataModule]:
    """The synthetic config's task and DataModule on ``root`` (its batch and workers unless given)."""
    overrides = [f"--data.root={root / ('coco' if task == 'detection' else 'voc')}"]
    if batch_size is not None:
        overrides.append(f"--data.batch_size={batch_size}")
    if workers is not None:
        overrides.append(f"--data.num_workers={workers}")
    return instantiate_config(SYNTHETIC_CONFIGS[task], overrides)


def bench_data(task: str, root: Path, batch_size: int | None, workers: int | None, steps: int) -> dict[str, Any]:
    """Images per second of the training DataLoader alone (after its first batch)."""
    _, data = task_and_data(task, root, batch_size, workers)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    next(loader)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(data.train_dataloader())
            batch = next(loader)
        images += batch["images"].shape[0]
    elapsed = time.perf_counter() - start
    return throughput(task, data, images / elapsed)


def throughput(task: str, data: LightningDataModule, images_per_s: float) -> dict[str, Any]:
    """A row of the train / data table."""
    return {"task": task, "workers": data.hparams.num_workers, "batch": data.hparams.batch_size, "images_per_s": images_per_s}


class StepTimer(Callback):
    """The clock at the end of every training step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter())


def bench_train(task: str, root: Path, batch_size: int | None, workers: int | None, steps: int) -> dict[str, Any]:
    """Images per second of full Lightning training steps, data loading included."""
    model, data = task_and_data(task, root, batch_size, workers)
    timer = StepTimer()
    trainer = Trainer(
        accelerator="cpu", max_steps=steps + 2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    elapsed = timer.times[-1] - timer.times[1]  # the first two steps warm up
    images = data.hparams.batch_size * (len(timer.times) - 2)
    return throughput(task, data, images / elapsed)
