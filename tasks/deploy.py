"""Tensor-in, tensors-out wrappers of the two networks for ONNX / TorchScript export, and the checks.

Exported graphs take ``images``: Float[N, 3, H, W] RGB in 0..255 (the networks normalise with
ImageNet's mean and std inside, :class:`tasks.networks.Normalize`), with a dynamic batch (and,
for segmentation, dynamic height and width). Their outputs:

* :class:`ExportableDetector` with post-processing: ``boxes`` [D, 4] xyxy in input pixels,
  ``scores`` [D], ``labels`` [D] (contiguous, 1-based) and ``batch_index`` [D] (which image);
  without: ``cls_logits`` [N, A, C], ``bbox_regression`` [N, A, 4] and ``anchors`` [A, 4]
  (normalised xyxy; decode with weights (10, 10, 5, 5)).
* :class:`ExportableSegmenter`: ``labels`` Int64[N, H, W] or ``logits`` [N, K, H, W].

Every file carries what a deployment needs to feed it and read it (:meth:`metadata`, as
ultralytics and timm exports do): ``task``, ``class_names`` (a JSON list by label),
``input_size`` (``[H, W]``, or ``"dynamic"``), ``input_format``, ``mean`` and ``std`` (RGB,
0..1 scale), ``outputs``. ONNX keeps them in the model's ``metadata_props``
(``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``); TorchScript in the
extra file ``metadata.json`` (``torch.jit.load(path, _extra_files={"metadata.json": ""})``).
:func:`read_metadata` reads either.

:func:`optimize_for_inference` prepares either network for eager / TorchScript inference: every
BatchNorm folded into the convolution before it (:func:`fuse_conv_bn`; ONNX Runtime folds them
itself) and weights in channels-last memory format.

:func:`export` writes a wrapper to a file (:func:`export_onnx`, :func:`export_torchscript`);
:func:`load_runner` runs such a file again (ONNX Runtime or ``torch.jit.load``), numpy in and
out; :func:`verify` compares it with eager PyTorch and :func:`parity_report` prints the
comparison. ``tools/export.py`` and the benchmark use them.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.ops import box_iou

from backbones import IMAGENET_MEAN, IMAGENET_STD
from tasks.networks import Normalize, Segmenter, SSDLite
from tasks.timing import timed_runs

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "batch_index")
RAW_DETECTION_OUTPUTS = ("cls_logits", "bbox_regression", "anchors")
# File extensions of each format (ultralytics writes .torchscript; PyTorch's docs use .pt).
EXTENSIONS: dict[str, tuple[str, ...]] = {"onnx": (".onnx",), "torchscript": (".pt", ".ts", ".torchscript")}
TORCHSCRIPT_METADATA = "metadata.json"
# Segmentation exports are traced at this square size unless told otherwise (height and width
# stay dynamic): the paper's VOC evaluation size.
SEGMENTATION_EXAMPLE_SIZE = 513


def input_metadata(network: nn.Module) -> dict[str, str]:
    """How ``network`` wants its images, from the network itself: ``input_format``, ``mean``, ``std``.

    A network with a :class:`~tasks.networks.Normalize` layer takes 0..255 pixels and says
    which statistics it applies; one without takes images already normalised with ImageNet's.
    """
    normalize = next((module for module in network.modules() if isinstance(module, Normalize)), None)
    if normalize is not None:
        mean = [round(v / 255, 6) for v in normalize.mean.flatten().tolist()]
        std = [round(v / 255, 6) for v in normalize.std.flatten().tolist()]
        layout = "RGB float32 [N, 3, H, W], 0..255, normalised inside the model ((x / 255 - mean) / std)"
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        layout = "RGB float32 [N, 3, H, W], normalised before the model: (x / 255 - mean) / std"
    return {"input_format": layout, "mean": json.dumps(mean), "std": json.dumps(std)}


class ExportableDetector(nn.Module):
    """SSDLite as a graph: raw head tensors, or detections after NMS for the whole batch.

    Args:
        network: the detector.
        postprocess: NMS inside the graph (detections out) or the raw head tensors.
        class_names: names by label (index 0 the background), for the file's metadata.
    """

    def __init__(self, network: SSDLite, *, postprocess: bool = True, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.network = network
        self.postprocess = postprocess
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(network.num_classes)]

    @property
    def output_names(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS if self.postprocess else RAW_DETECTION_OUTPUTS

    def metadata(self) -> dict[str, str]:
        """The file's metadata (see the module docs); ``input_size`` is the network's."""
        size = int(self.network.image_size)
        return {
            "task": "detection",
            "class_names": json.dumps(self.class_names),
            "input_size": json.dumps([size, size]),
            **input_metadata(self.network),
            "outputs": json.dumps(list(self.output_names)),
        }

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outputs = self.network(images)
        if not self.postprocess:
            return tuple(outputs[name] for name in RAW_DETECTION_OUTPUTS)
        sizes = images.new_tensor(images.shape[-2:]).expand(images.shape[0], 2)  # boxes in input pixels
        return self.network.head.detections(outputs, sizes)


class ExportableSegmenter(nn.Module):
    """Mobile DeepLabv3 as a graph: per-pixel labels (argmax) or logits at the input size.

    Args:
        network: the segmenter.
        output: ``"labels"`` or ``"logits"``.
        class_names: names by label, for the file's metadata.
    """

    def __init__(
        self, network: Segmenter, *, output: Literal["labels", "logits"] = "labels", class_names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        if output not in ("labels", "logits"):
            raise ValueError(f"output must be 'labels' or 'logits', got {output!r}")
        self.network = network
        self.output = output
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(network.num_classes)]

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.output,)

    def metadata(self) -> dict[str, str]:
        """The file's metadata (see the module docs); any input size (fully convolutional)."""
        return {
            "task": "segmentation",
            "class_names": json.dumps(self.class_names),
            "input_size": "dynamic",
            **input_metadata(self.network),
            "outputs": json.dumps(list(self.output_names)),
        }

    def forward(self, images: Tensor) -> tuple[Tensor]:
        logits = self.network(images)["logits"]
        return (logits.argmax(dim=1) if self.output == "labels" else logits,)


