r"""Per-candidate kernel fits, their quality cuts, per-cell fitting and kernel-sum clipping.

Model (Alard & Lupton 1998)
---------------------------
For a candidate stamp, with ``R`` the reference (the image that is convolved), ``T``
the target and basis images :math:`B_i`,

.. math::  T(x) \approx \sum_i a_i\, (R \otimes B_i)(x) + b ,

fitted on the stamp *interior* (the stamp shrunk by the kernel half-width ``h``, where
the convolution is fully defined), with weights :math:`w = 1/\sigma^2`,
:math:`\sigma^2 = V_T + V_R` (the sum of the two variance planes, as ``ip_diffim``).
With the design matrix :math:`A = [R \otimes B_0, …, R \otimes B_{n-1}, 1]` the normal
equations are

.. math::  M = A^T W A, \qquad \mathbf b = A^T W T, \qquad M \mathbf a = \mathbf b .

Each column :math:`R \otimes B_i` is one FFT product per basis (the FFTs of the basis
are computed once and cached).  The normal equations are Jacobi-equilibrated and
solved by LU; a singular or non-finite result falls back to the pseudo-inverse, and a
candidate whose solution is still not finite is rejected (``"singular"``).

Residual statistics from sufficient statistics
----------------------------------------------
With :math:`D = T - A\mathbf a` and :math:`N` pixels, the mean and standard deviation of
:math:`D/\sigma` are exact functions of :math:`M, \mathbf b`,
:math:`\mathbf s = A^T \sigma^{-1}`, :math:`t_1 = \sum T/\sigma` and
:math:`t_2 = \sum T^2/\sigma^2`:

.. math::
    \overline{D/\sigma} = (t_1 - \mathbf a\cdot\mathbf s)/N, \qquad
    \overline{(D/\sigma)^2} = (t_2 - 2\,\mathbf a\cdot\mathbf b + \mathbf a^T M \mathbf a)/N .

So a candidate can be re-assessed against any coefficient vector (e.g. the spatial
model's) without its pixels (:class:`NormalEquations` is all that travels).
A candidate is rejected when :math:`|\overline{D/\sigma}|` > ``max_residual_mean`` or
:math:`\mathrm{std}(D/\sigma)` > ``max_residual_std``.

Kernel-sum clipping
-------------------
Variables and transients give kernel sums far from the flux ratio of the rest:
iterated :math:`n\sigma`-clipped mean and standard deviation of the sums, then reject
:math:`|\Sigma k - \mathrm{mean}| > n\,\mathrm{std}` (:func:`clip_kernel_sums`).
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft

from .basis import KernelBasis, SeparableBasis, regularize

__all__ = [
    "CellStamps",
    "NormalEquations",
    "CandidateFit",
    "CellFit",
    "convolve_stamps",
    "candidate_normal_equations",
    "solve_normal_equations",
    "residual_statistics",
    "fit_candidates",
    "fit_cell",
    "fit_cells",
    "clipped_mean_std",
    "clip_kernel_sums",
    "assign_cells",
]

#: Relative eigenvalue cut of the pseudo-inverse fallback (of the equilibrated matrix).
PINV_RCOND = 1e-12
#: Floor of the kernel-sum scatter, relative to |mean|, so that identical (noise-free)
#: kernel sums are not rejected for round-off differences.
MIN_KERNEL_SUM_SCATTER = 1e-6
#: Iterations of the σ-clipped kernel-sum statistics.
KERNEL_SUM_CLIP_ITERATIONS = 10

USED = "used"
REJECTED = "rejected"


@dataclass(frozen=True, eq=False)
class CellStamps:
    """The candidate stamps of one spatial cell, brightest first (plain arrays; picklable).

    Attributes
    ----------
    cell : int
        Cell index (row-major over the cell grid).
    ids : ndarray of int, shape (N,)
    x, y : ndarray of float, shape (N,)
        Parent-frame pixel positions of the stamp centres.
    reference, target, variance : ndarray, shape (N, S, S)
        Reference (convolved) and target stamps, and the summed variance ``V_T + V_R``.
    """

    cell: int
    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    reference: np.ndarray
    target: np.ndarray
    variance: np.ndarray

    def __len__(self) -> int:
        return int(len(self.ids))


@dataclass(frozen=True, eq=False)
class NormalEquations:
    """Per-candidate normal equations and the sufficient statistics of the residuals.

    Shapes for a stack of N candidates and p = n_basis (+1 with a background):
    ``matrix (N, p, p)``, ``vector (N, p)``, ``sigma_sums (N, p)`` (:math:`A^T\\sigma^{-1}`),
    ``target_sum (N,)`` (:math:`\\sum T/\\sigma`), ``target_square (N,)``
    (:math:`\\sum T^2/\\sigma^2`), ``npix (N,)``.

    With constant-variance weighting the fit's ``matrix``/``vector`` use one variance per stamp,
    while ``stat_matrix``/``stat_vector`` (and the sums above) use the per-pixel variance, so that
    the residual statistics still compare the residual with the real noise; without it the two
    pairs are the same arrays.
    """

    matrix: np.ndarray
    vector: np.ndarray
    sigma_sums: np.ndarray
    target_sum: np.ndarray
    target_square: np.ndarray
    npix: np.ndarray
    stat_matrix: np.ndarray | None = None
    stat_vector: np.ndarray | None = None

    _FIELDS = ("matrix", "vector", "sigma_sums", "target_sum", "target_square", "npix", "stat_matrix", "stat_vector")

    def take(self, index) -> NormalEquations:
        return NormalEquations(*[None if getattr(self, f) is None else getattr(self, f)[index] for f in self._FIELDS])

    @staticmethod
    def stack(items) -> NormalEquations:
        items = list(items)
        return NormalEquations(*[None if getattr(items[0], f) is None else np.stack([getattr(it, f) for it in items])
                                 for f in NormalEquations._FIELDS])


@dataclass(frozen=True, eq=False)
class CandidateFit:
    """The outcome of fitting one candidate.

    ``status`` is ``"used"`` or ``"rejected"``; ``reason`` names the cut (``""`` when used):
    ``"singular"``, ``"residual_mean"``, ``"residual_std"`` (single-candidate fit).
    ``equations`` holds this candidate's :class:`NormalEquations` (unstacked arrays).
    """

    id: int
    cell: int
    x: float
    y: float
    status: str
    reason: str
    kernel_sum: float
    background: float
    residual_mean: float
    residual_std: float
    coefficients: np.ndarray
    equations: NormalEquations


@dataclass(frozen=True, eq=False)
class CellFit:
    """Candidates fitted in one cell (in the order tried); at most ``candidates_per_cell`` used."""

    cell: int
    fits: tuple[CandidateFit, ...]
    n_available: int

    @functools.cached_property
    def used(self) -> tuple[CandidateFit, ...]:
        return tuple(f for f in self.fits if f.status == USED)


# ------------------------------------------------------------------------ convolution

_FFT_CACHE: OrderedDict = OrderedDict()
_FFT_CACHE_SIZE = 8


_LAST_BASIS: list = [None, None]  # (array object, its content digest): skip re-hashing the same basis


def _basis_fft(basis_images: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if _LAST_BASIS[0] is basis_images:
        digest = _LAST_BASIS[1]
    else:
        digest = hashlib.blake2b(np.ascontiguousarray(basis_images).view(np.uint8), digest_size=16).digest()
        _LAST_BASIS[0], _LAST_BASIS[1] = basis_images, digest
    key = (digest, basis_images.shape, shape)
    hit = _FFT_CACHE.get(key)
    if hit is None:
        hit = scipy.fft.rfft2(basis_images, s=shape, axes=(-2, -1), workers=1)
        _FFT_CACHE[key] = hit
        while len(_FFT_CACHE) > _FFT_CACHE_SIZE:
            _FFT_CACHE.popitem(last=False)
    else:
        _FFT_CACHE.move_to_end(key)
    return hit


def convolve_stamps(stamps: np.ndarray, basis_images: np.ndarray,
                    separable: SeparableBasis | None = None) -> np.ndarray:
    """``stamps ⊗ B_i`` on the valid interior, shape ``(N, n, S - 2h, S - 2h)``.

    True convolution; the interior pixel ``[j, i]`` is stamp pixel ``[j + h, i + h]``.  With ``separable`` (the
    factors of ``basis_images``, :attr:`~diffim_dag.kernels.basis.KernelBasis.separable`) by 1-D passes
    (:func:`_convolve_separable`: the same values to round-off, ~6× faster for the Alard–Lupton basis); else by
    FFT.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    if separable is not None:
        return _convolve_separable(stamps, separable)
    n_s, s, _ = stamps.shape
    k = basis_images.shape[-1]
    # A circular convolution of length L ≥ s equals the linear one on the valid interior
    # [k-1, s-1] (wrap-around only reaches indices < k-1), so no padding to s + k - 1 is needed.
    shape = (scipy.fft.next_fast_len(s, real=True),) * 2
    fb = _basis_fft(basis_images, shape)
    fs = scipy.fft.rfft2(stamps, s=shape, axes=(-2, -1), workers=1)
    out = scipy.fft.irfft2(fs[:, None] * fb[None], s=shape, axes=(-2, -1), workers=1)
    return out[:, :, k - 1 : s, k - 1 : s]


