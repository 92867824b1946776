"""Tensor-in, tensors-out wrappers of the two networks, for ONNX / TorchScript export.

Exported graphs take ``images`` as Float[N, 3, H, W] *normalised* with ImageNet's mean and std
(what the training pipelines feed) and have a dynamic batch. Their outputs:

* :class:`ExportableDetector` with post-processing: ``boxes`` [D, 4] xyxy in input pixels,
  ``scores`` [D], ``labels`` [D] (contiguous, 1-based) and ``batch_index`` [D] (which image);
  without: ``cls_logits`` [N, A, C], ``bbox_regression`` [N, A, 4] and ``anchors`` [A, 4]
  (normalised xyxy; decode with weights (10, 10, 5, 5)).
* :class:`ExportableSegmenter`: ``labels`` Int64[N, H, W] or ``logits`` [N, K, H, W].

:func:`optimize_for_inference` prepares either network for eager / TorchScript inference: every
BatchNorm folded into the convolution before it (:func:`fuse_conv_bn`; ONNX Runtime folds them
itself) and weights in channels-last memory format.

:func:`export_onnx` and :func:`export_torchscript` write a wrapper to a file;
:func:`load_runner` runs such a file again (ONNX Runtime or ``torch.jit.load``), numpy in and
out. ``tools/export.py`` and ``tools/benchmark.py`` both use them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tasks.detection import SSDLite
from tasks.segmentation import Segmenter

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DETECTION_OUTPUTS = ("boxes", "scores", "labels", "batch_index")
RAW_DETECTION_OUTPUTS = ("cls_logits", "bbox_regression", "anchors")


class ExportableDetector(nn.Module):
    """SSDLite as a graph: raw head tensors, or detections after NMS for the whole batch."""

    def __init__(self, model: SSDLite, *, postprocess: bool = True) -> None:
        super().__init__()
        self.model = model
        self.postprocess = postprocess

    @property
    def output_names(self) -> tuple[str, ...]:
        return DETECTION_OUTPUTS if self.postprocess else RAW_DETECTION_OUTPUTS

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images)
        if not self.postprocess:
            return tuple(outputs[name] for name in RAW_DETECTION_OUTPUTS)
        sizes = images.new_tensor(images.shape[-2:]).expand(images.shape[0], 2)  # boxes in input pixels
        return self.model.head.detections(outputs, sizes)


class ExportableSegmenter(nn.Module):
    """Mobile DeepLabv3 as a graph: per-pixel labels (argmax) or logits at the input size."""

    def __init__(self, model: Segmenter, *, output: Literal["labels", "logits"] = "labels") -> None:
        super().__init__()
        if output not in ("labels", "logits"):
            raise ValueError(f"output must be 'labels' or 'logits', got {output!r}")
        self.model = model
        self.output = output

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.output,)

    def forward(self, images: Tensor) -> tuple[Tensor]:
        logits = self.model(images)["logits"]
        return (logits.argmax(dim=1) if self.output == "labels" else logits,)


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

    Outputs equal ``model.eval()``'s up to float rounding; on a 2-core CPU this halves SSDLite's
    and DeepLabv3's latency (``python tools/benchmark.py --only models``). Inputs may stay NCHW.
    """
    return fuse_conv_bn(model).to(memory_format=torch.channels_last)


def onnx_opset() -> int:
    """The newest opset both the installed ``onnx`` and torch's TorchScript-based exporter know."""
    import onnx
    from torch.onnx import _constants

    return min(onnx.defs.onnx_opset_version(), _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def export_onnx(module: nn.Module, example: Tensor, path: Path, dynamic_size: bool) -> None:
    """Trace ``module`` (a wrapper with ``output_names``) on ``example`` into an ONNX file.

    The input is named ``images`` with a dynamic batch, and dynamic height and width when
    ``dynamic_size`` (segmentation; detection's anchors fix its input size).
    """
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


def export_torchscript(module: nn.Module, example: Tensor, path: Path) -> None:
    """Trace ``module`` on ``example`` and save it as a TorchScript file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))


def load_runner(path: Path, export_format: str, threads: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Run the exported file: images in, list of numpy outputs out."""
    if export_format == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images})
    scripted = torch.jit.load(str(path)).eval()

    def run_scripted(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in scripted(torch.from_numpy(images))]

    return run_scripted
