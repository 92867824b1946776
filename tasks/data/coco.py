"""COCO detection data: a Dataset over the standard layout and a LightningDataModule.

Layout (COCO 2017)::

    root/train2017/*.jpg
    root/val2017/*.jpg
    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json

Batches are dicts in the format both DataModules share (:mod:`tasks.data.contract`; see
:func:`collate_detection`)::

    {"images":      uint8 Tensor[N, 3, S, S] RGB 0..255, not normalised (the network does it),
     "targets":     [{"boxes": FloatTensor[G, 4] xyxy pixels in the S x S image,
                      "labels": Int64Tensor[G] in 1..K (0 is the background),
                      "crowd_boxes": FloatTensor[C, 4] xyxy pixels of iscrowd regions}, ...],
     "image_ids":   list[int] COCO image ids,
     "image_sizes": Int64Tensor[N, 2] (height, width) of the original images: the frame
                    detections are reported in}

Labels: COCO category ids are not contiguous (1..90 with gaps for 80 classes), so by default
label ``i`` is the ``i``-th category id in increasing order (:attr:`~COCODetectionDataModule.
label_to_category_id` and :attr:`~COCODetectionDataModule.category_id_to_label` map both ways);
with ``contiguous_labels=False`` the label *is* the category id (the TF API's 91-output model).

Evaluation: the task reads :meth:`~COCODetectionDataModule.dataset_info` (the label space, and
the loaded pycocotools ``COCO`` ground truth of the splits set up) to write and score COCO
results; it never opens a file itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset

from tasks.data.contract import DatasetInfo
from tasks.data.detection_transforms import detection_eval_transform, detection_train_transform
from tasks.data.files import UnreadableSampleError, check_listed_files, read_rgb
from tasks.data.sampling import (
    DenseDataModule,
    SampleSeeds,
    SeededAugmentation,
    attach_skipped,
    global_seed,
    load_skipping,
)
from tasks.data.synthetic import SYNTHETIC_COCO_ROOT, may_write_synthetic, synthetic_hint

logger = logging.getLogger(__name__)

_ALBUMENTATIONS_EPS = 1e-7  # the tolerance of albumentations' box size filter (filter_bboxes)


def load_coco_annotations(path: Path) -> COCO:
    """pycocotools ``COCO`` of ``path``, quietly, with an error naming the file when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: COCO annotation file not found (expected root/annotations/instances_<split>.json)"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco = COCO(str(path))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a COCO instances file ({error})") from error
    if not isinstance(coco.dataset, dict) or not coco.dataset.get("images"):
        raise ValueError(f"{path}: no images (an empty or foreign annotation file?)")
    if not coco.dataset.get("categories"):
        raise ValueError(f"{path}: no categories; a COCO instances file lists them under 'categories'")
    if "annotations" not in coco.dataset:
        # pycocotools accepts such a file and has no objects: training would see background only
        # and COCOeval would report AP = -1, both without a word.
        raise ValueError(
            f"{path}: no 'annotations' key; a COCO instances file lists its objects there "
            "(image_info_*.json files list images only)"
        )
    coco.source_path = path  # for error messages further on
    return coco


