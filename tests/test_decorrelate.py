"""Tests of diffim_dag.kernels.decorrelate (Reiss & Lupton 2016 decorrelation).

Fixtures are pure-noise image pairs: science (unconvolved) white noise of
variance σs², template white noise of variance σt² convolved with the Gaussian
matching kernel of a PSF σ 2.2 → 3.3 match, σ_K = √(3.3² − 2.2²).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from diffim_dag.kernels.chebyshev import n_terms
from diffim_dag.kernels.convolve import convolve_spatial
from diffim_dag.kernels.decorrelate import (
    cell_weights,
    clipped_mean_variance,
    decorrelate,
    decorrelate_spatial,
    decorrelation_kernel_fourier,
    decorrelation_kernel_image,
)
from diffim_dag.kernels.solution import KernelSolution

SIGMA_K = float(np.sqrt(3.3**2 - 2.2**2))


def gaussian_kernel(sigma: float, size: int | None = None) -> np.ndarray:
    size = 2 * int(np.ceil(4 * sigma)) + 1 if size is None else size
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / k.sum()


def noise_pair(n: int, var_science: float, var_template: float, kernel: np.ndarray, seed: int):
    """Science noise, and template noise convolved with ``kernel`` without edge effects (valid region)."""
    rng = np.random.default_rng(seed)
    h = kernel.shape[0] // 2
    science = rng.normal(0.0, np.sqrt(var_science), size=(n, n))
    template = rng.normal(0.0, np.sqrt(var_template), size=(n + 2 * h, n + 2 * h))
    convolved = scipy.signal.fftconvolve(template, kernel, mode="valid")
    return science, convolved


def lag_correlation(image: np.ndarray, lag: int) -> float:
    """Mean of the x- and y-lag autocorrelation coefficients."""
    a = image - image.mean()
    var = np.mean(a * a)
    cx = np.mean(a[:, :-lag] * a[:, lag:]) / var
    cy = np.mean(a[:-lag, :] * a[lag:, :]) / var
    return 0.5 * (cx + cy)


# --- the filter itself --------------------------------------------------------------


def test_phi_real_positive_unit_at_zero_and_half_plane():
    k = gaussian_kernel(SIGMA_K)
    phi = decorrelation_kernel_fourier(k, (64, 80), sigma_u2=0.5, sigma_c2=2.0)
    assert phi.shape == (64, 80) and phi.dtype == np.float64
    assert np.all(np.isreal(phi)) and np.all(phi > 0)
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-12)
    # even: φ(−f) = φ(f)
    np.testing.assert_allclose(phi, np.roll(phi[::-1, ::-1], (1, 1), axis=(0, 1)), rtol=1e-12)
    half = decorrelation_kernel_fourier(k, (64, 80), sigma_u2=0.5, sigma_c2=2.0, half=True)
    np.testing.assert_allclose(half, phi[:, :41], rtol=1e-12)
    # high frequencies are boosted up to √((σu² + σc²)/σu²)
    assert phi.max() == pytest.approx(np.sqrt(2.5 / 0.5), rel=1e-3)
    # no convolved noise: the identity
    np.testing.assert_allclose(decorrelation_kernel_fourier(k, (32, 32), sigma_u2=1.0, sigma_c2=0.0), 1.0)


def test_phi_matches_analytic_gaussian():
    """For a Gaussian kernel |K(f)| = exp(−2π²σ²|f|²) (well sampled), so φ is known in closed form."""
    k = gaussian_kernel(SIGMA_K, size=41)
    shape = (96, 128)
    su2, sc2, kappa = 0.3, 1.7, 1.3
    phi = decorrelation_kernel_fourier(k, shape, sigma_u2=su2, sigma_c2=sc2, kappa=kappa)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    kf = np.exp(-2 * np.pi**2 * SIGMA_K**2 * (fx**2 + fy**2))
    truth = np.sqrt((su2 + kappa**2 * sc2) / (su2 + sc2 * kf**2))
    np.testing.assert_allclose(phi, truth, rtol=1e-6)


def test_phi_zero_phase_for_offset_kernel_independent_of_centring():
    """φ depends only on |K(f)|: shifting the kernel inside its stamp leaves it unchanged."""
    k = np.zeros((21, 21))
    shifted = np.zeros((21, 21))
    k[5:16, 5:16] = gaussian_kernel(1.5, size=11)
    shifted[7:18, 2:13] = gaussian_kernel(1.5, size=11)
    a = decorrelation_kernel_fourier(k, (50, 50), sigma_u2=1.0, sigma_c2=1.0)
    b = decorrelation_kernel_fourier(shifted, (50, 50), sigma_u2=1.0, sigma_c2=1.0)
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_phi_input_validation():
    k = gaussian_kernel(1.0)
    with pytest.raises(ValueError, match="sigma_u2"):
        decorrelation_kernel_fourier(k, (32, 32), sigma_u2=0.0, sigma_c2=1.0)
    with pytest.raises(ValueError, match="sigma_c2"):
        decorrelation_kernel_fourier(k, (32, 32), sigma_u2=1.0, sigma_c2=-1.0)
    with pytest.raises(ValueError, match="does not fit"):
        decorrelation_kernel_fourier(k, (5, 5), sigma_u2=1.0, sigma_c2=1.0)


def test_kernel_image_centred_unit_sum_and_consistent_with_phi():
    k = gaussian_kernel(SIGMA_K)
    img = decorrelation_kernel_image(k, sigma_u2=1.0, sigma_c2=4.0)
    size = 2 * k.shape[0] + 1  # enough for σc²/σu² = 4
    assert img.shape == (size, size)
    c = size // 2
    assert np.unravel_index(np.argmax(img), img.shape) == (c, c)
    np.testing.assert_allclose(img, img[::-1, ::-1], atol=1e-12)
    assert img.sum() == pytest.approx(1.0, abs=1e-3)
    # convolving with the image kernel ≈ applying φ in Fourier space
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(128, 128))
    direct = scipy.signal.fftconvolve(noise, img, mode="same")
    vu = np.ones_like(noise)
    fourier, _ = decorrelate(noise, kernel=k, sigma_u2=1.0, sigma_c2=4.0, variance_unconvolved=vu, variance_convolved=vu)
    inner = (slice(40, -40), slice(40, -40))
    np.testing.assert_allclose(direct[inner], fourier[inner], atol=2e-3 * np.abs(fourier).max())


def test_kernel_image_default_size_keeps_the_flux_for_large_noise_ratio():
    """For σc²/σu² = 100 the filter's wings are wide: the default cut grows until the sum is 1 ± 1e-3."""
    k = gaussian_kernel(SIGMA_K)
    small = decorrelation_kernel_image(k, sigma_u2=1.0, sigma_c2=100.0, size=k.shape[0])
    assert abs(small.sum() - 1.0) > 0.05  # a kernel-sized cut loses flux
    img = decorrelation_kernel_image(k, sigma_u2=1.0, sigma_c2=100.0)
    assert img.shape[0] > 2 * k.shape[0] + 1 and img.shape[0] % 2 == 1
    assert img.sum() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="odd"):
        decorrelation_kernel_image(k, sigma_u2=1.0, sigma_c2=1.0, size=10)


