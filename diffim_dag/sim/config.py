"""The simulator's configuration (:class:`SimConfig`, validated on construction), the truth table's
kinds and columns, and the default densities."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError


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
