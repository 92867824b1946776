"""Albumentations pipelines and batching for semantic segmentation (image + label map).

Training follows TF DeepLab's ``input_preprocess.py`` for PASCAL VOC: random scale in
[0.5, 2.0] (steps of 0.25), pad to the crop with the mean pixel (image) and the ignore label
(mask), random 513x513 crop, horizontal flip. Masks are resized with nearest-neighbour
interpolation only, so class indices never blend. Evaluation keeps the full resolution.
Images stay ``uint8`` RGB (:mod:`tasks.data.contract`): the network normalises them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch import Tensor

from tasks.data.constants import VOC_IGNORE_INDEX
from tasks.data.detection_transforms import MEAN_PIXEL


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
    hflip_p: float = 0.5,
    ignore_index: int = VOC_IGNORE_INDEX,
) -> A.Compose:
    """The training pipeline: ``(image uint8 HxWx3 RGB, mask uint8 HxW)`` -> ``(uint8 Tensor[3, c, c], Tensor[c, c])``.

    Args:
        crop_size: side of the square training crop (513 in the paper).
        scale_range: min and max random scale of the whole image before cropping.
        scale_step: sample scales on this grid (TF DeepLab: 0.25), or continuously when None.
        hflip_p: probability of a left-right flip (0.5 in TF DeepLab; 0 switches flips off).
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
    steps: list[Any] = [
        scale,
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            border_mode=cv2.BORDER_CONSTANT,
            fill=MEAN_PIXEL,  # normalises to about 0 in the network
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if hflip_p > 0:
        steps.append(A.HorizontalFlip(p=hflip_p))
    steps.append(ToTensorV2())
    return A.Compose(steps)


def eval_transforms() -> A.Compose:
    """The evaluation pipeline: the image as it is (full resolution, no distortion), as tensors."""
    return A.Compose([ToTensorV2()])


def apply_transforms(transform: A.Compose, image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """Run ``transform`` on an RGB uint8 image and its label map; return ``(uint8 image, int64 mask)``."""
    out = transform(image=image, mask=mask)
    image_t = torch.as_tensor(out["image"])
    if image_t.dtype != torch.uint8:
        raise TypeError(f"the transform returned a {image_t.dtype} image; batches carry uint8 pixels (0..255)")
    return image_t, torch.as_tensor(out["mask"]).long()


def pad_collate(samples: Sequence[Mapping[str, Any]], *, ignore_index: int = VOC_IGNORE_INDEX) -> dict[str, Any]:
    """Batch samples of different sizes by padding at the bottom/right to the largest.

    Images are padded with :data:`~tasks.data.detection_transforms.MEAN_PIXEL` (about zero once
    the network has normalised it) and masks with ``ignore_index``, so padding changes no metric;
    ``image_sizes`` lets predictions be cropped back.

    Args:
        samples: dicts with ``image`` (uint8 Tensor[3, H, W]), ``mask`` (Tensor[H, W] int64) and
            ``image_id`` (str).

    Returns:
        ``{"images": uint8 Tensor[N, 3, Hmax, Wmax], "masks": Tensor[N, Hmax, Wmax] int64,
        "image_sizes": Int64Tensor[N, 2] (height, width) before padding, "image_ids": list[str]}``.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    sizes = torch.tensor([tuple(sample["image"].shape[-2:]) for sample in samples], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    first = samples[0]["image"]
    images = torch.empty((len(samples), 3, height, width), dtype=first.dtype)
    images[:] = torch.tensor(MEAN_PIXEL, dtype=first.dtype).view(3, 1, 1)
    masks = torch.full((len(samples), height, width), ignore_index, dtype=torch.int64)
    for index, sample in enumerate(samples):
        h, w = sample["image"].shape[-2:]
        images[index, :, :h, :w] = sample["image"]
        masks[index, :h, :w] = sample["mask"]
    return {
        "images": images,
        "masks": masks,
        "image_sizes": sizes,
        "image_ids": [str(sample.get("image_id", "")) for sample in samples],
    }
