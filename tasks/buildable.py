"""Objects that remember how they were built, so checkpoints store plain data, never pickles.

A task receives its network (and its optimiser and schedule recipes) as objects. A checkpoint
must not pickle them: loading a pickle can run code. Instead each such class derives from
:class:`Buildable`, which records the keyword arguments it was built with; :func:`config_of`
turns the object into ``{"class_path": ..., "init_args": {...}}`` of plain values (what a
LightningCLI YAML holds), and :func:`build` rebuilds it from that, importing only classes of
this project's packages.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# Packages a class path read from a file may name: nothing else is ever imported from one.
PROJECT_PACKAGES: tuple[str, ...] = ("tasks", "heads", "backbones")


class Buildable:
    """Keeps the arguments of ``__init__`` (defaults applied) in ``init_args``.

    Subclasses need nothing else: ``__new__`` binds the call's arguments to the signature of the
    subclass's ``__init__`` before it runs (nn.Module subclasses included).
    """

    init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        instance = super().__new__(cls)
        signature = inspect.signature(cls.__init__)
        bound = signature.bind(instance, *args, **kwargs)
        bound.apply_defaults()
        recorded: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # without self
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                recorded[name] = value
        object.__setattr__(instance, "init_args", recorded)
        return instance


def class_path(obj: Any) -> str:
    """``module.ClassName`` of ``obj``'s class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def config_of(obj: Buildable) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` with plain values only (safe to save)."""
    if not isinstance(obj, Buildable):
        raise TypeError(f"{class_path(obj)} does not record its arguments (derive it from tasks.buildable.Buildable)")
    return {"class_path": class_path(obj), "init_args": {key: plain(value) for key, value in obj.init_args.items()}}


def plain(value: Any) -> Any:
    """``value`` as YAML-like data: dataclasses as dicts, tuples as lists, buildables as configs."""
    if isinstance(value, Buildable):
        return config_of(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record an argument of type {type(value).__name__}: {value!r}")


def class_paths(value: Any) -> Iterable[str]:
    """Every ``class_path`` inside nested configs."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in ("class_path", "_class_path"):
                yield item
            else:
                yield from class_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from class_paths(item)


def check_class_paths(config: Any, source: str) -> None:
    """Refuse, naming ``source``, a config that names a class outside :data:`PROJECT_PACKAGES`."""
    for path in class_paths(config):
        if not isinstance(path, str) or path.split(".", 1)[0] not in PROJECT_PACKAGES:
            raise ValueError(
                f"{source}: refused: it names the class {path!r}, outside this project's packages "
                f"({', '.join(PROJECT_PACKAGES)})"
            )


def build(config: Mapping[str, Any], expected: type[T], source: str = "config") -> T:
    """Rebuild an object from :func:`config_of`'s output, after checking every class path in it.

    Nested dataclasses and nested ``class_path`` configs are built as LightningCLI builds them
    (jsonargparse), so a checkpoint's network is the network its YAML described.

    Raises:
        ValueError: naming ``source``: a class outside the project, or arguments that do not fit.
    """
    from jsonargparse import ArgumentParser

    check_class_paths(config, source)
    module_name, _, name = str(config.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{source}: class {config.get('class_path')!r} cannot be imported ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        raise ValueError(f"{source}: {config.get('class_path')} is not a {expected.__name__}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(expected, "built", fail_untyped=False)
    try:
        parsed = parser.parse_object({"built": {"class_path": config["class_path"], "init_args": dict(config.get("init_args") or {})}})
    except Exception as error:  # jsonargparse's ArgumentError / ValueError: a config that does not fit
        raise ValueError(f"{source}: {config['class_path']} cannot be built from its saved arguments: {error}") from error
    return parser.instantiate(parsed).built
