"""Open a training checkpoint safely, as the task that wrote it, with errors that say what is wrong.

A checkpoint is a pickle, and unpickling can run any code the file names. So every read here
goes through ``torch.load(..., weights_only=True)`` (tensors, containers and plain Python
values only; PyTorch refuses anything else before it is built), and the class a checkpoint asks
to be rebuilt as (``_class_path``, written by LightningCLI into its hyper-parameters) is looked
up in :data:`PROJECT_CLASSES`, an allow-list of this project's tasks and DataModules, before
anything is imported. A file that fails either check is refused with one line naming it.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from lightning.pytorch import LightningModule

from tasks.buildable import check_class_paths
from tasks.checkpoint_conversion import convert_checkpoint, is_legacy
from tasks.training import TASK_CLASS_KEY

Task = TypeVar("Task", bound=LightningModule)

# The classes a checkpoint may name, by exact class path: the only strings ever imported here.
PROJECT_CLASSES: frozenset[str] = frozenset(
    {
        "tasks.detection.SSDLiteDetection",
        "tasks.segmentation.DeepLabV3Segmentation",
        "tasks.data.coco.COCODetectionDataModule",
        "tasks.data.voc.VOCSegmentationDataModule",
    }
)
# How LightningCLI rebuilds a module from saved hyper-parameters (Lightning checks it too).
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def load_weights_only(path: str | Path, *, mmap: bool = False, raw: bytes | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a refusal or a broken file is one line.

    Args:
        path: the file (named in messages).
        mmap: memory-map the tensors instead of reading them (zip checkpoints only).
        raw: the file's bytes, already read: they are loaded instead of ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: it holds objects other than tensors and plain data (a
            pickle that could run code), or it is not a PyTorch file at all.
    """
    path = Path(path)
    if raw is None and not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        source = io.BytesIO(raw) if raw is not None else path
        return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and raw is None)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError...: all mean "not loadable"
        message = str(error)
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", message)
        if refused or "Weights only load failed" in message:
            what = f" ({refused.group(1)})" if refused else ""
            raise ValueError(
                f"{path}: refused: the file holds Python objects{what}, not only tensors and plain data; "
                "loading it could run code (checkpoints are read with torch.load(weights_only=True))"
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({first_line})") from error


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict (CPU tensors, read with ``weights_only=True``); errors name the file.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_weights_only`; also when the file is not
            a Lightning checkpoint, or names a class outside :data:`PROJECT_CLASSES`.
    """
    checkpoint = load_weights_only(path)
    _check_checkpoint(path, checkpoint)
    return checkpoint


def check_before_loading(source: str | Path | IO[bytes]) -> None:
    """Refuse an unsafe checkpoint (see :func:`_check_checkpoint`) before Lightning reads its
    hyper-parameters and lets jsonargparse import the classes they name."""
    if isinstance(source, (str, Path)):
        _check_checkpoint(source, load_weights_only(source))
        return
    position = source.tell()
    raw = source.read()
    source.seek(position)
    _check_checkpoint("checkpoint", load_weights_only("checkpoint", raw=raw))


def _check_checkpoint(path: str | Path, checkpoint: Any) -> None:
    """Refuse a non-Lightning file and any class path or instantiator we would not import."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict'); use tools/train.py to make one")
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        saved = checkpoint.get(key)
        if saved is None:
            continue
        if not isinstance(saved, Mapping):
            raise ValueError(f"{path}: {key} is a {type(saved).__name__}, expected a dict")
        class_path = saved.get("_class_path")
        if class_path is not None:
            check_class_path(path, class_path)
        instantiator = saved.get("_instantiator")
        if instantiator is not None and instantiator != _INSTANTIATOR:
            raise ValueError(f"{path}: refused: {key} names the instantiator {instantiator!r}; only {_INSTANTIATOR} is allowed")
        check_class_paths(saved, f"{path}: {key}")


def check_class_path(path: str | Path, class_path: Any, *, also: Iterable[str] = ()) -> str:
    """``class_path`` if it is one of :data:`PROJECT_CLASSES` (or of ``also``), else a refusal.

    Args:
        path: the checkpoint, for the message.
        class_path: what the checkpoint names.
        also: further class paths the caller already trusts (the class a config names: it has
            been imported by the configuration itself).

    Raises:
        ValueError: naming the file and the class.
    """
    if not isinstance(class_path, str) or (class_path not in PROJECT_CLASSES and class_path not in set(also)):
        allowed = ", ".join(sorted(PROJECT_CLASSES))
        raise ValueError(f"{path}: refused: the checkpoint names the class {class_path!r}, which is not one of {allowed}")
    return class_path


def recorded_class(
    path: str | Path, hyper_parameters: Mapping, base: type = LightningModule, *, also: Iterable[str] = ()
) -> type:
    """The class a LightningCLI run recorded in saved hyper-parameters (``_class_path``), if allowed.

    Only an allow-listed class path (see :func:`check_class_path`) is imported.

    Raises:
        ValueError: naming the file: no recorded class, a class outside the allow-list, or one
            that is not a ``base``.
    """
    class_path = hyper_parameters.get("_class_path")
    if not class_path:
        raise ValueError(f"{path}: the checkpoint does not record its {base.__name__} class (was it written by tools/train.py?)")
    module_name, _, class_name = check_class_path(path, class_path, also=also).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{path}: class {class_path} cannot be imported ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{path}: {class_path} is not a {base.__name__}")
    return cls


def load_task(path: str | Path, expected: type[Task] | tuple[type[LightningModule], ...] = LightningModule) -> Task:
    """Rebuild the task saved in ``path`` (eval mode, CPU) and check it is an ``expected`` one.

    Raises:
        ValueError: naming the file, when it is not a checkpoint of this project (or not a safe
            one: see the module docs), or when it is one of another task (a segmentation
            checkpoint given to a detection tool, say).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    raw = path.read_bytes()  # checked and built from the same bytes, whatever happens to the file
    checkpoint = load_weights_only(path, raw=raw)
    _check_checkpoint(path, checkpoint)
    if is_legacy(checkpoint.get("hyper_parameters", {})):
        checkpoint = convert_checkpoint(checkpoint)
        _check_checkpoint(path, checkpoint)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        raw = buffer.getvalue()
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    if not hyper_parameters.get("_class_path"):  # a task built in Python: no LightningCLI record
        hyper_parameters = {"_class_path": checkpoint.get(TASK_CLASS_KEY)}
    cls = recorded_class(path, hyper_parameters)
    if not issubclass(cls, expected):
        names = " or ".join(c.__name__ for c in (expected if isinstance(expected, tuple) else (expected,)))
        raise ValueError(f"{path}: checkpoint of a {cls.__name__}, but this needs a {names} checkpoint")
    task = cls.load_from_checkpoint(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return task.eval()


def read_hyper_parameters(path: str | Path) -> tuple[dict, dict[str, torch.Size]]:
    """The saved hyper-parameters and the parameter shapes of a checkpoint (memory-mapped, cheap)."""
    try:
        checkpoint = load_weights_only(path, mmap=True)
    except ValueError:  # not a zip checkpoint (mmap needs one): the ordinary reader names the problem
        checkpoint = load_weights_only(path)
    _check_checkpoint(path, checkpoint)
    shapes = {key: value.shape for key, value in checkpoint["state_dict"].items() if hasattr(value, "shape")}
    return dict(checkpoint.get("hyper_parameters", {})), shapes


def check_task(path: str | Path, class_path: str) -> None:
    """Refuse a checkpoint that is unsafe, of the old layout (see
    :mod:`tasks.checkpoint_conversion`), or whose task class is not (a subclass of) the
    configured ``class_path``.

    Raises:
        ValueError: naming the file, e.g. a segmentation checkpoint for a detection config.
    """
    hyper_parameters, _ = read_hyper_parameters(path)
    if is_legacy(hyper_parameters):
        raise ValueError(
            f"{path}: written before tasks took their network as model.init_args.network (its model "
            f"options are flat); convert it with `python tools/convert_checkpoint.py {path} NEW.ckpt` "
            "and pass NEW.ckpt (tools/test.py, predict.py and export.py convert it themselves)"
        )
    configured = recorded_class(path, {"_class_path": class_path}, also=(class_path,))
    _refuse_other_task(path, hyper_parameters, configured)


def _refuse_other_task(path: str | Path, hyper_parameters: dict, configured: type) -> None:
    """The task check of :func:`check_task` and :func:`check_compatible`."""
    if not hyper_parameters.get("_class_path"):
        return  # not written through tools/train.py: the shape check decides
    own = f"{configured.__module__}.{configured.__qualname__}"
    recorded = recorded_class(path, hyper_parameters, also=(own,))
    if not (issubclass(recorded, configured) or issubclass(configured, recorded)):
        raise ValueError(
            f"{path}: checkpoint of a {recorded.__name__}, but the config trains a {configured.__name__}; "
            f"pass a {configured.__name__} checkpoint, or the config of the run that wrote this one"
        )


def check_compatible(path: str | Path, model: LightningModule) -> None:
    """Refuse, with what to change, a checkpoint that ``model`` cannot load.

    Raises:
        ValueError: when the checkpoint is unsafe or holds another task (a segmentation
            checkpoint given to a detection config), or when its parameter shapes differ from
            ``model``'s; the message lists the hyper-parameters that differ between the
            checkpoint and the config.
    """
    hyper_parameters, shapes = read_hyper_parameters(path)
    _refuse_other_task(path, hyper_parameters, type(model))
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if not shapes or shapes == expected:
        return
    own = flat_options(dict(getattr(model, "hparams", {})))
    saved = flat_options(hyper_parameters)
    differing = [
        f"model.{key}: checkpoint {saved[key]!r}, config {own[key]!r}"
        for key in sorted(own)
        if not key.startswith("_") and key in saved and saved[key] != own[key]
    ]
    detail = "; ".join(differing) if differing else "the architecture differs"
    raise ValueError(
        f"{path}: parameter shapes differ from the configured model ({detail}); "
        "set these model options to the checkpoint's values"
    )


def flat_options(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``{class_path, init_args}`` configs as the command line spells them:
    ``{"network.width_mult": 0.35, "network": "tasks.networks.SSDLiteMobileNetV2", ...}``."""
    flat: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "class_path" in value:
            flat[name] = value["class_path"]
            flat.update(flat_options(value.get("init_args") or {}, f"{name}."))
        elif isinstance(value, Mapping):
            flat.update(flat_options(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def find_last_checkpoint(folders: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` in ``folders`` (and their ``*/checkpoints`` sub-folders), or None."""
    candidates: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            candidates += folder.glob("last*.ckpt")
            candidates += folder.glob("*/checkpoints/last*.ckpt")
    candidates = [path for path in candidates if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime) if candidates else None


def convert_checkpoint_file(path: str | Path, out: str | Path) -> bool:
    """Write ``path`` in today's layout to ``out`` (atomically); whether anything changed."""
    from tasks.checkpoint_io import atomic_save

    checkpoint = load_weights_only(path)
    _check_checkpoint(path, checkpoint)
    changed = is_legacy(checkpoint.get("hyper_parameters", {}))
    converted = convert_checkpoint(checkpoint)
    _check_checkpoint(path, converted)
    atomic_save(converted, out)
    return changed
