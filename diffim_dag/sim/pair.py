"""One simulated pair: :func:`simulate_pair` renders both exposures and the truth table (:class:`SimulatedPair`)."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError
from ..exposure import Exposure, ExposureInfo, PhotoCalib
from ..masks import MASK_DTYPE, MaskPlanes
from ..psf import Psf
from .config import SimConfig, TRUTH_COLUMNS, TRUTH_KINDS, _BLOCK_ROWS, _BRIGHT_NSIGMA, _STREAMS, _check_names
from .render import (
    _field_margin, _level_radius, _log_uniform, _make_psf, _make_wcs, _mjd_to_iso, _noisy, _place, _profile,
    _render, _sky_at, _stamp_sizes, from_template, power_law_fluxes, sky_model, to_template,
)

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
    from ..kernels.convolve import fft_convolve as fftconvolve

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
