"""Injection–recovery: fake point sources added before subtraction, matched to the DiaSources after it.

Two stages of the visit graph bracket the usual ones:

* :func:`inject_fakes` (after the inputs' PSFs are known and their skies removed): places
  ``fakes.n`` sources in the science and ``fakes.n_template`` in the template — on blank sky
  (covered, unmasked, outside every detected footprint), on detected galaxies (offset from their
  centres) and beside bright stars — each rendered with its own exposure's PSF at its position
  (:func:`~diffim_dag.psf.render.point_source_stamps`), with photon noise drawn at the gain the
  variance plane implies (and added to that plane), and marked ``INJECTED`` in that exposure's mask
  (a template's ``INJECTED`` becomes ``INJECTED_TEMPLATE`` in the difference).
* :func:`match_fakes` (after detection and measurement): each fake to the nearest unclaimed DiaSource
  of its sign within a radius scaled by the difference PSF, with the flux and S/N a PSF fit would
  give it in the difference; :func:`completeness_summary` turns the table into the completeness
  magnitudes (a logistic efficiency fitted to every fake, not to bins), the flux bias and scatter
  and the astrometric offsets, overall and by environment.

The same functions serve one visit (``diffim-dag subtract --fakes N``) and every visit of a batch
(``("inject", V, D)`` and ``("match", V, D)`` tasks); :func:`write_completeness` writes the binned
table and the plot for either.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import FakesConfig
from ..errors import ConfigError
from ..exposure import Exposure
from ..noise import robust_std
from ..psf.render import point_source_stamps
from .subtract import exposure_limit
from ..kernels.maskops import has_bits, lacks_bits

__all__ = [
    "ENVIRONMENTS",
    "InjectionResult",
    "effective_gain",
    "environment_catalog",
    "place_fakes",
    "inject_fakes",
    "match_fakes",
    "completeness_summary",
    "efficiency_fit",
    "completeness_table",
    "survey_summary",
    "write_completeness",
]

ENVIRONMENTS = ("blank", "galaxy", "star")
#: Pixels a fake's core may not touch (in either input).
_AVOID_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE", "CR", "SUSPECT", "INTRP", "HIGH_VARIANCE", "STREAK")
_MAG_BIN = 0.25
log = logging.getLogger(__name__)


@dataclass
class InjectionResult:
    """One visit's fakes (``table``: truth and match, one row each) and what they say (``summary``)."""

    table: pd.DataFrame
    summary: dict


def _bits(exposure: Exposure, names) -> int:
    return exposure.bitmask([p for p in names if p in exposure.mask_planes])


def effective_gain(exposure: Exposure) -> float | None:
    """The gain (counts⁻¹ per count of signal) that the variance plane's source term implies, or None.

    ``V = V_sky + I / g``: ``1/g`` is the median of ``(V − V_sky) / I`` over unmasked pixels at least
    10 σ above the sky.  None when the plane has no source term (a measured-sky variance), so that fakes
    get no more noise than the variance plane promises real sources.
    """
    img, var, msk = exposure.arrays()
    step = max(1, int(math.sqrt(img.size / 4e6)))
    img, var, msk = img[::step, ::step], var[::step, ::step], msk[::step, ::step]
    good = lacks_bits(msk, _bits(exposure, _AVOID_PLANES)) & np.isfinite(img) & (var > 0)
    if good.sum() < 100:
        return None
    v_sky = float(np.median(var[good]))
    bright = good & (img > 10.0 * math.sqrt(v_sky))
    if bright.sum() < 50:
        return None
    slope = float(np.median((var[bright] - v_sky) / img[bright]))
    return 1.0 / slope if slope > 1e-6 else None


