"""Keep large buffers on the heap: one glibc setting shared by the daemon and the apps.

glibc serves allocations above M_MMAP_THRESHOLD (128 KiB at first) with a fresh mmap and
gives them back with munmap, so every large ring pop, socket chunk or message would cost
page faults on first touch (measured: a 1 MiB ring pop 35 µs from the heap, 0.8-1.7 ms from
fresh mmaps). Both sides allocate one private buffer per pop and per large record, so they
raise the thresholds once per process. MRPCD_MALLOC_TUNE=0 turns this off. Trade-off: up to
_TRIM_THRESHOLD of freed heap is kept instead of returned to the kernel.
"""
from __future__ import annotations

import os

_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD = 64 << 20  # free heap kept before it is given back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def tune_malloc() -> bool:
    """Once per process (glibc only; elsewhere a no-op). True if the tuning is in force."""
    global _tuned
    if _tuned or os.environ.get("MRPCD_MALLOC_TUNE", "1") == "0":
        return _tuned
    _tuned = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass
    return True
