"""Pipeline configuration: one frozen, keyword-only dataclass per stage, loaded from YAML.

A pipeline YAML file maps 1:1 onto :class:`PipelineConfig`::

    method: al
    kernel:
      spatial_kernel_order: 1
    subtract:
      mode: auto

Overrides use dotted keys (``-c kernel.spatial_kernel_order=2``); values are
parsed as YAML scalars.  An unknown key is a :class:`~diffim_dag.errors.ConfigError`
naming it and the nearest valid key.  Defaults are LSST's effective production
defaults (``ip_diffim``) where LSST has one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .masks import DEFAULT_MASK_PLANES

__all__ = [
    "PsfEstimationConfig",
    "SkyConfig",
    "CosmicRayConfig",
    "KernelSourceConfig",
    "KernelConfig",
    "SubtractConfig",
    "DecorrelationConfig",
    "DetectionConfig",
    "ClusterConfig",
    "ZogyConfig",
    "FakesConfig",
    "PipelineConfig",
    "load_config",
    "config_to_dict",
    "apply_overrides",
]

METHODS = ("al", "al-preconvolve", "zogy")
MODES = ("auto", "convolveTemplate", "convolveScience")
BASES = ("alard-lupton", "delta-function")


def _check(cond: bool, cls: str, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{name}: {message}")


def _check_planes(cls: str, name: str, planes) -> None:
    for p in planes:
        if p not in DEFAULT_MASK_PLANES:
            close = difflib.get_close_matches(p, list(DEFAULT_MASK_PLANES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{cls}.{name}: unknown mask plane {p!r}{hint}")


@dataclass(frozen=True, kw_only=True)
class PsfEstimationConfig:
    """PSF estimation for exposures that come without a PSF model (:mod:`diffim_dag.psf.estimate`).

    A PSF shipped with the data (LSST ``PSF`` extension, ``--science-psf``) is always used as it is.
    """

    detection_threshold: float = 10.0  # σ of the mesh noise (sep's 3×3 filter)
    min_snr: float = 30.0  # aperture S/N of a PSF star
    max_stars: int = 300
    epsf_stars: int = 40  # undersampled images: the brightest stars build photutils' oversampled ePSF
    min_stars: int = 8  # fewer: a Moffat fit (warned)
    max_spatial_order: int = 2
    stars_per_spatial_term: float = 10.0  # highest order tried: each term needs this many stars
    max_star_weight_snr: float = 300.0  # a star weighs S/N² in the spatial fit, up to this S/N
    stamp_fwhm: float = 8.0  # stamp side in FWHM (odd, 15 … 101 px)
    undersampled_fwhm: float = 2.5  # below this FWHM (px) the mean model is photutils' oversampled ePSF
    oversampling: int = 2
    max_iterations: int = 6
    saturation_fraction: float = 0.8  # peaks above this × saturation are non-linear
    isolation_flux_ratio: float = 0.02  # neighbours brighter than this × the star spoil its stamp
    locus_width: float = 0.15  # |ln r50 − ln r50_locus| for point sources
    # the stellar locus: the densest sizes when they stand this far above their flanks, else the smallest sizes that
    # do (with none, the densest, warned: a field of galaxies; 0: the densest always)
    locus_min_contrast: float = 3.5

    def __post_init__(self):
        n = type(self).__name__
        _check(self.detection_threshold > 0, n, "detection_threshold", "must be > 0")
        _check(self.min_snr > 0, n, "min_snr", "must be > 0")
        _check(self.max_stars >= 1, n, "max_stars", "must be ≥ 1")
        _check(self.epsf_stars >= 2, n, "epsf_stars", "must be ≥ 2")
        _check(self.min_stars >= 2, n, "min_stars", "must be ≥ 2")
        _check(0 <= self.max_spatial_order <= 3, n, "max_spatial_order", "must be in [0, 3]")
        _check(self.stars_per_spatial_term >= 1, n, "stars_per_spatial_term", "must be ≥ 1")
        _check(self.max_star_weight_snr > 0, n, "max_star_weight_snr", "must be > 0")
        _check(self.stamp_fwhm >= 3, n, "stamp_fwhm", "must be ≥ 3")
        _check(self.undersampled_fwhm >= 0, n, "undersampled_fwhm", "must be ≥ 0 (0: never)")
        _check(self.oversampling in (1, 2, 3, 4), n, "oversampling", "must be 1, 2, 3 or 4")
        _check(self.max_iterations >= 1, n, "max_iterations", "must be ≥ 1")
        _check(0 < self.saturation_fraction <= 1, n, "saturation_fraction", "must be in (0, 1]")
        _check(0 <= self.isolation_flux_ratio < 1, n, "isolation_flux_ratio", "must be in [0, 1)")
        _check(0 < self.locus_width < 1, n, "locus_width", "must be in (0, 1)")
        _check(self.locus_min_contrast >= 0, n, "locus_min_contrast", "must be ≥ 0 (0: the densest sizes always)")


@dataclass(frozen=True, kw_only=True)
class SkyConfig:
    """The sky of each input, removed before differencing (:mod:`diffim_dag.stages.sky`).

    Frames from a telescope archive still carry their sky (often thousands of counts, different in
    the two epochs); calibrated exposures and coadds are already sky-subtracted, and there the
    mesh level is ≈ 0 and removing it changes nothing.  The variance plane keeps the sky's
    Poisson term either way.
    """

    subtract: bool = True
    box: int = 128  # mesh size (px): large, so extended galaxies are not eaten
    filter_size: int = 3

    def __post_init__(self):
        n = type(self).__name__
        _check(self.box >= 16, n, "box", "must be ≥ 16 px")
        _check(self.filter_size >= 1 and self.filter_size % 2 == 1, n, "filter_size", "must be an odd number ≥ 1")


@dataclass(frozen=True, kw_only=True)
class CosmicRayConfig:
    """Cosmic rays and hot pixels of each input, found and repaired (:mod:`diffim_dag.stages.cosmic_rays`)."""

    enabled: bool = True
    nsigma: float = 6.0  # candidate pixels: above this many σ
    cond: float = 2.5  # σ margin of the sharpness test (LSST cond3_fac)
    psf_margin: float = 0.8  # the PSF's neighbour/centre ratios are scaled by this (sharper PSFs elsewhere)
    grow: int = 1

    def __post_init__(self):
        n = type(self).__name__
        _check(self.nsigma > 0, n, "nsigma", "must be > 0")
        _check(self.cond >= 0, n, "cond", "must be ≥ 0")
        _check(0 < self.psf_margin <= 1, n, "psf_margin", "must be in (0, 1]")
        _check(self.grow >= 0, n, "grow", "must be ≥ 0")


@dataclass(frozen=True, kw_only=True)
class KernelSourceConfig:
    """Selection of the stars that constrain the PSF-matching kernel."""

    detection_threshold: float = 10.0  # σ, on the science image smoothed with its PSF
    min_snr: float = 10.0  # PSF-flux S/N
    max_snr: float = 500.0
    max_sources: int = 1000
    isolation_factor: float = 1.0  # no other detection within isolation_factor × stamp half-size
    max_size_ratio: float = 1.5  # point-like: footprint second moments ≤ this × PSF moments
    # Too little signal in point-like sources (a deep extragalactic field): compact extended
    # sources up to extended_max_size_ratio are admitted too.  Any static source obeys T ⊗ K = S;
    # a few faint stars cannot pin down the kernel sum (JWST A2744: 22 stars, Σ S/N² = 3.3e4,
    # gave 0.92).  The criterion is Σ S/N² of the point-like sources that pass every other cut
    # (DECam N6 stamps: 6 stars, 2e5 — no extended sources needed).  0 disables.
    # (The PSF-weighted size ratio of an arbitrarily extended source tends to 2: 2 admits every
    # isolated source whose stamp passes the other cuts.)
    extended_max_size_ratio: float = 2.0
    min_point_snr2: float = 1.0e5
    # (a fake injected into one image only is no static source; planes an input lacks are skipped)
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE", "HIGH_VARIANCE", "INJECTED",
                                        "INJECTED_TEMPLATE")

    def __post_init__(self):
        n = type(self).__name__
        _check(self.detection_threshold > 0, n, "detection_threshold", "must be > 0")
        _check(0 < self.min_snr < self.max_snr, n, "min_snr", "must satisfy 0 < min_snr < max_snr")
        _check(self.max_sources >= 3, n, "max_sources", "must be ≥ 3")
        _check(self.isolation_factor >= 0, n, "isolation_factor", "must be ≥ 0")
        _check(self.max_size_ratio >= 1, n, "max_size_ratio", "must be ≥ 1")
        _check(self.extended_max_size_ratio >= self.max_size_ratio, n, "extended_max_size_ratio",
               "must be ≥ max_size_ratio")
        _check(self.min_point_snr2 >= 0, n, "min_point_snr2", "must be ≥ 0 (0 disables)")
        _check_planes(n, "bad_mask_planes", self.bad_mask_planes)


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Alard–Lupton kernel basis, per-cell candidate fits and spatial solve."""

    basis: str = "alard-lupton"
    gaussian_degrees: tuple[int, ...] = (4, 2, 2)
    width_multipliers: tuple[float, ...] = (1.0, 2.0, 4.0)
    min_sigma: float = 0.7  # s = max(min_sigma, σ_K / 2)
    sigma_floor: float = 0.4  # σ_K floor when the convolved image is the sharper one
    kernel_size_factor: float = 6.0  # size = odd(factor × largest Gaussian width)
    # LSST's kernelSizeMin is 21; with one variance per stamp, 17 (the Alard–Lupton size of ~1-px kernels)
    # fits better where the decorrelation sharpens most (template broader: footprint residual 0.0103 → 0.0079
    # on the issue-16 pair; raw EABA null pair 0.045 → 0.035; JWST null pair ε 0.065 → 0.051)
    min_kernel_size: int = 17
    max_kernel_size: int = 35
    regularization_lambda: float = 0.2  # delta-function basis only
    cell_size: int = 128
    candidates_per_cell: int = 5
    # LSST's constantVarianceWeighting: the kernel fit weighs each stamp with one variance (its median),
    # so bright stars' cores count as much as their wings (the residual cuts keep per-pixel variances)
    constant_variance_weighting: bool = True
    max_residual_mean: float = 0.25  # |mean(D/σ)| over the stamp
    max_residual_std: float = 1.5  # std(D/σ) over the stamp
    kernel_sum_clip_nsigma: float = 3.0
    spatial_kernel_order: int = 1
    spatial_background_order: int = 2
    fit_background: bool = True
    max_spatial_iterations: int = 3
    # Lower the spatial orders when there are fewer than this many kernel sources per spatial
    # term (a 256² stamp with 5 stars cannot constrain a linearly varying 27-function kernel).
    min_sources_per_spatial_term: float = 3.0

    def __post_init__(self):
        n = type(self).__name__
        _check(self.basis in BASES, n, "basis", f"must be one of {BASES}, got {self.basis!r}")
        _check(len(self.gaussian_degrees) == len(self.width_multipliers) >= 1, n, "gaussian_degrees",
               "needs one degree per width multiplier")
        _check(all(d >= 0 for d in self.gaussian_degrees), n, "gaussian_degrees", "degrees must be ≥ 0")
        _check(self.min_sigma > 0 and self.sigma_floor > 0, n, "min_sigma", "widths must be > 0")
        _check(self.min_kernel_size % 2 == 1 and self.max_kernel_size % 2 == 1, n, "min_kernel_size",
               "kernel sizes must be odd")
        _check(3 <= self.min_kernel_size <= self.max_kernel_size, n, "max_kernel_size", "must be ≥ min_kernel_size ≥ 3")
        _check(self.regularization_lambda >= 0, n, "regularization_lambda", "must be ≥ 0")
        _check(self.cell_size >= 16, n, "cell_size", "must be ≥ 16 px")
        _check(self.candidates_per_cell >= 1, n, "candidates_per_cell", "must be ≥ 1")
        _check(self.max_residual_mean > 0 and self.max_residual_std > 0, n, "max_residual_std", "must be > 0")
        _check(self.kernel_sum_clip_nsigma > 0, n, "kernel_sum_clip_nsigma", "must be > 0")
        _check(0 <= self.spatial_kernel_order <= 4, n, "spatial_kernel_order", "must be in [0, 4]")
        _check(0 <= self.spatial_background_order <= 4, n, "spatial_background_order", "must be in [0, 4]")
        _check(self.max_spatial_iterations >= 1, n, "max_spatial_iterations", "must be ≥ 1")
        _check(self.min_sources_per_spatial_term >= 0, n, "min_sources_per_spatial_term", "must be ≥ 0 (0 disables)")


