r"""The spatially varying PSF-matching kernel and background: :class:`KernelSolution`.

.. math::

    K(u, v; x, y) = \sum_{i} c_i(x, y)\, B_i(u, v), \qquad
    c_i(x, y) = \sum_{t} a_{i t}\, T_t(x, y)

with basis images :math:`B_i` (index ``[i, v + h, u + h]``, ``h = size // 2``) and
Chebyshev spatial terms :math:`T_t` (:mod:`~diffim_dag.kernels.chebyshev`).
The differential background is :math:`b(x, y) = \sum_t \beta_t T_t(x, y)`.

Convention: *convolution* is true convolution, ``out(x) = Σ_u K(u) I(x − u)``,
the same as ``scipy.ndimage.convolve`` and ``scipy.signal.fftconvolve(mode="same")``
for an odd kernel centred at ``[h, h]``.

Because the coefficients are polynomials in (x, y),

.. math:: (I \otimes K)(x, y) = \sum_t T_t(x, y)\, (I \otimes K_t)(x, y), \quad K_t = \sum_i a_{it} B_i,

so a spatially varying convolution costs one plain convolution per spatial term
(:meth:`KernelSolution.term_kernels`), exactly, with no piecewise-constant approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chebyshev import chebyshev_terms, n_terms

__all__ = ["KernelSolution"]

CONVOLVE_TEMPLATE = "convolveTemplate"
CONVOLVE_SCIENCE = "convolveScience"


@dataclass(frozen=True, eq=False)
class KernelSolution:
    """A fitted spatial kernel and background.

    Attributes
    ----------
    basis : ndarray, shape (n_basis, size, size)
        Kernel basis images.
    kernel_coefficients : ndarray, shape (n_basis, n_terms(spatial_order))
        Chebyshev coefficients of each basis weight.
    spatial_order : int
        Total degree of the kernel's spatial variation.
    background_coefficients : ndarray, shape (n_terms(background_order),)
        Chebyshev coefficients of the differential background.
    background_order : int
    bbox : (x_min, x_max, y_min, y_max)
        Parent-frame box mapped onto [-1, 1]² for the Chebyshev terms (max = last pixel index).
    mode : str
        ``"convolveTemplate"`` or ``"convolveScience"``: which image the kernel convolves.
    """

    basis: np.ndarray
    kernel_coefficients: np.ndarray
    spatial_order: int
    background_coefficients: np.ndarray
    background_order: int
    bbox: tuple[float, float, float, float]
    mode: str = CONVOLVE_TEMPLATE

    def __post_init__(self):
        basis = np.asarray(self.basis, dtype=np.float64)
        coeffs = np.asarray(self.kernel_coefficients, dtype=np.float64)
        bg = np.asarray(self.background_coefficients, dtype=np.float64)
        if basis.ndim != 3 or basis.shape[1] != basis.shape[2] or basis.shape[1] % 2 == 0:
            raise ValueError(f"basis must have shape (n, size, size) with odd size, got {basis.shape}")
        if coeffs.shape != (basis.shape[0], n_terms(self.spatial_order)):
            raise ValueError(
                f"kernel_coefficients must have shape {(basis.shape[0], n_terms(self.spatial_order))}, got {coeffs.shape}"
            )
        if bg.shape != (n_terms(self.background_order),):
            raise ValueError(f"background_coefficients must have shape {(n_terms(self.background_order),)}, got {bg.shape}")
        if self.mode not in (CONVOLVE_TEMPLATE, CONVOLVE_SCIENCE):
            raise ValueError(f"mode must be {CONVOLVE_TEMPLATE!r} or {CONVOLVE_SCIENCE!r}, got {self.mode!r}")
        object.__setattr__(self, "basis", basis)
        object.__setattr__(self, "kernel_coefficients", coeffs)
        object.__setattr__(self, "background_coefficients", bg)
        object.__setattr__(self, "bbox", tuple(float(b) for b in self.bbox))

    @property
    def size(self) -> int:
        return int(self.basis.shape[1])

    @property
    def half_width(self) -> int:
        return self.size // 2

    @property
    def center(self) -> tuple[float, float]:
        x0, x1, y0, y1 = self.bbox
        return 0.5 * (x0 + x1), 0.5 * (y0 + y1)

    def basis_weights(self, x, y) -> np.ndarray:
        """``c_i(x, y)`` for every basis function; shape (n_basis,) + shape of x."""
        terms = chebyshev_terms(x, y, self.spatial_order, self.bbox)
        return np.tensordot(self.kernel_coefficients, terms, axes=(1, 0))

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The kernel image at parent position (x, y)."""
        w = self.basis_weights(float(x), float(y))
        return np.tensordot(w, self.basis, axes=(0, 0))

    def kernel_sum_at(self, x: float, y: float) -> float:
        return float(self.kernel_at(x, y).sum())

    def kernel_sum_at_center(self) -> float:
        return self.kernel_sum_at(*self.center)

    def background_at(self, x, y) -> np.ndarray:
        """Differential background at (x, y) (arrays broadcast)."""
        terms = chebyshev_terms(x, y, self.background_order, self.bbox)
        return np.tensordot(self.background_coefficients, terms, axes=(0, 0))

    def term_kernels(self) -> np.ndarray:
        """``K_t = Σ_i a_{it} B_i`` for each spatial term t; shape (n_terms, size, size)."""
        return np.tensordot(self.kernel_coefficients.T, self.basis, axes=(1, 0))

    def spatial_terms(self, x, y) -> np.ndarray:
        """``T_t(x, y)`` of the kernel's spatial polynomial; shape (n_terms,) + shape of x."""
        return chebyshev_terms(x, y, self.spatial_order, self.bbox)

    # serialization ---------------------------------------------------------
    def to_payload(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {
            "spatial_order": int(self.spatial_order),
            "background_order": int(self.background_order),
            "bbox": list(self.bbox),
            "mode": self.mode,
        }
        arrays = {
            "basis": self.basis,
            "kernel_coefficients": self.kernel_coefficients,
            "background_coefficients": self.background_coefficients,
        }
        return meta, arrays

    @classmethod
    def from_payload(cls, meta: dict, arrays: dict[str, np.ndarray]) -> KernelSolution:
        return cls(
            basis=arrays["basis"],
            kernel_coefficients=arrays["kernel_coefficients"],
            spatial_order=int(meta["spatial_order"]),
            background_coefficients=arrays["background_coefficients"],
            background_order=int(meta["background_order"]),
            bbox=tuple(meta["bbox"]),
            mode=meta.get("mode", CONVOLVE_TEMPLATE),
        )
