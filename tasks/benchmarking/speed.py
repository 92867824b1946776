"""Inference speed of our networks beside torchvision's, each timed with the same treatment.

A row is one model under one treatment:

* ``folded``: :func:`tasks.deploy.optimize_for_inference` (every BatchNorm folded into the
  convolution before it, weights channels-last, eval mode), as ``tasks.deploy`` prepares exports.
  Ours always run so; torchvision's too, so that the ratios compare architectures, not set-ups
  (the folding works on torchvision's ``Conv2dNormActivation`` blocks unchanged).
* ``as shipped``: torchvision's model in eval mode and nothing else, as users download it.

Each row is measured in a fresh interpreter (:func:`run_models`), so caches and the peak resident
memory of one model do not leak into the next. Columns: parameters and multiply-adds (of the
unfolded network, as the paper counts), the network alone at batch 1 (detection: without
post-processing), eager PyTorch at batch 1 and 8 (detection: with score threshold, top-k and
NMS), ``torch.compile`` at batch 1 (with how many graphs it compiled) and ONNX Runtime at batch
1 and 8. Weights are random: trained weights are not downloaded here.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tasks.timing import latency_stats, timed_runs

ROOT = Path(__file__).resolve().parents[2]

FOLDED = "folded"
AS_SHIPPED = "as shipped"

# Ours come from the paper configs (built one way: tasks.configs), at torchvision's input sizes;
# detection keeps up to 300 detections per image, as torchvision's SSDLite.
OURS: dict[str, tuple[Path, int, tuple[str, ...]]] = {
    "ours_ssdlite_mobilenetv2": (
        ROOT / "configs" / "ssdlite_mobilenetv2_coco.yaml", 320,
        ("--model.network.image_size=320", "--model.network.detections_per_image=300"),
    ),
    "ours_deeplabv3_mobilenetv2": (ROOT / "configs" / "deeplabv3_mobilenetv2_voc.yaml", 512, ()),
}  # fmt: skip
TORCHVISION_SIZES = {
    "tv_ssdlite320_mobilenet_v3_large": 320,
    "tv_lraspp_mobilenet_v3_large": 512,
    "tv_deeplabv3_mobilenet_v3_large": 512,
}
ROWS: tuple[tuple[str, str], ...] = (
    ("ours_ssdlite_mobilenetv2", FOLDED),
    ("tv_ssdlite320_mobilenet_v3_large", FOLDED),
    ("tv_ssdlite320_mobilenet_v3_large", AS_SHIPPED),
    ("ours_deeplabv3_mobilenetv2", FOLDED),
    ("tv_lraspp_mobilenet_v3_large", FOLDED),
    ("tv_lraspp_mobilenet_v3_large", AS_SHIPPED),
    ("tv_deeplabv3_mobilenet_v3_large", FOLDED),
    ("tv_deeplabv3_mobilenet_v3_large", AS_SHIPPED),
)
# (ours, torchvision's model for the same job): the ratios of the report.
PAIRS: tuple[tuple[str, str], ...] = (
    ("ours_ssdlite_mobilenetv2", "tv_ssdlite320_mobilenet_v3_large"),
    ("ours_deeplabv3_mobilenetv2", "tv_lraspp_mobilenet_v3_large"),
    ("ours_deeplabv3_mobilenetv2", "tv_deeplabv3_mobilenet_v3_large"),
)


@dataclass
class Contender:
    """A model to time: eval-mode module, input side, the timed call and a batch of its inputs."""

    model: nn.Module
    size: int
    call: Callable[[nn.Module, Tensor], Any]
    images: Callable[[int, int], Tensor]  # (batch, side) -> random images in the range the model expects
    is_detector: bool


def _pixels(batch: int, size: int) -> Tensor:
    """RGB 0..255, what our networks take (they normalise inside: issue #13's contract)."""
    return torch.rand(batch, 3, size, size) * 255


def _unit(batch: int, size: int) -> Tensor:
    """RGB 0..1, what torchvision's detectors take (their transform normalises)."""
    return torch.rand(batch, 3, size, size)


def _normalised(batch: int, size: int) -> Tensor:
    """Normalised images, what torchvision's segmenters take."""
    return torch.randn(batch, 3, size, size)


def _forward(model: nn.Module, images: Tensor) -> Any:
    return model(images)


def _detect(model: nn.Module, images: Tensor) -> Any:
    return model.detect(images)


def build(name: str) -> Contender:
    """The model ``name`` in eval mode, as its builder makes it (random weights)."""
    if name in OURS:
        from tasks.configs import instantiate_config

        config, size, overrides = OURS[name]
        model = instantiate_config(config, overrides)[0].network.eval()
        is_detector = name.endswith("ssdlite_mobilenetv2")
        return Contender(model, size, _detect if is_detector else _forward, _pixels, is_detector)
    if name not in TORCHVISION_SIZES:
        raise ValueError(f"unknown model {name}; choose from {', '.join([*OURS, *TORCHVISION_SIZES])}")
    import torchvision.models.detection as tvdet
    import torchvision.models.segmentation as tvseg

    size = TORCHVISION_SIZES[name]
    if name == "tv_ssdlite320_mobilenet_v3_large":
        model = tvdet.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
        return Contender(model, size, _forward, _unit, True)
    model = getattr(tvseg, name.removeprefix("tv_"))(weights=None, weights_backbone=None, aux_loss=False).eval()
    return Contender(model, size, _forward, _normalised, False)


def apply_treatment(model: nn.Module, treatment: str) -> nn.Module:
    """``model`` as a row times it: :data:`FOLDED` (an optimised copy) or :data:`AS_SHIPPED` (itself, eval)."""
    if treatment == AS_SHIPPED:
        return model.eval()
    if treatment == FOLDED:
        from tasks.deploy import optimize_for_inference

        return optimize_for_inference(model)
    raise ValueError(f"treatment must be {FOLDED!r} or {AS_SHIPPED!r}, got {treatment!r}")


class RawOutputs(nn.Module):
    """A network's tensors without post-processing, for counting and timing the network alone:
    our dicts' tensors; torchvision's SSD backbone + head (no transform, no NMS)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if hasattr(self.model, "anchor_generator"):  # torchvision SSD: backbone + head, no transform
            outputs = self.model.head(list(self.model.backbone(images).values()))
            return outputs["cls_logits"], outputs["bbox_regression"]
        outputs = self.model(images)
        if "cls_logits" in outputs:
            return outputs["cls_logits"], outputs["bbox_regression"], outputs["anchors"]
        return (outputs["out"] if "out" in outputs else outputs["logits"],)


class TorchvisionDetections(nn.Module):
    """torchvision's SSD end to end (transform, network, per-image NMS) as an exportable graph:
    the detections of all images concatenated, ``batch_index`` saying whose (as ours export)."""

    output_names = ("boxes", "scores", "labels", "batch_index")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        detections = self.model(list(images))  # traced: the loop over images unrolls, fixing the batch
        index = [torch.full_like(d["labels"], i) for i, d in enumerate(detections)]
        outputs = tuple(torch.cat([d[key] for d in detections]) for key in ("boxes", "scores", "labels"))
        return (*outputs, torch.cat(index))


def onnx_runners(
    name: str, contender: Contender, folder: Path, threads: int
) -> dict[int, Callable[[np.ndarray], Any]]:
    """Export ``contender`` through :mod:`tasks.deploy` (as ``tools/export.py``) and return ONNX Runtime
    calls for batch 1 and 8. Ours and torchvision's segmenters export once with a dynamic batch;
    torchvision's SSD (a Python loop over images) once per batch size."""
    from tasks.deploy import ExportableDetector, ExportableSegmenter, export_onnx, load_runner

    model = contender.model
    if name in OURS:
        wrapper: nn.Module = (
            ExportableDetector(model) if contender.is_detector else ExportableSegmenter(model, output="logits")
        )
    elif contender.is_detector:
        wrapper = TorchvisionDetections(model)
    else:
        wrapper = RawOutputs(model)
        wrapper.output_names = ("out",)
    batches = (1, 8) if isinstance(wrapper, TorchvisionDetections) else (1,)
    runners = {}
    for batch in batches:
        path = folder / f"{name}_b{batch}.onnx"
        export_onnx(wrapper.eval(), contender.images(batch, contender.size), path, dynamic_size=False)
        runners[batch] = load_runner(path, "onnx", threads)
    return {1: runners[1], 8: runners.get(8, runners[1])}


def compiled_call(
    call: Callable[[nn.Module, Tensor], Any], model: nn.Module, backend: str = "inductor"
) -> Callable[[Tensor], Any]:
    """``torch.compile`` of the call that is timed (detection: ``detect``, post-processing included),
    not of the module object: compiling the module and then calling ``.detect`` on what
    ``torch.compile`` returned runs the original, uncompiled network."""
    return torch.compile(functools.partial(call, model), backend=backend)


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_model(
    name: str, treatment: str, runs: int, warmup: int, threads: int, use_compile: bool, use_onnx: bool,
    size: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Measure one row in this process (:func:`run_models` runs each in a fresh one).

    ``size`` replaces the model's input side (the tests run small); torchvision's SSD resizes
    every input to 320 itself.
    """
    from tasks.complexity import count

    torch.set_num_threads(threads)
    contender = build(name)
    contender.size = size or contender.size
    counted = RawOutputs(contender.model) if name.startswith("tv_ssdlite") else contender.model
    counts = count(counted, contender.size)  # before folding: the paper counts BatchNorm parameters
    contender.model = apply_treatment(contender.model, treatment)
    model, call, size = contender.model, contender.call, contender.size
    row: dict[str, Any] = {"model": name, "treatment": treatment, "input": size}
    row.update(params=counts["params"], madds=counts["madds"])
    one, eight = contender.images(1, size), contender.images(8, size)
    batch_runs = max(1, runs // 4)
    folder = tempfile.TemporaryDirectory()
    # Export before any eager run: anchors cached under inference_mode cannot be traced.
    runners = onnx_runners(name, contender, Path(folder.name), threads) if use_onnx else None
    with torch.inference_mode():
        if contender.is_detector:
            network = RawOutputs(model)
            row["network_b1"] = latency_stats(timed_runs(lambda: network(one), runs, warmup), 1)
        row["eager_b1"] = latency_stats(timed_runs(lambda: call(model, one), runs, warmup), 1)
        row["eager_b8"] = latency_stats(timed_runs(lambda: call(model, eight), batch_runs, min(warmup, 1)), 8)
    if use_compile:
        row.update(bench_compiled(call, model, one, runs, warmup))
    if runners is not None:
        row["onnx_b1"] = latency_stats(timed_runs(lambda: runners[1](one.numpy()), runs, warmup), 1)
        row["onnx_b8"] = latency_stats(timed_runs(lambda: runners[8](eight.numpy()), batch_runs, min(warmup, 1)), 8)
    folder.cleanup()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def bench_compiled(
    call: Callable[[nn.Module, Tensor], Any], model: nn.Module, images: Tensor, runs: int, warmup: int,
    backend: str = "inductor",
) -> dict[str, Any]:  # fmt: skip
    """``compile_b1`` timings and ``compile_graphs``; an error entry instead when compilation
    fails or compiles no graph (then the timings would be eager ones under another name)."""
    before = compiled_graphs()
    try:
        compiled = compiled_call(call, model, backend)
        with torch.inference_mode():
            times = timed_runs(lambda: compiled(images), runs, warmup + 2)
    except Exception as error:  # compile support varies by model and platform
        return {"compile_b1": {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}}
    graphs = compiled_graphs() - before
    if graphs == 0:
        return {"compile_b1": {"error": "torch.compile compiled no graph"}, "compile_graphs": 0}
    return {"compile_b1": latency_stats(times, 1), "compile_graphs": graphs}


# Runs one row in a fresh interpreter and prints it as JSON on its last line.
_CHILD = (
    "import json, sys; from tasks.allocator import keep_freed_memory; keep_freed_memory(); "
    "from tasks.benchmarking.speed import bench_model; "
    "print(json.dumps(bench_model(**json.loads(sys.argv[1]))))"
)


def run_models(
    rows: Sequence[tuple[str, str]], runs: int, warmup: int, threads: int, use_compile: bool, use_onnx: bool,
    size: int | None = None, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`bench_model` for each (model, treatment) row, each in a fresh interpreter."""
    results = []
    for name, treatment in rows:
        options = {"name": name, "treatment": treatment, "runs": runs, "warmup": warmup, "threads": threads,
                   "use_compile": use_compile, "use_onnx": use_onnx, "size": size}  # fmt: skip
        log(f"  {name} ({treatment}) ...")
        command = [sys.executable, "-c", _CHILD, json.dumps(options)]
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"benchmark of {name} ({treatment}) failed:\n{output.stderr[-2000:]}")
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    return results
