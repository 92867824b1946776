"""The project's command line: LightningCLI plus safe checkpoints, exact resume and errors for people.

``tools/train.py`` is its door (``python tools/train.py fit --config ...``); its docstring lists
what :class:`CLI` adds to plain LightningCLI. :func:`main` builds the CLI on a list of arguments
(errors propagate, for tests and other programs); :func:`run` is the command line itself: errors
this project raises for people are printed as one line and give exit status 1.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tasks.callbacks import KeepLogHistory, long_run_callbacks
from tasks.checkpoint_io import AtomicCheckpointIO
from tasks.checkpoints import check_compatible, check_task, find_last_checkpoint, read_hyper_parameters

ROOT = Path(__file__).resolve().parents[1]  # the checkout: errors raised below it are the project's

VERBOSE_VARIABLE = "MOBILEDENSE_VERBOSE"


class CLI(LightningCLI):
    """LightningCLI with safe atomic checkpoints, exact resume and checked ``--ckpt_path``."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for callback in long_run_callbacks():
            if not any(isinstance(existing, type(callback)) for existing in trainer.callbacks):
                trainer.callbacks.append(callback)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: not the user's own
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse, then resolve ``--ckpt_path last`` and check the checkpoint against the config.

        Runs before LightningCLI reads the checkpoint's hyper-parameters (and imports the class
        they name) to replace the configured model: a file that is not safe to load, names a
        class outside this project's tasks, or holds the other task is refused here with one
        line, rather than running its code or training the wrong model on the wrong data.
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
        else:
            read_hyper_parameters(ckpt_path)  # weights_only and allow-list checks alone

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        link_image_size(config)

    def _resolve_last(self, config: Any) -> None:
        """The newest ``last*.ckpt`` of earlier runs; logging goes on in that run's ``version_N``
        folder (so ModelCheckpoint also restores its best score, and ``metrics.csv`` continues)."""
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
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if not is_checkpoint_file(ckpt_path):
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, KeepLogHistory):
                # CSVLogger deletes metrics.csv of the folder it logs into as fit starts: when
                # that is the resumed run's own folder (--ckpt_path last), the callback puts the
                # earlier rows back, so Lightning's "will be deleted" warning does not hold.
                callback.read_history(ckpt_path)
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()


def link_image_size(config: Any) -> None:
    """The network's ``image_size`` is the data's unless the data names its own: one place to
    set the input side (``--model.network.image_size 300`` resizes the data too)."""
    model = _init_args(config.get("model"))
    network = _init_args(model.get("network")) if model else None
    data = _init_args(config.get("data"))
    if not network or not data or "image_size" not in data or "image_size" not in network:
        return
    if data.get("image_size") is None:
        data["image_size"] = network.get("image_size")


def _init_args(section: Any) -> Any:
    """``section.init_args`` of a ``{class_path, init_args}`` config (a jsonargparse Namespace), or None."""
    return section.get("init_args") if hasattr(section, "get") else None


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


# The start of `tools/train.py --help`: what this CLI adds to plain LightningCLI.
DESCRIPTION = (
    "Train, validate, test or predict a task from one YAML config (LightningCLI). Added to plain "
    "LightningCLI: checkpoints written atomically and read safely (weights_only, this project's "
    "classes only); exact resume, also mid-epoch, with metrics.csv kept; '--ckpt_path last' resumes "
    "the newest run of the config; every fit ends validated, with a summary and curves.png; data "
    "and checkpoint errors in one line (MOBILEDENSE_VERBOSE=1 for the traceback)."
)


def main(args: list[str] | None = None, *, run: bool = True, exit_on_error: bool = True) -> LightningCLI:
    """Run the CLI on ``args`` (``sys.argv[1:]`` when None) and return it; errors propagate.

    ``run=False`` only builds the task, DataModule and Trainer (``args`` then has no subcommand);
    ``exit_on_error=False`` raises a parse error instead of printing the usage and exiting.
    """
    return CLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": exit_on_error},
        args=args,
        run=run,
    )


def fit_briefly(config: str | Path, data_root: Path, out: Path, steps: int, val_every: int) -> Path:
    """``tools/train.py fit`` of ``config`` for ``steps`` optimiser steps into ``out`` (what the
    demo runs); the last checkpoint."""
    main(
        [
            "fit",
            "--config", str(config),
            "--data.root", str(data_root),
            "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "-1",
            "--trainer.val_check_interval", str(val_every),
            "--trainer.check_val_every_n_epoch", "null",
            "--trainer.default_root_dir", str(out),
            "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", "logs",
        ]
    )  # fmt: skip
    checkpoints = sorted(out.glob("logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise RuntimeError(f"{out}: training wrote no last.ckpt")
    return checkpoints[-1]


def error_for_people(error: BaseException) -> str | None:
    """The message of an error this project raises for people (a missing or broken file, a
    refused checkpoint, a wrong option value), or None for anything else (a bug: keep the traceback).

    That is a ``ValueError``, ``OSError`` or ``RuntimeError`` raised by the project's own code
    (its innermost frame is in ``tasks/``, ``heads/``, ``backbones/`` or ``tools/``), also when
    a DataLoader worker raised it (PyTorch re-raises it in the main process with the worker's
    traceback as text: the message is its last line).
    """
    if not isinstance(error, (ValueError, OSError, RuntimeError)):
        return None
    message = str(error).strip()
    if "\nOriginal Traceback" in message:
        frames = re.findall(r'File "([^"]+)"', message)
        origin = frames[-1] if frames else ""
        message = message.splitlines()[-1]
        message = message.split(": ", 1)[1] if re.match(r"^[\w.]+(Error|Exception): ", message) else message
    else:
        traceback = error.__traceback__
        if traceback is None:
            return None
        while traceback.tb_next is not None:
            traceback = traceback.tb_next
        origin = traceback.tb_frame.f_code.co_filename
    return message if message and _in_project(origin) else None


def _in_project(filename: str) -> bool:
    """Whether ``filename`` is a source file of this project (not Lightning's, torch's...)."""
    try:
        relative = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        return False
    return relative.parts[0] in ("tasks", "heads", "backbones", "tools") if relative.parts else False


def run(args: list[str] | None = None) -> int:
    """The command line: :func:`main`, with errors for people as one line and exit status 1.

    Set ``MOBILEDENSE_VERBOSE=1`` to get the full traceback instead.
    """
    try:
        main(args)
    except Exception as error:
        message = error_for_people(error)
        if message is None or os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0
