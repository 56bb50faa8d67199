r"""Simulated science/template pairs with a truth table of everything injected.

:func:`simulate_pair` renders two exposures of the same patch of sky:

* **Field stars** at uniform random positions with a truncated power-law flux
  distribution :math:`dN/dF \propto F^{-a}` on :math:`[F_\mathrm{min}, F_\mathrm{max}]`,
  drawn by inverting the cumulative distribution,

  .. math::  F = \left[F_\mathrm{min}^{1-a} + u\,(F_\mathrm{max}^{1-a} - F_\mathrm{min}^{1-a})\right]^{1/(1-a)},
             \qquad u \sim U(0, 1)

  (log-uniform when :math:`a = 1`).
* **PSFs** that vary across the image (:class:`~diffim_dag.psf.VaryingPsf`,
  Gaussian or Moffat): with :math:`u, v \in [-1, 1]` spanning the image edges,
  :math:`\mathrm{FWHM}(u, v) = c_0\,[1 + \tfrac{g}{4}(u + v)]`, so the FWHM changes
  by the fraction :math:`g` from one corner to the opposite one.
* **Sky** with a linear gradient,
  :math:`B(u, v) = B_0\,[1 + \tfrac12 (g_x u + g_y v)]`, optionally subtracted
  from the written image (the noise keeps the sky's Poisson term).
* **Noise**: the expected counts :math:`E = B + S` (sky plus sources) are drawn
  as Poisson electrons with gain :math:`g` (e⁻/count) plus Gaussian read noise
  :math:`R` (e⁻), :math:`I = [\mathrm{Poisson}(gE) + \mathcal N(0, R^2)] / g`;
  the variance plane is the *truth* variance :math:`V = E/g + (R/g)^2` counts².
* **Template**: the same sources, their counts divided by the photometric ratio
  ``flux_scale`` :math:`\kappa` (:math:`F_\mathrm{sci} = \kappa F_\mathrm{tmp}`), on a
  pixel grid shifted by ``template_offset`` :math:`(\delta_x, \delta_y)` — a source
  at science pixel :math:`(x, y)` lies at template pixel :math:`(x + \delta_x, y + \delta_y)`
  and the template WCS says so (:math:`\mathrm{CRPIX}_t = \mathrm{CRPIX}_s + \delta`).
  A deeper template (noise factor :math:`f < 1`) is modelled as an image with
  effective gain :math:`g_t = g / f^2` and read noise :math:`R_t = R / f`, so
  every noise term scales by :math:`f` while Poisson statistics stay exact.
* **Injected truths**: transients (science only), negative transients (template
  only, negative in the difference), variable stars (flux × r between epochs),
  moving objects (1–3 px between epochs: dipoles in the difference), cosmic rays
  (science only, 1–4 sharp pixels), saturated stars (clipped at ``saturation``
  and flagged ``SAT``) and bad columns (junk values flagged ``BAD``).

Transients, variables and movers are kept farther than :math:`3\,\mathrm{FWHM}_\max + 10`
px (plus the largest motion) from each other and from the image edges, and
farther than that plus the 5σ radius of every saturated star and of every field
star whose peak is above 5σ of the sky, so later detection tests have clean
truths.  Field stars can be anywhere.

Every random stream is a child of ``numpy.random.SeedSequence(seed)`` (one per
component), so the same seed gives identical bytes and changing one count does
not move the field stars.

Sources are rendered as small flux-normalized stamps
(:meth:`~diffim_dag.psf.Psf.kernel_image`), never as full-image evaluations,
and the noise is drawn in fixed blocks of rows, so 8192² images need only a few
float32 planes of memory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, InputError
from .exposure import Exposure, ExposureInfo, PhotoCalib
from .io.atomic import atomic_path
from .masks import MASK_DTYPE, MaskPlanes
from .psf import FWHM_PER_SIGMA, GaussianPsf, MoffatPsf, Psf, VaryingPsf
from .psf.render import point_source_stamps

__all__ = [
    "SimConfig",
    "SimulatedPair",
    "TRUTH_COLUMNS",
    "TRUTH_KINDS",
    "simulate_pair",
    "write_pair",
    "template_mapping",
    "to_template",
    "from_template",
    "add_sources",
    "sky_model",
    "power_law_fluxes",
]

#: Kinds of truth-table rows, in the order their ids are assigned.
TRUTH_KINDS = (
    "star",
    "saturated_star",
    "transient",
    "negative_transient",
    "variable",
    "mover",
    "cosmic_ray",
    "bad_column",
)

#: Columns of the truth table, in order.
TRUTH_COLUMNS = (
    "id",
    "kind",
    "epoch",
    "x",
    "y",
    "template_x",
    "template_y",
    "x_at_template_epoch",
    "y_at_template_epoch",
    "ra",
    "dec",
    "science_flux",
    "template_flux",
    "difference_flux",
    "snr_difference",
    "science_fwhm",
    "template_fwhm",
    "saturated",
    "npix",
)

#: Default counts per 1024² pixels (bad columns: per 1024 columns).
_DENSITY = {
    "n_stars": 400,
    "n_transients": 20,
    "n_negative_transients": 5,
    "n_variables": 10,
    "n_movers": 5,
    "n_cosmic_rays": 50,
    "n_saturated": 4,
    "n_bad_columns": 2,
}

_MAX_STAMP = 255  # largest stamp side (pixels)
_BLOCK_ROWS = 256  # rows per noise block (fixed: part of the byte-exact contract)
_ENCLOSED = 0.999  # flux fraction a stamp holds at least
_WING_NSIGMA = 0.1  # stamps extend to where the wings fall below this × sky σ
_BRIGHT_NSIGMA = 5.0  # field stars whose peak exceeds this × sky σ are avoided by injected truths
_STREAMS = (
    "stars",
    "saturated",
    "transients",
    "negative_transients",
    "variables",
    "movers",
    "cosmic_rays",
    "bad_columns",
    "science_noise",
    "template_noise",
    "template_bad_columns",
    "galaxies",
)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def _fail(name: str, message: str) -> None:
    raise ConfigError(f"SimConfig.{name}: {message}")


def _finite(v: Any) -> bool:
    try:
        return bool(np.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


def _pair(name: str, value: Any, cast=float) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        _fail(name, f"must be a pair of numbers, got {value!r}")
    if len(items) != 2:
        _fail(name, f"must be a pair of numbers, got {value!r}")
    try:
        out = tuple(cast(v) for v in items)
    except (TypeError, ValueError):
        _fail(name, f"must be a pair of numbers, got {value!r}")
    if cast is int and any(int(v) != float(w) for v, w in zip(out, items)):
        _fail(name, f"must be a pair of integers, got {value!r}")
    if cast is float and not all(np.isfinite(out)):
        _fail(name, f"must be finite, got {value!r}")
    return out


def _range(name: str, value: Any, *, low: float = 0.0, strict: bool = True) -> tuple[float, float]:
    lo, hi = _pair(name, value)
    if not (lo > low if strict else lo >= low) or hi < lo:
        _fail(name, f"must be (min, max) with {low} {'<' if strict else '≤'} min ≤ max, got {value!r}")
    return lo, hi


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    r"""Everything that defines a simulated pair; frozen, keyword-only, validated.

    Counts left as ``None`` scale with the image area (per 1024²: 400 stars, 20
    transients, 5 negative transients, 10 variables, 5 movers, 50 cosmic rays, 4
    saturated stars; 2 bad columns per 1024 columns), at least one each; see
    :meth:`counts`.  Fluxes are in **science counts** unless the name says otherwise;
    template counts are science counts / ``flux_scale``.

    Parameters
    ----------
    size : int or (int, int)
        Image side, or ``(ny, nx)``; normalized to ``(ny, nx)``.  64 … 16384 px.
    xy0 : (int, int)
        Parent-frame origin ``(x0, y0)`` of both images.
    seed : int
        Seed of every random stream (``SeedSequence(seed).spawn``).
    n_stars, star_min_flux, star_max_flux, star_flux_slope
        Field stars with :math:`dN/dF \\propto F^{-a}`, ``a = star_flux_slope``.
    psf_profile : {"gaussian", "moffat"}
    moffat_beta : float
        Moffat β (> 1.5 so a stamp can hold 99.9 % of the flux).
    science_fwhm, template_fwhm : float
        FWHM (px) at the image centre.
    science_fwhm_gradient, template_fwhm_gradient : float or (float, float)
        A number g: fractional FWHM change from corner to opposite corner (|g| < 1.5).  A pair
        ``(gx, gy)``: fractional change from edge to edge along x and along y,
        :math:`\mathrm{FWHM} = c_0 [1 + \tfrac12 (g_x u + g_y v)]` (``g`` ≡ ``(g/2, g/2)``).
    sky_level : float
        Science sky (counts) at the centre.
    sky_gradient : (float, float)
        Fractional sky change across the image along x and y (|gx| + |gy| ≤ 2).
    template_sky_level : float, optional
        Template sky (template counts); default ``sky_level / flux_scale``.
    sky_subtracted : bool
        Subtract the smooth sky model from the written images (noise keeps its Poisson term).
    gain, read_noise : float
        Science gain (e⁻/count) and read noise (e⁻).
    flux_scale : float
        Photometric ratio κ = science counts / template counts of a constant source.
    template_offset : (float, float)
        Template pixel grid shift (px): template pixel = science pixel + offset (less than half
        the image side).  Beyond 5 px (or with a rotation) field stars also fill the parts of the
        template outside the science frame, and injected truths lie where both images have data.
    template_rotation : float
        Rotation (degrees, counter-clockwise) of the template grid about the science image centre:
        template pixel :math:`= R(\theta)(s - c) + c + \delta` (its WCS says so).
    template_noise_factor : float
        Template noise relative to the science noise at equal expected counts
        (effective gain ``gain / f²``, read noise ``read_noise / f``).
    n_transients, transient_flux
        Science-only point sources, log-uniform flux in ``transient_flux``.
    n_negative_transients
        Template-only point sources (template flux = ``transient_flux`` draw / κ).
    n_variables, variable_flux, variable_amplitude
        Stars whose flux changes by a factor r with ``variable_amplitude[0] ≤ r ≤ variable_amplitude[1]``,
        brighter or fainter with equal probability (template-epoch flux from ``variable_flux``).
    n_movers, mover_flux, mover_shift
        Sources that move by ``mover_shift`` px (uniform) in a random direction between epochs.
    n_cosmic_rays, cosmic_ray_flux
        Science-only hits of 1–4 adjacent pixels, total counts log-uniform in ``cosmic_ray_flux``.
    mask_cosmic_rays : bool
        Also set the ``CR`` mask plane on the hit pixels (off: leave finding them to the pipeline).
    n_saturated, saturated_peak
        Stars whose noiseless peak pixel is ``saturated_peak`` × ``saturation`` (log-uniform).
    n_bad_columns, n_template_bad_columns
        Partial or full columns of junk (hot, dead or noisy) flagged ``BAD`` in the science / template.
    n_galaxies, galaxy_flux, galaxy_radius
        Static galaxies in both epochs: exponential discs (axis ratio 0.4–1, random angle) with science
        counts log-uniform in ``galaxy_flux`` and half-light radius log-uniform in ``galaxy_radius`` (px),
        convolved with each epoch's PSF (``kind == "galaxy"`` in the truth table).
    saturation : float
        Clipping level (raw counts, before any sky subtraction) of both images.
    band, visit, template_visit, detector, exposure_time, template_exposure_time, mjd_obs, template_mjd_obs
        Metadata; the two epochs have distinct visits and dates.
    zero_point : float
        Science AB zero point (mag of 1 count); the template's is ``zero_point - 2.5 log10 κ``.
    pixel_scale, ra, dec : float
        TAN WCS: arcsec/px, and the sky position (deg) of the science image centre.
    """

    size: int | tuple[int, int] = 1024
    xy0: tuple[int, int] = (0, 0)
    seed: int = 0
    # field stars
    n_stars: int | None = None
    star_min_flux: float = 500.0
    star_max_flux: float = 5.0e5
    star_flux_slope: float = 2.0
    # PSFs
    psf_profile: str = "gaussian"
    moffat_beta: float = 3.0
    science_fwhm: float = 3.5
    science_fwhm_gradient: float | tuple[float, float] = 0.2
    template_fwhm: float = 2.8
    template_fwhm_gradient: float | tuple[float, float] = 0.1
    # sky and noise
    sky_level: float = 1000.0
    sky_gradient: tuple[float, float] = (0.1, 0.05)
    template_sky_level: float | None = None
    sky_subtracted: bool = False
    gain: float = 1.5
    read_noise: float = 5.0
    flux_scale: float = 1.0
    template_offset: tuple[float, float] = (0.3, -0.2)
    template_rotation: float = 0.0
    template_noise_factor: float = 0.5
    # injected truths
    n_transients: int | None = None
    transient_flux: tuple[float, float] = (1.0e3, 2.0e4)
    n_negative_transients: int | None = None
    n_variables: int | None = None
    variable_flux: tuple[float, float] = (2.0e3, 5.0e4)
    variable_amplitude: tuple[float, float] = (1.2, 2.0)
    n_movers: int | None = None
    mover_flux: tuple[float, float] = (2.0e3, 2.0e4)
    mover_shift: tuple[float, float] = (1.0, 3.0)
    n_cosmic_rays: int | None = None
    cosmic_ray_flux: tuple[float, float] = (500.0, 2.0e4)
    mask_cosmic_rays: bool = False
    n_saturated: int | None = None
    saturated_peak: tuple[float, float] = (3.0, 30.0)
    n_bad_columns: int | None = None
    n_template_bad_columns: int = 0
    # static galaxies: exponential discs (Sérsic n = 1) convolved with each epoch's PSF
    n_galaxies: int = 0
    galaxy_flux: tuple[float, float] = (5.0e3, 1.0e5)
    galaxy_radius: tuple[float, float] = (2.0, 6.0)  # half-light radius, px
    saturation: float = 6.0e4
    # metadata
    band: str = "r"
    visit: int = 2024001
    template_visit: int = 2023001
    detector: int = 42
    exposure_time: float = 30.0
    template_exposure_time: float = 300.0
    mjd_obs: float = 60400.25
    template_mjd_obs: float = 60000.25
    zero_point: float = 28.0
    pixel_scale: float = 0.2
    ra: float = 150.1
    dec: float = 2.2

    def __post_init__(self):  # noqa: C901 - one check per field
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        # geometry
        size = self.size
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            shape = (int(size), int(size))
        else:
            shape = _pair("size", size, cast=int)
        if not all(64 <= s <= 16384 for s in shape):
            _fail("size", f"sides must be between 64 and 16384 px, got {size!r}")
        set_("size", shape)
        set_("xy0", _pair("xy0", self.xy0, cast=int))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            _fail("seed", f"must be a non-negative integer, got {self.seed!r}")
        set_("seed", int(self.seed))
        # counts
        for name in list(_DENSITY) + ["n_template_bad_columns"]:
            v = getattr(self, name)
            if v is None and name != "n_template_bad_columns":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                _fail(name, f"must be a non-negative integer or None, got {v!r}")
            set_(name, int(v))
        if isinstance(self.n_galaxies, bool) or not isinstance(self.n_galaxies, (int, np.integer)) or self.n_galaxies < 0:
            _fail("n_galaxies", f"must be a non-negative integer, got {self.n_galaxies!r}")
        set_("n_galaxies", int(self.n_galaxies))
        set_("galaxy_flux", _range("galaxy_flux", self.galaxy_flux))
        set_("galaxy_radius", _range("galaxy_radius", self.galaxy_radius))
        # stars
        for name in ("star_min_flux", "star_max_flux"):
            if not (_finite(getattr(self, name)) and getattr(self, name) > 0):
                _fail(name, f"must be positive and finite, got {getattr(self, name)!r}")
        if self.star_max_flux < self.star_min_flux:
            _fail("star_max_flux", f"must be ≥ star_min_flux ({self.star_min_flux}), got {self.star_max_flux}")
        if not _finite(self.star_flux_slope):
            _fail("star_flux_slope", f"must be finite, got {self.star_flux_slope!r}")
        # PSFs
        if self.psf_profile not in ("gaussian", "moffat"):
            close = difflib.get_close_matches(str(self.psf_profile), ["gaussian", "moffat"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail("psf_profile", f"must be 'gaussian' or 'moffat', got {self.psf_profile!r}{hint}")
        if not (_finite(self.moffat_beta) and self.moffat_beta > 1.5):
            _fail("moffat_beta", f"must be > 1.5, got {self.moffat_beta!r}")
        for name in ("science_fwhm", "template_fwhm"):
            v = getattr(self, name)
            if not (_finite(v) and 0.5 <= v <= 50):
                _fail(name, f"must be between 0.5 and 50 px, got {v!r}")
        for name in ("science_fwhm_gradient", "template_fwhm_gradient"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple, np.ndarray)):
                gxy = _pair(name, v)
                if abs(gxy[0]) + abs(gxy[1]) >= 1.5:
                    _fail(name, f"must keep |gx| + |gy| < 1.5, got {v!r}")
                set_(name, gxy)
            elif not (_finite(v) and abs(v) < 1.5):
                _fail(name, f"must be finite with |value| < 1.5 (or a pair (gx, gy)), got {v!r}")
        # sky and noise
        if not (_finite(self.sky_level) and self.sky_level >= 0):
            _fail("sky_level", f"must be ≥ 0, got {self.sky_level!r}")
        gx, gy = _pair("sky_gradient", self.sky_gradient)
        if abs(gx) + abs(gy) > 2:
            _fail("sky_gradient", f"must keep the sky ≥ 0 (|gx| + |gy| ≤ 2), got {self.sky_gradient!r}")
        set_("sky_gradient", (gx, gy))
        for name in ("sky_subtracted", "mask_cosmic_rays"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _fail(name, f"must be True or False, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        if self.template_sky_level is not None and not (_finite(self.template_sky_level) and self.template_sky_level >= 0):
            _fail("template_sky_level", f"must be ≥ 0 or None, got {self.template_sky_level!r}")
        for name in ("gain", "flux_scale", "template_noise_factor", "saturation", "pixel_scale"):
            v = getattr(self, name)
            if not (_finite(v) and v > 0):
                _fail(name, f"must be positive and finite, got {v!r}")
        if not (_finite(self.read_noise) and self.read_noise >= 0):
            _fail("read_noise", f"must be ≥ 0, got {self.read_noise!r}")
        off = _pair("template_offset", self.template_offset)
        if max(abs(off[0]), abs(off[1])) >= min(shape) / 2:
            _fail("template_offset", f"must be less than half the image side ({min(shape) / 2:g} px), "
                                     f"got {self.template_offset!r}")
        set_("template_offset", off)
        if not (_finite(self.template_rotation) and abs(self.template_rotation) <= 45):
            _fail("template_rotation", f"must be within ±45 degrees, got {self.template_rotation!r}")
        set_("template_rotation", float(self.template_rotation))
        # injected truths
        set_("transient_flux", _range("transient_flux", self.transient_flux))
        set_("variable_flux", _range("variable_flux", self.variable_flux))
        amp = _range("variable_amplitude", self.variable_amplitude, low=1.0)
        set_("variable_amplitude", amp)
        set_("mover_flux", _range("mover_flux", self.mover_flux))
        shift = _range("mover_shift", self.mover_shift)
        if shift[1] > 20:
            _fail("mover_shift", f"must be at most 20 px, got {self.mover_shift!r}")
        set_("mover_shift", shift)
        set_("cosmic_ray_flux", _range("cosmic_ray_flux", self.cosmic_ray_flux))
        set_("saturated_peak", _range("saturated_peak", self.saturated_peak, low=1.0))
        # metadata
        if not isinstance(self.band, str) or not self.band.strip():
            _fail("band", f"must be a non-empty string, got {self.band!r}")
        for name in ("visit", "template_visit", "detector"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                _fail(name, f"must be a non-negative integer, got {v!r}")
            set_(name, int(v))
        if self.visit == self.template_visit:
            _fail("template_visit", f"must differ from visit ({self.visit})")
        for name in ("exposure_time", "template_exposure_time"):
            v = getattr(self, name)
            if not (_finite(v) and v > 0):
                _fail(name, f"must be positive, got {v!r}")
        for name in ("mjd_obs", "template_mjd_obs", "zero_point"):
            if not _finite(getattr(self, name)):
                _fail(name, f"must be finite, got {getattr(self, name)!r}")
        if self.mjd_obs == self.template_mjd_obs:
            _fail("template_mjd_obs", f"must differ from mjd_obs ({self.mjd_obs})")
        if not (_finite(self.ra) and _finite(self.dec) and -90 < self.dec < 90):
            _fail("dec", f"must be finite with -90 < dec < 90 (and ra finite), got ra={self.ra!r}, dec={self.dec!r}")
        # the injected truths need room: edge margin on both sides
        margin = self.isolation_radius
        if min(shape) <= 2 * margin + 2 and any(
            self.counts()[k] for k in ("n_transients", "n_negative_transients", "n_variables", "n_movers")
        ):
            _fail("size", f"{shape} leaves no room for injected truths kept {margin:.1f} px from the edges")

    # derived quantities ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return self.size  # type: ignore[return-value]

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x_min, x_max, y_min, y_max)`` in parent pixels, inclusive-exclusive."""
        ny, nx = self.shape
        x0, y0 = self.xy0
        return x0, x0 + nx, y0, y0 + ny

    @property
    def resolved_template_sky_level(self) -> float:
        return self.sky_level / self.flux_scale if self.template_sky_level is None else float(self.template_sky_level)

    @property
    def template_gain(self) -> float:
        """Effective template gain :math:`g / f^2` (e⁻/count)."""
        return self.gain / self.template_noise_factor**2

    @property
    def template_read_noise(self) -> float:
        """Effective template read noise :math:`R / f` (e⁻)."""
        return self.read_noise / self.template_noise_factor

    @property
    def isolation_radius(self) -> float:
        """Minimum distance (px) of injected truths from each other and from the edges:
        ``3 FWHM_max + 10 + mover_shift_max``."""
        fmax = max(
            self.science_fwhm * (1 + _gradient_span(self.science_fwhm_gradient) / 2),
            self.template_fwhm * (1 + _gradient_span(self.template_fwhm_gradient) / 2),
        )
        return 3.0 * fmax + 10.0 + self.mover_shift[1]

    def counts(self) -> dict[str, int]:
        """Resolved numbers of each component (``None`` fields scaled with the area)."""
        ny, nx = self.shape
        out = {}
        for name, per in _DENSITY.items():
            v = getattr(self, name)
            if v is None:
                scale = nx / 1024.0 if name == "n_bad_columns" else nx * ny / 1024.0**2
                v = max(1, int(round(per * scale)))
            out[name] = int(v)
        out["n_template_bad_columns"] = int(self.n_template_bad_columns)
        return out

    def sky_noise(self, epoch: str = "science") -> float:
        r"""σ (counts) of an empty pixel at the image centre: :math:`\sqrt{B/g + (R/g)^2}`."""
        if epoch == "science":
            b, g, r = self.sky_level, self.gain, self.read_noise
        elif epoch == "template":
            b, g, r = self.resolved_template_sky_level, self.template_gain, self.template_read_noise
        else:
            raise InputError(f"epoch must be 'science' or 'template', got {epoch!r}")
        return math.sqrt(b / g + (r / g) ** 2)

    def replace(self, **changes) -> SimConfig:
        """A copy with some fields changed (unknown names raise :class:`ConfigError`)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def _check_names(changes: dict) -> None:
    known = [f.name for f in dataclasses.fields(SimConfig)]
    for name in changes:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"SimConfig has no field {name!r}{hint}")


def _gradient_xy(g) -> tuple[float, float]:
    """``(gx, gy)`` edge-to-edge fractional FWHM changes of a scalar (corner-to-corner) or pair gradient."""
    if isinstance(g, (tuple, list, np.ndarray)):
        return float(g[0]), float(g[1])
    return float(g) / 2.0, float(g) / 2.0


def _gradient_span(g) -> float:
    """Largest fractional FWHM change over the image (corner to opposite corner)."""
    gx, gy = _gradient_xy(g)
    return abs(gx) + abs(gy)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def template_mapping(config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    r"""The affine map science pixel → template pixel, :math:`t = A s + b`, as ``(A, b)``.

    :math:`A = R(\theta)` (``template_rotation``), :math:`b = c - A c + \delta` with :math:`c` the
    science image centre and :math:`\delta` ``template_offset``.
    """
    th = math.radians(config.template_rotation)
    a = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    x_min, x_max, y_min, y_max = config.bbox
    c = np.array([0.5 * (x_min + x_max - 1), 0.5 * (y_min + y_max - 1)])
    return a, c - a @ c + np.asarray(config.template_offset, dtype=np.float64)


def to_template(config: SimConfig, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Template pixel positions of science pixel positions ``(x, y)``."""
    if config.template_rotation == 0.0:  # the plain shift, bit for bit as before rotations existed
        dx, dy = config.template_offset
        return np.asarray(x, dtype=np.float64) + dx, np.asarray(y, dtype=np.float64) + dy
    a, b = template_mapping(config)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return a[0, 0] * x + a[0, 1] * y + b[0], a[1, 0] * x + a[1, 1] * y + b[1]


