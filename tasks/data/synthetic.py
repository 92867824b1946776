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

from tasks.data.constants import VOC_CLASSES, VOC_IGNORE_INDEX, VOC_PALETTE  # noqa: F401  (re-exported)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

# COCO category ids are not contiguous (COCO 2017 uses 1..90 for 80 classes); these gaps make code
# that confuses a category id with a label index fail loudly.
COCO_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 3, "triangle": 7, "cross": 12, "ring": 44}

# Shape -> index in VOC's 21-class label space (spread out, so no code can assume labels 1..5).
VOC_SHAPE_CLASSES: dict[str, int] = {"circle": 1, "square": 5, "triangle": 9, "cross": 15, "ring": 20}
# The names of the labels the VOC-format set uses: what it shows, not VOC's names for those indices.
SYNTHETIC_VOC_CLASS_NAMES: dict[int, str] = {0: "background", **{i: s for s, i in VOC_SHAPE_CLASSES.items()}}

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

# Where the synthetic configs (data.root) and `tools/make_synthetic.py --out data/synthetic` put the
# built-in sets, relative to the working directory: the only roots that a DataModule's
# data.synthetic writes into without being asked (see may_write_synthetic).
SYNTHETIC_COCO_ROOT = Path("data/synthetic/coco")
SYNTHETIC_VOC_ROOT = Path("data/synthetic/voc")


def may_write_synthetic(root: Path, default_root: Path, *, synthetic: bool, write: bool) -> bool:
    """Whether a DataModule may write its synthetic set into ``root`` (when ``root`` lacks data).

    Yes when asked explicitly (``write``: ``data.write_synthetic``), or when the config uses the
    synthetic set (``synthetic``) and ``root`` is that set's ``default_root``. Anything else, a
    mistyped ``--data.root`` above all, must fail with "not found" rather than train on a new set.
    """
    return write or (synthetic and Path(root).resolve() == Path(default_root).resolve())


def synthetic_hint(default_root: Path) -> str:
    """The end of a "not found" line under a synthetic config: where and how the set gets written."""
    return (
        f"data.synthetic writes the synthetic set only at {default_root}; add --data.write_synthetic true "
        "to write it at this root (or: python tools/make_synthetic.py --out DIR)"
    )
_SPLIT_CODES = {"coco/train": 0, "coco/val": 1, "voc/train": 2, "voc/val": 3, "voc/sbd": 4, "voc/none": 5}


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
    shapes: list[str] | None = None,
) -> tuple[Image.Image, list[_Instance]]:
    """Draw a background, an optional crowd region and one object per area, later ones on top.

    ``shapes`` (the crowd's first, then one per area) fixes the classes; None draws them at random
    (the plain sets: leaving it None keeps their bytes as they were).

    Returns:
        The RGB image and the placed instances in drawing order, with ``visible`` already cut by
        every later object.
    """
    canvas = _background(rng, height, width, style)
    instances: list[_Instance] = []
    chosen = iter(shapes) if shapes is not None else None
    if crowd:
        shape = next(chosen) if chosen is not None else SHAPES[int(rng.integers(len(SHAPES)))]
        instances.append(_place_crowd(rng, canvas, shape, style.hues[shape] if style.hues else None))
    for area in areas:
        shape = next(chosen) if chosen is not None else SHAPES[int(rng.integers(len(SHAPES)))]
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