def exportable(
    network: nn.Module,
    class_names: Sequence[str],
    *,
    raw: bool = False,
    output: Literal["labels", "logits"] = "labels",
    input_size: int | None = None,
) -> tuple[nn.Module, Tensor, bool]:
    """(the optimised wrapper to export, an example batch of 0..255 images, whether height and
    width are dynamic) for either network.

    Args:
        network: a detector (:class:`~tasks.networks.SSDLite`) or a segmenter.
        class_names: names by label, for the metadata.
        raw: detection: export the head's raw tensors instead of detections after NMS.
        output: segmentation: ``"labels"`` or ``"logits"``.
        input_size: square side of the example; detection's graph is fixed to it (default the
            network's ``image_size``), segmentation's stays dynamic (default 513).

    Raises:
        ValueError: a network of neither kind.
    """
    if isinstance(network, SSDLite):
        module: nn.Module = ExportableDetector(optimize_for_inference(network), postprocess=not raw, class_names=class_names)
        size, dynamic = input_size or int(network.image_size), False
    elif isinstance(network, Segmenter):
        module = ExportableSegmenter(optimize_for_inference(network), output=output, class_names=class_names)
        size, dynamic = input_size or SEGMENTATION_EXAMPLE_SIZE, True
    else:
        raise ValueError(f"cannot export a {type(network).__name__}: expected an SSDLite or a Segmenter network")
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    return module.eval(), example, dynamic


def check_output_path(path: Path, export_format: str | None) -> str:
    """The export format for ``path``: ``export_format`` if the extension fits it, else from the extension.

    Raises:
        ValueError: naming the file, when the extension does not match ``export_format`` (or no
            format has it).
    """
    suffix = path.suffix.lower()
    by_suffix = next((name for name, suffixes in EXTENSIONS.items() if suffix in suffixes), None)
    if export_format is None and by_suffix is None:
        known = ", ".join(s for suffixes in EXTENSIONS.values() for s in suffixes)
        raise ValueError(f"{path}: unknown extension {suffix or '(none)'}; name the file with one of {known}")
    if export_format is not None and by_suffix != export_format:
        wanted = " or ".join(EXTENSIONS[export_format])
        raise ValueError(f"{path}: --format {export_format} writes {wanted} files; rename the output or change --format")
    return export_format or by_suffix  # type: ignore[return-value]


