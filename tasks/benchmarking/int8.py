"""INT8 rows of the benchmark (issue 15): float and INT8 ONNX files of ours and torchvision's models,
quantised one way and timed in one run.

``python tools/benchmark.py --only int8`` runs :func:`run_int8` on four models, each built by the
synthetic configs (:func:`tasks.configs.instantiate_config`, as ``tools/train.py`` builds them):

* ``ours_ssdlite_mobilenetv2``: the synthetic detection config's SSDLite-MobileNetV2;
* ``tv_ssdlite320_mobilenet_v3_large``: torchvision's SSDLite (:class:`~tasks.networks.TorchvisionSSDLite`)
  as the ablation trains it (its ``"torchvision"`` variant's overrides of the same config);
* ``ours_deeplabv3_mobilenetv2``: the synthetic segmentation config's Mobile DeepLabv3;
* ``tv_lraspp_mobilenet_v3_large``: torchvision's LR-ASPP (:class:`~tasks.networks.TorchvisionLRASPP`)
  on the same config.

Each model gets the same treatment:

1. weights: random (the config's seed), or a trained task's (``weights``: a ``task.state_dict()``
   file such as the ablation's ``runs/ablation/<variant>/seed0/step400.pt``, or a Lightning
   checkpoint of the same config). Random detectors score every box alike and flood NMS (with
   ``score_threshold`` 0.001 every candidate survives), so their detection timings include the
   worst-case post-processing: prefer trained weights for the detection rows;
2. a float ONNX file written by :mod:`tasks.deploy` (BatchNorm folded; detection with its
   post-processing inside, segmentation with the argmax inside, dynamic batch);
3. its INT8 file from :func:`tasks.quantization.quantize` (ONNX Runtime, QDQ, per-channel int8
   weights, uint8 activations), calibrated on the same images for both models of a task: the
   validation preprocessing (``task.network_input``) of ``calibration_images`` training images;
4. both files timed in ONNX Runtime with the same threads, interleaved: every round runs each of
   the eight files once (the order reversed every other round) so a neighbour's load on a shared
   CPU falls on all of them; batch 1 (latency, ``runs`` rounds) and batch 8 (throughput, a quarter
   of the rounds), medians after untimed warm-up rounds (:mod:`tasks.timing`). Detection runs on
   held-out training images (its cost depends on what the boxes score), segmentation on random
   pixels at ``segmentation_size`` (its cost does not);
5. the float-vs-INT8 parity report (:func:`tasks.quantization.parity`) on held-out images, the
   two sizes on disk, and, for trained weights, the validation AP / mIoU of both files with the
   exported-model evaluator (:func:`tasks.evaluation.exported.evaluate_exported`, what
   ``tools/test.py MODEL.onnx --data CONFIG`` runs).

torchvision's SSDLite has no exportable post-processing of its own in :mod:`tasks.deploy` (its
``postprocess_detections`` loops over images and classes): :class:`ExportableTorchvisionSSDLite`
runs the same steps loop-free over the batch (:func:`torchvision_detections`), so its file takes
any batch, as ours does, and :mod:`tasks.quantization` finds its layers under the same scopes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD

from heads.detection_postprocess import nms_detections
from tasks import deploy, quantization
from tasks.benchmarking.training_speed import ROOT, SYNTHETIC_CONFIGS
from tasks.networks import TorchvisionSSDLite
from tasks.timing import latency_stats

SECTION = "int8"
OURS_DETECTOR = "ours_ssdlite_mobilenetv2"
TV_DETECTOR = "tv_ssdlite320_mobilenet_v3_large"  # the name tasks.benchmarking.speed gives it
OURS_SEGMENTER = "ours_deeplabv3_mobilenetv2"
TV_SEGMENTER = "tv_lraspp_mobilenet_v3_large"
BATCHES = (1, 8)  # latency at batch 1, throughput at batch 8
SEGMENTATION_SIZE = 512  # torchvision's segmentation size, as the models section times them
CALIBRATION_IMAGES = 256  # as tools/export.py --int8
METRICS = {"detection": "AP", "segmentation": "mIoU"}  # AP@[.5:.95] (COCO), mean IoU
COLUMNS = (
    "model", "float ms b1", "int8 ms b1", "float img/s b8", "int8 img/s b8", "int8/float speed-up",
    "float MB", "int8 MB", "int8 size %",
)  # fmt: skip


@dataclass(frozen=True)
class Int8Model:
    """One row: a synthetic config's task (``detection`` or ``segmentation``) with ``overrides``."""

    name: str
    task: Literal["detection", "segmentation"]
    overrides: tuple[str, ...] = ()


