"""Dask wiring: the only module that imports dask.

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
"""
from __future__ import annotations

import numpy as np

import dask
import dask.array as da

from .kernels.solution import CONVOLVE_TEMPLATE

__all__ = [
    "tile_starts",
    "planes_to_dask",
    "convolve_tiles",
    "difference_tiles",
    "filter_tiles",
    "compute",
]


def tile_starts(chunks: tuple[tuple[int, ...], tuple[int, ...]], xy0: tuple[int, int]):
    """Parent-frame (y, x) starts of every chunk."""
    ys = xy0[1] + np.concatenate([[0], np.cumsum(chunks[0])[:-1]]).astype(int)
    xs = xy0[0] + np.concatenate([[0], np.cumsum(chunks[1])[:-1]]).astype(int)
    return ys, xs


def planes_to_dask(image, variance, mask, tile: int | tuple[int, int]):
    """Dask arrays (chunks = tiles) from numpy or dask planes."""
    ty, tx = (tile, tile) if isinstance(tile, int) else tile

    def conv(a):
        if isinstance(a, da.Array):
            return a.rechunk((ty, tx))
        return da.from_array(np.asarray(a), chunks=(ty, tx))

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
    """
    from .stages.subtract import combine_tile

    ys, xs = tile_starts(science[0].chunks, xy0)

    def block(si, sv, sm, ti, tv, tm, sol, ksum, block_id=None):
        # the output has a new leading axis: block_id = (0, iy, ix)
        origin = (int(xs[block_id[-1]]), int(ys[block_id[-2]]))
        return np.stack(
            combine_tile(si, sv, sm, ti, tv, tm, sol, ksum, mode=mode, subtract_background=subtract_background,
                         origin=origin, xy0=xy0, shape=shape, half_width=half_width, edge_bit=edge_bit)
        ).astype(np.float64)

    stacked = da.map_blocks(block, *science, *template, background_solution, kernel_sum,
                            new_axis=0, chunks=((3,),) + science[0].chunks, dtype=np.float64,
                            meta=np.array((), dtype=np.float64))
    return stacked[0].astype(np.float32), stacked[1].astype(np.float32), stacked[2].astype(np.int32)


def filter_tiles(image, kernel, *, half_width: int, xy0):
    """Tile-parallel FFT convolution with a small fixed kernel (reflected halo at the image border)."""
    from .stages.subtract import apply_small_kernel

    def f(block, k, origin):
        return apply_small_kernel(block, k).astype(np.float32)

    return _with_halo(f, [image], int(half_width), boundary="reflect", xy0=xy0, dtype=np.float32, extra=(kernel,))


def compute(*collections, client=None):
    """Compute on ``client`` when given, else with the threaded scheduler."""
    if client is not None:
        futures = client.compute(list(collections))
        return tuple(client.gather(futures))
    return dask.compute(*collections, scheduler="threads")


def make_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1,
                memory_limit: str = "auto"):
    """``(client, cluster)``: connect to ``scheduler``, or start a LocalCluster (cluster is None when connecting).

    Workers get one FFT/BLAS thread each (``OMP_NUM_THREADS=1`` etc.) so that they do not oversubscribe the cores.
    """
    import os

    from distributed import Client, LocalCluster

    import logging

    if not logging.getLogger("diffim_dag").isEnabledFor(logging.DEBUG):
        logging.getLogger("distributed").setLevel(logging.WARNING)  # the in-process scheduler's INFO chatter
    if scheduler:
        return Client(scheduler), None
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    n = n_workers or os.cpu_count() or 1
    cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                           memory_limit=memory_limit, dashboard_address=None)
    return Client(cluster), cluster


def _fit_cell_task(task):
    from .kernels.candidates import fit_cell

    return fit_cell(*task)


def cell_mapper(client=None, *, prefix: str = "fit-cell"):
    """A ``map_cells`` hook for :func:`~diffim_dag.stages.kernel_fit.solve_kernel`: one Dask task per cell.

    With a distributed ``client`` the cells run on the workers; without one, on the
    threaded scheduler through ``dask.delayed``.  Task keys name the stage and cell.
    """
    def run(tasks):
        if not tasks:
            return []
        # readable keys: stage, cell and the candidates it fits (hashing the stamps would cost seconds)
        keys = [f"{prefix}-{t[0].cell}-{dask.base.tokenize(t[0].ids.tolist(), sorted(t[3]))}" for t in tasks]
        if client is not None:
            futures = client.map(_fit_cell_task, list(tasks), key=keys)
            return client.gather(futures)
        delayed = [dask.delayed(_fit_cell_task, pure=True)(t, dask_key_name=k) for t, k in zip(tasks, keys)]
        return list(dask.compute(*delayed, scheduler="threads"))

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
        return list(dask.compute(*delayed, scheduler="threads"))

    return run
