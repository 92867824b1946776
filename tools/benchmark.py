"""Speed and size of our models beside torchvision's, measured in one run on one machine.

    python tools/benchmark.py                       # everything, table + runs/benchmark.json
    python tools/benchmark.py --only models --runs 50 --onnx --compile
    python tools/benchmark.py --only train,data --steps 20
    python tools/benchmark.py --only eval
    python tools/benchmark.py --only convergence    # ~20 minutes: SSDLite from scratch, 400 steps
    python tools/benchmark.py --only ablation       # hours: ours vs torchvision's SSDLite, factor by factor

Sections (the code is in tasks/benchmarking/):
  models  parameters, multiply-adds, median latency at batch 1 (with the spread: 25th-75th
          percentile) and throughput at batch 8, for eager PyTorch, ``torch.compile`` (--compile,
          with the number of graphs it compiled) and ONNX Runtime (--onnx), plus peak resident
          memory. Ours run with BatchNorm folded and channels-last weights; torchvision's models
          run both with that same treatment and as shipped, and the report leads with the ratios
          ours / torchvision (fair: equal treatment; then as shipped). Each row runs in a fresh
          process. Detection latency includes post-processing (score threshold, top-k, NMS), with
          trained weights on the synthetic validation images: the ablation's runs of ours and
          torchvision's SSDLite (6 classes; trained into --ablation-out first when missing, about
          20 minutes; --random-detectors skips that). Ours also run folded but channels-first,
          which measures what channels-last brings.
  train   images per second of a full training step (data loading, forward, loss, backward,
          optimiser) with the synthetic configs (model, sizes, batch, workers) on synthetic data.
  train_step  the training step alone (forward, loss, backward, AdamW) of our SSDLite and
          torchvision's, both channels-last, on one fixed batch (16 at 320x320 unless --batch-size),
          interleaved: step times, the ratios ours / torchvision of step time and of multiply-adds,
          and a torch.profiler breakdown by phase and by operator category.
  data    images per second of the training data pipeline alone (decode + augment + collate).
  eval    COCO evaluation of 5,000 images x 100 detections with each backend; mIoU
          accumulation over 1,000 masks of 513x513.
  convergence (only when asked for) trains a synthetic config from scratch through the
          project's CLI (default: configs/ssdlite_mobilenetv2_synthetic.yaml, 400 steps) and
          prints its validation curve, with the wall-clock time.
  ablation (only when asked for) trains ours, torchvision's SSDLite and variants that change one
          factor each (tasks/benchmarking/ablation.py) on the synthetic config's data and recipe,
          scores them at 200 / 400 steps (every 50 for ours and torchvision's) with running and
          re-estimated BatchNorm statistics, and prints the factor table and the curves
          (runs/ablation/curves.png). Results are kept in runs/ablation/results.json: a second
          call trains only what is missing or whose config changed.
  int8    (only when asked for) float and INT8 ONNX files (tasks/quantization.py) of our SSDLite and
          DeepLabv3 and torchvision's SSDLite and LR-ASPP from the synthetic configs: latency at batch
          1 and throughput at batch 8 (interleaved), size on disk, float/INT8 agreement, and AP / mIoU
          of both files for models with trained weights (the detectors of the models section,
          and any given with --int8-weights; tasks/benchmarking/int8.py); --calibrator picks
          ONNX Runtime's calibrator, --qat-steps N also scores a quantisation-aware fine-tune.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.benchmarking.int8 import add_arguments as add_int8_arguments  # noqa: E402
from tasks.benchmarking.report import format_report  # noqa: E402
from tasks.benchmarking.suite import ON_REQUEST, SECTIONS, Options, check_sections, run_suite  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> tuple[list[str], Options, Path]:
    """The sections to run, how much to measure, and where to write the JSON report."""
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = ",".join(SECTIONS + ON_REQUEST)
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {choices}")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch / ORT threads")
    parser.add_argument("--runs", type=int, default=defaults.runs, help="timed runs per latency measurement")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed runs before timing")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps for the train and data sections")
    parser.add_argument("--batch-size", type=int, help="batch for train and data (default: the synthetic configs')")
    parser.add_argument("--workers", type=int, help="DataLoader workers for train and data (default: the configs')")
    parser.add_argument("--data", type=Path, default=defaults.data, help="synthetic data folder")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "benchmark.json", help="where to write JSON")
    parser.add_argument(
        "--convergence-config", type=Path, default=defaults.convergence_config, help="config convergence trains"
    )
    parser.add_argument("--convergence-data", type=Path, help="its --data.root (default: the config's)")
    parser.add_argument("--ablation-variants", type=lambda s: s.split(","), help="comma-separated (default: all)")
    parser.add_argument(
        "--ablation-seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=defaults.ablation_seeds,
        help="seeds of the curve variants; the others run the first, and the second when within 0.03 AP of ours",
    )  # fmt: skip
    parser.add_argument("--ablation-out", type=Path, default=defaults.ablation_out, help="where results are kept")
    parser.add_argument(
        "--random-detectors", dest="trained_detectors", action="store_false",
        help="models: time the detectors with random weights instead of the ablation's trained ones "
        "(no training first; torchvision's NMS then sees thousands of boxes)",
    )  # fmt: skip
    add_int8_arguments(parser)
    args = parser.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    try:
        check_sections(sections)
    except ValueError as error:
        parser.error(f"--only: {error}")
    json_path = args.json
    del args.only, args.json
    return sections, Options(**vars(args)), json_path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    sections, options, json_path = parse_args(argv)
    report = run_suite(sections, options, log=lambda message: print(message, flush=True))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    print(f"\nwrote {json_path}")
    return report


if __name__ == "__main__":
    keep_freed_memory()  # as tools/train.py: every model measured in the same conditions
    main()