def from_template(config: SimConfig, u, v) -> tuple[np.ndarray, np.ndarray]:
    """Science pixel positions of template pixel positions ``(u, v)``."""
    a, b = template_mapping(config)
    inv = np.linalg.inv(a)
    u, v = np.asarray(u, dtype=np.float64) - b[0], np.asarray(v, dtype=np.float64) - b[1]
    return inv[0, 0] * u + inv[0, 1] * v, inv[1, 0] * u + inv[1, 1] * v


def _field_margin(config: SimConfig) -> int:
    """Pixels by which the star field extends beyond the science frame so that it fills the template too
    (0 for the small shifts of one survey grid: the field then stays bit for bit what it was)."""
    dx, dy = config.template_offset
    if config.template_rotation == 0.0 and max(abs(dx), abs(dy)) <= 5:
        return 0
    ny, nx = config.shape
    turn = math.sin(math.radians(abs(config.template_rotation))) * 0.5 * math.hypot(nx, ny)
    return int(math.ceil(max(abs(dx), abs(dy)) + turn)) + 2

def power_law_fluxes(rng: np.random.Generator, n: int, min_flux: float, max_flux: float, slope: float) -> np.ndarray:
    r"""Draw ``n`` fluxes from :math:`dN/dF \propto F^{-a}` on ``[min_flux, max_flux]``.

    Inverse-CDF sampling: :math:`F = [F_0^{1-a} + u (F_1^{1-a} - F_0^{1-a})]^{1/(1-a)}`,
    or :math:`F = F_0 (F_1/F_0)^u` when :math:`a = 1`.
    """
    u = rng.random(n)
    if max_flux == min_flux:
        return np.full(n, float(min_flux))
    if abs(slope - 1.0) < 1e-12:
        return min_flux * (max_flux / min_flux) ** u
    p = 1.0 - slope
    lo, hi = min_flux**p, max_flux**p
    return (lo + u * (hi - lo)) ** (1.0 / p)


