r"""Kernel bases for PSF matching: Alard–Lupton Gaussians × polynomials, and delta functions.

Alard–Lupton basis (Alard & Lupton 1998; Alard 2000)
-----------------------------------------------------
The kernel is a linear combination of

.. math::  B_{g,p,q}(u, v) = \exp\!\left(-\frac{u^2 + v^2}{2 s_g^2}\right)\,
           \hat u^{\,p}\, \hat v^{\,q}, \qquad p + q \le d_g,

for Gaussians of widths :math:`s_g` (``s, 2s, 4s``) and 2-D polynomials of degree
:math:`d_g` (``4, 2, 2``) in the pixel offsets :math:`\hat u = u / h, \hat v = v / h`
scaled to :math:`[-1, 1]` (``h`` is the kernel half-width).  That is
:math:`\sum_g (d_g + 1)(d_g + 2) / 2` functions (27 for the defaults).  They are
ordered by Gaussian, then by total degree, then by decreasing power of ``u``.

Renormalization (as ``lsst.ip.diffim.renormalizeKernelList``): basis 0 is scaled to
unit sum; every other basis has ``(Σ B_k) B_0`` subtracted, so that it sums to zero,
and is scaled to unit L2 norm.  The kernel sum is then the coefficient of basis 0
alone, which the spatial solve holds constant over the image.

Widths (``lsst.ip.diffim.makeKernelBasisList``)
-----------------------------------------------
With :math:`\sigma_r, \sigma_t` the Gaussian-equivalent widths (FWHM / 2.3548) of the
*reference* (convolved) and *target* PSFs, the matching kernel has width
:math:`\sigma_K = \sqrt{|\sigma_t^2 - \sigma_r^2|}`; when the convolved image is the
sharper one (:math:`\sigma_r \le \sigma_t`) :math:`\sigma_K` is floored at
``sigma_floor``.  The base width is :math:`s = \max(\text{min\_sigma}, \sigma_K / 2)`
and the widths are :math:`s \times` ``width_multipliers``.  The kernel size is
``odd(kernel_size_factor × largest width)`` clamped to
``[min_kernel_size, max_kernel_size]``.

Delta-function basis
--------------------
``size²`` pixel deltas, renormalized like the Alard–Lupton basis (basis 0 is the
central delta, the others are :math:`(\delta_k - \delta_0)/\sqrt 2`) so that the kernel
sum again lives in one coefficient.  Its least-squares problems are regularized with
the Laplacian (second-difference) smoothness penalty :math:`\|L K\|^2`, expressed in
the basis coefficients as :math:`H = B^T L^T L B` (``B`` is the ``size² × n`` matrix of
basis images).  The penalty added to normal equations ``M`` is
:math:`\lambda\, \mathrm{tr}(M) / \mathrm{tr}(H)\, H` (see :func:`regularize`), which
makes λ dimensionless, the same scaling idea as ``ip_diffim``'s
``lambdaType="absolute"`` applied to a trace-normalized ``H``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from ..psf import FWHM_PER_SIGMA

__all__ = [
    "KernelBasis",
    "n_basis_functions",
    "gaussian_widths",
    "kernel_size_for_widths",
    "alard_lupton_basis",
    "SeparableBasis",
    "renormalize_basis",
    "delta_function_basis",
    "laplacian_regularization",
    "regularize",
    "basis_from_config",
]

ALARD_LUPTON = "alard-lupton"
DELTA_FUNCTION = "delta-function"


@dataclass(frozen=True, eq=False)
class KernelBasis:
    """A kernel basis and, optionally, the regularization of its coefficients.

    Attributes
    ----------
    images : ndarray, shape (n, size, size)
        Basis images ``B_i[v + h, u + h]``; basis 0 sums to 1, all others to 0.
    kind : str
        ``"alard-lupton"`` or ``"delta-function"``.
    sigmas : tuple of float
        Gaussian widths (pixels); empty for the delta-function basis.
    regularization : ndarray, shape (n, n), or None
        Penalty matrix ``H`` on the basis coefficients (delta-function basis).
    regularization_lambda : float
        Dimensionless strength λ (see :func:`regularize`).
    """

    images: np.ndarray
    kind: str = ALARD_LUPTON
    sigmas: tuple[float, ...] = ()
    regularization: np.ndarray | None = None
    regularization_lambda: float = 0.0
    degrees: tuple[int, ...] = field(default=())

    def __post_init__(self):
        images = np.asarray(self.images, dtype=np.float64)
        if images.ndim != 3 or images.shape[1] != images.shape[2] or images.shape[1] % 2 == 0:
            raise ValueError(f"basis images must have shape (n, size, size) with odd size, got {images.shape}")
        object.__setattr__(self, "images", images)
        if self.regularization is not None:
            h = np.asarray(self.regularization, dtype=np.float64)
            if h.shape != (images.shape[0], images.shape[0]):
                raise ValueError(f"regularization must have shape {(images.shape[0],) * 2}, got {h.shape}")
            object.__setattr__(self, "regularization", h)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    @property
    def half_width(self) -> int:
        return self.size // 2

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    @property
    def sums(self) -> np.ndarray:
        """Sum of each basis image (1 for basis 0, 0 for the others)."""
        return self.images.sum(axis=(1, 2))

    @functools.cached_property
    def separable(self) -> "SeparableBasis | None":
        """The Alard–Lupton images as combinations of separable ones (:class:`SeparableBasis`); None for the
        delta-function basis, or when the widths and degrees do not give back the images."""
        if self.kind != ALARD_LUPTON or not self.sigmas or len(self.sigmas) != len(self.degrees):
            return None
        return SeparableBasis.of(self.images, self.sigmas, self.degrees)


@dataclass(frozen=True, eq=False)
class SeparableBasis:
    r"""A renormalized Alard–Lupton basis as sums of separable images: ``images[i]`` is
    :math:`\sum_j T_{ij}\, c_j(v)\, r_j(u)`, the raw functions :math:`e^{-(u^2+v^2)/2s_g^2} \hat u^p \hat v^q`
    being products of the 1-D profiles :math:`f_{g,p}(t) = e^{-t^2/2s_g^2}\hat t^p` (``filters``; ``along_x[j]``
    and ``along_y[j]`` index them) and the renormalization linear (``transform`` :math:`T`).  A stamp is then
    convolved with every basis image by 1-D passes (:func:`~diffim_dag.kernels.candidates.convolve_stamps`):
    a row pass per profile, a column pass per raw function — ~k instead of ~k² products per pixel."""

    filters: np.ndarray  # (m, size)
    along_x: np.ndarray  # (n_raw,) int: the profile along u (the image's columns)
    along_y: np.ndarray  # (n_raw,) int: the profile along v (its rows)
    transform: np.ndarray  # (n, n_raw)

    @classmethod
    def of(cls, images: np.ndarray, sigmas, degrees) -> "SeparableBasis | None":
        """The factors of :func:`alard_lupton_basis` ``(size, sigmas, degrees)`` = ``images``; None unless they give
        ``images`` back to round-off."""
        images = np.asarray(images, dtype=np.float64)
        size = images.shape[-1]
        h = size // 2
        t = np.arange(-h, h + 1, dtype=np.float64)
        filters, along_x, along_y = [], [], []
        for sigma, degree in zip(sigmas, degrees):
            first = len(filters)
            g = np.exp(-0.5 * t * t / sigma**2)
            filters.extend(g * (t / h) ** p for p in range(degree + 1))
            for p, q in _powers(degree):  # (alard_lupton_basis's order)
                along_x.append(first + p)
                along_y.append(first + q)
        filters = np.array(filters)
        raw = filters[along_y][:, :, None] * filters[along_x][:, None, :]
        if raw.shape != images.shape:
            return None
        _, transform = renormalize_basis(raw, with_transform=True)  # (the renormalization's coefficients)
        rebuilt = np.tensordot(transform, raw, axes=1)
        if not np.allclose(rebuilt, images, rtol=0.0, atol=1e-12 * float(np.abs(images).max())):
            return None
        return cls(filters=filters, along_x=np.array(along_x), along_y=np.array(along_y), transform=transform)


def n_basis_functions(degrees) -> int:
    """Number of Alard–Lupton functions: :math:`\\sum_g (d_g + 1)(d_g + 2) / 2`."""
    return int(sum((d + 1) * (d + 2) // 2 for d in degrees))


def _odd(n: float) -> int:
    n = int(math.ceil(n - 1e-9))
    return n if n % 2 == 1 else n + 1


def gaussian_widths(
    fwhm_reference: float,
    fwhm_target: float,
    *,
    width_multipliers=(1.0, 2.0, 4.0),
    min_sigma: float = 0.7,
    sigma_floor: float = 0.4,
) -> tuple[float, ...]:
    r"""Gaussian widths of the Alard–Lupton basis from the two PSFs' FWHMs.

    Parameters
    ----------
    fwhm_reference : float
        FWHM (pixels) of the image that is convolved with the kernel.
    fwhm_target : float
        FWHM of the image it is matched to.

    Returns
    -------
    tuple of float
        :math:`s \times m` for each multiplier ``m``, with
        :math:`s = \max(\text{min\_sigma}, \sigma_K/2)` and
        :math:`\sigma_K = \sqrt{|\sigma_t^2 - \sigma_r^2|}`
        (floored at ``sigma_floor`` when the reference is the sharper image).
    """
    if not (fwhm_reference > 0 and fwhm_target > 0):
        raise ValueError(f"PSF FWHMs must be positive, got reference={fwhm_reference}, target={fwhm_target}")
    s_ref = fwhm_reference / FWHM_PER_SIGMA
    s_tgt = fwhm_target / FWHM_PER_SIGMA
    sigma_k = math.sqrt(abs(s_tgt**2 - s_ref**2))
    if s_ref <= s_tgt:
        sigma_k = max(sigma_k, sigma_floor)
    s = max(min_sigma, sigma_k / 2.0)
    return tuple(float(s * m) for m in width_multipliers)


def kernel_size_for_widths(sigmas, *, factor: float = 6.0, min_size: int = 21, max_size: int = 35) -> int:
    """``odd(factor × max(sigmas))`` clamped to ``[min_size, max_size]`` (both odd)."""
    return int(min(max(_odd(factor * max(sigmas)), min_size), max_size))


def renormalize_basis(images: np.ndarray, *, with_transform: bool = False):
    r"""Basis 0 → unit sum; others → :math:`B_k - (\sum B_k) B_0`, then unit L2 norm.

    ``with_transform``: also the matrix :math:`T` of those steps, ``result = tensordot(T, images, 1)`` to
    round-off (the coefficients of each renormalized image on the ``images`` given: :class:`SeparableBasis`).

    Raises
    ------
    ValueError
        If basis 0 sums to zero or a basis vanishes after the subtraction.
    """
    out = np.array(images, dtype=np.float64)
    transform = np.eye(out.shape[0])
    s0 = out[0].sum()
    if s0 == 0:
        raise ValueError("basis 0 sums to 0 and cannot carry the kernel sum")
    out[0] /= s0
    transform[0] /= s0
    for k in range(1, out.shape[0]):
        total = out[k].sum()
        out[k] -= total * out[0]
        transform[k] -= total * transform[0]
        norm = math.sqrt(float((out[k] ** 2).sum()))
        if norm == 0:
            raise ValueError(f"basis {k} vanishes after removing its sum")
        out[k] /= norm
        transform[k] /= norm
    return (out, transform) if with_transform else out


def alard_lupton_basis(size: int, sigmas, degrees) -> np.ndarray:
    """Renormalized Alard–Lupton basis images, shape ``(n_basis_functions(degrees), size, size)``."""
    if size % 2 == 0 or size < 3:
        raise ValueError(f"kernel size must be odd and ≥ 3, got {size}")
    if len(sigmas) != len(degrees):
        raise ValueError(f"need one degree per Gaussian, got {len(sigmas)} widths and {len(degrees)} degrees")
    h = size // 2
    grid = np.arange(-h, h + 1, dtype=np.float64)
    u = grid[None, :]
    v = grid[:, None]
    uh, vh = u / h, v / h
    images = []
    for sigma, degree in zip(sigmas, degrees):
        g = np.exp(-0.5 * (u * u + v * v) / sigma**2)
        images.extend(g * uh**p * vh**q for p, q in _powers(degree))
    return renormalize_basis(np.stack(images))


def _powers(degree: int) -> list[tuple[int, int]]:
    r"""The ``(p, q)`` powers of :math:`\hat u^p \hat v^q` of one Gaussian, in the basis's order: by total degree,
    then by decreasing power of ``u``."""
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def delta_function_basis(size: int) -> np.ndarray:
    r"""``size²`` deltas renormalized: the central delta, then :math:`(\delta_k - \delta_0)/\sqrt2`."""
    if size % 2 == 0 or size < 3:
        raise ValueError(f"kernel size must be odd and ≥ 3, got {size}")
    n = size * size
    c = n // 2
    order = [c] + [k for k in range(n) if k != c]
    images = np.zeros((n, size, size))
    flat = images.reshape(n, n)
    flat[np.arange(n), order] = 1.0
    return renormalize_basis(images)


def _laplacian_operator(size: int) -> np.ndarray:
    """5-point second-difference operator on a ``size × size`` kernel (zero outside), shape (size², size²)."""
    n = size * size
    lap = np.zeros((n, n))
    for y in range(size):
        for x in range(size):
            k = y * size + x
            lap[k, k] = -4.0
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < size and 0 <= xx < size:
                    lap[k, yy * size + xx] = 1.0
    return lap


def laplacian_regularization(images: np.ndarray) -> np.ndarray:
    r"""Penalty :math:`H = B^T L^T L B` of the Laplacian of the kernel, on basis coefficients.

    ``B`` is the ``(size², n)`` matrix whose columns are the flattened basis images and
    ``L`` the 5-point second-difference operator, so that :math:`c^T H c = \|L K\|^2`
    for the kernel :math:`K = B c`.
    """
    images = np.asarray(images, dtype=np.float64)
    n, size, _ = images.shape
    b = images.reshape(n, size * size).T
    lb = _laplacian_operator(size) @ b
    return lb.T @ lb


def regularize(normal_matrix: np.ndarray, penalty: np.ndarray, lam: float) -> np.ndarray:
    r"""``M + λ tr(M_kk)/tr(H) H`` applied to the leading (kernel) block of ``M``.

    ``normal_matrix`` may carry extra trailing parameters (the background) that are
    not penalized; it may be a stack ``(..., p, p)``.
    """
    n = penalty.shape[0]
    m = np.array(normal_matrix, dtype=np.float64, copy=True)
    tr_h = float(np.trace(penalty))
    if lam <= 0 or tr_h <= 0:
        return m
    tr_m = np.trace(m[..., :n, :n], axis1=-2, axis2=-1)
    scale = lam * tr_m / tr_h
    m[..., :n, :n] += np.asarray(scale)[..., None, None] * penalty
    return m


def basis_from_config(config, fwhm_reference: float, fwhm_target: float) -> KernelBasis:
    """The basis that a :class:`~diffim_dag.config.KernelConfig` asks for, given the two PSF FWHMs.

    The kernel size comes from the Alard–Lupton widths for both kinds of basis.
    """
    sigmas = gaussian_widths(
        fwhm_reference,
        fwhm_target,
        width_multipliers=config.width_multipliers,
        min_sigma=config.min_sigma,
        sigma_floor=config.sigma_floor,
    )
    size = kernel_size_for_widths(
        sigmas, factor=config.kernel_size_factor, min_size=config.min_kernel_size, max_size=config.max_kernel_size
    )
    if config.basis == DELTA_FUNCTION:
        images = delta_function_basis(size)
        return KernelBasis(
            images=images,
            kind=DELTA_FUNCTION,
            sigmas=sigmas,
            regularization=laplacian_regularization(images),
            regularization_lambda=float(config.regularization_lambda),
        )
    images = alard_lupton_basis(size, sigmas, config.gaussian_degrees)
    return KernelBasis(images=images, kind=ALARD_LUPTON, sigmas=sigmas, degrees=tuple(config.gaussian_degrees))
