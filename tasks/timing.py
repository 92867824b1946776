"""Wall-clock timing of a call, the one way ``tools/export.py`` and ``tools/benchmark.py`` measure.

Untimed warm-up calls first (caches, lazy initialisation, allocator), then one
``time.perf_counter`` reading per call; callers take medians and percentiles of the list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


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
