"""Handing freed memory back to the system (pure Python; no Dask)."""
from __future__ import annotations

import functools

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the system (glibc ``malloc_trim``), as Dask's workers are told to.

    Tiles and strips are arrays of a few MB: glibc keeps their freed pages in its heaps, and with two threads
    allocating, a 4096² subtraction's resident size grew by ~0.4 GB over what it held — memory no other
    process could use.  A no-op where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
