"""Memory and threads of the process: freed memory handed back to the system, OpenBLAS's idle threads put to
sleep (pure Python; no Dask, no NumPy)."""
from __future__ import annotations

import functools
import os
import sys

__all__ = ["release_freed_memory", "quiet_idle_blas_threads"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Hand the memory freed so far back to the system (glibc ``malloc_trim``), as Dask's workers are told to.

    Tiles, strips and FFT cells are arrays of a few MB: glibc allocates them below its mmap threshold from
    the thread's arena, and once freed their pages stay resident unless the heap is trimmed.  With two
    threads allocating, a 4096² subtraction's resident size grew by ~0.4 GB over what it held — memory no
    other process could use.  Live memory is untouched.

    Returns whether the C library released any memory (False where it has no ``malloc_trim``).
    """
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))


def quiet_idle_blas_threads() -> None:
    """Have OpenBLAS's idle threads sleep at once instead of spinning, when NumPy is not loaded yet.

    After each call OpenBLAS's worker threads spin for 2²⁸ cycles (~0.1 s) before they sleep; beside the
    pipeline's own threads that spinning took ~10 % of a 4096² subtraction's CPU time.
    ``OPENBLAS_THREAD_TIMEOUT`` (read when OpenBLAS loads) set to its minimum makes them sleep; the number of
    BLAS threads, and so every value computed, stays the same.  A value already in the environment is kept.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
