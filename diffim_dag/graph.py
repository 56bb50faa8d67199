"""Execution: with :mod:`diffim_dag.cluster` (client set-up), the only code that imports dask.

* :func:`execute` — the one executor: a visit's graph (:func:`diffim_dag.visit.visit_graph`), or a batch of
  them, computed on this process's threads or on a distributed client;
* task keys that name ``(stage, visit, detector[, tile or cell index])`` and carry the run's token
  (:func:`task_key`), and :func:`run_stage`, the body of every stage task: a permanent error becomes a
  :class:`StageFailure` value that the visit's later tasks hand on to its ``write`` task (a single
  subtraction raises it again: :func:`raise_failure`);
* :class:`TileRunner` — the runner a stage with tiled work of its own is handed (ZOGY's cells, the
  pre-convolution score's filters): each tile a task of a tiled Dask array whose chunks are the tiles
  (:func:`convolve_tiles`: the spatially varying convolution with the kernel half-width as overlap, each tile
  knowing its parent-frame origin; :func:`difference_tiles`: the per-tile combine; :func:`filter_tiles`: a
  small fixed kernel with a reflected halo).  Tiled equals untiled is tested at the kernel level.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import dask


__all__ = [
    "tile_starts",
    "planes_to_dask",
    "convolve_tiles",
    "difference_tiles",
    "filter_tiles",
    "compute",
    "lazy_parquet",
    "run_in_turn",
    "Fused",
    "run_fused",
    "execute",
    "raise_failure",
    "write_key",
    "task_key",
    "stage_of",
    "run_token",
    "StageFailure",
    "AlreadyWritten",
    "run_stage",
    "run_stage_keeping_freed",
    "run_stage_keeping_freed_below",
]

log = logging.getLogger(__name__)

def tile_starts(chunks: tuple[tuple[int, ...], tuple[int, ...]], xy0: tuple[int, int]):
    """Parent-frame (y, x) starts of every chunk."""
    ys = xy0[1] + np.concatenate([[0], np.cumsum(chunks[0])[:-1]]).astype(int)
    xs = xy0[0] + np.concatenate([[0], np.cumsum(chunks[1])[:-1]]).astype(int)
    return ys, xs


def array_view(a: np.ndarray, chunks: tuple[int, int], *, prefix: str = "plane") -> "dask.array.Array":
    """A dask array whose chunks are slices (views) of the in-memory array ``a``.

    ``da.from_array`` and tokenizing both copy the whole array (67 MB for a 4096² float32
    plane); here the array is referenced once in the graph and each tile task slices it.
    """
    import dask.array as da

    import operator
    import uuid

    from dask.highlevelgraph import HighLevelGraph

    a = np.asarray(a)
    ty, tx = chunks
    ny, nx = a.shape
    cy = tuple(min(ty, ny - y) for y in range(0, ny, ty))
    cx = tuple(min(tx, nx - x) for x in range(0, nx, tx))
    name = f"{prefix}-{uuid.uuid4().hex}"
    src = f"{name}-source"
    dsk = {src: a}
    for i, y in enumerate(range(0, ny, ty)):
        for j, x in enumerate(range(0, nx, tx)):
            dsk[(name, i, j)] = (operator.getitem, src, (slice(y, y + cy[i]), slice(x, x + cx[j])))
    return da.Array(HighLevelGraph.from_collections(name, dsk, dependencies=()), name, (cy, cx), dtype=a.dtype,
                    meta=np.empty((0, 0), dtype=a.dtype))


def planes_to_dask(image, variance, mask, tile: int | tuple[int, int]):
    """Dask arrays (chunks = tiles) from numpy or dask planes (numpy planes are not copied)."""
    import dask.array as da

    ty, tx = (tile, tile) if isinstance(tile, int) else tile

    def conv(a):
        if isinstance(a, da.Array):
            return a.rechunk((ty, tx))
        return array_view(a, (ty, tx))

    return conv(image), conv(variance), conv(mask)


def _with_halo(func, arrays, depth: int, *, boundary, xy0, dtype, extra=()):
    """map_blocks over overlapped arrays; func(*blocks, *extra, origin=(x, y)) gets each tile's halo origin."""
    import dask.array as da

    ref = arrays[0]
    ys, xs = tile_starts(ref.chunks, xy0)
    over = [da.overlap.overlap(a, depth={0: depth, 1: depth}, boundary=boundary) for a in arrays]

    def block(*args, block_id=None):
        n = len(over)
        blocks, rest = args[:n], args[n:]
        origin = (int(xs[block_id[1]]) - depth, int(ys[block_id[0]]) - depth)
        return func(*blocks, *rest, origin=origin)

    out = da.map_blocks(block, *over, *extra, dtype=dtype, meta=np.array((), dtype=dtype))
    return da.overlap.trim_internal(out, {0: depth, 1: depth}, boundary=boundary)