def _draw_voc_scene(
    rng: np.random.Generator, sizes: tuple[int, int]
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Draw one image with 1-4 objects.

    Returns:
        The RGB image, its (H, W) uint8 class map (0 background, ``VOC_SHAPE_CLASSES`` values) and
        its (H, W) int32 instance map (0 background, 1.. in drawing order), both without void.
    """
    width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    areas = [_log_uniform(rng, 0.015, 0.2) * height * width for _ in range(int(rng.integers(1, 5)))]
    image, instances = _draw_scene(rng, height, width, areas, False, _VOC_STYLE)
    labels = np.zeros((height, width), dtype=np.uint8)
    instance_map = np.zeros((height, width), dtype=np.int32)
    for number, instance in enumerate(instances, start=1):
        labels[instance.visible] = VOC_SHAPE_CLASSES[instance.shape]
        instance_map[instance.visible] = number
    return image, labels, instance_map


def _save_palette_png(labels: np.ndarray, path: Path) -> None:
    """Write class indices as a 'P' PNG with VOC's palette, as VOC's SegmentationClass files are."""
    mask = Image.fromarray(labels)
    mask.putpalette(VOC_PALETTE)  # 'L' -> 'P'
    mask.save(path)


def _write_voc_image(rng: np.random.Generator, voc: Path, stem: str, sizes: tuple[int, int]) -> None:
    """Draw one image with 1-4 objects and write its JPEG and its palette-PNG class mask."""
    image, labels, instance_map = _draw_voc_scene(rng, sizes)
    labels[_voc_border(instance_map)] = VOC_IGNORE_INDEX
    image.save(voc / "JPEGImages" / f"{stem}.jpg", quality=int(rng.integers(85, 96)))
    _save_palette_png(labels, voc / "SegmentationClass" / f"{stem}.png")


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


# --------------------------------------------------------------------------------------- realistic
# The plain sets above are friendly: five categories, RGB JPEGs only, image ids 1..N. The realistic
# sets below keep the same drawings but mirror what the real COCO 2017 and VOC 2012 (+ SBD) files
# look like, quirks included, so that tests of the shipped paper configs meet what users meet.

# COCO 2017's 80 categories with their real ids and supercategories (instances_*2017.json). The ids
# run 1..90: 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 belong to no category.
COCO_2017_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"), (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"), (15, "bench", "outdoor"), (16, "bird", "animal"),
    (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"), (20, "sheep", "animal"),
    (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"),
    (86, "vase", "indoor"), (87, "scissors", "indoor"), (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)  # fmt: skip
# The shapes drawn in the realistic set, stored under real COCO ids: the first and the last id and
# ids right after a gap, so that an off-by-one between label and id shows.
REALISTIC_COCO_CATEGORY_IDS: dict[str, int] = {"circle": 1, "square": 13, "triangle": 46, "cross": 72, "ring": 90}
# Real instances files give crowd annotations ids from 900100000000 on (beyond 32 bits).
_COCO_CROWD_ANN_BASE = 900_100_000_000
# What image ``index`` of a realistic COCO split is (both splits; the rest are plain RGB JPEGs).
_REALISTIC_COCO_KINDS: dict[int, str] = {
    1: "grey",  # COCO has about 1% greyscale JPEGs
    2: "crowd_list",  # iscrowd=1 with uncompressed RLE (counts a list), as in instances_*.json
    3: "empty",  # no annotations at all (about 1% of COCO's images)
    4: "cmyk",  # a CMYK JPEG
    5: "rgba",  # an RGBA PNG
    6: "crowd_string",  # iscrowd=1 with compressed RLE (counts a str), as pycocotools writes
    7: "sliver",  # one object box narrower than a pixel (COCO has a few)
    11: "empty",
}
_SLIVER_WIDTH, _SLIVER_HEIGHT = 0.6, 24.0  # a thin vertical object: its box is 0.6 px wide

# VOC 2012 + SBD: the realistic set adds images that only SBD labels, and images no split lists.
REALISTIC_VOC_SBD_EXTRA = 8  # images in train_aug only (SBD's labels: no void band)
REALISTIC_VOC_UNLISTED = 2  # JPEGs of the detection task only: in JPEGImages, in no split
_REALISTIC_VOC_DIFFICULT_AT = 1  # this train image has one object marked void (255) as a whole


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (H, W) bool mask: run lengths in column-major order, zeros first."""
    flat = mask.astype(np.uint8).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]  # the first run counts zeros, even when there are none
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _realistic_coco_annotation(instance: _Instance, height: int, width: int, crowd_form: str) -> dict | None:
    """A COCO annotation as the real files have them.

    Objects: polygons, ``bbox`` = the polygons' extent (floats, as COCO's boxes come from their
    polygons). Crowd regions: RLE, uncompressed (``crowd_form="list"``) or compressed (``"string"``).
    """
    if instance.crowd:
        if crowd_form == "list":
            segmentation: list | dict = _uncompressed_rle(instance.visible)
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = mask_utils.encode(np.asfortranarray(instance.visible.astype(np.uint8)))
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
    else:
        polygon = instance.polygon
        inside = polygon.min() >= 0 and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height
        if inside and np.array_equal(instance.visible, instance.full):
            segmentation = [polygon.ravel().tolist()]
        else:
            segmentation = _mask_to_polygons(instance.visible)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in segmentation])
        x0, y0 = np.clip(points.min(0), 0, [width, height])
        x1, y1 = np.clip(points.max(0), 0, [width, height])
        bbox = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
    area = float(mask_utils.area(rle))
    if area < 1:
        return None
    return {
        "segmentation": segmentation,
        "area": area,
        "iscrowd": int(instance.crowd),
        "bbox": bbox,
        "category_id": REALISTIC_COCO_CATEGORY_IDS[instance.shape],
    }


