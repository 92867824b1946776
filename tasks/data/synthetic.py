"""Write small synthetic datasets in the real COCO 2017 and PASCAL VOC 2012 layouts.

No real dataset can be downloaded here, so the tests, the demo and the benchmarks use these. Five
shape classes; size, aspect, rotation, shading and background vary at random. In the VOC set colour
is random too, so a segmenter has to learn shape on busy backgrounds; the COCO set is calmer and
gives each class a typical hue, so that SSDLite learns it from scratch in a few hundred CPU steps
(see ``_SceneStyle``). Objects come in COCO's three size ranges, may be cut by the image border and
partly occlude each other; a few images hold no objects and a few a crowd region.

The command line is ``tools/make_synthetic.py``; data modules call :func:`make_coco` and
:func:`make_voc` directly when asked for the built-in data.

Every annotation is what is drawn: each shape is rasterised once with pycocotools (the rasteriser that
COCO's own tools use to decode polygons) and that mask is what gets painted, so a decoded polygon or RLE
equals the visible pixels of its object (up to JPEG and a slight blur).
"""

from __future__ import annotations

import colorsys
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2  # installed with albumentations; only used to trace visible regions into polygons
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

# COCO category ids are not contiguous (COCO 2017 uses 1..90 for 80 classes); these gaps make code
# that confuses a category id with a label index fail loudly.
COCO_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 7, "cross": 12, "ring": 44}

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# Shape -> index in VOC's 21-class label space (spread out, so no code can assume labels 1..5).
VOC_SHAPE_CLASSES: dict[str, int] = {"circle": 1, "square": 5, "triangle": 9, "cross": 15, "ring": 20}
VOC_IGNORE_INDEX = 255  # VOC marks object borders "void" with 255; mIoU ignores those pixels


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


VOC_PALETTE: list[int] = _voc_palette()  # 768 ints; index 1 = (128, 0, 0), 255 = (224, 224, 192)

# COCO's area ranges (COCOeval.Params.areaRng): small < 32^2 <= medium < 96^2 <= large.
_SMALL, _LARGE = 32**2, 96**2
# small, medium, large. COCO has 41/34/24%, but SSDLite's smallest default boxes are 0.1 of the input
# (32 px at 320), so small objects are few here: the set is meant to be learnable in a few hundred
# steps from scratch on a CPU (issue #3), not to reproduce COCO's AP_small.
_COCO_SIZE_PROBS = (0.05, 0.45, 0.5)
_COCO_SMALLEST = 20.0**2  # below ~20 px even COCO-trained SSDLite finds almost nothing
_COCO_MAX_OBJECTS = 3
_COCO_EMPTY_EVERY, _COCO_EMPTY_AT = 20, 7  # every 20th image (5%) has no objects at all
_COCO_CROWD_EVERY, _COCO_CROWD_AT = 16, 3  # every 16th image has one crowd region
_MIN_IN_IMAGE = 0.75  # the image border cuts off at most 25% of a shape
_MIN_CONTRAST = 90.0  # RGB distance of an object's colour from what lies under it
_HUE_JITTER = 15.0  # degrees around a class's hue
COCO_CLASS_HUES: dict[str, float] = {"circle": 0.0, "square": 72.0, "triangle": 144.0, "cross": 216.0, "ring": 288.0}


@dataclass(frozen=True)
class _SceneStyle:
    """How busy the scenes of a dataset are."""

    textures: bool  # 3 in 4 backgrounds get stripes, checks or clutter strokes
    blotch_std: float  # strength of the low-frequency colour blotches of every background
    min_visible: float  # occlusion keeps at least this share of every earlier object visible
    hues: dict[str, float] | None  # a typical hue per class, or None: any colour, class is shape alone


# The VOC set makes a segmenter learn shape under any colour on busy backgrounds (it has thousands
# of steps). The COCO set is calmer so that SSDLite learns it from scratch in the 400 CPU steps of
# issue #3 (on the VOC style it reached AP 0.2 there): quieter backgrounds, little occlusion, and
# each class has a typical hue (as real categories have typical looks) besides its shape.
_VOC_STYLE = _SceneStyle(textures=True, blotch_std=30.0, min_visible=0.6, hues=None)
_COCO_STYLE = _SceneStyle(textures=False, blotch_std=12.0, min_visible=0.9, hues=COCO_CLASS_HUES)
_CC0_URL = "https://creativecommons.org/publicdomain/zero/1.0/"
_SPLIT_CODES = {"coco/train": 0, "coco/val": 1, "voc/train": 2, "voc/val": 3}


