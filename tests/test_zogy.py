"""ZOGY (Zackay, Ofek & Gal-Yam 2016): noise, score, FFT conventions, cell grid, flux ratio, PSF checks.

Fixtures are analytic: Gaussian PSFs, white Gaussian noise of known σ, point sources injected with
:func:`diffim_dag.sim.add_sources`, a non-zero pixel origin.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.fft
from scipy.signal import fftconvolve

from diffim_dag import Exposure, ExposureInfo, GaussianPsf
from diffim_dag.config import PipelineConfig
from diffim_dag.errors import ConfigError, PsfError
from diffim_dag.graph import TileRunner
from diffim_dag.exposure import PhotoCalib
from diffim_dag.kernels import zogy as zk
from diffim_dag.psf import ImagePsf
from diffim_dag.sim import add_sources
from diffim_dag.pipeline import subtract_prepared
from diffim_dag.stages.zogy import ScoreSubtractionResult, ZogyConfig, fit_flux_ratio, subtract_zogy

XY0 = (100, 200)


TILES = TileRunner(tile_size=PipelineConfig().subtract.tile_size)  # cells as Dask tasks, threads


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
    result = subtract_zogy(science, template, config=PipelineConfig())
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
    # through the visit graph from its inputs on: ZOGY, then detection on S_corr and measurement on D.  Without the
    # systematic term (tested in test_detection): the 10 % change on a bright star is what "auto" gives up by
    # design (ε ≈ 1.5 % measured on these ten stars, with AL too)
    config = dataclasses.replace(PipelineConfig(), method="zogy", zogy=cfg)
    config = dataclasses.replace(config, detection=dataclasses.replace(config.detection, systematic_fraction=0))
    result = subtract_prepared(science, template, config=config, detect=True)
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
    one = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=1))
    eager = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=3))
    tiled = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=ZogyConfig(grid_cells=3),
                          runner=TILES)
    assert eager.metrics["zogy"]["grid_cells"] == [3, 3]
    for a, b in zip(eager.score.arrays() + eager.difference.arrays(), tiled.score.arrays() + tiled.difference.arrays()):
        np.testing.assert_array_equal(a, b)
    # the cells' noise variances, measured on the threads, are those measured in turn
    for key in ("sigma_science2", "sigma_template2"):
        assert tiled.metrics["zogy"][key] == eager.metrics["zogy"][key]
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
        subtract_zogy(science, off, config=PipelineConfig())
    small = template.with_planes()
    small.ds.attrs["psf"] = ImagePsf(GaussianPsf(sigma_x=2.0).kernel_image(size=31, offset=(0.1, 0.0)))
    subtract_zogy(science, small, config=PipelineConfig())


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
    result = subtract_zogy(sc, tc, config=PipelineConfig())
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
    result = subtract_zogy(sci, template, config=PipelineConfig())
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


# ------------------------------------------------------------------ memory: the same results with fewer copies


def test_cell_batches_do_not_change_a_bit(monkeypatch):
    """Cells run in batches (each blended before the next) give the planes of one batch, bit for bit."""
    from diffim_dag.stages import zogy as sz

    science, template = _pair(size=300, sigma2=25.0, seed=5, x=[150.0], y=[140.0], flux_science=[4000.0],
                              flux_template=[2000.0])
    cfg = ZogyConfig(grid_cells=3)
    eager = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=cfg)
    runs = {}
    for per_batch in (1, 4, 100):
        monkeypatch.setattr(sz, "_cells_per_batch", lambda n, runner, k=per_batch: k)
        runs[per_batch] = subtract_zogy(science, template, config=PipelineConfig(), zogy_config=cfg, runner=TILES)
    for r in runs.values():
        for a, b in zip(eager.score.arrays() + eager.difference.arrays(), r.score.arrays() + r.difference.arrays()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(eager.difference.psf.images, r.difference.psf.images)
        assert r.metrics["zogy"]["flux_difference"] == eager.metrics["zogy"]["flux_difference"]


def test_difference_and_score_share_one_mask_plane():
    science, template = _pair(size=200, sigma2=9.0, seed=2)
    result = subtract_zogy(science, template, config=PipelineConfig())
    assert result.score.arrays()[2] is result.difference.arrays()[2]
    # the matched template is κ × the template (its own image and variance planes)
    kappa = result.metrics["zogy"]["flux_ratio"]
    ti, tv, _ = template.arrays()
    mi, mv, _ = result.matched_template.arrays()
    np.testing.assert_array_equal(mi, ti * np.float32(kappa))
    ratio = mv / tv  # κ² times the template's variance scale (measured by prepare_inputs)
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 7, 64, 10_000])
def test_difference_mask_in_bands_equals_whole_frame(rows):
    from diffim_dag.kernels.maskops import DEFAULT_KEPT_TEMPLATE_PLANES, dilate_mask, template_mask_for_difference
    from diffim_dag.masks import DEFAULT_MASK_PLANES
    from diffim_dag.stages.zogy import _difference_mask

    planes = dict(DEFAULT_MASK_PLANES)
    rng = np.random.default_rng(4)
    shape = (131, 97)
    bits = [1 << planes[p] for p in ("BAD", "SAT", "CR", "INJECTED", "NO_DATA", "SUSPECT")]

    def random_mask():
        m = np.zeros(shape, np.int32)
        for b in bits:
            m[rng.random(shape) < 0.004] |= np.int32(b)
        return m

    sm, tm = random_mask(), random_mask()
    skip = 1 << planes["INJECTED"]
    expected = (dilate_mask(sm, 9, skip_bits=skip)
                | dilate_mask(template_mask_for_difference(tm, planes), 9, skip_bits=skip)).astype(np.int32)
    got = _difference_mask(sm, tm, planes, size=9, skip_bits=skip, kept=DEFAULT_KEPT_TEMPLATE_PLANES, rows=rows)
    assert got.dtype == np.int32 and got.shape == shape
    np.testing.assert_array_equal(got, expected)


def test_score_significance_in_row_blocks(monkeypatch):
    from diffim_dag.stages import zogy as sz

    rng = np.random.default_rng(8)
    img = rng.normal(size=(53, 41)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=img.shape).astype(np.float32)
    var[3, :5] = 0.0
    var[7, 7] = -1.0
    exp = Exposure.from_arrays(img, var, None, xy0=XY0, validate=False, copy=False)
    img2, var2, msk2 = exp.arrays()
    img2[10, 10] = np.nan
    msk2[20, 3:9] |= exp.bitmask("NO_DATA")
    ok = (var2 > 0) & np.isfinite(img2) & ((msk2 & exp.bitmask("NO_DATA")) == 0)
    expected = np.zeros(img2.shape, np.float32)
    expected[ok] = img2[ok] / np.sqrt(var2[ok])
    for pixels in (1, 100, 1 << 20):
        monkeypatch.setattr(sz, "_SIGNIFICANCE_PIXELS", pixels)
        np.testing.assert_array_equal(sz.score_significance(exp), expected)


def test_flag_nonfinite_copies_only_when_needed():
    from diffim_dag.stages.zogy import _flag_nonfinite

    img = np.ones((5, 6), np.float32)
    msk = np.arange(30, dtype=np.int32).reshape(5, 6)
    assert _flag_nonfinite(msk, img, 1 << 8) is msk
    img[2, 3] = np.inf
    out = _flag_nonfinite(msk, img, 1 << 8)
    np.testing.assert_array_equal(out, np.where(np.isfinite(img), msk, msk | (1 << 8)).astype(np.int32))
    assert msk[2, 3] == 15  # the input is untouched


def test_zogy_cell_working_memory_and_results_unchanged():
    """One cell's peak allocation stays near 10 padded planes (14 before), with the textbook results."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n, pad = 400, 60
    pn = GaussianPsf(sigma_x=2.2).kernel_image(size=29)
    pr = GaussianPsf(sigma_x=1.8).kernel_image(size=29)
    new = rng.normal(0, 3.0, (n, n))
    ref = rng.normal(0, 2.0, (n, n))
    vn, vr = np.full((n, n), 9.0), np.full((n, n), 4.0)
    kwargs = dict(sigma_new2=9.0, sigma_reference2=4.0, flux_new=1.0, flux_reference=0.8, pad=pad, seed=(0, 1))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        res = zk.zogy_cell(new, ref, vn, vr, pn, pr, **kwargs)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    fy = scipy.fft.next_fast_len(n + 2 * pad, real=True)
    fx = scipy.fft.next_fast_len(n + 2 * pad, real=True)
    plane = fy * (fx // 2 + 1) * 16  # one complex128 half plane ≈ one float64 padded image
    assert peak < 12 * plane, peak / plane
    # the same operators as zogy_fourier_terms, applied by hand (the textbook order)
    ops = zk.zogy_fourier_terms(pn, pr, (fy, fx), sigma_new2=9.0, sigma_reference2=4.0, flux_new=1.0,
                                flux_reference=0.8)
    core = (slice(pad, pad + n), slice(pad, pad + n))
    g = np.random.default_rng((0, 1))

    def padded(a, s):
        level = float(np.median(a))
        out = level + s * g.standard_normal((fy, fx))
        out[core] = a
        return out

    n_ft = scipy.fft.rfft2(padded(new, 3.0))
    r_ft = scipy.fft.rfft2(padded(ref, 2.0))
    d = scipy.fft.irfft2(n_ft * ops.c_new - r_ft * ops.c_reference, s=(fy, fx))[core]
    s = scipy.fft.irfft2(n_ft * ops.k_new - r_ft * ops.k_reference, s=(fy, fx))[core]
    np.testing.assert_allclose(res.difference, d, rtol=0, atol=1e-10 * np.abs(d).max())
    np.testing.assert_allclose(res.score, s, rtol=0, atol=1e-10 * np.abs(s).max())
    # uniform variance planes: V(D_N) = σ_n² Σc_N² + σ_r² Σc_R² in the interior
    cn = scipy.fft.irfft2(ops.c_new, s=(fy, fx))
    cr = scipy.fft.irfft2(ops.c_reference, s=(fy, fx))
    expected = 9.0 * np.sum(cn * cn) + 4.0 * np.sum(cr * cr)
    np.testing.assert_allclose(res.difference_variance[50:-50, 50:-50], expected, rtol=1e-9)


def test_release_freed_memory_is_harmless():
    from diffim_dag.memory import release_freed_memory

    keep = np.ones(1000)
    assert isinstance(release_freed_memory(), bool)
    assert keep.sum() == 1000


def test_significance_sample_is_the_clipped_stats_sample(monkeypatch):
    """ZOGY's score-significance metric samples S/√V(S) at the good pixels exactly as clipped_stats would
    sample the whole significance plane (every ⌈n/max⌉-th good pixel), without making that plane."""
    from diffim_dag.stages import zogy

    rng = np.random.default_rng(3)
    img = rng.normal(size=(60, 70)).astype(np.float32)
    var = rng.uniform(0.5, 2.0, size=img.shape).astype(np.float32)
    var[5, :10] = 0.0
    img[7, 3] = np.nan
    score = Exposure.from_arrays(img, var, None)
    msk = score.arrays()[2].copy()
    msk[20:25, 30:40] |= score.bitmask("NO_DATA")
    score = score.with_planes(mask=msk)
    good = rng.uniform(size=img.shape) > 0.2
    plane = zogy.score_significance(score)[good]
    np.testing.assert_array_equal(zogy._significance_sample(score, good), plane)
    monkeypatch.setattr(zogy, "MAX_STAT_SAMPLES", 1000)
    step = -(-plane.size // 1000)
    np.testing.assert_array_equal(zogy._significance_sample(score, good), plane[::step])
    # strips of 7 rows: the stride runs on across strips
    from diffim_dag.noise import row_strips

    monkeypatch.setattr(zogy, "row_strips", lambda n: row_strips(n, 7))
    np.testing.assert_array_equal(zogy._significance_sample(score, good), plane[::step])
    monkeypatch.setattr(zogy, "MAX_STAT_SAMPLES", 10**9)
    np.testing.assert_array_equal(zogy._significance_sample(score, good), plane)



def test_score_significance_leaves_out_the_excluded_planes():
    """The detection's significance is 0 where the score's own mask has an excluded plane; the default (the quality
    metric's) leaves out NO_DATA only."""
    from diffim_dag.masks import MaskPlanes
    from diffim_dag.stages import zogy as sz

    rng = np.random.default_rng(4)
    img = rng.normal(size=(40, 30)).astype(np.float32)
    planes = MaskPlanes().with_plane("SAT_TEMPLATE")
    msk = np.zeros(img.shape, np.int32)
    msk[5:9, 5:9] |= planes.bitmask("SAT_TEMPLATE")
    msk[20, :] |= planes.bitmask("SAT")
    msk[30, 3] |= planes.bitmask("CR")  # not excluded: the score there is still a measurement
    exp = Exposure.from_arrays(img, np.ones(img.shape, np.float32), msk, xy0=XY0, mask_planes=planes)
    np.testing.assert_array_equal(sz.score_significance(exp), img)
    cut = sz.score_significance(exp, ("SAT", "SAT_TEMPLATE"))
    keep = np.ones(img.shape, bool)
    keep[5:9, 5:9] = keep[20] = False
    assert not cut[~keep].any()
    np.testing.assert_array_equal(cut[keep], img[keep])


def test_score_methods_do_not_detect_where_their_score_took_filled_pixels():
    """ZOGY and the pre-convolution score replace saturated (and bad, missing) input pixels before filtering, and
    their score's mask marks where the filters spread those values (SAT, SAT_TEMPLATE grown by the filters).  The
    pipeline's detection leaves those pixels out, as LSST excludes SAT from detection: a residual there is not
    reported, a transient beside it is."""
    from diffim_dag.config import DetectionConfig
    from diffim_dag.stages.catalog import catalog_stage, detect_tiles_stage, prepare_detection_stage

    rng = np.random.default_rng(12)
    shape, psf = (120, 160), GaussianPsf(2.0)
    img = rng.normal(0.0, 1.0, shape)
    add_sources(img, np.array([40.0, 120.0]) + XY0[0], np.array([60.0, 60.0]) + XY0[1], np.array([400.0, 400.0]),
                psf, xy0=XY0)
    img, var = img.astype(np.float32), np.ones(shape, np.float32)
    difference = Exposure.from_arrays(img, var, None, xy0=XY0, psf=psf)
    planes = difference.mask_planes.with_plane("SAT_TEMPLATE")
    score_mask = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    score_mask[np.hypot(xx - 40, yy - 60) <= 6] |= planes.bitmask("SAT_TEMPLATE")  # a residual at a saturated star
    score = Exposure.from_arrays(img, var, score_mask, xy0=XY0, psf=psf, mask_planes=planes)
    result = ScoreSubtractionResult(difference=difference, matched_template=difference, matched_science=difference,
                                    mode="zogy", kernel_fit=None, decorrelation_kernel=None, metrics={}, score=score)

    def found(**detection):
        config = PipelineConfig(detection=DetectionConfig(n_sky_sources=0, systematic_fraction=0,
                                                          threshold_type="variance", **detection))
        inputs = prepare_detection_stage(result, config)
        cat = catalog_stage(inputs, [detect_tiles_stage(inputs)]).dia_sources
        return sorted((round(x) - XY0[0], round(y) - XY0[1]) for x, y in zip(cat["x"], cat["y"]))

    assert found() == [(120, 60)]
    assert found(score_excluded_mask_planes=("NO_DATA",)) == [(40, 60), (120, 60)]  # the plane is what leaves it out
