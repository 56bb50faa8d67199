"""Dask wiring: with :mod:`diffim_dag.cluster` (client set-up), the only code that imports dask.

It turns the pure kernels into tiled graphs.  Tiles are the chunks of the
exposure planes; every tiled operation here has an eager twin that runs the same
pure function on the whole array as one tile (``tiled == eager`` is tested).

* :func:`convolve_tiles`: spatially varying convolution of image (K), variance
  (K²) and mask (dilation) with an overlap of the kernel half-width; each tile
  knows its parent-frame origin, so the Chebyshev spatial terms use absolute
  coordinates.
* :func:`difference_tiles`: the per-tile combine (difference, variance, masks,
  background, EDGE).
* :func:`filter_tiles`: a fixed small kernel (the decorrelation kernel) applied by
  FFT per tile with a reflected halo.

The batch graph is built here too: :func:`visit_graph` turns one (visit, detector) into a
low-level graph of its stages with readable, stable keys ``(stage, visit, detector[, tile or
cell index])`` — template, kernel sources, one task per kernel cell, spatial solve, one
subtract/decorrelate/detect task per tile, difference, detection set-up, catalogue, write — and
:func:`batch_graph` is the union over visits.  The tasks call the same stage functions as
:func:`diffim_dag.pipeline.subtract_exposures` (tile for tile the same numbers as its tiled
path); a permanent error becomes a :class:`StageFailure` value that the visit's later tasks hand
on to its ``write`` task (:func:`run_stage`).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

import dask
import dask.array as da


__all__ = [
    "tile_starts",
    "planes_to_dask",
    "convolve_tiles",
    "difference_tiles",
    "filter_tiles",
    "compute",
    "lazy_parquet",
    "visit_graph",
    "batch_graph",
    "compute_visit",
    "write_key",
    "task_key",
    "stage_of",
    "run_token",
    "VisitGrid",
    "visit_grid",
    "StageFailure",
    "AlreadyWritten",
    "run_stage",
]

log = logging.getLogger(__name__)

#: The exposures of a visit whose PSF tasks are ``("psf", V, D, i)``, in index order.
PSF_ROLES = ("science", "template")


def tile_starts(chunks: tuple[tuple[int, ...], tuple[int, ...]], xy0: tuple[int, int]):
    """Parent-frame (y, x) starts of every chunk."""
    ys = xy0[1] + np.concatenate([[0], np.cumsum(chunks[0])[:-1]]).astype(int)
    xs = xy0[0] + np.concatenate([[0], np.cumsum(chunks[1])[:-1]]).astype(int)
    return ys, xs


def array_view(a: np.ndarray, chunks: tuple[int, int], *, prefix: str = "plane") -> da.Array:
    """A dask array whose chunks are slices (views) of the in-memory array ``a``.

    ``da.from_array`` and tokenizing both copy the whole array (67 MB for a 4096² float32
    plane); here the array is referenced once in the graph and each tile task slices it.
    """
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
    ty, tx = (tile, tile) if isinstance(tile, int) else tile

    def conv(a):
        if isinstance(a, da.Array):
            return a.rechunk((ty, tx))
        return array_view(a, (ty, tx))

    return conv(image), conv(variance), conv(mask)


def _with_halo(func, arrays, depth: int, *, boundary, xy0, dtype, extra=()):
    """map_blocks over overlapped arrays; func(*blocks, *extra, origin=(x, y)) gets each tile's halo origin."""
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
        return convolve_spatial(block, sol, origin=origin).astype(np.float32)

    def conv_var(block, sol, origin):
        return convolve_variance_spatial(block, sol, origin=origin).astype(np.float32)

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


def template_mask_tiles(mask, mask_planes: dict, *, kept):
    """Per-tile template mask rules (see :func:`diffim_dag.kernels.maskops.template_mask_for_difference`)."""
    from .kernels.maskops import template_mask_for_difference

    return da.map_blocks(template_mask_for_difference, mask, mask_planes, kept=tuple(kept), dtype=np.int32,
                         meta=np.array((), dtype=np.int32))