@dataclass(frozen=True, kw_only=True)
class SubtractConfig:
    """Convolution and subtraction of one detector."""

    mode: str = "auto"
    subtract_background: bool = False  # subtract the fitted differential background
    tile_size: int = 1024
    min_template_coverage: float = 0.10
    min_coverage_on_kernel_failure: float = 0.20
    scale_variance: bool = True
    max_variance_scale: float = 10.0
    # the difference's variance plane scaled to its measured sky noise (LSST's doScaleDiffimVariance):
    # what no propagation can know — inputs that share noise (a reference stack holding the science
    # frame), correlated noise beyond the modelled lags — is measured on the difference itself
    scale_difference_variance: bool = True
    template_mask_planes_kept: tuple[str, ...] = ("NO_DATA", "BAD", "HIGH_VARIANCE")
    # the verdict (stages/verdict.py): a subtraction failing any of these is "bad_subtraction"
    bad_subtraction_ratio_mean: float = 0.2  # star-footprint residual, fraction of the star's flux
    bad_subtraction_ratio_std: float = 0.4
    sky_ratio_range: tuple[float, float] = (0.8, 1.25)  # robust σ of D/√V (as written)
    difference_noise_range: tuple[float, float] = (0.5, 2.0)  # measured / propagated σ, before any rescaling
    max_footprint_fraction: float = 0.01  # of the image, for one footprint ...
    min_footprint_pixels: int = 2500  # ... and more pixels than this (a bright star's residual on a small image)
    max_scale_mismatch: float = 0.05  # kernel sum vs the stars' aperture flux ratio
    min_scale_stars: int = 5  # stars with S/N ≥ 20 in both images that this check needs
    max_background_sigma: float = 1.0  # background left, matched-filter σ
    max_kernel_shift: float = 1.0  # px: a kernel that moves the image farther means misregistered inputs

    def __post_init__(self):
        n = type(self).__name__
        _check(self.mode in MODES, n, "mode", f"must be one of {MODES}, got {self.mode!r}")
        _check(self.tile_size >= 64, n, "tile_size", "must be ≥ 64 px")
        _check(0 <= self.min_template_coverage <= 1, n, "min_template_coverage", "must be in [0, 1]")
        _check(0 <= self.min_coverage_on_kernel_failure <= 1, n, "min_coverage_on_kernel_failure", "must be in [0, 1]")
        _check(self.max_variance_scale >= 1, n, "max_variance_scale", "must be ≥ 1")
        _check_planes(n, "template_mask_planes_kept", self.template_mask_planes_kept)
        _check(len(self.sky_ratio_range) == 2 and 0 < self.sky_ratio_range[0] < 1 < self.sky_ratio_range[1], n,
               "sky_ratio_range", f"must be (low < 1, high > 1), got {self.sky_ratio_range!r}")
        _check(len(self.difference_noise_range) == 2
               and 0 < self.difference_noise_range[0] < 1 < self.difference_noise_range[1], n,
               "difference_noise_range", f"must be (low < 1, high > 1), got {self.difference_noise_range!r}")
        _check(0 < self.max_footprint_fraction <= 1, n, "max_footprint_fraction", "must be in (0, 1]")
        _check(self.min_footprint_pixels >= 0, n, "min_footprint_pixels", "must be ≥ 0")
        _check(self.max_scale_mismatch > 0, n, "max_scale_mismatch", "must be > 0")
        _check(self.min_scale_stars >= 1, n, "min_scale_stars", "must be ≥ 1")
        _check(self.max_background_sigma > 0, n, "max_background_sigma", "must be > 0")
        _check(self.max_kernel_shift > 0, n, "max_kernel_shift", "must be > 0")