def _torchvision_detector_overrides() -> tuple[str, ...]:
    """The ablation's ``"torchvision"`` variant: its SSDLite on the synthetic detection config."""
    from tasks.benchmarking.ablation import VARIANTS

    return next(variant.overrides for variant in VARIANTS if variant.name == "torchvision")


MODELS: tuple[Int8Model, ...] = (
    Int8Model(OURS_DETECTOR, "detection"),
    Int8Model(TV_DETECTOR, "detection", _torchvision_detector_overrides()),
    Int8Model(OURS_SEGMENTER, "segmentation"),
    Int8Model(TV_SEGMENTER, "segmentation", ("--model.network=tasks.networks.TorchvisionLRASPP",)),
)
MODEL_NAMES = tuple(model.name for model in MODELS)


@dataclass
class Int8Options:
    """What :func:`run_int8` measures; the defaults are ``tools/benchmark.py --only int8``'s.

    Attributes:
        weights: model name -> trained weights (a ``task.state_dict()`` file or a Lightning
            checkpoint of that model's config); the others run with random weights.
        calibration_images: training images to calibrate on.
        parity_images: other training images, held out for the parity report and the detection timings.
        calibrator: ``minmax``, ``entropy`` or ``percentile`` (:data:`tasks.quantization.CALIBRATORS`).
        segmentation_size: square side the segmenters are timed at.
        threads: ONNX Runtime intra-op threads (and torch's while exporting).
        runs: timed rounds at batch 1 (batch 8: a quarter of them, at least one).
        warmup: untimed rounds at batch 1 (batch 8: at most one).
        out: folder of the ONNX files (kept: their sizes are the report's) and of the evaluations.
        data_roots: ``detection`` / ``segmentation`` -> the synthetic data's folder (default: the configs').
        overrides: model name -> more config overrides (the tests shrink the models).
        qat_steps: with trained weights, also fine-tune a copy for this many steps with fake
            quantisation (:func:`tasks.qat.finetune`, as ``tools/export.py --qat-steps``) and
            score its INT8 file beside the post-training one (0: no QAT).
    """

    weights: Mapping[str, Path] = field(default_factory=dict)
    calibration_images: int = CALIBRATION_IMAGES
    parity_images: int = quantization.PARITY_IMAGES
    calibrator: str = "minmax"
    segmentation_size: int = SEGMENTATION_SIZE
    threads: int = 2
    runs: int = 30
    warmup: int = 5
    out: Path = ROOT / "runs" / "int8"
    data_roots: Mapping[str, Path] = field(default_factory=dict)
    overrides: Mapping[str, Sequence[str]] = field(default_factory=dict)
    qat_steps: int = 0


