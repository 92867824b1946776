"""Learning-speed ablation (issue 14): our SSDLite against torchvision's, one factor at a time.

Every variant trains the synthetic detection config (``configs/ssdlite_mobilenetv2_synthetic.yaml``:
same data, augmentation, AdamW schedule, batch and steps) with one set of command-line overrides,
and saves the network's weights every 50 steps. The weights are then scored on the validation
images twice: with BatchNorm's running averages as they are, and after re-estimating them on 256
training images (:mod:`tasks.precise_bn`, the same images the in-training callback would use at
that step). Training does not depend on the running averages (BatchNorm trains on batch
statistics), so both curves come from one run. Results are kept per (variant, seed) in a JSON
file: a second call only trains what is missing, so the README's tables come from one command,
``python tools/benchmark.py --only ablation``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from tasks.benchmarking.training_speed import SYNTHETIC_CONFIGS
from tasks.configs import instantiate_config
from tasks.data.sampling import derived_seed
from tasks.precise_bn import preserved_rng_states, reestimate_from_loader

EVAL_EVERY = 50
PRECISE_BN_IMAGES = 256  # as the synthetic config's PreciseBatchNorm callback
CLOSE = 0.03  # differences below this get a second seed (the rule)


@dataclass(frozen=True)
class Variant:
    """One training run of the ablation: the synthetic config with ``overrides``.

    Attributes:
        name: a short key (results file, command line).
        change: what differs from ``baseline``, for the table.
        overrides: LightningCLI arguments applied to the synthetic config.
        curve: scored every 50 steps (the side-by-side curve); otherwise at 200 and 400 only.
        baseline: the variant this one changes one factor of (its difference is taken to it).
    """

    name: str
    change: str
    overrides: tuple[str, ...] = ()
    curve: bool = False
    baseline: str = "ours"


_TORCHVISION = ("--model.network=tasks.networks.TorchvisionSSDLite", "--model.network.num_classes=6")
_KAIMING = ("--model.network.backbone_init=kaiming",)
VARIANTS: tuple[Variant, ...] = (
    Variant("ours", "ours: SSDLite-MobileNetV2 as configured", curve=True),
    Variant("torchvision", "torchvision's ssdlite320_mobilenet_v3_large, whole", _TORCHVISION, curve=True),
    Variant(
        "kaiming_backbone_init",
        "backbone convs Kaiming-initialised (the reference MobileNetV2 init; ours before this ablation) "
        "instead of N(0, 0.03)",
        _KAIMING,
    ),
    Variant(
        "ours_head_on_mnv3",
        "our head, extras, boxes and loss on torchvision's MobileNetV3 features (its N(0, 0.03) init)",
        ("--model.network=tasks.networks.SSDLiteMobileNetV3", "--model.network.num_classes=6"),
    ),
    Variant(
        "torchvision_head_on_ours",
        "torchvision's extras, head, boxes and loss on our MobileNetV2 (N(0, 0.03) init)",
        (*_TORCHVISION, "--model.network.backbone=mobilenet_v2"),
    ),
    Variant(
        "torchvision_default_boxes",
        "6 boxes on every layer (torchvision) instead of TF's 3 on the first",
        ("--model.network.default_boxes.reduce_boxes_in_lowest_layer=false", *_KAIMING),
        baseline="kaiming_backbone_init",
    ),
    Variant(
        "no_min_negatives",
        "no negatives forced in images without objects (torchvision: 0, TF: 3)",
        ("--model.network.min_negatives_per_image=0",),
    ),
    Variant("focal_loss", "sigmoid focal loss instead of softmax + hard negatives", ("--model.network.loss_type=focal",)),
)


class SaveNetworkEvery(Callback):
    """Save the network's weights after every ``every``-th optimiser step (``step{N}.pt``)."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            torch.save(pl_module.state_dict(), self.folder / f"step{trainer.global_step}.pt")


def build(
    variant: Variant, seed: int, data_root: Path | None, config: Path, extra: Sequence[str] = ()
) -> tuple[LightningModule, Any]:
    """The task and DataModule of ``variant`` with ``seed``, as ``tools/train.py fit`` builds them
    (``extra``: more overrides for every variant, e.g. a smaller model in tests)."""
    overrides = [*variant.overrides, *extra, f"--seed_everything={seed}"]
    if data_root is not None:
        overrides.append(f"--data.root={data_root}")
    return instantiate_config(config, overrides)


