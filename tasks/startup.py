"""A quiet start for the command-line tools: no third-party adverts, no warnings users cannot act on.

:func:`quiet_startup` runs first thing in ``tools/train.py`` and ``tools/test.py`` (before
torch, Lightning or albumentations are imported, so import-time warnings are covered too). It
imports nothing heavy itself. What it hides:

* deprecation warnings (``DeprecationWarning``, ``FutureWarning`` and their subclasses)
  raised inside the libraries we build on, e.g. Lightning's use of torch's deprecated
  ``LeafSpec``: only a new release of the library can fix them. Warnings attributed to this
  project's code, or to a user's own module named in a config, still show;
* Lightning's adverts for its cloud services ("💡 Tip: For seamless cloud logging ... try
  installing litlogger", the same for litmodels), logged at every ``Trainer`` construction;
* albumentations' check for a newer release on PyPI at import (a network request, and a
  warning when it fails offline), by setting ``NO_ALBUMENTATIONS_UPDATE=1`` unless set.

Everything else (Lightning's hints about workers or logging intervals, the project's own
warnings, errors) is left as it is. The library itself never calls this: a program importing
``tasks`` keeps its own warning settings.
"""

from __future__ import annotations

import logging
import os
import warnings

# Packages whose deprecation warnings a user of the tools cannot act on (re.match on the
# module a warning is attributed to: the package or any of its submodules).
THIRD_PARTY_MODULES = (
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "pytorch_lightning",
    "torch",
    "torchvision",
    "torchmetrics",
    "albumentations",
    "albucore",
    "jsonargparse",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "pycocotools",
    "faster_coco_eval",
    "tensorboard",
    "matplotlib",
    "PIL",
    "cv2",
    "numpy",
)
THIRD_PARTY_PATTERN = r"(?:" + "|".join(THIRD_PARTY_MODULES) + r")(?:\.|$)"
# Lightning's adverts (lightning/pytorch/trainer/connectors/*_connector.py), logged through
# rank_zero_info on these loggers.
ADVERT_PREFIXES = ("💡 Tip:",)
ADVERT_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropAdverts(logging.Filter):
    """Drops log records that advertise Lightning's cloud products."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(ADVERT_PREFIXES)


_ADVERT_FILTER = DropAdverts()


def quiet_startup() -> None:
    """Hide third-party deprecation warnings and adverts for the rest of the process (idempotent)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY_PATTERN)
    for name in ADVERT_LOGGERS:
        logger = logging.getLogger(name)
        if _ADVERT_FILTER not in logger.filters:
            logger.addFilter(_ADVERT_FILTER)
