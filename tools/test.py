"""Evaluate a trained checkpoint on its dataset's validation split, writing the predictions too.

    python tools/test.py CHECKPOINT [--data-root DIR] [--out runs/test] [--json]

Detection writes ``OUT/detections.json`` (COCO results format) and scores it with
``tools/eval_coco.py``'s evaluator; segmentation writes one palette PNG of predicted labels per
image to ``OUT/labels/`` and scores them with ``tools/eval_miou.py``'s. So this tool and the two
standalone evaluators always agree, and the files can be re-scored or inspected later.
The dataset settings come from the checkpoint (what it was trained with); ``--data-root``
points them at another copy of the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.detection import SSDLiteDetection  # noqa: E402
from tasks.segmentation import DeepLabV3Segmentation  # noqa: E402
from tools import eval_coco, eval_miou  # noqa: E402
from tasks.checkpoints import load_task, read_checkpoint, recorded_class  # noqa: E402
from tasks.data.synthetic import VOC_PALETTE  # noqa: E402
from tasks.evaluation.coco_map import COCOMeanAveragePrecision, coco_results  # noqa: E402


def load_datamodule(path: Path, **overrides: Any) -> LightningDataModule:
    """The DataModule a checkpoint was trained with (its saved hyper-parameters), with overrides."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("datamodule_hyper_parameters")
    if not saved or "_class_path" not in saved:
        raise ValueError(f"{path}: the checkpoint records no data settings (was it written by tools/train.py?)")
    cls = recorded_class(path, saved, LightningDataModule)
    return cls.load_from_checkpoint(path, weights_only=True, **{k: v for k, v in overrides.items() if v is not None})


def batches(datamodule: LightningDataModule) -> Any:
    """Validation batches as the trainer would hand them to the task (after the transfer hook)."""
    datamodule.setup("validate")
    for index, batch in enumerate(datamodule.val_dataloader()):
        yield index, datamodule.on_after_batch_transfer(batch, 0)


@torch.no_grad()
def test_detection(task: SSDLiteDetection, datamodule: LightningDataModule, out: Path, backend: str) -> dict[str, Any]:
    """Detections of the val split -> ``detections.json`` -> COCO mAP through ``eval_coco``."""
    # Labels -> category ids and xyxy -> xywh by the metric validation uses: a label without a
    # category id is dropped and reported there, as during training, never a KeyError here.
    metric = COCOMeanAveragePrecision(label_to_category_id=datamodule.label_to_category_id, backend=backend)
    for index, batch in batches(datamodule):
        detections = task.predict_step(batch, index)
        metric.update([detection["image_id"] for detection in detections], detections)
    results = coco_results(metric.results()[1])
    results_path = out / "detections.json"
    results_path.write_text(json.dumps(results))
    gt_path = Path(datamodule.root) / "annotations" / f"instances_{datamodule.splits['val']}.json"
    summary = eval_coco.evaluate_files(gt_path, results_path, backend)
    names = {c["id"]: c["name"] for c in datamodule.categories}
    print(eval_coco.format_report(summary, names))
    print(f"\nwrote {len(results)} detections to {results_path}")
    return summary


@torch.no_grad()
def test_segmentation(task: DeepLabV3Segmentation, datamodule: LightningDataModule, out: Path) -> dict[str, Any]:
    """Label maps of the val split -> palette PNGs -> mIoU through ``eval_miou``."""
    labels_dir = out / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    stems = []
    for index, batch in batches(datamodule):
        for image_id, labels in zip(batch["image_ids"], task.predict_step(batch, index)):
            image = Image.fromarray(labels.numpy().astype(np.uint8), mode="L").convert("P")
            image.putpalette(VOC_PALETTE)
            image.save(labels_dir / f"{image_id}.png")
            stems.append(image_id)
    dataset = datamodule.val_dataset
    names = list(datamodule.class_names)
    metric = eval_miou.evaluate_folders(
        dataset.mask_dir, labels_dir, task.hparams.num_classes, datamodule.ignore_index, names, stems
    )
    print(eval_miou.format_report(metric, names))
    print(f"\nwrote {len(stems)} label maps to {labels_dir}")
    return eval_miou.as_json(metric)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by tools/train.py")
    parser.add_argument("--data-root", help="dataset folder (default: the one the checkpoint was trained on)")
    parser.add_argument("--out", type=Path, default=Path("runs/test"), help="folder for predictions")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--backend", choices=["auto", "pycocotools", "faster"], default="auto", help="COCOeval")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    args = parser.parse_args(argv)
    try:
        task = load_task(args.checkpoint, (SSDLiteDetection, DeepLabV3Segmentation))
        overrides = {"root": args.data_root, "num_workers": args.num_workers}
        if isinstance(task, SSDLiteDetection):
            overrides["persistent_workers"] = args.num_workers > 0
        datamodule = load_datamodule(args.checkpoint, **overrides)
        args.out.mkdir(parents=True, exist_ok=True)
        if isinstance(task, SSDLiteDetection):
            summary = test_detection(task, datamodule, args.out, args.backend)
            # The same keys as eval_coco.py --json, per-class table aside.
            metrics = {key: value for key, value in summary.items() if key != "per_class"}
        else:
            metrics = test_segmentation(task, datamodule, args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
