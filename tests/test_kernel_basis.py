"""Alard–Lupton and delta-function bases: counts, normalization, widths, kernel size."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.config import KernelConfig
from diffim_dag.kernels.basis import (
    alard_lupton_basis,
    basis_from_config,
    delta_function_basis,
    gaussian_widths,
    kernel_size_for_widths,
    laplacian_regularization,
    n_basis_functions,
    regularize,
)
from diffim_dag.psf import FWHM_PER_SIGMA


@pytest.mark.parametrize("degrees", [(4, 2, 2), (2,), (3, 1), (0, 0, 0)])
def test_alard_lupton_count_and_normalization(degrees):
    sigmas = [0.8 * 2**k for k in range(len(degrees))]
    b = alard_lupton_basis(21, sigmas, degrees)
    assert b.shape == (sum((d + 1) * (d + 2) // 2 for d in degrees), 21, 21) == (n_basis_functions(degrees), 21, 21)
    sums = b.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-7)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-7)
    np.testing.assert_allclose(np.sqrt((b[1:] ** 2).sum(axis=(1, 2))), 1.0, atol=1e-7)
    # linearly independent
    assert np.linalg.matrix_rank(b.reshape(len(b), -1)) == len(b)


def test_renormalization_transform_gives_the_renormalized_images(rng):
    from diffim_dag.kernels.basis import renormalize_basis

    raw = rng.normal(size=(6, 11, 11))
    raw[0] += 1.0  # (basis 0 must not sum to 0)
    images, transform = renormalize_basis(raw, with_transform=True)
    np.testing.assert_array_equal(images, renormalize_basis(raw))  # the same arithmetic on the images
    np.testing.assert_allclose(np.tensordot(transform, raw, axes=1), images, rtol=0, atol=1e-14)
    assert images[0].sum() == pytest.approx(1.0) and np.allclose(images[1:].sum(axis=(1, 2)), 0.0, atol=1e-12)


def test_default_basis_has_27_functions_and_odd_symmetry():
    basis = basis_from_config(KernelConfig(), 2.0 * FWHM_PER_SIGMA, 3.0 * FWHM_PER_SIGMA)
    assert basis.n == 27 and basis.kind == "alard-lupton"
    # basis 1 is Gaussian × u (odd in u), basis 2 Gaussian × v
    np.testing.assert_allclose(basis.images[1], -basis.images[1][:, ::-1], atol=1e-12)
    np.testing.assert_allclose(basis.images[2], -basis.images[2][::-1, :], atol=1e-12)
    assert np.argmax(basis.images[0]) == basis.images[0].size // 2


def test_widths_and_kernel_size():
    to_f = FWHM_PER_SIGMA
    # sigma_K = sqrt(3² - 2²) = 2.236 → s = 1.118 → widths (1.118, 2.236, 4.472) → size odd(26.8) = 27
    w = gaussian_widths(2.0 * to_f, 3.0 * to_f)
    np.testing.assert_allclose(w, np.sqrt(5.0) / 2 * np.array([1, 2, 4]), rtol=1e-12)
    assert kernel_size_for_widths(w) == 27
    # equal PSFs → s = min_sigma 0.7 → clamped to 21
    w = gaussian_widths(2.0 * to_f, 2.0 * to_f)
    np.testing.assert_allclose(w, [0.7, 1.4, 2.8])
    assert kernel_size_for_widths(w) == 21
    # very different PSFs → clamped to 35
    assert kernel_size_for_widths(gaussian_widths(1.0 * to_f, 5.0 * to_f)) == 35
    # floor 0.4 applies only when the convolved image is the sharper one
    assert gaussian_widths(2.0, 2.0, min_sigma=0.01)[0] == pytest.approx(0.2)
    assert gaussian_widths(2.0 * to_f, 2.02 * to_f, min_sigma=0.01)[0] == pytest.approx(0.2)
    assert gaussian_widths(2.02 * to_f, 2.0 * to_f, min_sigma=0.01)[0] == pytest.approx(np.sqrt(2.02**2 - 4) / 2)
    basis = basis_from_config(KernelConfig(), 2.0 * to_f, 3.0 * to_f)
    assert basis.size == 27 and basis.images.shape == (27, 27, 27)


def test_delta_function_basis_and_regularization():
    b = delta_function_basis(7)
    assert b.shape == (49, 7, 7)
    sums = b.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0) and b[0, 3, 3] == 1.0
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(np.sqrt((b[1:] ** 2).sum(axis=(1, 2))), 1.0, atol=1e-12)
    h = laplacian_regularization(b)
    assert np.allclose(h, h.T) and np.linalg.eigvalsh(h).min() > -1e-9
    # the penalty of a smooth kernel is far below that of a noisy one with the same norm
    flat = b.reshape(49, 49).T

    def coeffs(kernel):
        return np.linalg.solve(flat, kernel.ravel())

    yy, xx = np.mgrid[-3:4, -3:4]
    smooth = np.exp(-0.5 * (xx**2 + yy**2) / 1.5**2)
    noisy = np.random.default_rng(0).normal(size=(7, 7))
    noisy *= np.linalg.norm(smooth) / np.linalg.norm(noisy)
    cs, cn = coeffs(smooth), coeffs(noisy)
    assert cs @ h @ cs < 0.2 * (cn @ h @ cn)
    m = np.eye(50) * 3.0
    r = regularize(m, h, 0.2)
    np.testing.assert_allclose(r[:49, :49] - m[:49, :49], 0.2 * 3.0 * 49 / np.trace(h) * h)
    assert r[49, 49] == 3.0
    cfg = KernelConfig(basis="delta-function")
    basis = basis_from_config(cfg, 3.0, 4.0)
    assert basis.kind == "delta-function" and basis.n == basis.size**2 == 17 * 17
    assert basis.regularization_lambda == 0.2 and basis.regularization.shape == (289, 289)
