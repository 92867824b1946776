"""The training step alone, ours beside torchvision's SSDLite, and where our step's time goes.

Issue #14 asks for our step time / torchvision's at equal treatment to be at most the ratio of
their multiply-adds. :func:`bench_training_step` measures both ratios on one fixed synthetic batch,
without data loading or Lightning (``tasks.benchmarking.training_speed`` times those):

* ours: the synthetic config's network (:class:`~tasks.networks.SSDLiteMobileNetV2`, 6 classes);
  step = ``net(images)``, ``net.loss(outputs, targets, (H, W))``, backward, optimiser step.
* torchvision's ``ssdlite320_mobilenet_v3_large`` (random weights, 6 classes): step =
  ``model(images / 255 as a list, targets)`` (its own transform, matching and loss), backward,
  optimiser step.

Both in train mode, channels-last weights (as :class:`~tasks.training.DenseTask` trains ours) and
the synthetic config's AdamW (``tasks.optimization.AdamW``: no decay on BatchNorm and biases).
The two models alternate round by round (the order flipping every round), so a neighbour's load
on a shared CPU falls on both; warm-up rounds are not timed.

:func:`profile_training_step` runs a few steps of each under ``torch.profiler`` and splits them
by phase (labelled with ``record_function``) and by operator category.

Both measure the process as it is. ``tools/benchmark.py`` first calls
:func:`tasks.allocator.keep_freed_memory`, as ``tools/train.py`` does: with glibc's default
``malloc``, buffers over 32 MB (most of our activations at batch 16 and 320x320) are given back
to the system when freed and their pages faulted in again on every step, which costs ours far
more system time than torchvision's (the rows report system seconds and page faults per step).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

NUM_CLASSES = 6  # the synthetic config's: background + 5 shapes
BOXES_PER_IMAGE = 3
LR = 4e-3  # the synthetic config's AdamW
WEIGHT_DECAY = 4e-5
OURS = "ours_ssdlite_mobilenetv2"
TORCHVISION = "tv_ssdlite320_mobilenet_v3_large"
STEP = "step"
# Labels of the phases each step function marks itself (the rest are added while profiling).
BACKWARD, OPTIMISER = "backward", "optimiser"
UNLABELLED = "between phases"
# Operator categories of the profile. An operator's own (self) CPU time goes to the category of
# the nearest of it and its callers whose lower-case name contains one of the category's words:
# the copy inside hardtanh_'s clone counts as a copy, the clamp inside hardtanh as activation,
# convolution_backward under its autograd node as convolution. The rest is "other".
OP_CATEGORIES: dict[str, tuple[str, ...]] = {
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"),
    "convolution": ("conv",),  # mkldnn_convolution, convolution_backward, ConvolutionBackward0, ...
    "batch norm": ("batch_norm", "batchnorm"),  # native_batch_norm(_backward), NativeBatchNormBackward0
    "activation": ("hardtanh", "relu", "hardswish", "hardsigmoid", "threshold_backward"),
}
OTHER = "other"


@dataclass
class Contender:
    """A model, its optimiser and its full training step on the fixed batch (returns the loss)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], Tensor]
    madds: int  # multiply-adds of the network on one image (tasks.complexity, as speed.py counts)


