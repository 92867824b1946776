"""PASCAL VOC 2012 semantic segmentation (and SBD's augmented training set) as a LightningDataModule.

Layout read (the official devkit, plus the usual ``SegmentationClassAug`` from SBD)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg
                          /SegmentationClass/2007_000032.png        palette ('P') PNGs
                          /SegmentationClassAug/2007_000032.png     optional, grey ('L') PNGs
                          /ImageSets/Segmentation/{train,val,trainval}.txt
                          /ImageSets/Segmentation/train_aug.txt     optional (10,582 ids)

Label PNGs store class indices (0 = background, 1..20 = objects, 255 = object borders and
"difficult" regions, ignored). Palette PNGs are read as their indices: converting them to RGB
or greyscale (a classic bug) turns indices into colours or luminances
(:func:`tasks.data.files.read_label_png`, the project's one label-PNG reader).

Batches are dicts in the format both DataModules share (:mod:`tasks.data.contract`)::

    {"images":      uint8 Tensor[N, 3, H, W] RGB 0..255, not normalised (the network does it),
     "masks":       Int64Tensor[N, H, W] class indices, 255 = ignore,
     "image_sizes": Int64Tensor[N, 2] (height, width) of each image before batch padding,
     "image_ids":   list[str] image stems}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.data.constants import VOC_CLASSES, VOC_IGNORE_INDEX
from tasks.data.contract import DatasetInfo
from tasks.data.files import UnreadableSampleError, check_listed_files, read_label_png, read_rgb
from tasks.data.sampling import (
    DenseDataModule,
    SampleSeeds,
    SeededAugmentation,
    attach_skipped,
    global_seed,
    load_skipping,
)
from tasks.data.segmentation_transforms import apply_transforms, eval_transforms, pad_collate, train_transforms
from tasks.data.synthetic import (
    SYNTHETIC_VOC_CLASS_NAMES,
    SYNTHETIC_VOC_ROOT,
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


class VOCSegmentation(SeededAugmentation, Dataset):
    """One split of VOC 2012 segmentation.

    Args:
        root: the folder holding ``VOCdevkit`` (or ``VOC2012`` itself).
        split: a file name of ``ImageSets/Segmentation`` without ``.txt``: ``train``, ``val``,
            ``trainval``, or an SBD split such as ``train_aug`` (``*_aug`` splits read
            ``SegmentationClassAug``; the others ``SegmentationClass``).
        transform: an albumentations pipeline taking ``image`` and ``mask`` and returning tensors
            (:mod:`tasks.data.segmentation_transforms`); None returns the files' pixels as they are.
        limit: use only the first ``limit`` ids (quick runs).
        num_classes: when given, masks with other labels (except 255) are refused, naming the file.
        skip_unreadable: leave out ids whose files are missing (warned once, here) and replace
            samples that cannot be read (corrupt or truncated, mask in the wrong mode, size or
            label range) by the next readable one, logging each. Off: missing files stop the
            run here, unreadable ones when first read, with the path and the problem.
        seeds: per-sample augmentation seeds (see :mod:`tasks.data.sampling`). Without them (or
            before an epoch is set) the pipeline follows torch's seed
            (:class:`~tasks.data.sampling.SeededAugmentation`).

    Items are ``{"image": uint8 Tensor[3, H, W], "mask": Tensor[H, W] int64, "image_id": str}``.
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

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.seed_transform(index)
        return load_skipping(index, len(self), self._load, skip=self.skip_unreadable)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.voc / "JPEGImages" / f"{self.ids[index]}.jpg"

    def _load(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        image_path = self.image_path(index)
        mask_path = self.mask_dir / f"{image_id}.png"
        image = read_rgb(image_path)
        mask = read_label_png(mask_path, num_classes=self.num_classes, ignore_index=IGNORE_INDEX)
        if image.shape[:2] != mask.shape:
            raise UnreadableSampleError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"
            )
        if self.transform is None:
            return {
                "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(mask).long(),
                "image_id": image_id,
            }
        image_t, mask_t = apply_transforms(self.transform, image, mask)
        return {"image": image_t, "mask": mask_t, "image_id": image_id}