# ----------------------------------------------------------------------------------------- shapes
def _circle(n: int = 48) -> np.ndarray:
    """(n, 2) regular n-gon on the unit circle; 48 sides stay within 0.2 px of a circle of radius 100."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _cross(arm: float = 0.33) -> np.ndarray:
    """(12, 2) plus sign reaching +-1 with arms ``2 * arm`` wide."""
    a = arm
    corners = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a)]
    corners += [(a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    return np.array(corners, dtype=np.float64)


def _ring(inner: float = 0.55) -> np.ndarray:
    """Annulus as ONE polygon: outer loop, a zero-width slit, the inner loop reversed, back out.

    COCO polygons cannot hold holes, but pycocotools fills even-odd, so the slit's two coincident
    edges cancel and the hole stays empty.
    """
    outer = _circle()
    inner_loop = inner * outer[::-1]
    return np.concatenate([outer, outer[:1], inner_loop[-1:], inner_loop, outer[:1]])[:-1]


def _shoelace(points: np.ndarray) -> float:
    """Area enclosed by a closed (N, 2) polygon; a slit ring gives outer minus inner area."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


_UNIT_SHAPES: dict[str, np.ndarray] = {
    "circle": _circle(),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": _circle(3),
    "cross": _cross(),
    "ring": _ring(),
}
_UNIT_AREAS: dict[str, float] = {name: _shoelace(points) for name, points in _UNIT_SHAPES.items()}


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A sample between ``low`` and ``high``, uniform in log scale (as object areas are spread)."""
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _shape_polygon(rng: np.random.Generator, shape: str, cx: float, cy: float, area: float) -> np.ndarray:
    """Place a unit shape: scale to ``area`` with a mild random aspect, rotate, move to (cx, cy).

    Returns:
        (N, 2) float array of x, y vertices, rounded to 2 decimals as in COCO's JSON, so the polygon
        that is drawn is exactly the polygon that is written.
    """
    aspect = np.exp(rng.uniform(-0.15, 0.15))
    scale = np.sqrt(area / _UNIT_AREAS[shape])
    points = _UNIT_SHAPES[shape] * scale * np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    angle = rng.uniform(0.0, 2.0 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.round(points @ rotation.T + np.array([cx, cy]), 2)


def _rasterize(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of the union of ``polygons``, decoded exactly as pycocotools decodes COCO."""
    rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], height, width)
    with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 DeprecationWarning (copy=False)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Trace a visible region (occluded or cut by the border) into COCO polygons.

    Tracing runs at 2x resolution so that vertices sit within a quarter pixel of the pixel edges and
    pycocotools decodes the polygons back to (nearly) the same pixels. Holes, e.g. where a small shape
    lies on a big one, join their outer loop through a zero-width slit (see ``_ring``).
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    x0, y0 = int(xs.min()), int(ys.min())
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1].astype(np.uint8)
    up = np.pad(crop.repeat(2, axis=0).repeat(2, axis=1), 1)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    loops = [cv2.approxPolyDP(c, 0.6, True).reshape(-1, 2).astype(np.float64) for c in contours]
    polygons = []
    for index, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue
        outer = loops[index]
        while child != -1:
            hole = loops[child]
            if len(outer) >= 3 and len(hole) >= 3:
                dist = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
                i, j = np.unravel_index(int(dist.argmin()), dist.shape)
                outer = np.concatenate([outer[: i + 1], hole[j:], hole[: j + 1], outer[i:]])
            child = hierarchy[0][child][0]
        if len(outer) >= 3:
            points = (outer - 1 + 0.5) / 2 + np.array([x0, y0])  # undo the pad and the 2x upsampling
            polygons.append(points.ravel().tolist())
    return polygons


# ------------------------------------------------------------------------------------------ scenes
@dataclass
class _Instance:
    """One drawn object (or crowd region): its class, where it is and what of it is still visible."""

    shape: str
    polygon: np.ndarray | None  # (N, 2) outline as drawn; None for a crowd region
    full: np.ndarray  # (H, W) bool: all of the shape inside the image
    visible: np.ndarray  # (H, W) bool: the part that later objects leave uncovered
    colour: np.ndarray  # (3,) base RGB
    crowd: bool = False