@dataclass(frozen=True, kw_only=True)
class DecorrelationConfig:
    """The decorrelation afterburner (Reiss & Lupton 2016)."""

    enabled: bool = True
    spatially_varying: bool = False
    grid_cells: int = 4  # cells per axis for the spatially varying version

    def __post_init__(self):
        n = type(self).__name__
        _check(self.grid_cells >= 1, n, "grid_cells", "must be ≥ 1")


def is_systematic_fraction(value) -> bool:
    """A valid ``systematic_fraction``: ``'auto'`` or a number in [0, 1)."""
    if value == "auto":
        return True
    return not isinstance(value, (str, bool)) and 0 <= value < 1


@dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    """Detection and measurement on the difference."""

    threshold: float = 5.0
    bad_peak_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "EDGE", "CR")
    # Pixels that carry no difference: zero weight in the matched filter, never in a footprint
    # (EDGE: the kernel reached past the template; LSST excludes it from detection too).
    no_data_mask_planes: tuple[str, ...] = ("NO_DATA", "EDGE")
    # A method's score (ZOGY's S_corr, the pre-convolution score) is not detected on these planes of the score's
    # own mask: there the score took filled values (the saturated, bad or missing input pixels, which both methods
    # replace before filtering, spread by the filters that made the score), as LSST excludes EDGE, SAT and BAD.
    score_excluded_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT", "SAT_TEMPLATE", "EDGE")
    footprint_grow_sigma: float = 2.4
    n_sky_sources: int = 100
    # Fractional systematic error ε of the difference at static sources (kernel/PSF mismatch):
    # 0 (LSST's behaviour) | a number | "auto" (the default: measured on the bright static peaks of
    # the matched template, 0 when their residuals are consistent with noise).  Suppresses the
    # residuals of bright stars and galaxies that no kernel removes (resampled, undersampled or
    # drizzled data, stars near saturation) — and, by design, fractional variability below ~ε of
    # a source's flux.
    systematic_fraction: float | str = "auto"
    systematic_min_snr: float = 50.0
    # Reach (px) of a static source's systematic residual: the variance term uses the largest
    # matched-template value within this radius, so rings and rotated diffraction spikes in a bright
    # source's wings are weighed against its core.  "kernel": the PSF-matching kernel's half-width
    # (a kernel moves flux no farther); 0: the value at the pixel.  Only used when ε > 0.
    systematic_radius: int | str = 0
    # Two-pass background subtraction on the difference (LSST's initial/final background passes).
    subtract_background: bool = False
    background_bin_sizes: tuple[int, int] = (8, 40)
    # Find cosmic rays on the difference (CR plane, zero weight in the matched filter).
    mask_cosmic_rays: bool = False
    # Threshold in units of the significance's measured σ ("pixel_stdev", LSST's default for DIA: correlated
    # noise the variance plane misses does not become detections) or of the variance plane ("variance").
    threshold_type: str = "pixel_stdev"
    sky_source_seed: int = 0
    aperture_radius: float = 12.0  # px, besides the 2×FWHM aperture
    max_dipole_area: int = 1200  # px: larger merged ± footprints get no dipole fit
    dipole_direct_weight: float = 0.5  # weight of the direct images in the joint dipole fit
    # Side (px) of the tiles the difference is detected and measured in (each with a halo; a footprint cut by a
    # tile's edge is completed): each tile's sources are measured in batches, and a tile's fixed costs are paid
    # per tile.  A 4096² difference in tiles of 2048 took 0.94× the time of tiles of 1024 (16 interleaved runs;
    # its detection 1.1 s against 1.4–1.5 s; the same sources, to the last bits but rounding); 4096 (one tile)
    # took longer and 0.1 GB more.  On a cluster each tile is a ``detect`` task.  None: one tile.
    tile_size: int | None = 2048

    def __post_init__(self):
        n = type(self).__name__
        _check(self.threshold > 0, n, "threshold", "must be > 0")
        _check(self.footprint_grow_sigma >= 0, n, "footprint_grow_sigma", "must be ≥ 0")
        _check(self.threshold_type in ("pixel_stdev", "variance"), n, "threshold_type",
               f"must be 'pixel_stdev' or 'variance', got {self.threshold_type!r}")
        _check(self.aperture_radius > 0, n, "aperture_radius", "must be > 0")
        _check(self.max_dipole_area >= 0, n, "max_dipole_area", "must be ≥ 0")
        _check(self.dipole_direct_weight >= 0, n, "dipole_direct_weight", "must be ≥ 0")
        _check(self.systematic_radius == "kernel"
               or (not isinstance(self.systematic_radius, (str, bool, float)) and self.systematic_radius >= 0),
               n, "systematic_radius", f"must be 'kernel' or an integer ≥ 0, got {self.systematic_radius!r}")
        _check(len(self.background_bin_sizes) == 2 and all(int(b) >= 2 for b in self.background_bin_sizes), n,
               "background_bin_sizes", f"must be two bin sizes ≥ 2, got {self.background_bin_sizes!r}")
        _check(self.n_sky_sources >= 0, n, "n_sky_sources", "must be ≥ 0")
        _check(self.tile_size is None or self.tile_size >= 16, n, "tile_size", "must be None or ≥ 16")
        _check(is_systematic_fraction(self.systematic_fraction), n, "systematic_fraction",
               f"must be 'auto' or a number in [0, 1), got {self.systematic_fraction!r}")
        _check(self.systematic_min_snr > 0, n, "systematic_min_snr", "must be > 0")
        _check_planes(n, "bad_peak_mask_planes", self.bad_peak_mask_planes)
        _check_planes(n, "no_data_mask_planes", self.no_data_mask_planes)
        _check_planes(n, "score_excluded_mask_planes", self.score_excluded_mask_planes)