def _log_uniform(rng: np.random.Generator, n: int, bounds: tuple[float, float]) -> np.ndarray:
    lo, hi = bounds
    return np.exp(rng.uniform(math.log(lo), math.log(hi), n)) if hi > lo else np.full(n, float(lo))


def _uv(x, y, bbox: tuple[int, int, int, int]):
    """Map parent pixels to ``u, v ∈ [-1, 1]`` across the image edges."""
    x_min, x_max, y_min, y_max = bbox
    u = 2.0 * (np.asarray(x, dtype=np.float64) - (x_min - 0.5)) / (x_max - x_min) - 1.0
    v = 2.0 * (np.asarray(y, dtype=np.float64) - (y_min - 0.5)) / (y_max - y_min) - 1.0
    return u, v


def _sky_at(config: SimConfig, epoch: str, x, y) -> np.ndarray:
    level = config.sky_level if epoch == "science" else config.resolved_template_sky_level
    gx, gy = config.sky_gradient
    u, v = _uv(x, y, config.bbox)
    return level * (1.0 + 0.5 * (gx * u + gy * v))


def sky_model(config: SimConfig, epoch: str = "science") -> np.ndarray:
    r"""The smooth sky (counts, float64) of ``epoch`` on its pixel grid.

    :math:`B(u, v) = B_0 [1 + \tfrac12 (g_x u + g_y v)]` with :math:`u, v \in [-1, 1]`
    from edge to edge; :math:`B_0` is ``sky_level`` (science) or
    ``template_sky_level`` (template, default ``sky_level / flux_scale``).
    """
    if epoch not in ("science", "template"):
        raise InputError(f"epoch must be 'science' or 'template', got {epoch!r}")
    x_min, x_max, y_min, y_max = config.bbox
    xs = np.arange(x_min, x_max, dtype=np.float64)
    ys = np.arange(y_min, y_max, dtype=np.float64)
    return _sky_at(config, epoch, xs[None, :], ys[:, None])


