"""The benchmark's sections run in order into one report (a JSON-ready dict)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.benchmarking.training_speed import ROOT, SYNTHETIC_CONFIGS

SECTIONS = ("models", "train", "train_step", "data", "eval")  # the default run
ON_REQUEST = ("convergence", "ablation", "int8")  # 20 minutes to hours: only when asked for


@dataclass
class Options:
    """How much to measure; the defaults are ``tools/benchmark.py``'s."""

    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    runs: int = 30  # timed runs per latency
    warmup: int = 5
    compile: bool = False
    onnx: bool = False
    steps: int = 20  # train and data sections
    batch_size: int | None = None  # train and data: the synthetic configs' unless given
    workers: int | None = None
    data: Path = ROOT / "data" / "benchmark"
    convergence_config: Path = SYNTHETIC_CONFIGS["detection"]
    convergence_data: Path | None = None
    convergence_out: Path = ROOT / "runs" / "benchmark_convergence"
    ablation_variants: Sequence[str] | None = None  # all of tasks.benchmarking.ablation.VARIANTS
    ablation_seeds: Sequence[int] = (0, 1)
    ablation_out: Path = ROOT / "runs" / "ablation"
    trained_detectors: bool = True  # models and int8: detectors with the ablation's trained weights
    int8_weights: dict[str, Path] = field(default_factory=dict)  # int8: model name -> trained weights
    calibration_images: int = 256  # int8: training images to calibrate on
    calibrator: str = "minmax"  # int8: minmax, entropy or percentile (tasks.quantization.CALIBRATORS)
    int8_out: Path = ROOT / "runs" / "int8"
    qat_steps: int = 0  # int8: quantisation-aware fine-tuning steps of the trained models (0: none)


def check_sections(sections: Sequence[str]) -> None:
    """Raise a one-line ValueError for a section name the benchmark does not have."""
    unknown = sorted(set(sections) - set(SECTIONS + ON_REQUEST))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {','.join(SECTIONS + ON_REQUEST)}")


def run_suite(sections: Sequence[str], options: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``sections`` (of :data:`SECTIONS` and :data:`ON_REQUEST`) and return the report."""
    from tasks.benchmarking.report import machine

    check_sections(sections)
    torch.set_num_threads(options.threads)
    report: dict[str, Any] = {"machine": machine(), "threads": options.threads}
    if "models" in sections:
        from tasks.benchmarking.speed import ROWS, run_models

        weights = _trained_detectors(options, log)
        log("models:")
        report["models"] = run_models(
            ROWS, options.runs, options.warmup, options.threads, options.compile, options.onnx, weights=weights, log=log
        )
    if "train" in sections or "data" in sections:
        from tasks.benchmarking.training_speed import bench_data, bench_train, synthetic_root

        root = synthetic_root(options.data)
        for section, bench in (("data", bench_data), ("train", bench_train)):
            if section in sections:
                log(f"{section}:")
                report[section] = [
                    bench(task, root, options.batch_size, options.workers, options.steps) for task in SYNTHETIC_CONFIGS
                ]
    if "train_step" in sections:
        from tasks.benchmarking.training_step import bench_training_step, profile_training_step

        log("train_step: ours and torchvision's SSDLite, interleaved, then profiled ...")
        batch = options.batch_size or 16
        report["train_step"] = bench_training_step(batch, threads=options.threads)
        report["train_step"]["profile"] = profile_training_step(batch, threads=options.threads)
    if "eval" in sections:
        from tasks.benchmarking.evaluation_speed import bench_eval

        log("eval:")
        report["eval"] = bench_eval()
    if "convergence" in sections:
        from tasks.benchmarking.convergence import bench_convergence

        log(f"convergence: training {options.convergence_config} ...")
        report["convergence"] = bench_convergence(
            options.convergence_config, options.convergence_data, options.convergence_out
        )
    if "ablation" in sections:
        from tasks.benchmarking.ablation import plot_curves, run_ablation

        log(f"ablation: results in {options.ablation_out / 'results.json'} (runs only what is missing)")
        results = run_ablation(
            options.ablation_out, variants=options.ablation_variants, seeds=options.ablation_seeds,
            data_root=options.convergence_data, log=log,
        )  # fmt: skip
        report["ablation"] = results
        plot_curves(results, options.ablation_out / "curves.png")
    if "int8" in sections:
        from tasks.benchmarking.int8 import Int8Options, run_int8

        log("int8: float and INT8 ONNX files of ours and torchvision's models ...")
        weights = {**(_trained_detectors(options, log) or {}), **options.int8_weights}
        report["int8"] = run_int8(
            Int8Options(weights={name: Path(path) for name, path in weights.items()},
                        calibration_images=options.calibration_images, calibrator=options.calibrator,
                        out=options.int8_out,
                        threads=options.threads, runs=options.runs, warmup=options.warmup,
                        qat_steps=options.qat_steps),
            log=log,
        )  # fmt: skip
    return report


def _trained_detectors(options: Options, log: Callable[[str], None]) -> dict[str, str] | None:
    """The detectors' trained weights by model name (the ablation's runs), or None when not wanted."""
    if not options.trained_detectors:
        return None
    from tasks.benchmarking.speed import trained_detectors

    log(f"trained detectors from {options.ablation_out} (trained there first if missing) ...")
    return trained_detectors(options.ablation_out, log)
