"""Evaluate a trained checkpoint on its dataset's validation split, writing the predictions too.

What ``tools/test.py`` does, in three steps:

1. rebuild the task and the DataModule the checkpoint was trained with (the data settings saved
   in it; ``data_root`` points them at another copy of the data);
2. run Lightning's validation loop (``Trainer.validate``): the task's own validation step and
   metric, so the numbers are the ones ``tools/train.py validate --ckpt_path`` logs. Beside it,
   :class:`PredictionFiles` passes every batch through the task's ``predict_step`` (the same
   network outputs and post-processing the metric scores) and writes the predictions:
   detection ``OUT/detections.json`` (COCO results format), segmentation one palette PNG of
   predicted labels per image in ``OUT/labels/``;
3. score the written predictions as the standalone evaluators do (``tools/eval_coco.py``:
   COCOeval against the same ground truth; ``tools/eval_miou.py``: one confusion matrix against
   the ground-truth masks) for the per-class tables, check they agree with the validation
   loop, and write the numbers to ``OUT/metrics.json``.

The functions return the numbers and the report to print, so the tools (``tools/test.py``,
``tools/demo.py``) only print. Nothing here depends on the task's type: the task's public
methods (``predict_step``, ``label_names``) and the DataModule's ``dataset_info()`` are enough.
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor
from tqdm import tqdm

from tasks.checkpoints import load_task, read_checkpoint, recorded_class
from tasks.data.constants import VOC_IGNORE_INDEX
from tasks.data.contract import DatasetInfo, DescribesData
from tasks.drawing import label_png
from tasks.evaluation import coco_files, label_files
from tasks.evaluation.coco_map import COCOMeanAveragePrecision, coco_results, evaluate_detections
from tasks.evaluation.miou import MeanIoU

METRICS_FILE = "metrics.json"
# The validation loop logs float32 numbers; the files are scored in float64.
AGREEMENT_TOLERANCE = 1e-5


def load_datamodule(path: str | Path, **overrides: Any) -> LightningDataModule:
    """The DataModule a checkpoint was trained with (its saved hyper-parameters), with overrides.

    Overrides that are None, or that the DataModule does not take, are left out.

    Raises:
        ValueError, FileNotFoundError: naming the file: no data settings in the checkpoint, or
            (without a ``root`` override) the data folder it names is gone.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("datamodule_hyper_parameters")
    if not saved or "_class_path" not in saved:
        raise ValueError(f"{path}: the checkpoint records no data settings (was it written by tools/train.py?)")
    cls = recorded_class(path, saved, LightningDataModule)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {key: value for key, value in overrides.items() if value is not None and key in accepted}
    root = saved.get("root")
    if "root" not in kwargs and root is not None and not Path(root).exists():
        raise FileNotFoundError(
            f"{root}: the data folder saved in {path} is not there; pass --data-root DIR to use a copy of the data"
        )
    return cls.load_from_checkpoint(path, weights_only=True, **kwargs)