def fuse_conv_bn(model: ModuleT) -> ModuleT:
    """An inference copy of ``model`` with each Conv2d + BatchNorm2d pair folded into one Conv2d.

    Pairs are consecutive children of one module (``ConvBNAct``, the ASPP branches, the SSDLite
    predictors); the BatchNorm becomes ``nn.Identity``. In eval mode the outputs are unchanged
    up to float rounding, and a third of the layers of MobileNetV2 disappear from the forward.
    The copy is in eval mode and must not be trained; ``model`` itself is left as it was.
    """
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        names = list(module._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return fused


def optimize_for_inference(model: ModuleT) -> ModuleT:
    """An eval-mode copy of ``model`` for inference: BatchNorm folded, weights channels-last.

    Outputs equal ``model.eval()``'s up to float rounding; ``python tools/benchmark.py --only
    models`` measures the gain (its "folded, channels-first" rows). Inputs may stay NCHW.
    """
    return fuse_conv_bn(model).to(memory_format=torch.channels_last)


def onnx_opset() -> int:
    """The newest opset both the installed ``onnx`` and torch's TorchScript-based exporter know."""
    import onnx
    from torch.onnx import _constants

    return min(onnx.defs.onnx_opset_version(), _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def file_metadata(module: nn.Module, example: Tensor, dynamic_size: bool) -> dict[str, str]:
    """``module.metadata()`` (empty for a module without one), its ``input_size`` the traced one
    when the graph's height and width are fixed."""
    metadata = dict(module.metadata()) if callable(getattr(module, "metadata", None)) else {}
    if metadata:
        metadata["input_size"] = "dynamic" if dynamic_size else json.dumps(list(example.shape[-2:]))
    return metadata


def export_onnx(module: nn.Module, example: Tensor, path: Path, dynamic_size: bool) -> None:
    """Trace ``module`` (a wrapper with ``output_names``) on ``example`` into an ONNX file.

    The input is named ``images`` with a dynamic batch, and dynamic height and width when
    ``dynamic_size`` (segmentation; detection's anchors fix its input size). The wrapper's
    :meth:`metadata` goes into the model's ``metadata_props``.
    """
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes read as Python numbers
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=list(module.output_names),
            dynamic_axes={"images": axes},
            opset_version=onnx_opset(),
            dynamo=False,
        )
    metadata = file_metadata(module, example, dynamic_size)
    if metadata:
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, metadata)
        onnx.save(model, str(path))


def export_torchscript(module: nn.Module, example: Tensor, path: Path, dynamic_size: bool = False) -> None:
    """Trace ``module`` on ``example`` and save it as a TorchScript file, the wrapper's
    :meth:`metadata` as the extra file ``metadata.json``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    metadata = file_metadata(module, example, dynamic_size)
    traced.save(str(path), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)} if metadata else None)


def export(module: nn.Module, example: Tensor, path: Path, export_format: str, dynamic_size: bool) -> None:
    """:func:`export_onnx` or :func:`export_torchscript` by ``export_format``."""
    if export_format == "onnx":
        export_onnx(module, example, path, dynamic_size)
    else:
        export_torchscript(module, example, path, dynamic_size)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata an exported file carries (ONNX ``metadata_props`` or TorchScript ``metadata.json``)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
    extra = {TORCHSCRIPT_METADATA: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the format asked for
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA]) if extra[TORCHSCRIPT_METADATA] else {}


def load_runner(path: Path, export_format: str, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Run the exported file: images in, list of numpy outputs out."""
    if export_format == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the format asked for
        scripted = torch.jit.load(str(path)).eval()

    def run_scripted(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in scripted(torch.from_numpy(images))]

    return run_scripted


