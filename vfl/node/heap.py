"""The node process's heap: give freed large blocks back to the OS at once (glibc only; elsewhere a no-op).

Why: glibc serves a large allocation (a numpy array, a message's buffer) from ``mmap`` only while it is above a
threshold that starts at 128 KiB and *rises* to the size of every mmapped block freed (up to 32 MiB). A PSI frees
arrays of a few MiB all the time (a chunk's points, a bucket's tokens and sort keys), so the threshold soon
climbs, those arrays land in the heap between small long-lived objects, and the heap cannot shrink: at 1M x 1M IDs
a bucketed PSI's node peaked some 60-80 MiB higher than what it held (measured with ``/proc/self/status``). A fixed
threshold keeps every block of 128 KiB or more in its own mapping, returned to the OS on ``free``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD", "return_freed_memory"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, now kept fixed


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold for this process; True if it was set (False: not glibc, or refused)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(MMAP_THRESHOLD)))
    except (OSError, AttributeError):
        return False
