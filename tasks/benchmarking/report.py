"""The benchmark's report: the machine line, the ours / torchvision ratios first, then one Markdown
table per section, ready to paste into the README's "Speed" section unchanged."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from tasks.benchmarking.convergence import CURVE_KEYS
from tasks.benchmarking.speed import AS_SHIPPED, FOLDED, FOLDED_CHANNELS_FIRST, PAIRS

TIMINGS = ("network_b1", "eager_b1", "eager_b8", "compile_b1", "onnx_b1", "onnx_b8")


def machine() -> str:
    """CPU model, core count, torch and Python versions: printed beside every table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {python}"


def _median(row: dict[str, Any] | None, key: str) -> float | None:
    timing = (row or {}).get(key)
    return timing["median_ms"] if timing and "error" not in timing else None


def ratio_lines(models: list[dict[str, Any]]) -> list[str]:
    """Ours / torchvision median latency per timed column, fair pairs first (torchvision with our
    treatment), then torchvision as shipped. Ours are always folded; below 1, ours is faster."""
    rows = {(r["model"], r.get("treatment", FOLDED)): r for r in models}
    columns = [key for key in TIMINGS if any(_median(r, key) for r in models)]
    lines = []
    for treatment, label in ((FOLDED, "folded, channels-last (fair)"), (AS_SHIPPED, "as shipped")):
        for ours, theirs in PAIRS:
            mine, other = rows.get((ours, FOLDED)), rows.get((theirs, treatment))
            if mine is None or other is None:
                continue
            cells = []
            for key in columns:
                a, b = _median(mine, key), _median(other, key)
                cells.append(f"{a / b:.2f}" if a and b else "-")
            lines.append(f"| {ours} / {theirs} | {label} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    header = "| ours / torchvision, median latency | torchvision's treatment | " + " | ".join(columns) + " |"
    return [
        "Ours / torchvision (median latency; below 1, ours is faster). Ours: BatchNorm folded, channels-last;",
        "fair rows give torchvision's model the same treatment (tasks.deploy.optimize_for_inference).",
        "",
        header,
        "|" + "---|" * (len(columns) + 2),
        *lines,
        "",
    ]


def channels_last_lines(models: list[dict[str, Any]]) -> list[str]:
    """What channels-last weights alone bring ours: median latency channels-first / channels-last
    (both BatchNorm-folded), per timed column; above 1, channels-last is faster."""
    rows = {(r["model"], r.get("treatment", FOLDED)): r for r in models}
    columns = [key for key in TIMINGS if any(_median(r, key) for r in models)]
    lines = []
    for name in dict.fromkeys(r["model"] for r in models):
        last, first = rows.get((name, FOLDED)), rows.get((name, FOLDED_CHANNELS_FIRST))
        if last is None or first is None:
            continue
        cells = [(a, b) for a, b in ((_median(first, key), _median(last, key)) for key in columns)]
        lines.append(f"| {name} | " + " | ".join(f"{a / b:.2f}" if a and b else "-" for a, b in cells) + " |")
    if not lines:
        return []
    header = "| channels-first / channels-last, median latency (both folded) | " + " | ".join(columns) + " |"
    return [header, "|" + "---|" * (len(columns) + 1), *lines, ""]


def model_lines(models: list[dict[str, Any]]) -> list[str]:
    """One row per (model, treatment): counts, latencies (median and IQR) and throughputs."""
    backends = [b for b in ("eager", "compile", "onnx") if any(f"{b}_b1" in r for r in models)]
    compiled = any("compile_graphs" in r for r in models)
    header = "| model | treatment | weights | classes | input | params | mult-adds | network alone b1 ms | " + " | ".join(
        f"{b} b1 ms (IQR) | {b} b8 img/s" for b in backends
    ) + (" | compiled graphs" if compiled else "") + " | peak RSS MB |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in models:
        cells = [r["model"], r.get("treatment", FOLDED), r.get("weights", "random"), str(r.get("classes", "-"))]
        cells.append(str(r["input"]))
        cells += [f"{r['params'] / 1e6:.2f}M", f"{r['madds'] / 1e9:.2f}B"]
        cells.append(f"{r['network_b1']['median_ms']:.1f}" if "network_b1" in r else "-")
        for b in backends:
            b1, b8 = r.get(f"{b}_b1"), r.get(f"{b}_b8")
            spread = "-" if not b1 or "error" in b1 else f"{b1['median_ms']:.1f} ({b1['q25_ms']:.1f}-{b1['q75_ms']:.1f})"
            cells.append(spread)
            cells.append("-" if not b8 or "error" in b8 else f"{b8['images_per_s']:.1f}")
        if compiled:
            cells.append(str(r.get("compile_graphs", "-")))
        cells.append(f"{r['peak_rss_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [
        f"- {r['model']} ({r.get('treatment', FOLDED)}) {key}: {r[key]['error']}"
        for r in models
        for key in TIMINGS
        if "error" in r.get(key, {})
    ]
    return [*lines, *([""] + errors if errors else []), ""]


def training_step_lines(result: dict[str, Any]) -> list[str]:
    """The training step alone (:mod:`tasks.benchmarking.training_step`): both models' step times,
    the ratio line (step time and multiply-adds, ours / torchvision), then the profile tables."""
    lines = [
        f"Training step alone: batch {result['batch']} at {result['image_size']}x{result['image_size']}, "
        f"{result['threads']} threads, median of {result['rounds']} interleaved rounds; forward, loss, backward "
        f"and AdamW; both channels-last, random weights, {result['num_classes']} classes.",
        "",
        "| model | step s (IQR) | img/s | CPU s | of which system s | page faults | mult-adds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        spread = f"{r['step_s']:.2f} ({r['q25_s']:.2f}-{r['q75_s']:.2f})"
        usage = f"{r['cpu_s']:.2f} | {r['system_s']:.2f} | {r['page_faults'] / 1e3:.0f}k"
        lines.append(f"| {r['model']} | {spread} | {r['images_per_s']:.1f} | {usage} | {r['madds'] / 1e9:.2f}B |")
    lines += [
        "",
        f"training step ours / torchvision: {result['step_time_ratio']:.2f} "
        f"(multiply-adds: {result['multiply_add_ratio']:.2f})",
        "",
    ]
    profile = result.get("profile") or []
    models = list(dict.fromkeys(r["model"] for r in profile))
    if models:
        lines += ["Where a step's time goes (torch.profiler, ms per step; it slows every operator a little):", ""]
    for model in models:
        rows = [r for r in profile if r["model"] == model and r["kind"] in ("phase", "part")]
        lines += [f"| {model}: phase | ms | share |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['ms']:.0f} | {r['share']:.1%} |" for r in rows]
        lines.append("")
    if models:
        ops = {(r["model"], r["name"]): r for r in profile if r["kind"] == "op"}
        categories = list(dict.fromkeys(name for _, name in ops))
        lines += ["| operators' own time | " + " | ".join(f"{m} ms | share" for m in models) + " |"]
        lines += ["|---|" + "---|---|" * len(models)]
        for category in categories:
            cells = [f"{ops[m, category]['ms']:.0f} | {ops[m, category]['share']:.1%}" for m in models]
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """Markdown: the machine line, the ratios, then the models, train/data, eval and convergence tables."""
    lines = [f"Machine: {report['machine']}; {report['threads']} threads.", ""]
    if report.get("models"):
        lines += ratio_lines(report["models"]) + channels_last_lines(report["models"]) + model_lines(report["models"])
    if report.get("train") or report.get("data"):
        lines += ["| task | what | batch | workers | img/s |", "|---|---|---|---|---|"]
        for name in ("train", "data"):
            for r in report.get(name, []):
                what = "training step (data included)" if name == "train" else "data pipeline alone"
                lines.append(f"| {r['task']} | {what} | {r['batch']} | {r['workers']} | {r['images_per_s']:.1f} |")
        lines.append("")
    if report.get("train_step"):
        lines += training_step_lines(report["train_step"])
    if report.get("eval"):
        lines += ["| evaluation | seconds |", "|---|---|"]
        lines += [f"| {r['what']} | {r['seconds']:.2f} |" for r in report["eval"]]
        lines.append("")
    if report.get("convergence"):
        run = report["convergence"]
        names = [n for n in CURVE_KEYS.values() if any(n in point for point in run["curve"])]
        lines += [f"{run['config']} from scratch, {run['seconds'] / 60:.1f} min:", ""]
        lines += ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {p['step']} | " + " | ".join(f"{p[n]:.3f}" for n in names) + " |" for p in run["curve"]]
    if report.get("ablation"):
        from tasks.benchmarking.ablation import format_ablation

        lines += ["", format_ablation(report["ablation"])]
    if report.get("int8"):
        from tasks.benchmarking.int8 import format_int8

        lines += ["", format_int8(report["int8"])]
    return "\n".join(lines)
