"""Pictures of predictions: boxes with class names and scores, colour masks with a legend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.data.constants import VOC_PALETTE

# A qualitative palette (Tableau 10 then a few more): distinct, readable on photos.
BOX_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
)


def voc_palette() -> list[tuple[int, int, int]]:
    """PASCAL VOC's 256-colour map as RGB tuples (the one the synthetic masks are written with)."""
    return [tuple(VOC_PALETTE[i : i + 3]) for i in range(0, len(VOC_PALETTE), 3)]


def label_png(labels: np.ndarray) -> Image.Image:
    """A class-index map ``[H, W]`` (0..255) as a palette PNG image in VOC's colours (VOC's own format)."""
    image = Image.fromarray(np.asarray(labels).astype(np.uint8), mode="L").convert("P")
    image.putpalette(VOC_PALETTE)
    return image


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image,
    boxes: np.ndarray,
    labels: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.3,
) -> Image.Image:
    """Draw ``boxes`` (absolute xyxy pixels, shape [N, 4]) with "name score" tags on a copy of ``image``."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    side = min(canvas.size)
    line = max(2, side // 200)
    font = _font(max(11, side // 30))
    order = np.argsort(np.asarray(scores, dtype=float))  # strongest drawn last, on top
    for index in order:
        score = float(scores[index])
        if score < score_threshold:
            continue
        label = int(labels[index])
        colour = BOX_COLOURS[label % len(BOX_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in boxes[index])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_h = bottom - top + 4
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else y1
        draw.rectangle((x1, tag_y, x1 + right - left + 6, tag_y + tag_h), fill=colour)
        draw.text((x1 + 3, tag_y + 2 - top), text, fill=(255, 255, 255), font=font)
    return canvas


def draw_segmentation(
    image: Image.Image,
    mask: np.ndarray,
    class_names: Sequence[str],
    *,
    alpha: float = 0.55,
    ignore_index: int = 255,
    palette: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
    """Blend a class-index ``mask`` [H, W] over ``image`` and add a legend of the classes present."""
    palette = list(palette or voc_palette())
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask.shape != base.shape[:2]:
        raise ValueError(f"mask is {mask.shape}, image is {base.shape[:2]}: sizes must match")
    colours = np.asarray(palette, dtype=np.float32)[np.clip(mask, 0, len(palette) - 1)]
    blend = np.where(
        ((mask > 0) & (mask != ignore_index))[..., None], (1 - alpha) * base + alpha * colours, base
    )
    blended = Image.fromarray(blend.round().astype(np.uint8))
    present = [int(c) for c in np.unique(mask) if c != ignore_index and 0 <= c < len(class_names)]
    return _with_legend(blended, [(class_names[c], palette[c]) for c in present])


def _with_legend(image: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    font = _font(max(11, image.height // 24))
    probe = ImageDraw.Draw(image)
    row = max(16, image.height // 18)
    text_w = max((probe.textbbox((0, 0), name, font=font)[2] for name, _ in entries), default=0)
    width = row + text_w + 16
    canvas = Image.new("RGB", (image.width + width, image.height), (250, 250, 250))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (name, colour) in enumerate(entries):
        top = 6 + index * (row + 4)
        left = image.width + 6
        draw.rectangle((left, top, left + row - 4, top + row - 4), fill=colour, outline=(40, 40, 40))
        draw.text((left + row + 2, top), name, fill=(20, 20, 20), font=font)
    return canvas


def grid(images: Sequence[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Tile images (each scaled to the first one's height) into a contact sheet."""
    if not images:
        raise ValueError("grid needs at least one image")
    height = images[0].height
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height)) for im in images]
    columns = min(columns, len(scaled))
    rows = [scaled[i : i + columns] for i in range(0, len(scaled), columns)]
    width = max(sum(im.width for im in row) + pad * (len(row) + 1) for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (height + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        x = pad
        for im in row:
            sheet.paste(im, (x, pad + r * (height + pad)))
            x += im.width + pad
    return sheet
