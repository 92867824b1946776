"""PASCAL VOC 2012 semantic segmentation (and SBD's augmented training set) as a LightningDataModule.

Layout read (the official devkit, plus the usual ``SegmentationClassAug`` from SBD)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg
                          /SegmentationClass/2007_000032.png        palette ('P') PNGs
                          /SegmentationClassAug/2007_000032.png     optional, grey ('L') PNGs
                          /ImageSets/Segmentation/{train,val,trainval}.txt
                          /ImageSets/Segmentation/train_aug.txt     optional (10,582 ids)

Label PNGs store class indices (0 = background, 1..20 = objects, 255 = object borders and
"difficult" regions, ignored). Palette PNGs are read as their indices: converting them to RGB
or greyscale (a classic bug) turns indices into colours or luminances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, get_worker_info

from tasks.data.files import UnreadableSampleError, check_listed_files, read_label_png, read_rgb
from tasks.data.sampling import ResumableTrainingData, SampleSeeds, attach_skipped, global_seed, load_skipping
from tasks.data.segmentation_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_transforms,
    eval_transforms,
    pad_collate,
    train_transforms,
)
from tasks.data.synthetic import (  # VOC's class names and void label are defined once, there
    SYNTHETIC_VOC_ROOT,
    VOC_CLASSES,
    VOC_IGNORE_INDEX,
    may_write_synthetic,
    synthetic_hint,
)

IGNORE_INDEX = VOC_IGNORE_INDEX  # VOC's "void": object borders and difficult regions, never scored


def find_voc2012(root: str | Path) -> Path:
    """The ``VOC2012`` folder under ``root`` (``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root``)."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root}: no PASCAL VOC 2012 found (expected {root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages'})"
    )


def read_mask(path: str | Path, num_classes: int | None = None) -> np.ndarray:
    """A label PNG as ``uint8[H, W]`` class indices: the palette indices of a 'P' image, or an 'L' image.

    Raises ``UnreadableSampleError`` (a ``ValueError``) naming the file for other modes, corrupt
    files and, with ``num_classes``, labels outside ``0..num_classes - 1`` and 255.
    """
    return read_label_png(path, num_classes=num_classes, ignore_index=IGNORE_INDEX)


def read_split(path: Path) -> list[str]:
    """Image ids of a split file: one id per line, or ``/JPEGImages/ID.jpg /Segm../ID.png`` pairs."""
    ids = []
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token:
            ids.append(Path(token).stem)
    return ids


def available_splits(voc: Path) -> list[str]:
    folder = voc / "ImageSets" / "Segmentation"
    return sorted(path.stem for path in folder.glob("*.txt")) if folder.is_dir() else []


def has_train_aug(voc: Path) -> bool:
    """Whether SBD's augmented set (``SegmentationClassAug`` + ``train_aug.txt``) is installed."""
    return (voc / "SegmentationClassAug").is_dir() and (
        voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    ).is_file()


