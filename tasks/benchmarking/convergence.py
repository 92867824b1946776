"""Convergence: train a config from scratch through the project's CLI and read its validation curve."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CURVE_KEYS = {"val/AP": "AP", "val/AP50": "AP50", "val/AP75": "AP75", "val/mIoU": "mIoU"}
# What tools/train.py runs (tasks.cli.run, with its allocator setting), in a child process of its own.
_TRAIN = (
    "import sys; from tasks.allocator import keep_freed_memory; keep_freed_memory(); "
    "from tasks.cli import run; sys.exit(run())"
)


def bench_convergence(config: Path, data_root: Path | None, out: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``fit`` ``config`` from scratch, logging under ``out``; its validation curve and wall-clock seconds.

    ``extra`` are more command-line options for ``fit`` (the tests shrink the run).
    """
    command = [
        sys.executable, "-c", _TRAIN, "fit", "--config", str(config),
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
        *(["--data.root", str(data_root)] if data_root else []), *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.perf_counter() - start
    metrics = max(out.glob("*/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    with metrics.open(newline="") as file:
        rows = list(csv.DictReader(file))
    curve = [
        {"step": int(row["step"]) + 1, **{name: float(row[key]) for key, name in CURVE_KEYS.items() if row.get(key)}}
        for row in rows
        if any(row.get(key) for key in CURVE_KEYS)
    ]  # Lightning logs validation at the index of the last step; +1 = optimiser steps taken
    config = config.resolve()
    name = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    return {"config": str(name), "seconds": seconds, "curve": curve}