def convolve_tiles(image, variance, mask, solution, *, half_width: int, xy0, skip_bits: int = 0):
    """Tile-parallel ``image ⊗ K``, ``variance ⊗ K²`` and mask dilation by the kernel footprint.

    ``solution`` may be a :class:`~diffim_dag.kernels.solution.KernelSolution` or a
    ``dask.delayed`` one (then the kernel fit and the convolution form one graph);
    ``half_width`` must be known when the graph is built.
    """
    from .kernels.convolve import convolve_spatial, convolve_variance_spatial
    from .kernels.maskops import dilate_mask

    def conv_image(block, sol, origin):
        return convolve_spatial(block, sol, origin=origin).astype(np.float32, copy=False)

    def conv_var(block, sol, origin):
        return convolve_variance_spatial(block, sol, origin=origin).astype(np.float32, copy=False)

    def conv_mask(block, origin):
        return dilate_mask(block, 2 * half_width + 1, skip_bits=skip_bits).astype(np.int32)

    h = int(half_width)
    return (
        _with_halo(conv_image, [image], h, boundary=0, xy0=xy0, dtype=np.float32, extra=(solution,)),
        _with_halo(conv_var, [variance], h, boundary=0, xy0=xy0, dtype=np.float32, extra=(solution,)),
        _with_halo(conv_mask, [mask], h, boundary=0, xy0=xy0, dtype=np.int32),
    )


def difference_tiles(science, template, *, mode, kernel_sum, background_solution, subtract_background,
                     xy0, shape, half_width, edge_bit):
    """Per-tile difference (see :func:`diffim_dag.stages.subtract.difference_tile`) plus EDGE.

    ``science`` and ``template`` are (image, variance, mask) triples of equally chunked dask arrays.
    Returns float32 image and variance and the int32 mask as dask arrays.
    """
    import dask.array as da

    from .stages.subtract import combine_tile, edge_bits_for_tile

    ys, xs = tile_starts(science[0].chunks, xy0)

    def values(si, sv, sm, ti, tv, tm, sol, ksum, block_id=None):
        # the output has a new leading axis: block_id = (0, iy, ix)
        origin = (int(xs[block_id[-1]]), int(ys[block_id[-2]]))
        d, v, _ = combine_tile(si, sv, sm, ti, tv, tm, sol, ksum, mode=mode, subtract_background=subtract_background,
                               origin=origin, xy0=xy0, shape=shape, half_width=half_width, edge_bit=edge_bit)
        return np.stack((d, v))

    def mask(sm, tm, block_id=None):
        origin = (int(xs[block_id[1]]), int(ys[block_id[0]]))
        return (sm | tm | edge_bits_for_tile(sm.shape, origin, xy0, shape, half_width, edge_bit)).astype(np.int32)

    stacked = da.map_blocks(values, *science, *template, background_solution, kernel_sum,
                            new_axis=0, chunks=((2,),) + science[0].chunks, dtype=np.float32,
                            meta=np.array((), dtype=np.float32))
    msk = da.map_blocks(mask, science[2], template[2], dtype=np.int32, meta=np.array((), dtype=np.int32))
    return stacked[0], stacked[1], msk


def filter_tiles(image, kernel, *, half_width: int, xy0):
    """Tile-parallel FFT convolution with a small fixed kernel (reflected halo at the image border)."""
    from .stages.subtract import apply_small_kernel

    def f(block, k, origin):
        return apply_small_kernel(block, k).astype(np.float32, copy=False)

    return _with_halo(f, [image], int(half_width), boundary="reflect", xy0=xy0, dtype=np.float32, extra=(kernel,))


def _cores() -> int:
    """Threads of an in-process run: one per core.  (Dask's threaded scheduler, called from a task's thread
    without ``num_workers``, starts Python's default of cores + 4: a 4096² ZOGY ran four cells at once on two
    cores, 0.1 GB more at its peak.)"""
    return os.cpu_count() or 1


