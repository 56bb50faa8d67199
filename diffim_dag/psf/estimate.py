r"""PSF estimation from an exposure's own stars, for images that come without a PSF model.

Plain FITS frames from a telescope archive carry no PSF; HOTPANTS-style users expect nothing else
to be needed.  :func:`estimate_psf` builds one from the image itself:

1. **Candidates**: ``sep.extract`` at ``detection_threshold`` σ of the mesh noise (sep's 3×3 filter; on the
   image binned 2×2 from 4 Mpix up), then, on the full-resolution pixels of a stamp around each with the mesh
   level subtracted, the half-light radius :math:`r_{50}` and an aperture S/N (radius :math:`2 r_{50}`).
2. **Cuts**, in order, each counted in the report (``rejected``) and named on every candidate
   (``reason``): ``edge`` (stamp leaves the image), ``masked`` (a ``bad`` pixel within
   :math:`2\,\mathrm{FWHM}` of the centre), ``saturated`` (a saturated pixel in the stamp, or a
   peak above ``saturation_fraction`` × the saturation level: non-linear), ``flagged`` (sep flags
   truncated objects), ``snr_low``, ``not_point_like`` (off the stellar locus, below),
   ``not_isolated`` (a neighbour brighter than ``isolation_flux_ratio`` of the star within the
   stamp's half-side), ``max_stars`` (beyond the ``max_stars`` highest-S/N stars).
3. **Stellar locus**: point sources share one :math:`r_{50}` (the PSF's) whatever their flux;
   galaxies are larger, cosmic rays and hot pixels smaller.  The locus is the densest
   :math:`\pm 7\%` window of :math:`\ln r_{50}` among the S/N-selected candidates (a narrow peak
   among broad galaxy sizes), refined by its median; members lie within ``locus_width`` of it.
   Where galaxies outnumber the bright stars the densest sizes are theirs, and no narrow peak: the
   window holds fewer than ``locus_min_contrast`` times as many as the windows 14–35 % away on either
   side do on average (fields of stars: 9–57 on the real and simulated frames; JWST's cluster stamps
   2.4).  Then the locus is the smallest sizes below that do stand out so (at least 5 members, above
   :data:`MIN_LOCUS_R50`): on simulated 512² frames with 75–150 exponential discs the densest sizes
   gave FWHM 4.8–8.3 px for PSFs of 2.8 and 3.5 px in all 18 images; now 8 are the stars' (within
   5 %), 9 warned, 1 a galaxy window that stood out 4.5× (as before).  Where no smaller peak stands
   out (compact galaxies as small as the stars; JWST's 2–4 stars) the densest are kept and a warning
   asks for a PSF file.  Only then: in a field of stars, the cosmic rays this stage sees (not yet
   repaired) can stand out as a peak of smaller sizes.
4. **Mean model**: the stamps (``stamp_fwhm`` × FWHM on a side, each star's own sky from its outer
   ring) re-centred by phase ramps and flux-normalized; their median is the first guess.  When that
   guess is undersampled (FWHM < ``undersampled_fwhm``) photutils' ePSF builder (Anderson & King 2000)
   makes the mean instead, ``oversampling`` times finer than the pixels and sampled at their centres:
   a stack of re-centred pixel stamps of an undersampled PSF is broadened by the interpolation.
5. **Spatial variation**: every star is fitted with the mean (flux and sub-pixel position, Gauss–Newton
   in Fourier space); the residuals, shifted back to the PSF frame, are regressed pixel by pixel on
   Chebyshev terms of the position, each star weighted by its S/N² (capped), outliers clipped
   (:func:`spatial_model`).  The order (0 … ``max_spatial_order``) is the one that predicts held-out
   stars best (4-fold cross-validation), so a constant PSF is not given noisy terms.  Order 0 gives an
   :class:`~diffim_dag.psf.ImagePsf`; higher orders a :class:`~diffim_dag.psf.GridPsf` sampled on a 3×3
   grid from edge to edge (bilinear between the nodes).  Each model image has its far wings (beyond
   2.5 FWHM) replaced by their azimuthal mean, is clipped at 0, normalized and re-centred on its
   Gaussian-windowed centroid.
6. **Too few stars** (fewer than ``min_stars`` pass): a circular Moffat profile fitted to the
   stars there are (FWHM and β, each star's flux and centre free), with a warning; **no star**:
   :class:`~diffim_dag.errors.PsfError` naming the image.

The report records where the PSF came from, the stars found/used and why each candidate was
rejected, the FWHM at the centre and its minimum and maximum over a 5×5 grid of the image, and the
fit residual: the median over the used stars of :math:`(\sum |I - F P| - \text{noise floor}) / \sum |I|`
within :math:`2\,\mathrm{FWHM}` (the same statistic as the difference's footprint residual).

Why not a library for the whole model (the issue names photutils' ePSF builder and piff):
``benchmarks/bench_psf.py`` measured photutils' builder run per cell of a 3×3 grid at 8.7 s on a 2048²
frame with FWHM errors up to 5.7 % at the corners, and piff's PixelGrid + polynomial fit at 35 s for the
same 213 stars, against 0.5 s and ≤ 1.1 % here (1.0 s at 4096², the target being 1.5 s).  photutils
keeps the one job it does better: the oversampled mean of an undersampled PSF.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import PsfEstimationConfig
from ..errors import PsfError
from ..kernels.centroid import window_centroid
from ..kernels.maskops import all_finite, nonzero_2d
from .models import GridPsf, ImagePsf, MoffatPsf, Psf, measure_fwhm

__all__ = [
    "PsfEstimationConfig",
    "STAR_CUTS",
    "PsfEstimate",
    "find_psf_stars",
    "bin_blocks",
    "build_epsf",
    "fit_moffat",
    "estimate_psf",
    "describe_psf",
]

log = logging.getLogger(__name__)

#: Candidate cuts, in the order they are applied.
STAR_CUTS = ("edge", "masked", "saturated", "flagged", "snr_low", "not_point_like", "not_isolated", "max_stars")


@dataclass(eq=False)
class PsfEstimate:
    """A PSF model and how it was obtained (``report``, JSON-able); ``stars`` lists every candidate, and
    ``fwhm_guess`` is the star finder's FWHM from their stellar locus (:func:`find_psf_stars`)."""

    psf: Psf
    report: dict
    stars: pd.DataFrame = field(default_factory=pd.DataFrame)
    fwhm_guess: float | None = None


#: Images of this many pixels or more are searched for stars binned 2×2 (:func:`find_psf_stars`).
BIN_PIXELS = 2048 * 2048


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n if n % 2 else n + 1


