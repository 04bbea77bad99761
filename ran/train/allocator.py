"""Keep freed CPU memory inside the process, so that a training step does not page-fault its activations in.

glibc's malloc serves large blocks (activations of a CIFAR batch are 4-16 MB) with fresh mmap'd pages, or
returns the top of its heap to the kernel once more than twice the dynamic mmap threshold is free. Every
training step then allocates its activations again and touches them for the first time: one page fault
per 4 KiB. Measured with `attention92_cifar` at batch 64 on 2 CPU cores, a fresh 16 MB output costs a 1x1
convolution 3 ms on top of its 0.4 ms of arithmetic, and the whole step is 7-15% faster with the settings
below (docs/performance.md). This is what launchers such as `torch.backends.xeon.run_cpu`
achieve by preloading tcmalloc or jemalloc; here it needs no library and no relaunch.

Set `RAN_MALLOC_TUNING=0` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks up to 32 MiB come from the heap and are reused
TRIM_THRESHOLD = 2**30  # free memory at the heap's top is returned to the kernel only past 1 GiB

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of returning them to the kernel (once per process; fork and
    DataLoader workers inherit it). Returns whether the setting is in force: False where the C library is not
    glibc (macOS, musl), on Windows, or with `RAN_MALLOC_TUNING=0`."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("RAN_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    return _applied
