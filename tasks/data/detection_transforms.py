"""SSD-style detection augmentation on albumentations.

Training offers SSD's augmentation (Liu et al., 2016, section 2.2 "Data augmentation"; torchvision's
"ssd" policy in references/detection/presets.py): photometric distortion, zoom out (SSD's "expand"
onto a mean-filled canvas up to 4x larger, for small objects), a random crop whose IoU with some
object is at least one of 0.1 ... 0.9 (or the whole image), horizontal flip, then a resize to the
fixed network size. torchvision's "ssdlite" policy (with which its SSDLite320-MobileNetV3 reached
21.3 mAP) and the TF ssdlite_mobilenet_v2_coco config keep only the crop and the flip: set
``photometric_p`` and ``zoom_out_p`` to 0, as configs/ssdlite_mobilenetv2_coco.yaml does.
Validation only resizes. Boxes are Pascal VOC ``[x1, y1, x2, y2]`` in pixels in and out;
albumentations keeps them consistent with the image through every step.

The pipelines return ``uint8`` images, and batches keep them so (:mod:`tasks.data.contract`): the
networks normalise their 0..255 input themselves (ImageNet mean and std, the statistics of
torchvision's MobileNetV2 weights), and workers and pinned memory move a quarter of the bytes
of float images. Canvas and padding take :data:`MEAN_PIXEL`, which normalises to about zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.core.bbox_utils import denormalize_bboxes

from backbones import IMAGENET_MEAN

# ImageNet's mean as a uint8 RGB pixel, (124, 116, 104): what SSD's zoom-out canvas and the
# segmentation padding are filled with, so that they normalise to (about) zero in the network.
MEAN_PIXEL: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)
# SSD's sampler options: None = keep the whole image, otherwise the minimum IoU of the patch with
# some object (0 = any patch that keeps an object centre).
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


class ZoomOut(A.DualTransform):
    """SSD's "expand": put the image at a random place of a canvas up to ``max_scale`` times larger.

    The canvas is filled with ``fill`` (the dataset mean, so the padding normalises to zero).
    Objects become smaller relative to the image, which SSD needs for small-object recall.

    Args:
        max_scale: the canvas side is ``uniform(1, max_scale)`` times the image side.
        fill: RGB value of the canvas.
        p: probability of applying.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        max_scale: float
        fill: tuple[float, ...]

    def __init__(
        self,
        max_scale: float = 4.0,
        fill: Sequence[float] = MEAN_PIXEL,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        if max_scale < 1:
            raise ValueError(f"max_scale must be >= 1, got {max_scale}")
        self.max_scale = max_scale
        self.fill = tuple(fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(1.0, self.max_scale)
        out_h, out_w = int(height * ratio), int(width * ratio)
        top = self.py_random.randint(0, out_h - height)
        left = self.py_random.randint(0, out_w - width)
        return {"top": top, "left": left, "out_shape": (out_h, out_w)}

    def apply(
        self, img: np.ndarray, top: int, left: int, out_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        canvas = np.empty((*out_shape, *img.shape[2:]), dtype=img.dtype)
        canvas[...] = np.asarray(
            self.fill[: img.shape[2]] if img.ndim == 3 else self.fill[0], dtype=img.dtype
        )
        canvas[top : top + img.shape[0], left : left + img.shape[1]] = img
        return canvas

    def apply_to_mask(
        self, mask: np.ndarray, top: int, left: int, out_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        canvas = np.zeros((*out_shape, *mask.shape[2:]), dtype=mask.dtype)
        canvas[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
        return canvas

    def apply_to_bboxes(
        self, bboxes: np.ndarray, top: int, left: int, out_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        # Boxes arrive normalised to the input; re-normalise them to the canvas.
        height, width = params["shape"][:2]
        out_h, out_w = out_shape
        moved = bboxes.copy()
        moved[:, [0, 2]] = (bboxes[:, [0, 2]] * width + left) / out_w
        moved[:, [1, 3]] = (bboxes[:, [1, 3]] * height + top) / out_h
        return moved

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_scale", "fill")


class MinIoURandomCrop(A.DualTransform):
    """SSD's patch sampler: a random crop whose IoU with some object reaches a random minimum.

    Each trial picks a minimum IoU from ``min_ious`` (None keeps the whole image), a patch whose
    sides are ``[min_scale, 1]`` of the image's with aspect ratio in ``[min_aspect_ratio,
    max_aspect_ratio]``, and accepts it when it contains at least one object centre and its IoU
    with such an object is at least the minimum. Objects whose centre falls outside the patch are
    dropped, the others clipped to it (SSD section 2.2). After ``max_trials`` failures the image
    is kept whole.

    Args:
        min_ious: the options for the minimum IoU.
        min_scale: smallest patch side as a fraction of the image side.
        min_aspect_ratio, max_aspect_ratio: bounds of the patch's width / height.
        max_trials: patches tried before giving up.
        p: probability of applying.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        min_ious: tuple[float | None, ...]
        min_scale: float
        min_aspect_ratio: float
        max_aspect_ratio: float
        max_trials: int

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        max_trials: int = 50,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not min_ious:
            raise ValueError("min_ious needs at least one option")
        self.min_ious = tuple(min_ious)
        self.min_scale = min_scale
        self.min_aspect_ratio = min_aspect_ratio
        self.max_aspect_ratio = max_aspect_ratio
        self.max_trials = max_trials

    @property
    def targets_as_params(self) -> list[str]:
        return ["bboxes"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        whole = {"crop_coords": (0, 0, width, height)}
        bboxes = data.get("bboxes")
        boxes = (
            denormalize_bboxes(np.asarray(bboxes, dtype=np.float64), (height, width))[:, :4]
            if bboxes is not None and len(bboxes)
            else np.zeros((0, 4))
        )
        for _ in range(self.max_trials):
            min_iou = self.py_random.choice(self.min_ious)
            if min_iou is None:
                return whole
            crop_w = int(width * self.py_random.uniform(self.min_scale, 1.0))
            crop_h = int(height * self.py_random.uniform(self.min_scale, 1.0))
            if (
                crop_w < 1
                or crop_h < 1
                or not self.min_aspect_ratio <= crop_w / crop_h <= self.max_aspect_ratio
            ):
                continue
            left = self.py_random.randint(0, width - crop_w)
            top = self.py_random.randint(0, height - crop_h)
            crop = np.array([left, top, left + crop_w, top + crop_h], dtype=np.float64)
            if len(boxes) == 0:
                return {"crop_coords": tuple(int(v) for v in crop)}
            inside = _centres_inside(boxes, crop)
            if not inside.any():
                continue
            if _iou_with(crop, boxes[inside]).max() >= min_iou:
                return {"crop_coords": tuple(int(v) for v in crop)}
        return whole

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return fcrops.crop(img, *crop_coords)

    def apply_to_mask(
        self, mask: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        return fcrops.crop(mask, *crop_coords)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        if not len(bboxes):
            return bboxes
        shape = params["shape"][:2]
        pixels = denormalize_bboxes(bboxes.astype(np.float64), shape)[:, :4]
        kept = bboxes[_centres_inside(pixels, np.asarray(crop_coords, dtype=np.float64))]
        return fcrops.crop_bboxes_by_coords(kept, crop_coords, shape)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "min_aspect_ratio", "max_aspect_ratio", "max_trials")


def _centres_inside(boxes: np.ndarray, crop: np.ndarray) -> np.ndarray:
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return (cx > crop[0]) & (cx < crop[2]) & (cy > crop[1]) & (cy < crop[3])


def _iou_with(crop: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    top_left = np.maximum(boxes[:, :2], crop[:2])
    bottom_right = np.minimum(boxes[:, 2:], crop[2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
    area_boxes = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    area_crop = (crop[2:] - crop[:2]).prod()
    return inter / np.maximum(area_boxes + area_crop - inter, 1e-12)


def _bbox_params() -> A.BboxParams:
    # Crowd regions travel with the objects (flag column) so one pipeline moves both; boxes that
    # leave the image or collapse below a pixel are dropped. Datasets drop (and count) the boxes
    # that would be under a pixel at the network input before they get here, so that only
    # augmentation ever drops a box in this filter (COCODetection's "degenerate boxes").
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels", "is_crowd"],
        clip=True,
        filter_invalid_bboxes=True,
        min_width=1.0,
        min_height=1.0,
    )


def detection_train_transform(
    image_size: int,
    *,
    photometric_p: float = 0.5,
    zoom_out_p: float = 0.5,
    zoom_out_max_scale: float = 4.0,
    crop_p: float = 1.0,
    crop_min_scale: float = 0.3,
    hflip_p: float = 0.5,
    fill: Sequence[float] = MEAN_PIXEL,
) -> A.Compose:
    """SSD training augmentation, then a resize to ``image_size`` x ``image_size``.

    Call with ``image=uint8 HWC, bboxes=[G, 4] pascal_voc, labels=[G], is_crowd=[G]``. Set a
    probability to 0 to switch a step off: ``photometric_p=0, zoom_out_p=0`` is torchvision's
    "ssdlite" policy (IoU crop + flip), the defaults its "ssd" policy.
    """
    return A.Compose(
        [
            A.ColorJitter(  # SSD's photometric distortions (torchvision's RandomPhotometricDistort ranges)
                brightness=(0.875, 1.125),
                contrast=(0.5, 1.5),
                saturation=(0.5, 1.5),
                hue=(-0.05, 0.05),
                p=photometric_p,
            ),
            ZoomOut(max_scale=zoom_out_max_scale, fill=fill, p=zoom_out_p),
            MinIoURandomCrop(min_scale=crop_min_scale, p=crop_p),
            A.HorizontalFlip(p=hflip_p),
            A.Resize(image_size, image_size),
        ],
        bbox_params=_bbox_params(),
    )


def detection_eval_transform(image_size: int) -> A.Compose:
    """Validation: resize to ``image_size`` x ``image_size`` only (SSD's fixed-shape resizer)."""
    return A.Compose([A.Resize(image_size, image_size)], bbox_params=_bbox_params())

