r"""Alard–Lupton with pre-convolution: the score image and its correction (LSST DMTN-179).

The science image ``S`` (PSF :math:`P_s`, noise :math:`\sigma_s^2`) is convolved with
its own PSF reflected, :math:`H(u) = P_s(-u)` (normalized, odd size), i.e. correlated
with its PSF: the matched filter.  The AL kernel ``K`` is fitted so that
:math:`T \otimes K \approx S \otimes H`, which never needs a deconvolution (the
pre-convolved science is always the wider image), and the raw score is

.. math::  \Sigma = S \otimes H - T \otimes K \; [- b].

Its noise power is :math:`\sigma_s^2 |\hat H|^2 + \sigma_t^2 |\hat K|^2`.  The score
correction (``DecorrelateALKernelTask.computeScoreCorrection``)

.. math::

    \phi_S(f) = \frac{\sigma_s^2 + \bar\kappa^2 \sigma_t^2}
                     {\sigma_s^2 + \sigma_t^2 |\hat K(f)|^2 / |\hat H(f)|^2},
    \qquad \bar\kappa = \hat K(0),

turns it into the likelihood score of the decorrelated difference: with
:math:`K = K_{AL} H` (in Fourier space) it is :math:`\phi_S = \phi_{AL}^2`, so
:math:`\phi_S \Sigma = (H \phi_{AL}) \star D_{decorr}` — the decorrelated AL
difference :math:`D_{decorr}` filtered with its own PSF (:math:`P_s \phi_{AL}`) reflected.
:math:`\phi_S(0) = 1`.  For equal PSFs (``K ≈ H``) :math:`\phi_S = 1` and the score is
:math:`(S - T)\otimes H`, whose pixel standard deviation is
:math:`\sqrt{\sigma_s^2 + \sigma_t^2}\,\sqrt{\sum H^2} = \sqrt 2\,\sigma / \sqrt{\mathrm{NEA}}`.

The corrected score is the linear combination :math:`c_S \otimes S - c_T \otimes T` with
:math:`\hat c_S = \hat H \phi_S` and :math:`\hat c_T = \hat K \phi_S`, so its variance
plane is :math:`V_S \otimes c_S^2 + V_T \otimes c_T^2` (squared image-space kernels,
DMTN-179 §5), and the detection significance is :math:`\phi_S\Sigma / \sqrt{V}`.

References
----------
Reiss, D. J. & Lupton, R. H. 2016, DMTN-021; Réthy, G. 2021, DMTN-179 (score image
decorrelation); Alard & Lupton 1998.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from .zogy import centred_fft

__all__ = [
    "preconvolution_kernel",
    "median_fill",
    "score_correction_fourier",
    "score_correction_kernels",
]


def preconvolution_kernel(psf_image: np.ndarray) -> np.ndarray:
    """``H``: the PSF image reflected through its centre and normalized to unit sum (odd sides)."""
    p = np.asarray(psf_image, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0:
        raise ValueError(f"the pre-convolution kernel needs an odd-sized 2-D PSF image, got shape {p.shape}")
    total = p.sum()
    if not (np.isfinite(total) and total > 0):
        raise ValueError(f"PSF image sums to {total!r}; it must be finite and positive")
    return p[::-1, ::-1] / total


def median_fill(image: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """A float32 copy of ``image`` with ``bad`` and non-finite pixels set to the median of the others."""
    a = np.array(image, dtype=np.float32, copy=True)
    replace = np.asarray(bad, dtype=bool) | ~np.isfinite(a)
    if replace.any():
        good = a[~replace]
        a[replace] = np.float32(np.median(good)) if good.size else np.float32(0.0)
    return a


def score_correction_fourier(kernel: np.ndarray, preconvolution: np.ndarray, shape: tuple[int, int], *,
                             sigma_science2: float, sigma_template2: float, kappa: float | None = None,
                             workers: int = 1) -> np.ndarray:
    r""":math:`\phi_S(f)` (module doc) on the ``rfft2`` half plane of ``shape``; real and even.

    Frequencies where :math:`|\hat H|^2` is below ``1000 × tiny`` use that floor (there both
    kernels and hence the score vanish anyway, as in LSST).
    """
    ss2, st2 = float(sigma_science2), float(sigma_template2)
    if not (np.isfinite(ss2) and ss2 > 0):
        raise ValueError(f"sigma_science2 must be finite and > 0, got {sigma_science2!r}")
    if not (np.isfinite(st2) and st2 >= 0):
        raise ValueError(f"sigma_template2 must be finite and ≥ 0, got {sigma_template2!r}")
    k = np.asarray(kernel, dtype=np.float64)
    kap = float(k.sum()) if kappa is None else float(kappa)
    kf = centred_fft(k, shape, workers=workers)
    hf = centred_fft(preconvolution, shape, workers=workers)
    k2 = kf.real**2 + kf.imag**2
    h2 = np.maximum(hf.real**2 + hf.imag**2, np.finfo(np.float64).tiny * 1000.0)
    return (ss2 + kap * kap * st2) / (ss2 + st2 * k2 / h2)


def score_correction_kernels(kernel: np.ndarray, preconvolution: np.ndarray, *, sigma_science2: float,
                             sigma_template2: float, size: int | None = None, tolerance: float = 1e-3):
    r"""Image-space kernels of the score correction: ``(phi, c_science, c_template)``.

    ``phi`` is :math:`\phi_S` (applied to the raw score), ``c_science`` = :math:`H \otimes \phi_S`
    and ``c_template`` = :math:`K \otimes \phi_S` (the total kernels acting on ``S`` and ``T``,
    whose squares propagate the variance planes).  All are centred, odd-sized, cut to ``size``
    (default: the smallest of ``2k+1, 4k+1, …``, k the larger input kernel side, that holds
    ``phi``'s sum 1 and its absolute mass to ``tolerance``).

    Returns
    -------
    phi, c_science, c_template : ndarray of float64, shape (size, size)
    """
    k = np.asarray(kernel, dtype=np.float64)
    h = np.asarray(preconvolution, dtype=np.float64)
    ks = max(k.shape + h.shape)
    n = scipy.fft.next_fast_len(max(8 * ks, 2 * (size or 0) + 1), real=True)
    shape = (n, n)
    phi_ft = score_correction_fourier(k, h, shape, sigma_science2=sigma_science2, sigma_template2=sigma_template2)
    images = [scipy.fft.fftshift(scipy.fft.irfft2(ft, s=shape))
              for ft in (phi_ft, phi_ft * centred_fft(h, shape), phi_ft * centred_fft(k, shape))]
    c = n // 2
    total = np.abs(images[0]).sum()
    if size is None:
        size = 2 * ks + 1
        while size + 2 * ks < n:
            hw = size // 2
            cut = images[0][c - hw : c + hw + 1, c - hw : c + hw + 1]
            if abs(cut.sum() - 1.0) <= tolerance and np.abs(cut).sum() >= (1.0 - tolerance) * total:
                break
            size += 2 * ks
    size = int(size)
    if size % 2 == 0 or size > n:
        raise ValueError(f"size must be odd and at most {n}, got {size}")
    hw = size // 2
    return tuple(im[c - hw : c + hw + 1, c - hw : c + hw + 1].copy() for im in images)