class COCODetection(SeededAugmentation, Dataset):
    """Images and boxes of one COCO split.

    Args:
        image_dir: folder of the split's images (``root/val2017``).
        coco: the split's loaded annotations.
        transform: an albumentations pipeline of :mod:`tasks.data.detection_transforms`.
        category_id_to_label: ``{COCO category id: label}``.
        keep_empty_images: keep images with no usable (non-crowd, non-degenerate) box.
        min_box_size: boxes narrower or lower than this many pixels (after clipping to the
            image) are degenerate and dropped; the count is logged.
        input_size: side of the square network input that ``transform`` resizes to. Boxes
            narrower or lower than 1 px there (or in the image) are degenerate too: the
            transform's ``min_width``/``min_height`` of 1 px would drop them without a word.
        skip_unreadable: leave out images listed but missing (warned once, here) and replace
            images that cannot be read by the next readable one (each one logged; the batch
            carries the messages for ``SkippedSamplesReport``). Off: the first such image
            stops the run with its path and the problem (missing files already here).
        seeds: per-sample augmentation seeds (:class:`~tasks.data.sampling.SampleSeeds`); the
            training loader's :class:`~tasks.data.sampling.EpochSampler` sets their epoch.
            Without them (or before an epoch is set) the pipeline follows torch's seed
            (:class:`~tasks.data.sampling.SeededAugmentation`).

    Boxes: clipped to the image; boxes left with no width or height, or under 1 px wide or high
    in the image or at ``input_size``, are dropped here and counted in one log line ("dropped N
    degenerate boxes"), so the evaluation transform never drops a box itself. Training
    augmentation may still leave a box out of one sample (SSD's crop drops boxes whose centre
    falls outside the patch; zoom-out can shrink a box below 1 px).
    Annotations whose category id is not in ``category_id_to_label`` stop the run (naming the
    annotation file, the annotation and the id).
    """

    def __init__(
        self,
        image_dir: Path,
        coco: COCO,
        transform: A.Compose,
        *,
        category_id_to_label: Mapping[int, int],
        keep_empty_images: bool = True,
        min_box_size: float = 0.0,
        input_size: int | None = None,
        skip_unreadable: bool = False,
        seeds: SampleSeeds | None = None,
    ) -> None:
        if not image_dir.is_dir():
            raise FileNotFoundError(f"{image_dir}: COCO image directory not found")
        self.image_dir = image_dir
        self.coco = coco
        self.source = getattr(coco, "source_path", image_dir)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.seeds = seeds
        self.input_size = input_size
        self.num_dropped_boxes = 0  # objects (iscrowd 0)
        self.num_dropped_crowd = 0  # crowd regions
        self.records: list[dict[str, Any]] = []
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            record = self._record(info, coco.imgToAnns.get(image_id, []), category_id_to_label, min_box_size)
            if keep_empty_images or len(record["labels"]) > 0:
                self.records.append(record)
        if self.num_dropped_boxes or self.num_dropped_crowd:
            crowd_note = f" and {self.num_dropped_crowd} crowd regions" if self.num_dropped_crowd else ""
            at_input = f" or at the {input_size}x{input_size} input" if input_size else ""
            size_note = f", or not above data.min_box_size={min_box_size:g}" if min_box_size > 0 else ""
            logger.warning(
                f"{self.source}: dropped {self.num_dropped_boxes} degenerate boxes{crowd_note} of {image_dir.name} "
                f"(no area inside the image, or under 1 px wide or high in the image{at_input}{size_note})"
            )
        self._check_files()
        if not self.records:
            raise ValueError(
                f"{self.source}: no usable images in {image_dir.name}"
                + ("" if keep_empty_images else " with objects (data.keep_empty_images is false)")
            )

    def _check_files(self) -> None:
        """Fail now (or, skipping, leave them out) when listed images are missing: not hours in."""
        names = [r["file_name"] for r in self.records]
        gone = set(check_listed_files(self.image_dir, names, Path(self.source), skip=self.skip_unreadable))
        if gone:
            self.records = [r for r in self.records if r["file_name"] not in gone]

    def _record(
        self,
        info: Mapping[str, Any],
        annotations: Sequence[Mapping[str, Any]],
        category_id_to_label: Mapping[int, int],
        min_box_size: float,
    ) -> dict[str, Any]:
        height, width = int(info["height"]), int(info["width"])
        if annotations:
            xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            boxes = np.clip(boxes, 0, [width, height, width, height])
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations])
            unknown = [a for a in annotations if a["category_id"] not in category_id_to_label]
            if unknown:
                raise ValueError(
                    f"{self.source}: annotation {unknown[0].get('id')} of image {info.get('file_name')} has "
                    f"category id {unknown[0]['category_id']}, not one of the categories "
                    f"{sorted(category_id_to_label)}"
                )
            labels = np.array([category_id_to_label[a["category_id"]] for a in annotations], dtype=np.int64)
        else:
            boxes, crowd, labels = np.zeros((0, 4)), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        # albumentations' BboxParams(min_width=1, min_height=1) drops boxes under 1 px (with its
        # 1e-7 tolerance) after every step, the final resize included; decide that here instead.
        sides = [widths, heights]
        if self.input_size is not None:
            sides += [widths * self.input_size / width, heights * self.input_size / height]
        valid = (widths > min_box_size) & (heights > min_box_size)
        for side in sides:
            valid &= side >= 1.0 - _ALBUMENTATIONS_EPS
        self.num_dropped_boxes += int((~valid & ~crowd).sum())
        self.num_dropped_crowd += int((~valid & crowd).sum())
        objects, regions = valid & ~crowd, valid & crowd
        return {
            "image_id": int(info["id"]),
            "file_name": info["file_name"],
            "size": (height, width),
            "boxes": boxes[objects].astype(np.float32),
            "labels": labels[objects],
            "crowd_boxes": boxes[regions].astype(np.float32),
        }

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        """The image file of record ``index``."""
        return self.image_dir / self.records[index]["file_name"]

    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` of record ``index`` (grey, CMYK, RGBA... converted).

        Raises:
            UnreadableSampleError: naming the file: missing, corrupt, truncated, or not the
                size its annotations give.
        """
        record = self.records[index]
        path = self.image_path(index)
        image = read_rgb(path)
        if image.shape[:2] != record["size"]:
            raise UnreadableSampleError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]}, annotations say "
                f"{record['size'][1]}x{record['size'][0]}"
            )
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One sample: ``image`` uint8 Tensor[3, S, S], ``boxes``/``crowd_boxes`` xyxy pixels in it,
        ``labels``, ``image_id`` and ``image_size`` (height, width of the original image);
        ``skipped_samples`` lists what it replaced (``skip_unreadable``)."""
        self.seed_transform(index)
        return load_skipping(index, len(self), self._load, skip=self.skip_unreadable)

    def _load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        boxes = np.concatenate([record["boxes"], record["crowd_boxes"]])
        is_crowd = np.r_[np.zeros(len(record["boxes"])), np.ones(len(record["crowd_boxes"]))]
        labels = np.r_[record["labels"], np.zeros(len(record["crowd_boxes"]), dtype=np.int64)]
        out = self.transform(image=self.load_image(index), bboxes=boxes, labels=labels, is_crowd=is_crowd)
        out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        out_crowd = np.asarray(out["is_crowd"], dtype=bool).reshape(-1)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            "boxes": torch.from_numpy(out_boxes[~out_crowd]),
            "labels": torch.as_tensor(np.asarray(out["labels"]).reshape(-1)[~out_crowd], dtype=torch.int64),
            "crowd_boxes": torch.from_numpy(out_boxes[out_crowd]),
            "image_id": record["image_id"],
            "image_size": record["size"],
        }


def collate_detection(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples of :class:`COCODetection` into the batch dict described in the module docs."""
    batch = {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": [
            {"boxes": s["boxes"], "labels": s["labels"], "crowd_boxes": s["crowd_boxes"]} for s in samples
        ],
        "image_ids": [int(s["image_id"]) for s in samples],
        "image_sizes": torch.tensor([s["image_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
    }
    return attach_skipped(batch, samples)


class COCODetectionDataModule(DenseDataModule):
    """COCO (or any dataset in its layout) for SSD-style detection training and evaluation.

    Args:
        root: folder holding ``<split>/`` image folders and ``annotations/instances_<split>.json``.
        image_size: side of the square network input (SSD's fixed-shape resize): 300 or 320.
            None in a config: the network's ``image_size`` (``tools/train.py`` copies it from
            ``model.init_args.network``); required when the DataModule is built in Python.
        batch_size: training images per batch (per device under DDP).
        eval_batch_size: validation/test/predict batch size (``batch_size`` when None).
        num_workers: loader processes; decoding and augmentation run there.
        pin_memory: page-locked batches for fast host-to-GPU copies (ignored without CUDA).
        persistent_workers: keep workers alive between epochs (no re-fork per validation).
        prefetch_factor: batches each worker prepares ahead.
        train_split, val_split, test_split: split names (image folder and annotation suffix).
            ``test`` uses ``val2017`` by default (test-dev has no public annotations).
        keep_empty_images: train on images without objects too (pure background); evaluation
            always uses every image of its split, as COCOeval does.
        contiguous_labels: labels ``1..K`` in category-id order (True), or the category ids
            themselves (False, for a 91-output model on COCO).
        min_box_size: boxes at most this many pixels wide or high are dropped as degenerate
            (boxes under 1 px, in the image or at ``image_size``, always are); the count is logged.
        photometric_p, zoom_out_p, zoom_out_max_scale, crop_p, crop_min_scale, hflip_p: the
            strength of the training augmentation (see ``detection_train_transform``).
        synthetic: the data is the project's synthetic COCO-layout set
            (``tasks.data.synthetic.make_coco``: 400 train / 50 val images of five shape classes
            under category ids 1, 3, 7, 12, 44; for demos and CPU runs). When ``root`` is
            ``tasks.data.synthetic.SYNTHETIC_COCO_ROOT`` (``data/synthetic/coco``, the synthetic
            config's) and holds no annotations yet, the set is written there first. Any other
            ``root`` must exist: a mistyped ``--data.root`` stops with "not found" rather than
            training on a new set.
        write_synthetic: write the synthetic set into ``root`` when it holds no annotations,
            whatever ``root`` is (tests, demos, a scratch folder).
        skip_unreadable: training leaves out missing images and replaces unreadable ones (corrupt,
            truncated, wrong size) by the next readable image instead of stopping; each is
            logged, and ``SkippedSamplesReport`` (added by ``tools/train.py``) logs the count
            per epoch as ``train/skipped_samples``. Evaluation splits never skip: their numbers
            must cover the whole split, so a bad validation image always stops the run.

    Training order and augmentation depend only on (``seed_everything``'s seed, epoch): a run
    resumed from an end-of-epoch checkpoint sees what the uninterrupted run saw, whatever
    ``num_workers`` is (see :mod:`tasks.data.sampling`). Under DDP evaluation images are split
    across ranks without the ``DistributedSampler``'s padding: no image is scored twice.
    After ``setup``, :meth:`dataset_info` describes the data to the task.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str = "val2017",
        keep_empty_images: bool = False,
        contiguous_labels: bool = True,
        min_box_size: float = 0.0,
        photometric_p: float = 0.5,
        zoom_out_p: float = 0.5,
        zoom_out_max_scale: float = 4.0,
        crop_p: float = 1.0,
        crop_min_scale: float = 0.3,
        hflip_p: float = 0.5,
        synthetic: bool = False,
        write_synthetic: bool = False,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        if image_size is None:
            raise ValueError(
                "COCODetectionDataModule needs image_size, the network's input side (tools/train.py "
                "copies it from model.init_args.network.init_args.image_size)"
            )
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.keep_empty_images = keep_empty_images
        self.contiguous_labels = contiguous_labels
        self.min_box_size = min_box_size
        self.synthetic = synthetic
        self.write_synthetic = write_synthetic
        self.skip_unreadable = skip_unreadable
        self.augmentation = {
            "photometric_p": photometric_p,
            "zoom_out_p": zoom_out_p,
            "zoom_out_max_scale": zoom_out_max_scale,
            "crop_p": crop_p,
            "crop_min_scale": crop_min_scale,
            "hflip_p": hflip_p,
        }
        self.datasets: dict[str, COCODetection] = {}
        self._annotations: dict[str, COCO] = {}
        self._categories: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ label space
    def annotations(self, split: str) -> COCO:
        """The loaded annotations of ``split`` ("train", "val" or "test"), read once."""
        name = self.splits[split]
        if name not in self._annotations:
            try:
                if not self.root.is_dir():
                    raise FileNotFoundError(f"{self.root}: COCO root directory not found")
                self._annotations[name] = load_coco_annotations(
                    self.root / "annotations" / f"instances_{name}.json"
                )
            except FileNotFoundError as error:
                if not self.synthetic:
                    raise
                raise FileNotFoundError(f"{error}; {synthetic_hint(SYNTHETIC_COCO_ROOT)}") from error
        return self._annotations[name]

    @property
    def categories(self) -> list[dict[str, Any]]:
        """The validation split's categories (``id``, ``name``), sorted by id: the label space."""
        if self._categories is None:
            coco = self.annotations("val")
            self._categories = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        return self._categories

    @property
    def label_to_category_id(self) -> dict[int, int]:
        """``{label: COCO category id}``: ``{1: 1, 2: 2, ..., 12: 13, ...}`` for COCO."""
        ids = [c["id"] for c in self.categories]
        if self.contiguous_labels:
            return {label: category_id for label, category_id in enumerate(ids, start=1)}
        return {category_id: category_id for category_id in ids}

    @property
    def category_id_to_label(self) -> dict[int, int]:
        """``{COCO category id: label}``, the inverse of :attr:`label_to_category_id`."""
        return {category_id: label for label, category_id in self.label_to_category_id.items()}

    @property
    def class_names(self) -> dict[int, str]:
        """``{label: category name}``."""
        names = {c["id"]: c["name"] for c in self.categories}
        return {label: names[category_id] for label, category_id in self.label_to_category_id.items()}

    @property
    def num_classes(self) -> int:
        """Logits a model needs, background included: ``max label + 1``."""
        return max(self.label_to_category_id) + 1

    def dataset_info(self) -> DatasetInfo:
        """The label space, the input size and the ground truth of the splits set up (``val``,
        ``test``) for COCO mAP: what the task reads instead of this DataModule's internals."""
        return DatasetInfo(
            num_classes=self.num_classes,
            class_names=self.class_names,
            label_to_category_id=self.label_to_category_id,
            image_size=self.image_size,
            coco_ground_truth={split: self.annotations(split) for split in ("val", "test") if split in self.datasets},
        )

    @property
    def val_coco(self) -> COCO:
        """Ground truth of the validation split (for COCOeval)."""
        return self.annotations("val")

    @property
    def test_coco(self) -> COCO:
        """Ground truth of the test split (for COCOeval)."""
        return self.annotations("test")

    # ------------------------------------------------------------------ datasets
    def _dataset(self, split: str, *, train: bool) -> COCODetection:
        coco = self.annotations(split)
        if not coco.dataset["annotations"]:
            source = getattr(coco, "source_path", self.root)
            if train:
                raise ValueError(f"{source}: 'annotations' is empty; training would see background only")
            # A split without objects can still be predicted on, but not scored.
            logger.warning(
                "%s: 'annotations' is empty: every detection on %s counts as a false positive and "
                "COCO AP will be -1", source, self.splits[split],
            )  # fmt: skip
        if split != "val":
            extra = set(coco.getCatIds()) - {c["id"] for c in self.categories}
            if extra:
                raise ValueError(
                    f"{self.root / 'annotations'}: split {self.splits[split]} has category ids "
                    f"{sorted(extra)} that {self.splits['val']} lacks; both must share one label space"
                )
        transform = (
            detection_train_transform(self.image_size, **self.augmentation)
            if train
            else detection_eval_transform(self.image_size)
        )
        return COCODetection(
            self.root / self.splits[split],
            coco,
            transform,
            category_id_to_label=self.category_id_to_label,
            keep_empty_images=self.keep_empty_images if train else True,
            min_box_size=self.min_box_size,
            input_size=self.image_size,
            skip_unreadable=self.skip_unreadable and train,
            seeds=SampleSeeds(global_seed()) if train else None,
        )

    def prepare_data(self) -> None:
        """Write the synthetic set when allowed to (see ``synthetic``) and ``root`` has no
        annotations (one process)."""
        allowed = may_write_synthetic(
            self.root, SYNTHETIC_COCO_ROOT, synthetic=self.synthetic, write=self.write_synthetic
        )
        if not allowed:
            return
        names = [self.splits["train"], self.splits["val"], self.splits["test"]]
        if not all((self.root / "annotations" / f"instances_{name}.json").is_file() for name in names):
            from tasks.data.synthetic import make_coco

            make_coco(self.root)

    def setup(self, stage: str | None = None) -> None:
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("val",)}
        wanted = stages[stage] if stage is not None else ("train", "val", "test")
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split, train=split == "train")

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return self.loader(self.datasets[split], train=train, collate_fn=collate_detection)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)