class PredictionFiles(Callback):
    """Writes the task's predictions of each validation batch while ``Trainer.validate`` runs
    (or, without a Trainer, those given to :meth:`begin`, :meth:`add` and :meth:`end`: an
    exported file's, :mod:`tasks.evaluation.exported`).

    The predictions are those the validation step scored (its return value; the task's
    ``predict_step`` for a task whose validation step returns nothing):
    per image a dict with ``boxes`` (absolute xyxy in the original image), ``scores`` and
    ``labels`` (detection), or a label map ``Int64Tensor[H, W]`` of the unpadded image
    (segmentation; a dict with ``labels`` is accepted too). Detections are collected and written
    as ``out/detections.json`` when validation ends (labels to COCO category ids by the same
    metric class validation uses: a label without a category id is dropped and reported, as
    there); label maps are written as ``out/labels/<image id>.png`` as they come, and counted
    against the batch's masks cropped to the image (pixels labelled 255, the data contract's
    "no label", are ignored).

    Args:
        out: the folder to write into.
        progress: show a progress bar over the batches (stderr).
    """

    def __init__(self, out: Path, *, progress: bool = True) -> None:
        self.out = Path(out)
        self.progress = progress
        self.info: DatasetInfo | None = None
        self.detections: COCOMeanAveragePrecision | None = None
        self.confusion: MeanIoU | None = None
        self.class_names: list[str] = []
        self.label_maps: list[str] = []
        self.results: list[dict[str, Any]] = []
        self._bar: tqdm | None = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, DescribesData):
            raise TypeError(f"{type(datamodule).__name__} has no dataset_info(): it cannot say how to write predictions")
        total = sum(trainer.num_val_batches) if trainer.num_val_batches else None
        total = int(total) if total is not None and math.isfinite(total) else None
        self.begin(datamodule.dataset_info(), pl_module.label_names(), total)

    def begin(self, info: DatasetInfo, class_names: Sequence[str], total: int | None = None) -> None:
        """Start a pass over the data described by ``info`` (``total`` batches, for the bar)."""
        self.info = info
        self.class_names = list(class_names)
        self._bar = tqdm(total=total, desc="test", unit="batch", file=sys.stderr, disable=not self.progress)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # The validation step's own predictions (what the metric scored), as predict_step gives them.
        self.add(batch, outputs if outputs is not None else pl_module.predict_step(batch, batch_idx))

    def add(self, batch: Mapping[str, Any], predictions: Sequence[Any]) -> None:
        """Count and write one batch's predictions (see the class docs for their format)."""
        if predictions and isinstance(predictions[0], Mapping) and "boxes" in predictions[0]:
            self._add_detections(batch, predictions)
        else:
            self._add_label_maps(batch, predictions)
        if self._bar is not None:
            self._bar.update(1)

    def _add_detections(self, batch: Mapping[str, Any], predictions: Sequence[Mapping[str, Tensor]]) -> None:
        if self.detections is None:
            assert self.info is not None
            self.detections = COCOMeanAveragePrecision(label_to_category_id=self.info.label_to_category_id)
        kept = [{key: prediction[key].cpu() for key in ("boxes", "scores", "labels")} for prediction in predictions]
        self.detections.update(list(batch["image_ids"]), kept)

    def _add_label_maps(self, batch: Mapping[str, Any], predictions: Sequence[Any]) -> None:
        folder = self.out / "labels"
        if self.confusion is None:
            folder.mkdir(parents=True, exist_ok=True)
            self.confusion = MeanIoU(len(self.class_names), ignore_index=VOC_IGNORE_INDEX, class_names=self.class_names)
        for image_id, prediction, mask in zip(batch["image_ids"], predictions, batch["masks"]):
            labels = (prediction["labels"] if isinstance(prediction, Mapping) else prediction).cpu()
            height, width = labels.shape
            label_png(labels.numpy().astype(np.uint8)).save(folder / f"{image_id}.png")
            self.confusion.update(labels, mask[:height, :width].cpu())
            self.label_maps.append(str(image_id))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.end()

    def end(self) -> None:
        """Close the pass: write ``detections.json`` (detection)."""
        if self._bar is not None:
            self._bar.close()
        if self.detections is not None:
            self.results = coco_results(self.detections.results()[1])
            (self.out / "detections.json").write_text(json.dumps(self.results))

    def score(self, backend: str = "auto") -> tuple[dict[str, Any], str]:
        """(metrics, report) of the written predictions, as the standalone evaluators give them.

        Detection: COCOeval of ``detections.json`` against the validation ground truth
        (``tools/eval_coco.py --json`` without its per-class list; the per-class AP is in the
        report); segmentation: ``tools/eval_miou.py --json``'s mIoU, pixel accuracy and
        per-class IoU.
        """
        if self.detections is not None:
            assert self.info is not None
            ground_truth = self.info.coco_ground_truth["val"]
            summary = evaluate_detections(ground_truth, self.results, backend=backend)
            names = {category["id"]: category["name"] for category in ground_truth.loadCats(ground_truth.getCatIds())}
            report = coco_files.format_report(summary, names)
            report += f"\n\nwrote {len(self.results)} detections to {self.out / 'detections.json'}"
            return {key: value for key, value in summary.items() if key != "per_class"}, report
        if self.confusion is None:
            raise ValueError("the validation split is empty: nothing was predicted")
        report = label_files.format_report(self.confusion, self.class_names)
        report += f"\n\nwrote {len(self.label_maps)} label maps to {self.out / 'labels'}"
        return label_files.as_json(self.confusion), report


def disagreements(metrics: Mapping[str, Any], validated: Mapping[str, float], stage: str = "val") -> list[str]:
    """``"val/AP 0.1234 (files 0.1230)"`` for each number the validation loop logged differently
    from the scores of the written files (beyond float32 rounding)."""
    found = []
    for key, value in metrics.items():
        logged = validated.get(f"{stage}/{key}")
        if isinstance(value, (int, float)) and logged is not None and abs(float(logged) - value) > AGREEMENT_TOLERANCE:
            found.append(f"{stage}/{key} {float(logged):.4f} (files {value:.4f})")
    return found


def evaluate_checkpoint(
    path: str | Path,
    out: str | Path,
    data_root: str | None = None,
    num_workers: int = 0,
    backend: str = "auto",
    *,
    accelerator: str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, Any], str]:
    """(metrics, report) of a checkpoint of either task on its validation split; the predictions
    and ``metrics.json`` (the metrics) are written into ``out``.

    The metrics are those ``tools/eval_coco.py --json`` (per-class list aside) or
    ``tools/eval_miou.py --json`` print for the written files, and equal what the validation loop
    logs (a warning says so when they do not).

    Raises:
        ValueError, FileNotFoundError: naming the file, for a checkpoint or data that cannot be
            used; a missing data file says to pass ``--data-root`` when none was given.
    """
    path, out = Path(path), Path(out)
    task = load_task(path)
    datamodule = load_datamodule(path, root=data_root, num_workers=num_workers, persistent_workers=num_workers > 0)
    out.mkdir(parents=True, exist_ok=True)
    writer = PredictionFiles(out, progress=progress)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,  # PredictionFiles shows one on stderr: stdout stays the report
        enable_model_summary=False,
        callbacks=[writer],
    )
    try:
        (validated,) = trainer.validate(task, datamodule=datamodule, verbose=False)
    except FileNotFoundError as error:
        if data_root is not None:
            raise
        raise FileNotFoundError(f"{error}; if the data has moved, pass --data-root DIR") from error
    metrics, report = writer.score(backend)
    for line in disagreements(metrics, validated):
        warnings.warn(f"{path}: the validation loop and the written predictions disagree: {line}", stacklevel=2)
    shown = {key: value for key, value in validated.items() if key.removeprefix("val/") not in metrics}
    headline = next((f"val/{key}" for key in metrics if f"val/{key}" in validated), None)
    if headline is not None:
        shown = {headline: validated[headline], **shown}
    loop = ", ".join(f"{key} {float(value):.4f}" for key, value in shown.items())
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    report += f"\nwrote the metrics to {metrics_path}\nvalidation loop (as tools/train.py validate logs it): {loop}"
    return metrics, report
