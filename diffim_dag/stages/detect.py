r"""Detection and measurement stage: difference exposure → DiaSource catalogue (``dia_sources.parquet``).

Flow (LSST ``DetectAndMeasureTask``):

1. optional two-pass background on the whole difference (bins 8 then 40); optional cosmic-ray
   masking; the matched-filter significance of the whole difference (float32 FFTs), divided by
   its sigma-clipped standard deviation (``threshold_type="pixel_stdev"``, LSST's default for
   DIA detection: correlated noise the variance plane does not describe does not become false
   detections); the tiles threshold slices of this one image, so tiled == untiled;
2. per tile (core + halo, see :func:`tile_boxes`), :func:`detect_measure_tile`:
   optional cosmic-ray masking; matched-filter detection at ``threshold`` σ of both
   polarities (or thresholding a supplied score image); footprints grown by
   2.4 σ_PSF and merged across polarities; peaks on NO_DATA/BAD/SAT/EDGE dropped;
   measurement (centroid, PSF flux, apertures 12 px and 2×FWHM, S/N, moments, pixel
   flags); dipole fit of merged ± footprints up to 1200 px (jointly with science and
   template when given); forced PSF photometry on the science and the matched template;
3. :func:`stitch_catalogs` concatenates the tiles (a source belongs to the tile whose
   core holds its primary peak; duplicates by peak position are dropped);
4. sky sources (positions avoiding detections and bad pixels), measured the same way
   at fixed positions and flagged ``sky_source``;
5. ids, visit/detector, RA/Dec (and their errors) through the WCS; rows without a
   finite centroid are dropped.

The per-tile function is pure (numpy arrays and PSF models in, DataFrame out), so the
graph builder can map it over tiles as Dask tasks; :func:`detect_and_measure` runs the
same tiles eagerly.  The science parameters are those of ``DetectionConfig`` (config.py, the
pipeline's ``detection:`` section, one set of defaults); :class:`DetectMeasureConfig` adds how a run
tiles them (tile size, halo, FFT threads) and resolves ``systematic_radius="kernel"``.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..config import DetectionConfig
from ..errors import ConfigError
from ..exposure import Exposure
from ..kernels import detection as det
from ..kernels.dipole import DIPOLE_COLUMNS, empty_dipole, fit_dipoles
from ..kernels.maskops import GoodPixels, bits_of, has_bits, lacks_bits
from ..kernels.measure import DEFAULT_EXCLUDED_PLANES, forced_psf_flux, measure_sources
from ..masks import DEFAULT_MASK_PLANES
from ..memory import map_on_threads
from ..psf import Psf
from .dia_schema import DIA_SOURCE_COLUMNS, _conform, empty_dia_sources, read_dia_sources, write_dia_sources
from .sky_sources import _sky_to_radec, place_sky_sources

__all__ = [
    "DetectMeasureConfig",
    "DIA_SOURCE_COLUMNS",
    "TileResult",
    "tile_boxes",
    "detect_measure_tile",
    "DetectionInputs",
    "prepare_detection",
    "detect_tiles",
    "finish_catalog",
    "stitch_catalogs",
    "place_sky_sources",
    "detect_and_measure",
    "empty_dia_sources",
    "write_dia_sources",
    "read_dia_sources",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DetectMeasureConfig(DetectionConfig):
    r"""Detection and measurement on a difference image.

    Attributes
    ----------
    threshold : float
        Detection threshold in matched-filter σ (both polarities).
    footprint_grow_sigma : float
        Footprints grown by ``ceil(footprint_grow_sigma × σ_PSF)`` pixels.
    bad_peak_mask_planes : tuple of str
        Peaks on these planes are dropped before measuring.
    no_data_mask_planes : tuple of str
        Pixels on these planes carry no difference: zero weight in the matched filter and never
        part of a footprint.  EDGE is among them by default: it marks where the PSF-matching kernel
        reached past the template, so its values are not a difference (LSST excludes it from
        detection too); a source next to it is measured on the valid pixels only.
    score_excluded_mask_planes : tuple of str
        A method's score (ZOGY, the pre-convolution score) is not detected on these planes of the score's
        own mask (:func:`~diffim_dag.stages.zogy.score_significance`): there it took the values both methods
        fill saturated, bad and missing input pixels with, spread by the filters that made it.
    n_sky_sources : int
        Sky sources to place (0: none).
    sky_source_seed : int
        Seed of the sky-source placement.
    subtract_background : bool
        Two-pass background subtraction on the difference (bins ``background_bin_sizes``).
    background_bin_sizes : (int, int)
    mask_cosmic_rays : bool
        Find cosmic rays on the difference; their pixels get plane CR and zero weight.
    aperture_radius : float
        Radius (px) of the fixed aperture (the other is 2×FWHM).
    max_dipole_area : int
        Merged ± footprints up to this many pixels get a dipole fit.
    dipole_direct_weight : float
        Weight of the science/template residuals relative to the difference.
    tile_size : int or None
        Core side of the tiles (None: one tile, the whole image).
    halo : int or None
        Halo around each core (None: :func:`~diffim_dag.kernels.detection.required_halo`).
    fft_workers : int
        FFT threads for the matched filter (keep 1 inside Dask workers; -1: all cores).
    threshold_type : {'pixel_stdev', 'variance'}
        ``'pixel_stdev'`` (LSST ``DetectAndMeasureTask``'s default): the threshold is in units of
        the sigma-clipped standard deviation of the matched-filter significance over the good
        pixels of the whole image, so that noise the variance plane does not describe (correlated
        noise of resampled/drizzled inputs) does not turn into false detections.  ``'variance'``:
        in units of the propagated variance alone.
    systematic_fraction : float or 'auto'
        Fractional systematic error :math:`\epsilon` of the difference at static sources (kernel
        and PSF mismatch).  The matched-filter variance becomes
        :math:`s^2 V_S + \epsilon^2 M_S^2` with :math:`M_S` the matched-filtered matched template,
        so a residual that is a fixed fraction of a bright galaxy's or star's flux is not taken for
        a transient.  ``'auto'``: measured on the bright static peaks of the matched template
        (:func:`~diffim_dag.kernels.detection.systematic_fraction`; 0 when their residuals are
        consistent with noise; the default); a number fixes it; 0 (LSST's behaviour) turns it off.
        It trades sensitivity to small fractional variability of bright sources for fewer false
        detections on their residuals.  Only the matched-filter path
        (not a score supplied by ZOGY or pre-convolution) uses it, and only with a template.
    systematic_min_snr : float
        Smallest matched-filter S/N (in the matched template) of the peaks that measure it.
    systematic_radius : int
        Reach (px) of a static source's systematic residual: :math:`M_S` in the variance term is
        replaced by the largest :math:`|M_S|` within this Chebyshev radius
        (:func:`~diffim_dag.kernels.detection.local_abs_max`), so that the mismatch residuals in
        a bright source's wings (rings, rotated diffraction spikes, where :math:`M_S` itself is
        small) are weighed against the source's core.  0 (the default): :math:`M_S` at the pixel.
    """

    tile_size: int | None = None  # (here one tile by default; the pipeline's is :class:`DetectionConfig`'s)
    halo: int | None = None
    fft_workers: int = 1

    def __post_init__(self):
        super().__post_init__()
        n = type(self).__name__

        def check(ok, fld, msg):
            if not ok:
                raise ConfigError(f"{n}.{fld} {msg}")

        check(not isinstance(self.systematic_radius, str), "systematic_radius",
              "must be resolved to pixels here (DetectMeasureConfig.from_detection_config)")
        check(self.halo is None or self.halo >= 0, "halo", "must be None or ≥ 0")
        check(self.fft_workers == -1 or self.fft_workers >= 1, "fft_workers", "must be -1 or ≥ 1")

    @classmethod
    def from_detection_config(cls, config, *, kernel_size: int | None = None, **changes) -> DetectMeasureConfig:
        """Build from :class:`diffim_dag.config.DetectionConfig` (plus any field of this class).

        ``kernel_size`` (the PSF-matching kernel's side) resolves ``systematic_radius="kernel"``
        to its half-width; without it that radius is 0.
        """
        radius = config.systematic_radius
        if radius == "kernel":
            radius = int(kernel_size) // 2 if kernel_size else 0
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(DetectionConfig)}
        for k in ("bad_peak_mask_planes", "no_data_mask_planes", "score_excluded_mask_planes", "background_bin_sizes"):
            fields[k] = tuple(fields[k])
        return cls(**{**fields, "systematic_radius": int(radius), **changes})



# --------------------------------------------------------------------------- tiles


def tile_boxes(
    bbox: tuple[int, int, int, int], tile_size: int | None, halo: int
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """``(core_bbox, halo_bbox)`` pairs whose cores partition ``bbox`` (parent pixels, [min, max)).

    Cores are ``tile_size``² (the last row/column ragged); halo boxes are the cores grown
    by ``halo`` and clipped to ``bbox``.
    """
    x0, x1, y0, y1 = bbox
    if tile_size is None:
        return [(bbox, bbox)]
    out = []
    for ty in range(y0, y1, tile_size):
        for tx in range(x0, x1, tile_size):
            core = (tx, min(tx + tile_size, x1), ty, min(ty + tile_size, y1))
            hb = (max(core[0] - halo, x0), min(core[1] + halo, x1), max(core[2] - halo, y0), min(core[3] + halo, y1))
            out.append((core, hb))
    return out


@dataclass
class TileResult:
    """What one tile returns: the measured catalogue (rows aligned with ``footprints``)."""

    catalog: pd.DataFrame
    footprints: list = field(default_factory=list)


def _planes_good(mask, planes, excluded):
    return lacks_bits(mask, bits_of(planes, excluded))


def _tile_mask(image, variance, mask, psf_image, config, planes, find_cosmic_rays):
    """``(mask, no-data planes, excluded planes)`` of a tile: cosmic rays found on it when asked
    (CR plane), and the planes that get zero weight in detection and in measurement."""
    mask = np.asarray(mask)
    no_data = list(config.no_data_mask_planes)
    excluded = list(DEFAULT_EXCLUDED_PLANES)
    if config.mask_cosmic_rays and "CR" in planes:
        if find_cosmic_rays is None or find_cosmic_rays:
            cr = det.find_cosmic_rays(image, variance, psf_image, bad=_planes_good(mask, planes, ["NO_DATA"]) == 0)
            mask = mask | np.where(cr, np.int32(1 << planes["CR"]), np.int32(0)).astype(mask.dtype)
        no_data.append("CR")
        excluded.append("CR")
    return mask, no_data, excluded


def _tile_footprints(image, variance, mask, *, psf, origin, core_bbox=None, parent_bbox=None,
                     config=DetectMeasureConfig(), mask_planes=None, score=None, find_cosmic_rays=None, psf_sigma=None):
    """The detection half of :func:`detect_measure_tile` (same arguments, without the direct images):
    ``(footprints, mask with CR, excluded planes)``."""
    planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
    ny, nx = image.shape
    x0, y0 = origin
    core = core_bbox if core_bbox is not None else (x0, x0 + nx, y0, y0 + ny)
    cx, cy = 0.5 * (core[0] + core[1] - 1), 0.5 * (core[2] + core[3] - 1)
    psf_image = psf.kernel_image(cx, cy)
    psf_sigma = psf.sigma(cx, cy) if psf_sigma is None else float(psf_sigma)
    mask, no_data, excluded = _tile_mask(image, variance, mask, psf_image, config, planes, find_cosmic_rays)
    footprints = det.detect_tile(
        image, variance, mask, psf_image, origin=origin, threshold=config.threshold, psf_sigma=psf_sigma,
        grow_sigma=config.footprint_grow_sigma, core_bbox=core, parent_bbox=parent_bbox, mask_planes=planes,
        bad_peak_planes=config.bad_peak_mask_planes, no_data_planes=no_data, score=score,
        workers=config.fft_workers,
    )
    return footprints, mask, excluded


def detect_measure_tile(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    *,
    psf: Psf,
    origin: tuple[int, int],
    core_bbox: tuple[int, int, int, int] | None = None,
    parent_bbox: tuple[int, int, int, int] | None = None,
    config: DetectMeasureConfig = DetectMeasureConfig(),
    mask_planes: Mapping[str, int] | None = None,
    science: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    template: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    science_psf: Psf | None = None,
    template_psf: Psf | None = None,
    score: np.ndarray | None = None,
    find_cosmic_rays: bool | None = None,
    psf_sigma: float | None = None,
    footprints: Sequence[det.Footprint] | None = None,
) -> TileResult:
    """Detect, measure, fit dipoles and force-photometer the sources of one tile (with halo).

    Parameters
    ----------
    image, variance, mask : ndarray
        The difference on the tile's halo box, ``image[0, 0]`` at parent ``origin``.
    psf : Psf
        PSF of the difference; the detection kernel is rendered at the core's centre.
    core_bbox, parent_bbox : (x_min, x_max, y_min, y_max)
        The tile's core and the whole image (parent pixels); see
        :func:`~diffim_dag.kernels.detection.detect_tile`.
    science, template : (image, variance, mask), optional
        Direct images on the same box: joint dipole fits and forced photometry.
    score : ndarray, optional
        Precomputed detection significance on the same box (ZOGY, or the whole-image
        significance :func:`detect_and_measure` computes).
    find_cosmic_rays : bool, optional
        Find cosmic rays on this tile (default ``config.mask_cosmic_rays``); ``False`` when the
        caller already set the CR plane (CR pixels are still excluded when
        ``config.mask_cosmic_rays``).
    psf_sigma : float, optional
        PSF width for the footprint growth (default: the PSF's at the core's centre;
        :func:`prepare_detection` passes the whole image's, so every tile grows alike).
    footprints : sequence of Footprint, optional
        Measure these (parent coordinates, inside the box) instead of detecting: the footprints a
        search on this box has already found (:func:`complete_truncated`).

    Returns
    -------
    TileResult
        Sources whose primary peak lies in the core (or the given footprints).
    """
    planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
    if footprints is None:
        footprints, mask, excluded = _tile_footprints(
            image, variance, mask, psf=psf, origin=origin, core_bbox=core_bbox, parent_bbox=parent_bbox,
            config=config, mask_planes=planes, score=score, find_cosmic_rays=find_cosmic_rays, psf_sigma=psf_sigma)
    else:
        ny, nx = image.shape
        centre = (origin[0] + 0.5 * (nx - 1), origin[1] + 0.5 * (ny - 1))
        mask, _, excluded = _tile_mask(image, variance, mask, psf.kernel_image(*centre), config, planes,
                                       find_cosmic_rays)
        footprints = list(footprints)
    base = det.footprints_table(footprints)
    xs = base["peak_x"].to_numpy(dtype=np.float64)
    ys = base["peak_y"].to_numpy(dtype=np.float64)
    good = _planes_good(mask, planes, excluded)
    meas = measure_sources(image, variance, mask, psf, x=xs, y=ys, footprints=footprints, origin=origin,
                           mask_planes=planes, aperture_radius=config.aperture_radius, excluded_planes=excluded,
                           good=good)
    # the direct images' good pixels at the stamps the dipole fits and forced photometry read, not as whole planes
    sci_g = tmp_g = None
    if science is not None:
        sci_g = GoodPixels(science[2], bits_of(planes, DEFAULT_EXCLUDED_PLANES))
    if template is not None:
        tmp_g = GoodPixels(template[2], bits_of(planes, DEFAULT_EXCLUDED_PLANES))
    joint = science is not None and template is not None
    rows = [empty_dipole() for _ in footprints]
    fit = [i for i, fp in enumerate(footprints) if fp.has_both_polarities and fp.area <= config.max_dipole_area]
    if fit:
        fitted = fit_dipoles(image, variance, good, psf, [footprints[i] for i in fit], origin=origin,
                             science=(science[0], science[1], sci_g) if joint else None,
                             template=(template[0], template[1], tmp_g) if joint else None,
                             direct_weight=config.dipole_direct_weight)
        for i, row in zip(fit, fitted):
            rows[i] = row
    dip = pd.DataFrame({k: np.array([r[k] for r in rows], dtype=v) for k, v in DIPOLE_COLUMNS.items()})
    cat = pd.concat([base, meas, dip], axis=1)
    # dipoles: the centroid is the flux-weighted centre of the lobes
    isd = cat["is_dipole"].to_numpy(dtype=bool)
    if isd.any():  # (column arrays: pandas' .loc took 3 ms a column)
        for a, b in (("x", "dipole_x"), ("y", "dipole_y"), ("x_err", "dipole_x_err"), ("y_err", "dipole_y_err")):
            cat[a] = np.where(isd, cat[b].to_numpy(), cat[a].to_numpy())
        cat["centroid_flag"] = cat["centroid_flag"].to_numpy(dtype=bool) & ~isd
    _forced(cat, origin, science, science_psf, sci_g, "science")
    _forced(cat, origin, template, template_psf, tmp_g, "template")
    cat["sky_source"] = False
    return TileResult(catalog=cat, footprints=list(footprints))


def _forced(cat, origin, planes3, psf, good, prefix):
    n = len(cat)
    if planes3 is None or psf is None:
        cat[f"{prefix}_forced_flux"] = np.full(n, np.nan)
        cat[f"{prefix}_forced_flux_err"] = np.full(n, np.nan)
        cat[f"{prefix}_forced_flag"] = np.ones(n, dtype=bool)
        return
    f, e, fl = forced_psf_flux(planes3[0], planes3[1], good, psf, cat["x"].to_numpy(), cat["y"].to_numpy(),
                               origin=origin)
    cat[f"{prefix}_forced_flux"], cat[f"{prefix}_forced_flux_err"], cat[f"{prefix}_forced_flag"] = f, e, fl


def stitch_catalogs(results: Sequence[TileResult]) -> TileResult:
    """Concatenate tile results, dropping duplicate primary peaks, sorted by peak ``(y, x)``."""
    cats = [r.catalog for r in results if len(r.catalog)]
    fps = [fp for r in results for fp in r.footprints]
    if not cats:
        return TileResult(catalog=results[0].catalog.iloc[0:0] if results else pd.DataFrame(), footprints=[])
    cat = pd.concat(cats, ignore_index=True)
    cat["_i"] = np.arange(len(cat))
    cat = cat.drop_duplicates(subset=["peak_x", "peak_y"], keep="first")
    cat = cat.sort_values(["peak_y", "peak_x"], kind="stable")
    order = cat["_i"].to_numpy()
    return TileResult(catalog=cat.drop(columns="_i").reset_index(drop=True), footprints=[fps[i] for i in order])



def _detect_measure_task(kwargs: dict) -> TileResult:
    return detect_measure_tile(**kwargs)


@dataclass(eq=False)
class DetectionInputs:
    """The whole-image part of detection (:func:`prepare_detection`), which every tile slices.

    Attributes
    ----------
    image : ndarray
        The difference plane as it is (no copy), or float64 and background-subtracted when
        ``config.subtract_background``.
    variance, mask : ndarray
        Its variance and mask (CR plane set when cosmic rays were masked on the whole image).
    score : ndarray or None
        The detection significance of the whole image: the matched filter, or the score the
        caller supplied, divided by its clipped σ under ``threshold_type="pixel_stdev"``.
    significance_stdev : float or None
        The clipped σ the matched-filter significance was divided by.
    mask_planes : dict
    psf : Psf
        The difference PSF; ``psf_image`` its image at the centre.
    bbox : (x_min, x_max, y_min, y_max)
        The difference's parent box; ``shape`` and ``xy0`` as the exposure's.
    halo : int
        Halo of the tiles (:func:`tile_boxes`).
    config : DetectMeasureConfig
    science, template : (image, variance, mask) or None
        The direct images for dipole fits and forced photometry; ``science_psf``/``template_psf``.
    find_cosmic_rays : bool or None
        Passed to every tile (False when the whole image was already searched).
    info, wcs
        The difference's metadata (visit/detector ids, RA/Dec of the catalogue).
    seconds : float
        Wall time of :func:`prepare_detection`.
    systematic : dict or None
        ``{"fraction": ε, "n_static_peaks": n}`` of the matched-filter variance (see
        ``DetectMeasureConfig.systematic_fraction``); None when not applied.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    score: np.ndarray | None
    significance_stdev: float | None
    mask_planes: dict
    psf: Psf
    psf_image: np.ndarray
    bbox: tuple[int, int, int, int]
    shape: tuple[int, int]
    xy0: tuple[int, int]
    halo: int
    config: DetectMeasureConfig
    science: tuple | None = None
    template: tuple | None = None
    science_psf: Psf | None = None
    template_psf: Psf | None = None
    find_cosmic_rays: bool | None = None
    info: object = None
    wcs: object = None
    seconds: float = 0.0
    systematic: dict | None = None
    psf_sigma: float | None = None

    def tiles(self) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
        """``(core_bbox, halo_bbox)`` of every tile, in :func:`tile_boxes` order (rows, then columns)."""
        return tile_boxes(self.bbox, self.config.tile_size, self.halo)

    def tile_kwargs(self, index: int) -> dict:
        """The keyword arguments of :func:`detect_measure_tile` for tile ``index`` (views, no copies)."""
        core, hb = self.tiles()[index]
        return self.window_kwargs(core, hb)

    def window_kwargs(self, core: tuple[int, int, int, int], hb: tuple[int, int, int, int]) -> dict:
        """The keyword arguments of :func:`detect_measure_tile` for core box ``core`` seen through the
        parent box ``hb`` (which contains it; views, no copies)."""
        x0, y0 = self.xy0
        sl = (slice(hb[2] - y0, hb[3] - y0), slice(hb[0] - x0, hb[1] - x0))
        return dict(
            image=self.image[sl], variance=self.variance[sl], mask=self.mask[sl], psf=self.psf,
            origin=(hb[0], hb[2]), core_bbox=core, parent_bbox=self.bbox, config=self.config,
            mask_planes=self.mask_planes,
            science=None if self.science is None else tuple(a[sl] for a in self.science),
            template=None if self.template is None else tuple(a[sl] for a in self.template),
            science_psf=self.science_psf, template_psf=self.template_psf,
            score=None if self.score is None else self.score[sl],
            find_cosmic_rays=self.find_cosmic_rays, psf_sigma=self.psf_sigma,
        )

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        arrays = [self.image, self.variance, self.mask, self.score, *(self.science or ()), *(self.template or ())]
        return 1024 + sum(a.nbytes for a in arrays if a is not None)


def _significance_stdev(score, mask: np.ndarray, bits: int, usable) -> float | None:
    """Clipped σ of ``score`` over its good pixels — without ``bits`` in ``mask`` and where ``usable(s)`` (a
    boolean array for the slice ``s`` of the flattened planes) holds — from the good ones of every ``step``-th
    pixel (≤ ~1e6 values: plenty for one σ, and no gather of the whole frame); None when it is not a positive
    number.  The good pixels are counted in blocks and tested at the sampled pixels only: no whole-frame boolean
    plane (a 4096² frame's four were 16 MB of fresh pages each, on the critical path).  ``score``: a plane, or a
    function giving the flattened score's values on a slice (a score never made as a plane)."""
    flat_mask = mask.reshape(-1)  # (a view of the contiguous plane)
    values = score if callable(score) else score.reshape(-1).__getitem__
    bits = flat_mask.dtype.type(bits)

    def good(s: slice) -> np.ndarray:
        return ((flat_mask[s] & bits) == 0) & usable(s)

    block = 1 << 20
    n_good = sum(int(np.count_nonzero(good(slice(i, i + block)))) for i in range(0, flat_mask.size, block))
    sample = slice(None, None, max(1, n_good // 1_000_000))
    vals = values(sample)[good(sample)]
    sigma = det.clipped_stdev(vals) if vals.size else float("nan")
    return sigma if np.isfinite(sigma) and sigma > 0 else None


def _static_sources(template, mask, planes: dict, no_data: list, nodata, psf_image, config: DetectMeasureConfig):
    """``[M_S, peaks]``: the template's matched filter and, for ``systematic_fraction="auto"``, its bright static
    peaks ``(iy, ix, M_S there)`` (None for a fixed fraction), whose residuals in the difference measure ε (a list,
    which :func:`_systematic_term` empties: the plane is then held by nothing else)."""
    m_s, mv_s = det.matched_filter(template[0], template[1], psf_image, bad=nodata, workers=config.fft_workers)
    peaks = None
    if config.systematic_fraction == "auto":
        bad_pk = has_bits(mask, bits_of(planes, list(config.bad_peak_mask_planes) + no_data + ["SAT"]
                                 + [p for p in ("SAT_TEMPLATE", "INJECTED", "INJECTED_TEMPLATE") if p in planes]))
        iy, ix = det.bright_static_peaks(m_s, mv_s, bad_pk, min_snr=config.systematic_min_snr,
                                         border=psf_image.shape[0] // 2, workers=config.fft_workers)
        del bad_pk
        peaks = (iy, ix, m_s[iy, ix])
    del mv_s
    return [m_s, peaks]


def _systematic_term(static, smoothed, svar, factor: float, config: DetectMeasureConfig):
    """``(ε² M_S², report)`` from :func:`_static_sources`' result and the difference's matched filter ``smoothed``
    (variance ``svar``, significance σ ``factor``): ε measured at the static peaks (or the configured fraction),
    the plane made in place of ``M_S`` (None when ε = 0)."""
    m_s, peaks = static
    static.clear()  # (M_S is this function's alone: with systematic_radius it is freed as its maximum is made)
    if peaks is not None:
        iy, ix, mpk = peaks
        epsilon = det.systematic_fraction(smoothed[iy, ix] / mpk, factor * np.sqrt(svar[iy, ix]) / mpk)
        n_peaks = int(iy.size)
    else:
        epsilon, n_peaks = float(config.systematic_fraction), None
    report = {"fraction": float(epsilon), "n_static_peaks": n_peaks}
    if not epsilon > 0:
        return None, report
    if config.systematic_radius > 0:
        m_s = det.local_abs_max(m_s, config.systematic_radius)
    np.multiply(m_s, m_s, out=m_s)
    m_s *= epsilon * epsilon
    return m_s, report


def _systematic_inflation(img, var, mask, planes: dict, template, psf_image, config: DetectMeasureConfig):
    r"""``(f, report)``: the factor :math:`f = \sqrt{1 + ε^2 M_S^2 / (s^2 V_S)}` (a float32 plane; None when
    ε = 0) by which a method's score (ZOGY's S_corr, the pre-convolution score) is divided, so that it carries the
    same systematic term as the difference's matched filter: :math:`ε^2 M_S^2` inflates the difference's own
    matched-filter noise :math:`s^2 V_S` by that factor at the template's static sources, ε measured the same way
    on the difference.  Without it, the residuals of bright stars that every PSF model leaves were DiaSources of
    the score methods only (a null pair of raw frames: 12 with ZOGY, 10 of them negative at stars of
    7 000–48 000 counts, against 5 with AL).  At most three planes at once (the score's σ is measured on sampled
    pixels, with no significance plane)."""
    no_data = list(config.no_data_mask_planes)
    nodata = has_bits(mask, bits_of(planes, no_data))
    static = _static_sources(template, mask, planes, no_data, nodata, psf_image, config)
    smoothed, svar = det.matched_filter(img, var, psf_image, bad=nodata, workers=config.fft_workers)
    del nodata
    factor = 1.0
    if config.threshold_type == "pixel_stdev":
        flat_sm, flat_svar = smoothed.reshape(-1), svar.reshape(-1)

        def own(s: slice) -> np.ndarray:  # the difference's own significance at the sampled pixels
            with np.errstate(divide="ignore", invalid="ignore"):
                return flat_sm[s] / np.sqrt(flat_svar[s])

        factor = _significance_stdev(own, mask, bits_of(planes, list(config.bad_peak_mask_planes) + no_data),
                                     lambda s: flat_svar[s] > 0) or 1.0
    m_s, report = _systematic_term(static, smoothed, svar, factor, config)
    del smoothed, static
    if m_s is None:
        return None, report
    svar *= factor * factor
    good = svar > 0
    np.divide(m_s, svar, out=m_s, where=good)
    m_s[~good] = 0.0  # (no data: the score is 0 there anyway)
    del good, svar
    m_s += 1.0
    np.sqrt(m_s, out=m_s)
    return m_s, report


def prepare_detection(
    difference: Exposure,
    *,
    science: Exposure | None = None,
    template: Exposure | None = None,
    config: DetectMeasureConfig = DetectMeasureConfig(),
    score: np.ndarray | None = None,
) -> DetectionInputs:
    """Step 1 of the module doc on the whole image: background, cosmic rays, significance, halo.

    Parameters are those of :func:`detect_and_measure`; the result feeds :func:`detect_tiles`
    (any subset of the tiles, e.g. one graph task per tile) and :func:`finish_catalog`.
    """
    import time

    t0 = time.perf_counter()
    img, var, msk = difference.arrays()  # no float64 copy: every consumer casts its stamps/tiles itself
    planes = difference.mask_planes.as_dict()
    psf = difference.psf
    if psf is None:
        raise ConfigError("detect_and_measure: the difference exposure has no PSF")
    bbox = difference.bbox
    cx, cy = difference.center
    psf_image = psf.kernel_image(cx, cy)
    if config.subtract_background:
        img = np.asarray(img, dtype=np.float64)
        bad = has_bits(msk, bits_of(planes, ["NO_DATA", "BAD", "SAT", "EDGE"]))
        img = img - det.two_pass_background(img, var, bad, psf_image, threshold=config.threshold,
                                            bin_sizes=tuple(config.background_bin_sizes), psf_sigma=psf.sigma(cx, cy))
    sci = science.arrays() if science is not None else None
    tmp = template.arrays() if template is not None else None
    find_crs = None
    significance_stdev = None
    systematic = None
    if score is None:
        # the significance of the whole image, once: the pixel_stdev threshold needs its global
        # clipped σ, and every tile then thresholds the same values (tiled == untiled)
        if config.mask_cosmic_rays and "CR" in planes:
            nd = has_bits(msk, bits_of(planes, ["NO_DATA"]))
            cr = det.find_cosmic_rays(img, var, psf_image, bad=nd)
            del nd
            msk = msk.copy()  # (the difference's own mask stays as it is)
            msk[cr] |= msk.dtype.type(1 << planes["CR"])
            del cr
            find_crs = False
        no_data = list(config.no_data_mask_planes) + (["CR"] if config.mask_cosmic_rays else [])
        nodata = has_bits(msk, bits_of(planes, no_data))
        systematic_term = tmp is not None and config.systematic_fraction != 0
        # ν = S / sqrt(s² V_S + ε² M_S²): residuals that scale with the static source.  In turn, the template is
        # filtered first and its bright static peaks found, so that its variance is gone before the difference's
        # planes are made (a 4096² image: 0.13 GB less at this step)
        stdev_bits = bits_of(planes, list(config.bad_peak_mask_planes) + no_data)

        def own_significance(workers: int):
            """The difference's matched filter, its significance and, for ``pixel_stdev``, the clipped σ of that
            significance: none of them needs the template."""
            smoothed, svar = det.matched_filter(img, var, psf_image, bad=nodata, workers=workers)
            score = det.significance_image(smoothed, svar, workers=workers)
            sigma = None
            if config.threshold_type == "pixel_stdev":
                flat_svar = svar.reshape(-1)
                sigma = _significance_stdev(score, msk, stdev_bits, lambda s: flat_svar[s] > 0)
            return smoothed, svar, score, sigma

        if systematic_term and config.fft_workers > 1:
            # with the machine's cores: the template's filter and the difference's at once, a thread each (each
            # alone left a core idle in its whole-frame NumPy passes between the FFT blocks; the same values, which
            # the blocks' threads do not change; the in-process 4096² run's peak, elsewhere, the same).  The
            # difference's thread also makes the significance and its σ, while the other finds the template's
            # static peaks: they had waited for those, on one core
            solo = dataclasses.replace(config, fft_workers=1)
            static, (smoothed, svar, score, significance_stdev) = map_on_threads(
                lambda f: f(), [lambda: _static_sources(tmp, msk, planes, no_data, nodata, psf_image, solo),
                                lambda: own_significance(1)],
                config.fft_workers)
        else:
            static = _static_sources(tmp, msk, planes, no_data, nodata, psf_image, config) if systematic_term else None
            smoothed, svar, score, significance_stdev = own_significance(config.fft_workers)
        factor = significance_stdev or 1.0
        if static is not None:
            m_s, systematic = _systematic_term(static, smoothed, svar, factor, config)
            if m_s is not None:
                # total = factor² V_S + ε² M_S², in place (the same products and sum; no 4 full-frame temporaries)
                del score
                svar *= factor * factor
                svar += m_s
                score = det.significance_image(smoothed, svar, workers=config.fft_workers)
            elif significance_stdev is not None:
                score /= significance_stdev
            del m_s, static
        elif significance_stdev is not None:
            score /= significance_stdev
        del svar, smoothed
    else:
        if config.threshold_type == "pixel_stdev":
            # a score supplied by the method (ZOGY S_corr, pre-convolution) is thresholded in the same
            # units: its clipped σ over the good pixels (warped or drizzled inputs leave it a few % above 1)
            given = np.ascontiguousarray(score)  # (flattened below without a copy, here and in the σ)
            flat = given.reshape(-1)
            significance_stdev = _significance_stdev(
                given, msk, bits_of(planes, list(config.bad_peak_mask_planes) + list(config.no_data_mask_planes)),
                lambda s: np.isfinite(flat[s]) & (flat[s] != 0))
        inflation = None
        if tmp is not None and config.systematic_fraction != 0:
            inflation, systematic = _systematic_inflation(img, var, msk, planes, tmp, psf_image, config)
        if inflation is not None:
            # the score in units of its σ and of the systematic term at once, into the inflation's plane
            if significance_stdev is not None:
                inflation *= np.float32(significance_stdev)
            score = np.divide(score, inflation, out=inflation)
            del inflation
        elif significance_stdev is not None:
            score = np.asarray(score, dtype=np.float64) / significance_stdev
    halo = config.halo if config.halo is not None else det.required_halo(psf_image.shape[0],
                                                                          measure_radius=config.aperture_radius + 2)
    return DetectionInputs(
        image=img, variance=var, mask=msk, score=score, significance_stdev=significance_stdev, mask_planes=planes,
        psf=psf, psf_image=psf_image, bbox=bbox, shape=difference.shape, xy0=difference.xy0, halo=halo,
        config=config, science=sci, template=tmp, science_psf=None if science is None else science.psf,
        template_psf=None if template is None else template.psf, find_cosmic_rays=find_crs,
        info=difference.info, wcs=difference.wcs, seconds=time.perf_counter() - t0, systematic=systematic,
        psf_sigma=float(psf.sigma(cx, cy)),
    )


def detect_tiles(inputs: DetectionInputs, indices: Sequence[int] | None = None) -> dict[int, TileResult]:
    """Step 2 of the module doc on the tiles ``indices`` (all when None): ``{tile index: TileResult}``."""
    if indices is None:
        indices = range(len(inputs.tiles()))
    return {int(k): detect_measure_tile(**inputs.tile_kwargs(int(k))) for k in indices}


def complete_truncated(inputs: DetectionInputs, stitched: TileResult) -> TileResult:
    """Replace the sources whose footprint a tile cut (``footprint_truncated``) by the whole source.

    A footprint larger than the tile halo (a saturated star, a big galaxy's residual, a satellite
    streak) reaches the inexact border of the tiles that hold its pieces.  Around each piece the
    whole-image inputs are searched again (detection only) through a window grown by the halo, then
    on the sides where the footprint still reaches a cut edge by 4× as much each time, until the
    footprint that holds the piece's primary peak is no longer cut:
    that footprint is the untiled one (same significance values, growth and labels).  Pieces of one
    source collapse onto its primary peak, and only that source is measured (a one-pixel core at
    the peak).  ``stitched`` comes from :func:`stitch_catalogs`.
    """
    cat = stitched.catalog
    if not len(cat) or not cat["footprint_truncated"].any():
        return stitched
    bx0, bx1, by0, by1 = inputs.bbox

    def around(box, grow):
        return (max(box[0] - grow, bx0), min(box[1] + grow, bx1), max(box[2] - grow, by0), min(box[3] + grow, by1))

    def widen(window, box, grow):
        """A window around ``box`` that reaches ``grow`` farther on the sides where ``box`` came within a
        halo of a cut edge of ``window`` (a long streak or bad column grows along itself only)."""
        cut = (box[0] - window[0] < halo and window[0] > bx0, window[1] - box[1] < halo and window[1] < bx1,
               box[2] - window[2] < halo and window[2] > by0, window[3] - box[3] < halo and window[3] < by1)
        g = [grow if c else halo for c in cut]
        return (max(box[0] - g[0], bx0), min(box[1] + g[1], bx1), max(box[2] - g[2], by0), min(box[3] + g[3], by1))

    halo = max(int(inputs.halo), 8)
    rows, fps = [], []
    completed: list = []  # the whole footprints found so far: later pieces of them need no search
    for i in np.flatnonzero(cat["footprint_truncated"].to_numpy()):
        fp = stitched.footprints[i]
        px, py = fp.primary
        if any(f.contains(px, py) for f in completed):
            continue
        grow = halo
        whole = None
        hb = around(fp.bbox, halo)
        while True:  # detection only, on ever larger windows, until the footprint is whole
            kw = inputs.window_kwargs(hb, hb)
            for direct in ("science", "template", "science_psf", "template_psf"):
                del kw[direct]
            found, _, _ = _tile_footprints(**kw)
            whole = next((f for f in found if f.contains(px, py)), None)
            if whole is None or not whole.truncated or hb == inputs.bbox:
                break
            grow *= 4
            hb = widen(hb, whole.bbox, grow)
        res = None
        if whole is not None and not whole.truncated:
            # measure that one source, as found, through its box and a halo (the measurement's reach)
            box = around(whole.bbox, halo)
            res = detect_measure_tile(**inputs.window_kwargs(box, box), footprints=[whole])
        if res is None or len(res.catalog) != 1:  # cannot happen for a peak of the whole-image significance
            rows.append(cat.iloc[[i]])
            fps.append(stitched.footprints[i])
            continue
        completed.append(whole)
        rows.append(res.catalog)
        fps.append(res.footprints[0])
    keep = np.flatnonzero(~cat["footprint_truncated"].to_numpy())
    parts = [TileResult(catalog=cat.iloc[keep].reset_index(drop=True),
                        footprints=[stitched.footprints[k] for k in keep])]
    parts += [TileResult(catalog=r.reset_index(drop=True), footprints=[f]) for r, f in zip(rows, fps)]
    return stitch_catalogs(parts)


def finish_catalog(inputs: DetectionInputs, results: Sequence[TileResult]) -> pd.DataFrame:
    """Steps 3–5 of the module doc: stitch the tiles (``results`` in tile order), sky sources, ids, RA/Dec.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`DIA_SOURCE_COLUMNS`; ``attrs["n_dia_sources"]`` counts the real sources,
        ``attrs["sky_source_room"]`` the sky sources the image has room for with no source on it (the ones asked
        for, or fewer on a small image).
    """
    config, planes, psf = inputs.config, inputs.mask_planes, inputs.psf
    img, var, msk = inputs.image, inputs.variance, inputs.mask
    sci, tmp = inputs.science, inputs.template
    x0, y0 = inputs.xy0
    stitched = complete_truncated(inputs, stitch_catalogs(results))
    cat = stitched.catalog
    n_trunc = int(cat["footprint_truncated"].sum()) if len(cat) else 0
    if n_trunc:
        log.warning("%d footprint(s) could not be completed across tile edges", n_trunc)
    parts = [cat] if len(cat) else []
    if config.n_sky_sources > 0:
        fpm = det.footprint_mask(stitched.footprints, inputs.shape, origin=(x0, y0))
        bad = has_bits(msk, bits_of(planes, list(config.bad_peak_mask_planes)))
        place = dict(avoid_radius=inputs.psf_image.shape[0] // 2, origin=(x0, y0), seed=config.sky_source_seed)
        sources = cat[["x", "y"]].to_numpy() if len(cat) else None
        xy = place_sky_sources(config.n_sky_sources, fpm, bad, source_xy=sources, warn=False, **place)
        sky_room = len(xy)
        if sky_room < config.n_sky_sources:
            # how many the image holds with no source on it: a small image (a 256² stamp, a sky-source disc of the
            # PSF's size) has room for fewer than asked, which says nothing about the sources covering it
            blank = place_sky_sources(config.n_sky_sources, np.zeros_like(fpm), bad, warn=False, **place)
            sky_room = max(sky_room, len(blank))
            if len(xy) < sky_room:
                log.warning("placed only %d of %d sky sources: footprints cover the rest of the blank sky (room for "
                            "%d without them)", len(xy), config.n_sky_sources, sky_room)
            else:
                log.info("placed %d of %d sky sources: the image has room for no more (discs of %d px radius)",
                         len(xy), config.n_sky_sources, place["avoid_radius"])
        if len(xy):
            sky = measure_sources(img, var, msk, psf, x=xy[:, 0], y=xy[:, 1], origin=(x0, y0), mask_planes=planes,
                                  fit_centroid=False, aperture_radius=config.aperture_radius)
            for c in ("peak_x", "peak_y"):
                sky[c] = np.rint(xy[:, 0 if c == "peak_x" else 1]).astype(np.int64)
            for k, v in empty_dipole().items():
                sky[k] = v
            excluded = bits_of(planes, DEFAULT_EXCLUDED_PLANES)
            _forced(sky, (x0, y0), sci, inputs.science_psf, None if sci is None else GoodPixels(sci[2], excluded),
                    "science")
            _forced(sky, (x0, y0), tmp, inputs.template_psf, None if tmp is None else GoodPixels(tmp[2], excluded),
                    "template")
            sky["sky_source"] = True
            parts.append(sky)
    out = _conform(pd.concat(parts, ignore_index=True)) if parts else empty_dia_sources()
    out = out[np.isfinite(out["x"]) & np.isfinite(out["y"])].reset_index(drop=True)
    out["id"] = np.arange(1, len(out) + 1, dtype=np.int64)
    info = inputs.info
    out["visit"] = np.int64(-1 if info is None or info.visit is None else info.visit)
    out["detector"] = np.int64(-1 if info is None or info.detector is None else info.detector)
    _sky_to_radec(out, inputs.wcs)
    out = _conform(out)
    n_real = int((~out["sky_source"]).sum())
    out.attrs["n_dia_sources"] = n_real
    out.attrs["sky_source_room"] = sky_room if config.n_sky_sources > 0 else 0
    out.attrs["significance_stdev"] = inputs.significance_stdev
    out.attrs["systematic_fraction"] = None if inputs.systematic is None else inputs.systematic["fraction"]
    if n_real == 0:
        log.warning("no DiaSource detected on the difference (%d sky sources)", len(out))
    return out


def detect_and_measure(
    difference: Exposure,
    *,
    science: Exposure | None = None,
    template: Exposure | None = None,
    config: DetectMeasureConfig = DetectMeasureConfig(),
    score: np.ndarray | None = None,
    map_tiles=None,
) -> pd.DataFrame:
    """Detect and measure DiaSources on a difference exposure, tile by tile.

    :func:`prepare_detection` (whole image) → :func:`detect_measure_tile` per tile →
    :func:`finish_catalog` (stitch, sky sources, ids, RA/Dec); a task graph runs the same three
    steps as separate tasks.

    Parameters
    ----------
    difference : Exposure
        The (decorrelated) difference; its PSF is the detection and measurement PSF.
    science, template : Exposure, optional
        The science and the PSF-matched template on the same pixel grid: joint dipole
        fits and forced photometry (each with its own PSF).
    config : DetectMeasureConfig
    score : ndarray, optional
        A score image to threshold instead of the matched filter (same shape).
    map_tiles : callable, optional
        ``map_tiles(function, list_of_kwargs) -> list of results``: how the per-tile tasks
        (:func:`detect_measure_tile`) run; in turn when None, as Dask tasks with
        :func:`diffim_dag.graph.tile_mapper`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`DIA_SOURCE_COLUMNS`; ``attrs["n_dia_sources"]`` counts the real sources.
    """
    inputs = prepare_detection(difference, science=science, template=template, config=config, score=score)
    tasks = [inputs.tile_kwargs(k) for k in range(len(inputs.tiles()))]
    if map_tiles is None:
        results = [detect_measure_tile(**kw) for kw in tasks]
    else:
        results = list(map_tiles(_detect_measure_task, tasks))
    del tasks
    return finish_catalog(inputs, results)
