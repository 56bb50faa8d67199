r"""Subtraction stage helpers: coverage, mode choice, variance scaling, per-tile difference and metrics.

The difference, for the two modes (S science, T template, K the fitted kernel,
b the fitted differential background, κ the kernel sum at the image centre):

* ``convolveTemplate``:  :math:`D = S - (T \otimes K) - [b]`, variance :math:`V_S + V_T \otimes K^2`;
* ``convolveScience``:   :math:`D = (S \otimes K + [b] - T) / κ`, variance :math:`(V_S \otimes K^2 + V_T)/κ^2`,

where ``[b]`` is applied only when ``subtract_background`` is set.  In both directions the whole
difference is on the science image's photometric scale: the fit makes :math:`S \otimes K + b ≈ T`
in convolveScience, so :math:`S \otimes K + b - T` is in template counts, and dividing all of it
— template, background and variance included — by κ puts it in science counts for any flux
scale.  (Dividing only the matched science, :math:`(S \otimes K + b)/κ - T`, would leave
:math:`T(1/κ - 1)`: the template's sky and a fraction of every star.)  The difference
keeps the PSF of the image that was not convolved.  Masks: the template keeps
only NO_DATA, BAD and HIGH_VARIANCE (SAT → SAT_TEMPLATE, INJECTED →
INJECTED_TEMPLATE); the convolved image's mask is dilated by the kernel
footprint (INJECTED planes excepted); pixels within the kernel half-width of the
edge are EDGE.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, NoWorkFound
from ..kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE
from ..masks import MaskPlanes
from ..memory import map_on_threads, release_freed_memory
from ..noise import START_SAMPLES, box_mean3, clipped_stats, grow_cross, measure_background, robust_std
from ..psf import Psf
from ..kernels.maskops import has_bits, lacks_bits

__all__ = [
    "template_coverage",
    "check_coverage",
    "choose_mode",
    "measure_variance_scale",
    "measure_noise_correlation",
    "scale_difference_variance",
    "difference_tile",
    "quality_metrics",
    "limiting_magnitude",
    "detection_limit",
    "exposure_limit",
    "combine_tile",
    "convolve_planes",
    "DifferenceTile",
    "subtract_tile",
    "decorrelate_tile",
    "tile_grid",
    "tile_cores",
    "cores_of_task",
]

log = logging.getLogger(__name__)


def template_coverage(template_mask: np.ndarray, science_mask: np.ndarray, planes: MaskPlanes) -> float:
    """Fraction of science pixels (with data) where the template has data."""
    nodata = planes.bitmask("NO_DATA")
    science_ok = lacks_bits(science_mask, nodata)
    n = int(np.count_nonzero(science_ok))
    if n == 0:
        return 0.0
    return float(np.count_nonzero(science_ok & lacks_bits(template_mask, nodata)) / n)


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


#: Side of the windows the noise of a large image is measured on (:func:`measure_variance_scale`, 16 of them;
#: :func:`measure_noise_correlation`, 9).  16 windows of 256² are 1M pixels, which pin a variance factor to ~0.15 %
#: (√(2/N)) and a lag's noise correlation to ~0.1 %; each window's mesh background has 4×4 boxes of 64 px.  Windows
#: of 512² measured 4× the pixels for no figure the pipeline uses: with these, a 2048² subtraction took 0.90× the
#: time (8 interleaved pairs; most of it the difference's own factor, which every later stage waits for) and a
#: 4096² one 0.93× (6); on the 15 real-data runs the factors moved by ≤ 0.3 % and no DiaSource came or went.
NOISE_WINDOW = 256


def _windows(shape: tuple[int, int], size: int = NOISE_WINDOW, per_axis: int = 4):
    """Up to ``per_axis²`` windows of ``size²`` spread evenly over an image (the whole image if small); along a side
    not longer than ``size`` one window spans it (a long thin image's windows are not repeated)."""
    ny, nx = shape
    if ny * nx <= (size * per_axis) ** 2:
        return [(slice(0, ny), slice(0, nx))]
    ys = np.unique(np.linspace(0, max(ny - size, 0), per_axis).astype(int))
    xs = np.unique(np.linspace(0, max(nx - size, 0), per_axis).astype(int))
    return [(slice(y, y + size), slice(x, x + size)) for y in ys for x in xs]


def _usable(image, variance, bad, window) -> np.ndarray:
    """The pixels of ``window`` that a noise measurement can use: not ``bad``, finite, with a positive variance
    (found in the window only: the windows of a large frame hold a quarter of it)."""
    return ~bad[window] & np.isfinite(image[window]) & (variance[window] > 0)


def _sky_normalized(image, variance, good) -> np.ndarray:
    """``(I − B)/√V`` on the ``good`` pixels (0 elsewhere), B the mesh background of the good pixels."""
    bkg = measure_background(image, ~good, rms=False)
    return np.where(good, (image - bkg.level) / np.sqrt(np.where(good, variance, 1.0)), 0.0)


def _source_free_chi(image, variance, good) -> np.ndarray:
    """``(I − B)/√V`` over good pixels away from sources (3×3-mean S/N > 3, grown by 4 px)."""
    norm = _sky_normalized(image, variance, good)
    scale0 = max(robust_std(norm[good], max_samples=START_SAMPLES), 1e-12)  # (a threshold: masks sources)
    sources = grow_cross(box_mean3(norm) > scale0, 4)
    use = good & ~sources
    return norm[use] if np.count_nonzero(use) >= 100 else norm[good]


def measure_variance_scale(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *, source: str,
                           max_scale: float = 10.0, workers: int = 1, plane: str = "VARIANCE plane") -> float:
    r"""Ratio of the measured pixel noise to the declared variance, outside sources.

    ``factor = σ_clipped[(I − B) / √V]²`` over good pixels, with B the mesh
    background; pixels near sources (3×3 mean S/N > 3, grown by 4 px) are excluded,
    as LSST's ScaleVarianceTask excludes DETECTED pixels.  Large images are measured on
    16 windows of :data:`NOISE_WINDOW`² spread over the frame (1M pixels pin the factor to ~0.15 %).
    A factor above ``max_scale`` (or below 1/max_scale) means the variance plane is not
    usable: :class:`InputError` (``plane`` names it there).  ``workers`` threads measure the windows (their
    backgrounds and whole-window NumPy passes release the GIL); the values, joined in window order, are the same
    whatever their number.
    """

    def window_chi(w):
        good = _usable(image, variance, bad, w)
        return _source_free_chi(image[w], variance[w], good) if np.count_nonzero(good) >= 100 else None

    chunks = [c for c in map_on_threads(window_chi, _windows(image.shape), workers) if c is not None]
    if not chunks and np.count_nonzero(_usable(image, variance, bad, (slice(None), slice(None)))) < 100:
        return 1.0
    vals = np.concatenate(chunks) if chunks else np.zeros(0)
    _, std, _ = clipped_stats(vals, nsigma=4.0)
    factor = float(std**2)
    if not np.isfinite(factor) or factor > max_scale or factor < 1.0 / max_scale:
        raise InputError(
            f"{source}: {plane} disagrees with the measured noise by a factor {factor:.3g} "
            f"(limit {max_scale:g}); refusing to rescale it"
        )
    return factor


def scale_difference_variance(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                              enabled: bool = True, workers: int = 1,
                              in_place: bool = False) -> tuple[np.ndarray, dict]:
    r"""The difference's variance plane scaled to its measured sky noise (LSST's ``doScaleDiffimVariance``).

    The factor is :func:`measure_variance_scale` on the difference (the clipped σ² of
    :math:`D/\sqrt V` away from sources; ``workers``: its threads).  Returns the (possibly) scaled plane and
    ``{"sky_ratio_propagated": σ ratio before scaling, "variance_scale": factor applied}``.  ``in_place``: a
    float32 ``variance`` that is the caller's own is scaled where it is (the same values, no second plane).
    """
    try:
        factor = measure_variance_scale(image, variance, bad, source="difference", max_scale=1e6, workers=workers)
    except InputError:
        factor = float("nan")
    report = {"sky_ratio_propagated": float(math.sqrt(factor)) if factor > 0 else None,
              "variance_scale": float(factor) if enabled and factor > 0 else 1.0}
    if enabled and np.isfinite(factor) and factor > 0 and abs(factor - 1.0) > 1e-3:
        if in_place and variance.dtype == np.float32 and variance.flags.writeable:
            variance *= np.float32(factor)
        else:
            variance = (variance * np.float32(factor)).astype(np.float32, copy=False)
    return variance, report


def measure_noise_correlation(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *, max_lag: int = 3,
                              ) -> np.ndarray:
    r"""Noise autocorrelation of an exposure's sky (:func:`~diffim_dag.kernels.decorrelate.noise_correlation`).

    Measured on the same windows as :func:`measure_variance_scale` (the whole image when small), on
    :math:`(I - B)/\sqrt V` with the pixels near sources (3×3-mean S/N > 1σ of its own noise, grown
    by 4 px) left out; the windows' correlations are averaged.
    """
    from ..kernels.decorrelate import noise_correlation

    n = 2 * max_lag + 1
    acc, weight = np.zeros((n, n)), 0.0
    for w in _windows(image.shape, per_axis=3):
        good = _usable(image, variance, bad, w)
        if good.sum() < 1000:
            continue
        z = _sky_normalized(image[w], variance[w], good)
        sources = grow_cross(box_mean3(z) > 1.0, 4)
        sky = good & ~sources
        if sky.sum() < 1000:
            continue
        acc += noise_correlation(z, sky, max_lag=max_lag) * sky.sum()
        weight += sky.sum()
    if weight == 0:
        out = np.zeros((n, n))
        out[max_lag, max_lag] = 1.0
        return out
    return acc / weight


def difference_tile(
    science_image, science_variance, science_mask,
    template_image, template_variance, template_mask,
    background=None, *, mode: str, kernel_sum: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine one tile: the inputs are already convolved/dilated where the mode says so.

    In ``convolveTemplate`` mode the template planes are ``T⊗K``, ``V_T⊗K²`` and the
    dilated template mask; in ``convolveScience`` mode the science planes are
    ``S⊗K``, ``V_S⊗K²`` and the dilated science mask.  ``background`` (or None) is
    the fitted differential background on the tile, subtracted as the mode says; in
    ``convolveScience`` the whole difference is divided by ``kernel_sum`` (module docstring).
    """
    floats = (science_image, template_image, science_variance, template_variance)
    if mode == CONVOLVE_TEMPLATE and background is None and all(np.asarray(a).dtype == np.float32 for a in floats):
        # one float32 operation each: IEEE rounds it as the float64 result rounded to float32 would be, bit for bit,
        # without the four float64 temporaries of a tile (16 tiles of 1040²: 0.23 s → 0.07 s of CPU)
        diff = np.subtract(science_image, template_image, dtype=np.float32)
        var = np.add(science_variance, template_variance, dtype=np.float32)
    elif mode == CONVOLVE_TEMPLATE:
        diff = science_image.astype(np.float64) - template_image
        if background is not None:
            diff = diff - background
        var = science_variance.astype(np.float64) + template_variance
    else:
        matched = science_image.astype(np.float64)
        if background is not None:
            matched = matched + background
        diff = (matched - template_image) / kernel_sum
        var = (science_variance.astype(np.float64) + template_variance) / kernel_sum**2
    return (diff.astype(np.float32, copy=False), var.astype(np.float32, copy=False),
            (science_mask | template_mask).astype(np.int32, copy=False))


def limiting_magnitude(sigma_pixel: float, psf_image: np.ndarray, zero_point: float | None, nsigma: float = 5.0):
    """5σ point-source limit: flux = n σ √NEA with NEA = 1 / Σ P² (counts and AB mag if calibrated)."""
    nea = 1.0 / float(np.sum(np.asarray(psf_image) ** 2))
    flux = nsigma * sigma_pixel * math.sqrt(nea)
    mag = None if zero_point is None or not flux > 0 else zero_point - 2.5 * math.log10(flux)
    return {"flux": flux, "mag": mag, "nea_pixels": nea}


def exposure_limit(exposure, at: tuple[float, float], *, zero_point: float | None = None) -> dict:
    """:func:`limiting_magnitude` of ``exposure``: σ from the median of its variance plane over pixels without
    NO_DATA/BAD/SAT/EDGE (about 1M strided samples), its PSF at ``at``."""
    _, var, msk = exposure.arrays()
    step = max(1, int(np.sqrt(var.size / 2**20)))  # ~1M samples pin a median variance
    var, msk = var[::step, ::step], msk[::step, ::step]
    bits = exposure.bitmask([p for p in ("NO_DATA", "BAD", "SAT", "EDGE") if p in exposure.mask_planes])
    good = lacks_bits(msk, bits) & (var > 0)
    sigma = float(np.sqrt(np.median(var[good]))) if good.any() else float("nan")
    return limiting_magnitude(sigma, exposure.psf.kernel_image(*at), zero_point)


def detection_limit(limit: dict, noise_factor: float) -> dict:
    """A :func:`limiting_magnitude` entry with σ scaled by the measured noise of the detection significance
    (its clipped standard deviation: > 1 where resampling correlated the noise), i.e. the 5σ that detection
    reaches; ``flux_variance_plane`` keeps the variance plane's figure."""
    flux = limit["flux"] * noise_factor
    mag = None if limit.get("mag") is None else limit["mag"] - 2.5 * math.log10(noise_factor)
    return {**limit, "flux": flux, "mag": mag, "noise_factor": noise_factor,
            "flux_variance_plane": limit.get("flux_variance_plane", limit["flux"])}


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
    min_star_snr: float = 50.0,
    min_stars: int = 5,
) -> dict:
    """Footprint residual ratio over kernel stars, sky ratio and mask fractions.

    For each kernel star: ``Σ|D − d_sky| − Σ σ_D √(2/π)`` (the absolute residual less its
    expectation for pure noise) over a circle of radius 2·FWHM, divided by ``Σ|S − s_sky|``
    over the same circle (local skies from an annulus).  Only stars whose footprint signal
    ``Σ|S − s_sky|`` is at least ``min_star_snr`` times the noise of that sum count (all of them
    when fewer than ``min_stars`` are that bright): for fainter stars the ratio measures the noise
    and any faint neighbour in the circle, not the subtraction.  The verdict here is
    ``bad_subtraction`` when the mean ratio exceeds ``ratio_mean_limit`` or the std
    exceeds ``ratio_std_limit`` (the full verdict is :func:`~diffim_dag.stages.verdict.judge`).
    The sky ratio is the robust std of D/√V over good pixels (≈ 1 for a correct variance plane).
    """
    bad_bits = planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])  # (tested on the stamps and the sky's sample only)
    ny, nx = difference.shape
    r_in = max(2.0 * fwhm, 3.0)
    r_sky0, r_sky1 = r_in + 3.0, r_in + 8.0
    half = int(math.ceil(r_sky1)) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    inner, ann = rr <= r_in, (rr >= r_sky0) & (rr <= r_sky1)
    # every star at once: the circle's and the annulus's pixels of all stamps gathered as rows (each row's sums and
    # medians as the one star's were: the same values)
    xy = np.asarray(star_xy, dtype=float).reshape(-1, 2)
    ix, iy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)  # (half to even, as round)
    inside = (ix - half >= 0) & (iy - half >= 0) & (ix + half < nx) & (iy + half < ny)
    ix, iy = ix[inside], iy[inside]

    def at(plane, where):  # (stars, pixels of ``where``) of a plane's stamps
        return plane[iy[:, None] + yy[where][None, :], ix[:, None] + xx[where][None, :]]

    clean = ~has_bits(at(difference_mask, inner), bad_bits).any(axis=1)
    ix, iy = ix[clean], iy[clean]
    s_in, s_ann = at(science, inner).astype(np.float64), at(science, ann).astype(np.float64)
    denom = np.abs(s_in - np.median(s_ann, axis=1)[:, None]).sum(axis=1)
    use = denom > 0
    ix, iy, denom = ix[use], iy[use], denom[use]
    # sky correction: pure noise of std σ contributes E|n| = σ √(2/π) per pixel
    var_inner = np.clip(at(difference_variance, inner), 0, None)
    noise_floor = np.sqrt(2.0 / np.pi) * np.sqrt(var_inner).sum(axis=1)
    d_in, d_ann = at(difference, inner).astype(np.float64), at(difference, ann).astype(np.float64)
    residual = np.abs(d_in - np.median(d_ann, axis=1)[:, None]).sum(axis=1)
    all_ratios = np.maximum(residual - noise_floor, 0.0) / denom
    snrs = denom / np.maximum(np.sqrt(var_inner.sum(axis=1).astype(np.float64)), 1e-30)
    bright = snrs >= min_star_snr
    ratios = all_ratios[bright] if int(bright.sum()) >= min_stars else all_ratios
    step = max(1, int(np.sqrt(difference.size / 2**20)))  # ~1M samples for the sky ratio
    d_s, v_s = difference[::step, ::step], difference_variance[::step, ::step]
    b_s = has_bits(difference_mask[::step, ::step], bad_bits)
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
        "footprint_residual_ratio_median": float(np.median(ratios)) if ratios.size else None,
        "footprint_residual_n_stars": int(ratios.size),
        "footprint_residual_min_snr": float(min_star_snr) if int(bright.sum()) >= min_stars else 0.0,
        "sky_ratio": sky_ratio,
        "mask_fractions": {k: v for k, v in planes.describe(difference_mask).items() if v > 0},
        "verdict": verdict,
    }