def synthetic_batch(batch_size: int, image_size: int, seed: int = 0) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """A fixed batch: uint8 RGB noise ``[N, 3, S, S]`` and per image :data:`BOXES_PER_IMAGE` boxes
    (absolute xyxy pixels, 10-40% of the side) with labels in ``1..NUM_CLASSES-1``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    targets = []
    for _ in range(batch_size):
        centres = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.3 + 0.1
        boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1) * image_size
        labels = torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    from tasks.optimization import AdamW

    return AdamW(lr=LR, weight_decay=WEIGHT_DECAY).build(model, LR)


def _finish_step(loss: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
    """Backward and optimiser step, each labelled for the profiler (a no-op when it is off)."""
    with record_function(BACKWARD):
        loss.backward()
    with record_function(OPTIMISER):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as Lightning does
    return loss.detach()


def build_ours(images: Tensor, targets: list[dict[str, Tensor]]) -> Contender:
    """Our detector (the synthetic config's network) training on ``images`` / ``targets``."""
    from tasks.complexity import count
    from tasks.networks import SSDLiteMobileNetV2

    net = SSDLiteMobileNetV2(num_classes=NUM_CLASSES)
    madds = count(net, images.shape[-1])["madds"]  # before channels-last, in eval mode (count sets it)
    net.to(memory_format=torch.channels_last).train()
    optimizer = _optimizer(net)
    image_size = (images.shape[-2], images.shape[-1])

    def step() -> Tensor:
        losses = net.loss(net(images), targets, image_size)
        return _finish_step(losses["loss_cls"] + losses["loss_box"], optimizer)

    return Contender(OURS, net, optimizer, step, madds)


def build_torchvision(images: Tensor, targets: list[dict[str, Tensor]]) -> Contender:
    """torchvision's SSDLite-MobileNetV3 (random weights) training on the same batch, as its
    reference recipe calls it: a list of 0..1 float images and the targets."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from tasks.benchmarking.speed import RawOutputs
    from tasks.complexity import count

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    side = images.shape[-1]
    model.transform.fixed_size = (side, side)  # 320 as built; the tests run smaller
    madds = count(RawOutputs(model), side)["madds"]  # backbone + head, as speed.py counts it
    model.to(memory_format=torch.channels_last).train()
    optimizer = _optimizer(model)

    def step() -> Tensor:
        losses = model(list(images.float().div(255)), targets)  # the uint8 -> float in the step, as ours
        return _finish_step(losses["classification"] + losses["bbox_regression"], optimizer)

    return Contender(TORCHVISION, model, optimizer, step, madds)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stats(times: Sequence[float], usage: Sequence[tuple[float, float, int]], batch: int) -> dict[str, float]:
    """Median wall time (with quartiles) and images per second; median CPU and system time and
    page faults per step, from ``(user + system s, system s, minor page faults)`` per step."""
    q25, median, q75 = (float(v) for v in np.percentile(np.asarray(times), [25, 50, 75]))
    cpu, system, faults = (float(v) for v in np.median(np.asarray(usage, dtype=float), axis=0))
    stats = {"step_s": median, "q25_s": q25, "q75_s": q75, "images_per_s": batch / median}
    return {**stats, "cpu_s": cpu, "system_s": system, "page_faults": faults}


def _usage() -> tuple[float, float, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_minflt


def bench_training_step(
    batch_size: int = 16, image_size: int = 320, rounds: int = 7, warmup: int = 2, threads: int | None = None
) -> dict[str, Any]:
    """Median full training step of ours and torchvision's SSDLite, interleaved round by round.

    Returns ``{"batch", "image_size", "num_classes", "threads", "rounds", "models": [row, row],
    "step_time_ratio", "multiply_add_ratio"}``; a row: ``model``, ``step_s`` (median wall
    time), ``q25_s``, ``q75_s``, ``images_per_s``, ``madds``, and the process's ``cpu_s``
    (user + system), ``system_s`` and minor ``page_faults`` per step (medians). The ratios are
    ours / torchvision's, of the median wall times and of the multiply-adds.
    """
    with _threads(threads):
        torch.manual_seed(0)
        images, targets = synthetic_batch(batch_size, image_size)
        contenders = [build_ours(images, targets), build_torchvision(images, targets)]
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        usage: dict[str, list[tuple[float, float, int]]] = {c.name: [] for c in contenders}
        for index in range(warmup + rounds):
            order = contenders if index % 2 == 0 else contenders[::-1]
            for contender in order:
                before, start = _usage(), time.perf_counter()
                contender.step()
                elapsed, after = time.perf_counter() - start, _usage()
                if index >= warmup:
                    times[contender.name].append(elapsed)
                    usage[contender.name].append(tuple(b - a for a, b in zip(before, after)))
        used = torch.get_num_threads()
    rows = [
        {"model": c.name, **_stats(times[c.name], usage[c.name], batch_size), "madds": c.madds} for c in contenders
    ]
    ours, theirs = rows
    return {
        "batch": batch_size, "image_size": image_size, "num_classes": NUM_CLASSES, "threads": used, "rounds": rounds,
        "models": rows,
        "step_time_ratio": ours["step_s"] / theirs["step_s"],
        "multiply_add_ratio": ours["madds"] / theirs["madds"],
    }  # fmt: skip


class _Labelled:
    """A callable run inside ``record_function(label)``."""

    def __init__(self, call: Callable[..., Any], label: str) -> None:
        self.call = call
        self.label = label

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with record_function(self.label):
            return self.call(*args, **kwargs)


@contextlib.contextmanager
def _labelled(marks: Sequence[tuple[Any, str, str]]) -> Iterator[None]:
    """Wrap ``owner.attribute`` in ``record_function(label)`` for each ``(owner, attribute, label)``,
    on the instance only (a module's ``forward``, a method, a callable attribute); undone after."""
    saved = []
    try:
        for owner, attribute, label in marks:
            saved.append((owner, attribute, owner.__dict__.get(attribute)))
            setattr(owner, attribute, _Labelled(getattr(owner, attribute), label))
        yield
    finally:
        for owner, attribute, before in reversed(saved):
            if before is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, before)


def _marks(contender: Contender) -> tuple[list[tuple[Any, str, str]], list[tuple[Any, str, str]]]:
    """(phases, parts): what to label in each model. Parts are nested inside a phase."""
    model = contender.model
    if contender.name == OURS:
        head = model.head
        phases = [
            (model.normalize, "forward", "normalize"),
            (model.backbone, "forward", "backbone forward"),
            (head, "forward", "head forward"),
            (model, "loss", "matching + loss"),
        ]
        parts = [
            (head, "anchor_generator", "head forward: anchors"),
            (head, "match", "matching + loss: matching"),
            (head, "_hard_negative_mining_loss", "matching + loss: cross-entropy + hard negatives"),
        ]
        return phases, parts
    phases = [
        (model.transform, "forward", "transform (normalise, resize)"),
        (model.backbone, "forward", "backbone forward"),
        (model.head, "forward", "head forward"),
        (model.anchor_generator, "forward", "anchors"),
        (model, "proposal_matcher", "matching"),  # without box_iou, which SSD.forward calls itself
        (model, "compute_loss", "loss"),
    ]
    return phases, []


def _category(event: Any) -> str:
    """The :data:`OP_CATEGORIES` category of a profiler event, from it or its nearest caller."""
    while event is not None:
        name = event.name.lower()
        for category, words in OP_CATEGORIES.items():
            if any(word in name for word in words):
                return category
        event = event.cpu_parent
    return OTHER


def profile_training_step(
    batch_size: int = 16, image_size: int = 320, steps: int = 2, warmup: int = 1, threads: int | None = None
) -> list[dict[str, Any]]:
    """``steps`` profiled training steps of each model (after ``warmup`` unprofiled ones), averaged.

    Returns rows ``{"model", "kind", "name", "ms", "share"}``; ``ms`` per step, ``share`` of the step:

    * kind ``"phase"``: the step's phases in order, then what runs between them; shares sum to 1;
    * kind ``"part"``: parts nested in a phase (ours: anchors, matching, hard-negative mining);
    * kind ``"op"``: operators' own CPU time by category (:data:`OP_CATEGORIES`, then "other",
      which holds the Python between operators); shares sum to 1.

    The profiler adds a little time per operator, so a profiled step is slower than a timed one.
    """
    rows: list[dict[str, Any]] = []
    with _threads(threads):
        torch.manual_seed(0)
        images, targets = synthetic_batch(batch_size, image_size)
        for contender in (build_ours(images, targets), build_torchvision(images, targets)):
            for _ in range(warmup):
                contender.step()
            phases, parts = _marks(contender)
            with _labelled(phases + parts), profile(activities=[ProfilerActivity.CPU]) as profiler:
                for _ in range(steps):
                    with record_function(STEP):
                        contender.step()
            rows += _profile_rows(contender.name, profiler.events(), steps, phases, parts)
    return rows


def _profile_rows(
    name: str, events: Sequence[Any], steps: int,
    phases: Sequence[tuple[Any, str, str]], parts: Sequence[tuple[Any, str, str]],
) -> list[dict[str, Any]]:  # fmt: skip
    """One model's rows from its profiler events (times in microseconds, over ``steps`` steps)."""
    phase_names = [label for _, _, label in phases] + [BACKWARD, OPTIMISER]
    part_names = [label for _, _, label in parts]
    labels = {STEP, *phase_names, *part_names}
    spans = dict.fromkeys(labels, 0.0)  # a label's total time (parts may run several times a step)
    categories = dict.fromkeys([*OP_CATEGORIES, OTHER], 0.0)
    for event in events:
        if event.name in labels:
            spans[event.name] += event.cpu_time_total
            categories[OTHER] += event.self_cpu_time_total  # Python inside the phase, between its operators
        else:
            categories[_category(event)] += event.self_cpu_time_total
    step = spans[STEP]
    rows = [{"model": name, "kind": "phase", "name": label, "us": spans[label]} for label in phase_names]
    rows.append({"model": name, "kind": "phase", "name": UNLABELLED, "us": step - sum(r["us"] for r in rows)})
    rows += [{"model": name, "kind": "part", "name": label, "us": spans[label]} for label in part_names]
    for row in rows:
        row["share"] = row["us"] / step
    own = sum(categories.values())
    rows += [{"model": name, "kind": "op", "name": c, "us": us, "share": us / own} for c, us in categories.items()]
    for row in rows:
        row["ms"] = row.pop("us") / 1000 / steps
    return rows
