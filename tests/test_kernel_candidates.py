"""Single-candidate fits, cell fitting and kernel-sum clipping."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from diffim_dag.config import KernelConfig
from diffim_dag.kernels.basis import KernelBasis, alard_lupton_basis, basis_from_config, delta_function_basis
from diffim_dag.kernels.candidates import (
    CellStamps,
    clip_kernel_sums,
    convolve_stamps,
    fit_candidates,
    fit_cell,
    fit_cells,
)
from diffim_dag.psf import FWHM_PER_SIGMA, GaussianPsf

SIGMA_T, SIGMA_S = 1.4, 2.0
SIGMA_K = np.sqrt(SIGMA_S**2 - SIGMA_T**2)


def test_convolve_stamps_matches_scipy():
    rng = np.random.default_rng(0)
    stamps = rng.normal(size=(2, 31, 31))
    basis = alard_lupton_basis(11, [0.8, 1.6], [2, 1])
    out = convolve_stamps(stamps, basis)
    assert out.shape == (2, len(basis), 21, 21)
    ref = fftconvolve(stamps[1], basis[4], mode="same")[5:-5, 5:-5]
    np.testing.assert_allclose(out[1, 4], ref, atol=1e-12)


@pytest.mark.parametrize("size, sigmas, degrees", [(11, (0.8, 1.6), (2, 1)), (17, (1.2, 2.4, 4.8), (4, 2, 2)),
                                                   (21, (1.0, 2.0, 4.0), (6, 4, 2))])
def test_separable_convolution_is_the_fft_one_and_each_stamps_own(size, sigmas, degrees):
    """The Alard–Lupton basis by 1-D passes (its separable factors and the renormalization's combinations): the
    same interior as the FFT convolution to round-off, and a stamp's values whatever stamps it is stacked with."""
    basis = KernelBasis(images=alard_lupton_basis(size, sigmas, degrees), kind="alard-lupton", sigmas=sigmas,
                        degrees=degrees)
    factors = basis.separable
    assert factors is not None and factors.transform.shape == (basis.n, basis.n)
    rng = np.random.default_rng(3)
    stamps = rng.normal(100.0, 10.0, size=(9, 2 * size + 1, 2 * size + 1))
    stamps[2, 5, 7] += 5.0e4  # (a bright pixel: round-off relative to the largest values)
    fft = convolve_stamps(stamps, basis.images)
    direct = convolve_stamps(stamps, basis.images, factors)
    assert direct.shape == fft.shape
    np.testing.assert_allclose(direct, fft, rtol=0, atol=1e-12 * np.abs(fft).max())
    for part in (slice(0, 1), slice(2, 5), slice(8, 9)):
        assert np.array_equal(convolve_stamps(stamps[part], basis.images, factors), direct[part])


def test_only_the_alard_lupton_basis_is_taken_as_separable():
    assert KernelBasis(images=delta_function_basis(7), kind="delta-function").separable is None
    # widths that do not give the images back: no factors (the FFT convolution is used)
    images = alard_lupton_basis(11, (0.8, 1.6), (2, 1))
    assert KernelBasis(images=images, kind="alard-lupton", sigmas=(0.9, 1.6), degrees=(2, 1)).separable is None
    assert KernelBasis(images=images, kind="alard-lupton", sigmas=(0.8, 1.6), degrees=(2, 1)).separable is not None


def test_delta_function_stamps_scale_and_background():
    """White-noise reference (every pixel a delta): science = 2.7 × template; then + 11.3."""
    rng = np.random.default_rng(1)
    size = 9
    basis = KernelBasis(images=delta_function_basis(size), kind="delta-function")
    ref = rng.normal(100.0, 10.0, size=(1, 2 * size + 1 + 10, 2 * size + 1 + 10))
    var = np.ones_like(ref)
    fit = fit_candidates(ref, 2.7 * ref, var, basis)[0]
    assert fit.kernel_sum == pytest.approx(2.7, abs=1e-5)
    assert fit.background == pytest.approx(0.0, abs=1e-4)
    fit = fit_candidates(ref, ref + 11.3, var, basis)[0]
    assert fit.kernel_sum == pytest.approx(1.0, abs=1e-5)
    assert fit.background == pytest.approx(11.3, abs=1e-4)
    assert fit.status == "used" and abs(fit.residual_mean) < 1e-6


def _star_pair(kernel_size=21, noise=0.0, seed=0, offset=(0.3, -0.2), scale=1.0, template_noise=True, flux=1e5):
    s = 2 * kernel_size + 1
    ref = flux * GaussianPsf(SIGMA_T).kernel_image(size=s, offset=offset)
    true_k = GaussianPsf(SIGMA_K).kernel_image(size=kernel_size)
    tgt = scale * fftconvolve(ref, true_k, mode="same")
    rng = np.random.default_rng(seed)
    var = np.full((s, s), max(noise, 1.0) ** 2 * 2)
    if noise:
        if template_noise:
            ref = ref + rng.normal(0, noise, ref.shape)
        tgt = tgt + rng.normal(0, noise, tgt.shape)
    return ref[None], tgt[None], var[None], true_k


def test_known_gaussian_kernel_recovered_exactly_without_noise():
    fwhm_t, fwhm_s = SIGMA_T * FWHM_PER_SIGMA, SIGMA_S * FWHM_PER_SIGMA
    basis = basis_from_config(KernelConfig(), fwhm_t, fwhm_s)
    assert basis.size == 19  # 6 × the widest Gaussian, odd (above min_kernel_size = 17)
    ref, tgt, var, true_k = _star_pair(basis.size)
    fit = fit_candidates(ref, tgt, var, basis)[0]
    kernel = np.tensordot(fit.coefficients[:-1], basis.images, axes=(0, 0))
    assert np.abs(kernel - true_k).max() < 1e-3 * true_k.max()
    assert fit.kernel_sum == pytest.approx(true_k.sum(), abs=1e-8)
    assert fit.background == pytest.approx(0.0, abs=1e-6)
    assert fit.status == "used"


def test_known_gaussian_kernel_with_noise_sum_within_1e3():
    basis = basis_from_config(KernelConfig(), SIGMA_T * FWHM_PER_SIGMA, SIGMA_S * FWHM_PER_SIGMA)
    # noise in the science (target) image only: the template is a deep coadd
    ref, tgt, var, true_k = _star_pair(basis.size, noise=5.0, seed=3, scale=1.7, template_noise=False,
                                     flux=1e6)
    fit = fit_candidates(ref, tgt, var, basis)[0]
    assert fit.kernel_sum == pytest.approx(1.7, abs=1.7e-3)
    # var = 2 noise² but only the target is noisy: std(D/σ) ≈ sqrt((529 - 28) / 529 / 2) = 0.69
    assert fit.status == "used" and 0.6 < fit.residual_std < 0.78


def test_residual_cuts_reject_bad_candidates():
    basis = basis_from_config(KernelConfig(), SIGMA_T * FWHM_PER_SIGMA, SIGMA_S * FWHM_PER_SIGMA)
    ref, tgt, var, _ = _star_pair(basis.size, noise=5.0, seed=4)
    bad = tgt.copy()
    c = bad.shape[-1] // 2
    bad[0, c + 4, c - 3] += 3000.0  # a cosmic ray in the target interior
    fits = fit_candidates(np.concatenate([ref, ref]), np.concatenate([tgt, bad]), np.concatenate([var, var]), basis)
    assert fits[0].status == "used"
    assert fits[1].status == "rejected" and fits[1].reason == "residual_std"
    # a NaN stamp → singular
    nan_ref = ref.copy()
    nan_ref[0, 0, 0] = np.nan
    f = fit_candidates(nan_ref, tgt, var, basis)[0]
    assert f.status == "rejected" and f.reason == "singular"


def test_fit_cell_replaces_rejected_candidates_and_caps_per_cell():
    basis = basis_from_config(KernelConfig(), SIGMA_T * FWHM_PER_SIGMA, SIGMA_S * FWHM_PER_SIGMA)
    stamps = [_star_pair(basis.size, noise=5.0, seed=s) for s in range(8)]
    ref = np.concatenate([s[0] for s in stamps])
    tgt = np.concatenate([s[1] for s in stamps])
    var = np.concatenate([s[2] for s in stamps])
    tgt[1, 21 + 3, 21 + 2] += 3000.0  # candidate 11 is bad
    cell = CellStamps(cell=4, ids=np.arange(10, 18), x=np.arange(8.0), y=np.arange(8.0),
                      reference=ref, target=tgt, variance=var)
    cf = fit_cell(cell, basis, KernelConfig())
    assert [f.id for f in cf.used] == [10, 12, 13, 14, 15]
    assert [(f.id, f.reason) for f in cf.fits if f.status == "rejected"] == [(11, "residual_std")]
    cf = fit_cell(cell, basis, KernelConfig(candidates_per_cell=2), exclude={10})
    assert [f.id for f in cf.used] == [12, 13] and len(cf.fits) == 3


def test_cells_fitted_together_equal_the_cells_fitted_one_by_one(monkeypatch):
    """fit_cells stacks the rounds' candidates of every cell (FIT_BATCH at a time): each fit is bitwise the one
    of fit_cell, rejected candidates are replaced within their own cell, exclusions stay per cell."""
    import diffim_dag.kernels.candidates as candidates

    monkeypatch.setattr(candidates, "FIT_BATCH", 16)  # batches that cut across cells
    basis = basis_from_config(KernelConfig(), SIGMA_T * FWHM_PER_SIGMA, SIGMA_S * FWHM_PER_SIGMA)
    cells, seed = [], 0
    for c, n in enumerate([1, 4, 2, 6, 3, 5, 6, 2, 6, 1]):
        pairs = [_star_pair(basis.size, noise=5.0, seed=seed + k, scale=1.0 + 0.1 * c) for k in range(n)]
        seed += n
        tgt = np.concatenate([p[1] for p in pairs])
        if n >= 4:
            tgt[1, 21 + 3, 21 + 2] += 3000.0  # a rejected candidate: the cell fits a second round
        cells.append(CellStamps(cell=c, ids=100 * c + np.arange(n), x=np.arange(n, dtype=float),
                                y=np.arange(n, dtype=float), reference=np.concatenate([p[0] for p in pairs]),
                                target=tgt, variance=np.concatenate([p[2] for p in pairs])))
    config = KernelConfig(candidates_per_cell=3)
    excludes = [frozenset(), frozenset({100}), frozenset(), frozenset({301})] + [frozenset()] * 6
    together = fit_cells(cells, basis, config, excludes)
    alone = [fit_cell(cell, basis, config, ex) for cell, ex in zip(cells, excludes)]
    assert any(f.status == "rejected" for cf in alone for f in cf.fits)
    for a, b in zip(together, alone):
        assert (a.cell, a.n_available, [f.id for f in a.fits]) == (b.cell, b.n_available, [f.id for f in b.fits])
        for fa, fb in zip(a.fits, b.fits):
            assert (fa.cell, fa.status, fa.reason) == (fb.cell, fb.status, fb.reason)
            assert fa.kernel_sum == fb.kernel_sum and fa.background == fb.background
            assert fa.residual_mean == fb.residual_mean and fa.residual_std == fb.residual_std
            assert np.array_equal(fa.coefficients, fb.coefficients)


def test_kernel_sum_clipping_rejects_only_the_outlier():
    keep, mean, std = clip_kernel_sums([1, 1, 1, 1, 2, 3, 4, 50], nsigma=3.0)
    assert keep.tolist() == [True] * 7 + [False]
    assert mean == pytest.approx(13 / 7)
    # identical (noise-free) sums are all kept
    keep, _, _ = clip_kernel_sums(np.ones(9) + 1e-13 * np.arange(9))
    assert keep.all()


def test_stacked_solves_and_medians_are_each_systems_own(rng):
    """A stack of normal equations is solved at once, bitwise as each system alone (equilibration, LU), and a
    singular system among them gets the one-by-one fallback (the pseudo-inverse), not the others' failure; the
    constant weighting's per-stamp medians of the good variances are np.median's."""
    from diffim_dag.kernels.candidates import _good_medians, _solve_one, solve_normal_equations

    a = rng.normal(size=(6, 9, 9))
    matrix = a @ a.transpose(0, 2, 1) + 1e-3 * np.eye(9)
    matrix[2] = np.outer(np.arange(1.0, 10.0), np.arange(1.0, 10.0))  # rank one: singular
    vector = rng.normal(size=(6, 9))
    got = solve_normal_equations(matrix, vector)
    for i in range(6):
        assert np.array_equal(got[i], _solve_one(matrix[i], vector[i]))
    assert np.all(np.isfinite(got[2])) and not np.allclose(matrix[2] @ got[2], vector[2])  # (least squares)

    values = rng.uniform(1.0, 2.0, (5, 40))
    good = rng.random((5, 40)) < 0.7
    good[3] = False  # no good value: 1.0
    good[4, :] = False
    good[4, :7] = True  # an odd count
    expected = [np.median(v[g]) if g.any() else 1.0 for v, g in zip(values, good)]
    assert np.array_equal(_good_medians(values, good), np.array(expected))
