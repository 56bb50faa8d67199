"""Registration from star lists (no WCS) and astrometric refinement after a poor WCS."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.exposure import Exposure
from diffim_dag.kernels.register import fit_transform, match_star_lists, prefer_translation, triangle_invariants
from diffim_dag.kernels.warp import AffineMapping
from diffim_dag.psf import GaussianPsf
from diffim_dag.sim import add_sources, simulate_pair
from diffim_dag.stages.template import prepare_template


def test_triangle_invariants_are_similarity_invariant():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, (30, 2))
    m = AffineMapping.similarity(scale=1.3, rotation=0.7, shift=(40, -9))
    inv1, v1 = triangle_invariants(xy)
    inv2, v2 = triangle_invariants(np.column_stack(m(xy[:, 0], xy[:, 1])))
    assert np.array_equal(v1, v2)
    np.testing.assert_allclose(inv1, inv2, atol=1e-9)


def test_match_star_lists_recovers_similarity_with_outliers_and_dropouts():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 1000, (80, 2))
    truth = AffineMapping.similarity(scale=0.97, rotation=np.deg2rad(12), shift=(55.0, -30.0), center=(500, 500))
    dst = np.column_stack(truth(src[:, 0], src[:, 1])) + rng.normal(0, 0.02, (80, 2))
    keep = rng.permutation(80)[:60]
    dst = np.vstack([dst[keep], rng.uniform(0, 1000, (15, 2))])  # 20 lost, 15 spurious
    src = np.vstack([src, rng.uniform(0, 1000, (10, 2))])
    res = match_star_lists(src, dst, max_stars=95)
    assert res.n_matched >= 50
    g = np.mgrid[0:1000:50, 0:1000:50].reshape(2, -1)
    u1, v1 = res.mapping(g[1], g[0])
    u0, v0 = truth(g[1], g[0])
    assert np.sqrt(np.mean((u1 - u0) ** 2 + (v1 - v0) ** 2)) < 0.02
    assert res.rms < 0.05
    # a clean fit gives the exact affine
    m, inl, rms = fit_transform(src[:50], np.column_stack(truth(src[:50, 0], src[:50, 1])))
    assert inl.all() and rms < 1e-9 and np.allclose(m.matrix, truth.matrix)


def test_prefer_translation_keeps_the_affine_only_where_its_linear_terms_are_significant():
    rng = np.random.default_rng(5)
    src = rng.uniform(0, 2000, (60, 2))
    noise = rng.normal(0, 0.05, (60, 2))
    shift = AffineMapping.shift(0.3, -81.2)
    dst = np.column_stack(shift(src[:, 0], src[:, 1])) + noise
    match = match_star_lists(src, dst, guess=AffineMapping.shift(0.0, -81.0))
    assert not np.array_equal(match.mapping.matrix, np.eye(2))  # the affine fit takes up some of the noise
    chosen, p = prefer_translation(src, dst, match)
    assert p > 1e-3 and np.array_equal(chosen.mapping.matrix, np.eye(2))
    d = dst[match.dst_index] - src[match.src_index]
    np.testing.assert_allclose(chosen.mapping.offset, d.mean(axis=0), rtol=0, atol=1e-12)
    assert chosen.rms == pytest.approx(np.sqrt(np.mean(np.sum((d - d.mean(axis=0)) ** 2, axis=1))))
    assert chosen.n_matched == match.n_matched and np.array_equal(chosen.src_index, match.src_index)
    assert np.hypot(*(chosen.mapping.offset - shift.offset)) < 0.03
    # a rotation of 0.01° moves the corners by 0.25 px, five times the noise: the affine stays
    rotated = AffineMapping.similarity(rotation=np.deg2rad(0.01), shift=(0.3, -81.2), center=(1000, 1000))
    dst = np.column_stack(rotated(src[:, 0], src[:, 1])) + noise
    match = match_star_lists(src, dst, guess=AffineMapping.shift(0.0, -81.0))
    chosen, p = prefer_translation(src, dst, match)
    assert p < 1e-6 and chosen is match
    # too few pairs to test: as matched
    few = match_star_lists(src[:5], dst[:5], guess=AffineMapping.shift(0.0, -81.0))
    chosen, p = prefer_translation(src[:5], dst[:5], few)
    assert chosen is few and np.isnan(p)


def _render_pair(seed=4, n=512, rotation=2.0):
    """Science and template of one star field; template pixel = R(``rotation``°)(science - c) + c + (37.3, -12.8)."""
    rng = np.random.default_rng(seed)
    nstar = 220
    x = rng.uniform(-80, n + 80, nstar)
    y = rng.uniform(-80, n + 80, nstar)
    f = 10 ** rng.uniform(3.3, 5.3, nstar)
    truth = AffineMapping.similarity(rotation=np.deg2rad(rotation), shift=(37.3, -12.8), center=(n / 2, n / 2))
    tx, ty = truth(x, y)
    images = []
    for xs, ys, sigma, noise, seed2 in ((x, y, 1.9, 5.0, 1), (tx, ty, 1.6, 3.0, 2)):
        img = np.full((n, n), 200.0, np.float32)
        add_sources(img, xs, ys, f, GaussianPsf(sigma_x=sigma), size=31)
        var = img.astype(np.float64) / 10 + noise**2
        img = img + np.random.default_rng(seed2).normal(0, np.sqrt(var)).astype(np.float32)
        images.append(Exposure.from_arrays(img, var, psf=GaussianPsf(sigma_x=sigma)))
    return images[0], images[1], truth


def test_register_offset_rotated_pair_without_wcs():
    science, template, truth = _render_pair()
    warped, metrics = prepare_template(science, template)
    assert metrics["registration"] == "stars" and metrics["warped"]
    assert metrics["registration_model"] == "affine" and metrics["registration_linear_terms_p"] < 1e-6
    fit = AffineMapping(metrics["registration_transform"]["matrix"], metrics["registration_transform"]["offset"])
    g = np.mgrid[0:512:16, 0:512:16].reshape(2, -1).astype(float)
    u1, v1 = fit(g[1], g[0])
    u0, v0 = truth(g[1], g[0])
    true_rms = float(np.sqrt(np.mean((u1 - u0) ** 2 + (v1 - v0) ** 2)))
    assert true_rms < 0.05
    assert metrics["registration_rms_px"] < 0.1
    assert metrics["alignment_rms_after_px"] < 0.1
    assert 0.8 < metrics["coverage"] < 0.97  # the shifted template leaves a strip uncovered
    # the warped template's PSF is the template PSF rotated by 2° (a circular Gaussian stays itself)
    assert warped.psf.fwhm(300, 300) == pytest.approx(template.psf.fwhm(), rel=0.02)


def test_a_shifted_pair_without_wcs_is_registered_as_a_shift():
    """No rotation made up from the centroids' noise: the translation of the matched stars (which the warp then
    applies with its separable path; tests/test_warp.py holds that path to the general one)."""
    science, template, truth = _render_pair(rotation=0.0)
    _, metrics = prepare_template(science, template)
    assert metrics["registration_model"] == "shift" and metrics["registration_linear_terms_p"] > 1e-3
    fit = metrics["registration_transform"]
    assert np.array_equal(fit["matrix"], np.eye(2))
    assert np.hypot(*(np.array(fit["offset"]) - truth.offset)) < 0.05
    assert metrics["alignment_rms_after_px"] < 0.1


def test_refinement_fixes_a_science_wcs_wrong_by_6px():
    pair = simulate_pair(size=512, seed=3, n_transients=2, n_variables=2, n_movers=1, n_cosmic_rays=2,
                         n_saturated=1, n_stars=200)
    science = pair.science
    wrong = science.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix + np.array([6.0, 0.0])  # sky now says the pixels lie 6 px right
    wrong.wcs.set()
    science = science.with_attrs(wcs=wrong)
    warped, metrics = prepare_template(science, pair.template, border=8)
    assert metrics["alignment_rms_before_px"] > 5.0
    assert metrics["refined"] is True
    assert metrics["alignment_rms_after_px"] < 0.1
    assert warped.xy0 == (science.xy0[0] - 8, science.xy0[1] - 8)
    # without refinement the residual stays
    _, m2 = prepare_template(science, pair.template, refine=False, border=0)
    assert "alignment_rms_after_px" not in m2


def test_alignment_windows_and_the_stars_found_in_them():
    """Large images check their alignment on stars of five windows (corners and centre); smaller ones whole."""
    from diffim_dag.stages.template import _stars, alignment_windows

    assert alignment_windows((0, 2048, 0, 2048)) == [(0, 2048, 0, 2048)]
    boxes = alignment_windows((10, 4106, -5, 4091))
    assert boxes == [(10, 1034, -5, 1019), (3082, 4106, -5, 1019), (10, 1034, 3067, 4091), (3082, 4106, 3067, 4091),
                     (1546, 2570, 1531, 2555)]
    science, _, _ = _render_pair()
    whole = _stars(science)
    windows = alignment_windows(science.bbox, side=128)
    assert len(windows) == 5
    part = _stars(science, windows=windows)
    assert 5 <= len(part) < len(whole)
    assert np.all(np.diff(part[:, 2]) <= 0)  # brightest first
    for x, y, _ in part:  # parent pixels, inside a window, and the same stars as the whole image's search
        assert any(b[0] <= x < b[1] and b[2] <= y < b[3] for b in windows)
        assert np.min(np.hypot(whole[:, 0] - x, whole[:, 1] - y)) < 0.05
