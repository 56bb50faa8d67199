r"""Subtraction stage helpers: coverage, mode choice, variance scaling, per-tile difference and metrics.

The difference, for the two modes (S science, T template, K the fitted kernel,
b the fitted differential background, κ the kernel sum at the image centre):

* ``convolveTemplate``:  :math:`D = S - (T \otimes K) - [b]`, variance :math:`V_S + V_T \otimes K^2`;
* ``convolveScience``:   :math:`D = (S \otimes K + [b]) / κ - T`, variance :math:`(V_S \otimes K^2)/κ^2 + V_T`,

where ``[b]`` is applied only when ``subtract_background`` is set.  The difference
keeps the PSF of the image that was not convolved.  Masks: the template keeps
only NO_DATA, BAD and HIGH_VARIANCE (SAT → SAT_TEMPLATE, INJECTED →
INJECTED_TEMPLATE); the convolved image's mask is dilated by the kernel
footprint (INJECTED planes excepted); pixels within the kernel half-width of the
edge are EDGE.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import InputError, NoWorkFound
from ..kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE
from ..masks import MaskPlanes
from ..noise import clipped_stats, measure_background, robust_std
from ..psf import Psf

__all__ = [
    "template_coverage",
    "check_coverage",
    "choose_mode",
    "measure_variance_scale",
    "difference_tile",
    "quality_metrics",
    "limiting_magnitude",
]

log = logging.getLogger(__name__)


def template_coverage(template_mask: np.ndarray, science_mask: np.ndarray, planes: MaskPlanes) -> float:
    """Fraction of science pixels (with data) where the template has data."""
    nodata = planes.bitmask("NO_DATA")
    science_ok = (science_mask & nodata) == 0
    n = int(np.count_nonzero(science_ok))
    if n == 0:
        return 0.0
    return float(np.count_nonzero(science_ok & ((template_mask & nodata) == 0)) / n)


def check_coverage(coverage: float, minimum: float) -> None:
    """Raise :class:`NoWorkFound` before any fitting when coverage is below ``minimum``."""
    if coverage < minimum:
        raise NoWorkFound(
            f"template covers {100 * coverage:.1f}% of the science pixels, below the {100 * minimum:.0f}% minimum",
            coverage=coverage,
        )


def choose_mode(mode: str, science_psf: Psf, template_psf: Psf, x: float, y: float) -> str:
    """Resolve ``auto``: convolve the science only when the template PSF is wider on both axes."""
    if mode in (CONVOLVE_TEMPLATE, CONVOLVE_SCIENCE):
        return mode
    s_major, s_minor = science_psf.axis_sigmas(x, y)
    t_major, t_minor = template_psf.axis_sigmas(x, y)
    return CONVOLVE_SCIENCE if (t_major > s_major and t_minor > s_minor) else CONVOLVE_TEMPLATE


def _windows(shape: tuple[int, int], size: int = 512, per_axis: int = 4):
    """Up to ``per_axis²`` windows of ``size²`` spread evenly over an image (the whole image if small)."""
    ny, nx = shape
    if ny * nx <= (size * per_axis) ** 2:
        return [(slice(0, ny), slice(0, nx))]
    ys = np.linspace(0, max(ny - size, 0), per_axis).astype(int)
    xs = np.linspace(0, max(nx - size, 0), per_axis).astype(int)
    return [(slice(y, y + size), slice(x, x + size)) for y in ys for x in xs]


def _source_free_chi(image, variance, good) -> np.ndarray:
    """``(I − B)/√V`` over good pixels away from sources (3×3-mean S/N > 3, grown by 4 px)."""
    from scipy import ndimage

    bkg = measure_background(image, ~good)
    norm = (image - bkg.level) / np.sqrt(np.where(good, variance, 1.0))
    norm = np.where(good, norm, 0.0)
    scale0 = max(robust_std(norm[good]), 1e-12)
    sources = ndimage.binary_dilation(ndimage.uniform_filter(norm, 3) > scale0, iterations=4)
    use = good & ~sources
    return norm[use] if np.count_nonzero(use) >= 100 else norm[good]


def measure_variance_scale(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *, source: str,
                           max_scale: float = 10.0) -> float:
    r"""Ratio of the measured pixel noise to the declared variance, outside sources.

    ``factor = σ_clipped[(I − B) / √V]²`` over good pixels, with B the mesh
    background; pixels near sources (3×3 mean S/N > 3, grown by 4 px) are excluded,
    as LSST's ScaleVarianceTask excludes DETECTED pixels.  Large images are measured on
    16 windows of 512² spread over the frame (4M pixels pin the factor to < 0.1%).
    A factor above ``max_scale`` (or below 1/max_scale) means the variance plane is not
    usable: :class:`InputError`.
    """
    good = ~bad & np.isfinite(image) & (variance > 0)
    if np.count_nonzero(good) < 100:
        return 1.0
    chunks = [_source_free_chi(image[w], variance[w], good[w]) for w in _windows(image.shape) if good[w].sum() >= 100]
    vals = np.concatenate(chunks) if chunks else np.zeros(0)
    _, std, _ = clipped_stats(vals, nsigma=4.0)
    factor = float(std**2)
    if not np.isfinite(factor) or factor > max_scale or factor < 1.0 / max_scale:
        raise InputError(
            f"{source}: VARIANCE plane disagrees with the measured noise by a factor {factor:.3g} "
            f"(limit {max_scale:g}); refusing to rescale it"
        )
    return factor


def difference_tile(
    science_image, science_variance, science_mask,
    template_image, template_variance, template_mask,
    background=None, *, mode: str, kernel_sum: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine one tile: the inputs are already convolved/dilated where the mode says so.

    In ``convolveTemplate`` mode the template planes are ``T⊗K``, ``V_T⊗K²`` and the
    dilated template mask; in ``convolveScience`` mode the science planes are
    ``S⊗K``, ``V_S⊗K²`` and the dilated science mask.  ``background`` (or None) is
    the fitted differential background on the tile, subtracted as the mode says.
    """
    if mode == CONVOLVE_TEMPLATE:
        diff = science_image.astype(np.float64) - template_image
        if background is not None:
            diff = diff - background
        var = science_variance.astype(np.float64) + template_variance
    else:
        matched = science_image.astype(np.float64)
        if background is not None:
            matched = matched + background
        diff = matched / kernel_sum - template_image
        var = science_variance.astype(np.float64) / kernel_sum**2 + template_variance
    return diff.astype(np.float32), var.astype(np.float32), (science_mask | template_mask).astype(np.int32)