def _add_sliver(rng: np.random.Generator, image: Image.Image, instances: list[_Instance]) -> None:
    """Paint a thin vertical object (box ``_SLIVER_WIDTH`` px wide) on top of the scene."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    height, width = canvas.shape[:2]
    # From x + 0.2 to x + 0.8: the polygon covers the centres of one pixel column, so that
    # pycocotools rasterises it to that column (a polygon between two centres would vanish).
    x = float(np.floor(rng.uniform(8, width - 8))) + 0.2
    y = float(np.round(rng.uniform(4, height - _SLIVER_HEIGHT - 4), 2))
    polygon = np.array(
        [(x, y), (x + _SLIVER_WIDTH, y), (x + _SLIVER_WIDTH, y + _SLIVER_HEIGHT), (x, y + _SLIVER_HEIGHT)]
    )
    full = _rasterize([polygon], height, width)
    shape = SHAPES[len(instances) % len(SHAPES)]
    colour = _pick_colour(rng, canvas, full, [], COCO_CLASS_HUES[shape])
    canvas[full] = colour
    image.paste(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)))
    for prev in instances:
        prev.visible &= ~full
    instances.append(_Instance(shape, polygon, full, full.copy(), colour))


def _realistic_image_ids(seed: int, counts: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Sparse image ids like COCO's (139, 285, 632...), never 1..N; disjoint between the splits."""
    rng = np.random.default_rng([seed, 99])
    ids = (rng.choice(581_929, size=sum(counts), replace=False) + 1).tolist()
    return sorted(ids[: counts[0]]), sorted(ids[counts[0] :])


def _write_realistic_coco_split(
    root: Path, split: str, image_ids: list[int], *, seed: int, sizes: tuple[int, int], next_ann_id: int
) -> dict:
    """Draw one split of the realistic COCO set; return its COCO dictionary."""
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index, image_id in enumerate(image_ids):
        rng = _image_rng(seed, f"coco/{split}", index)
        kind = _REALISTIC_COCO_KINDS.get(index, "rgb")
        width, height = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
        crowd = kind.startswith("crowd")
        areas = [] if kind == "empty" else _coco_areas(rng, height, width)
        shapes = [SHAPES[(index + k) % len(SHAPES)] for k in range(len(areas) + 1)]  # every class shows up
        image, instances = _draw_scene(rng, height, width, areas, crowd, _COCO_STYLE, shapes)
        if kind == "sliver":
            _add_sliver(rng, image, instances)
        file_name = f"{image_id:012d}.png" if kind == "rgba" else f"{image_id:012d}.jpg"
        quality = int(rng.integers(85, 96))
        if kind == "grey":
            image.convert("L").save(image_dir / file_name, quality=quality)
        elif kind == "cmyk":
            image.convert("CMYK").save(image_dir / file_name, quality=quality)
        elif kind == "rgba":
            image.convert("RGBA").save(image_dir / file_name)
        else:
            image.save(image_dir / file_name, quality=quality)
        images.append(
            {"license": 1, "file_name": file_name, "coco_url": "", "height": height, "width": width,
             "date_captured": "2013-11-14 17:02:52", "flickr_url": "", "id": image_id}
        )  # fmt: skip
        crowd_form = "list" if kind == "crowd_list" else "string"
        crowd_count = 0
        for instance in instances:
            annotation = _realistic_coco_annotation(instance, height, width, crowd_form)
            if annotation is None:
                continue
            if instance.crowd:
                ann_id = _COCO_CROWD_ANN_BASE + image_id * 10 + crowd_count
                crowd_count += 1
            else:
                ann_id, next_ann_id = next_ann_id, next_ann_id + int(rng.integers(1, 5000))
            annotations.append({**annotation, "image_id": image_id, "id": ann_id})
    order = np.random.default_rng([seed, _SPLIT_CODES[f"coco/{split}"], 7])
    return {
        "info": {
            "description": f"mobiledense realistic synthetic set in COCO 2017's format, seed {seed}",
            "url": "", "version": "1.0", "year": 2017, "contributor": "mobiledense",
            "date_created": "2017/09/01",
        },
        "licenses": [{"url": _CC0_URL, "id": 1, "name": "CC0-1.0"}],
        # Real files list neither images nor annotations in id order.
        "images": [images[i] for i in order.permutation(len(images))],
        "annotations": [annotations[i] for i in order.permutation(len(annotations))],
        "categories": [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup in COCO_2017_CATEGORIES],
    }  # fmt: skip


