"""Shared fixtures: small synthetic COCO and VOC datasets, made once per test session.

Each pytest-xdist worker runs its own session and so writes its own copy (well under a second).
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from tools import train
from tools.make_synthetic import make_coco, make_realistic_coco, make_realistic_voc, make_voc

ROOT = Path(__file__).resolve().parents[1]

# Small on purpose: enough images for every case the generator schedules (objects of all COCO size
# ranges, an image without objects and a crowd region in each split) and still fast.
SYNTHETIC_COCO = {"num_train": 24, "num_val": 10, "seed": 0, "min_size": 160, "max_size": 256}
SYNTHETIC_VOC = {"num_train": 16, "num_val": 8, "seed": 0, "min_size": 160, "max_size": 256}


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a COCO 2017-layout dataset: ``train2017/``, ``val2017/``, ``annotations/``."""
    return make_coco(tmp_path_factory.mktemp("synthetic") / "coco", **SYNTHETIC_COCO)


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root that contains ``VOCdevkit/VOC2012`` (pass it as torchvision's VOCSegmentation ``root``)."""
    return make_voc(tmp_path_factory.mktemp("synthetic") / "voc", **SYNTHETIC_VOC)


# The real datasets' quirks in miniature (tasks/data/synthetic.py, "realistic"): 16 train / 8 val
# images of at most 256 px cover every quirk the generator schedules; each set takes about 0.3 s.
REALISTIC = {"num_train": 16, "num_val": 8, "seed": 0, "min_size": 160, "max_size": 256}


@pytest.fixture(scope="session")
def realistic_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COCO 2017 layout with COCO's 80 categories and real ids (objects under 1, 13, 46, 72, 90),
    crowd RLE as lists and strings, empty, grey, CMYK and RGBA images, sparse image ids."""
    return make_realistic_coco(tmp_path_factory.mktemp("realistic") / "coco", **REALISTIC)


@pytest.fixture(scope="session")
def realistic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VOC 2012 + SBD layout: palette masks with void borders, interleaved train/val ids, grey
    ``SegmentationClassAug`` masks and ``train_aug.txt`` (so ``train_split: auto`` picks train_aug)."""
    return make_realistic_voc(tmp_path_factory.mktemp("realistic") / "voc", **REALISTIC)


# Checkpoints of two optimiser steps through the real CLI and configs, shrunk to tiny sizes.
TINY = [
    "--trainer.max_steps", "2",
    "--trainer.max_epochs", "-1",
    "--trainer.val_check_interval", "2",
    "--trainer.check_val_every_n_epoch", "null",
    "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false",
    "--model.network.width_mult", "0.35",
    "--data.num_workers", "0",
]  # fmt: skip


def tiny_checkpoint(config: str, data_root: Path, out: Path, extra: list[str]) -> Path:
    # LightningCLI compares its args with sys.argv (pytest's here): run as `python tools/train.py ...`.
    with mock.patch.object(sys, "argv", ["tools/train.py"]):
        _fit(config, data_root, out, extra)
    (checkpoint,) = out.glob("*/version_*/checkpoints/last.ckpt")
    return checkpoint


def _fit(config: str, data_root: Path, out: Path, extra: list[str]) -> None:
    train.main(
        ["fit", "--config", str(ROOT / "configs" / config), "--data.root", str(data_root),
         "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out), *TINY, *extra]
    )  # fmt: skip


@pytest.fixture(scope="session")
def detection_checkpoint(synthetic_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = ["--model.network.image_size", "128", "--data.batch_size", "4",
             "--data.persistent_workers", "false"]  # fmt: skip
    return tiny_checkpoint("ssdlite_mobilenetv2_synthetic.yaml", synthetic_coco, tmp_path_factory.mktemp("det"), extra)


@pytest.fixture(scope="session")
def segmentation_checkpoint(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = ["--data.crop_size", "65", "--data.batch_size", "2"]
    return tiny_checkpoint("deeplabv3_mobilenetv2_synthetic.yaml", synthetic_voc, tmp_path_factory.mktemp("seg"), extra)
