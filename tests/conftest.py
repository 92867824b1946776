"""Shared fixtures: small synthetic COCO and VOC datasets, made once per test session.

Each pytest-xdist worker runs its own session and so writes its own copy (well under a second).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.make_synthetic import make_coco, make_voc

# Small on purpose: enough images for every case the generator schedules (objects of all COCO size
# ranges, an image without objects and a crowd region in each split) and still fast.
SYNTHETIC_COCO = {"num_train": 24, "num_val": 8, "seed": 0, "min_size": 160, "max_size": 256}
SYNTHETIC_VOC = {"num_train": 16, "num_val": 8, "seed": 0, "min_size": 160, "max_size": 256}


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a COCO 2017-layout dataset: ``train2017/``, ``val2017/``, ``annotations/``."""
    return make_coco(tmp_path_factory.mktemp("synthetic") / "coco", **SYNTHETIC_COCO)


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root that contains ``VOCdevkit/VOC2012`` (pass it as torchvision's VOCSegmentation ``root``)."""
    return make_voc(tmp_path_factory.mktemp("synthetic") / "voc", **SYNTHETIC_VOC)