# ---------------------------------------------------------------------------- torchvision's SSDLite
def torchvision_detections(
    cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, ssd: SSD, input_size: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's ``SSD.postprocess_detections`` for a whole batch, loop-free (exportable with a
    dynamic batch), as flat tensors like :meth:`heads.ssdlite.SSDLiteHead.detections`.

    Its steps: softmax scores; boxes decoded by its box coder against the anchors and clipped to
    the input; per image and class the ``topk_candidates`` best anchors scoring above
    ``score_thresh``; NMS per (image, class) at ``nms_thresh``; the ``detections_per_img`` best
    per image.

    Args:
        cls_logits: ``[N, A, C]`` (background first); bbox_regression: ``[N, A, 4]``.
        anchors: ``[A, 4]`` absolute xyxy pixels of the input, shared by the batch.
        ssd: torchvision's ``SSD`` (``TorchvisionSSDLite.ssd``): its box coder and thresholds.
        input_size: ``(H, W)`` of the input the boxes are clipped to.

    Returns:
        ``boxes`` [D, 4] xyxy input pixels, ``scores`` [D], ``labels`` [D] in ``1..C-1`` and
        ``batch_index`` [D], ordered by image and, within an image, by descending score.
    """
    batch, num_anchors, num_classes = cls_logits.shape
    scores = cls_logits.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # [N, C-1, A]
    deltas = bbox_regression.float().reshape(-1, 4)
    boxes = ssd.box_coder.decode_single(deltas, anchors.float().repeat(batch, 1)).reshape(batch, num_anchors, 4)
    height, width = input_size
    boxes = torch.stack(
        [boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height), boxes[..., 2].clamp(0, width),
         boxes[..., 3].clamp(0, height)], dim=-1,
    )  # fmt: skip
    k = min(int(ssd.topk_candidates), num_anchors)
    top_scores, anchor_index = scores.topk(k, dim=2)  # [N, C-1, k]: a class's best anchors (its topk)
    candidates = torch.zeros_like(scores).scatter(2, anchor_index, top_scores)  # thresholded by the NMS
    return nms_detections(
        boxes, candidates, score_threshold=ssd.score_thresh, nms_threshold=ssd.nms_thresh,
        detections_per_image=ssd.detections_per_img,
    )  # fmt: skip


class _SSDLayers(nn.Module):
    """:meth:`TorchvisionSSDLite.forward` with its layers under the names :mod:`tasks.quantization`
    quantises (``/network/backbone/...``, ``/network/head/...``; ``/network/normalize`` stays float)."""

    def __init__(self, network: TorchvisionSSDLite) -> None:
        super().__init__()
        self.normalize = network.normalize
        self.backbone = network.ssd.backbone
        self.head = network.ssd.head
        self.anchor_generator = network.ssd.anchor_generator  # no weights: default boxes from sizes

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = self.normalize(images)
        features = list(self.backbone(x).values())
        outputs = self.head(features)
        (anchors,) = self.anchor_generator(ImageList(x, [tuple(x.shape[-2:])]), features)
        return {**outputs, "anchors": anchors}


class ExportableTorchvisionSSDLite(nn.Module):
    """:class:`TorchvisionSSDLite` as :class:`tasks.deploy.ExportableDetector` exports ours: 0..255
    pixels in, ``boxes``, ``scores``, ``labels``, ``batch_index`` out (input pixels), dynamic batch,
    the same metadata. Same detections as ``network.detect`` (see :func:`torchvision_detections`).

    Args:
        network: torchvision's SSDLite behind our contract (fold it first:
            :func:`tasks.deploy.optimize_for_inference`).
        class_names: names by label (index 0 the background), for the metadata.
    """

    output_names = deploy.DETECTION_OUTPUTS

    def __init__(self, network: TorchvisionSSDLite, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.network = _SSDLayers(network)
        # Not a submodule (its layers are the ones above): the box coder and the thresholds.
        object.__setattr__(self, "ssd", network.ssd)
        self.image_size = int(network.image_size)
        self.class_names = [str(i) for i in range(network.num_classes)] if class_names is None else list(class_names)

    def metadata(self) -> dict[str, str]:
        """:meth:`tasks.deploy.ExportableDetector.metadata` for this network."""
        size = self.image_size
        return {
            "task": "detection",
            "class_names": json.dumps(self.class_names),
            "input_size": json.dumps([size, size]),
            **deploy.input_metadata(self.network),
            "outputs": json.dumps(list(self.output_names)),
        }

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outputs = self.network(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))  # fixed: the anchors fix the input size
        logits, deltas, anchors = outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"]
        return torchvision_detections(logits, deltas, anchors, self.ssd, size)


# ---------------------------------------------------------------------------- models and files
def build_model(
    model: Int8Model, options: Int8Options
) -> tuple[LightningModule, LightningDataModule]:
    """The task (with ``options.weights[model.name]`` loaded, if given, in eval mode) and the
    DataModule (set up) of ``model``'s synthetic config; the task knows the data's class names."""
    from tasks.configs import instantiate_config

    overrides = [*model.overrides, *options.overrides.get(model.name, ()), "--data.num_workers=0"]
    root = options.data_roots.get(model.task)
    if root is not None:
        overrides.append(f"--data.root={root}")
    task, datamodule = instantiate_config(SYNTHETIC_CONFIGS[model.task], overrides)
    datamodule.setup("fit")
    info = datamodule.dataset_info()
    task.class_names = {int(label): str(name) for label, name in (info.class_names or {}).items()}
    task.label_to_category_id = {int(k): int(v) for k, v in (info.label_to_category_id or {}).items()}
    task.check_data(info, "fit")  # detection: the labels the data uses
    path = options.weights.get(model.name)
    if path is not None:
        load_weights(task, Path(path))
    return task.eval(), datamodule


def load_weights(task: LightningModule, path: Path) -> None:
    """Load a ``task.state_dict()`` file (or a Lightning checkpoint's ``state_dict``) into ``task``.

    Raises:
        ValueError: one line naming ``path``, when its weights do not fit the task's network.
    """
    from tasks.checkpoints import load_weights_only

    state = load_weights_only(path)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a state dict or a Lightning checkpoint")
    try:
        task.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        network = type(task.network).__name__
        raise ValueError(f"{path}: its weights do not fit {network} as configured: {detail}") from None


def exportable_network(task: LightningModule, size: int | None) -> tuple[nn.Module, Tensor, bool]:
    """:func:`tasks.deploy.exportable` of the task's network (``size``: segmentation's traced
    side), or :class:`ExportableTorchvisionSSDLite` for torchvision's SSDLite (BatchNorm folded)."""
    network, names = task.network, task.label_names()
    if isinstance(network, TorchvisionSSDLite):
        module = ExportableTorchvisionSSDLite(deploy.optimize_for_inference(network), names).eval()
        example = torch.rand(2, 3, network.image_size, network.image_size, generator=torch.Generator().manual_seed(0))
        return module, example * 255, False
    return deploy.exportable(network, names, input_size=size)


