"""Albumentations pipelines and batching for semantic segmentation (image + label map).

Training follows TF DeepLab's ``input_preprocess.py`` for PASCAL VOC: random scale in
[0.5, 2.0] (steps of 0.25), pad to the crop with the mean pixel (image) and the ignore label
(mask), random 513x513 crop, horizontal flip, then normalisation. Masks are resized with
nearest-neighbour interpolation only, so class indices never blend. Evaluation only normalises:
images keep their full resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from torch import Tensor

# torchvision's ImageNet statistics (RGB, 0-1): the backbone's ImageNet weights expect them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def scale_choices(scale_range: Sequence[float], scale_step: float | None) -> list[float] | None:
    """The discrete scales TF DeepLab samples (``min, min + step, .., max``), or None if continuous."""
    low, high = float(scale_range[0]), float(scale_range[1])
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be 0 < min <= max, got {list(scale_range)}")
    if low == high:
        return [low]
    if scale_step is None:
        return None
    if scale_step <= 0:
        raise ValueError(f"scale_step must be positive or None, got {scale_step}")
    count = int(np.floor((high - low) / scale_step + 1e-6)) + 1
    return [round(low + index * scale_step, 6) for index in range(count)]


def train_transforms(
    crop_size: int,
    *,
    scale_range: Sequence[float] = (0.5, 2.0),
    scale_step: float | None = 0.25,
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> A.Compose:
    """The training pipeline: ``(image uint8 HxWx3 RGB, mask uint8 HxW)`` -> ``(Tensor[3, c, c], Tensor[c, c])``.

    Args:
        crop_size: side of the square training crop (513 in the paper).
        scale_range: min and max random scale of the whole image before cropping.
        scale_step: sample scales on this grid (TF DeepLab: 0.25), or continuously when None.
        hflip: random left-right flip with probability 0.5.
        mean, std: normalisation, RGB in 0-1.
        ignore_index: the mask value of padding (never counted by the loss).
    """
    scales = scale_choices(scale_range, scale_step)
    if scales is None:
        low, high = float(scale_range[0]), float(scale_range[1])
        scale: A.BasicTransform | A.BaseCompose = A.RandomScale(
            scale_limit=(low - 1.0, high - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        )
    else:
        # RandomScale's limits are offsets from 1; equal limits give one fixed scale per choice.
        scale = A.OneOf(
            [
                A.RandomScale(
                    scale_limit=(s - 1.0, s - 1.0),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    p=1.0,
                )
                for s in scales
            ],
            p=1.0,
        )
    mean_pixel = tuple(float(m * 255.0) for m in mean)  # normalises to exactly 0
    steps: list[Any] = [
        scale,
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            border_mode=cv2.BORDER_CONSTANT,
            fill=mean_pixel,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()]
    return A.Compose(steps)


def eval_transforms(
    *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> A.Compose:
    """The evaluation pipeline: normalisation only, full resolution, no distortion."""
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std)), ToTensorV2()])


def apply_transforms(transform: A.Compose, image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """Run ``transform`` on an RGB uint8 image and its label map; return ``(float image, int64 mask)``."""
    out = transform(image=image, mask=mask)
    return out["image"].float(), torch.as_tensor(out["mask"]).long()


def pad_collate(samples: Sequence[Mapping[str, Any]], *, ignore_index: int = 255) -> dict[str, Any]:
    """Batch samples of different sizes by padding at the bottom/right to the largest.

    Images are padded with 0 (the mean pixel once normalised) and masks with ``ignore_index``,
    so padding changes no metric; ``image_sizes`` lets predictions be cropped back.

    Args:
        samples: dicts with ``image`` (Tensor[3, H, W] float), ``mask`` (Tensor[H, W] int64) and
            ``image_id`` (str).

    Returns:
        ``{"images": Tensor[N, 3, Hmax, Wmax], "masks": Tensor[N, Hmax, Wmax] int64,
        "image_sizes": list[(H, W)], "image_ids": list[str]}``.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    height = max(int(sample["image"].shape[-2]) for sample in samples)
    width = max(int(sample["image"].shape[-1]) for sample in samples)
    images, masks = [], []
    for sample in samples:
        image, mask = sample["image"], sample["mask"]
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
        images.append(F.pad(image, pad, value=0.0))
        masks.append(F.pad(mask, pad, value=ignore_index))
    return {
        "images": torch.stack(images),
        "masks": torch.stack(masks),
        "image_sizes": [tuple(int(v) for v in sample["image"].shape[-2:]) for sample in samples],
        "image_ids": [str(sample.get("image_id", "")) for sample in samples],
    }
