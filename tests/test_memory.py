"""Giving freed memory back to the system (glibc's malloc_trim)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from revisit.memory import rss_bytes, trim_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_trim_heap_returns_pages_freed_in_the_middle_of_the_heap() -> None:
    # 160 MB of small arrays (from the heap, not mmap), every 64th kept so that the
    # heap's top stays in use and freeing the rest alone returns nothing.
    blocks = [np.ones(2048, dtype=np.float64) for _ in range(10_000)]
    kept = blocks[::64]
    del blocks
    before = rss_bytes()
    assert trim_heap()
    assert before - rss_bytes() > 60e6
    assert len(kept) == 157
