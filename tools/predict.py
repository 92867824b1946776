"""Draw a trained model's predictions on images and save them as files.

    python tools/predict.py CHECKPOINT IMAGE_OR_FOLDER [...] --out runs/predict [--score-threshold 0.3]

Works with checkpoints of both tasks (``tools/train.py`` writes them) and runs validation's own
preprocessing and inference (:mod:`tasks.inference`), so the pictures show what validation scores.
Writes to ``--out``: one picture per input (``NAME.png``; ``NAME_1.png``... when inputs share a
name), ``grid.png`` with all of them, and the predictions: ``predictions.json`` (detection, COCO
results format plus ``file_name``) or ``labels/NAME.png`` palette label maps (segmentation).
Unreadable images are skipped with a warning. In Python::

    from tasks.inference import Predictor
    prediction = Predictor.from_checkpoint("last.ckpt")("street.jpg")
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.data.files import UnreadableSampleError, read_rgb  # noqa: E402
from tasks.drawing import grid, label_png  # noqa: E402
from tasks.inference import DEFAULT_MAX_SIZE, Predictor, detections_as_coco_results  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


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


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("inputs", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"), help="folder for the pictures")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="detection: hide weaker boxes")
    parser.add_argument("--limit", type=int, help="at most this many images")
    parser.add_argument(
        "--max-size", type=int, default=DEFAULT_MAX_SIZE,
        help="segmentation: longest side the network sees (larger images are scaled down and back)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, max_size=args.max_size)
        paths = image_paths(args.inputs)[: args.limit]
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    args.out.mkdir(parents=True, exist_ok=True)
    to_category = getattr(predictor.task, "label_to_category_id", None) or None
    written, pictures, results = [], [], []
    for path, stem in zip(tqdm(paths, desc="predict", unit="image"), unique_stems(paths)):
        try:
            image = read_rgb(path)
        except UnreadableSampleError as error:
            tqdm.write(f"warning: {error}; skipped")
            continue
        prediction = predictor(image)
        picture = predictor.draw(image, prediction, score_threshold=args.score_threshold)
        if "boxes" in prediction:
            rows = detections_as_coco_results(coco_image_id(path), prediction, to_category)
            results += [{**row, "file_name": str(path)} for row in rows]
            if not (prediction["scores"] >= args.score_threshold).any():
                tqdm.write(f"{path}: no box scored {args.score_threshold} or more")
        else:
            (args.out / "labels").mkdir(exist_ok=True)
            label_png(prediction["labels"].numpy()).save(args.out / "labels" / f"{stem}.png")
            if tuple(prediction["inference_size"]) != image.shape[:2]:
                height, width = prediction["inference_size"]
                tqdm.write(f"{path}: {image.shape[1]}x{image.shape[0]} segmented at {width}x{height} (--max-size)")
        target = args.out / f"{stem}.png"
        picture.save(target)
        written.append(target)
        pictures.append(picture)
    if not written:
        print(f"error: none of the {len(paths)} images could be read", file=sys.stderr)
        raise SystemExit(1)
    grid(pictures).save(args.out / "grid.png")
    if results or "boxes" in prediction:
        (args.out / "predictions.json").write_text(json.dumps(results))
    print(f"wrote {len(written)} pictures, grid.png and the predictions to {args.out}")
    return written


if __name__ == "__main__":
    main()