def make_realistic_coco(
    root: Path,
    *,
    num_train: int = 16,
    num_val: int = 8,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 256,
) -> Path:
    """Write a small COCO 2017 detection set with the real dataset's quirks.

    Same layout as :func:`make_coco` (``root/{train,val}2017/``, ``root/annotations/
    instances_{train,val}2017.json``) and the same kind of drawings, but:

    - ``categories`` lists all 80 COCO 2017 categories with their real ids (1..90 with 10 gaps,
      ``COCO_2017_CATEGORIES``); objects are drawn for five of them (``REALISTIC_COCO_CATEGORY_IDS``:
      1, 13, 46, 72 and 90), the other 75 have no annotation, as any category may lack one in a split;
    - image ids are sparse (never ``1..N``), file names are COCO's 12-digit ones (``000000000139.jpg``),
      and neither images nor annotations are listed in id order; crowd annotation ids exceed 32 bits;
    - per split (``_REALISTIC_COCO_KINDS``, by image index): a greyscale JPEG, a CMYK JPEG, an RGBA
      PNG, images without annotations, crowd regions (``iscrowd: 1``) as uncompressed RLE (``counts``
      a list, as in COCO's files) and as compressed RLE (``counts`` a str), an object whose box is
      0.6 px wide; other objects have polygons and boxes that are the polygons' extent;
    - ``info`` and ``licenses`` blocks and COCO's image fields (``license``, ``coco_url``,
      ``date_captured``, ``flickr_url``).

    Args:
        root: Output folder (created); existing files of the same names are overwritten.
        num_train: Images in train2017 (16 covers every quirk above).
        num_val: Images in val2017 (8 covers every quirk but the second empty image).
        seed: Same seed, same bytes.
        min_size: Smallest image side in pixels.
        max_size: Largest image side in pixels.

    Returns:
        ``root``.
    """
    _check_sizes(min_size, max_size)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = _realistic_image_ids(seed, (num_train, num_val))
    next_ann_id = 1768
    for split, ids in (("train", train_ids), ("val", val_ids)):
        data = _write_realistic_coco_split(
            root, split, ids, seed=seed, sizes=(min_size, max_size), next_ann_id=next_ann_id
        )
        plain = [a["id"] for a in data["annotations"] if not a["iscrowd"]]
        next_ann_id = max(plain, default=next_ann_id) + 1
        text = json.dumps(data, separators=(",", ":"))
        (root / "annotations" / f"instances_{split}2017.json").write_text(text)
    return root


