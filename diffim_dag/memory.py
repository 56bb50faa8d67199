"""Memory and threads of the process: freed memory handed back to the system, OpenBLAS's idle threads put to
sleep, the command line's allocator settings, memory touched ahead and garbage-collector freeze, and the helpers that
map work over threads in order or start it beside the caller's (pure Python; no Dask, no NumPy)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys

__all__ = ["release_freed_memory", "resident_bytes", "reuse_freed_memory", "small_pages_for_arrays",
           "touch_heap_ahead", "heap_touched_ahead", "quiet_idle_blas_threads", "imported_out_of_collection",
           "map_on_threads", "started_on_thread"]


@functools.lru_cache(maxsize=None)
def _glibc(name: str):
    """The C library's function ``name`` (``malloc_trim``, ``mallopt``) with its C signature; None where the C
    library has none (macOS, musl).  Looked up among the symbols the process has loaded (the C library's among
    them), not with ``ctypes.util.find_library``, which runs ``ldconfig -p`` as a child process (``bench_cli``, which
    polls the command's process tree, saw it as a 0.5 GB child of a 2048² run: the vfork shares the parent's memory)."""
    import ctypes

    signatures = {"malloc_trim": ([ctypes.c_size_t], ctypes.c_int),
                  "mallopt": ([ctypes.c_int, ctypes.c_int], ctypes.c_int),
                  "malloc": ([ctypes.c_size_t], ctypes.c_void_p), "free": ([ctypes.c_void_p], None),
                  "memset": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t], ctypes.c_void_p)}
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):  # (TypeError: Windows' ctypes loads no library by None)
        return None
    function.argtypes, function.restype = signatures[name]
    return function


#: glibc ``mallopt`` parameters (``malloc.h``) and the environment variables that set them at start-up.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_ALLOCATOR = ((_M_ARENA_MAX, "MALLOC_ARENA_MAX", 1), (_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 1 << 30),
              (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 1 << 30))
#: NumPy's advice to the kernel to back each array of 4 MB or more with 2 MB pages, read when NumPy loads.
_HUGEPAGE_ADVICE = ("NUMPY_MADVISE_HUGEPAGE", "0")


def allocator_environment() -> dict:
    """The environment variables that give a new process the settings of :func:`reuse_freed_memory` and
    :func:`small_pages_for_arrays` (for the worker processes of a LocalCluster), less those the environment
    already sets."""
    settings = [(name, str(value)) for _, name, value in _ALLOCATOR] + [_HUGEPAGE_ADVICE]
    return {name: value for name, value in settings if name not in os.environ}


def reuse_freed_memory() -> bool:
    """Have glibc reuse the memory a task frees for the next arrays, instead of handing each large array fresh
    pages from the system (which the kernel must zero: 17 % of a 4096² subtraction's CPU time went to
    ``clear_page``).  Call it once, before NumPy loads (``import diffim_dag.cli`` loads none): glibc gives a
    thread that allocates before the settings, such as the OpenBLAS threads NumPy starts, an arena of its own,
    which task threads then share whatever the settings.  For a process of ours (the command line), not a
    host's (a notebook), whose allocator is its own business.

    * one arena (``M_ARENA_MAX`` 1): a thread's own arena holds at most 64 MB, so a 4096² plane that a task
      thread allocated was a fresh mapping every time, and freed memory went straight back;
    * arrays up to 1 GiB from the heap (``M_MMAP_THRESHOLD``), not each from a new mapping;
    * no trimming at every ``free`` (``M_TRIM_THRESHOLD``): :func:`release_freed_memory` still hands the freed
      memory back after every task, so the peak resident size stays where it was.

    A 4096² subtraction on 2 cores (6 interleaved pairs each): with the settings in the environment, wall 0.90×
    and system time 3.8 s instead of 5.4 s; as calls made after NumPy had loaded (the task threads then had an
    arena of their own), 0.98×; as calls before NumPy, 1.04× in a quieter phase of the machine (within its
    noise; the task threads' arrays no longer come from fresh mappings).  Peak 1.25–1.29 GB either way.  (The
    command line made these calls after its logging set-up, which loads NumPy, until the 2026-12-05 stop: its task
    threads used the OpenBLAS threads' arenas until then.)
    A setting that the environment already makes (``MALLOC_ARENA_MAX`` …) is kept.  Returns whether the settings
    were applied (False where the C library is not glibc)."""
    global _reusing
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    ok = True
    for param, name, value in _ALLOCATOR:
        if name not in os.environ:
            ok = bool(mallopt(param, value)) and ok
    _reusing = ok and not any(name in os.environ for _, name, _ in _ALLOCATOR)
    return ok


#: Whether :func:`reuse_freed_memory` set all of its settings itself (none came from the environment).
_reusing = False
#: Float32 planes of the science image's size that the command line has :func:`touch_heap_ahead` touch, and at most
#: this many bytes (below the 1 GiB thresholds of :func:`reuse_freed_memory`, so that the block comes from the heap and
#: stays there once freed).  A run keeps what it frees up to 16 planes above what it held when its graph was built
#: (:data:`diffim_dag.visit.KEEP_PLANES`, at most :data:`~diffim_dag.visit.KEEP_MAX_BYTES`): the memory touched ahead
#: is part of that, not more.
TOUCH_AHEAD_PLANES = 12
TOUCH_AHEAD_MAX_BYTES = 768 << 20
_touched_ahead = 0


def touch_heap_ahead(nbytes: int):
    """Touch ``nbytes`` of the C heap on a thread of its own and free them again, where :func:`reuse_freed_memory`'s
    settings hold (the block then comes from the heap, and the heap keeps it once freed): the arrays allocated next
    reuse those pages instead of touching fresh ones.

    For the command line's single subtraction, whose start-up (about 0.6 s of imports) leaves a core idle: the
    kernel's work of backing and zeroing the pages (on the virtual machines this tool is measured on, the slowest
    part of a page's first touch) is done there instead of inside the reads and the stages after them.  The block is
    filled by ``memset`` calls of 32 MB, each with the interpreter lock free.  Returns the thread (None when
    nothing was started: no glibc, settings from the environment, or nothing to touch); :func:`heap_touched_ahead`
    gives the bytes, which the in-process graph's memory limit leaves out of the resident size it starts from."""
    nbytes = min(int(nbytes), TOUCH_AHEAD_MAX_BYTES)
    malloc, memset, free = _glibc("malloc"), _glibc("memset"), _glibc("free")
    if nbytes <= 0 or not _reusing or None in (malloc, memset, free):
        return None
    import threading

    def touch():
        global _touched_ahead
        block = malloc(nbytes)
        if not block:
            return
        for start in range(0, nbytes, _TOUCH_CHUNK_BYTES):
            size = min(_TOUCH_CHUNK_BYTES, nbytes - start)
            _touched_ahead += size  # (counted first: a limit taken meanwhile errs low, by a chunk at most)
            memset(block + start, 0, size)
        free(block)

    thread = threading.Thread(target=touch, name="diffim-touch-ahead", daemon=True)
    thread.start()
    return thread


#: Bytes per ``memset`` call of :func:`touch_heap_ahead` (its progress is counted call by call).
_TOUCH_CHUNK_BYTES = 32 << 20


def heap_touched_ahead() -> int:
    """The bytes :func:`touch_heap_ahead` has touched so far in this process, the chunk under way included (0 if
    none): resident memory that the allocator holds for the next arrays, not data."""
    return _touched_ahead


def small_pages_for_arrays() -> bool:
    """Have NumPy leave its large arrays on ordinary 4 kB pages: no advice to the kernel to back them with 2 MB
    pages (``NUMPY_MADVISE_HUGEPAGE=0``, which NumPy reads when it loads; it gives that advice on Linux by default).

    On the virtual machines this tool is measured on (free page reporting: the guest hands its free 8 MB blocks
    back to the host), a 2 MB page that a fault brings in has often been handed back, and the host must back and
    zero it again; 4 kB pages mostly come from memory freed a moment before.  How much that costs depends on what
    ran before.  A 4096² subtraction on 2 cores took 0.83× and 0.81× the time with 2 MB pages when the two
    alternated (8 and 4 pairs; system time 3.5 s against 7.2 s), where each 2 MB-page run followed a 4 kB-page
    one.  Each run after 10 s of rest, it took 0.85× (4 rounds) and, later, 0.97× (5 rounds); back to back with
    itself, 0.92×.  The peak was the same, and so were the bits.  At 2048² the alternating pairs gave 0.84×; at
    1024², 1.01×.  A batch of 6 visits of 2048² (3 alternating rounds): 22.1 s instead of 24.6 s on one worker,
    13.0 s instead of 14.6 s on two.  Like :func:`reuse_freed_memory`, for a process of ours (the command line, a
    LocalCluster's workers), called before NumPy loads; a value already in the environment is kept
    (``NUMPY_MADVISE_HUGEPAGE=1`` gives the 2 MB pages back, for a machine where they
    pay).  Returns whether NumPy will load without the advice."""
    if "numpy" in sys.modules:
        return False
    name, value = _HUGEPAGE_ADVICE
    os.environ.setdefault(name, value)
    return os.environ[name] == value


def release_freed_memory() -> bool:
    """Hand the memory freed so far back to the system (glibc ``malloc_trim``), as Dask's workers are told to.

    Tiles, strips and FFT cells are arrays of a few MB: glibc allocates them below its mmap threshold from
    the thread's arena, and once freed their pages stay resident unless the heap is trimmed.  With two
    threads allocating, a 4096² subtraction's resident size grew by ~0.4 GB over what it held — memory no
    other process could use.  Live memory is untouched.

    Returns whether the C library released any memory (False where it has no ``malloc_trim``).
    """
    trim = _glibc("malloc_trim")
    return bool(trim is not None and trim(0))


def resident_bytes() -> int | None:
    """This process's resident size in bytes (Linux ``/proc/self/statm``); None where the system gives none."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def imported_out_of_collection():
    """For a process of ours (the command line), around the import of what its command runs: no garbage
    collection while the modules load, and then the objects that exist (the loaded modules' functions, classes and
    tables) taken out of the collector's passes for good (``gc.freeze``).

    Every full pass walks every tracked object, and the stack's ~1800 modules hold most of them: the collections
    of a 1024² subtraction took 0.27 s of its 3.2 s, 0.17 s of it in three full passes, with the interpreter lock
    held.  With the objects of the modules loaded by then frozen, they took 0.16 s, 0.09 s in the full passes
    (the modules the tasks load later are still walked).  Objects made later are collected as before; the frozen
    ones live as long as the process anyway.
    """
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def quiet_idle_blas_threads() -> None:
    """Have OpenBLAS's idle threads sleep at once instead of spinning, when NumPy is not loaded yet.

    After each call OpenBLAS's worker threads spin for 2²⁸ cycles (~0.1 s) before they sleep; beside the
    pipeline's own threads that spinning took ~10 % of a 4096² subtraction's CPU time.
    ``OPENBLAS_THREAD_TIMEOUT`` (read when OpenBLAS loads) set to its minimum makes them sleep; the number of
    BLAS threads, and so every value computed, stays the same.  A value already in the environment is kept.
    """
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def map_on_threads(function, items, workers: int = 1):
    """``function(item)`` for each of ``items``, in their order, as an iterator: on up to ``workers`` threads when
    there are more than one of both (for work whose NumPy, FFT or C calls release the GIL), else in turn.  The
    results come as they are ready, in order, so a caller can place each and drop it (never all at once)."""
    items = list(items)
    if int(workers) <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(int(workers), len(items)), thread_name_prefix="diffim-map") as pool:
        yield from pool.map(function, items)


def started_on_thread(function, start: bool = True):
    """``function()`` begun on a thread of its own, for work that can go on beside the caller's: returns a callable
    that waits for it and gives its result (or raises its exception).  ``start=False``: run here and now (an
    exception is raised here), for a caller with one core to itself."""
    if not start:
        result = function()
        return lambda: result
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffim-beside")
    future = pool.submit(function)
    pool.shutdown(wait=False)  # (its one thread ends with the function)
    return future.result
