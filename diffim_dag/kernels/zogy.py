r"""ZOGY image differencing of one cell (Zackay, Ofek & Gal-Yam 2016): arrays in, arrays out.

Notation
--------
``N`` (new = science) and ``R`` (reference = template) are background-subtracted
images of the same sky, with PSFs :math:`P_n, P_r`, flux zero points
:math:`F_n, F_r` (counts per unit of true flux) and white-noise variances
:math:`\sigma_n^2, \sigma_r^2`.  Hats are discrete Fourier transforms (``scipy.fft``
``rfft2``; forward unnormalized, inverse ``1/N``, so that a unit-sum PSF has
:math:`\hat P(0) = 1` and convolution is a product).

.. math::

    \hat D &= \frac{F_r \hat P_r \hat N - F_n \hat P_n \hat R}
                  {\sqrt{\sigma_n^2 F_r^2 |\hat P_r|^2 + \sigma_r^2 F_n^2 |\hat P_n|^2}}
             \qquad\text{(eq. 13: unit-variance white noise)}\\
    F_D &= \frac{F_r F_n}{\sqrt{\sigma_n^2 F_r^2 + \sigma_r^2 F_n^2}}, \qquad
    \hat P_D = \frac{F_r F_n \hat P_r \hat P_n}
                    {F_D \sqrt{\sigma_n^2 F_r^2 |\hat P_r|^2 + \sigma_r^2 F_n^2 |\hat P_n|^2}}
             \qquad\text{(eqs. 14, 15; } \hat P_D(0) = 1)\\
    \hat S &= F_D \overline{\hat P_D}\, \hat D \qquad\text{(eq. 17: the matched filter of D)}.

The difference is returned in the flux units of ``N``, :math:`D_N = (F_n / F_D)\,D`,
whose pixel variance for white inputs is :math:`\sigma_n^2 + (F_n/F_r)^2\sigma_r^2`
(200 for :math:`\sigma_n^2 = \sigma_r^2 = 100` and equal zero points).  Both
:math:`D_N` and :math:`S` are linear in the inputs,

.. math::  D_N = c_N \otimes N - c_R \otimes R, \qquad S = k_N \otimes N - k_R \otimes R,

with :math:`\hat c_N = (F_n/F_D) F_r \hat P_r / \Delta`, :math:`\hat c_R = (F_n/F_D) F_n \hat P_n / \Delta`,
:math:`\hat k_N = F_D \overline{\hat P_D} F_r \hat P_r / \Delta`,
:math:`\hat k_R = F_D \overline{\hat P_D} F_n \hat P_n / \Delta` and :math:`\Delta` the square
root above.  For independent pixels the variance planes propagate through the
*squared image-space kernels* (Zackay eqs. 25–27, without the astrometric terms):

.. math::  V(D_N) = V_N \otimes c_N^2 + V_R \otimes c_R^2, \qquad
           V(S) = V_N \otimes k_N^2 + V_R \otimes k_R^2,

and :math:`S_\mathrm{corr} = S / \sqrt{V(S)}` is the detection significance
(eq. 25).  For uniform noise :math:`V(S) = F_D^2 \sum P_D^2`, and a point source of
true flux :math:`f` peaks at :math:`S/\sqrt{V(S)} = f F_D \sqrt{\sum P_D^2}`, the
optimal S/N.

FFT conventions
---------------
A PSF image (odd side, centred on its middle pixel) is placed in the middle of a
zero array of the cell's FFT shape and ``ifftshift``-ed, which puts its centre at
index ``[0, 0]``: its transform has no linear phase (real for a point-symmetric
PSF), and ``irfft2`` of a product is a convolution that does not shift the image
(:func:`centred_fft`).  A cell is padded on every side to a fast FFT length
(``scipy.fft.next_fast_len``, not a power of two) with noise of the cell's σ
around its median, so that the circular wrap-around and the border see noise like
the data rather than a step.

References
----------
Zackay, B., Ofek, E. O. & Gal-Yam, A. 2016, ApJ 830, 27 ("Proper image subtraction").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from ..errors import PsfError
from .centroid import window_centroid

__all__ = [
    "ZogyCellResult",
    "centred_fft",
    "psf_centroid",
    "check_psf_centroids",
    "fill_with_noise",
    "zogy_fourier_terms",
    "zogy_cell",
    "blend_weights",
    "cell_cores",
]


def centred_fft(kernel: np.ndarray, shape: tuple[int, int], *, workers: int = 1) -> np.ndarray:
    r"""``rfft2`` of an odd-sized centred ``kernel`` zero-padded to ``shape``, centre at index ``[0, 0]``.

    The kernel is placed with its centre pixel ``[h_y, h_x]`` at ``[ny // 2, nx // 2]``
    of a zero array and ``ifftshift``-ed, so that its centre lands on ``[0, 0]``.  A
    product with this transform followed by ``irfft2`` is then the convolution
    :math:`\sum_u K(u) I(x - u)` without a shift, and a point-symmetric kernel has a
    real transform (vanishing phases).  For a unit-sum kernel the ``[0, 0]`` value is 1.

    Returns
    -------
    ndarray of complex128, shape ``(ny, nx // 2 + 1)``
    """
    k = np.asarray(kernel, dtype=np.float64)
    ny, nx = (int(s) for s in shape)
    ky, kx = k.shape
    if ky % 2 == 0 or kx % 2 == 0:
        raise ValueError(f"kernel must have odd sides, got {k.shape}")
    if ky > ny or kx > nx:
        raise ValueError(f"kernel of shape {k.shape} does not fit in the FFT shape {(ny, nx)}")
    big = np.zeros((ny, nx), dtype=np.float64)
    y0, x0 = ny // 2 - ky // 2, nx // 2 - kx // 2
    big[y0 : y0 + ky, x0 : x0 + kx] = k
    return scipy.fft.rfft2(scipy.fft.ifftshift(big), workers=workers)


def _image_of(ft: np.ndarray, shape: tuple[int, int], workers: int) -> np.ndarray:
    """Image-space kernel of a half-plane transform made by :func:`centred_fft` (centre at [0, 0])."""
    return scipy.fft.irfft2(ft, s=shape, workers=workers)


def psf_centroid(psf_image: np.ndarray, *, window: float | None = None) -> tuple[float, float]:
    """Centroid ``(dx, dy)`` of a PSF image relative to its middle pixel.

    First moments; with ``window`` (px), the iterated Gaussian-windowed centroid of that σ
    (:func:`~diffim_dag.kernels.centroid.window_centroid`, exact for a symmetric PSF): the far-wing
    noise of an empirical PSF then cannot move the centroid of its core.
    """
    p = np.asarray(psf_image, dtype=np.float64)
    if window is not None:
        if not p.sum() > 0:
            raise PsfError("PSF image has no positive flux")
        return window_centroid(p, window)
    ny, nx = p.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    dx, dy = xx - nx // 2, yy - ny // 2
    total = p.sum()
    if not total > 0:
        raise PsfError("PSF image has no positive flux")
    return float((p * dx).sum() / total), float((p * dy).sum() / total)


def check_psf_centroids(psf_new: np.ndarray, psf_reference: np.ndarray, *, max_offset: float = 0.2,
                        where: str = "") -> float:
    """Raise :class:`~diffim_dag.errors.PsfError` when the two PSFs' centroids differ by more than ``max_offset`` px.

    ZOGY assumes that both PSF models are centred on the same point: an offset ``δ``
    between them leaves a dipole of amplitude ~ ``δ / σ_PSF`` of every star's flux in
    the difference (the images are then misregistered, or a model is off-centre).

    The centroids are Gaussian-windowed (σ of the broader PSF; the wings' noise of an empirical
    model does not count).

    Returns
    -------
    float
        The centroid separation in pixels.
    """
    from ..psf import FWHM_PER_SIGMA, measure_fwhm

    window = max(measure_fwhm(psf_new), measure_fwhm(psf_reference)) / FWHM_PER_SIGMA
    xn, yn = psf_centroid(psf_new, window=window)
    xr, yr = psf_centroid(psf_reference, window=window)
    sep = float(np.hypot(xn - xr, yn - yr))
    if not sep <= max_offset:
        raise PsfError(
            f"ZOGY: the science and template PSF centroids differ by {sep:.3f} px{where} "
            f"(science ({xn:+.3f}, {yn:+.3f}), template ({xr:+.3f}, {yr:+.3f}); limit {max_offset:g} px): "
            "register the images or fix the PSF models"
        )
    return sep


def fill_with_noise(image: np.ndarray, bad: np.ndarray | None, sigma: float, rng: np.random.Generator,
                    level: float | None = None) -> np.ndarray:
    """A float64 copy of ``image`` with non-finite and ``bad`` pixels replaced by ``N(level, σ²)`` draws.

    ``level`` defaults to the median of the remaining pixels (0 when none is left).
    """
    a = np.array(image, dtype=np.float64, copy=True)
    replace = ~np.isfinite(a)
    if bad is not None:
        replace |= np.asarray(bad, dtype=bool)
    if replace.any():
        if level is None:
            good = a[~replace]
            level = float(np.median(good)) if good.size else 0.0
        a[replace] = level + sigma * rng.standard_normal(int(replace.sum()))
    return a


def _pad_with_noise(a: np.ndarray, pads: tuple[tuple[int, int], tuple[int, int]], sigma: float, level: float,
                    rng: np.random.Generator) -> np.ndarray:
    (b, t), (l, r) = pads
    ny, nx = a.shape
    # level + σ·N(0, 1), built in place (one padded array, no temporaries)
    out = rng.standard_normal((ny + b + t, nx + l + r))
    out *= sigma
    out += level
    out[b : b + ny, l : l + nx] = a
    return out


@dataclass(frozen=True, eq=False)
class ZogyFourier:
    """The Fourier-space ZOGY operators of one cell (half planes of the cell's FFT shape)."""

    shape: tuple[int, int]
    c_new: np.ndarray  # D_N = c_N ⊗ N − c_R ⊗ R
    c_reference: np.ndarray
    k_new: np.ndarray  # S = k_N ⊗ N − k_R ⊗ R
    k_reference: np.ndarray
    psf_difference: np.ndarray  # P̂_D
    flux_difference: float  # F_D


def zogy_fourier_terms(psf_new: np.ndarray, psf_reference: np.ndarray, shape: tuple[int, int], *,
                       sigma_new2: float, sigma_reference2: float, flux_new: float = 1.0,
                       flux_reference: float = 1.0, power_floor: float = 1e-30,
                       workers: int = 1) -> ZogyFourier:
    r"""The ZOGY operators :math:`\hat c_N, \hat c_R, \hat k_N, \hat k_R, \hat P_D` and :math:`F_D` (module doc).

    Parameters
    ----------
    psf_new, psf_reference : ndarray
        Odd-sized, centred, unit-sum PSF images of ``N`` and ``R``.
    shape : (ny, nx)
        The FFT shape of the cell.
    sigma_new2, sigma_reference2 : float
        White-noise variances :math:`\sigma_n^2, \sigma_r^2` (> 0).
    flux_new, flux_reference : float
        Zero points :math:`F_n, F_r` (> 0); only their ratio matters for :math:`D_N` and :math:`S_\mathrm{corr}`.
    power_floor : float
        Frequencies where both :math:`|\hat P_n|^2` and :math:`|\hat P_r|^2` are below this
        (the DFT's rounding floor: their ratio is noise) are treated as :math:`\hat P_n = \hat P_r`
        in :math:`\hat c_N, \hat c_R`, which keeps :math:`D` white with unit variance, and get
        :math:`\hat P_D = \hat k_N = \hat k_R = 0` (no signal reaches them).
    """
    sn2, sr2, fn, fr = float(sigma_new2), float(sigma_reference2), float(flux_new), float(flux_reference)
    for name, v in (("sigma_new2", sn2), ("sigma_reference2", sr2), ("flux_new", fn), ("flux_reference", fr)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")
    pn = centred_fft(psf_new / np.sum(psf_new), shape, workers=workers)
    pr = centred_fft(psf_reference / np.sum(psf_reference), shape, workers=workers)
    pn2 = pn.real**2 + pn.imag**2
    pr2 = pr.real**2 + pr.imag**2
    denom2 = sn2 * fr * fr * pr2 + sr2 * fn * fn * pn2
    # Where both PSFs are at the rounding floor their ratio is noise: take them as equal there
    # (LSST's ZogyTask does so at exact zeros), which keeps D white with unit variance.
    floor = (pn2 < power_floor) & (pr2 < power_floor)
    del pn2, pr2
    denom = np.sqrt(np.where(floor, 1.0, denom2))
    del denom2
    f_d = fr * fn / np.sqrt(sn2 * fr * fr + sr2 * fn * fn)
    p_d = np.where(floor, 0.0, fr * fn * pr * pn / (f_d * denom))
    scale = fn / f_d
    # the half planes are built one at a time, each with in-place steps (same operations in the
    # same order as the formulas), so that few full-size temporaries coexist
    conj_pd = np.conj(p_d)
    k_new = f_d * conj_pd
    k_new *= fr
    k_new *= pr
    k_new /= denom
    k_reference = f_d * conj_pd
    del conj_pd
    k_reference *= fn
    k_reference *= pn
    k_reference /= denom
    c_new = np.where(floor, scale * f_d / fn, scale * fr * pr / denom)
    del pr
    c_reference = np.where(floor, scale * f_d / fr, scale * fn * pn / denom)
    del pn, denom, floor
    return ZogyFourier(
        shape=(int(shape[0]), int(shape[1])),
        c_new=c_new,
        c_reference=c_reference,
        k_new=k_new,
        k_reference=k_reference,
        psf_difference=p_d,
        flux_difference=float(f_d),
    )


@dataclass(frozen=True, eq=False)
class ZogyCellResult:
    r"""ZOGY products of one cell (on the cell's unpadded region).

    Attributes
    ----------
    difference : ndarray
        :math:`D_N`, the proper difference in the flux units of the new image.
    difference_variance : ndarray
        :math:`V_N \otimes c_N^2 + V_R \otimes c_R^2`.
    score : ndarray
        :math:`S`, the proper detection statistic.
    score_variance : ndarray
        :math:`V(S) = V_N \otimes k_N^2 + V_R \otimes k_R^2`.
    psf_difference : ndarray
        :math:`P_D` as a centred, unit-sum image of the PSFs' size.
    flux_difference : float
        :math:`F_D`.
    """

    difference: np.ndarray
    difference_variance: np.ndarray
    score: np.ndarray
    score_variance: np.ndarray
    psf_difference: np.ndarray
    flux_difference: float


def _combine(ft_a: np.ndarray, kernel_a: np.ndarray, ft_b: np.ndarray, kernel_b: np.ndarray, sign: float,
             shape, workers) -> np.ndarray:
    r"""``irfft2(â k̂_a ± b̂ k̂_b)``: one half-plane accumulator, no other full-size temporary kept."""
    acc = ft_a * kernel_a
    term = ft_b * kernel_b
    if sign < 0:
        acc -= term
    else:
        acc += term
    del term
    return scipy.fft.irfft2(acc, s=shape, workers=workers)


def _square_kernel_ft(ft_kernel: np.ndarray, shape, workers) -> np.ndarray:
    k = _image_of(ft_kernel, shape, workers)
    np.multiply(k, k, out=k)
    return scipy.fft.rfft2(k, workers=workers)


def zogy_cell(
    new: np.ndarray,
    reference: np.ndarray,
    new_variance: np.ndarray,
    reference_variance: np.ndarray,
    psf_new: np.ndarray,
    psf_reference: np.ndarray,
    *,
    sigma_new2: float,
    sigma_reference2: float,
    flux_new: float = 1.0,
    flux_reference: float = 1.0,
    pad: int,
    bad_new: np.ndarray | None = None,
    bad_reference: np.ndarray | None = None,
    seed=0,
    workers: int = 1,
) -> ZogyCellResult:
    r"""ZOGY difference, score and their variance planes on one cell (see module doc).

    Non-finite and ``bad_*`` pixels are replaced by noise draws (the cell's σ around
    its median; their variance by :math:`\sigma^2`) before the transforms, and the
    cell is padded by at least ``pad`` pixels of such noise on every side, up to a
    fast FFT length.  The caller flags the replaced pixels in the mask.

    Parameters
    ----------
    new, reference : ndarray, shape (ny, nx)
        Background-subtracted images on one pixel grid.
    new_variance, reference_variance : ndarray, shape (ny, nx)
        Their variance planes.
    psf_new, psf_reference : ndarray
        Odd-sized, centred PSF images at the cell (normalized here).
    sigma_new2, sigma_reference2 : float
        Cell noise variances (e.g. clipped means of the variance planes).
    flux_new, flux_reference : float
        Zero points :math:`F_n, F_r`.
    pad : int
        Minimum noise padding (≥ the reach of the ZOGY kernels, e.g. twice the PSF size).
    bad_new, bad_reference : ndarray of bool, optional
        Pixels to replace by noise.
    seed : int or sequence of int
        Seed of the noise fill (deterministic per cell).
    workers : int
        ``scipy.fft`` threads.

    Returns
    -------
    ZogyCellResult
        The four planes are float64 views of the cell's core in the padded transforms.

    Notes
    -----
    Each operator and transform is freed once used, so the working set peaks near ten
    padded planes (complex128 half planes or float64 images of the FFT shape; fourteen
    before), e.g. ≈ 140 MB for a 1198² cell padded to 1320².
    """
    n = np.asarray(new)
    ny, nx = n.shape
    if np.shape(reference) != n.shape or np.shape(new_variance) != n.shape or np.shape(reference_variance) != n.shape:
        raise ValueError("new, reference and their variance planes must have one shape")
    pad = int(pad)
    fy = scipy.fft.next_fast_len(ny + 2 * pad, real=True)
    fx = scipy.fft.next_fast_len(nx + 2 * pad, real=True)
    pads = ((pad, fy - ny - pad), (pad, fx - nx - pad))
    shape = (fy, fx)
    core = (slice(pad, pad + ny), slice(pad, pad + nx))
    rng = np.random.default_rng(seed)
    sn, sr = float(np.sqrt(sigma_new2)), float(np.sqrt(sigma_reference2))

    def prepare(img, bad, sigma):
        img = np.asarray(img)
        good = np.isfinite(img) if bad is None else (np.isfinite(img) & ~np.asarray(bad, dtype=bool))
        level = float(np.median(img[good])) if good.any() else 0.0
        return _pad_with_noise(fill_with_noise(img, ~good, sigma, rng, level), pads, sigma, level, rng)

    def prepare_var(var, sigma2):
        # the padded plane directly (σ² around the cell), then the cell's values with their
        # non-finite and negative pixels set to σ²
        v = np.full(shape, float(sigma2), dtype=np.float64)
        inner = v[core]
        inner[...] = var
        inner[~np.isfinite(inner) | (inner < 0)] = sigma2
        return v

    ops = zogy_fourier_terms(psf_new, psf_reference, shape, sigma_new2=sigma_new2, sigma_reference2=sigma_reference2,
                             flux_new=flux_new, flux_reference=flux_reference, workers=workers)
    # take the operators out of the (frozen) container so that each is freed once used
    c_new, c_reference, k_new, k_reference = ops.c_new, ops.c_reference, ops.k_new, ops.k_reference
    flux_difference = ops.flux_difference
    size = max(np.shape(psf_new)[0], np.shape(psf_reference)[0])
    pd_img = scipy.fft.fftshift(_image_of(ops.psf_difference, shape, workers))
    del ops
    h = size // 2
    pd_img = pd_img[fy // 2 - h : fy // 2 + h + 1, fx // 2 - h : fx // 2 + h + 1]
    pd_img = pd_img / pd_img.sum()

    # D_N and S (the cores are views of the padded transforms' outputs)
    n_ft = scipy.fft.rfft2(prepare(n, bad_new, sn), workers=workers)
    r_ft = scipy.fft.rfft2(prepare(reference, bad_reference, sr), workers=workers)
    difference = _combine(n_ft, c_new, r_ft, c_reference, -1.0, shape, workers)[core]
    score = _combine(n_ft, k_new, r_ft, k_reference, -1.0, shape, workers)[core]
    del n_ft, r_ft

    # V(D_N) and V(S) through the squared image-space kernels; each operator is freed once squared
    vn_ft = scipy.fft.rfft2(prepare_var(new_variance, sigma_new2), workers=workers)
    vr_ft = scipy.fft.rfft2(prepare_var(reference_variance, sigma_reference2), workers=workers)
    c_new = _square_kernel_ft(c_new, shape, workers)
    c_reference = _square_kernel_ft(c_reference, shape, workers)
    difference_variance = _combine(vn_ft, c_new, vr_ft, c_reference, 1.0, shape, workers)[core]
    del c_new, c_reference
    k_new = _square_kernel_ft(k_new, shape, workers)
    k_reference = _square_kernel_ft(k_reference, shape, workers)
    score_variance = _combine(vn_ft, k_new, vr_ft, k_reference, 1.0, shape, workers)[core]
    del k_new, k_reference, vn_ft, vr_ft
    np.maximum(difference_variance, 0.0, out=difference_variance)
    np.maximum(score_variance, 0.0, out=score_variance)
    return ZogyCellResult(
        difference=difference,
        difference_variance=difference_variance,
        score=score,
        score_variance=score_variance,
        psf_difference=pd_img,
        flux_difference=flux_difference,
    )


# ------------------------------------------------------------------ cell grid and blending


def cell_cores(n: int, cells: int) -> np.ndarray:
    """Core boundaries ``[0, b_1, …, n]`` of ``cells`` near-equal cells along one axis of ``n`` pixels.

    Consecutive cores ``[b_i, b_{i+1})`` partition ``[0, n)``: every pixel belongs to exactly one.
    """
    n, cells = int(n), int(cells)
    if cells < 1 or cells > n:
        raise ValueError(f"cells must be in [1, {n}], got {cells}")
    return np.round(np.linspace(0, n, cells + 1)).astype(int)


def blend_weights(n: int, cells: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Cosine blending weights along one axis: ``(weights (cells, n), bounds (cells, 2))``.

    Each core boundary :math:`b` between cells ``i`` and ``i + 1`` gets a transition of
    ``width`` pixels centred on it; with :math:`t = \mathrm{clip}((p + \tfrac12 - b)/w + \tfrac12, 0, 1)`
    for pixel ``p``, cell ``i`` has weight :math:`\cos^2(\pi t/2)` and cell ``i + 1``
    :math:`\sin^2(\pi t/2)` there, so the weights are C¹, non-negative and sum to one at
    every pixel; away from the transitions a cell has weight 1 on its core and 0
    elsewhere.  ``bounds[i] = (start, stop)`` is the support of cell ``i`` (where its
    weight is > 0): its core grown by ``width / 2`` on the inner sides.
    """
    edges = cell_cores(n, cells)
    width = int(width)
    if width < 0:
        raise ValueError(f"width must be ≥ 0, got {width}")
    min_core = int(np.min(np.diff(edges)))
    if cells > 1 and width > min_core:
        raise ValueError(f"blend width {width} exceeds the smallest cell ({min_core} px)")
    p = np.arange(n, dtype=np.float64) + 0.5
    w = np.zeros((cells, n), dtype=np.float64)
    for i in range(cells):
        lo, hi = edges[i], edges[i + 1]
        up = np.ones(n) if i == 0 else _ramp(p, lo, width)
        down = np.ones(n) if i == cells - 1 else 1.0 - _ramp(p, hi, width)
        w[i] = up * down
    bounds = np.zeros((cells, 2), dtype=int)
    for i in range(cells):
        nz = np.flatnonzero(w[i] > 0)
        bounds[i] = (nz[0], nz[-1] + 1)
    return w, bounds


def _ramp(p: np.ndarray, boundary: float, width: int) -> np.ndarray:
    """``sin²(π t / 2)`` rising from 0 to 1 across ``[boundary − width/2, boundary + width/2]``."""
    if width == 0:
        return (p >= boundary).astype(np.float64)
    t = np.clip((p - boundary) / width + 0.5, 0.0, 1.0)
    return np.sin(0.5 * np.pi * t) ** 2
