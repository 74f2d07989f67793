"""Giving memory back: the C allocator's side of a long-running process.

Python, NumPy and PyTorch on the CPU allocate through glibc's ``malloc``.
Memory they free goes back to ``malloc``, which keeps most of it for later
instead of returning it to the system: a chunk freed in the middle of the heap
(or of a thread's arena) stays resident until :func:`trim_heap`
(``malloc_trim``) gives its pages back. That is a no-op where the C library
is not glibc.

(Limiting the arenas, ``MALLOC_ARENA_MAX=2``, was measured on ``revisit run``
and changed nothing: the arenas hold memory in use, not copies of free lists.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from functools import lru_cache

__all__ = ["rss_bytes", "trim_heap"]


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    return libc


def rss_bytes() -> int:
    """This process's resident set size now, in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def trim_heap(*, collect: bool = True) -> bool:
    """Collect garbage, then return the C heap's free pages to the system.

    Costs a few milliseconds (it walks every arena); call it after work that
    freed much (a learning chunk, an ingest run), not in a loop.

    Args:
        collect: Run the garbage collector first, so that objects kept only by
            reference cycles are freed and their memory can go too.

    Returns:
        Whether ``malloc_trim`` ran (False where the C library is not glibc).
    """
    if collect:
        gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