@dataclass(frozen=True, kw_only=True)
class ZogyConfig:
    """ZOGY subtraction.

    Attributes
    ----------
    grid_cells : int
        Cells per axis (the PSFs are evaluated at every cell centre); fewer when the image
        is smaller than ``grid_cells × overlap``.
    psf_size_fwhm : float
        Side of the PSF images, in units of the larger FWHM at the image centre (at least the
        models' default sizes).  ZOGY divides PSF transforms at frequencies where both are
        tiny, so a PSF cut where its wings still hold ~1e-6 of the flux rings in Fourier space
        and gives the ZOGY kernels wings tens of pixels long; 8 FWHM (≈ 9.4σ of a Gaussian
        radius) keeps the truncation below 1e-18.
    overlap_psf_sizes : float
        Width of the cosine blend between neighbouring cells *and* of the real-data margin
        around each cell's support, in units of the PSF size (the larger PSF's kernel side).
    max_centroid_offset : float
        Largest allowed separation (px) of the two PSFs' centroids in any cell.
    flux_ratio : float or None
        κ = science counts / template counts of a constant source; None: from the
        PhotoCalib zero points, else fitted from matched stars.
    flux_ratio_min_snr : float
        Aperture S/N (in both images) of the stars used to fit κ.
    flux_ratio_match_radius : float
        Matching radius (px) between science and template detections.
    flux_ratio_detection_threshold : float
        Detection threshold (σ, PSF-smoothed) for those stars.
    flux_ratio_min_stars : int
        Fewest matched stars for a fitted κ.
    bad_mask_planes : tuple of str
        Input pixels on these planes (and non-finite ones) are replaced by noise before the FFTs.
    noise_seed : int
        Seed of the noise fill and padding (per cell: ``(noise_seed, cell index)``).
    fft_workers : int
        ``scipy.fft`` threads per cell task (1 inside Dask workers).
    """

    grid_cells: int = 4
    psf_size_fwhm: float = 8.0
    overlap_psf_sizes: float = 2.0
    max_centroid_offset: float = 0.2
    flux_ratio: float | None = None
    flux_ratio_min_snr: float = 30.0
    flux_ratio_match_radius: float = 1.0
    flux_ratio_detection_threshold: float = 10.0
    flux_ratio_min_stars: int = 3
    bad_mask_planes: tuple[str, ...] = ("NO_DATA", "BAD", "SAT")
    noise_seed: int = 0
    fft_workers: int = 1

    def __post_init__(self):
        n = type(self).__name__

        def check(ok, fld, msg):
            if not ok:
                raise ConfigError(f"{n}.{fld}: {msg}")

        check(isinstance(self.grid_cells, int) and self.grid_cells >= 1, "grid_cells",
              f"must be an integer ≥ 1, got {self.grid_cells!r}")
        check(math.isfinite(self.psf_size_fwhm) and self.psf_size_fwhm >= 2.0, "psf_size_fwhm",
              f"must be ≥ 2, got {self.psf_size_fwhm!r}")
        check(math.isfinite(self.overlap_psf_sizes) and self.overlap_psf_sizes >= 1.0, "overlap_psf_sizes",
              f"must be ≥ 1 (the blend and margin must hold the PSF), got {self.overlap_psf_sizes!r}")
        check(math.isfinite(self.max_centroid_offset) and self.max_centroid_offset > 0, "max_centroid_offset",
              f"must be > 0, got {self.max_centroid_offset!r}")
        check(self.flux_ratio is None or (math.isfinite(self.flux_ratio) and self.flux_ratio > 0), "flux_ratio",
              f"must be None or > 0, got {self.flux_ratio!r}")
        check(self.flux_ratio_min_snr > 0, "flux_ratio_min_snr", f"must be > 0, got {self.flux_ratio_min_snr!r}")
        check(self.flux_ratio_match_radius > 0, "flux_ratio_match_radius",
              f"must be > 0, got {self.flux_ratio_match_radius!r}")
        check(self.flux_ratio_detection_threshold > 0, "flux_ratio_detection_threshold",
              f"must be > 0, got {self.flux_ratio_detection_threshold!r}")
        check(isinstance(self.flux_ratio_min_stars, int) and self.flux_ratio_min_stars >= 1, "flux_ratio_min_stars",
              f"must be an integer ≥ 1, got {self.flux_ratio_min_stars!r}")
        for p in self.bad_mask_planes:
            check(p in DEFAULT_MASK_PLANES, "bad_mask_planes", f"unknown mask plane {p!r}")
        check(self.fft_workers == -1 or self.fft_workers >= 1, "fft_workers",
              f"must be -1 or ≥ 1, got {self.fft_workers!r}")



