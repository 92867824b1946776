"""The main job, end to end on the built-in synthetic data (what ``make demo`` runs).

1. writes the synthetic COCO- and VOC-format datasets (``tools/make_synthetic.py``);
2. trains SSDLite-MobileNetV2 and Mobile DeepLabv3 briefly from scratch (``tools/train.py`` with
   the ``*_synthetic.yaml`` configs, fewer steps);
3. evaluates each checkpoint on its validation split (``tools/test.py``: COCO mAP, VOC mIoU);
4. draws predictions on validation images (``tools/predict.py``).

    python tools/demo.py --out runs/demo [--detection-steps 120] [--segmentation-steps 600]

Short runs show the pipeline working, not the final accuracy: the configs' full schedules
(``python tools/train.py fit --config configs/..._synthetic.yaml``) reach AP > 0.5 / mIoU > 0.7.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported
    keep_freed_memory()  # no page faults on every step's activations (tasks/allocator.py)

from tasks import cli  # noqa: E402
from tasks.data.synthetic import make_coco, make_voc  # noqa: E402
from tasks.evaluation.checkpoint import evaluate_checkpoint  # noqa: E402
from tasks.inference import Predictor  # noqa: E402
from tasks.prediction_files import image_paths, predict_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def evaluate_and_print(checkpoint: Path, out: Path) -> dict[str, Any]:
    """What ``tools/test.py CHECKPOINT --out OUT`` prints and returns."""
    try:
        metrics, report = evaluate_checkpoint(checkpoint, out, accelerator="auto")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(report)
    return metrics


def draw_and_print(checkpoint: Path, inputs: Sequence[Path], out: Path, limit: int) -> list[Path]:
    """What ``tools/predict.py CHECKPOINT INPUTS --out OUT --limit LIMIT`` writes and prints."""
    try:
        written = predict_files(Predictor.from_checkpoint(checkpoint), image_paths(inputs)[:limit], out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {len(written)} pictures, grid.png and the predictions to {out}")
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="everything goes here")
    parser.add_argument("--detection-steps", type=int, default=120, help="SSDLite optimiser steps (batch 16)")
    parser.add_argument("--segmentation-steps", type=int, default=600, help="DeepLabv3 optimiser steps (batch 8)")
    parser.add_argument("--pictures", type=int, default=8, help="validation images to draw per task")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = args.out / "data"
    print(f"[1/4] synthetic data -> {data}", flush=True)
    if not (data / "coco" / "annotations").is_dir():
        make_coco(data / "coco")
    if not (data / "voc" / "VOCdevkit").is_dir():
        make_voc(data / "voc")

    results: dict[str, float] = {}
    jobs = (
        ("detection", "ssdlite_mobilenetv2_synthetic.yaml", data / "coco", args.detection_steps, data / "coco" / "val2017"),
        ("segmentation", "deeplabv3_mobilenetv2_synthetic.yaml", data / "voc", args.segmentation_steps,
         data / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages"),
    )  # fmt: skip
    for task, config, root, steps, images in jobs:
        out = args.out / task
        print(f"[2/4] {task}: training {config} for {steps} steps", flush=True)
        checkpoint = cli.fit_briefly(ROOT / "configs" / config, root, out, steps, val_every=max(1, steps // 3))
        print(f"[3/4] {task}: evaluating {checkpoint}", flush=True)
        metrics = evaluate_and_print(checkpoint, out / "predictions")
        results[task] = metrics["AP"] if task == "detection" else metrics["mIoU"]
        print(f"[4/4] {task}: drawing predictions", flush=True)
        if task == "segmentation":  # draw validation images, not training ones
            stems = (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
            inputs = [images / f"{stem}.jpg" for stem in stems[: args.pictures]]
        else:
            inputs = [images]
        draw_and_print(checkpoint, inputs, out / "pictures", args.pictures)

    minutes = (time.perf_counter() - start) / 60
    print("\n" + "=" * 72)
    print(f"{'task':<14}{'metric':<22}{'value':>8}   pictures")
    print(f"{'detection':<14}{'COCO AP@[.5:.95]':<22}{results['detection']:>8.3f}   {args.out / 'detection/pictures/grid.png'}")
    print(f"{'segmentation':<14}{'VOC mIoU':<22}{results['segmentation']:>8.3f}   {args.out / 'segmentation/pictures/grid.png'}")
    print(f"done in {minutes:.1f} min")
    return results


if __name__ == "__main__":
    main()