def _convolve_separable(stamps: np.ndarray, basis: SeparableBasis) -> np.ndarray:
    """:func:`convolve_stamps` by the basis's separable factors: each stamp's rows convolved with every 1-D profile
    (one matrix product a stamp, for all the profiles), then the columns of each with the profiles it is paired
    with, and the renormalization's combinations of those."""
    n_s, s, _ = stamps.shape
    k = basis.filters.shape[1]
    h = k // 2
    p = s - 2 * h
    # T[f, x, i] = f[i + 2h − x]: the valid interior of a true convolution along one axis, as a matrix product
    tap = np.arange(p)[None, :] + 2 * h - np.arange(s)[:, None]
    inside = (tap >= 0) & (tap < k)
    toeplitz = np.where(inside[None], basis.filters[:, np.clip(tap, 0, k - 1)], 0.0)  # (m, s, p)
    m = toeplitz.shape[0]
    # one product per stamp, of the same shapes whatever the number of stamps: each stamp's values do not depend
    # on the stamps stacked with it (fit_cells fits a candidate bitwise as fit_cell does)
    rows = stamps @ toeplitz.transpose(1, 0, 2).reshape(s, m * p)  # (N, s, m·p): every row ⊗ every profile
    raw = np.empty((n_s, basis.transform.shape[1], p, p))
    for f in range(m):
        js = np.flatnonzero(basis.along_x == f)
        if not js.size:
            continue
        columns = toeplitz[basis.along_y[js]].transpose(0, 2, 1).reshape(js.size * p, s)
        raw[:, js] = (columns @ rows[:, :, f * p:(f + 1) * p]).reshape(n_s, js.size, p, p)
    out = basis.transform @ raw.reshape(n_s, raw.shape[1], p * p)
    return out.reshape(n_s, -1, p, p)


