"""Evaluate a trained checkpoint on its dataset's validation split, writing the predictions too.

Detection writes ``OUT/detections.json`` (COCO results format) and scores it with
:mod:`tasks.evaluation.coco_files`; segmentation writes one palette PNG of predicted labels per
image to ``OUT/labels/`` and scores them with :mod:`tasks.evaluation.label_files`. So
``tools/test.py`` and the two standalone evaluators (``tools/eval_coco.py``,
``tools/eval_miou.py``) always agree, and the files can be re-scored or inspected later. The
dataset settings come from the checkpoint (what it was trained with); ``data_root`` points them
at another copy of the data.

Each function returns its numbers and the report to print, so the tools (``tools/test.py``,
``tools/demo.py``) only print.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule

from tasks.checkpoints import load_task, read_checkpoint, recorded_class
from tasks.detection import SSDLiteDetection
from tasks.drawing import label_png
from tasks.evaluation import coco_files, label_files
from tasks.evaluation.coco_map import COCOMeanAveragePrecision, coco_results
from tasks.segmentation import DeepLabV3Segmentation


def load_datamodule(path: Path, **overrides: Any) -> LightningDataModule:
    """The DataModule a checkpoint was trained with (its saved hyper-parameters), with overrides."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("datamodule_hyper_parameters")
    if not saved or "_class_path" not in saved:
        raise ValueError(f"{path}: the checkpoint records no data settings (was it written by tools/train.py?)")
    cls = recorded_class(path, saved, LightningDataModule)
    return cls.load_from_checkpoint(path, weights_only=True, **{k: v for k, v in overrides.items() if v is not None})


def batches(datamodule: LightningDataModule) -> Iterator[tuple[int, Any]]:
    """Validation batches as the trainer would hand them to the task (after the transfer hook)."""
    datamodule.setup("validate")
    for index, batch in enumerate(datamodule.val_dataloader()):
        yield index, datamodule.on_after_batch_transfer(batch, 0)


@torch.no_grad()
def evaluate_detection(
    task: SSDLiteDetection, datamodule: LightningDataModule, out: Path, backend: str
) -> tuple[dict[str, Any], str]:
    """Detections of the val split -> ``detections.json`` -> COCO mAP; (summary, report)."""
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
    summary = coco_files.evaluate_files(gt_path, results_path, backend)
    names = {c["id"]: c["name"] for c in datamodule.categories}
    report = coco_files.format_report(summary, names) + f"\n\nwrote {len(results)} detections to {results_path}"
    return summary, report


@torch.no_grad()
def evaluate_segmentation(
    task: DeepLabV3Segmentation, datamodule: LightningDataModule, out: Path
) -> tuple[dict[str, Any], str]:
    """Label maps of the val split -> palette PNGs -> mIoU; (numbers, report)."""
    labels_dir = out / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    stems = []
    for index, batch in batches(datamodule):
        for image_id, labels in zip(batch["image_ids"], task.predict_step(batch, index)):
            label_png(labels.numpy()).save(labels_dir / f"{image_id}.png")
            stems.append(image_id)
    dataset = datamodule.val_dataset
    names = list(datamodule.class_names)
    metric = label_files.evaluate_folders(
        dataset.mask_dir, labels_dir, task.hparams.num_classes, datamodule.ignore_index, names, stems
    )
    report = label_files.format_report(metric, names) + f"\n\nwrote {len(stems)} label maps to {labels_dir}"
    return label_files.as_json(metric), report


def evaluate_checkpoint(
    path: Path, out: Path, data_root: str | None = None, num_workers: int = 0, backend: str = "auto"
) -> tuple[dict[str, Any], str]:
    """(metrics, report) of a checkpoint of either task on its validation split, predictions in ``out``.

    The metrics are those ``tools/eval_coco.py --json`` (per-class table aside) or
    ``tools/eval_miou.py --json`` print. Raises ``ValueError`` / ``FileNotFoundError`` naming
    the file for a checkpoint or dataset that cannot be used.
    """
    task = load_task(path, (SSDLiteDetection, DeepLabV3Segmentation))
    overrides: dict[str, Any] = {"root": data_root, "num_workers": num_workers}
    if isinstance(task, SSDLiteDetection):
        overrides["persistent_workers"] = num_workers > 0
    datamodule = load_datamodule(path, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(task, SSDLiteDetection):
        summary, report = evaluate_detection(task, datamodule, out, backend)
        # The same keys as eval_coco.py --json, per-class table aside.
        return {key: value for key, value in summary.items() if key != "per_class"}, report
    return evaluate_segmentation(task, datamodule, out)
