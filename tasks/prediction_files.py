"""A checkpoint's predictions on image files, written to a folder (what ``tools/predict.py`` does).

:func:`predict_files` runs one :class:`~tasks.inference.Predictor` over the images and writes one
picture per input (``NAME.png``; ``NAME_1.png``... when inputs share a name), ``grid.png`` with
all of them, and the predictions: ``predictions.json`` (detection, COCO results format plus
``file_name``) or ``labels/NAME.png`` palette label maps (segmentation). Unreadable images are
skipped with a warning line; progress is shown with tqdm.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tasks.data.files import UnreadableSampleError, read_rgb
from tasks.drawing import grid, label_png
from tasks.inference import Predictor, detections_as_coco_results

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class NoReadableImageError(ValueError):
    """None of the images given to :func:`predict_files` could be read."""


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (sorted) in named folders."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Output names: each input's stem, with ``_1``, ``_2``... when stems repeat (a/x.jpg, b/x.jpg)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


def coco_image_id(path: Path) -> int | str:
    """COCO's convention: ``000000000139.jpg`` is image 139; other names keep their stem."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def predict_files(predictor: Predictor, paths: Sequence[Path], out: Path, score_threshold: float = 0.3) -> list[Path]:
    """Predict every image of ``paths`` into ``out``; return the pictures written.

    Raises :class:`NoReadableImageError` when none of the images could be read.
    """
    out.mkdir(parents=True, exist_ok=True)
    to_category = getattr(predictor.task, "label_to_category_id", None) or None
    written: list[Path] = []
    pictures = []
    results: list[dict[str, Any]] = []
    prediction: dict[str, Any] = {}
    for path, stem in zip(tqdm(paths, desc="predict", unit="image"), unique_stems(paths)):
        try:
            image = read_rgb(path)
        except UnreadableSampleError as error:
            tqdm.write(f"warning: {error}; skipped")
            continue
        prediction = predictor(image)
        picture = predictor.draw(image, prediction, score_threshold=score_threshold)
        if "boxes" in prediction:
            rows = detections_as_coco_results(coco_image_id(path), prediction, to_category)
            results += [{**row, "file_name": str(path)} for row in rows]
            if not (prediction["scores"] >= score_threshold).any():
                tqdm.write(f"{path}: no box scored {score_threshold} or more")
        else:
            (out / "labels").mkdir(exist_ok=True)
            label_png(prediction["labels"].numpy()).save(out / "labels" / f"{stem}.png")
            if tuple(prediction["inference_size"]) != image.shape[:2]:
                height, width = prediction["inference_size"]
                tqdm.write(f"{path}: {image.shape[1]}x{image.shape[0]} segmented at {width}x{height} (--max-size)")
        target = out / f"{stem}.png"
        picture.save(target)
        written.append(target)
        pictures.append(picture)
    if not written:
        raise NoReadableImageError(f"none of the {len(paths)} images could be read")
    grid(pictures).save(out / "grid.png")
    if results or "boxes" in prediction:
        (out / "predictions.json").write_text(json.dumps(results))
    return written