#: ``cluster.scheduler`` / ``--scheduler`` value that asks for a new LocalCluster.
@dataclass(frozen=True, kw_only=True)
class FakesConfig:
    """Injection–recovery (``fakes:``): point sources added to the inputs before subtraction, then matched.

    ``n`` fakes go into the science (positive in the difference) and ``n_template`` into the template
    (sources that faded: negative), each rendered with its exposure's PSF at its position.  A fraction
    ``galaxy_fraction`` sits on detected galaxies (offset from their centres), ``star_fraction`` beside
    bright stars, the rest on blank sky (covered, unmasked, outside every detected footprint).  Their
    brightness is uniform in magnitude over ``magnitude_range`` (AB, with ``zero_point`` or the header's)
    or, when that is empty, over the S/N range ``snr_range`` predicted from both inputs' noise.  A fake
    is recovered when a DiaSource of its sign lies within ``match_radius_fwhm`` × the difference PSF's
    FWHM (at least 1.5 px).
    """

    n: int = 0
    n_template: int = 0
    seed: int = 0
    snr_range: tuple[float, ...] = (2.0, 50.0)
    magnitude_range: tuple[float, ...] = ()
    zero_point: float | None = None  # AB mag of one science count; None: the header's (MAGZERO, …)
    galaxy_fraction: float = 0.2
    star_fraction: float = 0.15
    min_separation_fwhm: float = 5.0  # between fakes (grown footprints of bright fakes closer than ~4 FWHM merge)
    match_radius_fwhm: float = 1.0
    poisson: bool = True  # add the fakes' photon noise at the variance plane's gain

    def __post_init__(self):
        n = type(self).__name__
        _check(self.n >= 0 and self.n_template >= 0, n, "n", "fake counts must be ≥ 0")
        _check(len(self.snr_range) == 2 and 0 < self.snr_range[0] < self.snr_range[1], n, "snr_range",
               f"must be two increasing positive numbers, got {list(self.snr_range)}")
        _check(len(self.magnitude_range) in (0, 2) and (not self.magnitude_range
                                                        or self.magnitude_range[0] < self.magnitude_range[1]),
               n, "magnitude_range", f"must be empty or two increasing magnitudes, got {list(self.magnitude_range)}")
        _check(0 <= self.galaxy_fraction and 0 <= self.star_fraction
               and self.galaxy_fraction + self.star_fraction <= 1, n, "galaxy_fraction",
               "galaxy_fraction and star_fraction must be ≥ 0 and sum to ≤ 1")
        _check(self.min_separation_fwhm > 0, n, "min_separation_fwhm", "must be > 0")
        _check(self.match_radius_fwhm > 0, n, "match_radius_fwhm", "must be > 0")

    @property
    def enabled(self) -> bool:
        return self.n + self.n_template > 0