def decorrelated_variance_tiles(variance, mask, variance_unconvolved, variance_convolved, *, kappa, keep_bits):
    """Per-tile :func:`diffim_dag.stages.subtract.decorrelated_variance`."""
    from .stages.subtract import decorrelated_variance

    return da.map_blocks(decorrelated_variance, variance, mask, variance_unconvolved, variance_convolved,
                         kappa=kappa, keep_bits=keep_bits, dtype=np.float32, meta=np.array((), dtype=np.float32))


def filter_tiles(image, kernel, *, half_width: int, xy0):
    """Tile-parallel FFT convolution with a small fixed kernel (reflected halo at the image border)."""
    from .stages.subtract import apply_small_kernel

    def f(block, k, origin):
        return apply_small_kernel(block, k).astype(np.float32)

    return _with_halo(f, [image], int(half_width), boundary="reflect", xy0=xy0, dtype=np.float32, extra=(kernel,))


def _THREADS(*args, **kwargs):
    """Dask's threaded scheduler, passed as a function: dask then does not import distributed to look for a
    client (0.25 s of every single-visit run's start-up)."""
    from dask.threaded import get

    return get(*args, **kwargs)


def lazy_parquet(path):
    """A Parquet dataset (Hive-partitioned folders) as a lazy ``dask.dataframe``."""
    import dask.dataframe as dd

    return dd.read_parquet(str(path))


def compute(*collections, client=None):
    """Compute on ``client`` when given, else with the threaded scheduler.

    Without a client, arrays are stored tile by tile into preallocated numpy arrays
    (``da.store``), so no output is ever held twice (chunk list + concatenation).
    """
    if client is not None:
        futures = client.compute(list(collections))
        return tuple(client.gather(futures))
    if all(isinstance(c, da.Array) for c in collections):
        targets = [np.empty(c.shape, dtype=c.dtype) for c in collections]
        da.store(list(collections), targets, lock=False, scheduler=_THREADS)
        return tuple(targets)
    return dask.compute(*collections, scheduler=_THREADS)


def _fit_cell_task(task):
    from .kernels.candidates import fit_cell

    return fit_cell(*task)


def cell_mapper(client=None, *, prefix: str = "fit-cell"):
    """A ``map_cells`` hook for :func:`~diffim_dag.stages.kernel_fit.solve_kernel`.

    With a distributed ``client`` each cell is one task on the workers (keys name the stage,
    cell and candidates); without one the cells are fitted in turn in this process.
    """
    def run(tasks):
        if not tasks:
            return []
        if client is None:
            # A cell fit is ~1 ms of small, GIL-bound numpy calls: threads only add scheduling
            # overhead (measured 1.38 s vs 0.82 s for 1000 candidates), so run them in turn.
            return [_fit_cell_task(t) for t in tasks]
        # readable keys: stage, cell and the candidates it fits (hashing the stamps would cost seconds)
        keys = [f"{prefix}-{t[0].cell}-{dask.base.tokenize(t[0].ids.tolist(), sorted(t[3]))}" for t in tasks]
        futures = client.map(_fit_cell_task, list(tasks), key=keys)
        return client.gather(futures)

    return run


