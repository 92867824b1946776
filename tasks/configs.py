"""Build a training config's task and DataModule in Python, exactly as ``tools/train.py`` builds them.

One way to turn a YAML config into objects, shared by ``tools/summary.py`` (counting the paper
models), the benchmark (timing them, training on synthetic data) and the tests: the project's
LightningCLI (:class:`tasks.cli.CLI`) with ``run=False``, so ``class_path`` / ``init_args``,
linked arguments, ``seed_everything`` and defaults resolve as they do for ``fit``.

    task, data = instantiate_config("configs/deeplabv3_mobilenetv2_voc.yaml", ["--model.network.aspp=full"])
    counts = tasks.complexity.count(task.network, 513)
"""

from __future__ import annotations

import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule

from tasks.cli import main


def instantiate_config(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[LightningModule, LightningDataModule]:
    """The task and DataModule that ``python tools/train.py fit --config PATH OVERRIDES`` trains.

    Args:
        path: a LightningCLI config (``model`` and ``data`` sections with ``class_path``).
        overrides: more command-line arguments in LightningCLI's syntax, e.g.
            ``["--model.network.aspp=full", "--data.root=/data/voc", "--data.batch_size", "4"]``.

    Building reads and downloads nothing: the tasks load pretrained weights when fitting starts.
    The CLI also builds (and discards) the Trainer, and sets ``seed_everything`` from the config,
    so two builds of one config hold the same initial weights.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the config or an override does not parse (one line naming ``path``).
            Errors raised while building the objects propagate unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with warnings.catch_warnings():
            # Called from another program's command line (tools/summary.py): its sys.argv is not ours.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
            cli = main(["--config", str(path), *overrides], run=False, exit_on_error=False)
    except ArgumentError as error:  # the YAML or an override does not parse (jsonargparse's message)
        detail = " ".join(line.strip(" -") for line in str(error).splitlines() if line.strip(" -"))
        raise ValueError(f"{path}{' with ' + ' '.join(overrides) if overrides else ''}: {detail}") from error
    return cli.model, cli.datamodule
