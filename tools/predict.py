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
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported
    keep_freed_memory()  # no page faults on every step's activations (tasks/allocator.py)

from tasks.inference import DEFAULT_MAX_SIZE, Predictor  # noqa: E402
from tasks.prediction_files import NoReadableImageError, image_paths, predict_files  # noqa: E402


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
    try:
        written = predict_files(predictor, paths, args.out, args.score_threshold)
    except NoReadableImageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {len(written)} pictures, grid.png and the predictions to {args.out}")
    return written


if __name__ == "__main__":
    main()
