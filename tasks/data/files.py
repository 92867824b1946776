"""Reading dataset files with errors that name the file and the problem.

Every way a single sample can be broken (missing file, corrupt or truncated image, a mask in
the wrong mode, size or label range) raises :class:`UnreadableSampleError` (or its subclass
:class:`MissingFileError`), a one-line message ``"<path>: <problem>"``. The DataModules' training
sets catch exactly these when ``skip_unreadable`` is on and count them (see
:mod:`tasks.data.sampling`); anything else (a wrong folder layout, a bad annotation file) is a
configuration error and always stops the run at ``setup``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# PIL modes of 16-/32-bit single-channel images: scaled to 8 bits rather than clipped.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class UnreadableSampleError(ValueError):
    """One sample cannot be used: its message is ``"<path>: <problem>"``."""


class MissingFileError(UnreadableSampleError, FileNotFoundError):
    """A file a sample needs does not exist."""


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as ``uint8[H, W, 3]`` RGB, whatever its stored mode.

    Grey (L, 16-bit), palette, CMYK, RGBA/LA (alpha dropped) and 1-bit images are converted;
    EXIF orientation is *not* applied, as in COCO's and VOC's annotations (pixel order as stored).

    Raises:
        MissingFileError: the file does not exist.
        UnreadableSampleError: the file is not an image, or is corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: image file missing")
    try:
        with Image.open(path) as image:
            image.load()  # decodes now: a truncated file fails here, not later in a transform
            if image.mode in _WIDE_GREY_MODES:
                grey = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(float(grey.max()), 1.0)
                grey = np.clip(grey / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.array(image.convert("RGB"))  # a writable copy
    except UnidentifiedImageError as error:
        raise UnreadableSampleError(f"{path}: not a readable image (corrupt or unknown format)") from error
    except (OSError, SyntaxError, ValueError) as error:  # PIL's decoders raise all three
        raise UnreadableSampleError(f"{path}: corrupt or truncated image ({error})") from error


LABEL_PNG_MODES = ("P", "L")  # palette indices (VOC's SegmentationClass), grey class indices (SBD's Aug)


def read_label_png(path: str | Path, *, num_classes: int | None = None, ignore_index: int = 255) -> np.ndarray:
    """A label PNG as ``uint8[H, W]`` class indices (palette indices of a 'P' image, or an 'L' image).

    The one reader of label maps: the VOC DataModule's masks and the files ``tools/eval_miou.py``
    scores. A palette image gives its indices, never its colours (converting it to RGB or grey,
    a classic bug, turns indices into colours or luminances); other modes are refused.

    Args:
        path: the PNG.
        num_classes: when given, every value must be below it or equal ``ignore_index``.
        ignore_index: the label of unlabelled pixels.

    Raises:
        MissingFileError, UnreadableSampleError: naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: label file missing")
    try:
        with Image.open(path) as image:
            if image.mode not in LABEL_PNG_MODES:
                raise UnreadableSampleError(
                    f"{path}: mode {image.mode}, expected a label map of class indices "
                    "(P: palette indices, or L: 8-bit grey)"
                )
            mask = np.array(image, dtype=np.uint8)  # a 'P' image gives its indices, not colours
    except UnidentifiedImageError as error:
        raise UnreadableSampleError(f"{path}: not a readable PNG (corrupt or unknown format)") from error
    except (OSError, SyntaxError) as error:
        raise UnreadableSampleError(f"{path}: corrupt or truncated PNG ({error})") from error
    if num_classes is not None:
        bad = (mask >= num_classes) & (mask != ignore_index)
        if bad.any():
            values = sorted(set(np.unique(mask[bad]).tolist()))
            raise UnreadableSampleError(
                f"{path}: labels {values[:8]} outside 0..{num_classes - 1} (and {ignore_index} = ignore); "
                f"is data.num_classes right?"
            )
    return mask


def missing_files(folder: Path, names: Iterable[str]) -> list[str]:
    """The ``names`` (relative paths) that do not exist under ``folder``, in their order.

    Lists ``folder`` once instead of asking the file system about every name, so a split of
    100k images is checked in well under a second, even on network storage.
    """
    try:
        present = set(os.listdir(folder))
    except FileNotFoundError:
        present = set()
    missing = []
    for name in names:
        if "/" in name or os.sep in name:
            if not (folder / name).is_file():
                missing.append(name)
        elif name not in present:
            missing.append(name)
    return missing


def check_listed_files(folder: Path, names: list[str], source: Path, *, skip: bool) -> list[str]:
    """The ``names`` that ``source`` lists but ``folder`` lacks: an error unless ``skip``.

    Called when a dataset is built, so that missing files stop a run before training, not hours in.

    Raises:
        MissingFileError: one line with the count and examples, when some are missing and
            ``skip`` is off. With ``skip`` the same line is a warning and the names are returned
            for the dataset to leave out.
    """
    missing = missing_files(folder, names)
    if not missing:
        return missing
    examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    message = f"{folder}: {len(missing)} of {len(names)} files listed in {source} are missing ({examples})"
    if not skip:
        raise MissingFileError(f"{message}; set data.skip_unreadable true to train without them")
    logger.warning("%s; left out (data.skip_unreadable is on)", message)
    return missing