def sep_extract(data, threshold, err, mask, **options):
    """``sep.extract`` (minimum area 5 px, deblending contrast 0.005) that grows sep's pixel buffer until the
    image fits; ``options`` go to ``sep.extract`` (e.g. ``segmentation_map=True``).  Without a segmentation map it
    runs through SEP's C interface (:func:`~diffim_dag.kernels.sep_c.extract`: the interpreter lock released)."""
    import sep

    from ..kernels.sep_c import extract

    run = sep.extract if options.get("segmentation_map") else extract
    pixstack = 1_000_000
    sep.set_sub_object_limit(4096)
    while True:
        sep.set_extract_pixstack(pixstack)
        try:
            return run(data, threshold, err=err, mask=mask, **{"minarea": 5, "deblend_cont": 0.005, **options})
        except Exception as exc:  # sep raises a bare Exception when its pixel buffer overflows
            if "pixel buffer full" not in str(exc) or pixstack >= 64_000_000:
                raise
            pixstack *= 4


def _locus(log_r: np.ndarray, half_width: float = 0.07) -> float:
    """Centre of the densest window of half-width ``half_width`` in ``log_r`` (refined by its median)."""
    v = np.sort(log_r[np.isfinite(log_r)])
    if v.size == 0:
        return float("nan")
    hi = np.searchsorted(v, v + 2 * half_width, side="right")
    i = int(np.argmax(hi - np.arange(v.size)))
    return float(np.median(v[i : hi[i]]))


#: Fewer sources of S/N ≥ ``min_snr`` than this: their sizes are too few to judge whether the densest are a stellar
#: locus (:func:`find_psf_stars` takes them without a word).
LOCUS_MIN_POOL = 15


#: No stellar locus below this half-light radius (px): a PSF sampled by the pixels is broader (an undersampled one of
#: FWHM 1.2 px has ~0.65), a cosmic ray's or a hot pixel's hit sharper (one pixel: ~0.4).
MIN_LOCUS_R50 = 0.6


def _smallest_peak(log_r: np.ndarray, min_members: int, min_contrast: float, below: float,
                   half_width: float = 0.07) -> tuple[float, float]:
    """``(centre, contrast)`` of the smallest sizes that stand out as a peak: of the windows of ``log_r``
    (``2 × half_width`` wide) centred between :data:`MIN_LOCUS_R50` and ``below`` with at least ``min_members`` in
    them that stand ``min_contrast`` above their flanks (:func:`_locus_contrast`), the smallest's peak (the
    highest-standing of the windows that overlap it), its centre refined by its members' median; ``(nan, 0)`` when
    there is none."""
    v = np.sort(log_r[np.isfinite(log_r)])
    hi = np.searchsorted(v, v + 2 * half_width, side="right")
    count = hi - np.arange(v.size)
    mid = v + half_width

    def at(offset, side):
        return np.searchsorted(v, mid + offset * half_width, side=side)

    flank = (at(-2, "left") - at(-5, "left") + at(5, "right") - at(2, "right")) / 3.0
    score = count / np.maximum(flank, 1.0)
    eligible = np.flatnonzero((count >= min_members) & (score >= min_contrast) & (v >= math.log(MIN_LOCUS_R50))
                              & (mid < below))
    if not eligible.size:
        return float("nan"), 0.0
    first = int(eligible[0])
    near = np.arange(first, int(np.searchsorted(v, v[first] + 2 * half_width, side="right")))
    i = int(near[np.argmax(np.where(count[near] >= min_members, score[near], -1.0))])
    centre = float(np.median(v[i: hi[i]]))
    return centre, _locus_contrast(v, centre, half_width)


def _locus_contrast(log_r: np.ndarray, locus: float, half_width: float = 0.07) -> float:
    """How sharply the sources' ``log_r`` peak at ``locus``: their number within ``half_width`` of it over their mean
    number per window of that width in the flanks ``2 … 5 × half_width`` away on either side (at least 1).  A
    stellar locus stands far above its flanks; the densest window of a field of galaxies' broad sizes does not."""
    v = log_r[np.isfinite(log_r)]
    d = np.abs(v - locus)
    inside = int(np.count_nonzero(d <= half_width))
    flank = np.count_nonzero((d > 2 * half_width) & (d <= 5 * half_width)) / 3.0
    return inside / max(flank, 1.0)