# --- acceptance tests (issue 4) ------------------------------------------------------


@pytest.mark.parametrize("var_science,var_template", [(0.04, 0.04), (0.08, 0.04), (0.04, 0.08)])
def test_corrected_variance(var_science, var_template):
    """Pixel variance of the decorrelated difference = σs² + σt² (±5%); variance plane agrees (±2%)."""
    n = 512
    k = gaussian_kernel(SIGMA_K)
    science, convolved = noise_pair(n, var_science, var_template, k, seed=42)
    difference = science - convolved
    vs = np.full((n, n), var_science, dtype=np.float32)
    vt = np.full((n, n), var_template, dtype=np.float32)
    su2 = clipped_mean_variance(vs)
    sc2 = clipped_mean_variance(vt)
    expected = var_science + var_template
    before = difference.var()
    # the undecorrelated difference under-reports its noise (σt² ΣK² instead of σt²)
    assert before < 0.9 * expected
    image, variance = decorrelate(
        difference, kernel=k, sigma_u2=su2, sigma_c2=sc2, variance_unconvolved=vs, variance_convolved=vt
    )
    assert image.dtype == np.float32 and variance.dtype == np.float32
    measured = image.var()
    assert measured == pytest.approx(expected, rel=0.05)
    assert float(variance.mean()) == pytest.approx(expected, rel=0.02)
    assert float(variance.mean()) == pytest.approx(measured, rel=0.02)


