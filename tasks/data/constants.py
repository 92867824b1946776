"""PASCAL VOC's class names, void label and colour map: defined once, here.

Imported by the VOC DataModule, the synthetic-data generator (whose VOC-format masks use VOC's
label space and palette) and the drawing helpers. Kept free of torch, so that writing the
synthetic data does not load it. ImageNet's mean and std live with the backbones
(:data:`backbones.IMAGENET_MEAN`), whose weights they belong to.
"""

from __future__ import annotations

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

VOC_IGNORE_INDEX = 255  # VOC's "void": object borders and difficult regions, never scored


def _voc_palette() -> list[int]:
    """PASCAL VOC's colour map: bits of the class index interleaved into R, G, B (from VOCdevkit)."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


# 768 ints, PIL's ``putpalette`` format: index 1 = (128, 0, 0), 255 = (224, 224, 192).
VOC_PALETTE: list[int] = _voc_palette()