def bin_blocks(image: np.ndarray, bad: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``b × b`` blocks (a block's bad pixels replaced by the mean of its good ones) and the
    blocks without any good pixel."""
    if b == 1:
        return np.where(bad, np.float32(0), image).astype(np.float32), bad
    ny, nx = (image.shape[0] // b) * b, (image.shape[1] // b) * b
    bad = np.asarray(bad[:ny, :nx], dtype=bool)
    total = np.zeros((ny // b, nx // b), np.float32)
    if np.count_nonzero(bad) * 16 > bad.size:  # much of the frame bad (no data): a masked copy
        good = ~bad
        img = np.where(good, image[:ny, :nx], np.float32(0)).astype(np.float32, copy=False)
        count = np.zeros(total.shape, np.uint8)
        for j in range(b):
            for i in range(b):
                total += img[j::b, i::b]
                count += good[j::b, i::b]
        if (count < b * b).any():
            total *= np.float32(b * b) / np.maximum(count, 1)
        return total, count == 0
    img = np.asarray(image[:ny, :nx], dtype=np.float32)
    for j in range(b):
        for i in range(b):
            total += img[j::b, i::b]
    # the blocks with a bad pixel (a few: saturated stars, bad columns) summed again without it, in the same
    # order, and scaled to b² pixels: no masked copy of the whole frame
    hit = np.zeros(total.shape, dtype=bool)
    for j in range(b):
        for i in range(b):
            hit |= bad[j::b, i::b]
    qy, qx = nonzero_2d(hit)
    part = np.zeros(len(qy), np.float32)
    count = np.zeros(len(qy), np.uint8)
    for j in range(b):
        for i in range(b):
            v = img[qy * b + j, qx * b + i]
            ok = ~bad[qy * b + j, qx * b + i]
            part += np.where(ok, v, np.float32(0))
            count += ok
    part *= np.float32(b * b) / np.maximum(count, 1)
    total[qy, qx] = part
    empty = np.zeros(total.shape, dtype=bool)
    empty[qy, qx] = count == 0
    return total, empty


def _stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """``(n, 2 half + 1, 2 half + 1)`` cut-outs centred on integer pixels (all inside the image)."""
    g = np.arange(-half, half + 1)
    return image[(iy[:, None] + g[None, :])[:, :, None], (ix[:, None] + g[None, :])[:, None, :]]


def _radial_measures(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray, rmax: float):
    """Half-light radius within ``rmax`` and the peak of each background-subtracted stamp."""
    n, size, _ = stamps.shape
    h = size // 2
    g = np.arange(-h, h + 1, dtype=np.float64)
    r = np.hypot(g[None, None, :] - dx[:, None, None], g[None, :, None] - dy[:, None, None])
    step = 0.2
    nb = int(math.ceil(rmax / step)) + 1
    bins = np.minimum((r / step).astype(np.int64), nb)  # bin nb: beyond rmax
    idx = (np.arange(n)[:, None, None] * (nb + 1) + bins).ravel()
    prof = np.bincount(idx, weights=stamps.ravel(), minlength=n * (nb + 1)).reshape(n, nb + 1)[:, :nb]
    cum = np.cumsum(prof, axis=1)
    total = cum[:, -1]
    half_light = np.full(n, np.nan)
    ok = total > 0
    frac = cum[ok] / total[ok, None]
    k = np.argmax(frac >= 0.5, axis=1)  # first bin reaching half
    prev = np.where(k > 0, frac[np.arange(len(k)), np.maximum(k - 1, 0)], 0.0)
    cur = frac[np.arange(len(k)), k]
    t = np.where(cur > prev, (0.5 - prev) / np.where(cur > prev, cur - prev, 1.0), 0.5)
    half_light[ok] = (k + t) * step
    return half_light, stamps.reshape(n, -1).max(axis=1)


def find_psf_stars(image: np.ndarray, bad: np.ndarray | None = None, *, saturated: np.ndarray | None = None,
                   saturation: float | None = None, config: PsfEstimationConfig = PsfEstimationConfig(),
                   binning: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Candidate PSF stars of ``image`` with the reason each one was rejected (``""``: used).

    Detection runs on the image binned 2×2 when it has ``BIN_PIXELS`` (4 Mpix) or more, or as ``binning``
    says (4× fewer pixels for the mesh background and ``sep.extract``; a star stays a star); every
    measurement is made on the full-resolution pixels, in stamps, with the mesh level at the star subtracted.

    Parameters
    ----------
    image : ndarray
        Counts (the background is measured and removed here).
    bad : ndarray of bool, optional
        Pixels without usable data (no data, bad columns…).
    saturated : ndarray of bool, optional
        Saturated pixels.
    saturation : float, optional
        Saturation level (counts, as ``image``); peaks above ``saturation_fraction`` of it are cut.

    Returns
    -------
    stars : DataFrame
        ``x, y`` (array pixels), ``flux, snr, r50, peak, background, noise, reason`` for every
        candidate, highest S/N first (``background`` and ``noise``: the mesh level and RMS per pixel).
    info : dict
        ``found``, ``used``, ``rejected`` (count per cut), ``r50_locus``, ``fwhm_guess``,
        ``stamp_size`` (px) and ``binning``.
    """
    from ..noise import measure_background

    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    bad = np.zeros(img.shape, bool) if bad is None else np.asarray(bad, bool)
    if not all_finite(img):  # (read only from here on: the caller's plane itself when every pixel is finite)
        bad = bad | ~np.isfinite(img)
    sat = np.zeros(img.shape, bool) if saturated is None else np.asarray(saturated, bool)
    b = (2 if ny * nx >= BIN_PIXELS else 1) if binning is None else int(binning)
    binned, bad_b = bin_blocks(img, bad | sat, b)
    bkg = measure_background(binned, bad_b, box=max(64 // b, 16))
    data_b = np.ascontiguousarray(np.where(bad_b, np.float32(0), binned - bkg.level), dtype=np.float32)
    rms_b = np.ascontiguousarray(np.maximum(bkg.rms, np.float32(1e-30)), dtype=np.float32)
    objects = sep_extract(data_b, float(config.detection_threshold), rms_b, bad_b)
    del data_b
    n = len(objects)
    rejected = {c: 0 for c in STAR_CUTS}
    columns = ("x", "y", "flux", "snr", "r50", "peak", "background", "noise")
    info = {"found": int(n), "used": 0, "rejected": rejected, "r50_locus": None, "fwhm_guess": None,
            "stamp_size": None, "binning": b}
    if n == 0:
        return pd.DataFrame({k: np.zeros(0) for k in columns}).assign(reason=""), info
    x = objects["x"].astype(np.float64) * b + 0.5 * (b - 1)
    y = objects["y"].astype(np.float64) * b + 0.5 * (b - 1)
    jb = np.clip((y / b).astype(int), 0, bkg.level.shape[0] - 1)
    ib = np.clip((x / b).astype(int), 0, bkg.level.shape[1] - 1)
    level = bkg.level[jb, ib].astype(np.float64) / b**2
    noise = bkg.rms[jb, ib].astype(np.float64) / b  # per full-resolution pixel (white noise)
    size0 = np.sqrt(np.clip(objects["a"] * objects["b"], 0.25, None)) * b
    rmax = float(np.clip(6.0 * np.median(size0), 5.0, 50.0))
    reason = np.full(n, "", dtype=object)
    r50 = np.full(n, np.nan)
    peak = np.full(n, np.nan)
    flux = np.full(n, np.nan)
    snr = np.zeros(n)

    def cut(name, where):
        where = np.asarray(where, bool) & (reason == "")
        reason[where] = name
        rejected[name] += int(where.sum())

    hm = int(math.ceil(rmax)) + 1
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix - hm >= 0) & (iy - hm >= 0) & (ix + hm < nx) & (iy + hm < ny)
    k = np.flatnonzero(inside)
    if k.size:
        st = _stamps(img, ix[k], iy[k], hm).astype(np.float64) - level[k, None, None]
        st = np.where(_stamps(bad, ix[k], iy[k], hm), 0.0, st)
        r50[k], pk = _radial_measures(st, x[k] - ix[k], y[k] - iy[k], rmax)
        peak[k] = pk
        g = np.arange(-hm, hm + 1, dtype=np.float64)
        rr = np.hypot(g[None, None, :] - (x[k] - ix[k])[:, None, None], g[None, :, None] - (y[k] - iy[k])[:, None, None])
        rap = np.clip(2.0 * np.nan_to_num(r50[k], nan=1.0), 2.0, rmax)
        inap = rr <= rap[:, None, None]
        flux[k] = (st * inap).sum((1, 2))
        snr[k] = flux[k] / (noise[k] * np.sqrt(inap.sum((1, 2))))
    # the FWHM guess from the bright compact objects fixes the stamp size
    bright = (snr >= config.min_snr) & np.isfinite(r50)
    pool = np.log(r50[bright]) if bright.any() else np.log(r50[np.isfinite(r50)])
    locus = _locus(pool)
    contrast = _locus_contrast(pool, locus) if np.isfinite(locus) else float("nan")
    locus_from = "densest"
    n_pool = int(np.isfinite(pool).sum())
    if n_pool >= LOCUS_MIN_POOL and contrast < config.locus_min_contrast:
        # the densest sizes are no narrow peak: a field of galaxies, whose broad sizes outnumber the stars'; stars are
        # the smallest sources that share one size, and may still stand out below them.  (Only then: in a field of
        # stars, the cosmic rays this stage sees, not yet repaired, can be a peak of smaller sizes.)
        small, small_contrast = _smallest_peak(pool, max(5, int(math.ceil(0.05 * n_pool))),
                                               config.locus_min_contrast, locus - config.locus_width)
        if np.isfinite(small):
            locus, contrast, locus_from = small, small_contrast, "smallest peak"
        else:
            locus_from = "densest (doubtful)"
    r50_locus = float(np.exp(locus)) if np.isfinite(locus) else float("nan")
    fwhm_guess = 2.0 * r50_locus  # exact for a Gaussian (r50 = 1.1774 σ = FWHM / 2)
    half = int(np.clip(_odd(config.stamp_fwhm * fwhm_guess) // 2, 7, 50)) if np.isfinite(fwhm_guess) else 7
    cut("edge", (ix - max(half, hm) < 0) | (iy - max(half, hm) < 0) | (ix + max(half, hm) >= nx)
        | (iy + max(half, hm) >= ny))
    core = max(2, int(math.ceil(2.0 * fwhm_guess))) if np.isfinite(fwhm_guess) else 2
    live = np.flatnonzero(reason == "")
    if live.size:
        cut("masked", np.isin(np.arange(n), live[_stamps(bad, ix[live], iy[live], core).any((1, 2))]))
        live = np.flatnonzero(reason == "")
        satd = np.zeros(n, bool)
        satd[live] = _stamps(sat, ix[live], iy[live], half).any((1, 2))
        if saturation is not None and np.isfinite(saturation):
            satd |= np.nan_to_num(peak + level, nan=np.inf) >= config.saturation_fraction * float(saturation)
        cut("saturated", satd)
    import sep

    cut("flagged", (objects["flag"] & (sep.OBJ_TRUNC | sep.OBJ_SINGU)) != 0)
    cut("snr_low", ~(snr >= config.min_snr))
    cut("not_point_like", ~(np.abs(np.log(r50) - locus) <= config.locus_width))
    if n > 1:
        from scipy.spatial import cKDTree

        tree = cKDTree(np.column_stack([x, y]))
        pairs = tree.query_pairs(r=half * math.sqrt(2.0), output_type="ndarray")
        crowded = np.zeros(n, bool)
        if len(pairs):
            a, c = pairs[:, 0], pairs[:, 1]
            near = (np.abs(x[a] - x[c]) <= half) & (np.abs(y[a] - y[c]) <= half)
            a, c = a[near], c[near]
            fl = np.clip(objects["flux"].astype(np.float64), 0.0, None)
            crowded[a[fl[c] > config.isolation_flux_ratio * fl[a]]] = True
            crowded[c[fl[a] > config.isolation_flux_ratio * fl[c]]] = True
        cut("not_isolated", crowded)
    order = np.argsort(-np.nan_to_num(snr, nan=-np.inf), kind="stable")
    usable = order[reason[order] == ""]
    cut("max_stars", np.isin(np.arange(n), usable[config.max_stars:]))
    stars = pd.DataFrame({"x": x, "y": y, "flux": flux, "snr": snr, "r50": r50, "peak": peak, "background": level,
                          "noise": noise, "reason": reason.astype(str)}).iloc[order].reset_index(drop=True)
    info.update(used=int((stars["reason"] == "").sum()), r50_locus=r50_locus, fwhm_guess=fwhm_guess,
                stamp_size=2 * half + 1, locus_contrast=float(contrast), locus_from=locus_from)
    return stars, info


def build_epsf(stamps: np.ndarray, weights: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, oversampling: int = 2,
               max_iterations: int = 6) -> np.ndarray:
    """Pixel-sampled effective PSF (odd size², unit sum) from background-subtracted star stamps.

    ``stamps[s]`` is centred on the pixel nearest star ``s``, which lies ``(dx[s], dy[s])`` from it;
    ``weights`` is 0 on unusable pixels.  photutils' :class:`~photutils.psf.EPSFBuilder` builds the
    model ``oversampling`` times finer than the pixels (Anderson & King 2000); its samples at the
    pixel centres are the pixel-convolved PSF at integer offsets from the centre.  The result is
    re-centred so that its Gaussian-windowed centroid (:func:`window_centroid`, as ``sep.winpos``)
    is the central pixel.
    """
    from photutils.psf import EPSFBuilder, EPSFStar, EPSFStars

    size = stamps.shape[1]
    h = size // 2
    stars = EPSFStars([EPSFStar(np.asarray(st, dtype=np.float64), weights=np.asarray(w, dtype=np.float64),
                                cutout_center=(h + float(ddx), h + float(ddy)))
                       for st, w, ddx, ddy in zip(stamps, weights, dx, dy)])
    shape = oversampling * (size + 1) + 1  # odd (size is odd), room for sub-pixel shifts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # photutils warns about stars it excludes
        builder = EPSFBuilder(oversampling=oversampling, shape=(shape, shape), maxiters=int(max_iterations),
                              progress_bar=False, recentering_maxiters=10)
        epsf, _ = builder(stars)
    fine = np.asarray(epsf.data, dtype=np.float64)
    c = fine.shape[0] // 2
    idx = c + oversampling * np.arange(-h, h + 1)
    return recentre(_normalize(fine[np.ix_(idx, idx)]))


def recentre(image: np.ndarray) -> np.ndarray:
    """``image`` shifted (Fourier) so that its windowed centroid is the central pixel; unit sum."""
    sigma = max(measure_fwhm(image) / 2.3548, 0.5)
    xc, yc = window_centroid(image, sigma)
    if abs(xc) < 1e-4 and abs(yc) < 1e-4:
        return image
    return _normalize(fourier_shift(image[None], np.array([-xc]), np.array([-yc]))[0])


def _phase(n_y: int, n_x: int, dx: np.ndarray, dy: np.ndarray):
    """Phase ramps of a (dx, dy) shift for ``rfft2`` spectra of ``n_y × n_x`` images, and the frequencies."""
    import scipy.fft

    kx = scipy.fft.rfftfreq(n_x)
    ky = scipy.fft.fftfreq(n_y)
    # the ramp is the product of a ramp along x and one along y: n_y + n_x/2 complex exponentials per image instead
    # of n_y · n_x/2 (the same values to ~1e-16)
    phase = np.exp(-2j * np.pi * ky[None, :, None] * np.asarray(dy, float)[:, None, None])
    phase = phase * np.exp(-2j * np.pi * kx[None, None, :] * np.asarray(dx, float)[:, None, None])
    return phase, kx, ky


def fourier_shift(images: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, single: bool = False) -> np.ndarray:
    """Shift a stack of odd-sized images by (dx, dy) each (content moves by +d), by phase ramps.

    ``single``: the transforms in single precision (float32 images, complex64 spectra; round-off ~1e-7 of the
    stamps' peak, far below their noise), about twice as fast for the stacks of ~300 star stamps of 37² that the
    PSF model shifts (a prime side: the transforms are the stage's slowest part; :func:`fit_stars` likewise).

    The transforms here and in :func:`fit_stars` take one thread, the stage's own: in process the science's and
    the template's PSFs are estimated at once, and a batch worker has one thread per core it was given (with a
    thread per core of the machine, each of two batch workers ran four FFT threads on two cores, and one worker
    alone borrowed the idle core).  Stamps of ~37² gain nothing from more: a 4096² frame's PSF took 0.75 s on one
    thread against 0.80 s on two, the same values."""
    import scipy.fft

    ims = np.asarray(images, dtype=np.float32 if single else np.float64)
    n_y, n_x = ims.shape[-2:]
    phase, _, _ = _phase(n_y, n_x, dx, dy)
    if single:
        phase = phase.astype(np.complex64)
    return scipy.fft.irfft2(scipy.fft.rfft2(ims) * phase, s=(n_y, n_x))


def fit_stars(stamps: np.ndarray, weights: np.ndarray, model: np.ndarray, dx: np.ndarray, dy: np.ndarray, *,
              iterations: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Flux and sub-pixel position of every star against one PSF image (vectorized Gauss–Newton).

    Star ``s`` is modelled as :math:`F_s\,P(\mathbf x - \boldsymbol\delta_s)` on its stamp
    (shifted by phase ramps; derivatives analytically in Fourier space); ``weights`` (0 for masked
    pixels) weigh the least squares.  Returns ``(flux, dx, dy)``.

    The shifted model and its derivatives are transformed in single precision (:func:`fourier_shift`'s
    ``single``); the sums of the normal equations are made in double.
    """
    import scipy.fft

    n = model.shape[0]
    fm = scipy.fft.rfft2(model).astype(np.complex64)
    dx, dy = np.array(dx, float), np.array(dy, float)
    flux = np.ones(len(dx))
    for it in range(iterations + 1):
        phase, kx, ky = _phase(n, n, dx, dy)
        fp = fm[None] * phase.astype(np.complex64)
        kx, ky = kx.astype(np.float32), ky.astype(np.float32)
        p = scipy.fft.irfft2(fp, s=(n, n))
        pw = p * weights
        flux = (pw * stamps).sum((1, 2)) / np.maximum((pw * p).sum((1, 2)), 1e-300)
        if it == iterations:
            break
        grads = scipy.fft.irfft2(np.stack([fp * (np.complex64(-2j * np.pi) * kx[None, None, :]),
                                           fp * (np.complex64(-2j * np.pi) * ky[None, :, None])]), s=(n, n))
        gx, gy = grads[0] * flux[:, None, None], grads[1] * flux[:, None, None]
        r = stamps - flux[:, None, None] * p
        cols = (p, gx, gy)
        a = np.empty((len(dx), 3, 3))
        b = np.empty((len(dx), 3))
        for i in range(3):
            cw = cols[i] * weights
            b[:, i] = (cw * r).sum((1, 2))
            for j in range(i, 3):
                a[:, i, j] = a[:, j, i] = (cw * cols[j]).sum((1, 2))
        a += np.eye(3)[None] * 1e-12 * np.maximum(np.trace(a, axis1=1, axis2=2), 1e-300)[:, None, None]
        step = np.linalg.solve(a, b[..., None])[..., 0]
        dx += np.clip(step[:, 1], -0.5, 0.5)
        dy += np.clip(step[:, 2], -0.5, 0.5)
    return flux, dx, dy


#: :func:`_least_squares` solves the normal equations of a design whose condition number (that of AᵀA) is below this:
#: their solution then agrees with the SVD's to ~1e-10 of its size (the double-precision round-off times it).
NORMAL_EQUATIONS_MAX_CONDITION = 1e6


def _least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.linalg.lstsq(a, b)[0]`` for a tall design ``a`` (few columns) and many right-hand sides ``b``: by the
    normal equations ``(AᵀA) x = Aᵀb`` where ``AᵀA`` is well conditioned (:data:`NORMAL_EQUATIONS_MAX_CONDITION`),
    by the SVD otherwise (a rank-deficient design gets lstsq's minimum-norm solution).  The PSF's spatial model
    solves a Chebyshev design of ≤ 6 terms over ~300 stars for every pixel of the stamp (1369 columns at 37²), in
    its cross-validation folds too: lstsq took ~2 ms a solve, the normal equations ~0.2 ms."""
    ata = a.T @ a
    if ata.size and np.linalg.cond(ata) < NORMAL_EQUATIONS_MAX_CONDITION:
        return np.linalg.solve(ata, a.T @ b)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _chebyshev(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Terms T_i(u) T_j(v), i + j ≤ order, as columns (u, v in [-1, 1])."""
    from numpy.polynomial import chebyshev as C

    cols = []
    for total in range(order + 1):
        for j in range(total + 1):
            i = total - j
            cols.append(C.chebval(u, [0] * i + [1]) * C.chebval(v, [0] * j + [1]))
    return np.column_stack(cols)


def spatial_model(stamps: np.ndarray, weights: np.ndarray, base: np.ndarray, x: np.ndarray, y: np.ndarray,
                  bbox, *, max_order: int, star_weights: np.ndarray | None = None, clip: float = 4.0,
                  folds: int = 4, fit_mean: bool = True):
    r"""Fit :math:`P(x, y) = P_0 + \sum_t T_t(u, v)\,C_t` to star stamps (pixel by pixel, in the PSF frame).

    Each star is fitted with ``base`` (:func:`fit_stars`); its residual
    :math:`I_s/F_s - P_0(\cdot - \boldsymbol\delta_s)` is shifted back to the PSF frame (masked
    pixels count as no residual) and the correction images :math:`C_t` (Chebyshev terms of order
    ≤ the order chosen, constant term included) follow from one weighted least-squares solve for all
    pixels, each star weighted by ``star_weights`` (its S/N², capped, so that the many faint stars
    do not drown the few bright ones and no single one dominates).

    The order (0 … ``max_order``) is the one that predicts held-out stars best: ``folds``-fold cross
    validation of the weighted squared residual within the PSF core, so a PSF that does not vary
    is not given a noisy quadratic that runs away at the corners.  Stars whose residual is more
    than ``clip`` robust σ above the others' are dropped and the solve repeated.

    ``fit_mean=False`` keeps ``base`` as the mean model: the constant term is left out and the
    other terms are centred on the stars' weighted mean position (used when ``base`` is an
    oversampled ePSF of an undersampled image, which a stack of re-centred pixel stamps would blur).

    Returns
    -------
    correction : callable
        ``correction(x, y)`` → the correction image at a position (add it to ``base``).
    used : ndarray of bool
        Stars kept by the clipping.
    order : int
        The spatial order chosen.
    """
    x0, x1, y0, y1 = bbox
    u = 2.0 * (np.asarray(x, float) - x0) / max(x1 - x0 - 1, 1) - 1.0
    v = 2.0 * (np.asarray(y, float) - y0) / max(y1 - y0 - 1, 1) - 1.0
    n = base.shape[0]
    h = n // 2
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    flux, dx, dy = fit_stars(stamps, weights, base, np.asarray(x) - ix, np.asarray(y) - iy)
    ok = np.isfinite(flux) & (flux > 0)
    norm = stamps / np.where(ok, flux, 1.0)[:, None, None]
    resid = fourier_shift(norm, -dx, -dy, single=True) - base[None]
    masked = fourier_shift(weights, -dx, -dy, single=True) < 0.5
    resid = np.where(masked, 0.0, resid).reshape(len(u), -1)
    sw = np.ones(len(u)) if star_weights is None else np.sqrt(np.asarray(star_weights, float))
    yy, xx = np.mgrid[-h: h + 1, -h: h + 1]
    core = (np.hypot(xx, yy) <= max(3.0, 0.25 * n)).ravel()

    first = 0 if fit_mean else 1
    centre = np.zeros(((max_order + 1) * (max_order + 2) // 2,))
    if not fit_mean:
        full = _chebyshev(u[ok], v[ok], max_order)
        centre = (full * sw[ok, None] ** 2).sum(0) / max(float((sw[ok] ** 2).sum()), 1e-300)

    def design(uu, vv, order):
        m = (order + 1) * (order + 2) // 2
        return _chebyshev(uu, vv, order)[:, first:] - centre[first:m][None, :]

    def solve(order, sel):
        a = design(u[sel], v[sel], order) * sw[sel][:, None]
        if a.shape[1] == 0:
            return np.zeros((0, resid.shape[1]))
        return _least_squares(a, resid[sel] * sw[sel][:, None])

    def cv_error(order, sel):
        idx = np.flatnonzero(sel)
        total = 0.0
        for f in range(folds):
            test = idx[f::folds]
            train = np.zeros(len(u), bool)
            train[np.setdiff1d(idx, test)] = True
            if train.sum() <= (order + 1) * (order + 2) // 2 or test.size == 0:
                return np.inf
            c = solve(order, train)
            pred = design(u[test], v[test], order) @ c[:, core]
            total += float(np.sum(sw[test, None] ** 2 * (resid[test][:, core] - pred) ** 2))
        return total

    keep = ok.copy()
    orders = [o for o in range(max_order + 1) if keep.sum() > 2 * (o + 1) * (o + 2) // 2]
    errors = {o: cv_error(o, keep) for o in orders}
    order = min(errors, key=lambda o: (errors[o], o)) if errors else 0
    coeffs = solve(order, keep)
    for _ in range(3):
        fitted = design(u, v, order) @ coeffs
        err = np.sqrt(np.mean((resid - fitted)[:, core] ** 2, axis=1))
        med = np.median(err[keep])
        mad = 1.4826 * np.median(np.abs(err[keep] - med)) + 1e-12
        new = keep & (err <= med + clip * mad)
        if new.sum() == keep.sum() or new.sum() <= (order + 1) * (order + 2) // 2:
            break
        keep = new
        coeffs = solve(order, keep)
    coeffs = coeffs.reshape(-1, n, n)

    def correction(xq, yq):
        uq = 2.0 * (float(xq) - x0) / max(x1 - x0 - 1, 1) - 1.0
        vq = 2.0 * (float(yq) - y0) / max(y1 - y0 - 1, 1) - 1.0
        t = design(np.array([uq]), np.array([vq]), order)[0]
        return np.tensordot(t, coeffs, axes=1) if t.size else np.zeros((n, n))

    return correction, keep, order


def _normalize(img: np.ndarray) -> np.ndarray:
    """Unit sum (non-finite pixels 0); negative noise kept, so averages of models stay unbiased."""
    img = np.where(np.isfinite(img), img, 0.0)
    total = img.sum()
    if not total > 0:
        raise PsfError("the PSF model has no positive flux")
    return img / total


def _clean(img: np.ndarray) -> np.ndarray:
    """Unit-sum PSF image: negative noise in the wings clipped to 0, normalized."""
    img = np.where(np.isfinite(img), img, 0.0)
    img = np.clip(img, 0.0, None)
    total = img.sum()
    if not total > 0:
        raise PsfError("the ePSF has no positive flux")
    return img / total


def fit_moffat(stamps: np.ndarray, weights: np.ndarray, dx: np.ndarray, dy: np.ndarray, *, fwhm_guess: float,
               noise: float = 1.0) -> tuple[MoffatPsf, float]:
    r"""A circular Moffat PSF fitted jointly to a few star stamps: FWHM and β shared, each star's flux and
    centre free.

    The model of a star is :math:`F\,P(x - x_0, y - y_0)` with :math:`P` the unit-sum Moffat profile
    integrated over each pixel (3×3 sub-samples); weighted least squares (``weights`` 0: ignored).
    Returns the model and the fit's reduced χ² (noise ``noise`` per pixel).
    """
    from scipy.optimize import least_squares

    n, size, _ = stamps.shape
    half = size // 2
    sub = (np.arange(3) - 1) / 3.0
    g = np.arange(-half, half + 1, dtype=np.float64)
    wts = np.sqrt(np.asarray(weights, float)) / max(float(noise), 1e-30)

    def profile(fwhm, beta, ox, oy):
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
        out = np.zeros((size, size))
        for sx in sub:
            for sy in sub:
                r2 = (g[None, :] + sx - ox) ** 2 + (g[:, None] + sy - oy) ** 2
                out += (1.0 + r2 / alpha**2) ** (-beta)
        return out * (beta - 1.0) / (math.pi * alpha**2) / 9.0

    def residuals(p):
        res = []
        for k in range(n):
            f, ox, oy = p[2 + 3 * k: 5 + 3 * k]
            res.append(((stamps[k] - f * profile(p[0], p[1], dx[k] + ox, dy[k] + oy)) * wts[k]).ravel())
        return np.concatenate(res)

    p0 = [fwhm_guess, 3.0]
    lo, hi = [0.5, 1.1], [100.0, 20.0]
    for k in range(n):
        p0 += [max(float(stamps[k].sum()), 1.0), 0.0, 0.0]
        lo += [0.0, -2.0, -2.0]
        hi += [np.inf, 2.0, 2.0]
    fit = least_squares(residuals, p0, bounds=(lo, hi), x_scale="jac")
    dof = max(fit.fun.size - len(p0), 1)
    return MoffatPsf(fwhm_pixels=float(fit.x[0]), beta=float(fit.x[1])), float(np.sum(fit.fun**2) / dof)


def _residual_ratio(stamps: np.ndarray, weights: np.ndarray, stars: pd.DataFrame, psf: Psf, xy0,
                    fwhm: float) -> float | None:
    """Median over stars of (Σ|I − F P| − Σ σ√(2/π)) / Σ|I| within 2 FWHM: the model's residual above the
    sky-noise floor, as a fraction of the star (F the PSF-fit flux, σ the sky noise per pixel)."""
    size = stamps.shape[1]
    h = size // 2
    g = np.arange(-h, h + 1, dtype=np.float64)
    ratios = []
    for k, row in enumerate(stars.itertuples()):
        ix, iy = round(row.x), round(row.y)
        ox, oy = row.x - ix, row.y - iy
        inner = (np.hypot(g[None, :] - ox, g[:, None] - oy) <= max(2.0 * fwhm, 2.0)) & (weights[k] > 0)
        p = psf.kernel_image(row.x + xy0[0], row.y + xy0[1], size=size, offset=(ox, oy))
        stamp = stamps[k]
        f = float((p[inner] * stamp[inner]).sum() / max((p[inner] ** 2).sum(), 1e-300))
        denom = float(np.abs(stamp[inner]).sum())
        floor = math.sqrt(2.0 / math.pi) * float(row.noise) * int(inner.sum())
        if denom > 0:
            ratios.append(max(float(np.abs(stamp[inner] - f * p[inner]).sum()) - floor, 0.0) / denom)
    return float(np.median(ratios)) if ratios else None


def describe_psf(psf: Psf, bbox, *, samples: int = 5) -> dict:
    """FWHM at the centre of ``bbox`` (x_min, x_max, y_min, y_max) and its min/max over a ``samples²`` grid."""
    x0, x1, y0, y1 = bbox
    xs = np.linspace(x0, x1 - 1, samples)
    ys = np.linspace(y0, y1 - 1, samples)
    f = np.array([[psf.fwhm(x, y) for x in xs] for y in ys])
    return {"fwhm_center": float(psf.fwhm(0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1))),
            "fwhm_min": float(f.min()), "fwhm_max": float(f.max())}


def _stack(stamps: np.ndarray, weights: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Median of the flux-normalized stamps re-centred by (dx, dy): the first guess of the mean PSF."""
    n = stamps.shape[1]
    h = n // 2
    yy, xx = np.mgrid[-h: h + 1, -h: h + 1]
    core = np.hypot(xx, yy) <= max(3.0, 0.25 * n)
    shifted = fourier_shift(np.where(weights > 0, stamps, 0.0), -dx, -dy, single=True)
    flux = shifted[:, core].sum(1)
    good = flux > 0
    return recentre(_normalize(np.median(shifted[good] / flux[good, None, None], axis=0).astype(np.float64)))


def _empirical_psf(stamps: np.ndarray, weights: np.ndarray, used: pd.DataFrame, *, shape, xy0, config,
                   source: str) -> tuple[Psf, dict]:
    """Mean PSF and its spatial variation from the used stars' stamps (see the module docstring)."""
    ny, nx = shape
    x, y = used["x"].to_numpy(), used["y"].to_numpy()
    dx, dy = x - np.round(x), y - np.round(y)
    max_order = config.max_spatial_order
    while max_order > 0 and len(used) < config.stars_per_spatial_term * (max_order + 1) * (max_order + 2) / 2:
        max_order -= 1
    bbox = (0, nx, 0, ny)
    snr = np.clip(used["snr"].to_numpy(), 1.0, config.max_star_weight_snr)
    base = _stack(stamps, weights, dx, dy)
    undersampled = measure_fwhm(base) < config.undersampled_fwhm
    mean_model = "S/N²-weighted stack"
    if undersampled:
        k = min(len(used), config.epsf_stars)
        base = build_epsf(stamps[:k], weights[:k], dx[:k], dy[:k], oversampling=config.oversampling,
                          max_iterations=config.max_iterations)
        mean_model = f"photutils ePSF (oversampling {config.oversampling}, {k} stars)"
    passes = 1 if undersampled else 2
    for _ in range(passes):
        correction, keep, order = spatial_model(stamps, weights, base, x, y, bbox, max_order=max_order,
                                                star_weights=snr**2, fit_mean=not undersampled)
        if not undersampled:  # the constant term is the mean's correction: fold it in, fit the stars again
            cx, cy = _weighted_centre(x[keep], y[keep], snr[keep] ** 2)
            mean = recentre(_normalize(base + correction(cx, cy)))
            if np.allclose(mean, base, atol=1e-6 * base.max()):
                break
            base = mean
    report = {"model": "image" if order == 0 else "grid", "mean_model": mean_model, "spatial_order": order,
              "stars_in_spatial_fit": int(keep.sum()), "undersampled": bool(undersampled)}
    fwhm = measure_fwhm(base)
    if order == 0:
        return ImagePsf(_finish(base + correction(0.5 * (nx - 1), 0.5 * (ny - 1)), fwhm), source=f"ePSF of {source}",
                        normalized=True), report
    xs = np.array([0.0, 0.5 * (nx - 1), nx - 1.0])
    ys = np.array([0.0, 0.5 * (ny - 1), ny - 1.0])
    images = np.stack([np.stack([_finish(base + correction(xn, yn), fwhm) for xn in xs]) for yn in ys])
    report["grid"] = [3, 3]
    return GridPsf(images, xs + xy0[0], ys + xy0[1], source=f"ePSF grid of {source}", normalized=True), report


def _finish(image: np.ndarray, fwhm: float) -> np.ndarray:
    """A model image as every consumer wants it.

    The wings beyond 2.5 FWHM are replaced by their azimuthal mean (the noise of a few dozen stars
    there would skew first moments and ring in ZOGY's Fourier division; the flux stays); what is
    left at the stamp's edge (the mean of the outermost ring: residual sky of the stamps) is
    removed; then negative pixels are clipped, the sum is 1 and the windowed centroid is on the
    central pixel.  Clipping only now, after the averaging, keeps the wings unbiased (clipping noise
    per pixel would leave a positive floor worth percents of the flux).
    """
    img = _normalize(image)
    n = img.shape[0]
    h = n // 2
    yy, xx = np.mgrid[-h: h + 1, -h: h + 1]
    r = np.hypot(xx, yy)
    rb = np.floor(r).astype(int)
    prof = np.bincount(rb.ravel(), img.ravel()) / np.maximum(np.bincount(rb.ravel()), 1)
    r1 = 2.5 * fwhm
    if r1 < h - 1:
        smooth = np.interp(r, np.arange(prof.size), prof)
        w = np.clip((r - r1) / 2.0, 0.0, 1.0)  # 2-px blend from the core to the azimuthal mean
        img = (1.0 - w) * img + w * smooth
    edge = (r >= h - 1.5) & (r <= h + 0.5)
    img = img - float(np.mean(img[edge]))
    return recentre(_clean(img))


def _weighted_centre(x, y, w) -> tuple[float, float]:
    w = np.asarray(w, float)
    return float((x * w).sum() / w.sum()), float((y * w).sum() / w.sum())


def estimate_psf(image: np.ndarray, *, bad: np.ndarray | None = None, saturated: np.ndarray | None = None,
                 saturation: float | None = None, xy0: tuple[int, int] = (0, 0),
                 config: PsfEstimationConfig = PsfEstimationConfig(), source: str = "image") -> PsfEstimate:
    """Estimate the PSF of ``image`` from its stars (see the module docstring).

    Parameters
    ----------
    image : ndarray
        Counts (sky not necessarily subtracted).
    bad, saturated : ndarray of bool, optional
        Unusable and saturated pixels.
    saturation : float, optional
        Saturation level (counts).
    xy0 : (int, int)
        Parent-frame origin of ``image`` (the model's grid nodes are in parent pixels).
    source : str
        Names the image in messages and in the model's ``source``.

    Raises
    ------
    PsfError
        No usable star at all.
    """
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    badm = (np.zeros(img.shape, bool) if bad is None else np.asarray(bad, bool)) | ~np.isfinite(img)
    satm = np.zeros(img.shape, bool) if saturated is None else np.asarray(saturated, bool)
    stars, info = find_psf_stars(img, badm, saturated=satm, saturation=saturation, config=config)
    used = stars[stars["reason"] == ""]
    report: dict = {"origin": "estimated", "stars_found": info["found"], "stars_used": int(len(used)),
                    "rejected": info["rejected"], "stamp_size": info.get("stamp_size"),
                    "r50_locus": info.get("r50_locus"), "locus_contrast": info.get("locus_contrast"),
                    "locus_from": info.get("locus_from")}
    doubtful = None
    if info.get("locus_from") == "densest (doubtful)":
        doubtful = (f"{source}: the bright sources' half-light radii show no stellar locus (the densest, "
                    f"{info['r50_locus']:.2f} px, stands {info['locus_contrast']:.1f}× above its neighbours, below "
                    f"{config.locus_min_contrast:g}): a field of galaxies? The PSF may be a galaxy's; give a PSF file")
        log.warning(doubtful)
    if len(used) == 0:
        detail = ", ".join(f"{k}: {v}" for k, v in info["rejected"].items() if v) or "none detected"
        raise PsfError(f"{source}: no star usable for a PSF model ({info['found']} sources found; removed by cut: "
                       f"{detail}); give a PSF file")
    size = int(info["stamp_size"])
    x, y = used["x"].to_numpy(), used["y"].to_numpy()
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    stamps = _stamps(img, ix, iy, size // 2).astype(np.float64) - used["background"].to_numpy()[:, None, None]
    weights = (~_stamps(badm | satm, ix, iy, size // 2)).astype(np.float64)
    # each star's own sky, from the outer ring of its stamp: the mesh level is a few percent of σ off
    # locally, and over a stamp of 8 FWHM that is percents of a star's flux
    h = size // 2
    g = np.arange(-h, h + 1)
    ring = (np.hypot(g[None, :], g[:, None]) >= h - 2.0)[None] & (weights > 0)
    ring_sky = np.array([np.median(st[m]) if m.sum() >= 8 else 0.0 for st, m in zip(stamps, ring)])
    stamps = (stamps - ring_sky[:, None, None]) * weights
    x0, y0 = xy0
    if len(used) < config.min_stars:
        psf, chi2 = fit_moffat(stamps, weights, x - ix, y - iy, fwhm_guess=info["fwhm_guess"],
                               noise=float(np.median(used["noise"])))
        msg = (f"{source}: only {len(used)} usable star(s) (an empirical PSF needs {config.min_stars}); "
               f"using a Moffat fit (FWHM {psf.fwhm():.2f} px, beta {psf.beta:.2f})")
        log.warning(msg)
        report.update(model="moffat", reduced_chi2=chi2, warning=msg)
    else:
        psf, model_report = _empirical_psf(stamps, weights, used, shape=(ny, nx), xy0=xy0, config=config,
                                           source=source)
        report.update(model_report)
    if doubtful is not None:
        report["warning"] = f"{report['warning']}; {doubtful}" if report.get("warning") else doubtful
    report.update(describe_psf(psf, (x0, x0 + nx, y0, y0 + ny)))
    top = min(len(used), 200)
    report["fit_residual_ratio"] = _residual_ratio(stamps[:top], weights[:top], used.iloc[:top], psf, xy0,
                                                   report["fwhm_center"])
    return PsfEstimate(psf=psf, report=report, stars=stars, fwhm_guess=info["fwhm_guess"])