LOCAL_CLUSTER = "local"


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Where the graphs run."""

    # an existing scheduler's address, or "local" for a new LocalCluster; None → `subtract`/`demo` run in
    # this process (threads), `run` starts a LocalCluster
    scheduler: str | None = None
    n_workers: int | None = None  # LocalCluster workers (default: cores)
    threads_per_worker: int = 1
    memory_limit: str = "auto"
    no_worker_timeout: float = 60.0  # s with no worker left before a run ends with an error (0: wait forever)
    # a new LocalCluster's Dask dashboard ("HOST:PORT", ":8787", ":0" for any free port; `run` prints its link).
    # None: no dashboard, whose server took 0.35 s of every start-up (0.72 s against 0.39 s for one worker), and no
    # worker profiler, which feeds only its Profile page (cluster.worker_profiling)
    dashboard: str | None = None

    def __post_init__(self):
        n = type(self).__name__
        _check(self.n_workers is None or self.n_workers >= 1, n, "n_workers", "must be ≥ 1")
        _check(self.no_worker_timeout >= 0, n, "no_worker_timeout", "must be ≥ 0 (0 disables)")
        _check(self.threads_per_worker >= 1, n, "threads_per_worker", "must be ≥ 1")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole pipeline: method plus one section per stage."""

    method: str = "al"
    sky: SkyConfig = field(default_factory=SkyConfig)
    psf: PsfEstimationConfig = field(default_factory=PsfEstimationConfig)
    cosmic_rays: CosmicRayConfig = field(default_factory=CosmicRayConfig)
    sources: KernelSourceConfig = field(default_factory=KernelSourceConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    decorrelation: DecorrelationConfig = field(default_factory=DecorrelationConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    zogy: ZogyConfig = field(default_factory=ZogyConfig)
    fakes: FakesConfig = field(default_factory=FakesConfig)

    def __post_init__(self):
        _check(self.method in METHODS, "PipelineConfig", "method", f"must be one of {METHODS}, got {self.method!r}")


# --------------------------------------------------------------------------- loading


def _resolve_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):  # "1,2", or "(1, 2)" as a tuple is written in Python (YAML reads it as text)
            text = value.strip()
            text = text[1:-1] if text[:1] + text[-1:] == "()" else text
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # an item of a comma-separated list ("4,2") is text
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads exponents without a sign ("1.0e5") as text
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{close[0]}'?" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{where + '.' if where else ''}{key}'{hint}")
        kwargs[key] = _coerce(value, _resolve_type(cls, key), f"{where + '.' if where else ''}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def config_to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) of a config, for YAML/JSON output."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(config)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. kernel.spatial_kernel_order=2)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline YAML file (optional) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: pipeline file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise ConfigError(f"{p}: not valid YAML{where} ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = {k: v for k, v in data.items() if k not in ("description",)}
        try:  # a mistake in the file is named with the file, before the overrides are applied
            _build(PipelineConfig, data, "")
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
    data = apply_overrides(data, overrides)
    return _build(PipelineConfig, data, "")