def training_images(datamodule: LightningDataModule) -> list[Path]:
    """The image files of the training split (what :func:`tasks.quantization.training_image_files`
    reads from a checkpoint's data)."""
    dataset = datamodule.train_dataloader().dataset
    return [dataset.image_path(index) for index in range(len(dataset))]


def stacked(images: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """``batch`` equal-sized ``[1, 3, H, W]`` images as one array (repeated cyclically if too few)."""
    return np.concatenate([images[index % len(images)] for index in range(batch)])


# ---------------------------------------------------------------------------- timing
def interleaved_times(
    calls: Mapping[str, Callable[[], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call in each of ``rounds`` rounds, after ``warmup`` untimed rounds; each
    round runs every call once, in reversed order every other round."""
    import time

    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - start
            if index >= warmup:
                times[name].append(elapsed)
    return times


# ---------------------------------------------------------------------------- the run
def run_int8(
    options: Int8Options, models: Sequence[Int8Model] = MODELS, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Export, quantise, check and time every model (see the module docs).

    Returns:
        ``threads``, ``calibration_images``, ``calibrator``, ``segmentation_size``, ``rounds``
        (per batch) and ``models``: one row each with ``model``, ``task``, ``weights`` (path or
        None), ``input`` (the timed ``[H, W]``), ``float_file`` / ``int8_file`` and their
        ``float_bytes`` / ``int8_bytes``, ``float_b1`` / ``int8_b1`` / ``float_b8`` / ``int8_b8``
        (:func:`tasks.timing.latency_stats`), ``parity`` (:func:`tasks.quantization.parity`) and,
        with trained weights, ``accuracy``: ``{"metric", "float", "int8"}`` (and ``"qat_int8"``, the
        quantisation-aware file's, with ``qat_int8_file`` and ``qat_steps`` in the row, when
        ``options.qat_steps`` is set).

    Raises:
        ValueError: an unknown model name in ``options.weights`` or ``options.overrides``.
    """
    unknown = sorted((set(options.weights) | set(options.overrides)) - {model.name for model in models})
    if unknown:
        raise ValueError(f"unknown INT8 benchmark models {unknown}; choose from {', '.join(m.name for m in models)}")
    torch.set_num_threads(options.threads)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    inputs: dict[str, dict[int, np.ndarray]] = {}
    for model in models:
        log(f"  {model.name}: export, calibrate on {options.calibration_images} training images, quantise ...")
        row, inputs[model.name] = prepare(model, options, out)
        rows.append(row)
    runners = {
        (row["model"], precision): deploy.load_runner(Path(row[f"{precision}_file"]), "onnx", options.threads)
        for row in rows
        for precision in ("float", "int8")
    }
    rounds = {1: options.runs, 8: max(1, options.runs // 4)}
    warmups = {1: options.warmup, 8: min(options.warmup, 1)}
    for batch in BATCHES:
        log(f"  timing batch {batch}: {rounds[batch]} interleaved rounds of {len(runners)} files ...")
        calls = {
            key: (lambda run=run, images=inputs[key[0]][batch]: run(images)) for key, run in runners.items()
        }
        times = interleaved_times(calls, rounds[batch], warmups[batch])
        for row in rows:
            for precision in ("float", "int8"):
                row[f"{precision}_b{batch}"] = latency_stats(times[row["model"], precision], batch)
    for row in rows:
        if row["weights"] is not None:
            log(f"  {row['model']}: {METRICS[row['task']]} of both files on the validation split ...")
            row["accuracy"] = accuracy(row, options, out)
    return {
        "threads": options.threads,
        "calibration_images": options.calibration_images,
        "calibrator": options.calibrator,
        "segmentation_size": options.segmentation_size,
        "rounds": {f"b{batch}": rounds[batch] for batch in BATCHES},
        "models": rows,
    }


def prepare(model: Int8Model, options: Int8Options, out: Path) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """The float and INT8 files of ``model`` in ``out``, their parity, and its timing inputs by batch."""
    task, datamodule = build_model(model, options)
    calibration, held_out = quantization.split_images(
        training_images(datamodule), options.calibration_images, options.parity_images
    )
    float_path = out / f"{model.name}.onnx"
    int8_path = quantization.int8_file_name(float_path)
    size = options.segmentation_size if model.task == "segmentation" else None
    module, example, dynamic = exportable_network(task, size)
    deploy.export_onnx(module, example, float_path, dynamic)
    quantization.quantize(
        float_path, int8_path, quantization.calibration_images(task, calibration), calibrator=options.calibrator
    )
    checks = quantization.calibration_images(task, held_out)
    parity = quantization.parity(float_path, int8_path, checks, threads=options.threads)
    if model.task == "detection":  # what the boxes score drives the post-processing's cost
        timed = {batch: stacked(checks, batch) for batch in BATCHES}
    else:
        generator = torch.Generator().manual_seed(0)
        side = options.segmentation_size
        timed = {batch: (torch.rand(batch, 3, side, side, generator=generator) * 255).numpy() for batch in BATCHES}
    path = options.weights.get(model.name)
    qat_file = None
    if options.qat_steps and path is not None:
        qat_file = quantization_aware_file(task, datamodule, size, calibration, options, out / f"{model.name}.qat.onnx")
    row = {
        "model": model.name,
        "task": model.task,
        "weights": str(path) if path is not None else None,
        "input": list(timed[1].shape[-2:]),
        "float_file": str(float_path),
        "int8_file": str(int8_path),
        "float_bytes": float_path.stat().st_size,
        "int8_bytes": int8_path.stat().st_size,
        "parity": parity,
        **({"qat_int8_file": str(qat_file), "qat_steps": options.qat_steps} if qat_file else {}),
    }
    return row, timed


def quantization_aware_file(
    task: LightningModule,
    datamodule: LightningDataModule,
    size: int | None,
    calibration: Sequence[Path],
    options: Int8Options,
    float_path: Path,
) -> Path:
    """The INT8 file of a copy of ``task`` fine-tuned with fake quantisation (:mod:`tasks.qat`),
    exported and calibrated like the post-training file; ``float_path`` gets its float export."""
    import copy

    from tasks import qat

    tuned = copy.deepcopy(task)
    qat.finetune(tuned, datamodule, options.qat_steps, progress=False)
    module, example, dynamic = exportable_network(tuned, size)
    deploy.export_onnx(module, example, float_path, dynamic)
    int8_path = quantization.int8_file_name(float_path)
    images = quantization.calibration_images(tuned, calibration)
    quantization.quantize(float_path, int8_path, images, calibrator=options.calibrator)
    return int8_path


def accuracy(row: Mapping[str, Any], options: Int8Options, out: Path) -> dict[str, Any]:
    """AP (detection) or mIoU (segmentation) of the row's float and INT8 files on the synthetic
    validation split, by :func:`tasks.evaluation.exported.evaluate_exported`."""
    from tasks.evaluation.exported import evaluate_exported

    metric = METRICS[row["task"]]
    root = options.data_roots.get(row["task"])
    result: dict[str, Any] = {"metric": metric}
    for precision in ("float", "int8", "qat_int8") if "qat_int8_file" in row else ("float", "int8"):
        metrics, _ = evaluate_exported(
            row[f"{precision}_file"], SYNTHETIC_CONFIGS[row["task"]], out / "eval" / f"{row['model']}.{precision}",
            data_root=str(root) if root is not None else None, threads=options.threads, progress=False,
        )  # fmt: skip
        result[precision] = float(metrics[metric])
    return result


# ---------------------------------------------------------------------------- report
def _agreement(parity: Mapping[str, Any]) -> str:
    if parity.get("float_detections") == 0:
        return f"no float detection scores >= {quantization.PARITY_MIN_SCORE}"
    if "detections_matched" in parity:
        return f"{100 * parity['detections_matched']:.1f}% of {parity['float_detections']} detections"
    if "pixel_agreement_share" in parity:
        return f"{100 * parity['pixel_agreement_share']:.2f}% of pixels"
    return "-"


def format_int8(result: Mapping[str, Any]) -> str:
    """Markdown: the speed and size table (:data:`COLUMNS`), then agreement and accuracy."""
    rows = result["models"]
    lines = [
        f"INT8 (ONNX Runtime QDQ: int8 per-channel weights, uint8 activations, {result['calibrator']} calibration "
        f"on {result['calibration_images']} training images) against float ONNX, {result['threads']} threads, "
        f"medians of {result['rounds']['b1']} (batch 1) and {result['rounds']['b8']} (batch 8) interleaved rounds; "
        "speed-up: int8 / float images per second at batch 8; MB = 10^6 bytes on disk.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        speedup = row["int8_b8"]["images_per_s"] / row["float_b8"]["images_per_s"]
        weights = "trained" if row["weights"] else "random weights"
        cells = [
            f"{row['model']} ({row['input'][0]}x{row['input'][1]}, {weights})",
            f"{row['float_b1']['median_ms']:.1f}",
            f"{row['int8_b1']['median_ms']:.1f}",
            f"{row['float_b8']['images_per_s']:.1f}",
            f"{row['int8_b8']['images_per_s']:.1f}",
            f"{speedup:.2f}x",
            f"{row['float_bytes'] / 1e6:.2f}",
            f"{row['int8_bytes'] / 1e6:.2f}",
            f"{100 * row['int8_bytes'] / row['float_bytes']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    qat = next((row["qat_steps"] for row in rows if "qat_steps" in row), None)
    qat_columns = [f"int8 after {qat} QAT steps", "QAT int8 - float"] if qat else []
    lines += [
        "",
        "| " + " | ".join(
            ["model", "INT8 agrees with float (held-out images)", "metric", "float", "int8", "int8 - float", *qat_columns]
        ) + " |",
        "|" + "---|" * (6 + len(qat_columns)),
    ]  # fmt: skip
    for row in rows:
        found = row.get("accuracy")
        numbers = (
            [found["metric"], f"{found['float']:.4f}", f"{found['int8']:.4f}", f"{found['int8'] - found['float']:+.4f}"]
            if found
            else ["-", "-", "-", "- (random weights)"]
        )
        if qat:
            tuned = (found or {}).get("qat_int8")
            numbers += [f"{tuned:.4f}", f"{tuned - found['float']:+.4f}"] if tuned is not None else ["-", "-"]
        lines.append(f"| {row['model']} | {_agreement(row['parity'])} | " + " | ".join(numbers) + " |")
    return "\n".join([*lines, ""])


# ---------------------------------------------------------------------------- tools/benchmark.py
def parse_weights(text: str) -> dict[str, Path]:
    """``"NAME=PATH,NAME=PATH"`` -> ``{NAME: Path(PATH)}`` (``--int8-weights``).

    Raises:
        argparse.ArgumentTypeError: an item without ``=``, an unknown model name or a missing file.
    """
    weights: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or name not in MODEL_NAMES:
            raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=PATH with NAME one of {', '.join(MODEL_NAMES)}")
        if not Path(path).is_file():
            raise argparse.ArgumentTypeError(f"{path}: weights file not found")
        weights[name] = Path(path)
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``int8`` section's options on ``tools/benchmark.py``'s parser (fields of
    :class:`tasks.benchmarking.suite.Options`)."""
    parser.add_argument(
        "--int8-weights", type=parse_weights, default={},
        help=f"int8: trained weights, NAME=PATH[,NAME=PATH] with NAME of {', '.join(MODEL_NAMES)} "
        "(a task.state_dict() file or a checkpoint of the synthetic config; default: the detectors the "
        "models section times, the segmenters random)",
    )  # fmt: skip
    parser.add_argument(
        "--calibration-images", type=int, default=CALIBRATION_IMAGES, help="int8: training images to calibrate on"
    )
    parser.add_argument(
        "--calibrator", choices=list(quantization.CALIBRATORS), default=Int8Options.calibrator,
        help="int8: how activation ranges are calibrated (ONNX Runtime's calibrators)",
    )  # fmt: skip
    parser.add_argument("--int8-out", type=Path, default=Int8Options.out, help="int8: folder of the ONNX files")
    parser.add_argument(
        "--qat-steps", type=int, default=0,
        help="int8: also fine-tune each trained model this many steps with fake quantisation and score its INT8 file",
    )  # fmt: skip
