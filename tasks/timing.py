"""Wall-clock timing of a call, the one way ``tools/export.py`` and ``tools/benchmark.py`` measure.

Untimed warm-up calls first (caches, lazy initialisation, allocator), then one
``time.perf_counter`` reading per call; :func:`latency_stats` takes the median and the
25th-75th percentiles of the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def timed_runs(call: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def latency_stats(times: Sequence[float], batch: int) -> dict[str, float]:
    """Median and quartiles of ``times`` (seconds per call) in ms, and images per second at the median."""
    q25, median, q75 = np.percentile(np.asarray(times) * 1000, [25, 50, 75])
    median = float(median)
    return {"median_ms": median, "q25_ms": float(q25), "q75_ms": float(q75), "images_per_s": batch * 1000 / median}
