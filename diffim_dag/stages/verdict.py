r"""The verdict on a subtraction: ``ok``, or ``bad_subtraction`` with the reasons.

An "ok" on a failed subtraction is worse than no verdict, so every check that a user would make by
eye is made here, on numbers already in the metrics and the DiaSource catalogue
(:func:`judge`).  Each check is recorded in ``metrics["quality"]["checks"]`` (value, limit, pass);
the failed ones become ``verdict_reasons`` (which the CLI prints).  The outputs are written either way.

``sky_ratio``
    robust σ of :math:`D/\sqrt V` on good pixels (the difference as written) outside ``[0.8, 1.25]``:
    the variance plane does not describe the difference's noise.
``difference_noise``
    the same ratio before the difference's variance plane is scaled to its measured noise (LSST's
    ``doScaleDiffimVariance``, on by default) outside ``[0.5, 2]``: the noise is far from what the
    inputs' variance planes and the kernel predict (a wrong gain, a failed kernel); within it the
    rescaling absorbs what no propagation can know (a reference stack that holds the science frame
    shares its noise: the GOTO pair, 0.66).
``largest_footprint``
    one detection footprint covers more than 1 % of the image (and more than ``min_footprint_pixels``):
    a pedestal, a gradient or a ring the subtraction left, not a source.
``footprint_residual``
    the mean star-footprint residual ratio (:func:`~diffim_dag.stages.subtract.quality_metrics`)
    above ``bad_subtraction_ratio_mean``, or its scatter above ``bad_subtraction_ratio_std``: stars
    do not subtract (misregistration, a wrong PSF model, a failed kernel).
``sky_sources``
    fewer than half the requested sky sources could be placed (or of those the image has room for with no
    source on it, when that is fewer: a 256² stamp holds about 40 discs of a 39-px PSF): the image is covered
    by footprints (not judged in a run with fakes, whose footprints take blank sky on purpose).
``photometric_scale``
    the kernel sum at the centre (as science counts per template count) differs by more than
    ``max_scale_mismatch`` from the aperture flux ratio of the kernel stars
    (:func:`~diffim_dag.stages.photometry.aperture_flux_ratio`; only with ``min_scale_stars`` stars or
    more): the kernel did not learn the photometric scale of the stars (a wrong PSF model,
    misregistration, saturation).
``background_left``
    the σ-clipped mean of the difference over good pixels, in matched-filter detection units
    (:math:`|b|\sqrt{\mathrm{NEA}}/\sigma`), above ``max_background_sigma``: a background left in the
    difference shifts every detection by that many σ.
``kernel_shift``
    the centroid of the PSF-matching kernel at the centre is more than ``max_kernel_shift`` px from
    its middle: the kernel is absorbing a misregistration (a sub-pixel one is normal; pixels are not).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["judge", "VERDICT_OK", "VERDICT_BAD"]

VERDICT_OK = "ok"
VERDICT_BAD = "bad_subtraction"


def _check(checks: dict, name: str, value, ok: bool, limit, reason: str) -> None:
    checks[name] = {"value": value, "limit": limit, "ok": bool(ok)}
    if not ok:
        checks[name]["reason"] = reason


def judge(metrics: dict, dia_sources=None, *, shape: tuple[int, int], subtract_config, n_sky_requested: int = 0) -> dict:
    """The checks, the verdict and its reasons for one subtraction; returns a new ``quality`` dict."""
    q = dict(metrics.get("quality") or {})
    checks: dict = {}
    cfg = subtract_config
    sky_ratio = q.get("sky_ratio")
    if sky_ratio is not None and math.isfinite(sky_ratio):
        lo, hi = cfg.sky_ratio_range
        _check(checks, "sky_ratio", float(sky_ratio), lo <= sky_ratio <= hi, [lo, hi],
               f"noise of the difference is {sky_ratio:.3g} times what its variance plane says "
               f"(allowed {lo:g}–{hi:g})")
    propagated = q.get("sky_ratio_propagated")
    if propagated is not None and math.isfinite(propagated):
        lo, hi = cfg.difference_noise_range
        _check(checks, "difference_noise", float(propagated), lo <= propagated <= hi, [lo, hi],
               f"noise of the difference is {propagated:.3g} times what the inputs' variance planes predict "
               f"(allowed {lo:g}–{hi:g} before the difference's variance is rescaled)")
    mean, std = q.get("footprint_residual_ratio_mean"), q.get("footprint_residual_ratio_std")
    if mean is not None:
        ok = mean <= cfg.bad_subtraction_ratio_mean and (std or 0.0) <= cfg.bad_subtraction_ratio_std
        _check(checks, "footprint_residual", [float(mean), None if std is None else float(std)], ok,
               [cfg.bad_subtraction_ratio_mean, cfg.bad_subtraction_ratio_std],
               f"stars do not subtract: footprint residual {mean:.3g} ± {std or 0.0:.3g} of the star flux "
               f"(limits {cfg.bad_subtraction_ratio_mean:g} ± {cfg.bad_subtraction_ratio_std:g})")
    bg = q.get("background_left")
    if bg is not None and bg.get("detection_sigma") is not None:
        s = float(bg["detection_sigma"])
        _check(checks, "background_left", s, s <= cfg.max_background_sigma, cfg.max_background_sigma,
               f"a background of {bg['level']:.4g} counts is left in the difference ({s:.2f} σ in detection units; "
               f"limit {cfg.max_background_sigma:g})")
    scale = metrics.get("photometric_scale")
    if scale and scale.get("stars") and scale.get("kernel") is not None and scale.get("n_stars", 0) >= cfg.min_scale_stars:
        mismatch = float(scale["kernel"] / scale["stars"] - 1.0)
        _check(checks, "photometric_scale", mismatch, abs(mismatch) <= cfg.max_scale_mismatch, cfg.max_scale_mismatch,
               f"the kernel's photometric scale {scale['kernel']:.4g} differs from the stars' flux ratio "
               f"{scale['stars']:.4g} by {100 * mismatch:+.1f}% (limit ±{100 * cfg.max_scale_mismatch:g}%)")
    shift = (metrics.get("kernel") or {}).get("kernel_centroid_center")
    if shift is not None:
        r = float(math.hypot(*shift))
        _check(checks, "kernel_shift", r, r <= cfg.max_kernel_shift, cfg.max_kernel_shift,
               f"the PSF-matching kernel shifts the image by {r:.2f} px (limit {cfg.max_kernel_shift:g}): the inputs "
               "are not registered (warp the template, or check its WCS)")
    if dia_sources is not None and len(dia_sources):
        real = dia_sources[~dia_sources["sky_source"]]
        area = float(shape[0] * shape[1])
        largest = int(real["footprint_area"].max()) if len(real) else 0
        frac = largest / area
        small = largest <= cfg.min_footprint_pixels  # a bright star's residual on a small image is not a pedestal
        _check(checks, "largest_footprint", frac, frac <= cfg.max_footprint_fraction or small,
               cfg.max_footprint_fraction,
               f"one footprint covers {100 * frac:.2f}% of the image (limit {100 * cfg.max_footprint_fraction:g}%): "
               "a pedestal, gradient or ring left in the difference")
        if n_sky_requested > 0 and "injection" not in metrics:  # (fakes take blank sky: not judged then)
            placed = int(dia_sources["sky_source"].sum())
            # against what the image has room for with no source on it: a small image holds fewer than asked
            room = (metrics.get("dia_sources") or {}).get("sky_source_room")
            expected = min(n_sky_requested, int(room)) if room is not None else n_sky_requested
            _check(checks, "sky_sources", placed, placed >= 0.5 * expected, 0.5 * expected,
                   f"only {placed} of {expected} sky sources could be placed: the image is covered by footprints")
    elif dia_sources is not None and n_sky_requested > 0 and "injection" not in metrics:
        room = (metrics.get("dia_sources") or {}).get("sky_source_room")
        if room is None or int(room) > 0:  # (an image with no room for one sky source says nothing)
            _check(checks, "sky_sources", 0, False, 0.5 * n_sky_requested,
                   f"no sky source could be placed (of {n_sky_requested})")
    reasons = [c["reason"] for c in checks.values() if not c["ok"]]
    q["checks"] = checks
    q["verdict"] = VERDICT_BAD if reasons else VERDICT_OK
    q["verdict_reasons"] = reasons
    return q


def background_left(difference: np.ndarray, variance: np.ndarray, bad: np.ndarray, psf_image: np.ndarray) -> dict:
    """σ-clipped mean of the difference over good pixels and its size in matched-filter detection units."""
    from ..noise import clipped_stats

    step = max(1, int(np.sqrt(difference.size / 2**20)))
    d, v, b = difference[::step, ::step], variance[::step, ::step], bad[::step, ::step]
    good = ~b & (v > 0) & np.isfinite(d)
    if not good.any():
        return {"level": None, "detection_sigma": None}
    level, _, _ = clipped_stats(d[good], nsigma=3.0)
    sigma = math.sqrt(float(np.median(v[good])))
    nea = 1.0 / float(np.sum(np.asarray(psf_image, dtype=np.float64) ** 2))
    return {"level": float(level), "detection_sigma": abs(level) * math.sqrt(nea) / max(sigma, 1e-30)}
