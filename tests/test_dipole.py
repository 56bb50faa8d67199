"""Dipole fits: mis-registered templates, joint fits with the direct images, classification."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffim_dag import Exposure, GaussianPsf
from diffim_dag.kernels import detection as det
from diffim_dag.kernels.dipole import classify_dipole, fit_dipole, fit_dipoles, linear_background
from diffim_dag.kernels.measure import render_psfs
from diffim_dag.sim import add_sources
from diffim_dag.stages.detect import DetectMeasureConfig, detect_and_measure

PSF = GaussianPsf(2.0)


def _positions(rng, n, lo, hi, sep):
    out = []
    while len(out) < n:
        x, y = rng.uniform(lo, hi, 2)
        if all((x - a) ** 2 + (y - b) ** 2 > sep * sep for a, b in out):
            out.append((x, y))
    return np.array(out)


@pytest.mark.parametrize("shift", [(1.0, 0.0), (0.0, -1.0), (math.sqrt(0.5), math.sqrt(0.5))])
def test_template_shifted_by_one_pixel_gives_dipoles(rng, shift):
    shape, xy0, noise = (300, 300), (40, 70), 5.0
    pos = _positions(rng, 10, 30, 270, 45) + np.array(xy0)
    flux = rng.uniform(8000, 15000, 10)
    sx, sy = shift
    sci = rng.normal(0, noise, shape)
    tmp = rng.normal(0, noise, shape)
    add_sources(sci, pos[:, 0], pos[:, 1], flux, PSF, xy0=xy0)
    add_sources(tmp, pos[:, 0] + sx, pos[:, 1] + sy, flux, PSF, xy0=xy0)
    var = np.full(shape, noise**2)
    science = Exposure.from_arrays(sci, var, xy0=xy0, psf=PSF)
    template = Exposure.from_arrays(tmp, var, xy0=xy0, psf=PSF)
    diff = Exposure.from_arrays(sci - tmp, 2 * var, xy0=xy0, psf=PSF)
    # (no systematic term: a 1-px misregistration is what it would call a systematic residual)
    cat = detect_and_measure(diff, science=science, template=template,
                             config=DetectMeasureConfig(n_sky_sources=0, systematic_fraction=0))
    assert len(cat) == 10  # each once: the two lobes merged into one source
    mid = pos + 0.5 * np.array(shift)
    for x, y in mid:
        d = np.hypot(cat["x"] - x, cat["y"] - y)
        assert np.sum(d < 1.0) == 1
    assert cat["is_dipole"].all()
    assert (cat["n_peaks_positive"] >= 1).all() and (cat["n_peaks_negative"] >= 1).all()
    # orientation: from the negative lobe (template, pos + shift) to the positive one (science, pos)
    expected = math.degrees(math.atan2(-sy, -sx))
    dtheta = (cat["dipole_orientation"] - expected + 180.0) % 360.0 - 180.0
    assert np.max(np.abs(dtheta)) < 10.0, dtheta.to_numpy()
    assert np.all(np.abs(cat["dipole_separation"] - 1.0) < 0.1), cat["dipole_separation"].to_numpy()
    # the lobes carry the stars' flux; forced photometry sees the stars in both images
    order = [int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y))) for x, y in mid]
    assert np.allclose(cat["dipole_pos_flux"].to_numpy()[order], flux, rtol=0.03)
    assert np.allclose(-cat["dipole_neg_flux"].to_numpy()[order], flux, rtol=0.03)
    assert np.allclose(cat["science_forced_flux"].to_numpy()[order], flux, rtol=0.05)
    assert np.allclose(cat["template_forced_flux"].to_numpy()[order], flux, rtol=0.05)


def _lsst_like_pair(rng, with_gradient=True):
    """Two dipoles, lobes at centre ± (2, 2) px, fluxes 2500 and 2345, noise 2, PSF σ 2."""
    shape, xy0, noise = (100, 100), (10, 20), 2.0
    centres = np.array([[45.3, 58.6], [74.2, 88.5]])
    fluxes = np.array([2500.0, 2345.0])
    plus = centres + 2.0
    minus = centres - 2.0
    yy, xx = np.mgrid[xy0[1] : xy0[1] + shape[0], xy0[0] : xy0[0] + shape[1]]
    grad = (10.0 + 0.3 * (xx - xy0[0]) + 0.5 * (yy - xy0[1])) if with_gradient else 0.0
    sci = rng.normal(0, noise, shape) + grad
    tmp = rng.normal(0, noise, shape) + grad
    add_sources(sci, plus[:, 0], plus[:, 1], fluxes, PSF, xy0=xy0)
    add_sources(tmp, minus[:, 0], minus[:, 1], fluxes, PSF, xy0=xy0)
    var = np.full(shape, noise**2)
    return shape, xy0, sci, tmp, var, plus, minus, fluxes


def _fit_all(sci, tmp, var, xy0, joint):
    diff = sci - tmp
    dvar = 2 * var
    fps = det.detect_tile(diff, dvar, np.zeros(diff.shape, np.int32), PSF.kernel_image(), origin=xy0)
    good = np.ones(diff.shape, bool)
    kw = dict(science=(sci, var, good), template=(tmp, var, good)) if joint else {}
    return fps, [fit_dipole(diff, dvar, good, PSF, fp, origin=xy0, **kw) for fp in fps]


def test_joint_dipole_fit_lobes_within_one_percent(rng):
    shape, xy0, sci, tmp, var, plus, minus, fluxes = _lsst_like_pair(rng)
    fps, fits = _fit_all(sci, tmp, var, xy0, joint=True)
    assert len(fps) == 2 and all(f.has_both_polarities for f in fps)
    for fit in fits:
        i = int(np.argmin(np.hypot(plus[:, 0] - fit["dipole_pos_x"], plus[:, 1] - fit["dipole_pos_y"])))
        assert fit["is_dipole"]
        assert abs(fit["dipole_pos_flux"] / fluxes[i] - 1) < 0.01
        assert abs(-fit["dipole_neg_flux"] / fluxes[i] - 1) < 0.01
        assert math.hypot(fit["dipole_pos_x"] - plus[i, 0], fit["dipole_pos_y"] - plus[i, 1]) < 0.05
        assert math.hypot(fit["dipole_neg_x"] - minus[i, 0], fit["dipole_neg_y"] - minus[i, 1]) < 0.05
        assert abs(fit["dipole_separation"] / (4 * math.sqrt(2)) - 1) < 0.01
        assert abs(fit["dipole_orientation"] - 45.0) < 1.0
        assert 0.7 < fit["dipole_chi2dof"] < 1.3
        assert fit["dipole_snr"] > 100
        # errors: the lobes' fluxes within 4σ, σ near the white-noise expectation 2·√(4πσ²)/√(1 + 0.5)
        assert abs(fit["dipole_pos_flux"] - fluxes[i]) < 4 * fit["dipole_pos_flux_err"]
        assert 5.0 < fit["dipole_pos_flux_err"] < 30.0


def test_background_prefit_matters_for_direct_images(rng):
    """With the gradient on the direct images, skipping the pre-fit would bias the fluxes: the fit must not."""
    _, xy0, sci, tmp, var, plus, minus, fluxes = _lsst_like_pair(rng, with_gradient=False)
    _, fits_flat = _fit_all(sci, tmp, var, xy0, joint=True)
    _, xy0, sci_g, tmp_g, var, *_ = _lsst_like_pair(np.random.default_rng(12345), with_gradient=True)
    _, fits_grad = _fit_all(sci_g, tmp_g, var, xy0, joint=True)
    for a, b in zip(fits_flat, fits_grad):
        assert abs(a["dipole_pos_flux"] - b["dipole_pos_flux"]) < 0.01 * a["dipole_pos_flux"]


def test_difference_only_fit_and_classification(rng):
    _, xy0, sci, tmp, var, plus, minus, fluxes = _lsst_like_pair(rng, with_gradient=False)
    fps, fits = _fit_all(sci, tmp, var, xy0, joint=False)
    for fit in fits:
        i = int(np.argmin(np.hypot(plus[:, 0] - fit["dipole_pos_x"], plus[:, 1] - fit["dipole_pos_y"])))
        assert fit["is_dipole"]
        assert abs(fit["dipole_pos_flux"] / fluxes[i] - 1) < 0.03
        assert math.hypot(fit["dipole_pos_x"] - plus[i, 0], fit["dipole_pos_y"] - plus[i, 1]) < 0.2


def test_classify_dipole_rules():
    assert classify_dipole(1000.0, -1000.0, 50.0)
    assert not classify_dipole(1000.0, -1000.0, 5.0 * math.sqrt(2) - 0.01)  # S/N cut
    assert not classify_dipole(700.0, -300.0, 50.0)  # 0.70 of the total in one lobe
    assert classify_dipole(640.0, -360.0, 50.0)
    assert not classify_dipole(0.0, 0.0, 50.0)


def test_transient_next_to_weak_negative_is_not_a_dipole(rng):
    """A bright positive with a faint negative neighbour in one footprint: fitted, but one lobe dominates."""
    shape = (120, 120)
    noise = 2.0
    img = rng.normal(0, noise, shape)
    add_sources(img, [60.0, 66.0], [60.0, 60.0], [6000.0, -600.0], PSF)
    var = np.full(shape, noise**2)
    exp = Exposure.from_arrays(img, var, psf=PSF)
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(cat) == 1
    row = cat.iloc[0]
    assert row["dipole_fitted"] and not row["is_dipole"]
    assert row["dipole_pos_flux"] / (row["dipole_pos_flux"] - row["dipole_neg_flux"]) > 0.65
    # a merged footprint larger than max_dipole_area is not fitted
    cat2 = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, max_dipole_area=10))
    assert not cat2["dipole_fitted"].any()


def _many_dipoles(rng, n=12, joint=True):
    """A field of dipoles of assorted separations and flux ratios (lobes 1–3 px apart), with its footprints."""
    shape, xy0, noise = (260, 300), (15, 25), 3.0
    centres = _positions(rng, n, 25, 235, 30) + np.array(xy0)
    offsets = rng.uniform(0.5, 1.5, (n, 2)) * rng.choice([-1, 1], (n, 2))
    f_pos, f_neg = rng.uniform(2000, 9000, n), rng.uniform(2000, 9000, n)
    sci, tmp = rng.normal(0, noise, shape), rng.normal(0, noise, shape)
    add_sources(sci, centres[:, 0] + offsets[:, 0], centres[:, 1] + offsets[:, 1], f_pos, PSF, xy0=xy0)
    add_sources(tmp, centres[:, 0] - offsets[:, 0], centres[:, 1] - offsets[:, 1], f_neg, PSF, xy0=xy0)
    var = np.full(shape, noise**2)
    diff, dvar = sci - tmp, 2 * var
    fps = [f for f in det.detect_tile(diff, dvar, np.zeros(shape, np.int32), PSF.kernel_image(), origin=xy0)
           if f.has_both_polarities]
    good = np.ones(shape, bool)
    kw = dict(science=(sci, var, good), template=(tmp, var, good)) if joint else {}
    return diff, dvar, good, fps, xy0, kw


def _trf_reference(diff, dvar, good, fp, xy0, science=None, template=None, margin=6, weight=0.5):
    """The dipole model fitted by scipy's trust-region reflective least squares, one footprint at a time, with
    the public renderer: an independent reference for the batched Levenberg–Marquardt fits."""
    from scipy.optimize import least_squares

    x0, y0 = xy0
    ny, nx = diff.shape
    bx0, bx1, by0, by1 = fp.bbox
    bbox = (max(bx0 - margin, x0), min(bx1 + margin, x0 + nx), max(by0 - margin, y0), min(by1 + margin, y0 + ny))
    sl = (slice(bbox[2] - y0, bbox[3] - y0), slice(bbox[0] - x0, bbox[1] - x0))
    inside = np.zeros((bbox[3] - bbox[2], bbox[1] - bbox[0]), bool)
    inside[by0 - bbox[2]:by1 - bbox[2], bx0 - bbox[0]:bx1 - bbox[0]] = fp.spans
    blocks = [(diff[sl], np.sqrt(1.0 / dvar[sl]))]
    if science is not None:
        for img, var, _ in (science, template):
            w = 1.0 / var[sl]
            blocks.append((img[sl] - linear_background(img[sl], w, ~inside), np.sqrt(weight * w)))
    shape_at = (0.5 * (bx0 + bx1 - 1), 0.5 * (by0 + by1 - 1))
    size = PSF.default_size(*shape_at)

    def residuals(p):
        pos, neg = render_psfs(PSF, [(p[0], p[1]), (p[2], p[3])], bbox, size=size, shape_at=shape_at)
        pos, neg = p[4] * pos, p[5] * neg
        parts = [(blocks[0][0] - (pos - neg)) * blocks[0][1]]
        if len(blocks) == 3:
            parts += [(blocks[1][0] - pos) * blocks[1][1], (blocks[2][0] - neg) * blocks[2][1]]
        return np.concatenate([q.ravel() for q in parts])

    sig = fp.peak_significance
    ip, ineg = int(np.argmax(sig > 0)), int(np.argmax(sig < 0))
    p0 = [fp.peak_x[ip], fp.peak_y[ip], fp.peak_x[ineg], fp.peak_y[ineg], 1000.0, 1000.0]
    lo = [bbox[0] - 0.5, bbox[2] - 0.5, bbox[0] - 0.5, bbox[2] - 0.5, 0.0, 0.0]
    hi = [bbox[1] - 0.5, bbox[3] - 0.5, bbox[1] - 0.5, bbox[3] - 0.5, np.inf, np.inf]
    res = least_squares(residuals, p0, bounds=(lo, hi), x_scale=[1, 1, 1, 1, 1000, 1000], xtol=1e-12, ftol=1e-12,
                        method="trf")
    n_data = blocks[0][0].size * (1 + (2 * weight if len(blocks) == 3 else 0))  # every pixel good here
    return res.x, float(np.sum(res.fun ** 2)), n_data


@pytest.mark.parametrize("joint", [True, False])
def test_batched_dipole_fits_reach_the_least_squares_minimum(rng, joint):
    """Each batched fit reaches the minimum scipy's trust-region fit finds on its own: the same χ² and the
    same lobes (to a small fraction of their errors); fitted in a batch or alone, the same result."""
    diff, dvar, good, fps, xy0, kw = _many_dipoles(rng, joint=joint)
    assert len(fps) >= 8
    batch = fit_dipoles(diff, dvar, good, PSF, fps, origin=xy0, **kw)
    for fp, fit in zip(fps, batch):
        assert fit["dipole_fitted"] and not fit["dipole_flag"]
        p_ref, chi2_ref, n_data = _trf_reference(diff, dvar, good, fp, xy0, **kw)
        got = np.array([fit["dipole_pos_x"], fit["dipole_pos_y"], fit["dipole_neg_x"], fit["dipole_neg_y"],
                        fit["dipole_pos_flux"], -fit["dipole_neg_flux"]])
        err = np.array([fit[f"dipole_{k}_err"] for k in ("pos_x", "pos_y", "neg_x", "neg_y", "pos_flux", "neg_flux")])
        assert np.all(np.abs(got - p_ref) < 0.01 * err), (got, p_ref, err)
        # the χ² the fit reports (χ²/dof × dof) is the reference's minimum
        assert fit["dipole_chi2dof"] * (n_data - 6) == pytest.approx(chi2_ref, rel=1e-7)
        alone = fit_dipole(diff, dvar, good, PSF, fp, origin=xy0, **kw)
        for key, value in fit.items():
            if isinstance(value, float) and np.isfinite(value):
                assert alone[key] == pytest.approx(value, rel=1e-7, abs=1e-9), key
            else:
                assert alone[key] == value or (np.isnan(alone[key]) and np.isnan(value)), key


@pytest.mark.parametrize("joint", [True, False])
def test_trial_chi2_is_the_normal_equations_chi2(rng, joint):
    """The fit judges a trial step by its χ² alone (two renders); that χ² is bitwise the one the normal equations
    (ten renders, made for the accepted steps only) give at the same parameters, in a batch or for a subset."""
    from diffim_dag.kernels.dipole import _Stamps, _chi2, _normal_equations

    diff, dvar, good, fps, xy0, kw = _many_dipoles(rng, joint=joint)
    group = [_Stamps(diff, dvar, good, PSF, fp, xy0, kw.get("science"), kw.get("template"), 0.5, 6) for fp in fps]
    size = group[0].size
    assert all(g.size == size for g in group)
    m = len(group)
    shape = (max(g.bbox[3] - g.bbox[2] for g in group), max(g.bbox[1] - g.bbox[0] for g in group))
    blocks = len(group[0].blocks)

    def padded(arrays):
        out = np.zeros((m,) + shape)
        for o, a in zip(out, arrays):
            o[: a.shape[0], : a.shape[1]] = a
        return out

    data = [padded([g.blocks[b][0] for g in group]) for b in range(blocks)]
    roots = [padded([g.blocks[b][1] for g in group]) for b in range(blocks)]
    boxes = np.array([g.bbox for g in group], dtype=np.float64)
    params = np.column_stack([np.array([g.peaks for g in group]) + rng.uniform(-0.4, 0.4, (m, 4)),
                              rng.uniform(1000.0, 8000.0, (m, 2))])
    chi2 = _chi2(PSF, group, params, boxes, shape, size, data, roots, joint)
    full, _, _ = _normal_equations(PSF, group, params, boxes, shape, size, data, roots, joint)
    assert chi2.tobytes() == full.tobytes()
    some = np.arange(1, m, 2)
    part, _, _ = _normal_equations(PSF, [group[i] for i in some], params[some], boxes[some], shape, size,
                                   [x[some] for x in data], [x[some] for x in roots], joint)
    assert part.tobytes() == chi2[some].tobytes()


def test_footprint_without_both_signs_is_not_fitted(rng):
    diff, dvar, good, fps, xy0, kw = _many_dipoles(rng, n=3)
    single = det.detect_tile(np.where(diff > 0, diff, 0.0), dvar, np.zeros(diff.shape, np.int32),
                             PSF.kernel_image(), origin=xy0)
    out = fit_dipoles(diff, dvar, good, PSF, [single[0], fps[0]], origin=xy0, **kw)
    assert not out[0]["dipole_fitted"] and not out[0]["dipole_flag"]
    assert out[1]["dipole_fitted"]