def _make_psf(config: SimConfig, epoch: str) -> VaryingPsf:
    c0 = config.science_fwhm if epoch == "science" else config.template_fwhm
    gx, gy = _gradient_xy(config.science_fwhm_gradient if epoch == "science" else config.template_fwhm_gradient)
    x_min, x_max, y_min, y_max = config.bbox
    return VaryingPsf(
        profile=config.psf_profile,
        fwhm_coeffs=(c0, c0 * gx / 2.0, c0 * gy / 2.0),
        bbox=(x_min - 0.5, x_max - 0.5, y_min - 0.5, y_max - 0.5),
        beta=config.moffat_beta,
    )


def _profile(psf: Psf, x: float, y: float) -> tuple[str, float, float] | None:
    """``(profile, fwhm, beta)`` of an analytic circular PSF at (x, y), else ``None``."""
    if isinstance(psf, VaryingPsf) and psf.ellipticity == 0:
        return psf.profile, psf.fwhm(x, y), psf.beta
    if isinstance(psf, GaussianPsf) and psf.sigma_x == psf.sigma_y:
        return "gaussian", psf.fwhm(), 0.0
    if isinstance(psf, MoffatPsf):
        return "moffat", psf.fwhm_pixels, psf.beta
    return None


def _level_radius(profile: str, fwhm: float, beta: float, level) -> np.ndarray:
    r"""Radius (px) where the unit-flux profile falls to ``level`` (0 where its peak is lower).

    Gaussian: :math:`P(r) = e^{-r^2/2\sigma^2} / 2\pi\sigma^2`; Moffat:
    :math:`P(r) = \frac{\beta - 1}{\pi\alpha^2} (1 + r^2/\alpha^2)^{-\beta}`.
    """
    level = np.maximum(np.asarray(level, dtype=np.float64), 1e-300)
    if profile == "gaussian":
        s = fwhm / FWHM_PER_SIGMA
        ratio = 1.0 / (2 * math.pi * s * s) / level
        return np.where(ratio > 1, s * np.sqrt(2.0 * np.log(np.maximum(ratio, 1.0))), 0.0)
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    ratio = (beta - 1.0) / (math.pi * alpha * alpha) / level
    return np.where(ratio > 1, alpha * np.sqrt(np.maximum(ratio, 1.0) ** (1.0 / beta) - 1.0), 0.0)


def _enclosed_radius(profile: str, fwhm: float, beta: float, fraction: float = _ENCLOSED) -> float:
    r"""Radius holding ``fraction`` of the flux: Gaussian :math:`\sigma\sqrt{-2\ln(1-p)}`,
    Moffat :math:`\alpha\sqrt{(1-p)^{1/(1-\beta)} - 1}`."""
    if profile == "gaussian":
        return fwhm / FWHM_PER_SIGMA * math.sqrt(-2.0 * math.log(1.0 - fraction))
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return alpha * math.sqrt((1.0 - fraction) ** (1.0 / (1.0 - beta)) - 1.0)


def _stamp_sizes(psf: Psf, x: np.ndarray, y: np.ndarray, flux: np.ndarray, noise: float | None) -> np.ndarray:
    """Odd stamp sides: at least ``psf.default_size``, holding ≥ 99.9 % of the flux of an analytic
    profile and, when ``noise`` is given, reaching where the wings fall below 0.1 × noise."""
    sizes = np.empty(len(x), dtype=np.int64)
    for i in range(len(x)):
        base = psf.default_size(x[i], y[i])
        prof = _profile(psf, x[i], y[i])
        if prof is None:
            sizes[i] = base
            continue
        r = _enclosed_radius(*prof)
        if noise is not None and noise > 0 and flux[i] > 0:
            r = max(r, float(_level_radius(*prof, _WING_NSIGMA * noise / flux[i])))
        side = 2 * int(math.ceil(r)) + 1
        sizes[i] = min(max(side, base), _MAX_STAMP)
    return sizes


