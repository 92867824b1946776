"""Evaluate an exported ONNX file (float or INT8) on a validation split with the training metrics.

What ``tools/test.py MODEL.onnx --data CHECKPOINT_OR_CONFIG`` does, so the accuracy of the file
that ships is measured, not assumed:

1. the DataModule of a checkpoint (its saved data settings) or of a training config gives the
   validation batches: validation's own preprocessing (detection's SSD resize, segmentation's
   full resolution padded to the batch), nothing resized here;
2. ONNX Runtime runs the file on each batch (its ``images`` input takes the same 0..255 pixels
   the networks take), and :func:`tasks.deploy.file_predictions` puts its outputs in the frame
   validation reports;
3. :class:`~tasks.evaluation.checkpoint.PredictionFiles` scores them with the metric classes
   validation uses (COCO mAP, mIoU) and writes the same files as for a checkpoint
   (``detections.json`` or ``labels/``, and ``metrics.json``).

A float export of a checkpoint therefore scores what the checkpoint scores (to float rounding),
and an INT8 file's loss is the difference of the two numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule

from tasks import deploy
from tasks.evaluation.checkpoint import METRICS_FILE, PredictionFiles, load_datamodule

CONFIG_SUFFIXES = (".yaml", ".yml")


def data_for(source: str | Path, data_root: str | None = None, num_workers: int = 0) -> LightningDataModule:
    """The DataModule of a checkpoint (its saved data settings) or of a training config (its
    ``data`` section); ``data_root`` points either at another copy of the data.

    Raises:
        ValueError, FileNotFoundError: naming the file.
    """
    source = Path(source)
    if source.suffix.lower() in CONFIG_SUFFIXES:
        from tasks.configs import instantiate_config  # LightningCLI: only for a config

        overrides = [f"--data.num_workers={num_workers}"] + ([f"--data.root={data_root}"] if data_root else [])
        return instantiate_config(source, overrides)[1]
    return load_datamodule(source, root=data_root, num_workers=num_workers, persistent_workers=num_workers > 0)


def evaluate_exported(
    path: str | Path,
    data: str | Path,
    out: str | Path,
    data_root: str | None = None,
    num_workers: int = 0,
    backend: str = "auto",
    *,
    threads: int = 2,
    progress: bool = True,
) -> tuple[dict[str, Any], str]:
    """(metrics, report) of the ONNX file ``path`` on the validation split of ``data`` (a
    checkpoint or a config, see :func:`data_for`); the predictions and ``metrics.json`` are
    written into ``out``, as :func:`tasks.evaluation.checkpoint.evaluate_checkpoint` writes them.

    Raises:
        ValueError, FileNotFoundError: naming the file: not an ONNX export of this project (no
            metadata), outputs that are not predictions (``--raw``), or a detection file whose
            input size differs from the data's.
    """
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found")
    metadata = deploy.read_metadata(path)
    if "outputs" not in metadata or "class_names" not in metadata:
        raise ValueError(f"{path}: no class names or outputs in its metadata: export it with tools/export.py")
    output_names = json.loads(metadata["outputs"])
    datamodule = data_for(data, data_root, num_workers)
    datamodule.setup("validate")
    info = datamodule.dataset_info()
    input_size = json.loads(metadata["input_size"]) if metadata.get("input_size", "dynamic") != "dynamic" else None
    if input_size is not None and info.image_size is not None and list(input_size) != [info.image_size] * 2:
        raise ValueError(
            f"{path}: takes {input_size[1]}x{input_size[0]} images but the data of {data} is resized to "
            f"{info.image_size}x{info.image_size}; export at that size (--input-size) or use matching data settings"
        )
    run = deploy.load_runner(path, "onnx", threads)
    loader = datamodule.val_dataloader()
    out.mkdir(parents=True, exist_ok=True)
    writer = PredictionFiles(out, progress=progress)
    writer.begin(info, json.loads(metadata["class_names"]), len(loader))
    for batch in loader:
        images = batch["images"]
        outputs = run(images.float().numpy())
        writer.add(batch, deploy.file_predictions(output_names, outputs, tuple(images.shape[-2:]), batch["image_sizes"]))
    writer.end()
    metrics, report = writer.score(backend)
    metrics_path = out / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, f"{report}\nwrote the metrics to {metrics_path}"
