"""Freed memory kept in the process for reuse (glibc's malloc), for meta-RL's large temporaries.

A meta-iteration on navigation-2d allocates and frees thousands of tensors of 0.5-10 MB (a
batch of 20 tasks' 2,000 time steps by 64 units is 10 MB). With glibc's defaults each of them is
either a fresh ``mmap`` or lands at the top of a heap that is trimmed back to the system when freed,
so the next tensor of that size is page-faulted and zeroed by the kernel again: on this project's
CPU that took as long as the arithmetic. Raising the mmap threshold to its maximum (32 MiB) and
the trim threshold to 1 GiB keeps those pages in the process: one meta-iteration at issue 20's
settings went from 1.09 to 0.84 s with autograd's graphs and from 1.19 to 0.65 s with the
explicit products (benchmarks/rl_navigation.py, one thread). The supervised engine's
meta-iteration does not change (benchmarks/meta_step.py). The cost: the process's resident
memory stays near its peak instead of shrinking between iterations.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds as above, once per process; False where the C library is not glibc
    (macOS, musl), which is left as it is."""
    global _applied
    if _applied is None:
        _applied = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # glibc only
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError, TypeError):
            _applied = False
    return _applied
