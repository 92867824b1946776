"""Post-training static quantisation (INT8) of an exported ONNX file with ONNX Runtime, QDQ format.

The MobileNetV2 paper chose ReLU6 "because of its robustness when used with low-precision
computation" (section 3.1); this module makes the phone's INT8 model from a float export
(:mod:`tasks.deploy`) with ONNX Runtime's maintained quantiser, no hand-written kernels:

1. :func:`calibration_images`: N training images (or a folder of images) through the task's own
   validation preprocessing (``task.network_input``: detection's SSD resize, segmentation's full
   resolution), as float32 ``[1, 3, H, W]`` pixels in 0..255, what the exported file takes;
2. :func:`quantize`: ONNX Runtime's pre-processing (``quant_pre_process``: shape inference and
   graph optimisation; BatchNorm is already folded by the export), then ``quantize_static``:
   QDQ format, weights ``int8`` per output channel (symmetric), activations ``uint8`` calibrated
   on the images (min/max, entropy or percentile). The file keeps the float file's metadata
   (class names, input size, normalisation...) and says how it was quantised (``quantization``);
3. :func:`parity` and :func:`check_parity`: the INT8 file against the float file, both in ONNX
   Runtime, on held-out images: matched detections and their box and score differences, or
   pixel agreement of the label maps, and the two sizes on disk.

What is quantised and what stays float (:data:`QUANTIZED_OP_TYPES`, :func:`quantized_nodes`):

* quantised: every convolution of the backbone and the heads (weights and input / output
  activations), with its ReLU6 (``Clip``) or ReLU, which ONNX Runtime removes: the activation's
  calibrated range becomes the convolution's output range, so ReLU6 fuses into the INT8
  convolution; and the residual additions of the inverted residual blocks, so a block runs in
  INT8 from end to end;
* float, the input normalisation (``(x - mean) / std`` of 0..255 pixels): the first
  convolution's input is quantised right after it, and the file keeps taking plain pixels;
* float, detection's post-processing: the head's reshapes and concatenation of the six levels
  (one INT8 scale for all levels would cost the small ones their precision), the score softmax,
  the box decoding (``exp`` of the size deltas turns one INT8 step into a relative size error),
  top-k and NMS (ranking and IoU need float precision; ONNX Runtime has no INT8 NMS);
* float, segmentation's upsampling of the logits to the input size and the argmax: the
  classifier's output is dequantised before them (interpolated in INT8, the logits would be
  rounded again and tie where the float ones do not), and the image-pooling branch's global
  mean and broadcast (one value per channel: nothing to gain);
* float, any other layer: ONNX Runtime runs it between a ``DequantizeLinear`` and a
  ``QuantizeLinear``.

Activations are ``uint8`` (``--activations``, default): on this VNNI CPU (AVX512-VNNI, AMD EPYC)
ONNX Runtime's u8s8 kernels are the fast path, and ``int8`` activations measured no more
accurate (see the README's export section for the numbers).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper
from lightning.pytorch import LightningModule
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from tasks import deploy
from tasks.data.files import read_rgb
from tasks.inference import DEFAULT_MAX_SIZE

# The calibrators offered (ONNX Runtime's): the observed min / max, the range that minimises the
# KL divergence of the INT8 histogram from the float one (TensorRT's "entropy"), or the
# 99.999th percentile of the absolute values (outliers clipped).
CALIBRATORS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
ACTIVATION_TYPES: dict[str, QuantType] = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Ops quantised when they belong to the network's body (see the module docs).
QUANTIZED_OP_TYPES: tuple[str, ...] = ("Conv", "Clip", "Relu", "Add")
# ONNX node names follow the exported wrapper's module paths: ``/network/backbone/...`` and
# ``/network/head/...`` are the body; ``/network/normalize/...``, the post-processing (traced in
# the wrapper's own scope, ``/...``) and segmentation's final ``/network/Resize`` are not.
BODY_SCOPES: tuple[str, ...] = ("/network/backbone/", "/network/head/")
# Images run through ONNX Runtime per calibration step: bounds the memory of the intermediate
# outputs the calibrator keeps (every quantised tensor of every image in the step).
CALIBRATION_STEP = 16
# The parity report: float detections scoring at least this are compared (near-tied low scores
# of the 0.001 threshold reorder under any perturbation); a match has the same image and label
# and IoU >= 0.5 (COCO's loosest).
PARITY_MIN_SCORE = 0.3
PARITY_MIN_IOU = 0.5
PARITY_IMAGES = 32
# check_parity's default limit on the share of float detections found / pixels labelled alike:
# below it the INT8 file is broken, not merely less accurate (measure its accuracy with
# tools/test.py FILE.onnx). The briefly trained full-width demo models measure 94-100% (detection)
# and 97-99% (segmentation) with each calibrator.
MIN_AGREEMENT = 0.9


def int8_file_name(path: Path) -> Path:
    """Where the INT8 file of the float file ``path`` goes: ``model.onnx`` -> ``model.int8.onnx``."""
    return path.with_suffix(".int8.onnx")


def training_image_files(checkpoint: Path, data_root: str | None = None) -> list[Path]:
    """The image files of the training split a checkpoint was trained on (its saved data
    settings; ``data_root`` points them at another copy of the data)."""
    from tasks.evaluation.checkpoint import load_datamodule  # Lightning's Trainer: only when needed

    datamodule = load_datamodule(checkpoint, root=data_root, num_workers=0, persistent_workers=False)
    dataset = datamodule.train_dataloader().dataset
    return [dataset.image_path(index) for index in range(len(dataset))]


def split_images(
    paths: Sequence[Path], count: int, held_out: int = PARITY_IMAGES
) -> tuple[list[Path], list[Path]]:
    """(``count`` calibration images, up to ``held_out`` other images for the parity report),
    spread evenly over ``paths`` (deterministic, and covering a set sorted by name or id).

    Held-out images are the calibration images themselves when no other image is left.

    Raises:
        ValueError: ``count`` below 1, or no images.
    """
    if count < 1:
        raise ValueError(f"calibration needs at least one image, got {count} (--calibration-images)")
    if not paths:
        raise ValueError("no calibration images found")
    chosen = _spread(len(paths), count)
    taken = set(chosen)
    rest = [index for index in range(len(paths)) if index not in taken]
    others = [rest[index] for index in _spread(len(rest), held_out)] if rest else chosen[:held_out]
    return [paths[index] for index in chosen], [paths[index] for index in others]


def _spread(total: int, count: int) -> list[int]:
    """``min(count, total)`` distinct indices of ``range(total)``, evenly spaced."""
    if total == 0 or count < 1:
        return []
    return sorted(set(np.linspace(0, total - 1, min(count, total)).round().astype(int).tolist()))


def calibration_images(
    task: LightningModule, images: Sequence[str | Path | np.ndarray], *, max_size: int | None = DEFAULT_MAX_SIZE
) -> list[np.ndarray]:
    """Images as the exported file takes them: validation's preprocessing (``task.network_input``),
    float32 ``[1, 3, H, W]`` RGB in 0..255.

    Args:
        task: the trained task (``tasks.checkpoints.load_task``).
        images: image files or RGB ``uint8[H, W, 3]`` arrays.
        max_size: segmentation: longest side of an image (larger ones are scaled down), as
            ``tools/predict.py``.

    Raises:
        ValueError: no images (calibration needs at least one); a file that cannot be read
            (naming it).
    """
    if len(images) == 0:
        raise ValueError("calibration needs at least one image, got 0 (--calibration-images)")
    batches = []
    for image in images:
        array = read_rgb(image) if isinstance(image, (str, Path)) else image
        batches.append(task.network_input(array, max_size=max_size).numpy().astype(np.float32)[None])
    return batches


class _Images(CalibrationDataReader):
    """The calibration images, one ``{"images": [1, 3, H, W]}`` feed at a time; ``set_range``
    lets ``quantize_static`` calibrate in steps (``CalibStridedMinMax``, any calibrator)."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = list(images)
        self.set_range(0, len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter(self.images[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._feeds, None)
        return None if image is None else {"images": image}


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to quantise: :data:`QUANTIZED_OP_TYPES` in :data:`BODY_SCOPES`."""
    return [
        node.name for node in model.graph.node if node.op_type in QUANTIZED_OP_TYPES and node.name.startswith(BODY_SCOPES)
    ]


def quantize(
    float_path: Path,
    out: Path,
    images: Sequence[np.ndarray],
    *,
    calibrator: str = "minmax",
    activations: Literal["uint8", "int8"] = "uint8",
    fine_tuning: Mapping[str, Any] | None = None,
) -> None:
    """Write the INT8 (QDQ) version of the float ONNX file ``float_path`` to ``out``.

    Args:
        float_path: an export of :func:`tasks.deploy.export_onnx`.
        out: the INT8 file.
        images: calibration images (:func:`calibration_images`).
        calibrator: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (:data:`CALIBRATORS`).
        activations: ``"uint8"`` or ``"int8"`` activations (weights are always int8 per channel).
        fine_tuning: how ``float_path``'s weights were fine-tuned for INT8, if they were
            (:func:`tasks.qat.finetune`'s report), kept in the file's metadata.

    Raises:
        ValueError: no calibration images, an unknown calibrator, or a file without the
            network's layers (not an export of this project).
    """
    if len(images) == 0:
        raise ValueError("calibration needs at least one image, got 0 (--calibration-images)")
    if calibrator not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {calibrator!r}: choose one of {', '.join(CALIBRATORS)}")
    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"unknown activation type {activations!r}: choose one of {', '.join(ACTIVATION_TYPES)}")
    float_model = onnx.load(str(float_path))
    with tempfile.TemporaryDirectory(prefix="mobiledense-int8-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        nodes = quantized_nodes(onnx.load(str(prepared)))
        if not nodes:
            scopes = " or ".join(BODY_SCOPES)
            raise ValueError(f"{float_path}: no convolution under {scopes}: not an export of tasks.deploy")
        # ONNX Runtime's histograms need equal shapes within a step: one image per step when
        # sizes differ (segmentation at full resolution); its step must divide the count.
        same_size = len({image.shape for image in images}) == 1
        step = max(d for d in range(1, CALIBRATION_STEP + 1) if len(images) % d == 0) if same_size else 1
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their settings
            quantize_static(
                str(prepared),
                str(out),
                _Images(images),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                nodes_to_quantize=nodes,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=ACTIVATION_TYPES[activations],
                calibrate_method=CALIBRATORS[calibrator],
                extra_options={"CalibStridedMinMax": step},  # despite its name: steps for every calibrator
            )
    model = onnx.load(str(out))
    del model.graph.value_info[:]  # quant_pre_process's shape annotations: ONNX Runtime infers them again
    drop_zero_bias_zero_points(model)
    metadata = {prop.key: prop.value for prop in float_model.metadata_props}
    metadata["quantization"] = json.dumps(
        {
            "format": "QDQ",
            "weights": "int8, per output channel",
            "activations": activations,
            "calibrator": calibrator,
            "calibration_images": len(images),
            "float": "input normalisation, detection post-processing, segmentation upsampling and argmax",
            **({"quantization_aware_fine_tuning": dict(fine_tuning)} if fine_tuning else {}),
        }
    )
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(out))


def drop_zero_bias_zero_points(model: onnx.ModelProto) -> int:
    """Remove the INT32 zero points of the quantised biases (all zeros, one per output channel)
    from ``model``'s ``DequantizeLinear`` nodes; return how many were removed.

    ONNX Runtime's quantiser writes them although an absent zero point means 0: they are 3% of
    the full-width SSDLite's INT8 file (0.10 of its 3.8 MB). ONNX Runtime fuses the convolutions
    into the same ``QLinearConv`` kernels without them, and the outputs are bit-identical.
    """
    tensors = {tensor.name: tensor for tensor in model.graph.initializer}
    removed = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3 or node.input[2] not in tensors:
            continue
        zero_point = tensors[node.input[2]]
        if zero_point.data_type == onnx.TensorProto.INT32 and not numpy_helper.to_array(zero_point).any():
            removed.add(node.input[2])
            del node.input[2]
    still_used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name not in removed or tensor.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(removed)


def _batches(images: Sequence[np.ndarray], size: int = 8) -> list[np.ndarray]:
    """Images of equal size stacked into batches of ``size`` (others alone)."""
    if len({image.shape for image in images}) == 1:
        return [np.concatenate(images[start : start + size]) for start in range(0, len(images), size)]
    return list(images)


def parity(float_path: Path, int8_path: Path, images: Sequence[np.ndarray], *, threads: int = 2) -> dict[str, Any]:
    """The INT8 file against the float file on ``images`` (both in ONNX Runtime).

    Returns:
        ``images``; detection after NMS: ``float_detections`` (float detections scoring at
        least :data:`PARITY_MIN_SCORE`), ``int8_detections`` (the same for INT8),
        ``detections_matched`` (share of the float ones INT8 finds: same image and label, IoU
        >= :data:`PARITY_MIN_IOU`), ``box_mean_abs_diff`` / ``box_max_abs_diff`` (pixels of the
        network input, matched pairs) and ``score_mean_abs_diff`` / ``score_max_abs_diff``;
        segmentation: ``pixel_agreement_share``; other outputs: ``<name>_max_abs_diff``. Then
        ``float_file_bytes``, ``int8_file_bytes`` and ``int8_size_vs_float_share``.
    """
    names = json.loads(deploy.read_metadata(float_path).get("outputs", "[]"))
    batches = _batches(images)
    run_float, run_int8 = (deploy.load_runner(path, "onnx", threads) for path in (float_path, int8_path))
    expected, actual = [run_float(batch) for batch in batches], [run_int8(batch) for batch in batches]
    report: dict[str, Any] = {"images": len(images)}
    if tuple(names) == deploy.DETECTION_OUTPUTS:
        report.update(_detection_parity(expected, actual, [len(batch) for batch in batches]))
    elif tuple(names) in (("labels",), ("logits",)):
        agree = [(_labels(want[0]) == _labels(got[0])).ravel() for want, got in zip(expected, actual)]
        report["pixel_agreement_share"] = float(np.concatenate(agree).mean())
    else:  # raw heads or logits of another kind: how far each output moved
        for index, name in enumerate(names):
            moved = [float(np.abs(want[index] - got[index]).max()) for want, got in zip(expected, actual)]
            report[f"{name}_max_abs_diff"] = max(moved)
    float_bytes, int8_bytes = Path(float_path).stat().st_size, Path(int8_path).stat().st_size
    report.update(float_file_bytes=float_bytes, int8_file_bytes=int8_bytes)
    report["int8_size_vs_float_share"] = int8_bytes / float_bytes
    return report


def _labels(output: np.ndarray) -> np.ndarray:
    """Label maps of a ``labels`` [N, H, W] or ``logits`` [N, K, H, W] output."""
    return output.argmax(axis=1) if output.ndim == 4 else output


def _detection_parity(
    expected: Sequence[Sequence[np.ndarray]], actual: Sequence[Sequence[np.ndarray]], sizes: Sequence[int]
) -> dict[str, Any]:
    """Matched detections and their differences (see :func:`parity`), over all batches."""

    def joined(batches: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        offsets = np.cumsum([0, *sizes[:-1]])
        parts = [list(batch) for batch in batches]
        for part, offset in zip(parts, offsets):
            part[3] = part[3] + offset  # image index over the whole set
        return [np.concatenate([part[k] for part in parts]) for k in range(4)]

    # Confident float detections, looked for among all INT8 ones: a score that crosses the
    # threshold, or an NMS that keeps the neighbour of a box, is not a missing detection.
    everything, got = joined(expected), joined(actual)
    want = [array[everything[1] >= PARITY_MIN_SCORE] for array in everything]
    report: dict[str, Any] = {"float_detections": len(want[1])}
    report["int8_detections"] = int((got[1] >= PARITY_MIN_SCORE).sum())
    if len(want[1]) == 0:
        report["detections_matched"] = 1.0 if len(got[1]) == 0 else 0.0
        return report
    found = deploy.detection_matches(want, got, min_iou=PARITY_MIN_IOU, score_tolerance=None)
    matched = found >= 0
    report["detections_matched"] = float(matched.mean())
    if matched.any():
        boxes = np.abs(want[0][matched] - got[0][found[matched]])
        scores = np.abs(want[1][matched] - got[1][found[matched]])
        report.update(
            box_mean_abs_diff=float(boxes.mean()),
            box_max_abs_diff=float(boxes.max()),
            score_mean_abs_diff=float(scores.mean()),
            score_max_abs_diff=float(scores.max()),
        )
    return report


def check_parity(
    report: dict[str, Any], path: Path | str = "the INT8 file", *, min_agreement: float = MIN_AGREEMENT
) -> None:
    """Refuse an INT8 file that disagrees with its float model beyond quantisation noise.

    Args:
        report: :func:`parity`'s.
        path: the INT8 file, for the message.
        min_agreement: the least share of the float model's confident detections the INT8 file
            finds (detection), or of pixels it labels alike (segmentation).

    Raises:
        ValueError: one line naming ``path``, when the share is below ``min_agreement``.
    """
    advice = "a wrong calibration set? try --calibrator percentile or more --calibration-images"
    matched = report.get("detections_matched")
    if matched is not None and matched < min_agreement:
        raise ValueError(
            f"{path}: only {100 * matched:.1f}% of the float model's {report['float_detections']} detections "
            f"(score >= {PARITY_MIN_SCORE}) found by INT8, at least {100 * min_agreement:.0f}% expected; {advice}"
        )
    agreement = report.get("pixel_agreement_share")
    if agreement is not None and agreement < min_agreement:
        raise ValueError(
            f"{path}: only {100 * agreement:.2f}% of the pixels labelled as the float model labels them, "
            f"at least {100 * min_agreement:.0f}% expected; {advice}"
        )
