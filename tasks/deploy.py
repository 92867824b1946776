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
"""

from __future__ import annotations

import copy
from typing import Literal, TypeVar

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