# ------------------------------------------------------------------------ fits


def candidate_normal_equations(
    reference: np.ndarray,
    target: np.ndarray,
    variance: np.ndarray,
    basis_images: np.ndarray,
    *,
    fit_background: bool = True,
    constant_weighting: bool = False,
    separable: SeparableBasis | None = None,
) -> NormalEquations:
    """Weighted normal equations of the kernel (+ background) fit for a stack of stamps.

    Parameters
    ----------
    reference, target, variance : ndarray, shape (N, S, S)
        ``variance`` is ``V_T + V_R``; pixels with ``variance ≤ 0`` get zero weight.
    basis_images : ndarray, shape (n, k, k)
    separable : SeparableBasis, optional
        ``basis_images``' separable factors: the stamps are convolved by 1-D passes (:func:`convolve_stamps`).
    constant_weighting : bool
        Weigh the fit with one variance per stamp, the median of its good pixels (LSST's
        ``constantVarianceWeighting``): with per-pixel weights a bright star's core, whose own
        Poisson noise dominates its variance, counts for less than its wings, and the kernel
        fits the wings at the expense of the core — a core residual that decorrelation (which
        sharpens the difference) amplifies.  The residual statistics keep the per-pixel variance.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim == 2:
        reference, target, variance = reference[None], np.asarray(target)[None], np.asarray(variance)[None]
    h = basis_images.shape[-1] // 2
    s = reference.shape[-1]
    conv = convolve_stamps(reference, basis_images, separable)  # (N, n, P, P)
    n_c, n_b = conv.shape[:2]
    t = np.asarray(target, dtype=np.float64)[:, h : s - h, h : s - h].reshape(n_c, -1)
    var = np.asarray(variance, dtype=np.float64)[:, h : s - h, h : s - h].reshape(n_c, -1)
    good = var > 0
    inv_sigma = np.zeros_like(var)
    inv_sigma[good] = 1.0 / np.sqrt(var[good])
    w = inv_sigma**2
    cols = conv.reshape(n_c, n_b, -1)
    if fit_background:
        cols = np.concatenate([cols, np.ones((n_c, 1, cols.shape[-1]))], axis=1)
    aw = cols * w[:, None, :]
    matrix = aw @ cols.transpose(0, 2, 1)
    vector = np.einsum("cip,cp->ci", aw, t)
    sigma_sums = np.einsum("cip,cp->ci", cols, inv_sigma)
    stat_matrix = stat_vector = None
    if constant_weighting:
        stat_matrix, stat_vector = matrix, vector
        level = _good_medians(var, good)
        wc = np.where(good, 1.0 / level[:, None], 0.0)
        awc = cols * wc[:, None, :]
        matrix = awc @ cols.transpose(0, 2, 1)
        vector = np.einsum("cip,cp->ci", awc, t)
    return NormalEquations(
        matrix=matrix,
        vector=vector,
        sigma_sums=sigma_sums,
        target_sum=(t * inv_sigma).sum(axis=1),
        target_square=(t * t * w).sum(axis=1),
        npix=good.sum(axis=1).astype(np.float64),
        stat_matrix=stat_matrix,
        stat_vector=stat_vector,
    )


def _good_medians(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``np.median(values[i][good[i]])`` of each row (1.0 for a row without a good value), for all rows at once:
    each row sorted with its other values last, the middle one or the mean of the middle two taken."""
    n = good.sum(axis=1)
    srt = np.sort(np.where(good, values, np.nan), axis=1)  # (NaNs sort last)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[:, None], axis=1)[:, 0]
    return np.where(n > 0, (lo + hi) / 2, 1.0)


