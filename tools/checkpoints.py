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


def read_hyper_parameters(path: str | Path) -> tuple[dict, dict[str, torch.Size]]:
    """The saved hyper-parameters and the parameter shapes of a checkpoint (memory-mapped, cheap)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one): the ordinary reader names the problem
        checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict'); use tools/train.py to make one")
    shapes = {key: value.shape for key, value in checkpoint["state_dict"].items() if hasattr(value, "shape")}
    return dict(checkpoint.get("hyper_parameters", {})), shapes


def check_task(path: str | Path, class_path: str) -> None:
    """Refuse a checkpoint whose task class is not (a subclass of) the configured ``class_path``.

    Raises:
        ValueError: naming both classes, e.g. a segmentation checkpoint for a detection config.
    """
    hyper_parameters, _ = read_hyper_parameters(path)
    _refuse_other_task(path, hyper_parameters, recorded_class(path, {"_class_path": class_path}))


def _refuse_other_task(path: str | Path, hyper_parameters: dict, configured: type) -> None:
    """The task check of :func:`check_task` and :func:`check_compatible`."""
    if not hyper_parameters.get("_class_path"):
        return  # not written through tools/train.py: the shape check decides
    recorded = recorded_class(path, hyper_parameters)
    if not (issubclass(recorded, configured) or issubclass(configured, recorded)):
        raise ValueError(
            f"{path}: checkpoint of a {recorded.__name__}, but the config trains a {configured.__name__}; "
            f"pass a {configured.__name__} checkpoint, or the config of the run that wrote this one"
        )


def check_compatible(path: str | Path, model: LightningModule) -> None:
    """Refuse, with what to change, a checkpoint that ``model`` cannot load.

    Raises:
        ValueError: when the checkpoint holds another task (a segmentation checkpoint given to a
            detection config), or when its parameter shapes differ from ``model``'s; the message
            lists the hyper-parameters that differ between the checkpoint and the config.
    """
    hyper_parameters, shapes = read_hyper_parameters(path)
    _refuse_other_task(path, hyper_parameters, type(model))
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if not shapes or shapes == expected:
        return
    own = dict(getattr(model, "hparams", {}))
    differing = [
        f"model.{key}: checkpoint {hyper_parameters[key]!r}, config {own[key]!r}"
        for key in sorted(own)
        if not key.startswith("_") and key in hyper_parameters and hyper_parameters[key] != own[key]
    ]
    detail = "; ".join(differing) if differing else "the architecture differs"
    raise ValueError(
        f"{path}: parameter shapes differ from the configured model ({detail}); "
        "set these model options to the checkpoint's values"
    )


def find_last_checkpoint(folders: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` in ``folders`` (and their ``*/checkpoints`` sub-folders), or None."""
    candidates: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            candidates += folder.glob("last*.ckpt")
            candidates += folder.glob("*/checkpoints/last*.ckpt")
    candidates = [path for path in candidates if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None
