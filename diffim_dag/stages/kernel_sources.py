r"""Selection of the stars that constrain the PSF-matching kernel.

Given a catalog (columns ``x``, ``y`` in parent pixels) or, when none is given,
detections on the science image (``sep.extract`` with the PSF as matched filter,
threshold ``detection_threshold`` σ of the filtered background noise; an image of 4 Mpix or more binned 2×2
first, and its mesh background measured on the binned image, as the PSF star finder does), every source is measured
and cut, in this order (the count each cut removes is recorded):

``outside``
    the stamp (side ``2 × kernel_size + 1``) leaves either image;
``masked``
    the stamp touches any of ``bad_mask_planes`` in either image;
``saturated``
    a stamp pixel reaches the saturation level of either image (when known);
``not_point_like``
    PSF-weighted second moments: :math:`T = I_{xx} + I_{yy}` of the data over that of
    the PSF model rendered at the same sub-pixel position, outside
    ``[1 / max_size_ratio, max_size_ratio]`` — or ``extended_max_size_ratio`` when the point-like
    sources that survive the other cuts carry :math:`\sum \mathrm{S/N}^2 <` ``min_point_snr2``
    (compact galaxies are static too and obey the same matching relation; a few faint stars cannot
    fix the kernel sum);
``not_isolated``
    another source (before any cut) within ``isolation_factor × kernel_size`` pixels;
``snr_low`` / ``snr_high``
    PSF-flux S/N outside ``[min_snr, max_snr]``, from the linear PSF fit
    :math:`\hat F = \sum P I/\sigma^2 / \sum P^2/\sigma^2`,
    :math:`\sigma_F = (\sum P^2/\sigma^2)^{-1/2}`;
``max_sources``
    beyond the ``max_sources`` highest-S/N sources.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pandas as pd

from ..config import KernelSourceConfig
from ..errors import InsufficientKernelSourcesError
from ..exposure import Exposure
from ..kernels.convolve import fft_convolve_blocks
from ..noise import BackgroundModel, background_mesh, measure_background, row_strips, rows_of
from ..kernels.maskops import has_bits

__all__ = ["select_kernel_sources", "SourceDetection", "detect_kernel_sources", "detect_sources", "measure_sources",
           "overlap_bbox", "SOURCE_CUTS"]

log = logging.getLogger(__name__)

SOURCE_CUTS = ("outside", "masked", "saturated", "not_point_like", "not_isolated", "snr_low", "snr_high", "max_sources")
#: Background mesh size (pixels) for detection and local sky.
BACKGROUND_BOX = 64
#: sep's pixel stack (large images with many sources overflow the default).
#: Minimum number of kernel sources (the issue's "fewer than 3").
MIN_KERNEL_SOURCES = 3


def overlap_bbox(a: Exposure, b: Exposure) -> tuple[int, int, int, int]:
    """Intersection of the two parent boxes ``(x_min, x_max, y_min, y_max)``; empty → ValueError."""
    ax0, ax1, ay0, ay1 = a.bbox
    bx0, bx1, by0, by1 = b.bbox
    box = (max(ax0, bx0), min(ax1, bx1), max(ay0, by0), min(ay1, by1))
    if box[1] <= box[0] or box[3] <= box[2]:
        raise ValueError(f"the exposures do not overlap ({a.bbox} vs {b.bbox})")
    return box


def _bad_bits(exposure: Exposure, config: KernelSourceConfig) -> int:
    """The bits of ``config.bad_mask_planes`` that ``exposure`` has."""
    return exposure.bitmask([p for p in config.bad_mask_planes if p in exposure.mask_planes])


class BlockLevel:
    """The level map of a mesh measured on an image binned ``b × b`` (block sums), indexed like the plane of the
    full-resolution image (``level[rows, cols]``, integer index arrays): each pixel takes its block's level over
    ``b²`` (the last block where the binning left a row or column out).  The map is smooth on the mesh's scale
    (boxes of 32 blocks): within a block it varies far below the noise."""

    def __init__(self, binned: np.ndarray, b: int):
        self.binned, self.b = binned, int(b)

    @property
    def nbytes(self) -> int:
        return int(self.binned.nbytes)

    def __getitem__(self, index):
        rows, cols = index
        ny, nx = self.binned.shape
        iy = np.minimum(np.asarray(rows) // self.b, ny - 1)
        ix = np.minimum(np.asarray(cols) // self.b, nx - 1)
        return self.binned[iy, ix] * np.float32(1.0 / (self.b * self.b))


def binned_science(science: Exposure, config: KernelSourceConfig) -> tuple[int, np.ndarray, np.ndarray]:
    """``(b, image, bad)``: the science image its kernel sources are detected on, and its bad pixels: the image
    itself (``b`` = 1) or, from :data:`~diffim_dag.psf.estimate.BIN_PIXELS`, its 2×2 block sums as the PSF star
    finder bins it (:func:`~diffim_dag.psf.estimate.bin_blocks`: a block's bad pixels count as the mean of its
    good ones; a block without any is bad)."""
    from ..psf.estimate import BIN_PIXELS, bin_blocks

    img, _, msk = science.arrays()
    bad = has_bits(msk, _bad_bits(science, config))
    if img.size < BIN_PIXELS:
        return 1, img, bad
    return (2, *bin_blocks(img, bad, 2))


def science_background(science: Exposure, config: KernelSourceConfig, binned=None):
    """The mesh background of the science image (bad planes excluded), shared by detection and measurement: the
    level as a plane (the measurement takes it at its stamps), the rms as a :class:`~diffim_dag.noise.MeshMap`
    (the detection takes it strip by strip: no second 64 MB plane for a 4096² frame).

    Measured on the image the sources are detected on (``binned``: :func:`binned_science`, made here when None):
    a binned one with boxes of ``BACKGROUND_BOX / b`` blocks, the same boxes on the sky with a quarter of the
    pixels to sort, as the PSF star finder measures its own.  Its rms is then that of a block's sum, and its level
    a :class:`BlockLevel`."""
    b, data, bad = binned if binned is not None else binned_science(science, config)
    level, rms, global_level, global_rms = background_mesh(data, bad, box=BACKGROUND_BOX // b)
    level = level.rows(slice(0, data.shape[0]))
    return BackgroundModel(level=level if b == 1 else BlockLevel(level, b), rms=rms, global_level=global_level,
                           global_rms=global_rms)


@dataclasses.dataclass(eq=False)
class SourceDetection:
    """What kernel-source selection needs of the science image alone (:func:`detect_kernel_sources`): its mesh
    background level and, unless a catalogue is given, the sources detected on it."""

    background: BackgroundModel  # the level (the noise map served the detection only)
    table: pd.DataFrame | None  # x, y (parent pixels); None: the sources come from a catalogue

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return 1024 + int(self.background.level.nbytes)


def detect_kernel_sources(science: Exposure, config: KernelSourceConfig, *, detect: bool = True) -> SourceDetection:
    """The science's background (:func:`science_background`) and, with ``detect``, its sources
    (:func:`detect_sources`): the part of the selection that needs neither the template nor the variance
    scaling, so that it can run as soon as the science's input stages are done."""
    binned = binned_science(science, config)
    background = science_background(science, config, binned)
    table = detect_sources(science, config, background, binned) if detect else None
    return SourceDetection(dataclasses.replace(background, rms=None), table)