class VOCSegmentation(Dataset):
    """One split of VOC 2012 segmentation.

    Args:
        root: the folder holding ``VOCdevkit`` (or ``VOC2012`` itself).
        split: a file name of ``ImageSets/Segmentation`` without ``.txt``: ``train``, ``val``,
            ``trainval``, or an SBD split such as ``train_aug`` (``*_aug`` splits read
            ``SegmentationClassAug``; the others ``SegmentationClass``).
        transform: an albumentations pipeline taking ``image`` and ``mask`` and returning tensors
            (:mod:`tasks.data.segmentation_transforms`); None returns normalisation-free tensors.
        limit: use only the first ``limit`` ids (quick runs).
        num_classes: when given, masks with other labels (except 255) are refused, naming the file.
        skip_unreadable: leave out ids whose files are missing (warned once, here) and replace
            samples that cannot be read (corrupt or truncated, mask in the wrong mode, size or
            label range) by the next readable one, logging each. Off: missing files stop the
            run here, unreadable ones when first read, with the path and the problem.
        seeds: per-sample augmentation seeds (see :mod:`tasks.data.sampling`).

    Items are ``{"image": Tensor[3, H, W] float, "mask": Tensor[H, W] int64, "image_id": str}``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        transform: A.Compose | None = None,
        limit: int | None = None,
        num_classes: int | None = None,
        skip_unreadable: bool = False,
        seeds: SampleSeeds | None = None,
    ) -> None:
        self.voc = find_voc2012(root)
        list_file = self.voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file}: split not found; available: {available_splits(self.voc)}")
        self.split = split
        self.mask_dir = self.voc / ("SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass")
        if not self.mask_dir.is_dir():
            raise FileNotFoundError(f"{self.mask_dir}: label folder of split {split!r} not found")
        self.ids = read_split(list_file)[:limit]
        if not self.ids:
            raise ValueError(f"{list_file}: no image ids")
        self.transform = transform
        self.num_classes = num_classes
        self.skip_unreadable = skip_unreadable
        self.seeds = seeds
        self._check_files(list_file)

    def _check_files(self, list_file: Path) -> None:
        """Missing images or masks stop the run now (or, skipping, are left out), not hours in."""
        gone: set[str] = set()
        for folder, suffix in ((self.voc / "JPEGImages", ".jpg"), (self.mask_dir, ".png")):
            names = [f"{image_id}{suffix}" for image_id in self.ids]
            missing = check_listed_files(folder, names, list_file, skip=self.skip_unreadable)
            gone |= {Path(name).stem for name in missing}
        self.ids = [image_id for image_id in self.ids if image_id not in gone]
        if not self.ids:
            raise ValueError(f"{list_file}: none of the listed images can be found")

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Per-sample augmentation seeds from now on follow ``(seed, epoch, index)``."""
        if self.seeds is not None:
            self.seeds.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        seed = self.seeds(index) if self.seeds is not None else None
        if seed is not None and self.transform is not None:
            self.transform.set_random_seed(seed)
        return load_skipping(index, len(self), self._load, skip=self.skip_unreadable)

    def _load(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image_path = self.voc / "JPEGImages" / f"{image_id}.jpg"
        mask_path = self.mask_dir / f"{image_id}.png"
        image, mask = read_rgb(image_path), read_mask(mask_path, self.num_classes)
        if image.shape[:2] != mask.shape:
            raise UnreadableSampleError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"
            )
        if self.transform is None:
            return {
                "image": torch.from_numpy(image).permute(2, 0, 1).float(),
                "mask": torch.from_numpy(mask).long(),
                "image_id": image_id,
            }
        image_t, mask_t = apply_transforms(self.transform, image, mask)
        return {"image": image_t, "mask": mask_t, "image_id": image_id}