def train(
    variant: Variant, seed: int, folder: Path, data_root: Path | None, config: Path, steps: int, every: int,
    extra: Sequence[str] = (),
) -> float:
    """Train ``variant`` for ``steps`` from scratch, saving weights every ``every`` steps; seconds taken."""
    folder.mkdir(parents=True, exist_ok=True)
    task, data = build(variant, seed, data_root, config, extra)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[SaveNetworkEvery(folder, every)],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(task, datamodule=data)
    return time.perf_counter() - start


def score(
    variant: Variant, seed: int, folder: Path, data_root: Path | None, config: Path, steps: Sequence[int],
    extra: Sequence[str] = (),
    budget_at: int | None = None,
) -> dict[str, dict[str, float]]:
    """AP of the weights saved at ``steps``: running averages (``AP_running``) and re-estimated (``AP``).

    At step ``budget_at`` (default: the last of ``steps``) also with torchvision's detection budget (``AP_300``: 300 candidates per
    class, 300 detections per image) for networks with our head.
    """
    task, data = build(variant, seed, data_root, config, extra)
    data.setup("fit")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    results: dict[str, dict[str, float]] = {}
    for step in steps:
        task.load_state_dict(torch.load(folder / f"step{step}.pt", map_location="cpu", weights_only=True))
        row = {"AP_running": validate(trainer, task, data)}
        task.train()
        with preserved_rng_states():
            reestimate_from_loader(
                task, data.train_dataloader(), num_images=PRECISE_BN_IMAGES, seed=derived_seed(seed, step), datamodule=data
            )
        row["AP"] = validate(trainer, task, data)
        head = getattr(task.network, "head", None)
        if step == (steps[-1] if budget_at is None else budget_at) and hasattr(head, "topk_candidates"):
            budget = head.topk_candidates, head.detections_per_image
            head.topk_candidates, head.detections_per_image = 300 * (head.num_classes - 1), 300
            row["AP_300"] = validate(trainer, task, data)
            head.topk_candidates, head.detections_per_image = budget
        results[str(step)] = row
    return results


def validate(trainer: Trainer, task: LightningModule, data: Any) -> float:
    """val/AP of ``task`` as it stands."""
    return float(trainer.validate(task, datamodule=data, verbose=False)[0]["val/AP"])


