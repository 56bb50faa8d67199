r"""Spatial solve of the PSF-matching kernel and background (Alard 2000).

The basis weights and the background vary as Chebyshev polynomials
:math:`T_t(x, y)` (:mod:`~diffim_dag.kernels.chebyshev`):

.. math::
    c_i(x, y) = \sum_t a_{it}\, T_t(x, y), \qquad b(x, y) = \sum_u \beta_u\, T_u(x, y),

with basis 0 (the only basis with non-zero sum) held spatially constant, so that the
kernel sum :math:`a_{00}` is the same everywhere.  Candidate ``c`` at :math:`(x_c, y_c)`
has local coefficients :math:`\mathbf c_c = E_c \boldsymbol\theta` where :math:`E_c`
holds the spatial terms at its centre, so its contribution to the global normal
equations is :math:`E_c^T M_c E_c` and :math:`E_c^T \mathbf b_c`:

.. math::
    \mathcal M_{(it),(js)} = \sum_c M_{c,ij}\, T_t(x_c) T_s(x_c), \qquad
    \mathcal B_{(it)} = \sum_c b_{c,i}\, T_t(x_c)

(and likewise for the background rows), accumulated as a few dense matrix products
instead of ``N`` explicit :math:`E_c^T M_c E_c`.  After the solve every candidate is
re-assessed with its local coefficients :math:`E_c\hat{\boldsymbol\theta}` and the same
residual thresholds as the single-candidate fits
(:func:`~diffim_dag.kernels.candidates.residual_statistics`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .basis import KernelBasis
from .candidates import NormalEquations, residual_statistics, solve_normal_equations
from .chebyshev import chebyshev_terms, n_terms
from .solution import CONVOLVE_TEMPLATE, KernelSolution

__all__ = ["SpatialFit", "parameter_index", "solve_spatial", "local_coefficients", "assess_spatial"]


@dataclass(frozen=True, eq=False)
class SpatialFit:
    """The spatial solution and the conditioning of its normal equations.

    ``condition_number`` is that of the Jacobi-equilibrated system actually solved;
    ``condition_number_raw`` that of the raw matrix.
    """

    solution: KernelSolution
    parameters: np.ndarray
    condition_number: float
    condition_number_raw: float
    n_candidates: int


def parameter_index(n_basis: int, spatial_order: int, background_order: int, fit_background: bool) -> np.ndarray:
    """Indices, in the full ``(i, t)`` + background layout, of the free parameters.

    The full layout is ``a[i, t]`` at ``i * n_terms(spatial_order) + t`` followed by the
    background terms; basis 0 keeps only its constant term.
    """
    ntk = n_terms(spatial_order)
    ntb = n_terms(background_order) if fit_background else 0
    keep = [0] + list(range(ntk, n_basis * ntk)) + list(range(n_basis * ntk, n_basis * ntk + ntb))
    return np.asarray(keep, dtype=int)


def _spatial_system(eq: NormalEquations, tk: np.ndarray, tb: np.ndarray | None, n_basis: int):
    """Full (unreduced) global normal matrix and vector."""
    n_c = tk.shape[1]
    ntk = tk.shape[0]
    mk = eq.matrix[:, :n_basis, :n_basis].reshape(n_c, n_basis * n_basis)
    tt = (tk[:, None, :] * tk[None, :, :]).reshape(ntk * ntk, n_c)
    kk = (tt @ mk).reshape(ntk, ntk, n_basis, n_basis).transpose(2, 0, 3, 1).reshape(n_basis * ntk, n_basis * ntk)
    bk = np.einsum("ci,tc->it", eq.vector[:, :n_basis], tk).reshape(-1)
    if tb is None:
        return kk, bk
    ntb = tb.shape[0]
    p = n_basis * ntk + ntb
    full = np.zeros((p, p))
    full[: n_basis * ntk, : n_basis * ntk] = kk
    kb = np.einsum("ci,tc,uc->itu", eq.matrix[:, :n_basis, n_basis], tk, tb).reshape(n_basis * ntk, ntb)
    full[: n_basis * ntk, n_basis * ntk :] = kb
    full[n_basis * ntk :, : n_basis * ntk] = kb.T
    full[n_basis * ntk :, n_basis * ntk :] = np.einsum("c,uc,vc->uv", eq.matrix[:, n_basis, n_basis], tb, tb)
    bb = np.einsum("c,uc->u", eq.vector[:, n_basis], tb)
    return full, np.concatenate([bk, bb])


def _spatial_penalty(penalty: np.ndarray, ntk: int, p_full: int) -> np.ndarray:
    n = penalty.shape[0]
    h = np.zeros((p_full, p_full))
    for t in range(ntk):
        idx = np.arange(n) * ntk + t
        h[np.ix_(idx, idx)] = penalty
    return h


def local_coefficients(
    parameters: np.ndarray,
    x,
    y,
    *,
    n_basis: int,
    spatial_order: int,
    background_order: int,
    bbox,
    fit_background: bool = True,
) -> np.ndarray:
    """Local coefficients ``[c_0 … c_{n-1}, b]`` (``b`` only with a background) at each (x, y)."""
    ntk = n_terms(spatial_order)
    a = parameters[: n_basis * ntk].reshape(n_basis, ntk)
    tk = chebyshev_terms(np.atleast_1d(x), np.atleast_1d(y), spatial_order, bbox)
    coeffs = (a @ tk).T
    if fit_background:
        tb = chebyshev_terms(np.atleast_1d(x), np.atleast_1d(y), background_order, bbox)
        bg = parameters[n_basis * ntk :] @ tb
        coeffs = np.concatenate([coeffs, bg[:, None]], axis=1)
    return coeffs


def solve_spatial(
    equations: NormalEquations,
    x,
    y,
    basis: KernelBasis,
    *,
    spatial_order: int,
    background_order: int,
    bbox,
    fit_background: bool = True,
    mode: str = CONVOLVE_TEMPLATE,
) -> SpatialFit:
    """Accumulate the candidates' normal equations over the spatial terms and solve.

    Parameters
    ----------
    equations : NormalEquations
        Stacked per-candidate equations (``p = n_basis + 1`` with a background).
    x, y : array_like
        Candidate centres (parent pixels).
    bbox : (x_min, x_max, y_min, y_max)
        Box mapped onto [-1, 1]² (max = last pixel index), as in :class:`KernelSolution`.

    Returns
    -------
    SpatialFit
        A :class:`KernelSolution` with ``kernel_coefficients[0, 1:] = 0``.
    """
    n_b = basis.n
    ntk = n_terms(spatial_order)
    ntb = n_terms(background_order)
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    tk = chebyshev_terms(x, y, spatial_order, bbox)
    tb = chebyshev_terms(x, y, background_order, bbox) if fit_background else None
    full_m, full_b = _spatial_system(equations, tk, tb, n_b)
    if basis.regularization is not None and basis.regularization_lambda > 0:
        h = _spatial_penalty(basis.regularization, ntk, full_m.shape[0])
        k = n_b * ntk
        scale = basis.regularization_lambda * np.trace(full_m[:k, :k]) / np.trace(h)
        full_m = full_m + scale * h
    keep = parameter_index(n_b, spatial_order, background_order, fit_background)
    m = full_m[np.ix_(keep, keep)]
    b = full_b[keep]
    theta = solve_normal_equations(m, b)
    d = np.sqrt(np.abs(np.diag(m)))
    d[~(d > 0)] = 1.0
    try:
        cond = float(np.linalg.cond(m / d[:, None] / d[None, :]))
        cond_raw = float(np.linalg.cond(m))
    except np.linalg.LinAlgError:
        cond, cond_raw = float("inf"), float("inf")
    params = np.zeros(full_m.shape[0])
    params[keep] = theta
    coeffs = params[: n_b * ntk].reshape(n_b, ntk)
    bg = params[n_b * ntk :] if fit_background else np.zeros(ntb)
    solution = KernelSolution(
        basis=basis.images,
        kernel_coefficients=coeffs,
        spatial_order=spatial_order,
        background_coefficients=bg,
        background_order=background_order,
        bbox=tuple(bbox),
        mode=mode,
    )
    return SpatialFit(
        solution=solution,
        parameters=params,
        condition_number=cond,
        condition_number_raw=cond_raw,
        n_candidates=int(len(x)),
    )


def assess_spatial(
    fit: SpatialFit,
    equations: NormalEquations,
    x,
    y,
    *,
    fit_background: bool = True,
    max_residual_mean: float = 0.25,
    max_residual_std: float = 1.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual mean and std of each candidate under the spatial model, and the cut reasons.

    Returns
    -------
    mean, std : ndarray
    reasons : ndarray of str
        ``""`` (kept), ``"spatial_residual_mean"`` or ``"spatial_residual_std"``.
    """
    sol = fit.solution
    coeffs = local_coefficients(
        fit.parameters,
        x,
        y,
        n_basis=sol.basis.shape[0],
        spatial_order=sol.spatial_order,
        background_order=sol.background_order,
        bbox=sol.bbox,
        fit_background=fit_background,
    )
    mean, std = residual_statistics(equations, coeffs)
    reasons = np.where(
        ~(np.abs(mean) <= max_residual_mean),
        "spatial_residual_mean",
        np.where(~(std <= max_residual_std), "spatial_residual_std", ""),
    )
    return mean, std, reasons
