"""Checkpoints written atomically, readable by colleagues, and read without running code.

Lightning's default (``TorchCheckpointIO`` -> ``_atomic_save``) writes through an fsspec
transaction, whose local implementation writes a temporary file from ``tempfile.mkstemp()``
(the system temp folder) and then ``shutil.move``s it. When that folder is on another file system
than the checkpoints (``/tmp`` on a node, checkpoints on shared storage: the usual cluster set-up)
the move is a copy onto the final name, and a job killed during that copy leaves a truncated
checkpoint. Nothing is fsynced either, so a node crash can leave a renamed but empty file.

:class:`AtomicCheckpointIO` writes to a temporary file ``.<name>.<random>.tmp`` in the
checkpoint's own folder, flushes and fsyncs it, then ``os.replace``s it onto the final name
(atomic on POSIX and Windows) and fsyncs the folder. Readers see the old file or the new one,
never a part. The file gets the mode the user's umask gives any new file (``mkstemp`` would make
it 0600, unreadable by the rest of a group on a shared cluster). A temporary file left by a
killed save is removed by :func:`remove_orphans` when the next run starts
(:class:`tasks.callbacks.RemoveOrphanedTempFiles`). Loading always passes ``weights_only=True``.
Remote URLs (``s3://`` ...) keep Lightning's path.
"""

from __future__ import annotations

import io
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

# ".last.ckpt.1a2b3c4d.tmp": our temporary names (and mkstemp's 8-character ones, of earlier versions).
_TEMPORARY = re.compile(r"^\.(?P<name>.+\.ckpt)\.[A-Za-z0-9_]{8}\.tmp$")


def temporary_name(path: Path) -> Path:
    """A fresh temporary file name next to ``path`` that :func:`remove_orphans` recognises."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` through a same-folder temporary file and ``os.replace``.

    The file's mode is ``0o666`` less the process umask, as for any file the user creates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file
    temporary = temporary_name(path)
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.ckpt.<8 characters>.tmp``) that killed saves left in
    ``folder``; nothing else is touched. Returns what was removed.

    Call it only where no other process is saving into ``folder`` at the same time (a run's own
    checkpoint folders at its start, on global rank zero).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every platform.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and whose loads are ``weights_only``.

    ``tools/train.py`` installs it on every run that has no checkpoint plug-in of its own; with
    the Python API: ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{self.__class__.__name__}`. Please implement your custom `CheckpointIO`"
                " to define how you'd like to use `storage_options`."
            )
        if not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's loader with ``weights_only=True`` whatever the caller asks: a checkpoint
        never runs code (torch's own default can be switched off by an environment variable)."""
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
