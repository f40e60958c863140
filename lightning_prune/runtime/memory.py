"""Giving freed host memory back to the system between the blocks of a sequential round.

glibc's ``malloc`` serves tensors below its mmap threshold (which grows to 32 MiB as large blocks are
freed) from heaps it keeps: a block's statistics, its weight copy and its solves leave free but resident
pages behind, in pieces the next block's tensors do not always fit, so the process's resident peak
climbs block after block above what is alive. :func:`release_free_memory` returns those pages
(``malloc_trim(0)``) where the C library has it, and does nothing elsewhere; no tensor is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; whether the C library could (glibc's ``malloc_trim``)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
