"""The simulator's building blocks: the template's pixel mapping, fluxes, the sky, PSFs, source stamps
(:func:`add_sources`), WCSs and the noise."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..psf import FWHM_PER_SIGMA, GaussianPsf, MoffatPsf, Psf, VaryingPsf
from ..psf.render import point_source_stamps
from .config import SimConfig, _BLOCK_ROWS, _ENCLOSED, _MAX_STAMP, _WING_NSIGMA, _gradient_xy

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
