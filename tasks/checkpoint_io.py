"""Checkpoints written atomically: a kill while saving never leaves a broken ``last.ckpt``.

Lightning's default (``TorchCheckpointIO`` -> ``_atomic_save``) writes through an fsspec
transaction, whose local implementation writes a temporary file from ``tempfile.mkstemp()``
(the system temp folder) and then ``shutil.move``s it. When that folder is on another file system
than the checkpoints (``/tmp`` on a node, checkpoints on shared storage: the usual cluster set-up)
the move is a copy onto the final name, and a job killed during that copy leaves a truncated
checkpoint. Nothing is fsynced either, so a node crash can leave a renamed but empty file.

:class:`AtomicCheckpointIO` writes to a temporary file in the checkpoint's own folder, flushes and
fsyncs it, then ``os.replace``s it onto the final name (atomic on POSIX and Windows) and fsyncs
the folder. Readers see the old file or the new one, never a part. Remote URLs (``s3://`` ...)
keep Lightning's path.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to ``path`` through a same-folder temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # serialise first: a failure here touches no file
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


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
    """``TorchCheckpointIO`` whose local saves are atomic (see the module docs).

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
