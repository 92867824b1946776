"""tasks/allocator.py: large freed buffers are kept for reuse instead of being faulted in again."""

from __future__ import annotations

import subprocess
import sys

# malloc, touch and free 40 MiB (above glibc's largest mmap threshold, 32 MiB) twice; print the
# page faults of the second round.
_CHILD = """
import ctypes, resource, sys
from tasks.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touch():
    size = 40 * 2**20
    buffer = libc.malloc(size); ctypes.memset(buffer, 1, size); libc.free(buffer)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _second_round_faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, env=env)
    kept, faults = out.stdout.split()
    return kept, int(faults)

def test_kept_memory_is_reused_without_page_faults() -> None:
    pages = 40 * 2**20 // 4096
    kept, faults = _second_round_faults("keep")
    assert kept == "True" and faults < pages // 10
    default, default_faults = _second_round_faults("default")
    assert default_faults > pages // 2  # glibc's default: every page faulted in again
    import os

    opted_out, opted_out_faults = _second_round_faults("keep", {**os.environ, "MOBILEDENSE_SYSTEM_MALLOC": "1"})
    assert opted_out == "False" and opted_out_faults > pages // 2