def collate_segmentation(samples: Sequence[dict[str, Any]], *, ignore_index: int = IGNORE_INDEX) -> dict[str, Any]:
    """:func:`pad_collate`, plus the skip messages of ``skip_unreadable`` when there are any."""
    return attach_skipped(pad_collate(samples, ignore_index=ignore_index), samples)


def voc_class_names(
    num_classes: int, *, names: Sequence[str] | None = None, synthetic: bool = False
) -> dict[int, str]:
    """``{label: name}`` for every label ``0..num_classes - 1``, from the data.

    ``names`` (a user's list, background first) when given; the synthetic generator's names for
    its set (:data:`tasks.data.synthetic.SYNTHETIC_VOC_CLASS_NAMES`: five shapes in VOC's
    label space); VOC's names at VOC's 21 classes; else ``class_<label>``. Labels a set does not
    use are ``class_<label>`` too.
    """
    if names is not None:
        return {label: str(name) for label, name in enumerate(names)}
    known: dict[int, str] = {}
    if synthetic:
        known = SYNTHETIC_VOC_CLASS_NAMES
    elif num_classes == len(VOC_CLASSES):
        known = dict(enumerate(VOC_CLASSES))
    return {label: known.get(label, f"class_{label}") for label in range(num_classes)}


class VOCSegmentationDataModule(DenseDataModule):
    """PASCAL VOC 2012 segmentation: augmented training crops, full-resolution evaluation.

    Batches: see the module docs. Evaluation images keep their size; a batch of several is
    padded at the bottom/right to the largest (mean pixel / ignore label), which the metric never
    counts. The default ``eval_batch_size=1`` means no padding at all, so the image-pooling
    branch averages the image only (TF DeepLab instead pads every image to 513x513; mmseg
    evaluates unpadded whole images as here).

    Args:
        root: folder holding ``VOCdevkit/VOC2012``.
        train_split: ``"auto"`` (``train_aug`` when SBD's set is installed, else ``train``) or a
            split name.
        val_split: the validation split (``val``: 1,449 images).
        test_split: the split ``test`` and the test loader use (``val``: VOC 2012's test labels
            are not public).
        crop_size: training crop side (513).
        scale_range: random scale of training images (0.5-2.0).
        scale_step: scale grid (0.25 as TF DeepLab) or None for continuous scales.
        hflip_p: probability of a horizontal flip in training (0.5; 0 switches flips off).
        batch_size: training images per device and step.
        eval_batch_size: validation/test/predict images per batch (1: no padding; ``batch_size``
            when None).
        num_workers: DataLoader workers.
        pin_memory: page-locked batches for fast host-to-GPU copies (ignored without CUDA).
        persistent_workers: keep workers alive between epochs (no re-fork per validation).
        prefetch_factor: batches each worker prepares ahead.
        train_limit, val_limit: use only the first N ids of the training / evaluation splits
            (quick runs).
        synthetic: the data is the project's synthetic VOC-format set
            (``tasks.data.synthetic.make_voc``: 300 train / 50 val images of five shapes; for
            demos and CPU runs); its class names are the generator's (``circle`` at label 1,
            ...). When ``root`` is ``tasks.data.synthetic.SYNTHETIC_VOC_ROOT``
            (``data/synthetic/voc``, the synthetic config's) and holds no VOC yet, the set is
            written there first. Any other ``root`` must exist: a mistyped ``--data.root`` stops
            with "not found" rather than training on a new set.
        write_synthetic: write the synthetic set into ``root`` when it holds no VOC, whatever
            ``root`` is (tests, demos, a scratch folder).
        num_classes: classes in the masks, background included; masks with other labels (255
            aside) are refused, naming the file. None: ``len(class_names)`` when given, else
            21 (VOC). The model's ``num_classes`` must cover it.
        class_names: the name of every label, background first, for your own data in VOC's
            layout (reports, drawings, exported metadata). None: VOC's names (the generator's
            with ``synthetic``); see :func:`voc_class_names`.
        skip_unreadable: training leaves out ids whose files are missing and replaces unreadable
            samples by the next readable one instead of stopping; each is logged, and
            ``SkippedSamplesReport`` (added by ``tools/train.py``) logs the count per epoch as
            ``train/skipped_samples``. Evaluation never skips (its mIoU must cover the split).

    Training order and augmentation depend only on (``seed_everything``'s seed, epoch), so a
    run resumed from an end-of-epoch checkpoint is the uninterrupted run. Under DDP evaluation
    images are split across ranks without the ``DistributedSampler``'s padding (no image is
    counted twice), and the confusion matrices are summed: mIoU equals one process's.
    After ``setup``, :meth:`dataset_info` describes the data to the task.
    """

    def __init__(
        self,
        root: str = "data/VOC",
        *,
        train_split: str = "auto",
        val_split: str = "val",
        test_split: str = "val",
        crop_size: int = 513,
        scale_range: tuple[float, float] = (0.5, 2.0),
        scale_step: float | None = 0.25,
        hflip_p: float = 0.5,
        batch_size: int = 8,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        train_limit: int | None = None,
        val_limit: int | None = None,
        synthetic: bool = False,
        write_synthetic: bool = False,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        if num_classes is None:
            num_classes = len(class_names) if class_names is not None else len(VOC_CLASSES)
        if not 1 < num_classes < IGNORE_INDEX:
            raise ValueError(f"data.num_classes must be in 2..{IGNORE_INDEX - 1}, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"data.class_names lists {len(class_names)} names but data.num_classes is {num_classes}; "
                "name every label, background first"
            )
        self.num_classes = num_classes
        names = voc_class_names(num_classes, names=class_names, synthetic=synthetic)
        self.class_names: tuple[str, ...] = tuple(names[label] for label in range(num_classes))
        self.ignore_index = IGNORE_INDEX
        self.datasets: dict[str, VOCSegmentation] = {}

    @property
    def train_dataset(self) -> VOCSegmentation | None:
        return self.datasets.get("train")

    @property
    def val_dataset(self) -> VOCSegmentation | None:
        return self.datasets.get("val")

    @property
    def test_dataset(self) -> VOCSegmentation | None:
        return self.datasets.get("test")

    def dataset_info(self) -> DatasetInfo:
        """The label space (class count and names; no input size: evaluation is at full resolution)."""
        return DatasetInfo(num_classes=self.num_classes, class_names=dict(enumerate(self.class_names)))

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

    def _dataset(self, split: str) -> VOCSegmentation:
        hp = self.hparams
        if split == "train":
            transform = train_transforms(
                hp.crop_size,
                scale_range=hp.scale_range,
                scale_step=hp.scale_step,
                hflip_p=hp.hflip_p,
                ignore_index=IGNORE_INDEX,
            )
            return VOCSegmentation(
                self.root,
                self.resolve_train_split(),
                transform=transform,
                limit=hp.train_limit,
                num_classes=self.num_classes,
                skip_unreadable=hp.skip_unreadable,
                seeds=SampleSeeds(global_seed()),
            )
        return VOCSegmentation(
            self.root,
            hp.val_split if split == "val" else hp.test_split,
            transform=eval_transforms(),
            limit=hp.val_limit,
            num_classes=self.num_classes,
        )

    def setup(self, stage: str | None = None) -> None:
        self.voc_folder()  # a missing root: one line, with the hint above
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        for split in stages[stage] if stage is not None else ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.loader(self.datasets[split], train=train, collate_fn=collate_segmentation)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)
