"""AL with pre-convolution (score image), after LSST's ``AlardLuptonPreconvolveSubtractTest``.

Fixtures: Gaussian PSFs, white noise of known σ, stars injected with :func:`diffim_dag.sim.add_sources`
at the same positions in every image (independent noise per image), a non-zero pixel origin.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import fftconvolve

from diffim_dag import Exposure, ExposureInfo, GaussianPsf
from diffim_dag.config import PipelineConfig
from diffim_dag.kernels.decorrelate import decorrelation_kernel_fourier
from diffim_dag.kernels.preconvolve import (median_fill, preconvolution_kernel, score_correction_fourier,
                                            score_correction_kernels)
from diffim_dag.kernels.zogy import centred_fft
from diffim_dag.noise import clipped_stats
from diffim_dag.sim import add_sources
from diffim_dag.pipeline import subtract_al_preconvolve
from diffim_dag.stages.zogy import ScoreSubtractionResult

XY0 = (37, 61)
SIZE = 400


def _stars(seed=0, n=100, size=SIZE, noise=1.0):
    """Positions and fluxes with PSF-flux S/N between ~15 and ~400 at pixel noise ``noise``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(30, size - 30, n) + XY0[0]
    y = rng.uniform(30, size - 30, n) + XY0[1]
    flux = noise * np.sqrt(4 * np.pi * 2.8**2) * 10 ** rng.uniform(np.log10(15), np.log10(400), n)
    return x, y, flux


def _image(sigma_psf, noise, seed, stars, extra=None, size=SIZE):
    rng = np.random.default_rng(seed)
    psf = GaussianPsf(sigma_x=sigma_psf)
    img = np.zeros((size, size))
    x, y, f = stars
    add_sources(img, x, y, f, psf, xy0=XY0)
    if extra is not None:
        add_sources(img, *extra, psf, xy0=XY0)
    img += rng.normal(0.0, noise, img.shape)
    var = np.full(img.shape, noise**2, dtype=np.float32)
    return Exposure.from_arrays(img.astype(np.float32), var, None, xy0=XY0, psf=psf, info=ExposureInfo(visit=seed))


def _good(exp):
    _, var, msk = exp.arrays()
    return ((msk & exp.bitmask(["NO_DATA", "BAD", "EDGE"])) == 0) & (var > 0)


def _nea(psf):
    return 1.0 / float(np.sum(psf.kernel_image() ** 2))


def test_equal_images():
    noise = 1.0
    stars = _stars()
    science = _image(2.4, noise, 6, stars)
    template = _image(2.4, noise, 7, stars)
    result = subtract_al_preconvolve(science, template, config=PipelineConfig())
    assert isinstance(result, ScoreSubtractionResult)
    img, var, _ = result.score.arrays()
    good = _good(result.score)
    assert np.all(np.isfinite(img))
    mean, std, n = clipped_stats(img[good])
    assert abs(mean) < 5 * noise / np.sqrt(n)
    expected = np.sqrt(2) * noise / np.sqrt(_nea(science.psf))
    assert std == pytest.approx(expected, rel=0.1)
    # the propagated variance plane describes the score's noise
    assert float(np.sqrt(np.mean(var[good]))) == pytest.approx(expected, rel=0.1)


def test_agnostic_template_psf():
    noise = 0.3
    stars = _stars(seed=1, noise=noise)
    science = _image(2.4, noise, 6, stars)
    wide = _image(2.8, noise, 7, stars)
    sharp = _image(2.0, noise, 8, stars)
    a = subtract_al_preconvolve(science, wide, config=PipelineConfig())
    b = subtract_al_preconvolve(science, sharp, config=PipelineConfig())
    good = _good(a.score) & _good(b.score)
    delta = b.score.arrays()[0] - a.score.arrays()[0]
    mean, std, n = clipped_stats(delta[good])
    assert abs(mean) < 5 * 2 * noise / np.sqrt(n)
    # The noise of the two scores, over the whole image, stars included: the template terms and the
    # part of the science term that the two corrections φ_S treat differently (theory for Gaussian
    # PSFs: 1.023 × √2σ/√NEA).  The score is a matched filter, so an error of the spatial kernel
    # model shows at each star's full S/N; it holds only if the fits have enough kernel sources
    # spread over the field (the sharp template's 33-px pre-convolution kernel once kept 10 stars,
    # isolated over its 67-px stamps, and left residuals of up to 26σ at the others).
    assert std == pytest.approx(np.sqrt(2) * noise / np.sqrt(_nea(science.psf)), rel=0.1)
    for result in (a, b):
        fit = result.metrics["preconvolution"]["kernel"]
        assert fit["candidates"]["used"] >= 20
        # equal fluxes: the kernel sum is 1 within its noise (≈ 0.5 % with this fixture)
        assert result.metrics["preconvolution"]["kernel_sum_center"] == pytest.approx(1.0, abs=0.02)


def test_preconvolution_sources_isolated_at_the_al_stamp_scale():
    """Isolation over the AL problem's stamps, not the (wider) pre-convolution stamps."""
    from diffim_dag.kernels.basis import basis_from_config
    from diffim_dag.stages.kernel_sources import select_kernel_sources
    from diffim_dag.stages.preconvolve import preconvolution_kernel_sources

    noise = 0.3
    stars = _stars(seed=1, noise=noise)
    science = _image(2.4, noise, 6, stars)
    template = _image(2.0, noise, 8, stars)
    config = PipelineConfig()
    fwhm_s, fwhm_t = science.psf.fwhm(), template.psf.fwhm()
    al_size = basis_from_config(config.kernel, fwhm_t, fwhm_s).size
    pre_size = basis_from_config(config.kernel, fwhm_t, np.sqrt(2) * fwhm_s).size
    assert (al_size, pre_size) == (17, 33)
    table = preconvolution_kernel_sources(science, template, config=config)
    expected, _ = select_kernel_sources(science, template, al_size, config.sources)
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), expected[["x", "y"]].to_numpy())
    starved, _ = select_kernel_sources(science, template, pre_size, config.sources)
    assert len(table) >= 3 * len(starved)