def run_ablation(
    out: Path,
    *,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    data_root: Path | None = None,
    config: Path = SYNTHETIC_CONFIGS["detection"],
    steps: int = 400,
    every: int = EVAL_EVERY,
    extra: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and score what ``out/results.json`` lacks; return every result it then holds.

    Curve variants run every seed of ``seeds``; the others the first seed, and the second too
    when their AP at ``steps`` is within :data:`CLOSE` of their baseline's. Results whose weights
    lack a score at a needed step are scored from the saved weights, without retraining.
    """
    chosen = [v for v in VARIANTS if variants is None or v.name in variants]
    unknown = sorted(set(variants or ()) - {v.name for v in VARIANTS})
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; choose from {', '.join(v.name for v in VARIANTS)}")
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    for variant in chosen:
        marks = list(range(every, steps + 1, every) if variant.curve else (steps // 2, steps))
        for seed in seeds:
            key = f"{variant.name}/seed{seed}"
            folder = out / variant.name / f"seed{seed}"
            recipe = fingerprint(config, [*variant.overrides, *extra], steps, every)
            kept = results.get(key) if results.get(key, {}).get("recipe") == recipe else None
            if kept is None:
                if seed != seeds[0] and not variant.curve and not close_to_baseline(results, variant, seeds[0], steps):
                    continue
                log(f"ablation: training {key} ({variant.change})")
                seed_everything(seed)
                seconds = train(variant, seed, folder, data_root, config, steps, every, extra)
                kept = {"variant": variant.name, "seed": seed, "recipe": recipe, "train_seconds": seconds, "steps": {}}
            missing = [mark for mark in marks if str(mark) not in kept["steps"]]
            if not missing:
                continue
            absent = [mark for mark in missing if not (folder / f"step{mark}.pt").is_file()]
            if kept["steps"] and absent:  # a kept result to complete, its weights gone
                raise FileNotFoundError(f"{folder}: no weights for steps {absent}; delete {key} from {path} to retrain")
            scored = {**kept["steps"], **score(variant, seed, folder, data_root, config, missing, extra, steps)}
            kept["steps"] = {mark: scored[mark] for mark in sorted(scored, key=int)}
            results[key] = kept
            path.write_text(json.dumps(results, indent=2))
            log(f"ablation: {key} AP at {steps}: {kept['steps'][str(steps)]['AP']:.3f}")
    return results


def fingerprint(config: Path, overrides: Sequence[str], steps: int, every: int) -> str:
    """What a result was trained from: the config's settings (comments aside), the overrides and
    the schedule. A change to any of them retrains."""
    settings = json.dumps(yaml.safe_load(config.read_text()), sort_keys=True)
    text = "\n".join([settings, *overrides, f"steps={steps}", f"every={every}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def close_to_baseline(results: dict[str, Any], variant: Variant, seed: int, steps: int) -> bool:
    """Whether ``variant``'s AP at ``steps`` with ``seed`` is within :data:`CLOSE` of its baseline's
    (unknown: False)."""
    base, other = results.get(f"{variant.baseline}/seed{seed}"), results.get(f"{variant.name}/seed{seed}")
    if base is None or other is None:
        return False
    return abs(other["steps"][str(steps)]["AP"] - base["steps"][str(steps)]["AP"]) < CLOSE


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _cell(values: Sequence[float]) -> str:
    """``0.648`` for one seed, ``0.640 (0.632, 0.648)`` (mean, then each seed) for several."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{_mean(values):.3f} (" + ", ".join(f"{v:.3f}" for v in values) + ")"


def _runs(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return sorted((r for r in results.values() if r["variant"] == name), key=lambda r: r["seed"])


def format_ablation(results: dict[str, Any], steps: int = 400) -> str:
    """Markdown: the factor table (AP at ``steps // 2`` and ``steps``, re-estimated BatchNorm; the
    difference to the baseline over the seeds both have), then the side-by-side curve of the
    curve variants (mean over seeds, both BatchNorm statistics)."""
    half = str(steps // 2)
    lines = [
        f"| variant | what differs from the baseline | seeds | AP@{half} | AP@{steps} | baseline | "
        f"AP@{steps} - baseline | AP@{steps}, running BN | AP@{steps}, 300 detections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        runs = _runs(results, variant.name)
        if not runs:
            continue
        at = lambda step, key: [r["steps"][step][key] for r in runs if key in r["steps"].get(step, {})]  # noqa: E731
        final = at(str(steps), "AP")
        seeds = {r["seed"] for r in runs}  # the baseline over the same seeds: a paired difference
        base = [r["steps"][str(steps)]["AP"] for r in _runs(results, variant.baseline) if r["seed"] in seeds]
        compared = variant.name != variant.baseline and base
        baseline, delta = (variant.baseline, f"{_mean(final) - _mean(base):+.3f}") if compared else ("-", "-")
        lines.append(
            f"| {variant.name} | {variant.change} | {len(runs)} | {_cell(at(half, 'AP'))} | {_cell(final)} | {baseline} "
            f"| {delta} | {_cell(at(str(steps), 'AP_running'))} | {_cell(at(str(steps), 'AP_300'))} |"
        )
    curves = [v for v in VARIANTS if v.curve and _runs(results, v.name)]
    if curves:
        marks = sorted({int(s) for v in curves for r in _runs(results, v.name) for s in r["steps"]})
        header = " | ".join(f"{v.name} {kind}" for v in curves for kind in ("AP", "running BN"))
        lines += ["", f"| step | {header} |", "|---|" + "---|" * (2 * len(curves))]
        for mark in marks:
            cells = []
            for variant in curves:
                for key in ("AP", "AP_running"):
                    values = [r["steps"][str(mark)][key] for r in _runs(results, variant.name) if str(mark) in r["steps"]]
                    cells.append(f"{_mean(values):.3f}" if values else "-")
            lines.append(f"| {mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: Path) -> Path | None:
    """AP against steps for every seed of the curve variants (solid: re-estimated BatchNorm,
    dashed: running averages); None when nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [v for v in VARIANTS if v.curve and _runs(results, v.name)]
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for colour, variant in zip(("tab:blue", "tab:orange"), curves):
        for run in _runs(results, variant.name):
            marks = sorted(int(s) for s in run["steps"])
            for key, style in (("AP", "-"), ("AP_running", ":")):
                label = f"{variant.name} seed {run['seed']}" + (" (running BN)" if key == "AP_running" else "")
                axes.plot(marks, [run["steps"][str(m)][key] for m in marks], style, color=colour, label=label,
                          alpha=1.0 if run["seed"] == 0 else 0.6)  # fmt: skip
    axes.set_xlabel("optimiser step (batch 16, 320x320)")
    axes.set_ylabel("val AP@[.5:.95]")
    axes.set_title("Synthetic COCO-format data, same recipe")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
