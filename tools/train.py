"""Train, validate, test or predict any task from one YAML config (Lightning's LightningCLI).

    python tools/train.py fit --config configs/ssdlite_mobilenetv2_synthetic.yaml
    python tools/train.py validate --config CONFIG --ckpt_path runs/.../last.ckpt
    python tools/train.py fit --config CONFIG --data.root /data/coco --trainer.devices 8
    python tools/train.py fit --config CONFIG --ckpt_path last      # resume the newest run

The config names the LightningModule and LightningDataModule by ``class_path``; every
``__init__`` argument and every ``--trainer.*`` flag can be overridden on the command line.

On top of plain LightningCLI every run gets:

* atomic checkpoints (:class:`tasks.checkpoint_io.AtomicCheckpointIO`, unless the config
  names its own checkpoint plug-in);
* :class:`tasks.callbacks.SeedEveryEpoch` and :class:`tasks.callbacks.SkippedSamplesReport`
  (exact resume from end-of-epoch checkpoints; per-epoch count of ``data.skip_unreadable``);
* ``--ckpt_path last`` that finds the newest ``last*.ckpt`` of *earlier* runs of the config
  (Lightning alone looks only in the new run's empty ``version_N`` folder and starts over);
* a check of ``--ckpt_path`` before anything runs: a checkpoint of the other task, or of a
  model with other shapes, is refused with the options to change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.callbacks import SeedEveryEpoch, SkippedSamplesReport  # noqa: E402
from tasks.checkpoint_io import AtomicCheckpointIO  # noqa: E402
from tools.checkpoints import check_compatible, check_task, find_last_checkpoint  # noqa: E402


class CLI(LightningCLI):
    """LightningCLI with atomic checkpoints, exact resume and checked ``--ckpt_path``."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for callback_type in (SeedEveryEpoch, SkippedSamplesReport):
            if not any(isinstance(callback, callback_type) for callback in trainer.callbacks):
                trainer.callbacks.append(callback_type())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: not the user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint against the config.

        Runs before LightningCLI replaces the configured model by the checkpoint's class and
        hyper-parameters, so a checkpoint of the other task is refused with a clear message
        rather than training the wrong model on the wrong data.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            self._resolve_last(config)
        ckpt_path = config.get("ckpt_path")
        if not is_checkpoint_file(ckpt_path):
            return
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if class_path:
            check_task(ckpt_path, class_path)

    def _resolve_last(self, config: Any) -> None:
        """The newest ``last*.ckpt`` of earlier runs; logging goes on in that run's ``version_N``
        folder (so ModelCheckpoint also restores its best score)."""
        trainer = config.get("trainer") or {}
        folders = checkpoint_folders(trainer)
        found = find_last_checkpoint(folders)
        if found is None:
            rank_zero_warn(
                f"--ckpt_path last: no last*.ckpt under {', '.join(map(str, folders))}; starting from scratch"
            )
            config["ckpt_path"] = None
            return
        rank_zero_info(f"--ckpt_path last: resuming from {found}")
        config["ckpt_path"] = str(found)
        logger = trainer.get("logger")
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is None or "version" not in init_args or init_args.get("version") is not None:
            return
        run_folder = found.parent.parent  # save_dir/name/version_N/checkpoints/last.ckpt
        if found.parent.name == "checkpoints" and init_args.get("save_dir") is not None and (
            run_folder.parent.resolve() == (Path(init_args["save_dir"]) / str(init_args.get("name") or "")).resolve()
        ):
            init_args["version"] = run_folder.name  # e.g. "version_3": log on in the same folder

    def _check_checkpoint(self) -> None:
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if is_checkpoint_file(ckpt_path):
            check_compatible(ckpt_path, self.model)

    def before_fit(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()


def is_checkpoint_file(ckpt_path: Any) -> bool:
    """Whether ``--ckpt_path`` names a local file (not Lightning's "last", "best"... or a URL)."""
    return ckpt_path is not None and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt_path)


def checkpoint_folders(trainer: Any) -> list[Path]:
    """Where a config's runs keep checkpoints: ModelCheckpoint ``dirpath``s, the logger's
    ``save_dir/name`` (``version_*/checkpoints`` below it) and ``default_root_dir``."""
    folders: list[Path] = []
    for callback in trainer.get("callbacks") or []:
        dirpath = (callback.get("init_args") or {}).get("dirpath") if hasattr(callback, "get") else None
        if dirpath:
            folders.append(Path(dirpath))
    logger = trainer.get("logger")
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is not None and init_args.get("save_dir"):
        folders.append(Path(init_args["save_dir"]) / str(init_args.get("name") or ""))
    root = Path(trainer.get("default_root_dir") or ".")
    folders += [root, root / "checkpoints"]
    return folders


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None) and return it."""
    return CLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
