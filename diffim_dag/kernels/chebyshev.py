r"""2-D Chebyshev polynomials for spatial variation of kernels and backgrounds.

Terms are :math:`T_i(u)\,T_j(v)` with :math:`i + j \le n`, ordered by total degree
and, within a degree, by decreasing power of ``u``:
``(0,0), (1,0), (0,1), (2,0), (1,1), (0,2), …`` — the order of
``lsst.afw.math.Chebyshev1Function2``.  ``u, v`` are the pixel coordinates
mapped from a bounding box onto ``[-1, 1]``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["n_terms", "term_powers", "scale_to_unit", "chebyshev_terms"]


def n_terms(order: int) -> int:
    """Number of terms of a 2-D polynomial of total degree ``order``: (n+1)(n+2)/2."""
    return (order + 1) * (order + 2) // 2


def term_powers(order: int) -> list[tuple[int, int]]:
    """``[(i, j), …]`` powers of u and v in LSST's order."""
    return [(d - j, j) for d in range(order + 1) for j in range(d + 1)]


def scale_to_unit(x, x_min: float, x_max: float):
    """Map ``[x_min, x_max]`` onto ``[-1, 1]`` (x_max > x_min)."""
    x = np.asarray(x, dtype=np.float64)
    return (2.0 * x - (x_min + x_max)) / (x_max - x_min)


def _cheb_1d(u: np.ndarray, order: int) -> list[np.ndarray]:
    out = [np.ones_like(u)]
    if order >= 1:
        out.append(u)
    for _ in range(2, order + 1):
        out.append(2.0 * u * out[-1] - out[-2])
    return out


def chebyshev_terms(x, y, order: int, bbox: tuple[float, float, float, float]) -> np.ndarray:
    """Values of every term at (x, y).

    Parameters
    ----------
    x, y : array_like
        Parent-frame pixel coordinates (any broadcastable shapes).
    order : int
        Total degree.
    bbox : (x_min, x_max, y_min, y_max)
        The box mapped onto ``[-1, 1]²`` (use the last pixel index as max).

    Returns
    -------
    ndarray, shape (n_terms(order),) + broadcast shape of x, y
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    u = scale_to_unit(x, bbox[0], bbox[1])
    v = scale_to_unit(y, bbox[2], bbox[3])
    tu = _cheb_1d(u, order)
    tv = _cheb_1d(v, order)
    return np.stack([tu[i] * tv[j] for i, j in term_powers(order)])