def _render(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: Psf,
    *,
    xy0: tuple[int, int],
    sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Add ``flux × stamp`` at each position; return each stamp's effective area 1/ΣP² and peak."""
    neff = np.empty(len(x))
    peak = np.empty(len(x))
    for s in point_source_stamps(x, y, flux, psf, xy0=xy0, shape=image.shape, sizes=sizes):
        neff[s.index], peak[s.index] = s.neff, s.peak
        if s.model.size:
            image[s.window] += s.model.astype(image.dtype)
    return neff, peak


def add_sources(
    image: np.ndarray,
    x: float | Sequence[float] | np.ndarray,
    y: float | Sequence[float] | np.ndarray,
    flux: float | Sequence[float] | np.ndarray,
    psf: Psf,
    *,
    xy0: tuple[int, int] = (0, 0),
    size: int | Sequence[int] | np.ndarray | None = None,
) -> None:
    r"""Add point sources to ``image`` in place, as flux-normalized PSF stamps.

    Each source at parent position :math:`(x, y)` is rendered with
    ``psf.kernel_image(x, y, size=s, offset=(x - x_0 - i, y - y_0 - j))`` — an odd
    :math:`s \times s` stamp of unit sum centred on pixel :math:`(i, j) = \mathrm{round}(x - x_0, y - y_0)`
    plus the sub-pixel offset — and :math:`F \cdot P` is added over the part of the
    stamp inside the image (stamps are clipped at the border; a fully inside stamp adds
    exactly :math:`F`).

    Parameters
    ----------
    image : ndarray (float32 or float64), shape (ny, nx)
        Modified in place.
    x, y : float or array
        Parent-frame pixel positions.
    flux : float or array
        Counts of each source (broadcast against ``x``).
    psf : Psf
        PSF model in the parent frame (spatially varying models are evaluated at each source).
    xy0 : (int, int)
        Parent-frame origin of ``image``.
    size : int or array, optional
        Stamp side(s), odd.  Default: at least ``psf.default_size(x, y)`` and, for analytic
        Gaussian/Moffat profiles, large enough to hold ≥ 99.9 % of the flux.
    """
    image_arr = image
    if not isinstance(image_arr, np.ndarray) or image_arr.ndim != 2 or not np.issubdtype(image_arr.dtype, np.floating):
        raise InputError("add_sources: image must be a 2-D floating-point numpy array")
    x_arr, y_arr, f_arr = np.broadcast_arrays(
        np.atleast_1d(np.asarray(x, dtype=np.float64)),
        np.atleast_1d(np.asarray(y, dtype=np.float64)),
        np.atleast_1d(np.asarray(flux, dtype=np.float64)),
    )
    if x_arr.ndim != 1:
        raise InputError(f"add_sources: x, y and flux must be scalars or 1-D, got shape {x_arr.shape}")
    if not (np.all(np.isfinite(x_arr)) and np.all(np.isfinite(y_arr)) and np.all(np.isfinite(f_arr))):
        raise InputError("add_sources: x, y and flux must be finite")
    if size is None:
        sizes = _stamp_sizes(psf, x_arr, y_arr, f_arr, None)
    else:
        sizes = np.broadcast_to(np.asarray(size, dtype=np.int64), x_arr.shape)
        if np.any(sizes < 1) or np.any(sizes % 2 == 0):
            raise InputError(f"add_sources: stamp sizes must be positive odd integers, got {size!r}")
    _render(image_arr, x_arr, y_arr, f_arr, psf, xy0=(int(xy0[0]), int(xy0[1])), sizes=sizes)


def _place(
    rng: np.random.Generator,
    n: int,
    config: SimConfig,
    placed: list[np.ndarray],
    avoid_xy: np.ndarray,
    avoid_r: np.ndarray,
    *,
    field: str,
) -> np.ndarray:
    """Rejection-sample ``n`` positions ≥ isolation radius from edges, ``placed`` and ``avoid`` (radius each)."""
    if n == 0:
        return np.empty((0, 2))
    sep = config.isolation_radius
    x_min, x_max, y_min, y_max = config.bbox
    lo_x, hi_x = x_min + sep, x_max - 1 - sep
    lo_y, hi_y = y_min + sep, y_max - 1 - sep
    if hi_x <= lo_x or hi_y <= lo_y:
        raise ConfigError(f"SimConfig.{field}: the image is too small to keep injected truths {sep:.1f} px from its edges")
    have = np.concatenate(placed, axis=0) if placed else np.empty((0, 2))
    check_template = _field_margin(config) > 0
    out: list[tuple[float, float]] = []
    tries, max_tries = 0, 2000 + 500 * n
    sep2 = sep * sep
    while len(out) < n:
        batch = np.column_stack([rng.uniform(lo_x, hi_x, 128), rng.uniform(lo_y, hi_y, 128)])
        for cx, cy in batch:
            tries += 1
            if tries > max_tries:
                raise ConfigError(
                    f"SimConfig.{field}: could only place {len(out)} of {n} sources {sep:.1f} px apart and away from "
                    f"bright stars; lower {field} (or the other counts) or enlarge the image"
                )
            if len(have) and np.min((have[:, 0] - cx) ** 2 + (have[:, 1] - cy) ** 2) <= sep2:
                continue
            if len(avoid_xy):
                d2 = (avoid_xy[:, 0] - cx) ** 2 + (avoid_xy[:, 1] - cy) ** 2
                if np.any(d2 <= (sep + avoid_r) ** 2):
                    continue
            if check_template:  # where the template has data too
                tx, ty = to_template(config, cx, cy)
                if not (lo_x <= tx <= hi_x and lo_y <= ty <= hi_y):
                    continue
            out.append((cx, cy))
            have = np.vstack([have, [[cx, cy]]])
            if len(out) == n:
                break
    return np.asarray(out, dtype=np.float64)


def _mjd_to_iso(mjd: float) -> str:
    from astropy.time import Time

    return Time(mjd, format="mjd", scale="utc").isot


def _make_wcs(config: SimConfig, epoch: str):
    r"""TAN WCS in the parent frame (0-based pixels): the science image centre sits at (ra, dec).

    The template's WCS follows :func:`template_mapping` (:math:`t = A s + b`):
    :math:`\mathrm{CD}_t = \mathrm{CD}_s A^{-1}` and its CRPIX is the template pixel of the science centre."""
    from astropy.wcs import WCS

    x_min, x_max, y_min, y_max = config.bbox
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [config.ra, config.dec]
    cx, cy = 0.5 * (x_min + x_max - 1), 0.5 * (y_min + y_max - 1)
    s = config.pixel_scale / 3600.0
    cd = np.array([[-s, 0.0], [0.0, s]])
    if epoch == "template":
        cx, cy = (float(v) for v in to_template(config, cx, cy))
        if config.template_rotation != 0.0:
            cd = cd @ np.linalg.inv(template_mapping(config)[0])
    # FITS CRPIX is 1-based: parent 0-based pixel p ↔ FITS p + 1
    w.wcs.crpix = [cx + 1.0, cy + 1.0]
    w.wcs.cd = cd.tolist()
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


def _noisy(
    sources: np.ndarray, config: SimConfig, epoch: str, gain: float, read_noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    r"""Draw :math:`I = [\mathrm{Poisson}(gE) + \mathcal N(0, R^2)]/g` and :math:`V = E/g + (R/g)^2` in row blocks."""
    ny, nx = sources.shape
    x_min, x_max, y_min, _ = config.bbox
    xs = np.arange(x_min, x_max, dtype=np.float64)
    image = np.empty((ny, nx), dtype=np.float32)
    variance = np.empty((ny, nx), dtype=np.float32)
    rn2 = (read_noise / gain) ** 2
    for r0 in range(0, ny, _BLOCK_ROWS):
        r1 = min(r0 + _BLOCK_ROWS, ny)
        ys = np.arange(y_min + r0, y_min + r1, dtype=np.float64)
        expected = _sky_at(config, epoch, xs[None, :], ys[:, None]) + sources[r0:r1]
        np.maximum(expected, 0.0, out=expected)
        electrons = rng.poisson(expected * gain).astype(np.float64)
        if read_noise > 0:
            electrons += rng.normal(0.0, read_noise, size=electrons.shape)
        image[r0:r1] = electrons / gain
        variance[r0:r1] = expected / gain + rn2
    return image, variance


# ---------------------------------------------------------------------------------------------
# the pair
# ---------------------------------------------------------------------------------------------
@dataclass
class SimulatedPair:
    r"""A simulated science/template pair and the truth of everything injected.

    Attributes
    ----------
    science, template : Exposure
        Same parent bbox (``config.xy0``, ``config.shape``); the template's pixel grid is
        shifted by ``config.template_offset`` on the sky (see its WCS).
    truth : pandas.DataFrame
        One row per injected object, columns :data:`TRUTH_COLUMNS`:

        ``id`` (1…), ``kind`` (:data:`TRUTH_KINDS`), ``epoch`` (``both``/``science``/``template``),
        ``x, y`` (science parent-frame position; for template-only objects, where they fall on the
        science grid), ``template_x, template_y`` (template pixel = science-epoch-time position + offset),
        ``x_at_template_epoch, y_at_template_epoch`` (position at the template epoch on the science
        grid; differs from ``x, y`` only for movers), ``ra, dec`` (deg, of ``x, y``),
        ``science_flux, template_flux`` (counts in each image; constant sources have
        ``science_flux = κ template_flux``), ``difference_flux`` (:math:`F_s - \kappa F_t`, science
        counts: the net flux of the object in the difference), ``snr_difference`` (expected PSF-fit
        S/N in the difference, see below), ``science_fwhm, template_fwhm`` (PSF FWHM at the object),
        ``saturated`` (its central pixel is ``SAT`` in either image), ``npix`` (pixels hit by a cosmic
        ray or length of a bad column; 0 for PSF sources).

        The expected S/N of a point source of difference flux :math:`\Delta F` is
        :math:`|\Delta F| / \sigma` with
        :math:`\sigma^2 = n_s V_s + F_s/g + \kappa^2 (n_t V_t + F_t/g_t)`, where
        :math:`n = 1/\sum P^2` is the PSF's effective area, :math:`V` the local sky variance per
        pixel (sky Poisson + read noise) and :math:`F/g` the source's own Poisson term.  Movers
        are dipoles with net flux 0: their S/N is that of one lobe (:math:`\Delta F \to F_s`,
        :math:`F_t \to 0`).  Constant stars have S/N 0; cosmic rays and bad columns NaN.
    config : SimConfig
    """

    science: Exposure
    template: Exposure
    truth: pd.DataFrame
    config: SimConfig

    def sky_model(self, epoch: str = "science") -> np.ndarray:
        """The smooth sky (counts) that was added to ``epoch`` (see :func:`sky_model`)."""
        return sky_model(self.config, epoch)

    def truth_of(self, kind: str) -> pd.DataFrame:
        """Rows of one kind."""
        if kind not in TRUTH_KINDS:
            close = difflib.get_close_matches(kind, TRUTH_KINDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"unknown truth kind {kind!r}{hint} (known: {', '.join(TRUTH_KINDS)})")
        return self.truth[self.truth["kind"] == kind]


def simulate_pair(config: SimConfig | None = None, **overrides: Any) -> SimulatedPair:
    """Simulate a science/template pair and its truth table.

    Parameters
    ----------
    config : SimConfig, optional
        Defaults to ``SimConfig()``.
    **overrides
        Field changes applied on top of ``config`` (unknown names raise :class:`ConfigError`).

    Returns
    -------
    SimulatedPair

    Notes
    -----
    Same configuration (and seed) → identical arrays, truth and written bytes.
    """
    if config is None:
        _check_names(overrides)
        config = SimConfig(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    elif not isinstance(config, SimConfig):
        raise ConfigError(f"simulate_pair: config must be a SimConfig, got {type(config).__name__}")

    streams = dict(zip(_STREAMS, np.random.SeedSequence(config.seed).spawn(len(_STREAMS))))
    rng = {k: np.random.default_rng(s) for k, s in streams.items()}
    counts = config.counts()
    ny, nx = config.shape
    x_min, x_max, y_min, y_max = config.bbox
    xy0 = config.xy0
    kappa = config.flux_scale
    dx, dy = config.template_offset
    sci_psf, tmp_psf = _make_psf(config, "science"), _make_psf(config, "template")
    sigma_s, sigma_t = config.sky_noise("science"), config.sky_noise("template")
    sep = config.isolation_radius

    # --- field stars -------------------------------------------------------------------------
    n = counts["n_stars"]
    r = rng["stars"]
    star_x = r.uniform(x_min - 0.5, x_max - 0.5, n)
    star_y = r.uniform(y_min - 0.5, y_max - 0.5, n)
    star_f = power_law_fluxes(r, n, config.star_min_flux, config.star_max_flux, config.star_flux_slope)
    margin = _field_margin(config)
    if margin:
        # the same density over the frame grown by the margin (the template sees beyond the science frame)
        grown = (nx + 2 * margin) * (ny + 2 * margin)
        n_more = int(round(n * (grown - nx * ny) / (nx * ny)))
        gx_ = r.uniform(x_min - 0.5 - margin, x_max - 0.5 + margin, 4 * n_more + 16)
        gy_ = r.uniform(y_min - 0.5 - margin, y_max - 0.5 + margin, 4 * n_more + 16)
        outside = (gx_ < x_min - 0.5) | (gx_ >= x_max - 0.5) | (gy_ < y_min - 0.5) | (gy_ >= y_max - 0.5)
        gx_, gy_ = gx_[outside][:n_more], gy_[outside][:n_more]
        star_x = np.concatenate([star_x, gx_])
        star_y = np.concatenate([star_y, gy_])
        star_f = np.concatenate([star_f, power_law_fluxes(r, len(gx_), config.star_min_flux, config.star_max_flux,
                                                          config.star_flux_slope)])

    # --- saturated stars: peak pixel = saturated_peak × saturation ----------------------------
    n = counts["n_saturated"]
    r = rng["saturated"]
    m = min(10.0, (min(nx, ny) - 1) / 2.0)
    sat_x = r.uniform(x_min + m, x_max - 1 - m, n)
    sat_y = r.uniform(y_min + m, y_max - 1 - m, n)
    sat_ratio = _log_uniform(r, n, config.saturated_peak)
    sat_f = np.empty(n)
    for i in range(n):
        ix, iy = math.floor(sat_x[i] + 0.5), math.floor(sat_y[i] + 0.5)
        k = sci_psf.kernel_image(sat_x[i], sat_y[i], offset=(sat_x[i] - ix, sat_y[i] - iy))
        sat_f[i] = sat_ratio[i] * config.saturation / float(k.max())

    # --- what injected truths keep away from: saturated stars and field stars above 5σ -------
    def bright_radius(xs, ys, fs):
        rad = np.zeros(len(xs))
        for i in range(len(xs)):
            prof = _profile(sci_psf, xs[i], ys[i])
            rad[i] = float(_level_radius(*prof, _BRIGHT_NSIGMA * sigma_s / fs[i])) if sigma_s > 0 else 0.0
        return rad

    avoid_xy = np.column_stack([np.concatenate([star_x, sat_x]), np.concatenate([star_y, sat_y])])
    avoid_r = bright_radius(avoid_xy[:, 0], avoid_xy[:, 1], np.concatenate([star_f, sat_f]))
    keep = avoid_r > 0
    keep[len(star_x):] = True  # saturated stars always
    avoid_xy, avoid_r = avoid_xy[keep], avoid_r[keep]

    # --- transients, negative transients, variables, movers ----------------------------------
    placed: list[np.ndarray] = []
    special = {}
    for kind, field in (
        ("transient", "n_transients"),
        ("negative_transient", "n_negative_transients"),
        ("variable", "n_variables"),
        ("mover", "n_movers"),
    ):
        stream = {"transient": "transients", "negative_transient": "negative_transients",
                  "variable": "variables", "mover": "movers"}[kind]
        pos = _place(rng[stream], counts[field], config, placed, avoid_xy, avoid_r, field=field)
        placed.append(pos)
        special[kind] = pos

    r = rng["transients"]
    tr_f = _log_uniform(r, len(special["transient"]), config.transient_flux)
    r = rng["negative_transients"]
    neg_f = _log_uniform(r, len(special["negative_transient"]), config.transient_flux)  # science-count scale
    r = rng["variables"]
    nv = len(special["variable"])
    var_f = _log_uniform(r, nv, config.variable_flux)  # template-epoch flux, science counts
    var_ratio = _log_uniform(r, nv, config.variable_amplitude) ** np.where(r.random(nv) < 0.5, -1.0, 1.0)
    r = rng["movers"]
    nm = len(special["mover"])
    mov_f = _log_uniform(r, nm, config.mover_flux)
    mov_step = r.uniform(*config.mover_shift, nm)
    mov_angle = r.uniform(0.0, 2.0 * math.pi, nm)
    mov_prev = special["mover"] + np.column_stack([mov_step * np.cos(mov_angle), mov_step * np.sin(mov_angle)])

    special_xy = np.concatenate(placed, axis=0) if placed else np.empty((0, 2))

    # --- cosmic rays (science only), away from the injected truths ----------------------------
    r = rng["cosmic_rays"]
    cr_pixels: list[np.ndarray] = []  # (k, 3): local col, local row, counts
    cr_tries = 0
    while len(cr_pixels) < counts["n_cosmic_rays"]:
        cr_tries += 1
        if cr_tries > 1000 + 100 * counts["n_cosmic_rays"]:
            raise ConfigError("SimConfig.n_cosmic_rays: cannot place that many hits away from the injected truths")
        cx = int(r.integers(2, nx - 2))
        cy = int(r.integers(2, ny - 2))
        npix = int(r.integers(1, 5))
        total = float(_log_uniform(r, 1, config.cosmic_ray_flux)[0])
        steps = r.integers(-1, 2, size=(8, 2))
        weights = r.uniform(0.3, 1.0, npix)
        if len(special_xy) and np.min((special_xy[:, 0] - (cx + xy0[0])) ** 2
                                      + (special_xy[:, 1] - (cy + xy0[1])) ** 2) <= sep * sep:
            continue
        pix = [(cx, cy)]
        for sx, sy in steps:
            if len(pix) == npix:
                break
            px, py = pix[-1][0] + int(sx), pix[-1][1] + int(sy)
            if (px, py) not in pix and 0 <= px < nx and 0 <= py < ny:
                pix.append((px, py))
        w = weights[: len(pix)]
        w = total * w / w.sum()
        cr_pixels.append(np.column_stack([np.asarray(pix, dtype=np.float64), w]))

    # --- bad columns ---------------------------------------------------------------------------
    def bad_columns(rr: np.random.Generator, n: int, frame_offset: float, field: str):
        cols: list[tuple[int, int, int, str, float]] = []  # col, row0, row1, kind, value
        tries = 0
        while len(cols) < n:
            tries += 1
            if tries > 1000 + 100 * n:
                raise ConfigError(f"SimConfig.{field}: cannot place that many bad columns away from the injected truths")
            col = int(rr.integers(2, nx - 2))
            full = rr.random() < 0.5
            start = int(rr.integers(0, ny))
            upward = rr.random() < 0.5
            junk = ("hot", "dead", "noisy")[int(rr.integers(0, 3))]
            value = float(rr.uniform(0.3, 1.0))
            xc = col + xy0[0] - frame_offset
            if any(c[0] == col for c in cols):
                continue
            # a column stops short of any injected truth within the isolation radius
            near = special_xy[np.abs(special_xy[:, 0] - xc) <= sep, 1] - xy0[1] if len(special_xy) else np.empty(0)
            if len(near) == 0 and full:
                r0, r1 = 0, ny
            else:
                if np.any(np.abs(near - start) <= sep):
                    continue
                if upward:
                    above = near[near > start]
                    r0, r1 = start, int(min(ny, math.floor(above.min() - sep))) if len(above) else ny
                else:
                    below = near[near < start]
                    r0, r1 = (int(max(0, math.ceil(below.max() + sep))) if len(below) else 0), start + 1
            if r1 - r0 < max(ny // 16, 8):
                continue
            cols.append((col, r0, r1, junk, value))
        return cols

    sci_cols = bad_columns(rng["bad_columns"], counts["n_bad_columns"], 0.0, "n_bad_columns")
    tmp_cols = bad_columns(rng["template_bad_columns"], counts["n_template_bad_columns"], dx, "n_template_bad_columns")

    # --- render the noiseless source models ----------------------------------------------------
    tr_xy, neg_xy, var_xy, mov_xy = (special[k] for k in ("transient", "negative_transient", "variable", "mover"))
    sci_x = np.concatenate([star_x, sat_x, tr_xy[:, 0], var_xy[:, 0], mov_xy[:, 0]])
    sci_y = np.concatenate([star_y, sat_y, tr_xy[:, 1], var_xy[:, 1], mov_xy[:, 1]])
    sci_f = np.concatenate([star_f, sat_f, tr_f, var_f * var_ratio, mov_f])
    tmp_x, tmp_y = to_template(config, np.concatenate([star_x, sat_x, neg_xy[:, 0], var_xy[:, 0], mov_prev[:, 0]]),
                               np.concatenate([star_y, sat_y, neg_xy[:, 1], var_xy[:, 1], mov_prev[:, 1]]))
    tmp_f = np.concatenate([star_f, sat_f, neg_f, var_f, mov_f]) / kappa

    sci_model = np.zeros((ny, nx), dtype=np.float32)
    sci_sizes = _stamp_sizes(sci_psf, sci_x, sci_y, sci_f, sigma_s)
    sci_neff, _ = _render(sci_model, sci_x, sci_y, sci_f, sci_psf, xy0=xy0, sizes=sci_sizes)
    for hit in cr_pixels:
        sci_model[hit[:, 1].astype(np.int64), hit[:, 0].astype(np.int64)] += hit[:, 2].astype(np.float32)
    tmp_model = np.zeros((ny, nx), dtype=np.float32)
    tmp_sizes = _stamp_sizes(tmp_psf, tmp_x, tmp_y, tmp_f, sigma_t)
    tmp_neff, _ = _render(tmp_model, tmp_x, tmp_y, tmp_f, tmp_psf, xy0=xy0, sizes=tmp_sizes)
    galaxies = _galaxies(config, rng["galaxies"])
    _render_galaxies(sci_model, galaxies, sci_psf, config, "science")
    _render_galaxies(tmp_model, galaxies, tmp_psf, config, "template")

    # --- noise, saturation, defects, masks -----------------------------------------------------
    planes = MaskPlanes()
    exposures = {}
    for epoch, model, gain, rn, cols in (
        ("science", sci_model, config.gain, config.read_noise, sci_cols),
        ("template", tmp_model, config.template_gain, config.template_read_noise, tmp_cols),
    ):
        image, variance = _noisy(model, config, epoch, gain, rn, rng[f"{epoch}_noise"])
        del model
        mask = np.zeros((ny, nx), dtype=MASK_DTYPE)
        sat = image >= config.saturation
        image[sat] = config.saturation
        mask[sat] |= planes.bitmask("SAT")
        del sat
        if epoch == "science" and config.mask_cosmic_rays:
            for hit in cr_pixels:
                mask[hit[:, 1].astype(np.int64), hit[:, 0].astype(np.int64)] |= planes.bitmask("CR")
        level = config.sky_level if epoch == "science" else config.resolved_template_sky_level
        noise = config.sky_noise(epoch)
        for col, r0, r1, junk, value in cols:
            if junk == "hot":
                image[r0:r1, col] = config.saturation * value
            elif junk == "dead":
                image[r0:r1, col] = level * value * 0.05
            else:
                # deterministic junk: an alternating pattern of ±(10–30)σ about the sky
                k = np.arange(r1 - r0)
                image[r0:r1, col] = level + (10 + 20 * value) * noise * np.where(k % 2 == 0, 1.0, -1.0)
            mask[r0:r1, col] |= planes.bitmask("BAD")
        if config.sky_subtracted:
            x_lo, x_hi, y_lo, y_hi = config.bbox
            xs = np.arange(x_lo, x_hi, dtype=np.float64)
            for r0 in range(0, ny, _BLOCK_ROWS):
                r1 = min(r0 + _BLOCK_ROWS, ny)
                ys = np.arange(y_lo + r0, y_lo + r1, dtype=np.float64)
                image[r0:r1] -= _sky_at(config, epoch, xs[None, :], ys[:, None]).astype(np.float32)
        zp = config.zero_point if epoch == "science" else config.zero_point - 2.5 * math.log10(kappa)
        mjd = config.mjd_obs if epoch == "science" else config.template_mjd_obs
        info = ExposureInfo(
            band=config.band,
            visit=config.visit if epoch == "science" else config.template_visit,
            detector=config.detector,
            gain=float(gain),
            read_noise=float(rn),
            saturation=float(config.saturation),
            exposure_time=float(config.exposure_time if epoch == "science" else config.template_exposure_time),
            date_obs=_mjd_to_iso(mjd),
            mjd_obs=float(mjd),
            photo_calib=PhotoCalib(zero_point=float(zp)),
            variance_source="simulated truth",
        )
        exposures[epoch] = Exposure.from_arrays(
            image,
            variance,
            mask,
            xy0=xy0,
            mask_planes=planes,
            wcs=_make_wcs(config, epoch),
            psf=sci_psf if epoch == "science" else tmp_psf,
            info=info,
            source=f"simulated {epoch}",
        )
        del image, variance, mask

    truth = _truth_table(
        config,
        exposures,
        sci_psf=sci_psf,
        tmp_psf=tmp_psf,
        stars=(star_x, star_y, star_f),
        saturated=(sat_x, sat_y, sat_f),
        transients=(tr_xy, tr_f),
        negatives=(neg_xy, neg_f),
        variables=(var_xy, var_f, var_ratio),
        movers=(mov_xy, mov_prev, mov_f),
        sci_neff=sci_neff,
        tmp_neff=tmp_neff,
        cosmic_rays=cr_pixels,
        sci_cols=sci_cols,
        tmp_cols=tmp_cols,
    )
    if len(galaxies):
        truth = _with_galaxies(truth, galaxies, config)
    return SimulatedPair(science=exposures["science"], template=exposures["template"], truth=truth, config=config)


def _galaxies(config: SimConfig, r: np.random.Generator) -> pd.DataFrame:
    """``n_galaxies`` static exponential discs: position, science flux, half-light radius, axis ratio, angle."""
    n = int(config.n_galaxies)
    x_min, x_max, y_min, y_max = config.bbox
    return pd.DataFrame({
        "x": r.uniform(x_min - 0.5, x_max - 0.5, n), "y": r.uniform(y_min - 0.5, y_max - 0.5, n),
        "flux": _log_uniform(r, n, config.galaxy_flux), "r_e": _log_uniform(r, n, config.galaxy_radius),
        "q": r.uniform(0.4, 1.0, n), "theta": r.uniform(0.0, math.pi, n),
    })


def _render_galaxies(model: np.ndarray, galaxies: pd.DataFrame, psf: Psf, config: SimConfig, epoch: str) -> None:
    """Add each galaxy to ``model`` (in place): the disc sampled 3×3 per pixel of this epoch's grid (template
    pixels mapped to the science frame, so a rotated template sees a rotated disc), scaled to its counts in
    this epoch (÷ κ in the template), convolved with the PSF at its position."""
    from .kernels.convolve import fft_convolve as fftconvolve

    if not len(galaxies):
        return
    ny, nx = model.shape
    x0, y0 = config.xy0
    b = 1.678  # exp(-b r / r_e) holds half its light within r_e
    sub = (np.arange(3) - 1.0) / 3.0
    for g in galaxies.itertuples():
        cx, cy = (g.x, g.y) if epoch == "science" else (float(v[0]) for v in to_template(config, np.array([g.x]),
                                                                                           np.array([g.y])))
        kernel = psf.kernel_image(g.x, g.y)
        h = int(math.ceil(6.0 * g.r_e)) + kernel.shape[0] // 2
        ix, iy = int(math.floor(cx - x0 + 0.5)), int(math.floor(cy - y0 + 0.5))
        u = (np.arange(-h, h + 1) + ix + x0)[None, :, None, None] + sub[None, None, None, :]
        v = (np.arange(-h, h + 1) + iy + y0)[:, None, None, None] + sub[None, None, :, None]
        u, v = np.broadcast_arrays(u, v)
        xs, ys = (u, v) if epoch == "science" else from_template(config, u, v)
        dx, dy = xs - g.x, ys - g.y
        c, s = math.cos(g.theta), math.sin(g.theta)
        a_ = (c * dx + s * dy) / g.r_e
        b_ = (-s * dx + c * dy) / (g.r_e * g.q)
        img = np.exp(-b * np.hypot(a_, b_)).mean(axis=(2, 3))
        img *= (g.flux if epoch == "science" else g.flux / config.flux_scale) / img.sum()
        img = fftconvolve(img, kernel, mode="same")
        ya, xa = iy - h, ix - h
        cya, cyb, cxa, cxb = max(ya, 0), min(iy + h + 1, ny), max(xa, 0), min(ix + h + 1, nx)
        if cya < cyb and cxa < cxb:
            model[cya:cyb, cxa:cxb] += img[cya - ya:cyb - ya, cxa - xa:cxb - xa].astype(model.dtype)


def _with_galaxies(truth: pd.DataFrame, galaxies: pd.DataFrame, config: SimConfig) -> pd.DataFrame:
    """The truth table with one ``galaxy`` row per disc (static: no difference flux)."""
    tx, ty = to_template(config, galaxies["x"].to_numpy(), galaxies["y"].to_numpy())
    rows = pd.DataFrame({"kind": "galaxy", "epoch": "both", "x": galaxies["x"], "y": galaxies["y"],
                         "template_x": tx, "template_y": ty, "science_flux": galaxies["flux"],
                         "template_flux": galaxies["flux"] / config.flux_scale, "difference_flux": 0.0,
                         "half_light_radius": galaxies["r_e"], "axis_ratio": galaxies["q"]})
    out = pd.concat([truth, rows], ignore_index=True)
    out["id"] = np.arange(1, len(out) + 1, dtype=out["id"].dtype if "id" in truth else np.int64)
    return out


def _neff_at(psf: Psf, x: np.ndarray, y: np.ndarray, xy0: tuple[int, int]) -> np.ndarray:
    out = np.empty(len(x))
    for i in range(len(x)):
        xl, yl = x[i] - xy0[0], y[i] - xy0[1]
        k = psf.kernel_image(x[i], y[i], offset=(xl - math.floor(xl + 0.5), yl - math.floor(yl + 0.5)))
        out[i] = 1.0 / float(np.sum(k * k))
    return out


def _truth_table(config: SimConfig, exposures: dict[str, Exposure], **parts) -> pd.DataFrame:  # noqa: C901
    kappa = config.flux_scale
    g_s, g_t = config.gain, config.template_gain
    rn_s, rn_t = config.read_noise / g_s, config.template_read_noise / g_t
    sci_psf, tmp_psf = parts["sci_psf"], parts["tmp_psf"]
    xy0 = config.xy0
    star_x, star_y, star_f = parts["stars"]
    sat_x, sat_y, sat_f = parts["saturated"]
    tr_xy, tr_f = parts["transients"]
    neg_xy, neg_f = parts["negatives"]
    var_xy, var_f, var_ratio = parts["variables"]
    mov_xy, mov_prev, mov_f = parts["movers"]
    sci_neff, tmp_neff = parts["sci_neff"], parts["tmp_neff"]
    ns, nsat, nt, nneg, nv, nm = len(star_x), len(sat_x), len(tr_f), len(neg_f), len(var_f), len(mov_f)

    # science-rendered order: stars, saturated, transients, variables, movers
    # template-rendered order: stars, saturated, negatives, variables, movers (at template epoch)
    def split(a, sizes):
        idx = np.cumsum(sizes)[:-1]
        return np.split(a, idx)

    s_star, s_sat, s_tr, s_var, s_mov = split(sci_neff, [ns, nsat, nt, nv, nm])
    t_star, t_sat, t_neg, t_var, t_mov = split(tmp_neff, [ns, nsat, nneg, nv, nm])

    frames: list[dict[str, np.ndarray]] = []

    def point(kind, epoch, x, y, xp, yp, fs, ft, neff_s, neff_t, lobe=None):
        n = len(x)
        x, y, xp, yp = (np.asarray(a, dtype=np.float64) for a in (x, y, xp, yp))
        fs = np.broadcast_to(np.asarray(fs, dtype=np.float64), (n,))
        ft = np.broadcast_to(np.asarray(ft, dtype=np.float64), (n,))
        diff = fs - kappa * ft
        vs = _sky_at(config, "science", x, y) / g_s + rn_s**2
        tx, ty = to_template(config, xp, yp)
        vt = _sky_at(config, "template", tx, ty) / g_t + rn_t**2
        if lobe is None:
            signal, src_t = np.abs(diff), ft
        else:  # dipole: one lobe, template noise without its source
            signal, src_t = lobe, np.zeros(n)
        var = neff_s * vs + fs / g_s + kappa**2 * (neff_t * vt + src_t / g_t)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(var > 0, signal / np.sqrt(var), np.where(signal > 0, np.inf, 0.0))
        frames.append(
            {
                "kind": np.full(n, kind, dtype=object),
                "epoch": np.full(n, epoch, dtype=object),
                "x": x,
                "y": y,
                "template_x": tx,
                "template_y": ty,
                "x_at_template_epoch": xp,
                "y_at_template_epoch": yp,
                "science_flux": np.array(fs, dtype=np.float64),
                "template_flux": np.array(ft, dtype=np.float64),
                "difference_flux": diff,
                "snr_difference": snr,
                "science_fwhm": np.array([sci_psf.fwhm(a, b) for a, b in zip(x, y)], dtype=np.float64),
                "template_fwhm": np.array([tmp_psf.fwhm(a, b) for a, b in zip(tx, ty)], dtype=np.float64),
                "npix": np.zeros(n, dtype=np.int64),
            }
        )

    point("star", "both", star_x, star_y, star_x, star_y, star_f, star_f / kappa, s_star, t_star)
    point("saturated_star", "both", sat_x, sat_y, sat_x, sat_y, sat_f, sat_f / kappa, s_sat, t_sat)
    t_for_tr = _neff_at(tmp_psf, *to_template(config, tr_xy[:, 0], tr_xy[:, 1]), xy0) if nt else np.empty(0)
    point("transient", "science", tr_xy[:, 0], tr_xy[:, 1], tr_xy[:, 0], tr_xy[:, 1], tr_f, 0.0, s_tr, t_for_tr)
    s_for_neg = _neff_at(sci_psf, neg_xy[:, 0], neg_xy[:, 1], xy0) if nneg else np.empty(0)
    point("negative_transient", "template", neg_xy[:, 0], neg_xy[:, 1], neg_xy[:, 0], neg_xy[:, 1],
          0.0, neg_f / kappa, s_for_neg, t_neg)
    point("variable", "both", var_xy[:, 0], var_xy[:, 1], var_xy[:, 0], var_xy[:, 1],
          var_f * var_ratio, var_f / kappa, s_var, t_var)
    t_at_sci = _neff_at(tmp_psf, *to_template(config, mov_xy[:, 0], mov_xy[:, 1]), xy0) if nm else np.empty(0)
    point("mover", "both", mov_xy[:, 0], mov_xy[:, 1], mov_prev[:, 0], mov_prev[:, 1],
          mov_f, mov_f / kappa, s_mov, t_at_sci, lobe=mov_f)

    nan = float("nan")

    def extended(kind, epoch, xs, ys, fs, ft, npix):
        n = len(xs)
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        fs, ft = np.asarray(fs, dtype=np.float64), np.asarray(ft, dtype=np.float64)
        txs, tys = to_template(config, xs, ys)
        frames.append(
            {
                "kind": np.full(n, kind, dtype=object),
                "epoch": np.full(n, epoch, dtype=object),
                "x": xs,
                "y": ys,
                "template_x": txs,
                "template_y": tys,
                "x_at_template_epoch": xs,
                "y_at_template_epoch": ys,
                "science_flux": fs,
                "template_flux": ft,
                "difference_flux": fs - kappa * ft,
                "snr_difference": np.full(n, nan),
                "science_fwhm": np.full(n, nan),
                "template_fwhm": np.full(n, nan),
                "npix": np.asarray(npix, dtype=np.int64),
            }
        )

    crs = parts["cosmic_rays"]
    cr_x = [float(np.average(h[:, 0], weights=h[:, 2])) + xy0[0] for h in crs]
    cr_y = [float(np.average(h[:, 1], weights=h[:, 2])) + xy0[1] for h in crs]
    cr_f = [float(h[:, 2].astype(np.float32).astype(np.float64).sum()) for h in crs]
    extended("cosmic_ray", "science", cr_x, cr_y, cr_f, np.zeros(len(crs)), [len(h) for h in crs])
    for epoch, cols in (("science", parts["sci_cols"]), ("template", parts["tmp_cols"])):
        bx = np.array([c[0] + xy0[0] for c in cols], dtype=np.float64)
        by = np.array([0.5 * (c[1] + c[2] - 1) + xy0[1] for c in cols], dtype=np.float64)
        if epoch == "template" and len(cols):  # where the template's column falls on the science grid
            bx, by = from_template(config, bx, by)
        extended("bad_column", epoch, bx, by, np.full(len(cols), nan), np.full(len(cols), nan), [c[2] - c[1] for c in cols])

    table = {k: np.concatenate([f[k] for f in frames]) for k in frames[0]}
    df = pd.DataFrame(table)
    n = len(df)
    df.insert(0, "id", np.arange(1, n + 1, dtype=np.int64))
    ra, dec = exposures["science"].wcs.all_pix2world(df["x"].to_numpy(), df["y"].to_numpy(), 0)
    df["ra"] = np.asarray(ra, dtype=np.float64)
    df["dec"] = np.asarray(dec, dtype=np.float64)

    # saturated: the nearest pixel of a PSF source is SAT in either image
    sat_bit = exposures["science"].bitmask("SAT")
    flags = np.zeros(n, dtype=bool)
    point_rows = (df["npix"].to_numpy() == 0)
    x_min, x_max, y_min, y_max = config.bbox
    for epoch, xc, yc in (("science", "x", "y"), ("template", "template_x", "template_y")):
        msk = exposures[epoch].mask.values
        ix = np.floor(df[xc].to_numpy() + 0.5).astype(np.int64)
        iy = np.floor(df[yc].to_numpy() + 0.5).astype(np.int64)
        inside = point_rows & (ix >= x_min) & (ix < x_max) & (iy >= y_min) & (iy < y_max)
        hit = np.zeros(n, dtype=bool)
        hit[inside] = (msk[iy[inside] - y_min, ix[inside] - x_min] & sat_bit) != 0
        flags |= hit
    df["saturated"] = flags
    df["kind"] = df["kind"].astype(str)
    df["epoch"] = df["epoch"].astype(str)
    return df[list(TRUTH_COLUMNS)]


LAYOUTS = ("lsst", "plain")


def write_pair(pair: SimulatedPair, out_dir: str | os.PathLike, *, overwrite: bool = True, layout: str = "lsst",
               psf: bool = True, keywords: bool = True) -> dict[str, Path]:
    """Write ``science.fits``, ``template.fits`` and ``truth.csv`` atomically.

    Parameters
    ----------
    layout : {"lsst", "plain"}
        ``"lsst"``: LSST-layout MEF (IMAGE, MASK, VARIANCE and, with ``psf``, PSF).  ``"plain"``: what a
        telescope archive serves — one float32 image in the primary HDU with its WCS, nothing else (no
        variance, mask or PSF; masked pixels keep their values, saturated ones their clipped level).
    psf : bool
        ``"lsst"``: write the PSF extension.  ``"plain"``: write the true PSF models beside the images
        as ``science_psf.fits`` / ``template_psf.fits`` (for ``--science-psf`` / ``--template-psf``).
    keywords : bool
        Write GAIN, RDNOISE, SATURATE and MAGZERO (and the other metadata).  Off: the header holds the
        WCS, the exposure time and the date only, as for an uncalibrated frame.

    Returns
    -------
    dict
        ``{"science": path, "template": path, "truth": path}``.  Same pair and options → identical bytes.
    """
    from .io.fits import write_exposure, write_plain_image, write_psf

    if layout not in LAYOUTS:
        raise InputError(f"write_pair: layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"science": out / "science.fits", "template": out / "template.fits", "truth": out / "truth.csv"}
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise InputError(f"{p}: exists (overwrite=False)")
    for role in ("science", "template"):
        exposure = getattr(pair, role)
        if not keywords:
            info = exposure.info
            exposure = exposure.with_attrs(info=type(info)(exposure_time=info.exposure_time, date_obs=info.date_obs,
                                                           mjd_obs=info.mjd_obs))
        if layout == "plain":
            write_plain_image(exposure, paths[role], overwrite=overwrite)
            if psf and exposure.psf is not None:
                paths[f"{role}_psf"] = write_psf(exposure.psf, out / f"{role}_psf.fits", overwrite=overwrite)
        else:
            if not psf:
                exposure = exposure.with_attrs(psf=None)
            write_exposure(exposure, paths[role], overwrite=overwrite)
    with atomic_path(paths["truth"]) as tmp:
        pair.truth.to_csv(tmp, index=False, lineterminator="\n")
    return paths