def test_sourceless_pair_becomes_white():
    """Science σ² = 1 (unconvolved), template σ² = 100 (convolved with K).

    The template is the convolved input here: its convolved noise (variance
    100 ΣK² ≈ 1.3) dominates the difference and is strongly correlated, so the
    lag-1..3 correlations are > 0.2 before decorrelation (the reverse assignment
    would leave only 1 % of the noise correlated and test nothing).
    """
    n = 512
    k = gaussian_kernel(SIGMA_K)
    science, convolved = noise_pair(n, 1.0, 100.0, k, seed=7)
    difference = science - convolved
    ones = np.ones((n, n))
    before = [lag_correlation(difference, lag) for lag in (1, 2, 3)]
    assert min(before) > 0.2
    image, variance = decorrelate(
        difference, kernel=k, sigma_u2=1.0, sigma_c2=100.0, variance_unconvolved=ones, variance_convolved=100 * ones
    )
    after = [lag_correlation(image, lag) for lag in (1, 2, 3)]
    assert max(abs(a) for a in after) < 0.1
    assert image.var() == pytest.approx(101.0, rel=0.05)
    np.testing.assert_allclose(variance, 101.0)


def test_spatial_agrees_with_global_on_constant_kernel():
    n = 256
    k = gaussian_kernel(SIGMA_K)
    science, convolved = noise_pair(n, 0.05, 0.08, k, seed=3)
    difference = science - convolved
    vs = np.full((n, n), 0.05)
    vt = np.full((n, n), 0.08)
    args = dict(sigma_u2=0.05, sigma_c2=0.08, variance_unconvolved=vs, variance_convolved=vt)
    glob, gvar = decorrelate(difference, kernel=k, **args)
    spat, svar = decorrelate_spatial(difference, kernel_at=lambda x, y: k, origin=(500, 700), grid_cells=3, **args)
    rel = np.sqrt(np.mean((spat - glob) ** 2) / np.mean(glob**2))
    assert rel < 0.03
    np.testing.assert_allclose(svar, gvar, rtol=0.03)


def varying_solution(n: int) -> KernelSolution:
    """A unit-sum kernel blending a narrow (σ 1.3) and a wide (σ 2.9) Gaussian linearly across x."""
    narrow, wide = gaussian_kernel(1.3, 25), gaussian_kernel(2.9, 25)
    coeffs = np.zeros((2, n_terms(1)))
    coeffs[:, 0] = 0.5
    coeffs[0, 1], coeffs[1, 1] = 0.5, -0.5  # T_1 = u: weights (1 ± u)/2, all narrow at x_min (u = −1)
    return KernelSolution(
        basis=np.stack([wide, narrow]),
        kernel_coefficients=coeffs,
        spatial_order=1,
        background_coefficients=np.zeros(1),
        background_order=0,
        bbox=(0.0, n - 1.0, 0.0, n - 1.0),
    )