def median_ms(call: Callable[[], Any], runs: int = 10) -> float:
    """Median latency in milliseconds, after one untimed call."""
    return 1000 * float(np.median(timed_runs(call, runs, warmup=1)))


def detection_matches(
    expected: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    *,
    min_iou: float = 0.99,
    score_tolerance: float | None = 1e-4,
) -> np.ndarray:
    """For each expected detection, the index of the actual one that finds it, or -1.

    Both are ``(boxes, scores, labels, batch_index)`` as the exported detector gives them. A
    match has the same image and label, IoU >= ``min_iou`` and (unless ``score_tolerance`` is
    None) a score within ``score_tolerance``; of several, the one that overlaps most. Compared
    as sets, not row by row: near-tied scores (an untrained network has many) may be ordered
    differently by two runtimes without any detection being different.
    """
    boxes, scores, labels, images = expected
    if len(scores) == 0 or len(actual[1]) == 0:
        return np.full(len(scores), -1, dtype=np.int64)
    same = (labels[:, None] == actual[2][None]) & (images[:, None] == actual[3][None])
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(actual[0])).numpy()
    found = same & (iou >= min_iou)
    if score_tolerance is not None:
        found &= np.abs(scores[:, None] - actual[1][None]) <= score_tolerance
    return np.where(found.any(axis=1), np.where(found, iou, -1.0).argmax(axis=1), -1)


def matched_detections(expected: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> float:
    """Share of PyTorch's detections that the export also finds: same image and label, IoU >= 0.99,
    score within 1e-4 (:func:`detection_matches`)."""
    if len(expected[1]) == 0:
        return 1.0 if len(actual[1]) == 0 else 0.0
    return float(np.mean(detection_matches(expected, actual) >= 0))


def verify(module: nn.Module, run: Callable[[np.ndarray], list[np.ndarray]], images: Tensor) -> dict[str, Any]:
    """Compare the export with eager PyTorch on ``images``; raise if they disagree.

    Returns:
        ``detections`` and ``detections_matched`` (share) for detection after NMS; otherwise
        ``<output>_max_abs_diff`` per float output and ``<output>_mismatch`` (share) per integer one.
    """
    with torch.no_grad():
        expected = [t.numpy() for t in module(images)]
    actual = run(images.numpy())
    report: dict[str, Any] = {}
    if tuple(module.output_names) == DETECTION_OUTPUTS:
        report["detections"] = len(expected[1])
        report["detections_matched"] = matched_detections(expected, actual)
        if report["detections_matched"] < 0.98 or abs(len(actual[1]) - len(expected[1])) > 0.02 * len(expected[1]):
            raise ValueError(
                f"export disagrees with PyTorch: {len(actual[1])} detections, {len(expected[1])} expected, "
                f"{100 * report['detections_matched']:.1f}% matched (an untrained network's near-equal scores "
                "can order differently in two runtimes; --raw exports and checks the heads alone)"
            )
        return report
    for name, want, got in zip(module.output_names, expected, actual):
        if want.shape != got.shape:
            raise ValueError(f"export disagrees with PyTorch: {name} has shape {got.shape}, expected {want.shape}")
        if np.issubdtype(want.dtype, np.integer):
            mismatched = float(np.mean(want != got))
            report[f"{name}_mismatch"] = mismatched
            # Labels of a segmentation argmax may flip where two logits tie to rounding error.
            limit = 1e-3 if name == "labels" and want.ndim == 3 else 0.0
            if mismatched > limit:
                raise ValueError(f"export disagrees with PyTorch: {100 * mismatched:.3f}% of {name} differ")
        else:
            difference = float(np.abs(want - got).max()) if want.size else 0.0
            report[f"{name}_max_abs_diff"] = difference
            if difference > 1e-3 * max(1.0, float(np.abs(want).max()) if want.size else 1.0):
                raise ValueError(f"export disagrees with PyTorch: {name} differs by {difference:.3g}")
    return report


def file_predictions(
    output_names: Sequence[str], outputs: Sequence[np.ndarray], input_size: tuple[int, int], image_sizes: Tensor
) -> list[dict[str, Tensor]]:
    """An exported file's outputs for one batch, per image in the frame validation reports
    (the task's ``predict_step``), so the same metric can score them.

    Args:
        output_names: the file's outputs (its metadata's ``outputs``).
        outputs: what the file returned for the batch.
        input_size: ``(height, width)`` of the batch the file ran on.
        image_sizes: Int64Tensor[N, 2] ``(height, width)`` of the batch's images (the batch's
            ``image_sizes``): detection's original images, segmentation's unpadded ones.

    Returns:
        Detection after NMS: ``boxes`` (absolute xyxy in the original image: the input's pixels
        scaled by image / input, as the network's normalised boxes map onto both), ``scores``,
        ``labels``; segmentation: ``labels`` Int64Tensor[h, w] cropped to the image (the argmax
        of ``logits``).

    Raises:
        ValueError: outputs of neither kind (the raw heads of a ``--raw`` export).
    """
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32).reshape(-1, 2)
    if tuple(output_names) == DETECTION_OUTPUTS:
        boxes, scores, labels, images = (torch.from_numpy(np.asarray(output)) for output in outputs)
        scale = (sizes / torch.tensor(input_size, dtype=torch.float32))[:, [1, 0, 1, 0]]  # (h, w) -> x, y, x, y
        mine = [images == index for index in range(len(sizes))]
        return [
            {"boxes": boxes[rows] * scale[index], "scores": scores[rows], "labels": labels[rows]}
            for index, rows in enumerate(mine)
        ]
    if tuple(output_names) in (("labels",), ("logits",)):
        maps = torch.from_numpy(np.asarray(outputs[0]))
        maps = maps.argmax(dim=1) if maps.ndim == 4 else maps
        return [{"labels": labels[: int(h), : int(w)]} for labels, (h, w) in zip(maps, sizes.tolist())]
    raise ValueError(
        f"outputs {', '.join(output_names)} are not predictions: export detection with its post-processing (without --raw)"
    )


