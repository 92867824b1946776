"""Open a training checkpoint as the task that wrote it, with errors that say what is wrong."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TypeVar

import torch
from lightning.pytorch import LightningModule

Task = TypeVar("Task", bound=LightningModule)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (CPU tensors); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict'); use tools/train.py to make one")
    return checkpoint


def recorded_class(path: str | Path, hyper_parameters: dict, base: type = LightningModule) -> type:
    """The class a LightningCLI run recorded in saved hyper-parameters (``_class_path``)."""
    class_path = hyper_parameters.get("_class_path")
    if not class_path:
        raise ValueError(f"{path}: the checkpoint does not record its {base.__name__} class (was it written by tools/train.py?)")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path}: task class {class_path} cannot be imported ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{path}: {class_path} is not a {base.__name__}")
    return cls


def load_task(path: str | Path, expected: type[Task] | tuple[type[LightningModule], ...] = LightningModule) -> Task:
    """Rebuild the task saved in ``path`` (eval mode, CPU) and check it is an ``expected`` one.

    Raises:
        ValueError: naming the file, when it is not a checkpoint of this project, or when it is
            one of another task (a segmentation checkpoint given to a detection tool, say).
    """
    checkpoint = read_checkpoint(path)
    cls = recorded_class(path, checkpoint.get("hyper_parameters", {}))
    if not issubclass(cls, expected):
        names = " or ".join(c.__name__ for c in (expected if isinstance(expected, tuple) else (expected,)))
        raise ValueError(f"{path}: checkpoint of a {cls.__name__}, but this needs a {names} checkpoint")
    task = cls.load_from_checkpoint(path, map_location="cpu")
    return task.eval()