def _edge_lines(shape_tile, origin, xy0, shape, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows and the columns of a tile at parent ``origin`` (of an image of ``shape`` starting at ``xy0``) that lie
    within ``half_width`` of the image's border: boolean ``(ey, ex)``."""
    ny, nx = shape_tile
    gx = np.arange(nx) + origin[0] - xy0[0]
    gy = np.arange(ny) + origin[1] - xy0[1]
    ex = (gx < half_width) | (gx > shape[1] - 1 - half_width)
    ey = (gy < half_width) | (gy > shape[0] - 1 - half_width)
    return ey, ex


def edge_bits_for_tile(shape_tile, origin, xy0, shape, half_width: int, edge_bit: int) -> np.ndarray:
    """EDGE bits for a tile at parent ``origin`` of an image of ``shape`` starting at ``xy0``."""
    ey, ex = _edge_lines(shape_tile, origin, xy0, shape, half_width)
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
    # EDGE on the rows and columns near the border only, in the tile's own new mask (no whole-tile plane of bits)
    ey, ex = _edge_lines(si.shape, origin, xy0, shape, half_width)
    bit = m.dtype.type(1 << edge_bit)
    m[ey] |= bit
    m[:, ex] |= bit
    return d, v, m


def apply_small_kernel(image: np.ndarray, kernel: np.ndarray, *, dtype=np.float64,
                       kernel_fts: dict | None = None) -> np.ndarray:
    """``image ⊗ kernel`` (same shape, zero padding) by FFT; kernel odd-sized and centred.  ``dtype``: the
    transforms' precision (float32: half the time, round-off ~1e-7 of the image's RMS).  ``kernel_fts``: a dict
    that keeps ``kernel``'s transform per padded shape for the next call with the same kernel (a frame's tiles:
    the same values as transforming it each time)."""
    from ..kernels.convolve import fft_convolve

    return fft_convolve(np.asarray(image, dtype=dtype), np.asarray(kernel, dtype=dtype), kernel_fts=kernel_fts)


def apply_small_kernel_padded(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Eager twin of :func:`diffim_dag.graph.filter_tiles`: mirror-pad by the half-width, convolve, trim."""
    h = kernel.shape[0] // 2
    padded = np.pad(np.asarray(image, dtype=np.float64), h, mode="symmetric")
    return apply_small_kernel(padded, kernel)[h:-h or None, h:-h or None]


def decorrelated_variance(variance, mask, variance_unconvolved, variance_convolved, *, kappa: float, keep_bits: int):
    """Variance plane after decorrelation: ``V_u + κ̄² V_c`` (white noise of the decorrelated difference),
    keeping the propagated variance where ``keep_bits`` (NO_DATA, EDGE) are set."""
    new = variance_unconvolved + np.float32(kappa**2) * variance_convolved
    return np.where(has_bits(mask, keep_bits), variance, new).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- tiles (shared by every path)


Box = tuple[int, int, int, int]  # (x_min, x_max, y_min, y_max), parent pixels, max exclusive


def tile_grid(bbox: Box, tile_size: int | None) -> tuple[int, int]:
    """``(n_tiles_y, n_tiles_x)`` of :func:`tile_cores` (``(1, 1)`` when ``tile_size`` is None)."""
    if tile_size is None:
        return 1, 1
    x0, x1, y0, y1 = bbox
    return max(1, -(-(y1 - y0) // tile_size)), max(1, -(-(x1 - x0) // tile_size))


def tile_cores(bbox: Box, tile_size: int | None) -> dict[tuple[int, int], Box]:
    """``{(iy, ix): core}``: ``tile_size``² cores partitioning ``bbox`` (the last row/column ragged).

    The same cores as :func:`diffim_dag.stages.detect.tile_boxes` and as the chunks of the
    tiled Dask arrays; ``tile_size=None`` gives one tile, the whole box.
    """
    if tile_size is None:
        return {(0, 0): tuple(int(v) for v in bbox)}
    x0, x1, y0, y1 = bbox
    return {(iy, ix): (tx, min(tx + tile_size, x1), ty, min(ty + tile_size, y1))
            for iy, ty in enumerate(range(y0, y1, tile_size)) for ix, tx in enumerate(range(x0, x1, tile_size))}


def cores_of_task(bbox: Box, tile_size: int | None, task: tuple[int, int], tasks: tuple[int, int]) -> dict:
    """The tiles a graph task ``task = (ty, tx)`` of a ``tasks = (n_y, n_x)`` task grid owns.

    Tile ``(iy, ix)`` belongs to task ``(iy mod n_y, ix mod n_x)``: one tile per task when the
    task grid is the tile grid (the graph builder read the image shape), all tiles in one task
    for a ``(1, 1)`` task grid (shape unknown when the graph was built).  A tile's neighbours
    belong to the neighbouring tasks (modulo the grid), which is what the halo steps depend on.
    """
    ny, nx = tasks
    return {k: c for k, c in tile_cores(bbox, tile_size).items() if (k[0] % ny, k[1] % nx) == tuple(task)}


def cut_box(array: np.ndarray, xy0: tuple[int, int], box: Box, *, fill=0) -> np.ndarray:
    """``array`` (``array[0, 0]`` at parent ``xy0``) on ``box``; pixels outside it are ``fill``.

    A view when ``box`` lies inside the array.
    """
    bx0, bx1, by0, by1 = box
    ny, nx = array.shape
    ax0, ay0 = xy0
    ix0, ix1 = max(bx0 - ax0, 0), min(bx1 - ax0, nx)
    iy0, iy1 = max(by0 - ay0, 0), min(by1 - ay0, ny)
    if (ix0, ix1, iy0, iy1) == (bx0 - ax0, bx1 - ax0, by0 - ay0, by1 - ay0):
        return array[iy0:iy1, ix0:ix1]
    out = np.full((by1 - by0, bx1 - bx0), fill, dtype=array.dtype)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 + ay0 - by0 : iy1 + ay0 - by0, ix0 + ax0 - bx0 : ix1 + ax0 - bx0] = array[iy0:iy1, ix0:ix1]
    return out


def assemble(pieces, box: Box, *, dtype) -> np.ndarray:
    """One array on ``box`` from ``(core, array)`` pieces (each array on its core); uncovered pixels are 0.

    A piece that is exactly ``box`` is returned as it is (no copy).
    """
    pieces = list(pieces)
    for core, arr in pieces:
        if tuple(core) == tuple(box):
            return arr
    bx0, bx1, by0, by1 = box
    out = np.zeros((by1 - by0, bx1 - bx0), dtype=dtype)
    for core, arr in pieces:
        _place(out, box, core, arr)
    return out


def _place(out: np.ndarray, box: Box, core: Box, arr: np.ndarray) -> None:
    """Write the part of ``arr`` (an array on ``core``) that lies in ``box`` into ``out`` (an array on ``box``)."""
    bx0, bx1, by0, by1 = box
    x0, x1, y0, y1 = core
    ix0, ix1, iy0, iy1 = max(x0, bx0), min(x1, bx1), max(y0, by0), min(y1, by1)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0] = arr[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]


#: The planes of a :class:`DifferenceTile` and their dtypes.
TILE_PLANES = (("image", np.float32), ("variance", np.float32), ("mask", np.int32),
               ("convolved_image", np.float32), ("convolved_variance", np.float32), ("convolved_mask", np.int32))


class TilePlanes:
    """The whole planes of a difference (:data:`TILE_PLANES` on ``box``) that the tile tasks of one process write
    their cores into as they make them (:func:`subtract_tile`, :func:`decorrelate_tile` given ``planes=``), so
    that :func:`assemble_tiles` has nothing left to copy.  For tasks that share the process's memory (the
    in-process run's threads); on a cluster each tile travels as its own arrays and is copied into the planes
    once.  Each plane is made when a tile first writes to it; the tiles cover ``box``, so no pixel stays unset.

    A 4096² subtraction: the ``difference`` task (which runs alone, every tile waiting on it) copied 16 tiles' six
    planes, 0.2 s, into planes whose pages were fresh, while the tiles' own planes were still held."""

    def __init__(self, box: Box):
        import threading

        self.box = tuple(int(v) for v in box)
        self.planes: dict = {}
        self._placed: set = set()
        self._lock = threading.Lock()

    def plane(self, name: str) -> np.ndarray:
        """The whole plane ``name`` (made, uninitialised, on first use)."""
        with self._lock:
            if name not in self.planes:
                bx0, bx1, by0, by1 = self.box
                self.planes[name] = np.empty((by1 - by0, bx1 - bx0), dtype=dict(TILE_PLANES)[name])
            return self.planes[name]

    def place(self, core: Box, name: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` (the tile ``core``'s plane ``name``) written into the plane; returns its part there (a view)."""
        out = self.plane(name)
        _place(out, self.box, core, arr)
        x0, x1, y0, y1 = (int(v) for v in core)
        bx0, _, by0, _ = self.box
        with self._lock:
            self._placed.add((tuple(int(v) for v in core), name))
        return out[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]

    def placed(self, core: Box, name: str) -> bool:
        """Whether the tile ``core``'s plane ``name`` is in the plane already."""
        with self._lock:
            return (tuple(int(v) for v in core), name) in self._placed

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return 256 + sum(a.nbytes for a in self.planes.values())


def assemble_tiles(tiles, box: Box, *, consume: bool = False, workers: int = 1) -> tuple[dict, dict]:
    """The planes of :class:`DifferenceTile` pieces (:data:`TILE_PLANES`) on ``box``, and the tiles' summed
    wall times.

    ``tiles``: a mapping core → tile, or a list of them.  ``consume=True`` checks that the tiles cover ``box``
    and takes each tile out of its mapping once it is written, so that its arrays are freed as the planes
    fill (for a caller that is the tiles' only user: the in-process ``difference`` task, which would
    otherwise hold a 4096² image's tiles and its assembled planes at once, 0.4 GB each).  Uncovered pixels
    are 0; a tile that is exactly ``box`` is used as it is.  ``workers`` threads copy a tile's planes at once
    (NumPy copies without the GIL: the copies, and the first touch of the planes' fresh pages, are the whole
    cost; a 4096² image's six planes took 0.47 s in one thread).  Tiles written into whole planes of ``box``
    (:class:`TilePlanes`, the in-process run's) give those planes, and only what they did not write is copied.
    """
    maps = [tiles] if isinstance(tiles, Mapping) else list(tiles)
    bx0, bx1, by0, by1 = box
    if consume:  # tiles taken by an earlier try of the same task must not become zeros
        covered = sum(max(0, min(c[1], bx1) - max(c[0], bx0)) * max(0, min(c[3], by1) - max(c[2], by0))
                      for m in maps for c in m)
        if covered != (bx1 - bx0) * (by1 - by0):
            raise RuntimeError(f"the tiles cover {covered} of the {(bx1 - bx0) * (by1 - by0)} pixels of {tuple(box)} "
                               "(already assembled by an earlier try of this task?)")
    # (tiles that cover the box leave no pixel unwritten: no zeroing pass over the planes)
    new_plane = np.empty if consume else np.zeros
    planes: dict = {}
    seconds: dict = {}
    pool = None
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="diffim-assemble")
    try:
        for m in maps:
            for core in list(m):
                tile = m.pop(core) if consume else m[core]
                for k, v in tile.seconds.items():
                    seconds[k] = seconds.get(k, 0.0) + v
                if tuple(core) == tuple(box):
                    planes.update({name: getattr(tile, name) for name, _ in TILE_PLANES})
                    continue
                # the whole planes the tiles were written into, when they are this box's: what is there stays
                sink = tile.planes if tile.planes is not None and tile.planes.box == tuple(box) else None
                for name, dtype in TILE_PLANES:
                    if name not in planes:
                        planes[name] = sink.plane(name) if sink is not None else \
                            new_plane((by1 - by0, bx1 - bx0), dtype=dtype)
                jobs = [(planes[name], box, core, getattr(tile, name)) for name, _ in TILE_PLANES
                        if not (sink is not None and sink.placed(core, name) and planes[name] is sink.planes[name])]
                if pool is None:
                    for job in jobs:
                        _place(*job)
                else:
                    list(pool.map(lambda job: _place(*job), jobs))
                del tile, jobs
            if consume:
                release_freed_memory()  # the tiles just taken, before the planes grow further
    finally:
        if pool is not None:
            pool.shutdown()
    for name, dtype in TILE_PLANES:
        if name not in planes:  # (not setdefault: its zero plane, 64 MB at 4096², would be made and zeroed anyway)
            planes[name] = np.zeros((by1 - by0, bx1 - bx0), dtype=dtype)
    return planes, seconds


def convolve_planes(image, variance, mask, solution, *, origin, skip_bits: int = 0, workers: int = 1):
    """``image ⊗ K``, ``variance ⊗ K²`` (float32) and the mask dilated by the kernel footprint (int32).

    One tile with its halo (``origin`` = parent position of ``image[0, 0]``, which the spatial
    terms need) or the whole image; pixels beyond the array count as zero.  ``workers`` > 1: the variance's
    convolution runs on a thread of its own beside the image's (FFTs without the GIL; the same values).
    """
    from ..kernels.convolve import convolve_spatial, convolve_variance_spatial
    from ..kernels.maskops import dilate_mask

    def convolved_variance():
        return convolve_variance_spatial(variance, solution, origin=origin).astype(np.float32)

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffim-variance") as pool:
            pending = pool.submit(convolved_variance)
            image_out = convolve_spatial(image, solution, origin=origin).astype(np.float32)
            mask_out = dilate_mask(mask, solution.size, skip_bits=skip_bits).astype(np.int32)
            return image_out, pending.result(), mask_out
    return (
        convolve_spatial(image, solution, origin=origin).astype(np.float32),
        convolved_variance(),
        dilate_mask(mask, solution.size, skip_bits=skip_bits).astype(np.int32),
    )


@dataclass(eq=False)
class DifferenceTile:
    """One tile of the difference and of the convolved input, on the tile's core.

    Attributes
    ----------
    core : (x_min, x_max, y_min, y_max)
        Parent pixels, max exclusive.
    image, variance, mask : ndarray
        The difference (decorrelated once :func:`decorrelate_tile` has run).
    convolved_image, convolved_variance, convolved_mask : ndarray
        The convolved image (template in convolveTemplate mode, science in convolveScience
        mode): the matched template / matched science of the output.
    seconds : dict
        Wall time of the steps that made the tile (``convolve_subtract``, ``decorrelate``).
    planes : TilePlanes or None
        The whole planes that some of these arrays were written into (they are then views of them).
    """

    core: Box
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    convolved_image: np.ndarray
    convolved_variance: np.ndarray
    convolved_mask: np.ndarray
    seconds: dict
    planes: TilePlanes | None = None  # the whole planes that hold some of these already (views of them)

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees: the arrays that are the tile's own
        return 256 + sum(getattr(self, name).nbytes for name, _ in TILE_PLANES
                         if self.planes is None or not self.planes.placed(self.core, name))


def subtract_tile(science, template, solution, *, core: Box, halo: int, xy0, shape, mode: str, kernel_sum: float,
                  mask_planes: dict, kept, skip_bits: int, subtract_background: bool, edge_bit: int,
                  planes_xy0=None, workers: int = 1, planes: TilePlanes | None = None) -> DifferenceTile:
    """Convolve and subtract one tile: the step of every ``subtract`` task of the visit graph.

    Parameters
    ----------
    science, template : (image, variance, mask)
        The planes on one grid: the whole image (``[0, 0]`` at parent ``xy0``, image ``shape``), or a window
        of it that holds the core and its halo (``[0, 0]`` at parent ``planes_xy0``; pixels beyond the
        image zero, as :func:`cut_box` fills them).
    solution : KernelSolution
    core : (x_min, x_max, y_min, y_max)
        The tile (or the whole image, as one tile).
    halo : int
        Pixels of the convolved image read around the core (the kernel half-width for tiles,
        zero beyond the image as in :func:`diffim_dag.graph.convolve_tiles`; 0 for the whole
        image, whose convolution treats the outside as zero itself).
    mode, kernel_sum, subtract_background, edge_bit
        As :func:`combine_tile`.
    mask_planes, kept
        Template mask rules (:func:`~diffim_dag.kernels.maskops.template_mask_for_difference`).
    skip_bits : int
        Mask bits not dilated by the kernel footprint (INJECTED planes).
    workers : int
        Threads of the convolutions (:func:`convolve_planes`; the same values).
    planes : TilePlanes, optional
        The whole planes to write the convolved planes and the mask into (the tile's arrays are then views of
        them); the difference's image and variance stay the tile's own, for its neighbours' decorrelation.

    Returns
    -------
    DifferenceTile
    """
    import time

    from ..kernels.maskops import template_mask_for_difference

    t0 = time.perf_counter()
    x0, x1, y0, y1 = core
    grown = (x0 - halo, x1 + halo, y0 - halo, y1 + halo)

    at = xy0 if planes_xy0 is None else tuple(planes_xy0)

    def planes_on(planes, box, rules):
        img, var, msk = (cut_box(np.asarray(a), at, box) for a in planes)
        if rules:
            msk = template_mask_for_difference(msk, mask_planes, kept=tuple(kept))
        return img, var, msk

    convolve_template = mode == CONVOLVE_TEMPLATE
    ref, other = (template, science) if convolve_template else (science, template)
    conv = convolve_planes(*planes_on(ref, grown, convolve_template), solution, origin=(grown[0], grown[2]),
                           skip_bits=skip_bits, workers=workers)
    if halo:
        conv = tuple(a[halo:-halo, halo:-halo] for a in conv)
    if planes is not None:
        conv = tuple(planes.place(core, name, a) for name, a in
                     zip(("convolved_image", "convolved_variance", "convolved_mask"), conv))
    elif halo:
        conv = tuple(np.ascontiguousarray(a) for a in conv)
    direct = planes_on(other, core, not convolve_template)
    s_side, t_side = (direct, conv) if convolve_template else (conv, direct)
    d, v, m = combine_tile(*s_side, *t_side, solution, kernel_sum, mode=mode, subtract_background=subtract_background,
                           origin=(x0, y0), xy0=xy0, shape=shape, half_width=solution.half_width, edge_bit=edge_bit)
    if planes is not None:
        m = planes.place(core, "mask", m)
    return DifferenceTile(core=tuple(core), image=d, variance=v, mask=m, convolved_image=conv[0],
                          convolved_variance=conv[1], convolved_mask=conv[2],
                          seconds={"convolve_subtract": time.perf_counter() - t0}, planes=planes)


def decorrelate_tile(tiles, core: Box, *, bbox: Box, kernel: np.ndarray, variance_unconvolved: np.ndarray,
                     variance_convolved: np.ndarray, xy0, kappa: float, keep_bits: int,
                     planes: TilePlanes | None = None, kernel_fts: dict | None = None) -> DifferenceTile:
    """Decorrelate the difference tile ``core``: ``D ⊗ φ`` with a mirrored border, and its white variance.

    Parameters
    ----------
    tiles : mapping of core to DifferenceTile
        The tile and its neighbours (the halo of ``φ``'s half-width is read from them; at the
        image border the difference is mirrored, as :func:`apply_small_kernel_padded` and
        :func:`diffim_dag.graph.filter_tiles` do).
    core : (x_min, x_max, y_min, y_max)
    bbox : (x_min, x_max, y_min, y_max)
        The whole image.
    kernel : ndarray
        The decorrelation kernel φ (odd-sized).
    variance_unconvolved, variance_convolved : ndarray
        The whole input variance planes (``[0, 0]`` at ``xy0``): :func:`decorrelated_variance`.
    kappa, keep_bits
        As :func:`decorrelated_variance`.
    planes : TilePlanes, optional
        The whole planes to write the decorrelated image and variance into (the tile's are then views of them).
    kernel_fts : dict, optional
        ``kernel``'s transforms per padded tile shape, shared by the tiles (:func:`apply_small_kernel`).

    Returns
    -------
    DifferenceTile
        The tile with the decorrelated image and variance (mask and convolved planes shared).
    """
    import dataclasses
    import time

    t0 = time.perf_counter()
    tile = tiles[tuple(core)]
    h = kernel.shape[0] // 2
    x0, x1, y0, y1 = core
    bx0, bx1, by0, by1 = bbox
    grown = (max(x0 - h, bx0), min(x1 + h, bx1), max(y0 - h, by0), min(y1 + h, by1))
    covered = sum(max(0, min(c[1], grown[1]) - max(c[0], grown[0])) * max(0, min(c[3], grown[3]) - max(c[2], grown[2]))
                  for c in tiles)
    if covered != (grown[1] - grown[0]) * (grown[3] - grown[2]):
        raise RuntimeError(f"decorrelate_tile: the tiles given do not cover the halo {grown} of tile {tuple(core)} "
                           "(was the image's shape different when the graph was built?)")
    region = assemble(((t.core, t.image) for t in tiles.values()), grown, dtype=tile.image.dtype)
    pads = ((h - (y0 - grown[2]), h - (grown[3] - y1)), (h - (x0 - grown[0]), h - (grown[1] - x1)))
    block = np.pad(region, pads, mode="symmetric") if any(p for pair in pads for p in pair) else region
    # float32 transforms: the difference is float32, and their round-off (~1e-7 of its RMS) is far below its noise
    image = apply_small_kernel(block, kernel, dtype=np.float32, kernel_fts=kernel_fts)
    if h:
        image = image[h:-h, h:-h]
        if planes is None:  # (into the whole planes it is copied below: no copy of its own first)
            image = np.ascontiguousarray(image)
    variance = decorrelated_variance(tile.variance, tile.mask, cut_box(variance_unconvolved, xy0, core),
                                     cut_box(variance_convolved, xy0, core), kappa=kappa, keep_bits=keep_bits)
    if planes is not None:
        image, variance = planes.place(core, "image", image), planes.place(core, "variance", variance)
    return dataclasses.replace(tile, image=image, variance=variance, planes=planes or tile.planes,
                               seconds={**tile.seconds, "decorrelate": time.perf_counter() - t0})
