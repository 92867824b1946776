"""Inference speed of our networks beside torchvision's, each timed with the same treatment.

A row is one model under one treatment:

* ``folded``: :func:`tasks.deploy.optimize_for_inference` (every BatchNorm folded into the
  convolution before it, weights channels-last, eval mode), as ``tasks.deploy`` prepares exports.
  Ours always run so; torchvision's too, so that the ratios compare architectures, not set-ups
  (the folding works on torchvision's ``Conv2dNormActivation`` blocks unchanged).
* ``folded, channels-first``: ours folded but with the weights left channels-first, the row
  that measures what channels-last alone brings.
* ``as shipped``: torchvision's model in eval mode and nothing else, as users download it.

Each row is measured in a fresh interpreter (:func:`run_models`), so caches and the peak resident
memory of one model do not leak into the next. Columns: parameters and multiply-adds (of the
unfolded network, as the paper counts), the network alone at batch 1 (detection: without
post-processing), eager PyTorch at batch 1 and 8 (detection: with score threshold, top-k and
NMS), ``torch.compile`` at batch 1 (with how many graphs it compiled) and ONNX Runtime at batch
1 and 8.

Detection rows time trained detectors on real images (``weights``): with random weights
torchvision's per-class NMS receives up to 27,000 boxes per image, and post-processing time
depends on how many boxes pass the score threshold. The weights are the learning-speed
ablation's step-400 runs of ``ours`` and ``torchvision`` (the synthetic config: 6 classes, 320x320;
:func:`trained_detectors` trains them once into ``runs/ablation``), timed on the synthetic
validation images. Segmentation has no data-dependent post-processing: random weights, random
images. Trained weights cannot be downloaded here.
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
FOLDED_CHANNELS_FIRST = "folded, channels-first"
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
# The synthetic config's validation images (data.root of configs/ssdlite_mobilenetv2_synthetic.yaml).
SYNTHETIC_VALIDATION = ROOT / "data" / "synthetic" / "coco" / "val2017"
# The ablation variant whose trained weights each detection row loads (tasks.benchmarking.ablation).
TRAINED_DETECTORS = {"ours_ssdlite_mobilenetv2": "ours", "tv_ssdlite320_mobilenet_v3_large": "torchvision"}
ROWS: tuple[tuple[str, str], ...] = (
    ("ours_ssdlite_mobilenetv2", FOLDED),
    ("ours_ssdlite_mobilenetv2", FOLDED_CHANNELS_FIRST),
    ("tv_ssdlite320_mobilenet_v3_large", FOLDED),
    ("tv_ssdlite320_mobilenet_v3_large", AS_SHIPPED),
    ("ours_deeplabv3_mobilenetv2", FOLDED),
    ("ours_deeplabv3_mobilenetv2", FOLDED_CHANNELS_FIRST),
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
    images: Callable[[int, int], Tensor]  # (batch, side) -> images in the range the model expects
    is_detector: bool
    classes: int  # logits per anchor or pixel, background included


def _pixels(batch: int, size: int) -> Tensor:
    """RGB 0..255, what our networks take (they normalise inside: issue #13's contract)."""
    return torch.rand(batch, 3, size, size) * 255


def _unit(batch: int, size: int) -> Tensor:
    """RGB 0..1, what torchvision's detectors take (their transform normalises)."""
    return torch.rand(batch, 3, size, size)


def _normalised(batch: int, size: int) -> Tensor:
    """Normalised images, what torchvision's segmenters take."""
    return torch.randn(batch, 3, size, size)


def validation_images(batch: int, size: int) -> Tensor:
    """The first ``batch`` synthetic validation images (COCO-format set of the synthetic config),
    resized to ``size`` x ``size``, RGB 0..255: what the trained detectors are timed on."""
    from torchvision.io import ImageReadMode, read_image
    from torchvision.transforms.v2.functional import resize

    files = sorted(SYNTHETIC_VALIDATION.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{SYNTHETIC_VALIDATION}: no images (training the ablation writes them)")
    images = [read_image(str(files[i % len(files)]), ImageReadMode.RGB) for i in range(batch)]
    return torch.stack([resize(image, [size, size], antialias=True) for image in images]).float()


def _validation_unit(batch: int, size: int) -> Tensor:
    return validation_images(batch, size) / 255


def _forward(model: nn.Module, images: Tensor) -> Any:
    return model(images)


def _detect(model: nn.Module, images: Tensor) -> Any:
    return model.detect(images)


def build(name: str, weights: str | None = None) -> Contender:
    """The model ``name`` in eval mode: random weights as its builder makes them, or a detector
    with the trained ``weights`` of its ablation run (a task state dict), fed validation images."""
    if weights is not None:
        return _trained_detector(name, Path(weights))
    if name in OURS:
        from tasks.configs import instantiate_config

        config, size, overrides = OURS[name]
        model = instantiate_config(config, overrides)[0].network.eval()
        is_detector = name.endswith("ssdlite_mobilenetv2")
        return Contender(model, size, _detect if is_detector else _forward, _pixels, is_detector, model.num_classes)
    if name not in TORCHVISION_SIZES:
        raise ValueError(f"unknown model {name}; choose from {', '.join([*OURS, *TORCHVISION_SIZES])}")
    import torchvision.models.detection as tvdet
    import torchvision.models.segmentation as tvseg

    size = TORCHVISION_SIZES[name]
    if name == "tv_ssdlite320_mobilenet_v3_large":
        model = tvdet.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
        return Contender(model, size, _forward, _unit, True, 91)
    model = getattr(tvseg, name.removeprefix("tv_"))(weights=None, weights_backbone=None, aux_loss=False).eval()
    return Contender(model, size, _forward, _normalised, False, 21)


def _trained_detector(name: str, weights: Path) -> Contender:
    """``name``'s ablation network with ``weights``; torchvision's as its own ``SSD`` object."""
    from tasks.benchmarking.ablation import VARIANTS, build as build_variant
    from tasks.benchmarking.training_speed import SYNTHETIC_CONFIGS

    if name not in TRAINED_DETECTORS:
        raise ValueError(f"trained weights are for the detectors {', '.join(TRAINED_DETECTORS)}, not {name}")
    (variant,) = [v for v in VARIANTS if v.name == TRAINED_DETECTORS[name]]
    task = build_variant(variant, 0, None, SYNTHETIC_CONFIGS["detection"])[0]
    task.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network = task.network.eval()
    if name in OURS:
        network.head.detections_per_image = 300  # torchvision's SSDLite budget, as the paper-config row
        return Contender(network, network.image_size, _detect, validation_images, True, network.num_classes)
    return Contender(network.ssd.eval(), network.image_size, _forward, _validation_unit, True, network.num_classes)


def trained_detectors(ablation_out: Path, log: Callable[[str], None] = print) -> dict[str, str]:
    """The detection rows' weights: the step-400 seed-0 weights of the ablation's ``ours`` and
    ``torchvision`` runs under ``ablation_out``, trained there first when missing (about 20 minutes)."""
    from tasks.benchmarking.ablation import run_ablation

    run_ablation(ablation_out, variants=list(TRAINED_DETECTORS.values()), seeds=(0,), log=log)
    return {name: str(ablation_out / variant / "seed0" / "step400.pt") for name, variant in TRAINED_DETECTORS.items()}


def apply_treatment(model: nn.Module, treatment: str) -> nn.Module:
    """``model`` as a row times it: :data:`FOLDED` (an optimised copy), :data:`FOLDED_CHANNELS_FIRST`
    (the copy without channels-last) or :data:`AS_SHIPPED` (itself, eval)."""
    if treatment == AS_SHIPPED:
        return model.eval()
    from tasks.deploy import fuse_conv_bn, optimize_for_inference

    if treatment == FOLDED:
        return optimize_for_inference(model)
    if treatment == FOLDED_CHANNELS_FIRST:  # ours are built channels-last: undo it
        return fuse_conv_bn(model).to(memory_format=torch.contiguous_format)
    raise ValueError(f"treatment must be {FOLDED!r}, {FOLDED_CHANNELS_FIRST!r} or {AS_SHIPPED!r}, got {treatment!r}")


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
    size: int | None = None, weights: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Measure one row in this process (:func:`run_models` runs each in a fresh one).

    ``size`` replaces the model's input side (the tests run small); torchvision's SSD resizes
    every input to 320 itself. ``weights``: a trained detector's (:func:`trained_detectors`).
    """
    from tasks.complexity import count

    torch.set_num_threads(threads)
    contender = build(name, weights)
    contender.size = size or contender.size
    counted = RawOutputs(contender.model) if name.startswith("tv_ssdlite") else contender.model
    counts = count(counted, contender.size)  # before folding: the paper counts BatchNorm parameters
    contender.model = apply_treatment(contender.model, treatment)
    model, call, size = contender.model, contender.call, contender.size
    row: dict[str, Any] = {"model": name, "treatment": treatment, "input": size, "classes": contender.classes}
    row["weights"] = "trained" if weights else "random"
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
    size: int | None = None, weights: dict[str, str] | None = None, log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """:func:`bench_model` for each (model, treatment) row, each in a fresh interpreter
    (``weights``: trained weights by model name, :func:`trained_detectors`)."""
    results = []
    for name, treatment in rows:
        options = {"name": name, "treatment": treatment, "runs": runs, "warmup": warmup, "threads": threads,
                   "use_compile": use_compile, "use_onnx": use_onnx, "size": size,
                   "weights": (weights or {}).get(name)}  # fmt: skip
        log(f"  {name} ({treatment}) ...")
        command = [sys.executable, "-c", _CHILD, json.dumps(options)]
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if output.returncode != 0:
            raise RuntimeError(f"benchmark of {name} ({treatment}) failed:\n{output.stderr[-2000:]}")
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    return results