def tile_mapper(client=None, *, prefix: str = "detect-measure"):
    """A ``map_tiles(function, tasks)`` hook: each task (a kwargs dict) becomes one Dask task."""
    def run(function, tasks):
        if not tasks:
            return []
        keys = [f"{prefix}-{i}-{dask.base.tokenize(t.get('origin'), t.get('core_bbox'))}" for i, t in enumerate(tasks)]
        if client is not None:
            return client.gather(client.map(function, list(tasks), key=keys))
        delayed = [dask.delayed(function, pure=True)(t, dask_key_name=k) for t, k in zip(tasks, keys)]
        return list(dask.compute(*delayed, scheduler=_THREADS))

    return run


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

    The ``write`` task of the visit turns it into a ``failed`` record with ``reason`` and ``error``.
    """

    stage: str
    visit: int
    detector: int
    error: str
    reason: str


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
    so that the scheduler retries the task.
    """
    from .errors import DiffimError

    marker = _passthrough(args)
    if marker is not None:
        return marker
    try:
        return function(*args)
    except DiffimError as exc:
        if not getattr(exc, "permanent", True):
            raise
        log.info("visit %s detector %s: %s failed: %s", visit, detector, stage, exc)
        return StageFailure(stage=stage, visit=visit, detector=detector, error=type(exc).__name__, reason=str(exc))


@dataclass(frozen=True)
class VisitGrid:
    """How many tile and cell tasks one visit's graph has.

    Attributes
    ----------
    tiles : (int, int)
        Task grid of the tile stages (subtract, decorrelate, detect): tile ``(iy, ix)`` of the image
        runs in task ``(iy mod n_y, ix mod n_x)`` (:func:`~diffim_dag.stages.subtract.cores_of_task`).
    cells : int
        ``fit-cell`` tasks: cell ``c`` is fitted in task ``c mod cells``.
    shape : (int, int) or None
        The image shape the grid was derived from (None: unknown, one task for all tiles and
        one for all cells, with the same results).
    """

    tiles: tuple[int, int] = (1, 1)
    cells: int = 1
    shape: tuple[int, int] | None = None