def collate_segmentation(samples: Sequence[dict[str, Any]], *, ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """:func:`pad_collate`, plus the skip messages of ``skip_unreadable`` when there are any."""
    return attach_skipped(pad_collate(samples, ignore_index=ignore_index), samples)


def seed_worker_transforms(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream.

    Albumentations keeps its generator inside the pipeline, so forked workers would otherwise
    replay identical augmentations; ``torch.initial_seed()`` differs per worker and derives from
    the main process's seed (reproducible under ``seed_everything``).
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)


class VOCSegmentationDataModule(ResumableTrainingData, LightningDataModule):
    """PASCAL VOC 2012 segmentation: augmented training crops, full-resolution validation.

    Batches are ``{"images": Tensor[N, 3, H, W], "masks": Tensor[N, H, W] int64 (255 = ignore),
    "image_sizes": list[(H, W)], "image_ids": list[str]}``. Validation images keep their size;
    a batch of several is padded at the bottom/right to the largest (mean pixel / ignore label),
    which the metric never counts. The default ``val_batch_size=1`` means no padding at all, so
    the image-pooling branch averages the image only (TF DeepLab instead pads every image to
    513x513; mmseg evaluates unpadded whole images as here).

    Args:
        root: folder holding ``VOCdevkit/VOC2012``.
        train_split: ``"auto"`` (``train_aug`` when SBD's set is installed, else ``train``) or a
            split name.
        val_split: the evaluation split (``val``: 1,449 images).
        crop_size: training crop side (513).
        scale_range: random scale of training images (0.5-2.0).
        scale_step: scale grid (0.25 as TF DeepLab) or None for continuous scales.
        hflip: random horizontal flips in training.
        mean, std: normalisation (RGB, 0-1): ImageNet's, what the backbone's weights expect.
        batch_size: training images per device and step.
        val_batch_size: evaluation images per batch (1: no padding).
        num_workers: DataLoader workers.
        train_limit, val_limit: use only the first N ids of a split (quick runs).
        synthetic: the data is the project's synthetic VOC-format set
            (``tasks.data.synthetic.make_voc``: 300 train / 50 val images of five shapes; for
            demos and CPU runs). When ``root`` is ``tasks.data.synthetic.SYNTHETIC_VOC_ROOT``
            (``data/synthetic/voc``, the synthetic config's) and holds no VOC yet, the set is
            written there first. Any other ``root`` must exist: a mistyped ``--data.root`` stops
            with "not found" rather than training on a new set.
        write_synthetic: write the synthetic set into ``root`` when it holds no VOC, whatever
            ``root`` is (tests, demos, a scratch folder).
        num_classes: classes in the masks, background included (21 for VOC); masks with other
            labels are refused, naming the file. The model's ``num_classes`` must cover it.
        skip_unreadable: training leaves out ids whose files are missing and replaces unreadable
            samples by the next readable one instead of stopping; each is logged, and
            ``SkippedSamplesReport`` (added by ``tools/train.py``) logs the count per epoch as
            ``train/skipped_samples``. Validation never skips (its mIoU must cover the split).

    Training order and augmentation depend only on (``seed_everything``'s seed, epoch), so a
    run resumed from an end-of-epoch checkpoint is the uninterrupted run. Under DDP validation
    images are split across ranks without the ``DistributedSampler``'s padding (no image is
    counted twice), and the confusion matrices are summed: mIoU equals one process's.
    """

    def __init__(
        self,
        root: str = "data/VOC",
        *,
        train_split: str = "auto",
        val_split: str = "val",
        crop_size: int = 513,
        scale_range: tuple[float, float] = (0.5, 2.0),
        scale_step: float | None = 0.25,
        hflip: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        train_limit: int | None = None,
        val_limit: int | None = None,
        synthetic: bool = False,
        write_synthetic: bool = False,
        num_classes: int = len(VOC_CLASSES),
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        if not 1 < num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 2..{IGNORE_INDEX - 1}, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = (
            VOC_CLASSES if num_classes == len(VOC_CLASSES) else tuple(f"class_{i}" for i in range(num_classes))
        )
        self._init_resumable()
        self.ignore_index = IGNORE_INDEX
        self.train_dataset: VOCSegmentation | None = None
        self.val_dataset: VOCSegmentation | None = None

    def prepare_data(self) -> None:
        """Write the synthetic set when allowed to (see ``synthetic``) and ``root`` has no VOC
        (runs on one process)."""
        hp = self.hparams
        if not may_write_synthetic(self.root, SYNTHETIC_VOC_ROOT, synthetic=hp.synthetic, write=hp.write_synthetic):
            return
        try:
            find_voc2012(self.root)
        except FileNotFoundError:
            from tasks.data.synthetic import make_voc

            make_voc(self.root)

    def voc_folder(self) -> Path:
        """:func:`find_voc2012` of ``root``; under a synthetic config its error says how to write the set."""
        try:
            return find_voc2012(self.root)
        except FileNotFoundError as error:
            if not self.hparams.synthetic:
                raise
            raise FileNotFoundError(f"{error}; {synthetic_hint(SYNTHETIC_VOC_ROOT)}") from error

    def resolve_train_split(self) -> str:
        split = self.hparams.train_split
        if split == "auto":
            return "train_aug" if has_train_aug(self.voc_folder()) else "train"
        return split

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.voc_folder()  # a missing root: one line, with the hint above
        if stage in (None, "fit") and self.train_dataset is None:
            transform = train_transforms(
                hp.crop_size,
                scale_range=hp.scale_range,
                scale_step=hp.scale_step,
                hflip=hp.hflip,
                mean=hp.mean,
                std=hp.std,
                ignore_index=IGNORE_INDEX,
            )
            # Seeded from torch so that seed_everything makes the in-process augmentations
            # reproducible too (workers reseed in seed_worker_transforms).
            transform.set_random_seed(int(torch.randint(2**31 - 1, ())))
            self.train_dataset = VOCSegmentation(
                self.root,
                self.resolve_train_split(),
                transform=transform,
                limit=hp.train_limit,
                num_classes=self.num_classes,
                skip_unreadable=hp.skip_unreadable,
                seeds=SampleSeeds(global_seed()),
            )
        if stage in (None, "fit", "validate", "test", "predict") and self.val_dataset is None:
            self.val_dataset = VOCSegmentation(
                self.root,
                hp.val_split,
                transform=eval_transforms(mean=hp.mean, std=hp.std),
                limit=hp.val_limit,
                num_classes=self.num_classes,
            )

    def _loader(self, dataset: Dataset, batch_size: int, *, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = partial(
            collate_segmentation, ignore_index=IGNORE_INDEX
        )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=(
                self.train_sampler(dataset) if train else self._eval_sampler(dataset)
            ),
            # Full batches only in training (BatchNorm), unless the set is smaller than one batch.
            drop_last=train and len(dataset) >= batch_size,
            num_workers=workers,
            collate_fn=collate,
            worker_init_fn=seed_worker_transforms,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_sampler(self, dataset: Dataset) -> UnrepeatedDistributedSampler | None:
        # Lightning's DistributedSampler pads the last ranks with repeated images, whose pixels
        # the summed confusion matrix would count twice. Each rank takes a disjoint share instead
        # (ranks may then run one batch fewer: validation has no per-step collectives).
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.hparams.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.hparams.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