def _background(rng: np.random.Generator, height: int, width: int, style: _SceneStyle) -> np.ndarray:
    """(H, W, 3) float32 background: a gradient, low-frequency blotches and, often, texture or clutter."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image = c0 + (c1 - c0) * ramp[..., None]

    grid = rng.normal(128, style.blotch_std, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
    blotches = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    image += np.asarray(blotches.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) - 128

    kind = rng.integers(0, 4) if style.textures else 0
    if kind == 1:  # stripes
        period, phase = rng.uniform(5, 30), rng.uniform(-np.pi, np.pi)
        a = rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
        image += (rng.uniform(6, 18) * wave)[..., None]
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(6, 24))
        checker = ((xx // cell + yy // cell) % 2) * 2 - 1
        image += (rng.uniform(5, 15) * checker)[..., None]
    elif kind == 3:  # low-contrast clutter: strokes that are not any of the shapes
        clutter = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(clutter)
        for _ in range(int(rng.integers(3, 10))):
            points = [tuple(p) for p in rng.uniform(0, [width, height], size=(int(rng.integers(2, 4)), 2))]
            draw.line(points, fill=int(rng.integers(60, 255)), width=int(rng.integers(1, 4)))
        sign = rng.choice([-1.0, 1.0])
        image += (sign * rng.uniform(20, 40) * np.asarray(clutter, dtype=np.float32) / 255)[..., None]
    return image


def _pick_colour(
    rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, under: list[np.ndarray], hue: float | None = None
) -> np.ndarray:
    """A random RGB colour that stands out from the background and the objects it covers.

    With ``hue`` (degrees) the colour keeps that hue, give or take ``_HUE_JITTER``, and varies in
    saturation and brightness; without, any colour. Contrast only keeps shapes visible.
    """
    covered = [canvas[mask].mean(axis=0), *under]
    best, best_gap = None, -1.0
    for _ in range(24):
        if hue is None:
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
        else:
            h = ((hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360) / 360
            colour = 255 * np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)), np.float32)
        gap = min(float(np.linalg.norm(colour - c)) for c in covered)
        if gap >= _MIN_CONTRAST:
            return colour
        if gap > best_gap:
            best, best_gap = colour, gap
    return best


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    """Fill ``mask`` on ``canvas`` with ``colour`` plus a soft linear shading (real objects are lit)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return
    angle = rng.uniform(0, 2 * np.pi)
    proj = (xs - xs.mean()) * np.cos(angle) + (ys - ys.mean()) * np.sin(angle)
    proj = proj / max(float(np.abs(proj).max()), 1.0)
    canvas[ys, xs] = colour + (rng.uniform(0, 30) * proj)[:, None]


def _place_object(
    rng: np.random.Generator,
    canvas: np.ndarray,
    instances: list[_Instance],
    shape: str,
    area: float,
    style: _SceneStyle,
) -> _Instance | None:
    """Try random positions until the shape is mostly inside and occludes no one too much; then draw it."""
    height, width = canvas.shape[:2]
    for _ in range(30):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        polygon = _shape_polygon(rng, shape, cx, cy, area)
        full = _rasterize([polygon], height, width)
        if full.sum() < _MIN_IN_IMAGE * _shoelace(polygon):
            continue
        if any((prev.visible & ~full).sum() < style.min_visible * prev.full.sum() for prev in instances):
            continue
        under = [prev.colour for prev in instances if (prev.visible & full).any()]
        colour = _pick_colour(rng, canvas, full, under, style.hues[shape] if style.hues else None)
        _paint(rng, canvas, full, colour)
        return _Instance(shape, polygon, full, full.copy(), colour)
    return None


def _place_crowd(rng: np.random.Generator, canvas: np.ndarray, shape: str, hue: float | None = None) -> _Instance:
    """A cluster of many tiny same-class shapes, annotated as ONE crowd region (iscrowd=1) as in COCO."""
    height, width = canvas.shape[:2]
    spread = rng.uniform(12, 30)
    cx = rng.uniform(spread, width - spread)
    cy = rng.uniform(spread, height - spread)
    count = int(rng.integers(10, 25))
    centres = rng.normal([cx, cy], spread / 2, size=(count, 2))
    polygons = [_shape_polygon(rng, shape, x, y, _log_uniform(rng, 20, 70)) for x, y in centres]
    full = _rasterize(polygons, height, width)
    colour = _pick_colour(rng, canvas, full, [], hue)
    _paint(rng, canvas, full, colour)
    return _Instance(shape, None, full, full.copy(), colour, crowd=True)


