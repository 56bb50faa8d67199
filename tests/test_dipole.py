"""Dipole fits: mis-registered templates, joint fits with the direct images, classification."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffim_dag import Exposure, GaussianPsf
from diffim_dag.kernels import detection as det
from diffim_dag.kernels.dipole import classify_dipole, fit_dipole
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