def limiting_magnitude(sigma_pixel: float, psf_image: np.ndarray, zero_point: float | None, nsigma: float = 5.0):
    """5σ point-source limit: flux = n σ √NEA with NEA = 1 / Σ P² (counts and AB mag if calibrated)."""
    nea = 1.0 / float(np.sum(np.asarray(psf_image) ** 2))
    flux = nsigma * sigma_pixel * math.sqrt(nea)
    mag = None if zero_point is None or not flux > 0 else zero_point - 2.5 * math.log10(flux)
    return {"flux": flux, "mag": mag, "nea_pixels": nea}


def quality_metrics(
    *,
    science: np.ndarray,
    difference: np.ndarray,
    difference_variance: np.ndarray,
    difference_mask: np.ndarray,
    planes: MaskPlanes,
    star_xy: np.ndarray,
    fwhm: float,
    ratio_mean_limit: float = 0.2,
    ratio_std_limit: float = 0.4,
) -> dict:
    """Footprint residual ratio over kernel stars, sky ratio and mask fractions.

    For each kernel star: ``Σ|D − d_sky| − Σ σ_D √(2/π)`` (the absolute residual less its
    expectation for pure noise) over a circle of radius 2·FWHM, divided by ``Σ|S − s_sky|``
    over the same circle (local skies from an annulus).  The verdict
    is ``bad_subtraction`` when the mean ratio exceeds ``ratio_mean_limit`` or the std
    exceeds ``ratio_std_limit``.  The sky ratio is the robust std of D/√V over good
    pixels (≈ 1 for a correct variance plane).
    """
    bad = (difference_mask & planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])) != 0
    ny, nx = difference.shape
    r_in = max(2.0 * fwhm, 3.0)
    r_sky0, r_sky1 = r_in + 3.0, r_in + 8.0
    half = int(math.ceil(r_sky1)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    ratios = []
    for x, y in np.asarray(star_xy, dtype=float).reshape(-1, 2):
        ix, iy = int(round(x)), int(round(y))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        if bad[sl][rr <= r_in].any():
            continue
        ann = (rr >= r_sky0) & (rr <= r_sky1)
        inner = rr <= r_in
        d = difference[sl].astype(np.float64)
        s = science[sl].astype(np.float64)
        denom = np.abs(s[inner] - np.median(s[ann])).sum()
        if denom <= 0:
            continue
        # sky correction: pure noise of std σ contributes E|n| = σ √(2/π) per pixel
        noise_floor = np.sqrt(2.0 / np.pi) * np.sqrt(np.clip(difference_variance[sl][inner], 0, None)).sum()
        ratios.append(max(np.abs(d[inner] - np.median(d[ann])).sum() - noise_floor, 0.0) / denom)
    ratios = np.asarray(ratios)
    step = max(1, int(np.sqrt(difference.size / 2**20)))  # ~1M samples for the sky ratio
    d_s, v_s, b_s = difference[::step, ::step], difference_variance[::step, ::step], bad[::step, ::step]
    good = ~b_s & (v_s > 0)
    sky_ratio = robust_std((d_s / np.sqrt(np.where(good, v_s, 1.0)))[good]) if good.any() else None
    mean_ratio = float(ratios.mean()) if ratios.size else None
    std_ratio = float(ratios.std()) if ratios.size > 1 else None
    verdict = "ok"
    if mean_ratio is not None and (mean_ratio > ratio_mean_limit or (std_ratio or 0.0) > ratio_std_limit):
        verdict = "bad_subtraction"
    return {
        "footprint_residual_ratio_mean": mean_ratio,
        "footprint_residual_ratio_std": std_ratio,
        "footprint_residual_n_stars": int(ratios.size),
        "sky_ratio": sky_ratio,
        "mask_fractions": {k: v for k, v in planes.describe(difference_mask).items() if v > 0},
        "verdict": verdict,
    }


def edge_bits_for_tile(shape_tile, origin, xy0, shape, half_width: int, edge_bit: int) -> np.ndarray:
    """EDGE bits for a tile at parent ``origin`` of an image of ``shape`` starting at ``xy0``."""
    ny, nx = shape_tile
    gx = np.arange(nx) + origin[0] - xy0[0]
    gy = np.arange(ny) + origin[1] - xy0[1]
    ex = (gx < half_width) | (gx > shape[1] - 1 - half_width)
    ey = (gy < half_width) | (gy > shape[0] - 1 - half_width)
    return np.where(ey[:, None] | ex[None, :], np.int32(1 << edge_bit), np.int32(0))


def combine_tile(si, sv, sm, ti, tv, tm, solution, kernel_sum, *, mode, subtract_background, origin, xy0, shape,
                 half_width, edge_bit):
    """One tile of the difference: :func:`difference_tile` plus background and EDGE, at parent ``origin``."""
    background = None
    if subtract_background:
        ny, nx = si.shape
        yy, xx = np.mgrid[origin[1] : origin[1] + ny, origin[0] : origin[0] + nx]
        background = solution.background_at(xx, yy)
    d, v, m = difference_tile(si, sv, sm, ti, tv, tm, background, mode=mode, kernel_sum=kernel_sum)
    m = m | edge_bits_for_tile(si.shape, origin, xy0, shape, half_width, edge_bit)
    return d, v, m


def apply_small_kernel(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image ⊗ kernel`` (same shape, zero padding) by FFT; kernel odd-sized and centred."""
    from scipy.signal import fftconvolve

    return fftconvolve(np.asarray(image, dtype=np.float64), np.asarray(kernel, dtype=np.float64), mode="same")


def apply_small_kernel_padded(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Eager twin of :func:`diffim_dag.graph.filter_tiles`: mirror-pad by the half-width, convolve, trim."""
    h = kernel.shape[0] // 2
    padded = np.pad(np.asarray(image, dtype=np.float64), h, mode="symmetric")
    return apply_small_kernel(padded, kernel)[h:-h or None, h:-h or None]


def decorrelated_variance(variance, mask, variance_unconvolved, variance_convolved, *, kappa: float, keep_bits: int):
    """Variance plane after decorrelation: ``V_u + κ̄² V_c`` (white noise of the decorrelated difference),
    keeping the propagated variance where ``keep_bits`` (NO_DATA, EDGE) are set."""
    new = variance_unconvolved + np.float32(kappa**2) * variance_convolved
    return np.where((mask & keep_bits) != 0, variance, new).astype(np.float32)