RUNTIMES = {"pytorch": "PyTorch", "onnx": "ONNX Runtime", "torchscript": "TorchScript", "int8": "ONNX Runtime INT8"}


def _percent(share: float) -> str:
    return f"{100 * share:.4g}%"  # 1.0 -> "100%", 0.9973 -> "99.73%"


def parity_report(report: Mapping[str, Any]) -> list[str]:
    """:func:`verify`'s numbers (and ``<runtime>_ms`` latencies) as aligned ``name: value`` lines,
    e.g. ``matched detections: 100%``; also ``<name>_share`` (a percentage), ``<name>_bytes``
    (MB) and ``<name>_mean_abs_diff`` (:func:`tasks.quantization.parity`'s numbers)."""
    rows = []
    for key, value in report.items():
        if key == "detections":
            rows.append(("detections (PyTorch)", str(value)))
        elif key == "detections_matched":
            rows.append(("matched detections", _percent(value)))
        elif key.endswith(("_max_abs_diff", "_mean_abs_diff")):
            name, kind, _, _ = key.rsplit("_", 3)
            rows.append((f"{name} {kind} abs difference", f"{value:.3g}"))
        elif key.endswith("_share"):
            rows.append((key.removesuffix("_share").replace("_", " "), _percent(value)))
        elif key.endswith("_bytes"):
            rows.append((key.removesuffix("_bytes").replace("_", " "), f"{value / 1e6:.2f} MB"))
        elif key.endswith("_mismatch"):
            rows.append((f"{key.removesuffix('_mismatch')} differing", _percent(value)))
        elif key.endswith("_ms"):
            runtime = key.removesuffix("_ms")
            rows.append((f"{RUNTIMES.get(runtime, runtime)} latency", f"{value:.1f} ms"))
        else:
            rows.append((key.replace("_", " "), str(value)))
    width = max((len(name) for name, _ in rows), default=0)
    return [f"{name:>{width}}: {value}" for name, value in rows]