def _realistic_voc_stems(seed: int, count: int) -> list[str]:
    """``count`` distinct VOC-style image ids (``2008_000123``) over the years 2007-2011, sorted."""
    rng = np.random.default_rng([seed, 98])
    numbers = rng.choice(5 * 9000, size=count, replace=False)
    return sorted(f"{2007 + int(n) // 9000}_{int(n) % 9000 + 1:06d}" for n in numbers)


def make_realistic_voc(
    root: Path,
    *,
    num_train: int = 16,
    num_val: int = 8,
    seed: int = 0,
    min_size: int = 160,
    max_size: int = 256,
) -> Path:
    """Write a small PASCAL VOC 2012 segmentation set with SBD's augmented labels, quirks included.

    Layout (as the devkit plus the widely used ``SegmentationClassAug`` conversion of SBD ship it)::

        root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg        every image, also ones no split lists
                              /SegmentationClass/<id>.png palette ('P') PNGs of train and val,
                                                          VOC palette, 255 on a ~4 px band around
                                                          every object, and over one "difficult" object
                              /SegmentationClassAug/<id>.png  grey ('L') PNGs of train_aug and val;
                                                          SBD-only images have no void band
                              /ImageSets/Segmentation/{train,val,trainval}.txt   one id per line
                              /ImageSets/Segmentation/train_aug.txt  "/JPEGImages/<id>.jpg
                                                          /SegmentationClassAug/<id>.png" lines

    Image ids look like VOC's (``2009_001234``, several years); train and val ids interleave (each
    list is sorted, as VOC's are); ``train_aug`` is train plus ``REALISTIC_VOC_SBD_EXTRA`` SBD-only
    images, never a val image; ``REALISTIC_VOC_UNLISTED`` JPEGs belong to no split.

    Args:
        root: Output folder (created); existing files of the same names are overwritten.
        num_train: Images in train.txt.
        num_val: Images in val.txt.
        seed: Same seed, same bytes.
        min_size: Smallest image side in pixels.
        max_size: Largest image side in pixels.

    Returns:
        ``root``.
    """
    _check_sizes(min_size, max_size)
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012"
    folders = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation")
    for sub in folders:
        (voc / sub).mkdir(parents=True, exist_ok=True)
    total = num_train + num_val + REALISTIC_VOC_SBD_EXTRA + REALISTIC_VOC_UNLISTED
    stems = _realistic_voc_stems(seed, total)
    roles = np.random.default_rng([seed, 97]).permutation(
        ["train"] * num_train + ["val"] * num_val + ["sbd"] * REALISTIC_VOC_SBD_EXTRA
        + ["none"] * REALISTIC_VOC_UNLISTED
    ).tolist()  # fmt: skip
    lists: dict[str, list[str]] = {"train": [], "val": [], "sbd": [], "none": []}
    for stem, role in zip(stems, roles):
        index = len(lists[role])
        lists[role].append(stem)
        rng = _image_rng(seed, f"voc/{role}", index)
        image, labels, instance_map = _draw_voc_scene(rng, (min_size, max_size))
        image.save(voc / "JPEGImages" / f"{stem}.jpg", quality=int(rng.integers(85, 96)))
        if role == "none":
            continue
        if role == "sbd":  # SBD's boundaries carry no void band
            Image.fromarray(labels).save(voc / "SegmentationClassAug" / f"{stem}.png")  # uint8: 'L'
            continue
        labels[_voc_border(instance_map)] = VOC_IGNORE_INDEX
        if role == "train" and index == _REALISTIC_VOC_DIFFICULT_AT and len(np.unique(instance_map)) > 2:
            labels[instance_map == instance_map.max()] = VOC_IGNORE_INDEX  # a "difficult" object (of 2+)
        _save_palette_png(labels, voc / "SegmentationClass" / f"{stem}.png")
        Image.fromarray(labels).save(voc / "SegmentationClassAug" / f"{stem}.png")  # the same labels, 'L'
    sets = voc / "ImageSets" / "Segmentation"
    for split, names in (("train", lists["train"]), ("val", lists["val"]),
                         ("trainval", sorted(lists["train"] + lists["val"]))):  # fmt: skip
        (sets / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    aug = sorted(lists["train"] + lists["sbd"])
    (sets / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug)
    )
    return root
