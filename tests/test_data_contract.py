"""Both DataModules speak one contract (tasks/data/contract.py): batch keys and types, option
names, worker seeding, dataset_info; the constants they share are defined once."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from tasks.data.coco import COCODetectionDataModule
from tasks.data.contract import DatasetInfo, DescribesData
from tasks.data.sampling import seed_worker
from tasks.data.voc import VOCSegmentationDataModule

ROOT = Path(__file__).resolve().parents[1]
SHARED_OPTIONS = {
    "batch_size", "eval_batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor",
    "train_split", "val_split", "test_split", "hflip_p", "synthetic", "write_synthetic", "skip_unreadable",
}  # fmt: skip


def modules(coco_root: Path, voc_root: Path, **options) -> dict[str, object]:
    options = {"batch_size": 2, "num_workers": 0, **options}
    return {
        "coco": COCODetectionDataModule(coco_root, image_size=96, **options),
        "voc": VOCSegmentationDataModule(str(voc_root), crop_size=65, **options),
    }


def test_both_datamodules_yield_one_batch_format(synthetic_coco: Path, synthetic_voc: Path) -> None:
    own_keys = {"coco": {"targets"}, "voc": {"masks"}}
    id_type = {"coco": int, "voc": str}
    for name, module in modules(synthetic_coco, synthetic_voc, eval_batch_size=3).items():
        module.setup("fit")
        for batch in (next(iter(module.train_dataloader())), next(iter(module.val_dataloader()))):
            assert set(batch) == {"images", "image_sizes", "image_ids"} | own_keys[name], name
            images, sizes, ids = batch["images"], batch["image_sizes"], batch["image_ids"]
            assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, name
            assert sizes.dtype == torch.int64 and sizes.shape == (len(images), 2), name
            assert isinstance(ids, list) and len(ids) == len(images), name
            assert all(type(image_id) is id_type[name] for image_id in ids), name
            # Not normalised: the mean pixel is mid-grey, not about zero.
            assert 40 < images.float().mean() < 215, name


def test_both_datamodules_take_the_same_options_and_seed_workers_alike(
    synthetic_coco: Path, synthetic_voc: Path
) -> None:
    for cls in (COCODetectionDataModule, VOCSegmentationDataModule):
        assert SHARED_OPTIONS <= set(inspect.signature(cls.__init__).parameters), cls.__name__
    for name, module in modules(synthetic_coco, synthetic_voc, eval_batch_size=3, num_workers=1).items():
        module.setup("fit")
        val, train = module.val_dataloader(), module.train_dataloader()
        assert val.batch_size == 3 and train.batch_size == 2, name
        assert val.worker_init_fn is seed_worker and train.worker_init_fn is seed_worker, name


def test_both_datamodules_describe_their_data(synthetic_coco: Path, synthetic_voc: Path) -> None:
    for name, module in modules(synthetic_coco, synthetic_voc).items():
        module.setup("validate")
        assert isinstance(module, DescribesData), name
        info = module.dataset_info()
        assert isinstance(info, DatasetInfo), name
        assert set(info.class_names) <= set(range(info.num_classes)), name
    assert modules(synthetic_coco, synthetic_voc)["voc"].dataset_info().image_size is None


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"0\.485\s*,\s*0\.456", "backbones/base.py"),  # ImageNet's mean
        (r"0\.229\s*,\s*0\.224", "backbones/base.py"),  # ImageNet's std
        (r'"diningtable"', "tasks/data/constants.py"),  # VOC's class names
        (r"def _voc_palette|putpalette\(\[", "tasks/data/constants.py"),  # VOC's colour map
    ],
    ids=["imagenet-mean", "imagenet-std", "voc-classes", "voc-palette"],
)
def test_shared_constants_are_defined_once(pattern: str, home: str) -> None:
    found = sorted(
        str(path.relative_to(ROOT))
        for folder in ("backbones", "heads", "tasks", "tools")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(pattern, path.read_text())
    )
    assert found == [home]