def correlate_in_blocks(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image ⋆ kernel`` (cross-correlation, zero padding) by FFT in blocks with a halo.

    Equal to ``fftconvolve(image, kernel[::-1, ::-1], mode="same")`` to FFT rounding, with the FFT buffers of one
    block at a time (:func:`~diffim_dag.kernels.convolve.fft_convolve_blocks`; a 4096² frame at once needs ~4.5× its
    size).
    """
    flipped = np.ascontiguousarray(kernel[::-1, ::-1], dtype=image.dtype)
    return fft_convolve_blocks(image, flipped).astype(image.dtype, copy=False)


def detect_sources(science: Exposure, config: KernelSourceConfig, background=None, binned=None) -> pd.DataFrame:
    """Detect on the background-subtracted science image smoothed with its PSF (matched filter); an image of
    :data:`~diffim_dag.psf.estimate.BIN_PIXELS` or more binned 2×2 first (``binned``: :func:`binned_science`, made
    here when None), its background measured on the binned image (:func:`science_background`), and filtered with
    the PSF binned alike (:func:`binned_psf`): a star stays a star, and the mesh, the transforms and the extraction
    cost a quarter.

    Returns a table with ``x``, ``y`` (parent pixels).
    """
    from ..psf.estimate import sep_extract

    b, data, bad = binned if binned is not None else binned_science(science, config)
    bkg = background if background is not None else science_background(science, config, (b, data, bad))
    data = np.subtract(data, bkg.level if b == 1 else bkg.level.binned, dtype=np.float32)
    np.copyto(data, np.float32(0), where=bad)  # (one plane: the bad pixels zeroed in it)
    cx, cy = science.center
    psf = science.psf.kernel_image(cx, cy)
    if b > 1:
        psf = binned_psf(psf)
    # Matched filter by FFT (sep's direct filtering is ~15x slower on 4k² images): the smoothed
    # image S = I ⊗ P has noise σ_S = rms √(Σ P²) for white sky noise (rms: a pixel's, or a block's sum's), so
    # thresholding S at detection_threshold × σ_S is the "N σ after smoothing with the PSF" criterion.
    # Thresholding the significance S/σ_S at detection_threshold (sep with no err) is the same
    # criterion and needs no second full-frame map.
    significance = correlate_in_blocks(data, psf)
    del data
    norm = np.float32(math.sqrt(float((psf**2).sum())))
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in row_strips(significance.shape[0]):
            significance[s] /= rows_of(bkg.rms, s) * norm
    significance[bad | ~np.isfinite(significance)] = 0.0
    # (a source's pixels above the threshold: b² times fewer binned)
    objects = sep_extract(significance, float(config.detection_threshold), None, bad, filter_kernel=None,
                          minarea=-(-5 // (b * b)))
    x0, y0 = science.xy0
    shift = 0.5 * (b - 1)  # (a binned pixel's centre in the pixels it sums)
    return pd.DataFrame({"x": objects["x"] * b + shift + x0, "y": objects["y"] * b + shift + y0})


def binned_psf(psf: np.ndarray) -> np.ndarray:
    """The matched filter of an image binned 2×2 for a PSF image ``psf`` (odd side, centred): a star centred on a
    binned pixel spreads over the full pixels at offsets 2k ± ½ of each block's centre, which the PSF's own pixels
    at 2k − 1, 2k, 2k + 1 weighted ½, 1, ½ stand for; sampled every 2nd pixel about the centre (odd side)."""
    p = np.pad(np.asarray(psf, dtype=np.float64), 1)
    p = 0.5 * p[:-2] + p[1:-1] + 0.5 * p[2:]
    p = 0.5 * p[:, :-2] + p[:, 1:-1] + 0.5 * p[:, 2:]
    c = psf.shape[0] // 2
    return np.ascontiguousarray(p[c % 2::2, c % 2::2])


def _weighted_traces(stamps: np.ndarray, xc: np.ndarray, yc: np.ndarray, sigma_w: np.ndarray) -> np.ndarray:
    """Trace of the Gaussian-weighted (σ ``sigma_w``, centred on ``(xc, yc)``) second moments of each stamp
    (``(n, s, s)``) about its weighted centroid; NaN where the weighted sum is not positive."""
    s = stamps.shape[-1]
    g = np.arange(s, dtype=np.float64)
    dx = g[None, None, :] - xc[:, None, None]
    dy = g[None, :, None] - yc[:, None, None]
    w = np.exp(-0.5 * (dx * dx + dy * dy) / (sigma_w**2)[:, None, None]) * stamps
    tot = w.sum(axis=(1, 2))
    ok = tot > 0
    safe = np.where(ok, tot, 1.0)[:, None, None]
    mx = (w * dx).sum(axis=(1, 2))[:, None, None] / safe
    my = (w * dy).sum(axis=(1, 2))[:, None, None] / safe
    trace = (w * ((dx - mx) ** 2 + (dy - my) ** 2)).sum(axis=(1, 2)) / safe[:, 0, 0]
    return np.where(ok, trace, np.nan)


#: Sources measured together by :func:`measure_sources` (bounds its stamp arrays: 512 stamps of 31² are 4 MB each).
MEASURE_BATCH = 512


def measure_sources(
    science: Exposure,
    x: np.ndarray,
    y: np.ndarray,
    half: int,
    background=None,
) -> pd.DataFrame:
    """PSF flux, S/N, peak and size ratio of sources at parent (x, y) on the science image.

    Measured in a ``2·half + 1`` box (which must lie inside the image) after
    subtracting the mesh background; the sources of a batch together, in array operations (their PSFs
    rendered at once, :meth:`~diffim_dag.psf.Psf.kernel_images_many`).
    """
    img, var, msk = science.arrays()
    if background is None:
        background = measure_background(img, None, box=BACKGROUND_BOX, rms=False)
    level = background.level
    x0, y0 = science.xy0
    psf = science.psf
    size = 2 * half + 1
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    flux = np.full(len(x), np.nan)
    snr = np.full(len(x), np.nan)
    ratio = np.full(len(x), np.nan)
    grid = np.arange(-half, half + 1)
    for start in range(0, len(x), MEASURE_BATCH):
        b = slice(start, start + MEASURE_BATCH)
        xs, ys = x[b], y[b]
        ix, iy = np.round(xs).astype(np.int64), np.round(ys).astype(np.int64)  # (half to even, as round())
        rows = (iy - y0)[:, None, None] + grid[None, :, None]
        cols = (ix - x0)[:, None, None] + grid[None, None, :]
        stamp = img[rows, cols].astype(np.float64) - level[rows, cols]
        v = var[rows, cols].astype(np.float64)
        off_x, off_y = xs - ix, ys - iy
        p = psf.kernel_images_many(xs, ys, size=size, offsets=np.stack([off_x, off_y], axis=-1)[:, None, :])[:, 0]
        w = np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 0.0)
        ppw = (p * p * w).sum(axis=(1, 2))
        pos = ppw > 0
        f = (p * stamp * w).sum(axis=(1, 2)) / np.where(pos, ppw, 1.0)
        flux[b] = np.where(pos, f, np.nan)
        snr[b] = np.where(pos, f * np.sqrt(np.where(pos, ppw, 0.0)), np.nan)
        sigma_w = psf.sigma_many(xs, ys)
        t_data = _weighted_traces(stamp, half + off_x, half + off_y, sigma_w)
        t_psf = _weighted_traces(p, half + off_x, half + off_y, sigma_w)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio[b] = np.where(t_psf > 0, t_data / np.where(t_psf > 0, t_psf, 1.0), np.nan)
    return pd.DataFrame({"flux": flux, "snr": snr, "size_ratio": ratio})


def _stamp_checks(exp: Exposure, ix, iy, half, bad_bits):
    """(inside, clean, peak) for integer centres on one exposure."""
    img, _, msk = exp.arrays()
    x0, x1, y0, y1 = exp.bbox
    inside = (ix - half >= x0) & (ix + half < x1) & (iy - half >= y0) & (iy + half < y1)
    clean = np.zeros(len(ix), dtype=bool)
    peak = np.full(len(ix), np.nan)
    grid = np.arange(-half, half + 1)
    found = np.flatnonzero(inside)
    for start in range(0, len(found), MEASURE_BATCH):  # the stamps of a batch at once
        k = found[start:start + MEASURE_BATCH]
        rows = (np.asarray(iy)[k] - y0)[:, None, None] + grid[None, :, None]
        cols = (np.asarray(ix)[k] - x0)[:, None, None] + grid[None, None, :]
        clean[k] = ~np.any(msk[rows, cols] & bad_bits, axis=(1, 2))
        peak[k] = np.max(img[rows, cols], axis=(1, 2))
    return inside, clean, peak


def select_kernel_sources(
    science: Exposure,
    template: Exposure,
    kernel_size: int,
    config: KernelSourceConfig = KernelSourceConfig(),
    catalog: pd.DataFrame | None = None,
    detection: SourceDetection | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Kernel sources: detected (or given), measured and cut; highest S/N first.

    Parameters
    ----------
    science, template : Exposure
    kernel_size : int
        Kernel side; stamps have side ``2 × kernel_size + 1``.
    config : KernelSourceConfig
    catalog : DataFrame, optional
        Columns ``x``, ``y`` (parent pixels); detection on the science image when None.
    detection : SourceDetection, optional
        :func:`detect_kernel_sources` of ``science`` done already (with ``detect=catalog is None``).

    Returns
    -------
    sources : DataFrame
        ``id, x, y, flux, snr, size_ratio``, sorted by decreasing S/N.
    stats : dict
        ``{"found": n, "used": m, "rejected": {cut: count}, "rejected_sources": DataFrame}``: the
        last holds every source a cut removed, with the cut in ``reason``.

    Raises
    ------
    InsufficientKernelSourcesError
        Fewer than 3 sources survive; the message and the attributes carry the counts.
    """
    if science.psf is None:
        raise ValueError("kernel source selection needs the science PSF")
    half = int(kernel_size)
    if detection is None:
        detection = detect_kernel_sources(science, config, detect=catalog is None)
    background = detection.background
    if catalog is None:
        table = detection.table
        origin = "detected on the science image"
    else:
        if not {"x", "y"} <= set(catalog.columns):
            raise ValueError(f"kernel source catalog needs columns 'x' and 'y', has {list(catalog.columns)}")
        table = pd.DataFrame({"x": np.asarray(catalog["x"], float), "y": np.asarray(catalog["y"], float)})
        origin = "given"
    table = table.reset_index(drop=True)
    table.insert(0, "id", np.asarray(catalog["id"]) if catalog is not None and "id" in catalog else np.arange(len(table)))
    found = len(table)
    rejected = {c: 0 for c in SOURCE_CUTS}
    all_xy = table[["x", "y"]].to_numpy()
    ix = np.round(table["x"].to_numpy()).astype(int)
    iy = np.round(table["y"].to_numpy()).astype(int)
    keep = np.ones(found, dtype=bool)
    why = np.full(found, "", dtype=object)

    def cut(name, bad):
        nonlocal keep
        bad = bad & keep
        rejected[name] += int(bad.sum())
        why[bad] = name
        keep = keep & ~bad

    checks = []
    for exp in (science, template):
        bits = _bad_bits(exp, config)
        checks.append(_stamp_checks(exp, ix, iy, half, bits))
    cut("outside", ~(checks[0][0] & checks[1][0]))
    cut("masked", ~(checks[0][1] & checks[1][1]))
    sat = np.zeros(found, dtype=bool)
    for exp, (_, _, peak) in zip((science, template), checks):
        level = exp.info.saturation
        if level is not None:
            sat |= peak >= level
    cut("saturated", sat)
    meas = pd.DataFrame({"flux": np.full(found, np.nan), "snr": np.full(found, np.nan), "size_ratio": np.full(found, np.nan)})
    idx = np.flatnonzero(keep)
    if idx.size:
        m = measure_sources(science, table["x"].to_numpy()[idx], table["y"].to_numpy()[idx], half, background)
        meas.iloc[idx] = m.to_numpy()
    table = pd.concat([table, meas], axis=1)
    r = table["size_ratio"].to_numpy()
    isolated = np.ones(found, dtype=bool)
    radius = config.isolation_factor * half
    if radius > 0 and found > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(all_xy)
        isolated = np.asarray([len(n) for n in tree.query_ball_point(all_xy, r=radius)]) <= 1
    snr = table["snr"].to_numpy()
    snr_ok = (snr >= config.min_snr) & (snr <= config.max_snr)

    def sized(limit, ratio=None):
        ratio = r if ratio is None else ratio
        return (ratio <= limit) & (ratio >= 1.0 / limit)

    point_like = sized(config.max_size_ratio)
    usable = keep & point_like & isolated & snr_ok
    n_point = int(usable.sum())
    point_snr2 = float(np.sum(snr[usable] ** 2))
    extended = point_snr2 < config.min_point_snr2 and config.extended_max_size_ratio > config.max_size_ratio
    size_ok = sized(config.extended_max_size_ratio) if extended else point_like
    cut("not_point_like", ~size_ok)
    cut("not_isolated", ~isolated)
    cut("snr_low", ~(snr >= config.min_snr))
    cut("snr_high", ~(snr <= config.max_snr))
    kept = table[keep].sort_values("snr", ascending=False, kind="stable")
    if len(kept) > config.max_sources:
        rejected["max_sources"] = len(kept) - config.max_sources
        why[kept.index[config.max_sources:]] = "max_sources"
        kept = kept.iloc[: config.max_sources]
    dropped = table.assign(reason=why.astype(str))[why != ""].reset_index(drop=True)
    kept = kept.reset_index(drop=True)
    stats = {"found": found, "used": len(kept), "rejected": rejected, "origin": origin, "rejected_sources": dropped,
             "point_like": n_point, "point_snr2": point_snr2,
             "extended_admitted": int((~sized(config.max_size_ratio, kept["size_ratio"].to_numpy())).sum())
             if extended else 0}
    if len(kept) < MIN_KERNEL_SOURCES:
        detail = ", ".join(f"{k}: {v}" for k, v in rejected.items() if v)
        raise InsufficientKernelSourcesError(
            f"only {len(kept)} kernel source(s) left of {found} {origin} (need ≥ {MIN_KERNEL_SOURCES}); "
            f"removed by cut: {detail or 'none'}",
            found=found,
            used=len(kept),
            rejected=rejected,
        )
    log.info("kernel sources: %d of %d %s kept (%s)", len(kept), found, origin, rejected)
    return kept, stats
