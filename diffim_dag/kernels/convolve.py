r"""Exact convolution of one tile with a spatially varying PSF-matching kernel.

The kernel of a :class:`~diffim_dag.kernels.solution.KernelSolution` is

.. math::  K(u; x) = \sum_t T_t(x)\, K_t(u),

with Chebyshev spatial terms :math:`T_t` and term kernels :math:`K_t`
(:meth:`~diffim_dag.kernels.solution.KernelSolution.term_kernels`).  Evaluating
the kernel at the *output* pixel (Alard 2000; LSST ``afw::math::convolve`` with a
``LinearCombinationKernel``), the convolution is exactly

.. math::  (I \otimes K)(x) = \sum_u K(u; x)\, I(x - u) = \sum_t T_t(x)\, (I \otimes K_t)(x),

one plain convolution per spatial term, with no piecewise-constant
approximation.  The variance of the convolved image (independent pixels) is

.. math::

    V'(x) = \sum_u K(u; x)^2\, V(x - u)
          = \sum_{t \le t'} (2 - \delta_{tt'})\, T_t(x) T_{t'}(x)\, \big(V \otimes (K_t K_{t'})\big)(x),

plain convolutions with the pixel-wise products :math:`K_t K_{t'}`, regrouped by the Chebyshev product rule
:math:`P_i P_k = (P_{i+k} + P_{|i-k|})/2` into one per term of twice the degree (:func:`squared_kernel_terms`).

Conventions
-----------
* Arrays are indexed ``[y, x]``; a tile's element ``[0, 0]`` sits at parent
  pixel ``origin = (x0, y0)``; the spatial terms are evaluated at parent
  coordinates, so a tile (with its halo) convolved with its own origin equals the
  same pixels of the whole image convolved with the parent origin.
* True convolution, ``out(x) = Σ_u K(u) I(x − u)``, as
  ``scipy.signal.fftconvolve(mode="same")`` and ``scipy.ndimage.convolve`` for an
  odd kernel centred at ``[h, h]``.
* Outside the array the image is zero: the ``h = size // 2`` pixels along each
  border are incomplete; the caller trims them (halo) or flags them ``EDGE``.
* Non-finite input pixels are treated as zero (an FFT would otherwise spread a
  NaN over the whole tile); :func:`convolve_tile` flags them ``NO_DATA`` before the
  mask is dilated, so every output pixel they touched is flagged.
* FFT arithmetic and accumulation in float32 by default (``precision="single"``,
  round-off ~1e-7 of the tile's RMS) or float64 (``"double"``); results are float32.

References
----------
Alard, C. & Lupton, R. H. 1998, ApJ 503, 325.  Alard, C. 2000, A&AS 144, 363.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import scipy.fft
import scipy.ndimage

from ..memory import map_on_threads
from .chebyshev import chebyshev_terms, term_powers
from .maskops import bits_of, dilate_mask
from .solution import KernelSolution

__all__ = [
    "fft_convolve",
    "fft_convolve_blocks",
    "convolve_spatial",
    "convolve_variance_spatial",
    "convolve_tile",
    "convolve_many",
    "choose_method",
    "squared_kernel_terms",
    "transforms_memo",
]

def fft_convolve(a: np.ndarray, k: np.ndarray, mode: str = "same", *, kernel_fts: dict | None = None) -> np.ndarray:
    """Linear convolution of two real arrays through ``scipy.fft`` (FFT lengths padded to fast sizes).

    The same transforms, product and cut as ``scipy.signal.fftconvolve`` (equal bit for bit, tested), without
    importing ``scipy.signal``, which pulls in ``scipy.stats``: 0.6 s of every command's start-up.  ``mode``:
    ``"same"`` (the centre, ``a``'s shape) or ``"full"``.  FFT threads follow ``scipy.fft.set_workers``.
    ``kernel_fts``: a dict that keeps ``k``'s transform per padded shape and dtype, for calls with the same ``k``
    (the same values as transforming it each time).
    """
    return _fft_convolve(a, k, mode, kernel_fts)


def _fft_convolve(a: np.ndarray, k: np.ndarray, mode: str = "same", kernel_fts: dict | None = None) -> np.ndarray:
    """:func:`fft_convolve`; ``kernel_fts`` keeps ``k``'s transform per padded shape for the next call with the
    same ``k`` (the blocks of :func:`fft_convolve_blocks`: the same values as transforming it each time)."""
    a, k = np.asarray(a), np.asarray(k)
    if a.ndim != k.ndim:
        raise ValueError(f"fft_convolve: arrays of {a.ndim} and {k.ndim} dimensions")
    if a.size == 0 or k.size == 0:
        return np.zeros(0)
    if mode not in ("same", "full"):
        raise ValueError(f"fft_convolve: mode must be 'same' or 'full', got {mode!r}")
    a = a.astype(np.float64) if np.issubdtype(a.dtype, np.integer) else a
    k = k.astype(np.float64) if np.issubdtype(k.dtype, np.integer) else k
    full = [n + m - 1 for n, m in zip(a.shape, k.shape)]
    fshape = [scipy.fft.next_fast_len(n, True) for n in full]
    axes = list(range(a.ndim))
    key = (tuple(fshape), a.dtype.str)
    k_ft = None if kernel_fts is None else kernel_fts.get(key)
    if k_ft is None:
        k_ft = scipy.fft.rfftn(k, fshape, axes=axes)
        if kernel_fts is not None:
            kernel_fts[key] = k_ft
    out = scipy.fft.irfftn(scipy.fft.rfftn(a, fshape, axes=axes) * k_ft, fshape, axes=axes)[
        tuple(slice(n) for n in full)]
    if mode == "same":
        start = [(n - m) // 2 for n, m in zip(full, a.shape)]
        out = out[tuple(slice(s0, s0 + m) for s0, m in zip(start, a.shape))]
    return out.copy()


#: The transforms' sides, rows × columns, that :func:`fft_convolve_blocks` cuts an image for by default (the matched
#: filter's and the kernel-source correlation's).
BLOCK_TRANSFORM = (512, 1024)

#: :func:`_block_edges`' estimate of a layout's work: each transform's length, times this for a length that is not a
#: power of two, plus this length per block (its calls, copies and cut).
NOT_POWER_OF_TWO, BLOCK_COST = 1.1, 100


def _block_edges(n: int, side: int, n_fft: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the blocks along an axis of ``n`` pixels for a kernel ``side`` long and transforms of
    about ``n_fft``: of the layouts whose interior blocks' transforms are ``n_fft`` (the rest, ragged, last), or that
    cut the axis into equal blocks as many as those or one fewer, the one of the least estimated work
    (:data:`NOT_POWER_OF_TWO`, :data:`BLOCK_COST`).  A transform of the core plus the halo (the kernel's
    half-side each way) is that length plus the kernel's side less one.  Measured with a 25² kernel, one
    thread: a 4096² frame cut in cores of 464 × 976 (512 × 1024 transforms, 9 × 5 blocks) took 0.26–0.28 s against
    0.28–0.29 s in 9 × 4 equal blocks (504 × 1080 transforms); a 1024² frame 19 ms in 2 × 1 equal blocks against
    21 ms in cores of 464 × 976 (ragged blocks of 96 and 48)."""
    pad = side - 1 + 2 * (side // 2)
    core = max(int(n_fft) - pad, max(int(n_fft), 2) // 2)

    def cuts(size):
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    def work(edges):
        lengths = [scipy.fft.next_fast_len(b - a + pad, True) for a, b in edges]
        return sum(t * (1.0 if t & (t - 1) == 0 else NOT_POWER_OF_TWO) + BLOCK_COST for t in lengths)

    count = -(-n // core)
    layouts = [cuts(core)] + [cuts(-(-n // k)) for k in (count, count - 1) if k >= 1]
    return min(layouts, key=work)


def fft_convolve_blocks(a: np.ndarray, k: np.ndarray, *, rows: int = BLOCK_TRANSFORM[0],
                        columns: int | None = BLOCK_TRANSFORM[1],
                        zero: np.ndarray | None = None, dtype=None, workers: int = 1) -> np.ndarray:
    """:func:`fft_convolve` ``(a, k, "same")`` of a 2-D array, computed in blocks with the kernel's half-sides of
    halo, whose transforms are about ``rows`` × ``columns`` (None: the whole width; :func:`_block_edges` cuts each
    axis), so that the FFT buffers are those of one block (a 4096² frame at once needs ~4.5× its size in
    transforms), the values those of the whole-frame transform to FFT rounding.

    Transforms of 512 × 1024 took 0.72–0.78× the CPU of strips of 512 rows across a 4096² frame (~560 × 4125
    transforms), the same sums: 0.25–0.30 s against 0.32–0.36 s for a 25² kernel, one thread, in three
    interleaved rounds (cores of 512 × 1024, ~560 × 1080 transforms: 0.27–0.32 s); 0.05 s against 0.10 s for a
    2048² frame and a 13² kernel (strips of 1024 rows).

    ``zero`` (boolean, ``a``'s shape) and ``dtype``: convolve ``a`` cast to ``dtype`` with 0 where ``zero`` is
    set, block by block, without making that whole-frame copy (the same values as convolving the copy).
    ``k``'s transform is made once per block shape.  ``workers``: blocks convolved at once on that many threads
    (each block's copy, transforms and placement: the same values as in turn; one block: FFT threads instead);
    ``workers`` blocks' buffers are then in flight.  The blocks do not depend on ``workers``, nor do the values.
    """
    a = np.asarray(a)
    if a.ndim != 2 or np.ndim(k) != 2:
        raise ValueError(f"fft_convolve_blocks: 2-D arrays only, got {a.ndim} and {np.ndim(k)} dimensions")
    hy, hx = k.shape[0] // 2, k.shape[1] // 2
    ny, nx = a.shape

    row_edges = _block_edges(ny, k.shape[0], rows)
    column_edges = [(0, nx)] if columns is None else _block_edges(nx, k.shape[1], columns)
    workers = (os.cpu_count() or 1) if workers < 0 else max(int(workers), 1)

    def piece(ys: slice, xs: slice):
        if zero is None and dtype is None:
            return a[ys, xs]
        part = np.array(a[ys, xs], dtype=dtype or a.dtype)
        if zero is not None:
            np.copyto(part, 0, where=zero[ys, xs])
        return part

    if len(row_edges) <= 1 and len(column_edges) <= 1:  # (one block, or an empty image)
        with scipy.fft.set_workers(workers):
            return fft_convolve(piece(slice(None), slice(None)), k, "same")
    kernel_fts: dict = {}  # (two threads meeting a new block shape at once both make its transform: the same)

    def convolve(block):
        y0, y1, x0, x1 = block
        lo, hi, left, right = max(y0 - hy, 0), min(y1 + hy, ny), max(x0 - hx, 0), min(x1 + hx, nx)
        out = _fft_convolve(piece(slice(lo, hi), slice(left, right)), k, "same", kernel_fts)
        return out[y0 - lo:y1 - lo, x0 - left:x1 - left]

    blocks = [(y0, y1, x0, x1) for y0, y1 in row_edges for x0, x1 in column_edges]
    first = convolve(blocks[0])
    out = np.empty(a.shape, dtype=first.dtype)
    out[blocks[0][0]:blocks[0][1], blocks[0][2]:blocks[0][3]] = first
    del first
    for part, (y0, y1, x0, x1) in zip(map_on_threads(convolve, blocks[1:], workers), blocks[1:]):
        out[y0:y1, x0:x1] = part
    return out


_METHODS = ("auto", "fft", "direct")
#: "auto" uses direct convolution only for kernels of at most this many pixels
#: (3×3): measured on 2 cores, the shared-FFT path is faster from 5×5 up at every
#: image size (1024², 5×5: 41 vs 57 ms; 64², 23×23: 0.8 vs 11 ms).
_DIRECT_MAX_KERNEL_PIXELS = 9
_PRECISIONS = {"single": np.float32, "double": np.float64}


def choose_method(shape: tuple[int, int], kernel_size: int, method: str = "auto") -> str:
    """Resolve ``method`` (``"auto"``, ``"fft"`` or ``"direct"``) for an image and kernel size.

    ``"auto"`` picks ``"direct"`` for kernels of at most 3×3 pixels, else ``"fft"``
    (faster at every image size measured, see ``benchmarks/bench_convolve.py``).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if method != "auto":
        return method
    if int(kernel_size) ** 2 <= _DIRECT_MAX_KERNEL_PIXELS:
        return "direct"
    return "fft"


def _finite_float(a: np.ndarray, name: str, precision: str) -> np.ndarray:
    """A finite copy of ``a`` (non-finite → 0) in the working precision."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}")
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    a = a.astype(_PRECISIONS[precision], copy=True)
    bad = ~np.isfinite(a)
    if bad.any():
        a[bad] = 0.0
    return a


def convolve_many(
    image: np.ndarray,
    kernels: Iterable[np.ndarray],
    *,
    method: str = "auto",
    workers: int = 1,
    precision: str = "single",
) -> Iterator[np.ndarray]:
    """Yield ``image ⊗ k`` (``mode="same"``, zero padding) for each odd square kernel.

    With ``method="fft"`` the image's real FFT is computed once and reused for
    every kernel (a forward transform saved per kernel relative to
    ``fftconvolve``).  The yielded arrays are scratch buffers the caller may
    modify in place.

    Parameters
    ----------
    image : ndarray, shape (ny, nx), finite
    kernels : iterable of ndarray, each (size, size), odd size, all the same size
    method : {"auto", "fft", "direct"}
    workers : int
        ``scipy.fft`` worker threads (keep 1 inside Dask workers).
    precision : {"single", "double"}
        FFT arithmetic in float32/complex64 (about twice as fast, round-off
        ~1e-7 of the image's RMS) or float64/complex128.  Direct convolution is
        always float64.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {precision!r}")
    ftype = _PRECISIONS[precision]
    kernels = [np.asarray(k, dtype=np.float64) for k in kernels]
    if not kernels:
        return
    size = kernels[0].shape[0]
    for k in kernels:
        if k.ndim != 2 or k.shape != (size, size) or size % 2 == 0:
            raise ValueError(f"kernels must be odd, square and of one size, got {k.shape}")
    method = choose_method(image.shape, size, method)
    ny, nx = image.shape
    if method == "direct":
        image = np.asarray(image, dtype=np.float64)
        for k in kernels:
            yield scipy.ndimage.convolve(image, k, mode="constant", cval=0.0)
        return
    h = size // 2
    shape = (
        scipy.fft.next_fast_len(ny + size - 1, real=True),
        scipy.fft.next_fast_len(nx + size - 1, real=True),
    )
    image_ft = scipy.fft.rfft2(np.asarray(image, dtype=ftype), s=shape, workers=workers)
    for k in kernels:
        product = _kernel_rfft2(k.astype(ftype), shape, workers)
        product *= image_ft
        full = scipy.fft.irfft2(product, s=shape, workers=workers)
        # full[n] = Σ_m k[m] I[n − m]; the centred ("same") output is full[y + h, x + h].
        yield full[h : h + ny, h : h + nx]


def _kernel_rfft2(kernel: np.ndarray, shape: tuple[int, int], workers: int) -> np.ndarray:
    """``rfft2(kernel, s=shape)`` without transforming the all-zero padding rows.

    The real FFT along x is taken on the kernel's few rows only, then the complex
    FFT along y; this halves the cost of a full-size ``rfft2`` of a small kernel.
    """
    rows = scipy.fft.rfft(kernel, n=shape[1], axis=1, workers=workers)
    return scipy.fft.fft(rows, n=shape[0], axis=0, workers=workers)


def _spatial_factors(solution: KernelSolution, origin: tuple[float, float], shape: tuple[int, int],
                     order: int | None = None):
    """Separable factors of the spatial terms on the tile grid.

    The terms are products ``T_t(x, y) = P_i(u) P_j(v)`` of 1-D Chebyshev
    polynomials; with ``P_j(1) = 1``, ``T_t(x, y_max) = P_i(u)`` and
    ``T_t(x_max, y) = P_j(v)``.  Returns ``(fx, fy)`` with shapes (n_terms, nx)
    and (n_terms, ny) such that ``T_t[y, x] = fy[t, y] · fx[t, x]``; falls back to
    the full grid (returned as ``(None, terms)``) if a corner check fails.
    ``order``: the terms of that total degree over the solution's box (default: the solution's own).
    """
    order = solution.spatial_order if order is None else int(order)
    bbox = solution.bbox

    def terms(x, y):
        return chebyshev_terms(x, y, order, bbox)

    x0, y0 = (float(o) for o in origin)
    ny, nx = shape
    xs = x0 + np.arange(nx, dtype=np.float64)
    ys = y0 + np.arange(ny, dtype=np.float64)
    bx0, bx1, by0, by1 = bbox
    fx = np.asarray(terms(xs, np.full(nx, by1)), dtype=np.float64)
    fy = np.asarray(terms(np.full(ny, bx1), ys), dtype=np.float64)
    # Cheap consistency check at the four corners (guards the separability assumption).
    cx = np.array([xs[0], xs[-1], xs[0], xs[-1]])
    cy = np.array([ys[0], ys[0], ys[-1], ys[-1]])
    direct = np.asarray(terms(cx, cy))
    sep = fx[:, [0, -1, 0, -1]] * fy[:, [0, 0, -1, -1]]
    if not np.allclose(direct, sep, rtol=1e-12, atol=1e-12):
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return None, np.asarray(terms(xx, yy), dtype=np.float64)
    return fx, fy


def squared_kernel_terms(term_kernels: np.ndarray, order: int) -> tuple[np.ndarray, int]:
    r"""The squared spatially varying kernel as a Chebyshev series of twice the degree.

    With :math:`K(u; x) = \sum_t T_t(x) K_t(u)` and :math:`T_t = P_i P_j` (total degree ≤ ``order``),
    :math:`K^2 = \sum_{t, t'} T_t T_{t'} K_t K_{t'}`, and :math:`P_i P_k = (P_{i+k} + P_{|i-k|})/2` turns every
    product of two terms into terms of total degree ≤ ``2 order``.  Returns ``(L, 2 order)``: the kernels
    :math:`L_m` with :math:`K(u; x)^2 = \sum_m T_m(x) L_m(u)` over the terms of that degree — ``(2n+1)(n+1)``
    of them instead of the ``n_t (n_t + 1)/2`` pairs (15 instead of 21 at order 2; 28 instead of 55 at 3), each
    one convolution of the variance plane.  Exact: the same sum, regrouped.
    """
    powers = term_powers(order)
    high = 2 * order
    index = {p: m for m, p in enumerate(term_powers(high))}
    out = np.zeros((len(index),) + term_kernels.shape[1:], dtype=np.float64)
    for t, (i, j) in enumerate(powers):
        for t2 in range(t, len(powers)):
            k, l = powers[t2]
            # (t, t2) and (t2, t) both: twice; each of the four Chebyshev products: a quarter
            product = term_kernels[t] * term_kernels[t2] * (0.25 if t == t2 else 0.5)
            for a in (i + k, abs(i - k)):
                for b in (j + l, abs(j - l)):
                    out[index[(a, b)]] += product
    return out, high


def _accumulate(out: np.ndarray, conv: np.ndarray, fx, fy, t: int, t2: int | None = None, factor: float = 1.0):
    """``out += factor · T_t (· T_t2) · conv``, modifying ``conv`` in place (no full-size weight array)."""
    if fx is None:
        w = fy[t] if t2 is None else fy[t] * fy[t2]
        conv *= (factor * w).astype(conv.dtype)
    else:
        wx = fx[t] if t2 is None else fx[t] * fx[t2]
        wy = fy[t] if t2 is None else fy[t] * fy[t2]
        conv *= (factor * wx).astype(conv.dtype)[None, :]
        conv *= wy.astype(conv.dtype)[:, None]
    out += conv


#: Per owner of kernels (a kernel solution; the AL stage's result, for its decorrelation kernel), their transforms at
#: each padded tile shape met: every tile of one shape uses the same ones (15 of 16 of a 4096² frame's), and they go
#: with their owner.
_KERNEL_FTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_KERNEL_FTS_LOCK = threading.Lock()


def transforms_memo(owner) -> dict:
    """The dict of kernel transforms that lives as long as ``owner`` (any object a weak reference can name and a
    dict can key by identity; see :data:`_KERNEL_FTS`), for the ``memo`` / ``kernel_fts`` arguments here."""
    with _KERNEL_FTS_LOCK:
        memo = _KERNEL_FTS.get(owner)
        if memo is None:
            memo = _KERNEL_FTS[owner] = {}
    return memo


def _convolve_terms(image: np.ndarray, kernels: np.ndarray, fx, fy, *, method: str, workers: int, precision: str,
                    memo: dict | None = None, name: str = "") -> np.ndarray:
    r""":math:`\sum_t T_t(x, y)\,(I \otimes K_t)(x, y)` with :math:`T_t = f^y_t(y)\, f^x_t(x)`
    (:func:`_spatial_factors`; ``fx`` None: ``fy`` holds the whole :math:`T_t`), in ``precision``.

    FFT path: the inverse transform is taken along y first, one per term; the y factor multiplies the result,
    which is still a transform along x, and the terms that share an x factor (:math:`P_i(u)`, whatever their
    :math:`P_j(v)`) are summed before the one inverse transform along x they then need — 3 instead of 6 at
    twice the spatial order 1, the variance's.  The same sum as one inverse 2-D transform per term, to round-off.
    ``memo`` (with ``name`` for these kernels) keeps the kernels' transforms per padded shape.
    """
    ftype = _PRECISIONS[precision]
    kernels = np.asarray(kernels, dtype=np.float64)
    size = kernels.shape[1]
    method = choose_method(image.shape, size, method)
    if method == "direct" or fx is None:
        out = np.zeros(image.shape, dtype=image.dtype)
        for t, conv in enumerate(convolve_many(image, kernels, method=method, workers=workers, precision=precision)):
            _accumulate(out, conv, fx, fy, t)
        return out
    ny, nx = image.shape
    h = size // 2
    shape = (scipy.fft.next_fast_len(ny + size - 1, real=True), scipy.fft.next_fast_len(nx + size - 1, real=True))
    key = (name, shape, np.dtype(ftype).str)
    fts = None if memo is None else memo.get(key)
    if fts is None:
        fts = [_kernel_rfft2(k.astype(ftype), shape, workers) for k in kernels]
        if memo is not None:
            memo[key] = fts
    image_ft = scipy.fft.rfft2(np.asarray(image, dtype=ftype), s=shape, workers=workers)
    groups: dict[int, np.ndarray] = {}  # first term of each x factor → Σ f^y_t · (inverse along y)
    for t, kernel_ft in enumerate(fts):
        product = np.multiply(kernel_ft, image_ft)
        # full[n] = Σ_m k[m] I[n − m]: the centred ("same") rows are h … h + ny
        along_y = scipy.fft.ifft(product, axis=0, workers=workers, overwrite_x=True)[h: h + ny]
        if not np.all(fy[t] == 1.0):  # (the terms of degree 0 in y: a factor of exactly 1)
            along_y *= fy[t].astype(ftype)[:, None]
        first = next((g for g in groups if np.array_equal(fx[g], fx[t])), None)
        if first is None:
            groups[t] = along_y
        else:
            groups[first] += along_y
    out = None
    for g, summed in groups.items():
        part = scipy.fft.irfft(summed, n=shape[1], axis=1, workers=workers)[:, h: h + nx]
        if not np.all(fx[g] == 1.0):
            part *= fx[g].astype(ftype)[None, :]
        if out is None:
            out = part
        else:
            out += part
    return out


def convolve_spatial(
    image: np.ndarray,
    solution: KernelSolution,
    *,
    origin: tuple[float, float] = (0, 0),
    method: str = "auto",
    workers: int = 1,
    precision: str = "single",
) -> np.ndarray:
    r"""Convolve a tile with the spatially varying kernel: :math:`\sum_t T_t(x)\,(I \otimes K_t)(x)`.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        The tile, including its halo; non-finite pixels count as zero.
    solution : KernelSolution
        Supplies the term kernels ``K_t`` and spatial terms ``T_t``.
    origin : (x0, y0)
        Parent-frame pixel coordinates of ``image[0, 0]``.
    method : {"auto", "fft", "direct"}
        ``"fft"``: one shared real FFT of the tile, one product and inverse FFT per
        term; ``"direct"``: ``scipy.ndimage.convolve`` in float64 (fast for tiny
        images or kernels); ``"auto"``: :func:`choose_method`.
    workers : int
        ``scipy.fft`` threads; keep 1 inside Dask workers.
    precision : {"single", "double"}
        Working precision of the FFT path and of the accumulation: ``"single"``
        (float32/complex64, default; about twice as fast; round-off ~1e-7 of the
        tile's RMS, well inside the 1e-5 tolerance of the tests) or ``"double"``
        (~1e-15).

    Returns
    -------
    ndarray of float32, shape (ny, nx)
        The ``solution.half_width`` pixels along each border are computed with
        zero padding (incomplete).
    """
    img = _finite_float(image, "image", precision)
    fx, fy = _spatial_factors(solution, origin, img.shape)
    out = _convolve_terms(img, solution.term_kernels(), fx, fy, method=method, workers=workers,
                          precision=precision, memo=transforms_memo(solution), name="image")
    return out.astype(np.float32)


def convolve_variance_spatial(
    variance: np.ndarray,
    solution: KernelSolution,
    *,
    origin: tuple[float, float] = (0, 0),
    method: str = "auto",
    workers: int = 1,
    precision: str = "single",
) -> np.ndarray:
    r"""Propagate a variance plane through the spatially varying convolution.

    .. math::

        V'(x) = \sum_u K(u; x)^2 V(x - u)
              = \sum_{t \le t'} (2 - \delta_{tt'})\, T_t(x) T_{t'}(x)\,
                \big(V \otimes K_t K_{t'}\big)(x)
              = \sum_m T_m(x)\, \big(V \otimes L_m\big)(x)

    (exact; the pairs regrouped into the Chebyshev terms of twice the degree, :func:`squared_kernel_terms`:
    15 convolutions instead of 21 at spatial order 2; pixel covariances of the input are ignored, as in LSST).

    Parameters
    ----------
    variance : ndarray, shape (ny, nx)
        Variance tile including its halo; non-finite pixels count as zero.
    solution, origin, method, workers, precision
        As :func:`convolve_spatial`.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    var = _finite_float(variance, "variance", precision)
    squared, order = squared_kernel_terms(solution.term_kernels(), solution.spatial_order)
    fx, fy = _spatial_factors(solution, origin, var.shape, order=order)
    out = _convolve_terms(var, squared, fx, fy, method=method, workers=workers, precision=precision,
                          memo=transforms_memo(solution), name="variance")
    # Round-off can leave tiny negative values where the variance is ~0.
    np.maximum(out, 0.0, out=out)
    return out.astype(np.float32)


def convolve_tile(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    solution: KernelSolution,
    *,
    origin: tuple[float, float],
    mask_planes: Mapping[str, int],
    no_dilate_planes: Iterable[str] = ("INJECTED", "INJECTED_TEMPLATE"),
    method: str = "auto",
    workers: int = 1,
    precision: str = "single",
    parent_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve the image, variance and mask of one tile with the spatial kernel.

    * image: :func:`convolve_spatial`;
    * variance: :func:`convolve_variance_spatial`;
    * mask: non-finite image or variance pixels get ``NO_DATA`` (if that plane
      exists), then every plane is dilated by the kernel's square footprint
      (:func:`~diffim_dag.kernels.maskops.dilate_mask`), except
      ``no_dilate_planes``, which mark positions and are copied as they are;
    * if ``parent_shape`` is given and ``EDGE`` is a plane, pixels within the
      kernel half-width of the *parent* border get ``EDGE``.

    Parameters
    ----------
    image, variance : ndarray, shape (ny, nx)
        The tile with its halo (halo = ``solution.half_width``).
    mask : ndarray of int, shape (ny, nx)
    solution : KernelSolution
    origin : (x0, y0)
        Parent coordinates of element ``[0, 0]``.
    mask_planes : mapping of str to int
        Plane name → bit.
    no_dilate_planes : iterable of str
        Planes copied undilated (absent names are ignored).
    method, workers, precision
        As :func:`convolve_spatial`.
    parent_shape : (ny, nx), optional
        Shape of the parent image, to flag ``EDGE``.

    Returns
    -------
    image : ndarray of float32
    variance : ndarray of float32
    mask : ndarray, dtype of ``mask``
        All the same shape as the input; the caller trims the halo.
    """
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    if not image.shape == variance.shape == mask.shape:
        raise ValueError(f"image, variance and mask shapes differ: {image.shape}, {variance.shape}, {mask.shape}")
    out_image = convolve_spatial(
        image, solution, origin=origin, method=method, workers=workers, precision=precision
    )
    out_var = convolve_variance_spatial(
        variance, solution, origin=origin, method=method, workers=workers, precision=precision
    )

    work = mask.copy()
    dtype = work.dtype.type
    if "NO_DATA" in mask_planes:
        nonfinite = ~(np.isfinite(image) & np.isfinite(variance))
        if nonfinite.any():
            work[nonfinite] |= dtype(1 << int(mask_planes["NO_DATA"]))
    out_mask = dilate_mask(work, solution.size, skip_bits=bits_of(mask_planes, no_dilate_planes))
    if parent_shape is not None and "EDGE" in mask_planes:
        h = solution.half_width
        pny, pnx = (int(s) for s in parent_shape)
        x0, y0 = (int(round(o)) for o in origin)
        px = x0 + np.arange(mask.shape[1])
        py = y0 + np.arange(mask.shape[0])
        edge = ((py < h) | (py >= pny - h))[:, None] | ((px < h) | (px >= pnx - h))[None, :]
        out_mask[edge] |= dtype(1 << int(mask_planes["EDGE"]))
    return out_image, out_var, out_mask