def environment_catalog(exposure: Exposure, *, threshold: float = 3.0):
    """Objects detected on ``exposure`` (sky removed) and its footprint map.

    Returns ``(objects, footprints)``: a DataFrame with ``x, y`` (parent pixels), ``a, b, theta`` (sep's
    second-moment ellipse), ``flux``, ``snr``, ``size_ratio`` (√(ab) over the PSF's σ) and ``kind``
    (``"star"``: point-like and bright; ``"galaxy"``: resolved; ``""``: neither), and a boolean map of
    every detected footprint.
    """
    from ..psf.estimate import sep_extract

    img, var, msk = exposure.arrays()
    bad = has_bits(msk, _bits(exposure, ("NO_DATA", "BAD", "EDGE"))) | ~np.isfinite(img) | ~(var > 0)
    data = np.ascontiguousarray(np.where(bad, 0.0, img), dtype=np.float32)
    err = np.ascontiguousarray(np.sqrt(np.where(bad, np.inf, var)), dtype=np.float32)
    objects, segmap = sep_extract(data, threshold, err, bad, segmentation_map=True)
    x0, y0 = exposure.xy0
    psf = exposure.psf
    cols = {"x": objects["x"] + x0, "y": objects["y"] + y0, "a": objects["a"], "b": objects["b"],
            "theta": objects["theta"], "flux": objects["flux"], "peak": objects["peak"]}
    table = pd.DataFrame({k: np.asarray(v, dtype=np.float64) for k, v in cols.items()})
    if len(table):
        sigma = np.array([psf.fwhm(x, y) / 2.3548 for x, y in zip(table["x"], table["y"])])
        noise = np.sqrt(np.median(var[~bad])) if (~bad).any() else 1.0
        table["snr"] = table["peak"] / noise
        table["size_ratio"] = np.sqrt(np.clip(table["a"] * table["b"], 0.0, None)) / sigma
        kind = np.full(len(table), "", dtype=object)
        kind[(table["size_ratio"] <= 1.25) & (table["snr"] >= 50.0)] = "star"
        kind[(table["size_ratio"] >= 1.6) & (table["snr"] >= 5.0) & (table["flux"] > 0)] = "galaxy"
        table["kind"] = kind.astype(str)
    else:
        table = table.assign(snr=[], size_ratio=[], kind=[])
    return table, segmap > 0


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` dilated by a (2r+1)² square (a separable maximum filter)."""
    from scipy import ndimage

    return ndimage.maximum_filter(mask.view(np.uint8), size=2 * r + 1).astype(bool) if r > 0 else mask


def _allowed(science: Exposure, template: Exposure, fwhm: float, margin: int, reach: int) -> np.ndarray:
    """Pixels where a fake may sit: inside by ``margin``, and no avoided plane in either input within 1 FWHM +
    ``reach`` (the matching kernel spreads a masked pixel of the convolved image that far)."""
    bad = np.zeros(science.shape, bool)
    for exp in (science, template):
        img, var, msk = exp.arrays()
        bad |= has_bits(msk, _bits(exp, _AVOID_PLANES)) | ~np.isfinite(img) | ~(var > 0)
    ok = ~_grow(bad, max(1, int(math.ceil(fwhm))) + int(reach))
    ok[:margin], ok[-margin:], ok[:, :margin], ok[:, -margin:] = False, False, False, False
    return ok


def place_fakes(science: Exposure, template: Exposure, config: FakesConfig, rng: np.random.Generator, *,
                border: int = 0) -> pd.DataFrame:
    """Positions of ``config.n + config.n_template`` fakes: ``x, y`` (parent pixels), ``environment``, ``image``.

    Blank-sky fakes are uniform over allowed pixels outside every footprint detected on either image
    (dilated by 2.5 FWHM, the reach of a bright fake's own grown footprint); galaxy fakes sit at 0.5–1.5 of a random galaxy's second-moment ellipse
    from its centre; star fakes 1–2.5 FWHM from a random bright star.  No two fakes are closer than
    ``min_separation_fwhm`` FWHM; where an environment has no host or no room, its share goes to
    blank sky, and fakes that fit nowhere are not placed (``summary["n_injected"]`` says how many did).
    ``border``: the matching kernel's half-width: pixels at the image edge that the subtraction will not
    deliver are kept free of fakes (besides the stamp's own half-size), and so is the kernel's reach
    around a masked pixel.
    """
    cx, cy = science.center
    fwhm = max(science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy))
    size = max(science.psf.default_size(cx, cy), template.psf.default_size(cx, cy))
    margin = int(border) + max(size // 2, int(math.ceil(2 * fwhm)))
    ok = _allowed(science, template, fwhm, margin, border)
    objects, footprints = environment_catalog(science)
    footprints = footprints | environment_catalog(template)[1]  # blank: nothing detected in either image
    # blank: a bright fake's own grown footprint (~2.5 FWHM) does not reach a detected object's
    blank_ok = ok & ~_grow(footprints, max(1, int(math.ceil(2.5 * fwhm))))
    n_total = config.n + config.n_template
    want = {"galaxy": int(round(config.galaxy_fraction * n_total)), "star": int(round(config.star_fraction * n_total))}
    want["blank"] = n_total - want["galaxy"] - want["star"]
    x0, y0 = science.xy0
    ny, nx = science.shape
    min_sep = config.min_separation_fwhm * fwhm
    placed: list[tuple[float, float, str]] = []

    def accept(cand_x, cand_y, env, n):
        got = 0
        for px, py in zip(cand_x, cand_y):
            if got >= n:
                break
            ix, iy = int(round(px - x0)), int(round(py - y0))
            if not (0 <= ix < nx and 0 <= iy < ny and ok[iy, ix]):
                continue
            if placed and np.min(np.hypot(np.array([p[0] for p in placed]) - px,
                                          np.array([p[1] for p in placed]) - py)) < min_sep:
                continue
            placed.append((float(px), float(py), env))
            got += 1
        return got

    for env in ("galaxy", "star"):
        hosts = objects[objects["kind"] == env] if len(objects) else objects
        n_env = want[env]
        if n_env == 0 or not len(hosts):
            want["blank"] += n_env
            continue
        n_try = 50 * n_env
        h = hosts.iloc[rng.integers(0, len(hosts), n_try)]
        phi = rng.uniform(0.0, 2.0 * math.pi, n_try)
        if env == "galaxy":
            rad = rng.uniform(0.5, 1.5, n_try)
            u, v = rad * h["a"].to_numpy() * np.cos(phi), rad * h["b"].to_numpy() * np.sin(phi)
            th = h["theta"].to_numpy()
            dx, dy = u * np.cos(th) - v * np.sin(th), u * np.sin(th) + v * np.cos(th)
        else:
            rad = rng.uniform(1.0, 2.5, n_try) * fwhm
            dx, dy = rad * np.cos(phi), rad * np.sin(phi)
        got = accept(h["x"].to_numpy() + dx, h["y"].to_numpy() + dy, env, n_env)
        want["blank"] += n_env - got
    iy, ix = np.nonzero(blank_ok)
    if iy.size:
        pick = rng.integers(0, iy.size, min(50 * max(want["blank"], 1), 2_000_000))
        jitter = rng.uniform(-0.5, 0.5, (2, pick.size))
        accept(ix[pick] + x0 + jitter[0], iy[pick] + y0 + jitter[1], "blank", want["blank"])
    table = pd.DataFrame(placed, columns=["x", "y", "environment"])
    # which fakes go into the template: a random subset of the requested size (fewer when not all fit)
    image = np.array(["science"] * len(table), dtype=object)
    n_t = min(config.n_template, int(round(len(table) * config.n_template / max(n_total, 1))))
    image[rng.permutation(len(table))[:n_t]] = "template"
    table["image"] = image.astype(str)
    return table


def _noise_and_area(exposure: Exposure, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sky σ per pixel (median variance) and the PSF's effective area 1/ΣP² at each position."""
    img, var, msk = exposure.arrays()
    good = lacks_bits(msk, _bits(exposure, _AVOID_PLANES)) & (var > 0)
    sigma = math.sqrt(float(np.median(var[good]))) if good.any() else 1.0
    area = np.array([1.0 / float(np.sum(exposure.psf.kernel_image(xi, yi) ** 2)) for xi, yi in zip(x, y)])
    return np.full(len(x), sigma), area


def _zero_point(exposure: Exposure, config: FakesConfig) -> tuple[float | None, str]:
    if config.zero_point is not None:
        return float(config.zero_point), "config"
    pc = exposure.info.photo_calib
    return (float(pc.zero_point), "header") if pc is not None else (None, "none")


def _ratio_by_zero_points(science: Exposure, template: Exposure) -> float:
    """Science counts per template count from the zero points (1 when either is missing)."""
    ps, pt = science.info.photo_calib, template.info.photo_calib
    return 10.0 ** (0.4 * (ps.zero_point - pt.zero_point)) if ps is not None and pt is not None else 1.0


def _render_into(exposure: Exposure, fakes: pd.DataFrame, gain: float | None, rng: np.random.Generator,
                 plane: str = "INJECTED") -> Exposure:
    """``exposure`` with ``fakes`` (``x, y, flux``) added, their photon noise at ``gain`` and the ``plane`` mask."""
    if not len(fakes):
        return exposure
    img, var, msk = (a.copy() for a in exposure.arrays())
    planes = exposure.mask_planes.with_plane(plane)
    bit = np.int32(1 << planes[plane])
    psf = exposure.psf
    x, y, f = (fakes[c].to_numpy(dtype=np.float64) for c in ("x", "y", "flux"))
    sizes = np.array([max(psf.default_size(xi, yi), 2 * int(math.ceil(3 * psf.fwhm(xi, yi))) + 1)
                      for xi, yi in zip(x, y)], dtype=np.int64) | 1
    for s in point_source_stamps(x, y, f, psf, xy0=exposure.xy0, shape=exposure.shape, sizes=sizes):
        if not s.model.size:
            continue
        model = s.model
        noisy = model
        if gain is not None:
            electrons = np.clip(model, 0.0, None) * gain
            noisy = rng.poisson(electrons) / gain - electrons / gain + model
            var[s.window] += (np.clip(model, 0.0, None) / gain).astype(var.dtype)
        img[s.window] += noisy.astype(img.dtype)
        sigma = np.sqrt(np.clip(var[s.window], 0.0, None))
        yy, xx = np.mgrid[s.window]
        core = np.hypot(xx + exposure.xy0[0] - x[s.index], yy + exposure.xy0[1] - y[s.index]) <= psf.fwhm(x[s.index], y[s.index])
        msk[s.window] |= np.where((model >= 0.2 * sigma) | core, bit, np.int32(0)).astype(msk.dtype)
    return exposure.with_planes(image=img, variance=var, mask=msk).with_attrs(mask_planes=planes)


def inject_fakes(science: Exposure, template: Exposure, config: FakesConfig, *,
                 border: int = 0) -> tuple[Exposure, Exposure, pd.DataFrame]:
    """The ``inject`` stage: ``(science, template, fakes)`` with the fakes of ``config`` added.

    Both exposures must carry their PSFs and have their skies removed (the ``prepare`` stage's output).
    ``fakes`` has one row per fake: ``fake_id, x, y, environment, image`` (``science``: positive in the
    difference; ``template``: a source that faded, negative), ``flux`` (counts in the image it went into),
    ``mag`` (with the science zero point; NaN without one) and ``snr_predicted`` (from both inputs'
    noise, before subtraction).  Seeded by ``config.seed``; ``border`` as in :func:`place_fakes`.
    """
    rng = np.random.default_rng(config.seed)
    table = place_fakes(science, template, config, rng, border=border)
    n = len(table)
    if n < config.n + config.n_template:
        log.warning("placed %d of %d fakes: no room for more %.1f FWHM apart on usable pixels of this %d×%d image "
                    "(another fakes.seed places another set)", n, config.n + config.n_template,
                    config.min_separation_fwhm, *science.shape[::-1])
    cx, cy = science.center
    zp, _ = _zero_point(science, config)
    ratio = _ratio_by_zero_points(science, template)
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    sig_s, area_s = _noise_and_area(science, x, y)
    sig_t, area_t = _noise_and_area(template, x, y)
    # the flux's 1σ in the difference, science counts: both images' noise over the broader PSF's area
    sigma_flux = np.sqrt(np.maximum(area_s, area_t) * (sig_s**2 + (ratio * sig_t) ** 2))
    if config.magnitude_range:
        if zp is None:
            raise ConfigError("fakes.magnitude_range needs a zero point: the science has none (MAGZERO, MAGZP, …); "
                              "give -c fakes.zero_point=ZP or use fakes.snr_range")
        mag = rng.uniform(*config.magnitude_range, n)
        flux_sci = 10.0 ** (-0.4 * (mag - zp))
    else:
        lo, hi = (math.log10(v) for v in config.snr_range)
        flux_sci = 10.0 ** rng.uniform(lo, hi, n) * sigma_flux  # uniform in magnitude
        mag = zp - 2.5 * np.log10(flux_sci) if zp is not None else np.full(n, np.nan)
    in_template = (table["image"] == "template").to_numpy()
    table["flux"] = np.where(in_template, flux_sci / ratio, flux_sci)
    table["mag"] = mag
    table["snr_predicted"] = flux_sci / sigma_flux
    table.insert(0, "fake_id", np.arange(1, n + 1, dtype=np.int64))
    table["zero_point"] = np.nan if zp is None else zp  # travels with the table (a frame's attrs may not)
    science = _render_into(science, table[~in_template], effective_gain(science) if config.poisson else None, rng)
    template = _render_into(template, table[in_template], effective_gain(template) if config.poisson else None, rng)
    return science, template, table


def _science_per_template(metrics: dict) -> float:
    """The method's measured flux ratio (science counts per template count)."""
    if "photometric_scale" in metrics and metrics["photometric_scale"].get("kernel"):
        return float(metrics["photometric_scale"]["kernel"])
    if "zogy" in metrics and metrics["zogy"].get("flux_ratio"):
        return float(metrics["zogy"]["flux_ratio"])
    pre = metrics.get("preconvolution") or {}
    return float(pre.get("kernel_sum_center") or 1.0)


def _expected_error(difference: Exposure, x: float, y: float) -> float:
    """1σ of a PSF-fit flux at (x, y) in the difference: 1/√(Σ P²/V) with its PSF and variance plane."""
    from ..kernels.measure import render_psf

    psf = difference.psf
    size = psf.default_size(x, y)
    h = size // 2
    ix, iy = int(round(x)), int(round(y))
    x0, y0 = difference.xy0
    ny, nx = difference.shape
    bbox = (max(ix - h, x0), min(ix + h + 1, x0 + nx), max(iy - h, y0), min(iy + h + 1, y0 + ny))
    p = render_psf(psf, x, y, bbox, size=size)
    var = difference.arrays()[1][bbox[2] - y0:bbox[3] - y0, bbox[0] - x0:bbox[1] - x0]
    w = np.where(var > 0, p * p / np.where(var > 0, var, 1.0), 0.0).sum()
    return 1.0 / math.sqrt(w) if w > 0 else float("nan")


def match_fakes(fakes: pd.DataFrame, dia_sources: pd.DataFrame, difference: Exposure, metrics: dict,
                config: FakesConfig) -> InjectionResult:
    """The ``match`` stage: each fake to the nearest unclaimed DiaSource of its sign.

    The radius is ``match_radius_fwhm`` × the difference PSF's FWHM at the fake (at least 1.5 px), from
    the DiaSource's centroid or its primary peak (a fake whose footprint merged with a neighbour's keeps
    its peak but not its centroid); pairs are claimed closest first, so one DiaSource matches one fake.  Adds ``flux_difference``
    (the flux the fake should have in the difference, science counts, negative for template fakes),
    ``flux_error_expected`` and ``snr_expected`` (what a PSF fit there can give: the difference's
    variance plane and PSF), and for matched fakes the DiaSource's ``dia_source_id``, ``distance``,
    ``dx, dy``, ``psf_flux``, ``psf_flux_err``, ``snr`` and ``flux_ratio`` (``psf_flux / flux_difference``).
    """
    table = fakes.copy()
    ratio = _science_per_template(metrics)
    sign = np.where(table["image"] == "template", -1.0, 1.0)
    table["flux_difference"] = np.where(sign < 0, -table["flux"] * ratio, table["flux"])
    err = np.array([_expected_error(difference, x, y) for x, y in zip(table["x"], table["y"])])
    table["flux_error_expected"] = err
    table["snr_expected"] = np.abs(table["flux_difference"]) / err
    radius = np.array([max(1.5, config.match_radius_fwhm * difference.psf.fwhm(x, y))
                       for x, y in zip(table["x"], table["y"])])
    n = len(table)
    out = {c: np.full(n, np.nan) for c in ("distance", "dx", "dy", "psf_flux", "psf_flux_err", "snr")}
    dia_id = np.full(n, -1, dtype=np.int64)
    real = dia_sources[~dia_sources["sky_source"].to_numpy(bool)] if len(dia_sources) else dia_sources
    if n and len(real):
        from scipy.spatial import cKDTree

        sx, sy = real["x"].to_numpy(float), real["y"].to_numpy(float)
        px, py = real["peak_x"].to_numpy(float), real["peak_y"].to_numpy(float)
        s_sign = np.sign(real["psf_flux"].to_numpy(float))
        fx, fy = table["x"].to_numpy(float), table["y"].to_numpy(float)
        pairs = []
        # the centroid, or the primary peak (a footprint merged with a neighbour's has its centroid between)
        for ax, ay in ((sx, sy), (px, py)):
            tree = cKDTree(np.column_stack([ax, ay]))
            for i, near in enumerate(tree.query_ball_point(np.column_stack([fx, fy]), radius)):
                pairs += [(math.hypot(ax[j] - fx[i], ay[j] - fy[i]), i, j) for j in near if s_sign[j] == sign[i]]
        used_f, used_s = set(), set()
        for dist, i, j in sorted(pairs):
            if i in used_f or j in used_s:
                continue
            used_f.add(i)
            used_s.add(j)
            dia_id[i] = int(real["id"].iat[j])
            out["distance"][i] = math.hypot(sx[j] - fx[i], sy[j] - fy[i])  # of the centroid
            out["dx"][i] = sx[j] - fx[i]
            out["dy"][i] = sy[j] - fy[i]
            for c in ("psf_flux", "psf_flux_err", "snr"):
                out[c][i] = float(real[c].iat[j])
    table["matched"] = dia_id >= 0
    table["dia_source_id"] = dia_id
    for c, v in out.items():
        table[c] = v
    table["flux_ratio"] = table["psf_flux"] / table["flux_difference"]
    table["match_radius"] = radius
    factor = (metrics.get("dia_sources") or {}).get("significance_stdev") or 1.0
    # the 5σ detection reaches (as metrics["limiting_magnitude"]["difference"])
    limit = exposure_limit(difference, difference.center)["flux"] * factor
    table["limiting_flux_5sigma"] = limit
    zp = _table_zero_point(table)
    summary = {"n_requested": config.n + config.n_template,
               **completeness_summary(table, zero_point=zp, limiting_flux=limit)}
    return InjectionResult(table=table, summary=summary)


def _table_zero_point(table: pd.DataFrame) -> float | None:
    zp = table["zero_point"].to_numpy(float) if "zero_point" in table and len(table) else np.array([np.nan])
    return float(zp[0]) if np.isfinite(zp[0]) else None


def _magnitudes(table: pd.DataFrame, zero_point: float | None) -> np.ndarray:
    """Magnitude of each fake's flux in the difference, with its own row's zero point (a survey table mixes
    visits), else ``zero_point``, else 0 (instrumental)."""
    zp = np.full(len(table), zero_point if zero_point is not None else 0.0)
    if "zero_point" in table:
        own = table["zero_point"].to_numpy(float)
        zp = np.where(np.isfinite(own), own, zp)
    return zp - 2.5 * np.log10(np.abs(table["flux_difference"].to_numpy(float)))


def efficiency_fit(mag: np.ndarray, found: np.ndarray) -> dict | None:
    r"""Maximum-likelihood logistic efficiency :math:`\epsilon(m) = \epsilon_{max} / (1 + e^{(m - m_{50})/w})`.

    Fitted to every fake (recovered or not), not to bins.  Returns ``m50`` (where ε = ε_max/2),
    ``m50_absolute`` and ``m90`` (where ε = 0.5 and 0.9; None when ε_max is below), ``width`` and
    ``efficiency_max``; None with fewer than 10 fakes or when all or none were found.
    """
    from scipy.optimize import minimize

    mag, found = np.asarray(mag, float), np.asarray(found, bool)
    keep = np.isfinite(mag)
    mag, found = mag[keep], found[keep]
    if mag.size < 10 or found.all() or not found.any():
        return None

    def model(p, m):
        emax = 1.0 / (1.0 + math.exp(-p[2]))
        return emax / (1.0 + np.exp(np.clip((m - p[0]) / math.exp(p[1]), -50, 50))), emax

    def nll(p):
        e, _ = model(p, mag)
        e = np.clip(e, 1e-9, 1 - 1e-9)
        return -float(np.sum(np.where(found, np.log(e), np.log1p(-e))))

    guess_m50 = float(np.median(mag[found])) if found.sum() > 2 else float(np.median(mag))
    best = None
    for w0 in (0.1, 0.3):
        for m0 in (guess_m50, float(np.median(mag))):
            r = minimize(nll, [m0, math.log(w0), 4.0], method="Nelder-Mead",
                         options={"xatol": 1e-4, "fatol": 1e-6, "maxiter": 4000})
            if best is None or r.fun < best.fun:
                best = r
    m50, w, emax = float(best.x[0]), math.exp(best.x[1]), 1.0 / (1.0 + math.exp(-best.x[2]))

    def at(level):
        return m50 + w * math.log(emax / level - 1.0) if emax > level else None

    return {"m50": m50, "m50_absolute": at(0.5), "m90": at(0.9), "width": w, "efficiency_max": emax,
            "n": int(mag.size), "n_found": int(found.sum())}


def completeness_summary(table: pd.DataFrame, *, zero_point: float | None, limiting_flux: float | None) -> dict:
    """What a table of matched fakes says: counts, completeness magnitudes and S/N, flux and astrometry.

    Magnitudes are of the flux each fake should have in the difference, with ``zero_point`` (the
    instrumental scale, zero point 0, when None: ``magnitude_system`` says which).  The headline
    ``m50``/``m90`` are fitted to the blank-sky fakes (both signs); ``by_environment`` repeats the
    fit for each environment.  ``limiting_magnitude_5sigma`` is the difference's 5σ point-source limit
    on the same scale.
    """
    t = table
    found = t["matched"].to_numpy(bool)
    mag = _magnitudes(t, zero_point)
    snr_mag = -2.5 * np.log10(t["snr_expected"].to_numpy(float))  # S/N as a magnitude: fit, then back
    out: dict = {
        "n_injected": int(len(t)), "n_recovered": int(found.sum()),
        "n_science": int((t["image"] == "science").sum()), "n_template": int((t["image"] == "template").sum()),
        "zero_point": zero_point, "magnitude_system": "AB (zero point)" if zero_point is not None else
        "instrumental (-2.5 log10 counts)",
        "limiting_flux_5sigma": limiting_flux,
        "limiting_magnitude_5sigma": (None if not limiting_flux or not limiting_flux > 0
                                      else (zero_point or 0.0) - 2.5 * math.log10(limiting_flux)),
    }

    def fits(sel):
        f = efficiency_fit(mag[sel], found[sel])
        s = efficiency_fit(snr_mag[sel], found[sel])
        hi = sel & (t["snr_expected"].to_numpy(float) >= 10.0)
        return {
            "n": int(sel.sum()), "n_recovered": int((found & sel).sum()),
            "m50": None if f is None else f["m50_absolute"], "m90": None if f is None else f["m90"],
            "efficiency_max": None if f is None else f["efficiency_max"],
            "snr50": None if s is None or s["m50_absolute"] is None else 10 ** (-0.4 * s["m50_absolute"]),
            "snr90": None if s is None or s["m90"] is None else 10 ** (-0.4 * s["m90"]),
            "completeness_snr_ge_10": float(found[hi].mean()) if hi.any() else None,
            "n_snr_ge_10": int(hi.sum()),
        }

    env = t["environment"].to_numpy(str)
    blank = fits(env == "blank")
    out.update({k: blank[k] for k in ("m50", "m90", "snr50", "snr90", "completeness_snr_ge_10", "n_snr_ge_10")})
    out["by_environment"] = {e: fits(env == e) for e in ENVIRONMENTS if (env == e).any()}
    out["by_image"] = {i: fits(t["image"].to_numpy(str) == i) for i in ("science", "template")
                       if (t["image"] == i).any()}
    bright = found & (t["snr_expected"].to_numpy(float) >= 20.0)
    ratio = t["flux_ratio"].to_numpy(float)[bright]
    pull = ((t["psf_flux"] - t["flux_difference"]) / t["psf_flux_err"]).to_numpy(float)[bright]
    dist = t["distance"].to_numpy(float)
    out["flux"] = {
        "n_snr_ge_20": int(bright.sum()),
        "median_ratio": float(np.median(ratio)) if ratio.size else None,
        "bias": float(np.median(ratio) - 1.0) if ratio.size else None,
        "ratio_scatter": robust_std(ratio, max_samples=None) if np.isfinite(ratio).sum() >= 3 else None,
        "pull_scatter": robust_std(pull, max_samples=None) if np.isfinite(pull).sum() >= 3 else None,
    }
    out["astrometry"] = {
        "median_offset_px": float(np.median(dist[found])) if found.any() else None,
        "median_offset_px_snr_ge_20": float(np.median(dist[bright])) if bright.any() else None,
        "median_dx_px": float(np.median(t["dx"].to_numpy(float)[found])) if found.any() else None,
        "median_dy_px": float(np.median(t["dy"].to_numpy(float)[found])) if found.any() else None,
    }
    return out


def completeness_table(table: pd.DataFrame, *, zero_point: float | None, bin_width: float = _MAG_BIN) -> pd.DataFrame:
    """Efficiency in magnitude bins, by environment and for all fakes, with 68 % Wilson binomial intervals."""
    from astropy.stats import binom_conf_interval

    mag = _magnitudes(table, zero_point)
    found = table["matched"].to_numpy(bool)
    rows = []
    if not np.isfinite(mag).any():
        return pd.DataFrame(columns=["environment", "mag_lo", "mag_hi", "n", "n_recovered", "efficiency",
                                     "efficiency_lo", "efficiency_hi", "snr_expected_median"])
    lo = math.floor(np.nanmin(mag) / bin_width) * bin_width
    edges = np.arange(lo, np.nanmax(mag) + bin_width, bin_width)
    env = table["environment"].to_numpy(str)
    snr = table["snr_expected"].to_numpy(float)
    for name, sel in [("all", np.ones(len(table), bool))] + [(e, env == e) for e in ENVIRONMENTS]:
        for a, b in zip(edges[:-1], edges[1:]):
            inb = sel & (mag >= a) & (mag < b)
            n = int(inb.sum())
            if not n:
                continue
            k = int((found & inb).sum())
            ci = binom_conf_interval(k, n, confidence_level=0.6827, interval="wilson")
            rows.append({"environment": name, "mag_lo": float(a), "mag_hi": float(b), "n": n, "n_recovered": k,
                         "efficiency": k / n, "efficiency_lo": float(ci[0]), "efficiency_hi": float(ci[1]),
                         "snr_expected_median": float(np.median(snr[inb]))})
    return pd.DataFrame(rows)


def survey_summary(tables: list[pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    """All visits' fake tables (each with ``visit``, ``detector``) as one, and its :func:`completeness_summary`
    (each fake's magnitude with its visit's zero point; the 5σ limit is the median of the visits')."""
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if not len(table):
        return table, {"n_injected": 0, "n_recovered": 0, "n_visits": 0}
    zps = table["zero_point"].to_numpy(float)
    single = float(zps[0]) if np.isfinite(zps).all() and np.all(zps == zps[0]) else None
    limits = table.groupby(["visit", "detector"])["limiting_flux_5sigma"].first().to_numpy(float)
    summary = completeness_summary(table, zero_point=single, limiting_flux=float(np.median(limits)))
    if single is None and np.isfinite(zps).any():
        summary["magnitude_system"] = "AB, each visit's zero point"
    summary["n_visits"] = int(len(limits))
    return table, summary


def write_completeness(table: pd.DataFrame, summary: dict, folder, *, title: str = "") -> dict:
    """``completeness.csv`` (binned efficiency) and ``plots/completeness.png`` (efficiency versus magnitude and
    versus expected S/N, by environment, binomial errors, the 5σ limit marked) in ``folder``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from astropy.stats import binom_conf_interval

    from ..io.atomic import atomic_path

    folder = Path(folder)
    zp = summary.get("zero_point")
    binned = completeness_table(table, zero_point=zp)
    paths = {}
    with atomic_path(folder / "completeness.csv") as tmp:
        binned.to_csv(tmp, index=False)
    paths["completeness_table"] = folder / "completeness.csv"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"all": "k", "blank": "tab:blue", "galaxy": "tab:orange", "star": "tab:red"}
    for name, part in binned.groupby("environment", sort=False):
        mid = 0.5 * (part["mag_lo"] + part["mag_hi"])
        e = part["efficiency"]
        axes[0].errorbar(mid, e, yerr=[np.clip(e - part["efficiency_lo"], 0, None),
                                                        np.clip(part["efficiency_hi"] - e, 0, None)], fmt="o-", ms=3,
                         capsize=2, color=colours.get(name), label=f"{name} ({int(part['n'].sum())})")
    lim = summary.get("limiting_magnitude_5sigma")
    if lim is not None:
        axes[0].axvline(lim, color="gray", ls="--", label="5σ limit")
    if summary.get("m50") is not None:
        axes[0].axvline(summary["m50"], color="tab:blue", ls=":", label="50 % (blank, fit)")
    axes[0].set_xlabel("magnitude in the difference" + ("" if zp is not None else " (instrumental)"))
    axes[0].set_ylabel("fraction recovered")
    axes[0].set_ylim(-0.03, 1.05)
    axes[0].legend(fontsize=8)
    snr = table["snr_expected"].to_numpy(float)
    found = table["matched"].to_numpy(bool)
    env = table["environment"].to_numpy(str)
    good = np.isfinite(snr) & (snr > 0)
    if good.any():
        edges = np.logspace(np.log10(snr[good].min()), np.log10(snr[good].max() * 1.0001), 13)
        for name in ("all",) + ENVIRONMENTS:
            sel = good & ((env == name) if name != "all" else True)
            mids, eff, lo, hi = [], [], [], []
            for a, b in zip(edges[:-1], edges[1:]):
                inb = sel & (snr >= a) & (snr < b)
                if inb.sum():
                    k, n = int((found & inb).sum()), int(inb.sum())
                    ci = binom_conf_interval(k, n, confidence_level=0.6827, interval="wilson")
                    mids.append(math.sqrt(a * b))
                    eff.append(k / n)
                    lo.append(max(k / n - ci[0], 0.0))
                    hi.append(max(ci[1] - k / n, 0.0))
            if mids:
                axes[1].errorbar(mids, eff, yerr=[lo, hi], fmt="o-", ms=3, capsize=2, color=colours.get(name),
                                 label=name)
        axes[1].axvline(5.0, color="gray", ls="--", label="S/N 5")
        axes[1].set_xscale("log")
    axes[1].set_xlabel("expected S/N in the difference (PSF fit)")
    axes[1].set_ylim(-0.03, 1.05)
    axes[1].legend(fontsize=8)
    fig.suptitle(title or f"{summary.get('n_recovered')}/{summary.get('n_injected')} fakes recovered")
    fig.tight_layout()
    plot = folder / "plots" / "completeness.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(plot) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    paths["plot_completeness"] = plot
    return paths
