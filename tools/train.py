"""Train, validate, test or predict any task from one YAML config (Lightning's LightningCLI).

    python tools/train.py fit --config configs/ssdlite_mobilenetv2_synthetic.yaml
    python tools/train.py validate --config CONFIG --ckpt_path runs/.../last.ckpt
    python tools/train.py fit --config CONFIG --data.root /data/coco --trainer.devices 8

The config names the LightningModule and LightningDataModule by ``class_path``; every
``__init__`` argument and every ``--trainer.*`` flag can be overridden on the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI on ``args`` (``sys.argv[1:]`` when None) and return it."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
