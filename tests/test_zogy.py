"""ZOGY (Zackay, Ofek & Gal-Yam 2016): noise, score, FFT conventions, cell grid, flux ratio, PSF checks.

Fixtures are analytic: Gaussian PSFs, white Gaussian noise of known σ, point sources injected with
:func:`diffim_dag.sim.add_sources`, a non-zero pixel origin.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from scipy.signal import fftconvolve

from diffim_dag import Exposure, ExposureInfo, GaussianPsf
from diffim_dag.config import PipelineConfig
from diffim_dag.errors import ConfigError, PsfError
from diffim_dag.exposure import PhotoCalib
from diffim_dag.kernels import zogy as zk
from diffim_dag.noise import clipped_stats
from diffim_dag.psf import ImagePsf
from diffim_dag.sim import add_sources
from diffim_dag.stages.zogy import ScoreSubtractionResult, ZogyConfig, fit_flux_ratio, subtract_zogy

XY0 = (100, 200)


def _exposure(image, sigma2, psf, zero_point=28.0, xy0=XY0):
    info = ExposureInfo(photo_calib=None if zero_point is None else PhotoCalib(zero_point=zero_point))
    var = np.full(image.shape, sigma2, dtype=np.float32)
    return Exposure.from_arrays(image.astype(np.float32), var, None, xy0=xy0, psf=psf, info=info)


def _pair(*, size=256, sigma2=100.0, psf_science=2.4, psf_template=2.0, x=(), y=(), flux_science=(),
          flux_template=(), seed=0, zero_points=(28.0, 28.0)):
    rng = np.random.default_rng(seed)
    out = []
    for sig, fl, zp in ((psf_science, flux_science, zero_points[0]), (psf_template, flux_template, zero_points[1])):
        img = rng.normal(0.0, np.sqrt(sigma2), (size, size))
        psf = GaussianPsf(sigma_x=sig)
        if len(x):
            add_sources(img, np.asarray(x, float) + XY0[0], np.asarray(y, float) + XY0[1], np.asarray(fl, float), psf,
                        xy0=XY0)
        out.append(_exposure(img, sigma2, psf, zp))
    return out


def _interior(a, border=25):
    return a[border:-border, border:-border]


def _significance(result):
    img, var, _ = result.score.arrays()
    return img / np.sqrt(var)


def test_sourceless_noise_and_variance():
    science, template = _pair(sigma2=100.0, seed=1)
    result = subtract_zogy(science, template, config=PipelineConfig(), tiled=False)
    assert isinstance(result, ScoreSubtractionResult) and result.kernel_fit is None
    assert result.metrics["zogy"]["flux_ratio_origin"] == "photo_calib"
    d, v, _ = result.difference.arrays()
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(v))
    assert float(np.var(_interior(d))) == pytest.approx(200.0, rel=0.10)
    assert float(np.mean(_interior(v))) == pytest.approx(200.0, rel=0.05)
    s_corr = _significance(result)
    assert float(np.abs(s_corr).max()) < 5.0
    assert float(np.std(_interior(s_corr))) == pytest.approx(1.0, rel=0.05)


def test_brightened_source_detected_at_its_position():
    rng = np.random.default_rng(5)
    n = 10
    x = rng.uniform(40, 216, n)
    y = rng.uniform(40, 216, n)
    flux = np.full(n, 5000.0)
    flux_sci = flux.copy()
    flux_sci[3] *= 1.10  # 500 counts; σ_D √NEA_D ≈ √20·√(8π·2.2²) ≈ 49, S/N ≈ 10
    science, template = _pair(sigma2=10.0, x=x, y=y, flux_science=flux_sci, flux_template=flux, seed=6,
                              zero_points=(None, None))
    cfg = ZogyConfig(flux_ratio_min_snr=20.0)
    result = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=cfg, tiled=False, detect=True)
    assert result.metrics["zogy"]["flux_ratio_origin"] == "matched_stars"
    assert result.metrics["zogy"]["flux_ratio"] == pytest.approx(1.0, abs=0.03)
    s_corr = _significance(result)
    iy, ix = np.unravel_index(np.argmax(s_corr), s_corr.shape)
    assert s_corr[iy, ix] > 5.0
    assert np.hypot(ix - x[3], iy - y[3]) <= 2.0
    # the nine constant stars subtract to noise: no other pixel within 5 px of them exceeds 5σ
    yy, xx = np.mgrid[0:256, 0:256]
    for k in range(n):
        if k != 3:
            near = np.hypot(xx - x[k], yy - y[k]) <= 5
            assert np.abs(s_corr[near]).max() < 5.0
    dia = result.dia_sources[~result.dia_sources["sky_source"]]
    hit = np.hypot(dia["x"] - (x[3] + XY0[0]), dia["y"] - (y[3] + XY0[1])) <= 2
    assert hit.sum() == 1
    # measured on D (PSF P_D): the PSF flux is the 500-count change
    assert float(dia.loc[hit, "psf_flux"].iloc[0]) == pytest.approx(500.0, abs=4 * float(dia.loc[hit, "psf_flux_err"].iloc[0]))


def test_fft_convention_centred_and_unshifted():
    rng = np.random.default_rng(0)
    psf = GaussianPsf(sigma_x=2.0, sigma_y=1.3, theta=0.4).kernel_image(size=21)
    shape = (64, 75)  # odd and even sides
    ft = zk.centred_fft(psf, shape)
    assert ft[0, 0] == pytest.approx(1.0, abs=1e-12)  # unit sum ↔ P̂(0) = 1 (unnormalized forward FFT)
    assert np.abs(ft.imag).max() < 1e-12  # point-symmetric and centred: no phase
    # an asymmetric kernel: product in Fourier space = convolution without a shift
    k = rng.uniform(0, 1, (7, 5))
    img = rng.normal(size=shape)
    pad = 8
    padded = np.pad(img, pad)
    ref = fftconvolve(padded, k, mode="same")[pad:-pad, pad:-pad]
    got = scipy.fft.irfft2(scipy.fft.rfft2(padded) * zk.centred_fft(k, padded.shape), s=padded.shape)[pad:-pad, pad:-pad]
    np.testing.assert_allclose(got, ref, atol=1e-10)
    # ZOGY operators: P̂_D(0) = 1; equal PSFs and noise give ĉ_N = ĉ_R = F_n/F_D · F_r/√(σ_n²F_r² + σ_r²F_n²)
    ops = zk.zogy_fourier_terms(psf, psf, shape, sigma_new2=4.0, sigma_reference2=4.0)
    assert ops.psf_difference[0, 0] == pytest.approx(1.0)
    assert ops.flux_difference == pytest.approx(1.0 / np.sqrt(8.0))
    np.testing.assert_allclose(ops.c_new, 1.0, atol=1e-9)
    np.testing.assert_allclose(ops.c_reference, 1.0, atol=1e-9)
    # unit-variance D: σ_n²|ĉ_N|² + σ_r²|ĉ_R|² = (F_n/F_D)² at every frequency
    other = GaussianPsf(sigma_x=2.6).kernel_image(size=21)
    ops = zk.zogy_fourier_terms(psf, other, shape, sigma_new2=3.0, sigma_reference2=5.0, flux_reference=0.5)
    power = 3.0 * np.abs(ops.c_new) ** 2 + 5.0 * np.abs(ops.c_reference) ** 2
    np.testing.assert_allclose(power, (1.0 / ops.flux_difference) ** 2, rtol=1e-9)


@pytest.mark.parametrize("n,cells,width", [(256, 4, 50), (257, 3, 40), (1000, 4, 96), (64, 1, 0), (100, 7, 14)])
def test_cell_grid_covers_every_pixel_once(n, cells, width):
    edges = zk.cell_cores(n, cells)
    count = np.zeros(n, dtype=int)
    for i in range(cells):
        count[edges[i] : edges[i + 1]] += 1
    assert np.all(count == 1)
    w, bounds = zk.blend_weights(n, cells, width)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    assert np.all(w >= 0)
    for i in range(cells):
        lo, hi = bounds[i]
        assert np.all(w[i, :lo] == 0) and np.all(w[i, hi:] == 0) and np.all(w[i, lo:hi] > 0)
        assert lo >= edges[i] - width // 2 - 1 and hi <= edges[i + 1] + width // 2 + 1
    # C¹-smooth: steps between neighbouring pixels are bounded by π/(2·width)
    if width:
        assert np.abs(np.diff(w, axis=1)).max() <= np.pi / (2 * width) + 1e-9


def test_cells_blend_without_seams_and_tiled_equals_eager():
    science, template = _pair(size=320, sigma2=25.0, seed=3)
    one = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=1), tiled=False)
    eager = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=3), tiled=False)
    tiled = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=3), tiled=True)
    assert eager.metrics["zogy"]["grid_cells"] == [3, 3]
    for a, b in zip(eager.score.arrays()[:2] + eager.difference.arrays()[:2],
                    tiled.score.arrays()[:2] + tiled.difference.arrays()[:2]):
        np.testing.assert_array_equal(a, b)
    # the score (what detection uses) does not depend on the cells
    s1, s3 = _interior(one.score.arrays()[0], 40), _interior(eager.score.arrays()[0], 40)
    assert np.abs(s1 - s3).max() < 1e-4 * s1.std()
    # the difference stays white with the expected variance in the blend bands as in the cores
    d = eager.difference.arrays()[0]
    edges = zk.cell_cores(320, 3)
    band = np.zeros((320, 320), bool)
    for b in edges[1:-1]:
        band[:, b - 10 : b + 10] = True
        band[b - 10 : b + 10, :] = True
    inner = np.zeros_like(band)
    inner[30:-30, 30:-30] = True
    var_band = float(np.var(d[band & inner]))
    var_core = float(np.var(d[~band & inner]))
    assert var_band == pytest.approx(var_core, rel=0.05)
    assert var_core == pytest.approx(50.0, rel=0.1)


def test_psf_centroid_disagreement_is_an_error():
    science, template = _pair(size=128, seed=4)
    img = GaussianPsf(sigma_x=2.0).kernel_image(size=31, offset=(0.3, 0.0))
    off = template.with_planes()
    off.ds.attrs["psf"] = ImagePsf(img)
    with pytest.raises(PsfError, match="centroids differ by 0.3"):
        subtract_zogy(science, off, config=PipelineConfig(), tiled=False)
    small = template.with_planes()
    small.ds.attrs["psf"] = ImagePsf(GaussianPsf(sigma_x=2.0).kernel_image(size=31, offset=(0.1, 0.0)))
    subtract_zogy(science, small, config=PipelineConfig(), tiled=False)


def test_flux_ratio_from_matched_stars_and_photo_calib():
    rng = np.random.default_rng(7)
    x, y = rng.uniform(30, 226, 25), rng.uniform(30, 226, 25)
    f = 10 ** rng.uniform(3.5, 4.5, 25)
    kappa = 1.3
    science, template = _pair(sigma2=4.0, x=x, y=y, flux_science=f, flux_template=f / kappa, seed=8,
                              zero_points=(None, None))
    fitted, stars = fit_flux_ratio(science, template, min_snr=30.0)
    assert fitted == pytest.approx(kappa, rel=0.01)
    assert int(stars["used"].sum()) >= 10
    # with zero points the ratio is 10^{0.4 Δzp}
    sc = _exposure(science.arrays()[0], 4.0, science.psf, 28.0)
    tc = _exposure(template.arrays()[0], 4.0, template.psf, 28.0 - 2.5 * np.log10(kappa))
    result = subtract_zogy(sc, tc, config=PipelineConfig(), tiled=False)
    assert result.metrics["zogy"]["flux_ratio"] == pytest.approx(kappa, rel=1e-9)
    # the constant stars vanish once the ratio is applied
    assert float(np.abs(_significance(result)).max()) < 5.0


def test_non_finite_and_masked_pixels():
    science, template = _pair(size=200, sigma2=9.0, seed=9)
    img = science.arrays()[0].copy()
    img[50:60, 70:90] = np.nan  # becomes NO_DATA
    img[120, :] = 1e6
    msk = science.arrays()[2].copy()
    msk[120, :] |= science.bitmask("BAD")
    sci = Exposure.from_arrays(img, science.arrays()[1], msk, xy0=XY0, psf=science.psf, info=science.info)
    result = subtract_zogy(sci, template, config=PipelineConfig(), tiled=False)
    d, v, m = result.difference.arrays()
    s_corr = _significance(result)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(s_corr))
    bad = (m & result.difference.bitmask(["NO_DATA", "BAD", "EDGE"])) != 0
    assert bad[55, 80] and bad[120, 100]
    assert float(np.abs(s_corr[~bad]).max()) < 5.5
    # the kernel alone also accepts NaNs
    pn = GaussianPsf(sigma_x=2.0).kernel_image(size=25)
    a = np.random.default_rng(0).normal(size=(64, 64))
    a[10, 10] = np.inf
    r = zk.zogy_cell(a, np.zeros((64, 64)), np.ones((64, 64)), np.ones((64, 64)), pn, pn, sigma_new2=1.0,
                     sigma_reference2=1.0, pad=30)
    assert np.all(np.isfinite(r.difference)) and np.all(np.isfinite(r.score))


@pytest.mark.parametrize("field,value", [("grid_cells", 0), ("overlap_psf_sizes", 0.5), ("max_centroid_offset", 0.0),
                                         ("flux_ratio", -1.0), ("bad_mask_planes", ("NOPE",)), ("psf_size_fwhm", 1.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ZogyConfig(**{field: value})
