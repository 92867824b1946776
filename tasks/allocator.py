"""Keep freed memory in the process: glibc's default gives large buffers back to the system on
every ``free`` and a CPU training step then spends its time in page faults.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed. A batch-16 SSDLite step at 320x320 allocates and frees
gigabytes of such activations, so every step faults all of them back in: on our 2-core CI
machine (``python tools/benchmark.py --only train_step``, 1 thread) 714k page faults and 1.5 s
of system time per step of ours (5.3 s), 0.5 s of torchvision's SSDLite (2.6 s). MobileNetV2's
larger activations pay more, which is most of our step's excess over its multiply-adds.

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (large buffers come from the heap too) and a
``M_TRIM_THRESHOLD`` of 2 GiB (freed heap is kept for the next step), what PyTorch's own CPU
performance guide suggests via jemalloc/tcmalloc, with glibc alone. The same run then takes
3.0 s (ours) and 2.4 s (torchvision), with no page faults and the same peak memory. The numbers
are unchanged: only where buffers come from changes. The command-line tools call it at start;
``MOBILEDENSE_SYSTEM_MALLOC=1`` keeps glibc's defaults. It does nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
OPT_OUT_VARIABLE = "MOBILEDENSE_SYSTEM_MALLOC"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True when it was set."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_VARIABLE, "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
