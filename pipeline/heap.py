"""glibc's malloc set for a process whose tensors are large and short-lived.

torch's CPU tensors come from malloc. glibc hands out blocks above 32 MB (and every block a
thread other than the main one asks for above 64 MB) by mmap, and gives them back to the kernel
when they are freed, so each forward pass of a network at 1024 x 1024 faults in its large
activations afresh, a page at a time: 250,000 page faults and 0.5 s of kernel time a photo for
IS-Net on the nnpack runtime here, 10 to 15% of its time with two photos at once. One heap that keeps
what is freed lets each pass reuse the pages of the last (scripts/bench_heap.py); the process
then holds on to its peak, which it reaches again with the next photo.

The settings hold for threads that first allocate after them, so `pipeline` sets them when it
is imported, before the job starts its threads (a process that started threads of its own
before importing it keeps their arenas). Only glibc's malloc has these settings; elsewhere
(macOS, musl) nothing changes. A setting given in the environment (MALLOC_ARENA_MAX and the
others, read by glibc at start-up) is kept.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h) -> the environment variable that sets each at start-up
# and the value used here.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
SETTINGS = {
    # every thread allocates from the main heap, which is not limited to 64 MB a block
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 1),
    # blocks up to 1 GiB come from the heap, not from a mapping of their own
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 30),
    # freed memory at the heap's top stays there for the next pass
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, (1 << 31) - 1),
}


def keep_freed_memory() -> list[str]:
    """Sets glibc's malloc as above, each setting the environment does not give; returns the
    names of those set (none where the C library is not glibc's)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return []
    # gnu_get_libc_version is glibc's own: musl also has a mallopt, which does nothing
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return []
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return [name for name, (param, value) in SETTINGS.items() if name not in os.environ and mallopt(param, value) == 1]