def _draw_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    areas: list[float],
    crowd: bool,
    style: _SceneStyle,
) -> tuple[Image.Image, list[_Instance]]:
    """Draw a background, an optional crowd region and one object per area, later ones on top.

    Returns:
        The RGB image and the placed instances in drawing order, with ``visible`` already cut by
        every later object.
    """
    canvas = _background(rng, height, width, style)
    instances: list[_Instance] = []
    if crowd:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        instances.append(_place_crowd(rng, canvas, shape, style.hues[shape] if style.hues else None))
    for area in areas:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        placed = _place_object(rng, canvas, instances, shape, area, style)
        if placed is not None:
            for prev in instances:
                prev.visible &= ~placed.full
            instances.append(placed)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 7)  # sensor noise
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.8))))
    return image, instances


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per image, so an image does not change when the number of images does."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _check_sizes(min_size: int, max_size: int) -> None:
    """Reject image side ranges that are empty or too small for a large (> 96^2 px) object."""
    if not 64 <= min_size <= max_size:
        raise ValueError(f"image sides must satisfy 64 <= min_size <= max_size, got {min_size}..{max_size}")


# -------------------------------------------------------------------------------------------- COCO
def _coco_areas(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """1 to ``_COCO_MAX_OBJECTS`` target areas drawn from COCO's small / medium / large ranges."""
    largest = max(1.5 * _LARGE, 0.3 * height * width)
    ranges = ((_COCO_SMALLEST, _SMALL), (_SMALL, _LARGE), (1.05 * _LARGE, largest))
    bins = rng.choice(3, size=int(rng.integers(1, _COCO_MAX_OBJECTS + 1)), p=_COCO_SIZE_PROBS)
    return [_log_uniform(rng, *ranges[b]) for b in bins]


def _coco_annotation(instance: _Instance, height: int, width: int) -> dict | None:
    """COCO annotation of the visible part of ``instance``: polygons, or RLE for a crowd region.

    ``bbox`` and ``area`` are computed from the written segmentation with pycocotools, the way the
    COCO annotations were made, so they agree with what ``COCO.annToMask`` returns.
    """
    if instance.crowd:
        rle = mask_utils.encode(np.asfortranarray(instance.visible.astype(np.uint8)))
        segmentation: list | dict = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    else:
        polygon = instance.polygon
        inside = polygon.min() >= 0 and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height
        if inside and np.array_equal(instance.visible, instance.full):
            segmentation = [polygon.ravel().tolist()]  # untouched: the drawn outline itself
        else:
            segmentation = _mask_to_polygons(instance.visible)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    area = float(mask_utils.area(rle))
    if area < 1:
        return None
    return {
        "segmentation": segmentation,
        "area": area,
        "iscrowd": int(instance.crowd),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "category_id": COCO_CATEGORY_IDS[instance.shape],
    }


def _write_coco_split(
    root: Path,
    split: str,
    *,
    count: int,
    first_image_id: int,
    first_ann_id: int,
    seed: int,
    sizes: tuple[int, int],
) -> dict:
    """Draw ``count`` images into ``root/{split}2017`` and return the split's COCO dictionary."""
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for index in range(count):
        rng = _image_rng(seed, f"coco/{split}", index)
        image_id = first_image_id + index
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        empty = index % _COCO_EMPTY_EVERY == _COCO_EMPTY_AT
        crowd = not empty and index % _COCO_CROWD_EVERY == _COCO_CROWD_AT
        areas = [] if empty else _coco_areas(rng, height, width)
        image, instances = _draw_scene(rng, height, width, areas, crowd, _COCO_STYLE)
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, quality=int(rng.integers(85, 96)))
        images.append(
            {"id": image_id, "file_name": file_name, "width": width, "height": height,
             "license": 1, "date_captured": "2024-01-01 00:00:00"}
        )  # fmt: skip
        for instance in instances:
            annotation = _coco_annotation(instance, height, width)
            if annotation is not None:
                annotations.append({"id": ann_id, "image_id": image_id, **annotation})
                ann_id += 1
    return {
        "info": {
            "description": f"mobiledense synthetic shapes, seed {seed} (tools/make_synthetic.py)",
            "url": "", "version": "1.0", "year": 2024, "contributor": "mobiledense",
            "date_created": "2024/01/01",
        },
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": _CC0_URL}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": COCO_CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES],
    }  # fmt: skip


