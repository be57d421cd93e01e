"""Keep freed host memory in the process, so per-step buffers do not page-fault every step.

An expert-parallel step on CPU allocates several fresh `[rows, d]` buffers (all-to-all
outputs, reorderings, their gradients) of a few MiB each and frees them at the end of the
step. glibc returns such blocks to the kernel (mmap / heap trimming), so the next step
page-faults them in again (benchmarks/expert_parallel.py measures the cost). PyTorch's CPU tuning
guide recommends jemalloc or tcmalloc for the same reason; `keep_freed_host_memory` gets the
effect from glibc itself, with no preload:

    M_MMAP_THRESHOLD = 32 MiB   blocks below it come from the heap (and the threshold stops
                                moving, so it is the same every run)
    M_TRIM_THRESHOLD = 2 GiB    the heap keeps up to this much freed memory at its top

Blocks of 32 MiB and more (glibc's cap on M_MMAP_THRESHOLD) are still mmapped and page-faulted
in on every use: at E=4096 experts the router and expert buffers of a step are hundreds of MiB.
`never_mmap=True` also sets

    M_MMAP_MAX = 0              every block comes from the heap, so large ones are reused too

(the heap then returns memory only from its top). benchmarks/moe_layer.py --never-mmap uses it
to measure without page faults at all.

The cost is resident memory that stays with the process after a peak instead of going back
to the system. Call it once per process before the first step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int


def keep_freed_host_memory(never_mmap: bool = False) -> bool:
    """Tell glibc malloc to keep freed blocks for reuse (with `never_mmap`, blocks of any size);
    False (and nothing done) without glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return ok and (not never_mmap or bool(mallopt(_M_MMAP_MAX, 0)))
