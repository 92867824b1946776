"""Draw a trained model's predictions on images: boxes with names and scores, or colour masks.

    python tools/predict.py CHECKPOINT IMAGE_OR_FOLDER [...] --out runs/predict [--score-threshold 0.3]

Works with checkpoints of both tasks (``tools/train.py`` writes them). Detection draws boxes with
"class score" tags; segmentation blends the predicted classes over the image with a legend.
One picture per input goes to ``--out`` (``NAME.png``), plus ``grid.png`` with all of them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.data.detection_transforms import normalize_images  # noqa: E402
from tasks.data.voc import VOC_CLASSES  # noqa: E402
from tasks.deploy import optimize_for_inference  # noqa: E402
from tasks.detection import SSDLiteDetection  # noqa: E402
from tasks.segmentation import DeepLabV3Segmentation  # noqa: E402
from tools.checkpoints import load_task  # noqa: E402
from tools.drawing import draw_detections, draw_segmentation, grid  # noqa: E402

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


def read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path}: cannot read image ({error})") from error


def to_batch(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A normalised ``[1, 3, H, W]`` tensor, resized to ``size`` (H, W) when given."""
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None]
    return normalize_images(array)


def class_names(task: torch.nn.Module, count: int) -> list[str]:
    """Names by label: saved in the checkpoint (detection), VOC's for 21 classes, else numbers."""
    saved = getattr(task, "class_names", None) or {}
    if not saved and isinstance(task, DeepLabV3Segmentation) and count == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    names = dict(enumerate(saved)) if isinstance(saved, (list, tuple)) else dict(saved)
    return [names.get(label, str(label)) for label in range(count)]


@torch.no_grad()
def predict_pictures(
    task: SSDLiteDetection | DeepLabV3Segmentation, paths: Sequence[Path], score_threshold: float = 0.3
) -> Iterator[tuple[Path, Image.Image]]:
    """Yield (input path, picture of its prediction) for each image."""
    for path in paths:
        image = read_rgb(path)
        height, width = image.height, image.width
        if isinstance(task, SSDLiteDetection):
            batch = to_batch(image, (task.image_size, task.image_size))
            detection = task.model.detect(batch, [(height, width)])[0]
            names = class_names(task, task.hparams.num_classes)
            picture = draw_detections(
                image,
                detection["boxes"].numpy(),
                detection["labels"].tolist(),
                detection["scores"].tolist(),
                names,
                score_threshold=score_threshold,
            )
        else:
            probs = task.predict_probs(to_batch(image))
            mask = probs.argmax(dim=1)[0].numpy()
            picture = draw_segmentation(image, mask, class_names(task, task.hparams.num_classes))
        yield path, picture


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("inputs", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--out", type=Path, default=Path("runs/predict"), help="folder for the pictures")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="detection: hide weaker boxes")
    parser.add_argument("--limit", type=int, help="at most this many images")
    args = parser.parse_args(argv)
    try:
        task = load_task(args.checkpoint, (SSDLiteDetection, DeepLabV3Segmentation))
        task.model = optimize_for_inference(task.model)  # BatchNorm folded, channels-last
        paths = image_paths(args.inputs)[: args.limit]
        args.out.mkdir(parents=True, exist_ok=True)
        written, pictures = [], []
        for path, picture in predict_pictures(task, paths, args.score_threshold):
            target = args.out / f"{path.stem}.png"
            picture.save(target)
            written.append(target)
            pictures.append(picture)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    grid(pictures).save(args.out / "grid.png")
    print(f"wrote {len(written)} pictures and grid.png to {args.out}")
    return written


if __name__ == "__main__":
    main()
