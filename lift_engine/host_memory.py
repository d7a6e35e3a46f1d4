"""Keep freed host memory inside a training process (glibc malloc), instead of handing it
back to the kernel after every step.

A tuning step on the CPU allocates and frees gigabytes of activations. By default glibc's
malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
unmaps it on free, and trims the top of its heap as soon as 128 KiB there are free. The
next step's allocations then fault the same pages in again and the kernel zeroes them:
a 16-document bf16 batched job (bench_tune's workload, ~75 s) took 3.1M minor page faults
and 15 s of system time. `keep_freed_memory()` turns that off for the process:

    M_MMAP_MAX = 0              every block comes from the heap (brk), so a freed block
                                stays mapped and a later step reuses it where it fits
                                (torch's 64-byte-aligned blocks do not always fit the exact
                                hole they left, so the heap may hold some spare blocks)
    M_TRIM_THRESHOLD = 2 GiB    the heap's top is returned only when 2 GiB there are free
    M_TOP_PAD = 1 GiB           the heap grows in large steps (address space, not memory)

Measured on that job, run alternately: 74.1 / 78.0 / 77.6 s → 62.2 / 64.6 / 63.1 s (~1.2×), 2.1M faults
(4 KiB each: about the first touch of the 8.9 GB peak, which no allocator avoids) and 10.6 s
of system time; peak RSS unchanged. The price: a process keeps its peak
heap until it exits, which suits `lift tune` and `lift tune-service` (processes that exist
to train) but not a library's host, so the library never calls it on its own: the CLI's
training commands and the tuning bench do. Set LIFT_KEEP_FREED_MEMORY=0 to leave malloc as
it is. Where the C library is not glibc (musl, macOS) this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30))
OPT_OUT = "LIFT_KEEP_FREED_MEMORY"

_applied = False


def keep_freed_memory() -> bool:
    """Apply SETTINGS to this process's glibc malloc (once); True if they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)  # mallopt returns 1 on success
    return _applied