def test_detection_on_score_measurement_on_difference():
    noise = 1.0
    stars = _stars(seed=2)
    transient = (np.array([XY0[0] + 200.5]), np.array([XY0[1] + 150.0]), np.array([600.0]))  # S/N ≈ 14 in D
    science = _image(2.4, noise, 11, stars, extra=transient)
    template = _image(2.0, noise, 12, stars)
    result = subtract_al_preconvolve(science, template, config=PipelineConfig(), detect=True)
    dia = result.dia_sources[~result.dia_sources["sky_source"]]
    hit = np.hypot(dia["x"] - transient[0][0], dia["y"] - transient[1][0]) <= 2.0
    assert hit.sum() == 1
    row = dia[hit].iloc[0]
    # detected on the score: the peak significance is the score's S/N (in units of its clipped σ,
    # the pixel_stdev threshold), not a re-smoothed one
    img, var, _ = result.score.arrays()
    iy, ix = int(row["peak_y"]) - XY0[1], int(row["peak_x"]) - XY0[0]
    stdev = result.dia_sources.attrs["significance_stdev"]
    assert 0.9 < stdev < 1.1
    assert row["peak_significance"] == pytest.approx(img[iy, ix] / np.sqrt(var[iy, ix]) / stdev, rel=1e-4)
    # measured on the (decorrelated AL) difference: PSF flux of the transient
    assert row["psf_flux"] == pytest.approx(600.0, abs=4 * row["psf_flux_err"])
    assert result.metrics["method"] == "al-preconvolve" and "preconvolution" in result.metrics


def test_masked_pixels_are_median_filled_before_convolving():
    noise = 1.0
    stars = _stars(seed=3)
    science = _image(2.4, noise, 21, stars)
    template = _image(2.4, noise, 22, stars)
    img, var, msk = (a.copy() for a in science.arrays())
    img[:, 123] = 5e4  # a hot column flagged BAD
    msk[:, 123] |= science.bitmask("BAD")
    img[300:310, 200:210] = 8e4
    msk[300:310, 200:210] |= science.bitmask("SAT")
    science = Exposure.from_arrays(img, var, msk, xy0=XY0, psf=science.psf, info=science.info)
    result = subtract_al_preconvolve(science, template, config=PipelineConfig())
    s = result.score.arrays()[0]
    good = _good(result.score) & ((result.score.arrays()[2] & result.score.bitmask("SAT")) == 0)
    assert not good[:, 123].any()  # BAD dilated into the score mask
    _, std, _ = clipped_stats(s[good])
    assert std == pytest.approx(np.sqrt(2) * noise / np.sqrt(_nea(science.psf)), rel=0.1)
    # nothing of the 5e4 column leaks beyond the dilated mask
    assert float(np.abs(s[good]).max()) < 10 * std


def test_preconvolution_kernel_and_median_fill():
    psf = GaussianPsf(sigma_x=2.0, sigma_y=1.2, theta=0.3).kernel_image(size=15, offset=(0.2, -0.1))
    h = preconvolution_kernel(3.0 * psf)
    assert h.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(h, psf[::-1, ::-1])
    with pytest.raises(ValueError, match="odd"):
        preconvolution_kernel(np.ones((4, 5)))
    a = np.arange(16, dtype=float).reshape(4, 4)
    bad = np.zeros((4, 4), bool)
    bad[0, 0] = True
    a[1, 1] = np.nan
    out = median_fill(a, bad)
    assert out[0, 0] == out[1, 1] == np.float32(np.median(np.delete(np.arange(16.0), [0, 5])))


def test_score_correction_formula():
    shape = (96, 96)
    h = preconvolution_kernel(GaussianPsf(sigma_x=2.4).kernel_image(size=25))
    # K = H (equal PSFs): φ_S ≡ 1
    phi = score_correction_fourier(h, h, shape, sigma_science2=1.0, sigma_template2=1.0)
    np.testing.assert_allclose(phi, 1.0, atol=1e-9)
    # K = K_AL ⊗ H: φ_S = φ_AL² (the decorrelation filter of the AL difference, squared), φ_S(0) = 1
    k_al = GaussianPsf(sigma_x=1.3).kernel_image(size=25) * 0.9
    k = fftconvolve(k_al, h)  # 49 × 49, exact
    phi = score_correction_fourier(k, h, shape, sigma_science2=1.5, sigma_template2=0.7)
    phi_al = decorrelation_kernel_fourier(k_al, shape, sigma_u2=1.5, sigma_c2=0.7, half=True)
    central = np.abs(centred_fft(h, shape)) > 1e-6  # where the ratio |K̂|²/|Ĥ|² is numerically defined
    np.testing.assert_allclose(phi[central], phi_al[central] ** 2, rtol=1e-5)
    assert phi[0, 0] == pytest.approx(1.0)
    phi_img, c_s, c_t = score_correction_kernels(k, h, sigma_science2=1.5, sigma_template2=0.7)
    assert phi_img.sum() == pytest.approx(1.0, abs=1e-3)
    assert c_s.sum() == pytest.approx(1.0, abs=1e-3)
    assert c_t.sum() == pytest.approx(0.9, abs=1e-3)