def _solve_one(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.abs(np.diag(m)))
    d[~(d > 0)] = 1.0
    ms = m / d[:, None] / d[None, :]
    bs = b / d
    try:
        x = np.linalg.solve(ms, bs)
        if np.all(np.isfinite(x)):
            return x / d
    except np.linalg.LinAlgError:
        pass
    try:
        x = np.linalg.pinv(ms, rcond=PINV_RCOND, hermitian=True) @ bs
    except np.linalg.LinAlgError:
        return np.full_like(b, np.nan)
    return x / d


def solve_normal_equations(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Solve ``M a = b`` robustly (one system or a stack); non-finite rows mean failure.

    Jacobi equilibration, LU solve, pseudo-inverse fallback (eigenvalues below
    ``PINV_RCOND`` × the largest are dropped).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    vector = np.asarray(vector, dtype=np.float64)
    if matrix.ndim == 2:
        return _solve_one(matrix, vector)
    # the stack at once (the same equilibration, the same LU solve of each system: bitwise _solve_one's), each
    # system that fails that on its own: a batch's 8 systems in one call instead of 8 (0.06 ms against 0.5)
    d = np.sqrt(np.abs(np.diagonal(matrix, axis1=1, axis2=2)))
    d[~(d > 0)] = 1.0
    ms = matrix / d[:, :, None] / d[:, None, :]
    bs = vector / d
    try:
        x = np.linalg.solve(ms, bs[..., None])[..., 0]
    except np.linalg.LinAlgError:  # (a singular one stops the stacked call)
        x = np.full_like(bs, np.nan)
    out = x / d
    for i in np.flatnonzero(~np.all(np.isfinite(x), axis=1)):
        out[i] = _solve_one(matrix[i], vector[i])
    return out


def residual_statistics(equations: NormalEquations, coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and standard deviation of :math:`D/\sigma` for given coefficients (see module doc)."""
    a = np.atleast_2d(coefficients)
    n = np.maximum(equations.npix, 1.0)
    matrix = equations.matrix if equations.stat_matrix is None else equations.stat_matrix
    vector = equations.vector if equations.stat_vector is None else equations.stat_vector
    mean = (equations.target_sum - np.einsum("ci,ci->c", a, equations.sigma_sums)) / n
    chi2 = (
        equations.target_square
        - 2.0 * np.einsum("ci,ci->c", a, vector)
        + np.einsum("ci,cij,cj->c", a, matrix, a)
    )
    var = np.maximum(chi2 / n - mean**2, 0.0)
    return mean, np.sqrt(var)


def _quality_reasons(coefficients, mean, std, max_mean, max_std) -> list[str]:
    reasons = []
    for a, m, s in zip(coefficients, mean, std):
        if not np.all(np.isfinite(a)):
            reasons.append("singular")
        elif not abs(m) <= max_mean:
            reasons.append("residual_mean")
        elif not s <= max_std:
            reasons.append("residual_std")
        else:
            reasons.append("")
    return reasons


def fit_candidates(
    reference: np.ndarray,
    target: np.ndarray,
    variance: np.ndarray,
    basis: KernelBasis,
    *,
    fit_background: bool = True,
    constant_weighting: bool = False,
    max_residual_mean: float = 0.25,
    max_residual_std: float = 1.5,
    ids=None,
    x=None,
    y=None,
    cell=-1,
) -> list[CandidateFit]:
    """Fit a stack of candidate stamps independently and apply the residual cuts.

    ``cell``: the stamps' cell, one for all or one per stamp.  Returns one :class:`CandidateFit` per stamp
    (``status`` ``"used"`` or ``"rejected"``).
    """
    eq = candidate_normal_equations(reference, target, variance, basis.images, fit_background=fit_background,
                                    constant_weighting=constant_weighting, separable=basis.separable)
    matrix = eq.matrix
    if basis.regularization is not None and basis.regularization_lambda > 0:
        matrix = regularize(matrix, basis.regularization, basis.regularization_lambda)
    coeffs = solve_normal_equations(matrix, eq.vector)
    finite = np.all(np.isfinite(coeffs), axis=1)
    safe = np.where(finite[:, None], coeffs, 0.0)
    mean, std = residual_statistics(eq, safe)
    reasons = _quality_reasons(coeffs, mean, std, max_residual_mean, max_residual_std)
    # each row's own sum (a matrix-vector product's blocking depends on how many rows are stacked): the same
    # kernel sum whichever candidates are fitted together (fit_cells)
    sums = (safe[:, : basis.n] * basis.sums).sum(axis=1)
    n_c = len(coeffs)
    ids = np.arange(n_c) if ids is None else np.asarray(ids)
    x = np.full(n_c, np.nan) if x is None else np.asarray(x, dtype=np.float64)
    y = np.full(n_c, np.nan) if y is None else np.asarray(y, dtype=np.float64)
    cells = np.broadcast_to(np.asarray(cell, dtype=np.int64), (n_c,))
    out = []
    for c in range(n_c):
        out.append(
            CandidateFit(
                id=int(ids[c]),
                cell=int(cells[c]),
                x=float(x[c]),
                y=float(y[c]),
                status=USED if not reasons[c] else REJECTED,
                reason=reasons[c],
                kernel_sum=float(sums[c]) if finite[c] else float("nan"),
                background=float(coeffs[c, basis.n]) if fit_background and finite[c] else 0.0,
                residual_mean=float(mean[c]) if finite[c] else float("nan"),
                residual_std=float(std[c]) if finite[c] else float("nan"),
                coefficients=coeffs[c],
                equations=eq.take(c),
            )
        )
    return out


#: Candidates fitted in one :func:`fit_candidates` call by :func:`fit_cells`: their transforms (~0.3 MB a candidate
#: with 27 basis images on 35² stamps) stay in the cache.  On a 4096² frame's ~650 cells, 2 cores: the first fits
#: took 0.32 s with 8, ~0.45 s with 128 (the transforms' passes over memory) and 0.41–0.46 s cell by cell.
FIT_BATCH = 8


def fit_cell(cell: CellStamps, basis: KernelBasis, config, exclude=frozenset()) -> CellFit:
    """Fit the candidates of one cell, brightest first, until ``candidates_per_cell`` are used.

    A rejected candidate is replaced by the next one of the cell.  Candidates whose id is
    in ``exclude`` (rejected by a later, global step) are skipped.  A pure function of
    picklable inputs: one Dask task per cell.

    Parameters
    ----------
    cell : CellStamps
    basis : KernelBasis
    config : KernelConfig
        Uses ``candidates_per_cell``, ``fit_background``, ``max_residual_mean``, ``max_residual_std``.
    exclude : collection of int
    """
    return fit_cells([cell], basis, config, [exclude])[0]


def fit_cells(cells: Sequence[CellStamps], basis: KernelBasis, config, excludes=None) -> list[CellFit]:
    """:func:`fit_cell` of each of ``cells`` (``excludes``: each one's ids to skip; none when None), the same fits
    in the same rounds: each cell's first ``candidates_per_cell`` candidates, then as many as it still lacks, …
    — but the candidates of every cell that fits in a round are fitted together, :data:`FIT_BATCH` at a time.

    A candidate's fit is its own (its stamps' transforms, normal equations and solution), so the values are
    those of the cells fitted one by one.  A 4096² frame has ~650 cells of one to six candidates: one
    :func:`fit_candidates` call per cell took 0.41–0.46 s, the cells fitted together 0.32 s."""
    want = int(config.candidates_per_cell)
    excludes = [frozenset()] * len(cells) if excludes is None else list(excludes)
    orders = []
    for cell, exclude in zip(cells, excludes):
        skip = {int(i) for i in exclude}
        orders.append([i for i in range(len(cell)) if int(cell.ids[i]) not in skip])
    fits: list[list[CandidateFit]] = [[] for _ in cells]
    used, pos = [0] * len(cells), [0] * len(cells)
    while True:
        batches = []  # (cell index, candidate indices) of this round
        for k, order in enumerate(orders):
            if used[k] < want and pos[k] < len(order):
                batch = order[pos[k]: pos[k] + (want - used[k])]
                pos[k] += len(batch)
                batches.append((k, np.asarray(batch)))
        if not batches:
            break
        results: list[CandidateFit] = []
        # the round's candidates in cell order, fitted FIT_BATCH at a time
        rows = [(k, i) for k, idx in batches for i in idx.tolist()]
        for start in range(0, len(rows), FIT_BATCH):
            part = rows[start: start + FIT_BATCH]

            def stack(name, part=part):
                return np.stack([getattr(cells[k], name)[i] for k, i in part])

            results.extend(fit_candidates(
                stack("reference"), stack("target"), stack("variance"), basis,
                fit_background=config.fit_background, constant_weighting=config.constant_variance_weighting,
                max_residual_mean=config.max_residual_mean, max_residual_std=config.max_residual_std,
                ids=np.array([cells[k].ids[i] for k, i in part]), x=np.array([cells[k].x[i] for k, i in part]),
                y=np.array([cells[k].y[i] for k, i in part]), cell=np.array([cells[k].cell for k, _ in part])))
        at = 0
        for k, idx in batches:
            mine = results[at: at + len(idx)]
            at += len(idx)
            fits[k].extend(mine)
            used[k] += sum(r.status == USED for r in mine)
    return [CellFit(cell=int(cell.cell), fits=tuple(f), n_available=len(order))
            for cell, f, order in zip(cells, fits, orders)]


# ------------------------------------------------------------------------ kernel-sum clipping


def clipped_mean_std(values, *, nsigma: float = 3.0, iterations: int = KERNEL_SUM_CLIP_ITERATIONS) -> tuple[float, float]:
    """Iterated ``nsigma``-clipped mean and sample standard deviation.

    Starts from the median and the MAD-based σ; iterates until the kept set is stable.
    When more than half of the values are identical (MAD = 0), the kept set is those
    values (mean = median, std = 0).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    center = float(np.median(v))
    scale = 1.4826 * float(np.median(np.abs(v - center)))
    keep = np.abs(v - center) <= nsigma * scale
    for _ in range(iterations):
        sel = v[keep]
        if sel.size < 2:
            break
        center, scale = float(sel.mean()), float(sel.std(ddof=1))
        new_keep = np.abs(v - center) <= nsigma * scale
        if np.array_equal(new_keep, keep) or new_keep.sum() < 2:
            break
        keep = new_keep
    sel = v[keep]
    return float(sel.mean()), float(sel.std(ddof=1)) if sel.size > 1 else 0.0


def clip_kernel_sums(sums, *, nsigma: float = 3.0) -> tuple[np.ndarray, float, float]:
    r"""Reject kernel sums with :math:`|\Sigma k - \mathrm{mean}| > n\,\mathrm{std}` (clipped stats).

    Returns
    -------
    keep : ndarray of bool
    mean, std : float
        The clipped statistics (``std`` floored at ``MIN_KERNEL_SUM_SCATTER × |mean|``).
    """
    s = np.asarray(sums, dtype=np.float64)
    mean, std = clipped_mean_std(s, nsigma=nsigma)
    std = max(std, MIN_KERNEL_SUM_SCATTER * abs(mean))
    keep = np.isfinite(s) & (np.abs(s - mean) <= nsigma * std)
    return keep, mean, std


def assign_cells(x, y, bbox, cell_size: int) -> tuple[np.ndarray, int, int]:
    """Row-major cell index of parent positions (x, y) in ``cell_size`` cells over ``bbox``.

    ``bbox`` is ``(x_min, x_max, y_min, y_max)`` inclusive-exclusive.  Returns
    ``(cell, n_cells_x, n_cells_y)``.
    """
    x0, x1, y0, y1 = bbox
    ncx = max(1, int(np.ceil((x1 - x0) / cell_size)))
    ncy = max(1, int(np.ceil((y1 - y0) / cell_size)))
    cx = np.clip(((np.asarray(x, dtype=np.float64) - x0) // cell_size).astype(int), 0, ncx - 1)
    cy = np.clip(((np.asarray(y, dtype=np.float64) - y0) // cell_size).astype(int), 0, ncy - 1)
    return cy * ncx + cx, ncx, ncy