def test_spatial_varying_kernel_whitens_everywhere_without_seams():
    n = 256
    sol = varying_solution(n)
    assert sol.kernel_at(0, 0)[12, 12] > sol.kernel_at(n - 1, 0)[12, 12]  # narrow on the left
    rng = np.random.default_rng(17)
    h = sol.half_width
    template = rng.normal(0.0, 10.0, size=(n + 2 * h, n + 2 * h))
    convolved = convolve_spatial(template, sol, origin=(-h, -h))[h:-h, h:-h].astype(np.float64)
    difference = rng.normal(0.0, 1.0, size=(n, n)) - convolved
    ones = np.ones((n, n))
    args = dict(sigma_u2=1.0, sigma_c2=100.0, variance_unconvolved=ones, variance_convolved=100 * ones)
    spat, svar = decorrelate_spatial(difference, kernel_at=sol.kernel_at, origin=(0, 0), grid_cells=4, **args)
    centre_kernel, _ = decorrelate(difference, kernel=sol.kernel_at(n / 2, n / 2), **args)
    for cols in (slice(0, 64), slice(192, 256)):
        before = lag_correlation(difference[:, cols], 1)
        assert before > 0.2
        assert abs(lag_correlation(spat[:, cols], 1)) < 0.05
        assert spat[:, cols].var() == pytest.approx(101.0, rel=0.05)
    # one kernel for the whole image leaves the edges correlated (so the spatial version is needed)
    assert max(abs(lag_correlation(centre_kernel[:, c], 1)) for c in (slice(0, 64), slice(192, 256))) > 0.05
    np.testing.assert_allclose(svar, 101.0, rtol=1e-5)


def test_spatial_constant_image_stays_constant():
    """φ(0) = 1 and the cell weights sum to 1: a constant image passes through unchanged (no seams)."""
    n = 120
    sol = varying_solution(n)
    image = np.full((n, 130), 3.25)
    ones = np.ones_like(image)
    out, var = decorrelate_spatial(
        image, kernel_at=sol.kernel_at, origin=(0, 0), grid_cells=(3, 5), sigma_u2=1.0, sigma_c2=3.0,
        variance_unconvolved=ones, variance_convolved=ones,
    )
    np.testing.assert_allclose(out, 3.25, rtol=1e-6)
    np.testing.assert_allclose(var, 2.0, rtol=1e-5)  # κ̄ = 1 everywhere


@pytest.mark.parametrize("n,cells", [(100, 1), (100, 3), (257, 4), (64, 64)])
def test_cell_weights_partition_of_unity(n, cells):
    w = cell_weights(n, cells)
    assert w.shape == (cells, n)
    assert (w >= 0).all() and (w <= 1).all()
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)
    # each weight is 1 at its own centre
    centres = (np.arange(cells) + 0.5) * n / cells - 0.5
    for i, c in enumerate(centres):
        if float(c).is_integer():
            assert w[i, int(c)] == pytest.approx(1.0)
    # smooth: no jumps larger than the cosine's maximum slope allows
    if cells > 1:
        spacing = n / cells
        assert np.abs(np.diff(w, axis=1)).max() <= np.pi / (2 * spacing) + 1e-9


def test_nan_pixels_stay_nan_and_do_not_spread():
    n = 96
    k = gaussian_kernel(SIGMA_K)
    science, convolved = noise_pair(n, 1.0, 1.0, k, seed=2)
    difference = science - convolved
    difference[40, 50] = np.nan
    ones = np.ones((n, n))
    for out, _ in (
        decorrelate(difference, kernel=k, sigma_u2=1, sigma_c2=1, variance_unconvolved=ones, variance_convolved=ones),
        decorrelate_spatial(
            difference, kernel_at=lambda x, y: k, grid_cells=2, sigma_u2=1, sigma_c2=1,
            variance_unconvolved=ones, variance_convolved=ones,
        ),
    ):
        assert np.isnan(out[40, 50])
        assert np.isfinite(out).sum() == n * n - 1


def test_clipped_mean_variance():
    rng = np.random.default_rng(4)
    variance = rng.normal(2.0, 0.01, size=(100, 100))
    variance[:5, :5] = 1e6  # masked garbage
    variance[50, 50] = 500.0  # an unmasked outlier, clipped
    variance[60, 60] = np.nan
    bad = np.zeros(variance.shape, dtype=bool)
    bad[:5, :5] = True
    assert clipped_mean_variance(variance, bad) == pytest.approx(2.0, abs=1e-3)
    assert clipped_mean_variance(variance) == pytest.approx(2.0, abs=1e-3)  # 25 pixels of 1e6 are clipped too
    with pytest.raises(ValueError, match="mask_bad"):
        clipped_mean_variance(variance, bad[:10])