def visit_grid(shape: tuple[int, int] | None, config) -> VisitGrid:
    """The task grid of a visit whose science image has ``shape`` (ny, nx): one task per tile and per cell."""
    from .stages.subtract import tile_grid

    if shape is None:
        return VisitGrid()
    ny, nx = (int(v) for v in shape)
    cell = config.kernel.cell_size
    n_cells = max(1, -(-nx // cell)) * max(1, -(-ny // cell))
    return VisitGrid(tiles=tile_grid((0, nx, 0, ny), config.subtract.tile_size), cells=n_cells, shape=(ny, nx))


def _fit_cells_task(cells, index: int, n_tasks: int):
    from .pipeline import fit_cells_stage

    return fit_cells_stage(cells, [c.cell for c in cells.cells if c.cell % n_tasks == index])


def _own_cores(prepared, config, ty, tx, nty, ntx):
    from .stages.subtract import cores_of_task

    return list(cores_of_task(prepared.science.bbox, config.subtract.tile_size, (ty, tx), (nty, ntx)).values())


def _subtract_task(prepared, kernel, config, ty: int, tx: int, nty: int, ntx: int):
    from .pipeline import subtract_tiles_stage

    return subtract_tiles_stage(prepared, kernel, config, _own_cores(prepared, config, ty, tx, nty, ntx))


def _merge(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _decorrelate_task(prepared, kernel, config, ty: int, tx: int, nty: int, ntx: int, neighbours: list):
    from .pipeline import decorrelate_tiles_stage

    return decorrelate_tiles_stage(prepared, kernel, _own_cores(prepared, config, ty, tx, nty, ntx),
                                   _merge(neighbours))


def _difference_task(prepared, kernel, config, tiles: list):
    from .pipeline import difference_stage

    return difference_stage(prepared, kernel, config, _merge(tiles))


def _fakes_of(prepared):
    return prepared.fakes


def _detect_task(inputs, ty: int, tx: int, nty: int, ntx: int):
    from .pipeline import detect_tiles_stage
    from .stages.subtract import tile_grid

    n_y, n_x = tile_grid(inputs.bbox, inputs.config.tile_size)
    own = [iy * n_x + ix for iy in range(n_y) for ix in range(n_x) if (iy % nty, ix % ntx) == (ty, tx)]
    return detect_tiles_stage(inputs, own)


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


def visit_graph(spec, config, out_dir, *, run_id: str = "", grid: VisitGrid | None = None) -> dict:
    """The task graph of one (visit, detector): a dict ``{key: task}`` in Dask's graph format.

    Keys are ``(stage, visit, detector)`` or ``(stage, visit, detector, index...)``, the stage name carrying
    the run's token (:func:`task_key`: ``"fit-cell-<32 hex>"``; :func:`stage_of` gives the stage back):

    ============================================  ===============================================================
    ``("template", V, D)``                        read the inputs, fetch/warp the template
                                                  (:func:`diffim_dag.batch.template_stage`)
    ``("psf", V, D, i)``                          the PSF of the science (0) / the (warped) template (1): supplied, or
                                                  estimated from its stars (:func:`diffim_dag.batch.psf_stage`)
    ``("prepare", V, D)``                         skies removed, PSFs attached; coverage, variance scaling and
                                                  mode for ``al`` (:func:`diffim_dag.batch.prepare_stage`)
    ``("kernel-sources", V, D)``                  kernel sources and their stamps by cell
    ``("fit-cell", V, D, i)``                     first fit of cell ``i`` (``i`` < ``grid.cells``)
    ``("spatial-solve", V, D)``                   clipping, refits, spatial solve, decorrelation kernel
    ``("subtract", V, D, ty, tx)``                convolve and subtract tile ``(ty, tx)``
    ``("decorrelate", V, D, ty, tx)``             decorrelate the tile (reads the neighbouring tiles' edges)
    ``("difference", V, D)``                      assemble the planes, quality metrics
    ``("detect-prepare", V, D)``                  whole-image matched filter / significance
    ``("detect", V, D, ty, tx)``                  detect and measure the tile
    ``("inject", V, D)``                          with ``fakes``: fake sources added (``al``: after the spatial
                                                  solve; :func:`diffim_dag.pipeline.inject_stage`); the
                                                  subtraction tasks read its pair
    ``("catalog", V, D)``                         stitch the tiles (footprints cut by tile edges), sky sources
    ``("fakes", V, D)``, ``("match", V, D)``      with ``fakes``: the fakes' table; matched to the DiaSources
    ``("write", V, D)``                           write, checksum and install the outputs; the visit's record
    ============================================  ===============================================================

    ``al-preconvolve`` and ``zogy`` replace kernel-sources … difference by one ``("subtract", V, D)`` task
    (:func:`diffim_dag.pipeline.subtract_prepared`); ``decorrelate`` tasks exist when a spatially constant
    decorrelation is configured.  The keys depend on (visit, detector), the grid and ``run_id`` only: the
    same for every build of one run, disjoint between runs.

    Parameters
    ----------
    spec : VisitSpec
        Paths of the visit's inputs.
    config : PipelineConfig
    out_dir : path
        The batch's output folder.
    run_id : str
        Identifies this run in the outputs manifests (exactly-once install) and in every task key.
    grid : VisitGrid, optional
        Tile and cell task counts; by default from the science image's shape read from its header
        (:func:`diffim_dag.batch.input_shape`), one task for all tiles/cells when it cannot be read.
    """
    import os

    from . import batch, pipeline

    v, d = int(spec.visit), int(spec.detector)
    if grid is None:
        grid = visit_grid(batch.input_shape(spec), config)
    out = os.fspath(out_dir)
    nty, ntx = grid.tiles
    tiles = [(ty, tx) for ty in range(nty) for tx in range(ntx)]
    dsk: dict = {}

    def key(stage, *index):
        return task_key(stage, v, d, *index, run_id=run_id)

    def task(stage, index, function, *args):
        dsk[key(stage, *index)] = (run_stage, stage, v, d, function, *args)

    task("template", (), batch.template_stage, spec, config, out, run_id)
    for index, role in enumerate(PSF_ROLES):
        task("psf", (index,), batch.psf_stage, key("template"), config, role)
    task("prepare", (), batch.prepare_stage, key("template"), key("psf", 0), key("psf", 1), config)
    fakes = config.fakes.enabled
    if config.method == "al":
        prepared = key("prepare")
        task("kernel-sources", (), pipeline.kernel_sources_stage, prepared, config)
        for i in range(grid.cells):
            task("fit-cell", (i,), _fit_cells_task, key("kernel-sources"), i, grid.cells)
        task("spatial-solve", (), pipeline.spatial_solve_stage, prepared, key("kernel-sources"),
             [key("fit-cell", i) for i in range(grid.cells)], config)
        kernel = key("spatial-solve")
        if fakes:  # after the kernel fit (on the images without fakes), before the convolution
            task("inject", (), pipeline.inject_stage, prepared, config, kernel)
            prepared = key("inject")
        for ty, tx in tiles:
            task("subtract", (ty, tx), _subtract_task, prepared, kernel, config, ty, tx, nty, ntx)
        last = "subtract"
        if config.decorrelation.enabled and not config.decorrelation.spatially_varying:
            for ty, tx in tiles:
                # the tasks owning the tiles next to this one: the adjacent tasks, or, when the task grid
                # was not derived from the image shape (coarser than the tiles), the adjacent ones modulo it
                near = sorted({((ty + dy) % nty, (tx + dx) % ntx) if grid.shape is None else (ty + dy, tx + dx)
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                               if grid.shape is None or (0 <= ty + dy < nty and 0 <= tx + dx < ntx)})
                task("decorrelate", (ty, tx), _decorrelate_task, prepared, kernel, config, ty, tx, nty, ntx,
                     [key("subtract", *n) for n in near])
            last = "decorrelate"
        task("difference", (), _difference_task, prepared, kernel, config, [key(last, *t) for t in tiles])
        result = key("difference")
    else:
        prepared = key("prepare")
        if fakes:
            task("inject", (), pipeline.inject_stage, prepared, config)
            prepared = key("inject")
        task("subtract", (), batch.score_subtract_stage, prepared, config)
        result = key("subtract")
    task("detect-prepare", (), pipeline.prepare_detection_stage, result, config)
    for ty, tx in tiles:
        task("detect", (ty, tx), _detect_task, key("detect-prepare"), ty, tx, nty, ntx)
    task("catalog", (), pipeline.catalog_stage, key("detect-prepare"), [key("detect", *t) for t in tiles])
    injection = None
    if fakes:
        task("fakes", (), _fakes_of, key("inject"))  # the table alone travels to the match task
        task("match", (), pipeline.match_stage, result, key("catalog"), key("fakes"), config)
        injection = key("match")
    dsk[write_key(v, d, run_id)] = (batch.write_stage, spec, config, out, run_id, result, key("catalog"), injection)
    return dsk


def batch_graph(specs, config, out_dir, *, run_id: str = "", grids: dict | None = None) -> dict:
    """The union of :func:`visit_graph` over ``specs``: one graph for the whole batch.

    ``grids`` may give the :class:`VisitGrid` of some (visit, detector) pairs; the others come from
    their science headers.  Visits whose shape cannot be read here (e.g. a path only the workers
    see) get one task for all their tiles and one for all their cells.
    """
    from . import batch

    dsk: dict = {}
    unknown = 0
    for s in specs:
        grid = (grids or {}).get((s.visit, s.detector))
        if grid is None:
            grid = visit_grid(batch.input_shape(s), config)
        unknown += grid.shape is None
        dsk.update(visit_graph(s, config, out_dir, run_id=run_id, grid=grid))
    if unknown:
        log.info("%d of %d visit(s): image shape not readable on the client; their tiles and cells run as one task "
                 "each", unknown, len(specs))
    return dsk


def compute_visit(spec, config, out_dir, *, run_id: str = "") -> dict:
    """Run one visit's graph here, in turn (Dask's synchronous scheduler), and return its record."""
    dsk = visit_graph(spec, config, out_dir, run_id=run_id)
    return dask.get(dsk, write_key(spec.visit, spec.detector, run_id))