#: Packages imported before a graph's threads start (:func:`import_shared_packages`): their first import must not
#: happen on two threads at once.  SciPy's: a thread initialising ``scipy`` while another imports a subpackage
#: (whose ``__init__`` imports ``scipy._lib._testutils``, which waits for ``scipy``) is an import cycle across
#: threads, which Python breaks by handing one thread a partially initialised module: the task then fails with
#: "cannot import name 'PytestTester' from partially initialized module" (seen once: the two ``exposure`` tasks of
#: a 384² subtraction, during a parallel test run).  The package alone: 5 ms once NumPy is loaded; the
#: subpackages, imported on the threads that need them, then find it whole.
SHARED_IMPORTS = ("scipy",)


def import_shared_packages() -> None:
    """Import :data:`SHARED_IMPORTS` here, before any task thread could start importing them."""
    import importlib

    for name in SHARED_IMPORTS:
        importlib.import_module(name)


def _THREADS(*args, **kwargs):
    """Dask's threaded scheduler, passed as a function: dask then does not import distributed to look for a
    client (0.25 s of every single-visit run's start-up).  :data:`SHARED_IMPORTS` first, before its threads."""
    from dask.threaded import get

    import_shared_packages()
    return get(*args, **kwargs)


def execute(dsk: dict, keys, *, client=None):
    """The executor: compute ``keys`` of the graph ``dsk`` on ``client`` (a distributed client: a
    LocalCluster, a scheduler, Kubernetes), or in this process on one thread per core (Dask's threaded
    scheduler: no cluster start-up, no pixels shipped).

    In process, an error reaches the caller only once no task of the graph runs any more (Dask's scheduler
    raises the first error while the other threads' tasks go on): the caller's clean-up — an output set's
    temporary folder — cannot be undone by a task still writing."""
    if client is not None:
        return client.get(dsk, keys)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(_cores(), thread_name_prefix="diffim-dag")
    try:
        return _THREADS(dsk, keys, num_workers=_cores(), pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Fused:
    """A piece of a graph run as one task (:func:`run_fused`): its tasks run in turn where that task runs, so
    their intermediate results never travel between workers.  Dask does not look inside it."""

    def __init__(self, dsk: dict, key):
        self.dsk, self.key = dsk, key


def run_fused(fused: Fused):
    """The body of a fused task: its graph's ``key``, computed in turn."""
    return dask.get(fused.dsk, fused.key)


def run_in_turn(dsk: dict, key):
    """Compute ``key`` of the low-level graph ``dsk`` here, task after task (Dask's synchronous scheduler)."""
    return dask.get(dsk, key)


def lazy_parquet(path):
    """A Parquet dataset (Hive-partitioned folders) as a lazy ``dask.dataframe``."""
    import dask.dataframe as dd

    return dd.read_parquet(str(path))


def compute(*collections, client=None, threads: int | None = None):
    """Compute on ``client`` when given, else with the threaded scheduler (``threads``: its threads, one per core
    by default).

    Without a client, arrays are stored tile by tile into preallocated numpy arrays
    (``da.store``), so no output is ever held twice (chunk list + concatenation).
    """
    import dask.array as da

    if client is not None:
        futures = client.compute(list(collections))
        return tuple(client.gather(futures))
    n = int(threads) if threads else _cores()
    if all(isinstance(c, da.Array) for c in collections):
        targets = [np.empty(c.shape, dtype=c.dtype) for c in collections]
        da.store(list(collections), targets, lock=False, scheduler=_THREADS, num_workers=n)
        return tuple(targets)
    return dask.compute(*collections, scheduler=_THREADS, num_workers=n)


def tile_mapper(client=None, *, prefix: str = "detect-measure"):
    """A ``map_tiles(function, tasks)`` hook: each task (a kwargs dict) becomes one Dask task."""
    def run(function, tasks):
        if not tasks:
            return []
        keys = [f"{prefix}-{i}-{dask.base.tokenize(t.get('origin'), t.get('core_bbox'))}" for i, t in enumerate(tasks)]
        if client is not None:
            return client.gather(client.map(function, list(tasks), key=keys))
        delayed = [dask.delayed(function, pure=True)(t, dask_key_name=k) for t, k in zip(tasks, keys)]
        return list(dask.compute(*delayed, scheduler=_THREADS, num_workers=_cores()))

    return run


class TileRunner:
    """The :mod:`diffim_dag.stages.runner` interface on Dask: each tile or cell one task, on ``client`` (the
    threaded scheduler in this process when None, on ``threads`` threads: one per core by default).  The
    orchestration builds it and hands it to a stage as ``runner=``; the stage never sees the client.

    A task on a cluster's worker gets one with ``threads`` its worker's: the same tiles, so the same bits as the
    command line's run (one thread: the tiles in turn, the cells in turn without a graph)."""

    def __init__(self, client=None, *, tile_size: int | tuple[int, int], threads: int | None = None):
        self.client = client
        self.tile_size = tile_size
        self._threads = int(threads) if threads and client is None else None

    @property
    def distributed(self) -> bool:
        return self.client is not None

    @property
    def threads(self) -> int:
        if self._threads:
            return self._threads
        if self.client is not None:
            try:
                return int(sum(self.client.nthreads().values())) or 1
            except Exception:  # noqa: BLE001 - a client without nthreads(): fall back to the cores
                pass
        return os.cpu_count() or 1

    def map(self, function, tasks, *, prefix: str = "task"):
        if self._threads == 1:
            return [function(t) for t in tasks]
        return tile_mapper(self.client, prefix=prefix)(function, tasks)

    def filter(self, image, kernel, *, xy0):
        d = planes_to_dask(image, image, image, self.tile_size)[0]
        (out,) = compute(filter_tiles(d, kernel, half_width=kernel.shape[0] // 2, xy0=xy0), client=self.client,
                         threads=self._threads)
        return np.asarray(out, dtype=np.float32)

    def convolve_difference(self, science, template, solution, *, kernel_sum, xy0, skip_bits: int, **common):
        t_d = planes_to_dask(*template, self.tile_size)
        s_d = planes_to_dask(*science, self.tile_size)
        conv = convolve_tiles(*t_d, solution, half_width=solution.half_width, xy0=xy0, skip_bits=skip_bits)
        diff_d = difference_tiles(s_d, conv, kernel_sum=kernel_sum, background_solution=solution, xy0=xy0, **common)
        return compute(*diff_d, client=self.client, threads=self._threads)


# --------------------------------------------------------------------------- the graph of one (visit, detector)
#
# Keys are tuples (stage, visit, detector[, index...]); see visit_graph.  The graph holds paths, the frozen
# config, the output folder and the tile/cell indices: never pixels.  Pixels are read by the ("template", V, D)
# task on a worker and flow between the tasks of that visit inside the cluster.


class Passthrough:
    """A task result that every later stage of the visit hands on unchanged, up to its ``write`` task."""


@dataclass(frozen=True)
class StageFailure(Passthrough):
    """A permanent error (:class:`~diffim_dag.errors.DiffimError` with ``permanent``) of one stage, as a value.

    The ``write`` task of the visit turns it into a ``failed`` record with ``reason`` and ``error``; a single
    subtraction raises it again (:func:`raise_failure`).  ``exception`` (the error itself) stays in the
    process that raised it: pickling keeps the strings only.
    """

    stage: str
    visit: int
    detector: int
    error: str
    reason: str
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def __reduce__(self):
        return (StageFailure, (self.stage, self.visit, self.detector, self.error, self.reason))


def raise_failure(value):
    """``value``, unless it is a :class:`StageFailure`: then its error is raised (rebuilt from its class name and
    message when it crossed processes)."""
    if not isinstance(value, StageFailure):
        return value
    if value.exception is not None:
        raise value.exception
    from . import errors

    cls = getattr(errors, value.error, None)
    try:
        exc = cls(value.reason) if isinstance(cls, type) and issubclass(cls, errors.DiffimError) else None
    except Exception:  # noqa: BLE001 - an error class with other arguments
        exc = None
    raise exc if exc is not None else errors.DiffimError(value.reason)


@dataclass(frozen=True)
class AlreadyWritten(Passthrough):
    """This run already installed the visit's outputs (an earlier attempt whose worker died before reporting)."""

    visit: int
    detector: int
    manifest: dict


def _passthrough(args) -> Passthrough | None:
    for a in args:
        if isinstance(a, Passthrough):
            return a
        if isinstance(a, list):
            for b in a:
                if isinstance(b, Passthrough):
                    return b
    return None


def run_stage(stage: str, visit: int, detector: int, function, *args):
    """Run ``function(*args)`` as stage ``stage`` of (visit, detector): the body of every stage task.

    A :class:`Passthrough` among the arguments (or in a list argument) is returned as it is; a permanent
    :class:`~diffim_dag.errors.DiffimError` becomes a :class:`StageFailure`; any other exception propagates,
    so that the scheduler retries the task.  The memory the task freed is handed back to the system afterwards,
    except on a Dask worker below half its memory limit, which keeps it for its next tasks
    (:func:`_worker_keeps_freed_memory`).
    """
    return _run_stage(stage, visit, detector, function, args, release=True)


def run_stage_keeping_freed(stage: str, visit: int, detector: int, function, *args):
    """:func:`run_stage` that keeps the memory the task freed for the next tasks instead of handing it back: for
    stages that the process's next stages follow within a second with allocations as large (on a virtual
    machine, memory handed back is reclaimed by the host within 1–2 s, and touching it again costs up to 8 s per
    GB)."""
    return _run_stage(stage, visit, detector, function, args, release=False)


def run_stage_keeping_freed_below(limit: int, stage: str, visit: int, detector: int, function, *args):
    """:func:`run_stage` that hands the memory the task freed back only once the process's resident size is above
    ``limit`` bytes: below it the next tasks reuse that memory instead of touching fresh pages
    (:data:`~diffim_dag.visit.KEEP_PLANES` gives the in-process run's limit)."""
    return _run_stage(stage, visit, detector, function, args, release=limit)


def _hands_back(release: bool | int) -> bool:
    """Whether a task whose runner says ``release`` (True, False or a resident-size limit) hands back what it freed."""
    from .memory import resident_bytes

    if release is True:
        return not _worker_keeps_freed_memory()
    if release is False:
        return False
    resident = resident_bytes()
    return resident is None or resident > release


def _run_stage(stage: str, visit: int, detector: int, function, args, *, release: bool | int):
    from .errors import DiffimError
    from .memory import release_freed_memory

    marker = _passthrough(args)
    if marker is not None:
        return marker
    try:
        return function(*args)
    except DiffimError as exc:
        if not getattr(exc, "permanent", True):
            raise
        log.info("visit %s detector %s: %s failed: %s", visit, detector, stage, exc)
        return StageFailure(stage=stage, visit=visit, detector=detector, error=type(exc).__name__, reason=str(exc),
                            exception=exc)
    finally:
        if _hands_back(release):
            release_freed_memory()


#: On a Dask worker, the tasks keep the memory they free for the worker's next tasks while the process's resident
#: size is at most this fraction of the worker's memory limit (below Dask's own thresholds: managed data is spilled
#: from 0.6 or 0.7 of it, and the worker pauses at 0.8), and hand it back above it.
WORKER_KEEP_FRACTION = 0.5


def _worker_keeps_freed_memory() -> bool:
    """Whether this task runs on a Dask worker that keeps what its tasks free: its resident size at most
    :data:`WORKER_KEEP_FRACTION` of its memory limit, or it has no limit (glibc still hands back a free top of the
    heap above ``M_TRIM_THRESHOLD``, 1 GiB: :func:`~diffim_dag.memory.reuse_freed_memory`).

    A worker runs task after task, each allocating what the last one freed: handed back after every task, that
    memory came back as fresh pages the kernel zeroed (and the host backed again) every time.  A batch of 6 visits
    of 2048² (``benchmarks/bench_batch.py --repeats 3``, medians): 24.3 s on one worker instead of 33.8 s, 16.4 s
    on two instead of 19.2 s, with about the same peak per worker (0.97–1.00 GB against 0.92–0.97 GB).  In this
    process (no worker) a single run pays for its high-water mark, which keeping everything raised (1.75 GB against
    1.3 GB at 4096²): its tasks keep what they free below a limit instead (:func:`run_stage_keeping_freed_below`,
    :data:`~diffim_dag.visit.KEEP_PLANES`)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:  # no worker here (a worker's process has imported distributed)
        return False
    try:
        worker = distributed.get_worker()
    except ValueError:  # not in a worker's task
        return False
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    if not limit:
        return True
    monitor = getattr(worker, "monitor", None)  # (a worker without one: handed back, as before)
    return monitor is not None and monitor.get_process_memory() <= WORKER_KEEP_FRACTION * limit


@functools.lru_cache(maxsize=64)  # one hash per run, not per task key
def run_token(run_id: str) -> str:
    """The token every task key of a run carries (32 hex digits of the run id's SHA-256).

    Two runs over the same visits on one shared scheduler (different run ids) never share a key, so
    they never share results; Dask's dashboard still groups the tasks by stage (it drops hex tokens).
    """
    return hashlib.sha256(run_id.encode()).hexdigest()[:32]


def task_key(stage: str, visit: int, detector: int, *index: int, run_id: str = "") -> tuple:
    """``("STAGE-TOKEN", visit, detector[, index...])``: the key of one task of a run."""
    return (f"{stage}-{run_token(run_id)}", int(visit), int(detector), *index)


def stage_of(key: tuple) -> str:
    """The stage of a task key (its name without the run token)."""
    return key[0].rsplit("-", 1)[0]


def write_key(visit: int, detector: int, run_id: str = "") -> tuple:
    """The key of a visit's last task in run ``run_id`` (its result is the visit's record)."""
    return task_key("write", visit, detector, run_id=run_id)