def make_coco(
    root: Path,
    *,
    num_train: int = 400,
    num_val: int = 50,
    seed: int = 0,
    min_size: int = 240,
    max_size: int = 400,
) -> Path:
    """Write a COCO 2017-style detection / instance segmentation dataset of shapes.

    Layout: ``root/{train2017,val2017}/<image id, 12 digits>.jpg`` and
    ``root/annotations/instances_{train,val}2017.json``. Image ids are unique across both splits
    (train ``1..num_train``, val after that), and so are annotation ids. Categories use the
    non-contiguous ids of ``COCO_CATEGORY_IDS``. Every 20th image has no objects; every 16th holds a
    crowd region (``iscrowd=1``, compressed RLE with ``counts`` as str); other objects have polygons.

    Args:
        root: Output folder (created); existing files of the same names are overwritten.
        num_train: Images in train2017.
        num_val: Images in val2017.
        seed: Same seed, same bytes.
        min_size: Smallest image side in pixels; width and height are drawn independently.
        max_size: Largest image side in pixels.

    Returns:
        ``root``.
    """
    _check_sizes(min_size, max_size)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_start = 1
    for split, count, first_id in (("train", num_train, 1), ("val", num_val, num_train + 1)):
        data = _write_coco_split(
            root, split, count=count, first_image_id=first_id, first_ann_id=ann_start, seed=seed,
            sizes=(min_size, max_size),
        )  # fmt: skip
        ann_start += len(data["annotations"])
        text = json.dumps(data, separators=(",", ":"))
        (root / "annotations" / f"instances_{split}2017.json").write_text(text)
    return root


# --------------------------------------------------------------------------------------------- VOC
def _voc_border(instance_map: np.ndarray) -> np.ndarray:
    """(H, W) bool band, about 4 px wide, on every boundary between instances or background.

    VOC's SegmentationClass masks carry such a "void" band (255) where the boundary is uncertain.
    """
    edge = np.zeros(instance_map.shape, dtype=bool)
    dx = instance_map[:, 1:] != instance_map[:, :-1]
    dy = instance_map[1:, :] != instance_map[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    band = edge.copy()  # grow by one pixel (3x3): both sides of the edge -> ~4 px
    band[1:, :] |= edge[:-1, :]
    band[:-1, :] |= edge[1:, :]
    grown = band.copy()
    grown[:, 1:] |= band[:, :-1]
    grown[:, :-1] |= band[:, 1:]
    return grown


def _write_voc_image(rng: np.random.Generator, voc: Path, stem: str, sizes: tuple[int, int]) -> None:
    """Draw one image with 1-4 objects and write its JPEG and its palette-PNG class mask."""
    width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    areas = [_log_uniform(rng, 0.015, 0.2) * height * width for _ in range(int(rng.integers(1, 5)))]
    image, instances = _draw_scene(rng, height, width, areas, False, _VOC_STYLE)
    labels = np.zeros((height, width), dtype=np.uint8)
    instance_map = np.zeros((height, width), dtype=np.int32)
    for number, instance in enumerate(instances, start=1):
        labels[instance.visible] = VOC_SHAPE_CLASSES[instance.shape]
        instance_map[instance.visible] = number
    labels[_voc_border(instance_map)] = VOC_IGNORE_INDEX
    image.save(voc / "JPEGImages" / f"{stem}.jpg", quality=int(rng.integers(85, 96)))
    mask = Image.fromarray(labels)
    mask.putpalette(VOC_PALETTE)  # 'L' -> 'P', as VOC's PNGs are
    mask.save(voc / "SegmentationClass" / f"{stem}.png")


def make_voc(
    root: Path,
    *,
    num_train: int = 300,
    num_val: int = 50,
    seed: int = 0,
    min_size: int = 200,
    max_size: int = 320,
) -> Path:
    """Write a PASCAL VOC 2012-style semantic segmentation dataset of shapes.

    Layout (``root`` is the folder that contains ``VOCdevkit``, as torchvision's VOCSegmentation
    expects): ``VOCdevkit/VOC2012/JPEGImages/2007_NNNNNN.jpg``, ``SegmentationClass/2007_NNNNNN.png``
    ('P' mode, VOC palette, values: 0 background, ``VOC_SHAPE_CLASSES`` values, 255 on a ~4 px border
    around every object) and ``ImageSets/Segmentation/{train,val,trainval}.txt``.

    Args:
        root: Output folder (created); existing files of the same names are overwritten.
        num_train: Images listed in train.txt.
        num_val: Images listed in val.txt.
        seed: Same seed, same bytes.
        min_size: Smallest image side in pixels; width and height are drawn independently.
        max_size: Largest image side in pixels.

    Returns:
        ``root``.
    """
    _check_sizes(min_size, max_size)
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    stems: dict[str, list[str]] = {"train": [], "val": []}
    for split, count, first in (("train", num_train, 1), ("val", num_val, num_train + 1)):
        for index in range(count):
            stem = f"2007_{first + index:06d}"
            _write_voc_image(_image_rng(seed, f"voc/{split}", index), voc, stem, (min_size, max_size))
            stems[split].append(stem)
    stems["trainval"] = stems["train"] + stems["val"]
    for split, names in stems.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root
