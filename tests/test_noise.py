"""Noise model: robust statistics and the variance plane built when a file has none."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from diffim_dag.io.fits import read_exposure
from diffim_dag.noise import build_variance, clipped_stats, robust_std
from diffim_dag.psf import GaussianPsf

SHAPE = (256, 256)


def _stars(rng, n=25, flux=2e5, sigma=1.8):
    img = np.zeros(SHAPE)
    k = GaussianPsf(sigma_x=sigma).kernel_image(size=21)
    for _ in range(n):
        y, x = rng.integers(15, SHAPE[0] - 15, 2)
        img[y - 10 : y + 11, x - 10 : x + 11] += flux * rng.uniform(0.2, 1.0) * k
    return img


def _source_free(truth_stars):
    return ~ndimage.binary_dilation(truth_stars > 1.0, iterations=3)


def test_robust_std_and_clipped_stats(rng):
    v = rng.normal(3.0, 2.0, 200_000)
    v[:2000] = 1e4  # 1 % outliers
    assert robust_std(v) == pytest.approx(2.0, rel=0.02)
    mean, std, n = clipped_stats(v)
    assert mean == pytest.approx(3.0, abs=0.02) and std == pytest.approx(2.0, rel=0.02) and n < v.size
    assert np.isnan(robust_std(np.array([np.nan])))


def _clipped_stats_reference(values, nsigma=3.0, iterations=5):
    """The clipping loop as written out plainly (each mean and σ made from scratch), on all the finite values,
    started from the median and MAD of a strided subsample of them (:data:`~diffim_dag.noise.START_SAMPLES`)."""
    from diffim_dag.noise import START_SAMPLES, strided_sample

    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    start = strided_sample(v, START_SAMPLES)
    center, scale = np.median(start), robust_std(start, max_samples=None)
    keep = v
    for _ in range(iterations):
        if not scale > 0:
            break
        keep = v[np.abs(v - center) <= nsigma * scale]
        if keep.size < 2:
            break
        new_center, new_scale = keep.mean(), keep.std(ddof=1)
        if new_center == center and new_scale == scale:
            break
        center, scale = new_center, new_scale
    return float(keep.mean()), float(keep.std(ddof=1)) if keep.size > 1 else float("nan"), int(keep.size)


@pytest.mark.parametrize("case", ["outliers", "two_groups", "constant", "one", "non_finite", "cauchy", "float32"])
def test_clipped_stats_is_the_plain_loop_bitwise(rng, case):
    """clipped_stats makes each mean and σ once (the σ from the mean just made; the last ones kept): bitwise the
    plain loop's results, whatever ends it (convergence, the iteration count, too few values kept, σ = 0)."""
    v = {"outliers": np.r_[rng.normal(3.0, 2.0, 20_000), np.full(200, 1e4)],
         "two_groups": np.r_[rng.normal(0.0, 1.0, 5000), rng.normal(50.0, 1.0, 300)],
         "constant": np.full(100, 3.0), "one": np.array([1.0]),
         "non_finite": np.array([np.nan, 1.0, 2.0, np.inf, 3.0, 2.5, -np.inf]),
         "cauchy": rng.standard_cauchy(50_000), "float32": rng.normal(0.0, 1.0, (300, 400)).astype(np.float32)}[case]
    for kw in ({}, {"nsigma": 2.0, "iterations": 10}):
        got = clipped_stats(v, max_samples=None, **kw)
        want = _clipped_stats_reference(v, **kw)
        assert np.array(got, dtype=float).tobytes() == np.array(want, dtype=float).tobytes(), (got, want)


def _write(tmp_path, data, name, **cards):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k] = v
    fits.PrimaryHDU(data.astype(np.float32), hdr).writeto(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("rn_key", ["RDNOISE", "READNOIS"])
def test_header_model_on_image_with_sky(tmp_path, rng, caplog, rn_key):
    gain, rn, sky = 2.0, 6.0, 800.0  # e-/ADU, e-, ADU
    stars = _stars(rng)
    expected_e = rng.poisson((sky + stars) * gain)
    img = (expected_e + rng.normal(0, rn, SHAPE)) / gain
    path = _write(tmp_path, img, "sky.fits", GAIN=gain, **{rn_key: rn})
    with caplog.at_level(logging.INFO, logger="diffim_dag"):
        e = read_exposure(path)
    assert e.info.variance_source == "gain+read_noise"
    assert "gain+read_noise" in caplog.text and str(path) in caplog.text
    var = e.variance.values
    free = _source_free(stars)
    truth_sky_var = sky / gain + (rn / gain) ** 2
    # model vs truth and vs the measured noise of empty sky, within 5 %
    assert np.sqrt(np.median(var[free])) == pytest.approx(np.sqrt(truth_sky_var), rel=0.02)
    assert np.sqrt(np.median(var[free])) == pytest.approx(robust_std(img[free]), rel=0.05)
    # the source Poisson term: at star peaks the variance follows (sky + star) / g
    peaks = stars > 0.5 * stars.max()
    np.testing.assert_allclose(var[peaks], ((sky + stars) / gain + (rn / gain) ** 2)[peaks], rtol=0.15)
    # normalized residuals are unit-variance where the model claims it
    chi = (img - sky - stars) / np.sqrt(var)
    assert robust_std(chi) == pytest.approx(1.0, rel=0.03)


def test_sky_subtracted_image_uses_measured_sky(tmp_path, rng, caplog):
    gain, rn, sky = 4.0, 11.0, 3000.0
    stars = _stars(rng)
    img = (rng.poisson((sky + stars) * gain) + rng.normal(0, rn, SHAPE)) / gain - sky  # sky-subtracted
    path = _write(tmp_path, img, "subtracted.fits", GAIN=gain, RDNOISE=rn)
    with caplog.at_level(logging.INFO, logger="diffim_dag"):
        e = read_exposure(path)
    assert e.info.variance_source == "measured_sky+gain"
    assert "sky-subtracted" in caplog.text
    var = e.variance.values
    free = _source_free(stars)
    measured = robust_std(img[free])
    assert np.sqrt(np.median(var[free])) == pytest.approx(measured, rel=0.05)
    assert np.sqrt(np.median(var[free])) == pytest.approx(np.sqrt(sky / gain + (rn / gain) ** 2), rel=0.03)
    peaks = stars > 0.5 * stars.max()
    np.testing.assert_allclose(var[peaks], ((sky + stars) / gain + (rn / gain) ** 2)[peaks], rtol=0.15)


def test_no_keywords_measured_sky_only(tmp_path, rng):
    img = rng.normal(10.0, 3.0, SHAPE)
    e = read_exposure(_write(tmp_path, img, "bare.fits"))
    assert e.info.variance_source == "measured_sky"
    assert np.sqrt(np.median(e.variance.values)) == pytest.approx(3.0, rel=0.03)


def test_empty_sky_variance_does_not_follow_the_noise(rng):
    """σ from a smooth model: positive sky fluctuations must not get a larger variance (sign skew)."""
    gain = 1.0
    img = rng.normal(0.0, 5.0, SHAPE)  # sky-subtracted, low gain: Poisson of noise would be 40 % at +2σ
    var, how = build_variance(img, gain=gain, read_noise=1.0)
    assert how == "measured_sky+gain"
    snr = img / np.sqrt(var)
    n_pos, n_neg = int((snr > 3).sum()), int((snr < -3).sum())
    assert abs(n_pos - n_neg) <= 4 * np.sqrt(n_pos + n_neg + 1)
    up, down = img > 2 * 5.0, img < -2 * 5.0
    assert np.median(var[up]) == pytest.approx(np.median(var[down]), rel=0.02)


def test_nodata_and_bad_pixels_do_not_bias_sky(rng):
    img = rng.normal(0.0, 2.0, SHAPE)
    bad = np.zeros(SHAPE, bool)
    bad[:, :40] = True
    img[bad] = 1e6
    var, _ = build_variance(img, bad=bad)
    assert np.sqrt(np.median(var[~bad])) == pytest.approx(2.0, rel=0.03)


@pytest.mark.parametrize("correlated", [False, True])
def test_sky_noise_under_a_steep_sky_gradient(rng, correlated):
    """A raw frame's sky gradient (60 % and 40 % across, as vignetting or moonlight make it) is not noise: the
    built variance is the pixel variance, white or correlated (a 3-tap binomial smoothing each way: adjacent
    pixels 2/3 correlated, the adjacent differences' σ 0.58 of the pixels'), within 3 %.  (The σ of the pixel values
    in each 64 px box, which set the correlation factor until now, had the gradient in it: the built σ came out 1.99×
    the white noise's, the factor's ceiling, and 1.15× the correlated noise's.)"""
    ny, nx = 512, 512
    yy, xx = np.mgrid[0:ny, 0:nx] / 512.0
    sky = 2000.0 * (1.0 + 0.6 * (xx - 0.5) + 0.4 * (yy - 0.5))
    noise = rng.normal(0.0, 30.0, (ny, nx))
    sigma = 30.0
    if correlated:
        taps = np.array([0.25, 0.5, 0.25])
        noise = ndimage.correlate1d(ndimage.correlate1d(noise, taps, axis=0, mode="wrap"), taps, axis=1, mode="wrap")
        sigma = 30.0 * float(np.sum(taps**2))  # σ √(Σ of the 2-D kernel's squares) = σ Σ of one axis's: 3/8
        lag1 = ndimage.correlate1d(noise, [-1, 1], axis=1)[:, 1:] / np.sqrt(2)
        assert robust_std(lag1) == pytest.approx(sigma * np.sqrt(1 - 2 / 3), rel=0.03)
    img = (sky + noise).astype(np.float32)
    assert robust_std(noise) == pytest.approx(sigma, rel=0.02)
    var, how = build_variance(img)
    assert how.startswith("measured_sky+effective_gain")
    assert np.sqrt(np.median(var)) == pytest.approx(sigma, rel=0.03)
    for quadrant in (np.s_[: ny // 2, : nx // 2], np.s_[ny // 2 :, nx // 2 :]):  # the low and the high sky
        assert np.sqrt(np.median(var[quadrant])) == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("correlated", [False, True])
def test_sky_noise_of_a_raw_vignetted_frame(rng, correlated):
    """``diffim-dag info``'s measured noise: a raw frame's sky noise, white or correlated over a few pixels, within
    3 %, under a sky gradient and vignetted corners that make the σ of its pixel values several times larger, with
    bright stars on 17 % of it."""
    from diffim_dag.noise import sky_noise

    ny, nx = 512, 512
    yy, xx = np.mgrid[0:ny, 0:nx] / float(nx)
    sky = 8000.0 + 2000.0 * (1.0 + 0.5 * (xx - 0.5)) * (1.0 - 0.6 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2))
    noise = rng.normal(0.0, 30.0, (ny, nx))
    sigma = 30.0
    if correlated:
        taps = np.array([0.25, 0.5, 0.25])
        noise = ndimage.correlate1d(ndimage.correlate1d(noise, taps, axis=0, mode="wrap"), taps, axis=1, mode="wrap")
        sigma = 30.0 * float(np.sum(taps**2))
    stars = np.block([[_stars(rng), _stars(rng)], [_stars(rng), _stars(rng)]])
    img = (sky + noise + stars).astype(np.float32)
    assert robust_std(img) > 3 * sigma  # what the pixel values' σ says
    assert sky_noise(img) == pytest.approx(sigma, rel=0.03)
    good = np.ones((ny, nx), bool)
    good[:, :40] = False
    img[:, :40] = 1e6  # bad columns left out
    assert sky_noise(img, good) == pytest.approx(sigma, rel=0.03)
    assert np.isnan(sky_noise(img, np.zeros((ny, nx), bool)))


def test_sky_noise_grid_boxes_hold_their_own_rows(rng):
    """Each box of the σ grid measures its own rows, whatever the box size: ten 100-row bands of σ 10, 20, …, 100
    give those σ, box row by box row, within 5 % (a box that the row sampling does not divide had been given rows
    from further down: 42.8 for the band of 40, 96.3 for that of 100)."""
    from diffim_dag.noise import sky_noise_grid

    sigma = np.repeat(np.arange(1, 11) * 10.0, 100)
    img = (1000.0 + rng.normal(0.0, 1.0, (1000, 800)) * sigma[:, None]).astype(np.float32)
    for box in (100, 50):
        grid, got = sky_noise_grid(img, box=box)
        assert got == box and grid.shape == (1000 // box, 800 // box)
        # each box's σ to ~3.5 % (its ~2000 differences): their median along the box row to ~1.5 %
        np.testing.assert_allclose(np.median(grid, axis=1), sigma[box // 2:: box], rtol=0.05)


def test_plain_fits_with_a_steep_sky_gradient_gets_the_true_variance(tmp_path):
    """The user's path: a simulated pair with a 60 %/40 % sky gradient, written as plain FITS (no variance, no GAIN),
    read back: each frame's built variance is its true variance (the simulator's) on the empty sky, within 3 %,
    and the deep template's too (24 % high before, its sky gradient large against its noise)."""
    from diffim_dag.sim import simulate_pair
    from diffim_dag.sim.write import write_pair

    pair = simulate_pair(size=512, sky_gradient=(0.6, 0.4), seed=3)
    paths = write_pair(pair, tmp_path, layout="plain", psf=False, keywords=False)
    for epoch in ("science", "template"):
        truth = getattr(pair, epoch)
        read = read_exposure(paths[epoch])
        assert read.info.variance_source.startswith("measured_sky+effective_gain")
        free = truth.mask.values == 0
        ratio = np.median(read.variance.values[free]) / np.median(truth.variance.values[free])
        assert ratio == pytest.approx(1.0, abs=0.03), epoch


def test_decam_stamps_variance_matches_empty_sky_noise(shared_data):
    """All 10 DECam stamps (sky-subtracted): model σ vs robust std of source-free pixels, within 5 %."""
    import sep

    files = sorted((shared_data / "decam-n6" / "input").glob("*.fits"))
    assert len(files) == 10
    ratios = {}
    for f in files:
        e = read_exposure(f)
        img, var, msk = e.arrays()
        assert e.info.variance_source == "measured_sky+gain"
        bad = msk != 0
        work = img.astype(np.float32)
        bkg = sep.Background(work, mask=bad, bw=32, bh=32)
        sub = (work - bkg.back()).astype(np.float32)
        _, seg = sep.extract(sub, 2.0, err=bkg.globalrms, mask=bad, minarea=3, segmentation_map=True)
        free = ~ndimage.binary_dilation(seg > 0, iterations=4) & ~bad
        assert free.mean() > 0.8
        ratios[f.name] = float(np.sqrt(np.median(var[free])) / robust_std(img[free]))
    # measured: 0.998–1.018 (OBS04b worst, +1.8 %)
    assert all(abs(r - 1) < 0.05 for r in ratios.values()), ratios


def test_grow_cross_is_binary_dilation():
    from scipy import ndimage

    from diffim_dag.noise import grow_cross

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.uniform(size=(int(rng.integers(1, 60)), int(rng.integers(1, 60)))) > 0.9
        for it in (1, 2, 4):
            np.testing.assert_array_equal(grow_cross(m, it), ndimage.binary_dilation(m, iterations=it))


def test_mask_fractions_of_every_plane():
    from diffim_dag.masks import MaskPlanes

    planes = MaskPlanes()
    msk = np.zeros((40, 50), np.int32)
    msk[:10] |= planes.bitmask("EDGE")
    msk[5:7, :25] |= planes.bitmask(["SAT", "NO_DATA"])
    got = planes.describe(msk)
    assert set(got) == set(planes.as_dict())
    for name, bit in planes.as_dict().items():
        assert got[name] == np.count_nonzero(msk & (1 << bit)) / msk.size
    assert got["EDGE"] == 0.25 and got["SAT"] == got["NO_DATA"] == 0.025


def test_background_without_its_noise_map_has_the_same_level(rng):
    """``rms=False`` skips the noise map's interpolation only: level and global figures are unchanged."""
    from diffim_dag.noise import measure_background

    yy, xx = np.mgrid[:300, :260]
    img = (100.0 + 0.05 * xx + 0.02 * yy + rng.normal(0.0, 3.0, yy.shape)).astype(np.float32)
    bad = np.zeros(img.shape, bool)
    bad[40:60, 100:130] = True
    full = measure_background(img, bad, box=32)
    lean = measure_background(img, bad, box=32, rms=False)
    assert lean.rms is None and full.rms.shape == img.shape
    np.testing.assert_array_equal(lean.level, full.level)
    assert (lean.global_level, lean.global_rms) == (full.global_level, full.global_rms)
    assert abs(full.global_rms - 3.0) < 0.3


@pytest.mark.parametrize("with_mask", [False, True])
def test_mesh_background_through_the_c_interface_is_sep_background(rng, monkeypatch, with_mask):
    """SEP's C interface through ctypes (the interpreter lock released) and its Python wrapper (the fallback) give
    ``sep.Background``'s maps and global figures bitwise, masked pixels left out alike."""
    import sep

    from diffim_dag.kernels import sep_c

    yy, xx = np.mgrid[:333, :270]
    img = (50.0 + 0.1 * xx - 0.03 * yy + rng.normal(0.0, 4.0, yy.shape)).astype(np.float32)
    img[100:104, 50:54] += 5000.0  # a star the clipping leaves out
    mask = None
    if with_mask:
        mask = np.zeros(img.shape, bool)
        mask[200:260, 10:90] = True
        img[mask] = 1e6  # (ignored only through the mask)
    ref = sep.Background(img, mask=mask, bw=32, bh=48, fw=3, fh=5)
    want = (ref.back(), ref.rms(), float(ref.globalback), float(ref.globalrms))
    if sep_c.c_interface_available():
        got = sep_c.mesh_background(img, mask, bw=32, bh=48, fw=3, fh=5)
        for a, b in zip(got[:2], want[:2]):
            assert a.dtype == np.float32 and a.shape == img.shape
            np.testing.assert_array_equal(a, b)
        assert got[2:] == want[2:]
        lean = sep_c.mesh_background(img, mask, bw=32, bh=48, fw=3, fh=5, rms=False)
        assert lean[1] is None
        np.testing.assert_array_equal(lean[0], want[0])
    monkeypatch.setattr(sep_c, "_library", lambda: None)
    assert not sep_c.c_interface_available()
    got = sep_c.mesh_background(img, mask, bw=32, bh=48, fw=3, fh=5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2:] == want[2:]


@pytest.mark.parametrize("c_interface", [True, False])
def test_mesh_rows_are_sep_background_rows(rng, monkeypatch, c_interface):
    """The mesh's maps row by row (sep_c.Mesh; noise.background_mesh's MeshMap) are the rows of
    ``sep.Background``'s planes, bitwise: slices, row lists, into a given buffer, and every 4th pixel each way."""
    import sep

    from diffim_dag import noise
    from diffim_dag.kernels import sep_c

    if c_interface and not sep_c.c_interface_available():
        pytest.skip("SEP's C interface is not reachable here")
    if not c_interface:
        monkeypatch.setattr(sep_c, "_library", lambda: None)
    yy, xx = np.mgrid[:301, :257]
    img = (80.0 + 0.05 * xx + 0.02 * yy + rng.normal(0.0, 3.0, yy.shape)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[40:90, 120:200] = True
    ref = sep.Background(img, mask=mask, bw=32, bh=32, fw=3, fh=3)
    back, rms = ref.back(), ref.rms()
    mesh = sep_c.mesh(img, mask, bw=32, bh=32, fw=3, fh=3)
    assert (mesh.global_level, mesh.global_rms) == (float(ref.globalback), float(ref.globalrms))
    np.testing.assert_array_equal(mesh.level_rows(slice(0, 301)), back)
    np.testing.assert_array_equal(mesh.rms_rows(slice(17, 140)), rms[17:140])
    np.testing.assert_array_equal(mesh.level_rows([300, 0, 151]), back[[300, 0, 151]])
    buffer = np.empty((10, 257), np.float32)
    assert mesh.rms_rows(slice(5, 15), out=buffer) is buffer
    np.testing.assert_array_equal(buffer, rms[5:15])
    level, noise_rows, global_level, _ = noise.background_mesh(img, mask, box=32)
    np.testing.assert_array_equal(level.sampled(4), back[::4, ::4])
    np.testing.assert_array_equal(noise.rows_of(noise_rows, slice(250, 301)), rms[250:])
    assert global_level == float(ref.globalback)


@pytest.mark.parametrize("case", ["err-plane", "no-filter", "err-scalar", "float64"])
def test_extract_through_the_c_interface_is_sep_extract(rng, monkeypatch, case):
    """SEP's extraction through ctypes gives ``sep.extract``'s table (its columns, types and values) for a 2-D or
    scalar error, a mask, the default or no filter; the fallback is the wrapper itself."""
    import sep

    from diffim_dag.kernels import sep_c

    yy, xx = np.mgrid[:260, :240]
    img = rng.normal(0.0, 1.0, yy.shape)
    for x, y, f in zip(rng.uniform(4, 236, 60), rng.uniform(4, 256, 60), rng.uniform(5, 400, 60)):
        img += f * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.4**2))
    img = img.astype(np.float64 if case == "float64" else np.float32)
    mask = np.zeros(img.shape, bool)
    mask[30:60, 100:150] = True
    kw = {"err-plane": {"err": np.ones(img.shape, np.float32), "mask": mask},
          "no-filter": {"mask": mask, "filter_kernel": None},
          "err-scalar": {"err": 1.0, "deblend_cont": 0.005},
          "float64": {"err": np.ones(img.shape), "mask": mask}}[case]
    want = sep.extract(img, 3.0, **kw)
    assert len(want) > 20
    for available in (True, False):
        if not available:
            monkeypatch.setattr(sep_c, "_library", lambda: None)
        elif not sep_c.c_interface_available():
            continue
        got = sep_c.extract(img, 3.0, **kw)
        assert got.dtype == want.dtype
        for name in want.dtype.names:  # (sep leaves errxy unset where no error is given: NaN alike)
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_mesh_background_rejects_a_mask_of_another_shape():
    from diffim_dag.kernels.sep_c import mesh_background

    with pytest.raises(ValueError, match="mask shape"):
        mesh_background(np.zeros((64, 64), np.float32), np.zeros((64, 63), bool), bw=16, bh=16, fw=3, fh=3)


def test_bilinear_upsample_interpolates_between_box_centres():
    """Box centres sit at ``(k + 0.5) box − 0.5``: the map equals the grid there, is linear between them and
    flat beyond the outer centres."""
    from diffim_dag.noise import _bilinear_upsample

    grid = np.array([[0.0, 4.0, 8.0], [2.0, 6.0, 10.0]], dtype=np.float32)
    box = 4
    out = _bilinear_upsample(grid, box, (8, 12))
    assert out.dtype == np.float32 and out.shape == (8, 12)
    expected = (2.0 * np.clip((np.arange(8)[:, None] - 1.5) / 4.0, 0, 1)
                + 4.0 * np.clip((np.arange(12)[None, :] - 1.5) / 4.0, 0, 2))
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_source_excess_in_strips_equals_the_whole_frame():
    """The Poisson term's input, computed strip by strip with two rows of halo, is bitwise the whole-frame
    computation (3×3 mean of the excess above the sky's σ, grown by one pixel), sources and NaNs on the strips'
    edges included."""
    from diffim_dag.noise import STRIP_ROWS, _source_excess

    rng = np.random.default_rng(5)
    ny, nx = 2 * STRIP_ROWS + 140, 300
    level = (100.0 + 0.01 * np.arange(nx)[None, :] + np.zeros((ny, 1))).astype(np.float32)
    rms = np.full((ny, nx), 3.0, np.float32)
    img = (level + rng.normal(0, 3.0, (ny, nx))).astype(np.float32)
    yy, xx = np.mgrid[0:ny, 0:nx]
    for y in (0, STRIP_ROWS - 2, STRIP_ROWS - 1, STRIP_ROWS, STRIP_ROWS + 1, 2 * STRIP_ROWS, ny - 1):
        img += (400 * np.exp(-((yy - y) ** 2 + (xx - rng.uniform(5, nx - 5)) ** 2) / 4.0)).astype(np.float32)
    img[STRIP_ROWS, 17] = np.nan
    img[2 * STRIP_ROWS + 3, 40] = np.inf  # (another strip's: each strip's own non-finite pixels are made finite)
    ex = np.nan_to_num(img - level)
    # the 3×3 mean from float64 sums of the edge-padded excess (ndimage's running sums lose the pixels after a
    # huge value: they subtract it again)
    p = np.pad(ex.astype(np.float64), 1, mode="edge")
    mean = sum(p[dy:dy + ny, dx:dx + nx] for dy in range(3) for dx in range(3)) / 9.0
    significant = ndimage.binary_dilation(mean.astype(np.float32) > rms)
    expected = np.where(significant, np.maximum(ex, 0), 0).astype(np.float32)
    got = _source_excess(img, level, rms)
    assert got.dtype == np.float32 and np.count_nonzero(got) > 100
    np.testing.assert_array_equal(got, expected)


def test_grown_rows_are_those_of_the_grown_mask(rng):
    """The sky noise map grows its source mask on the sampled rows only: the same rows as growing it all."""
    from diffim_dag.noise import _grown_rows, grow_cross

    for _ in range(300):
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random(shape) < rng.uniform(0.01, 0.3)
        radius, step = int(rng.integers(0, 4)), int(rng.integers(1, 6))
        rows = np.arange(0, shape[0], step)
        assert np.array_equal(_grown_rows(mask, rows, radius), grow_cross(mask, radius)[rows])


@pytest.mark.parametrize("mode", ["reflect", "nearest"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_mean3_is_the_uniform_filter(rng, mode, dtype):
    from diffim_dag.noise import box_mean3

    for shape in [(1, 1), (1, 4), (3, 1), (2, 2), (2, 5), (37, 23), (128, 300)]:
        a = rng.normal(50.0, 10.0, shape).astype(dtype)
        out = box_mean3(a, mode)
        assert out.dtype == dtype and out.shape == a.shape
        np.testing.assert_allclose(out, ndimage.uniform_filter(a, 3, mode=mode),
                                   rtol=1e-6 if dtype == np.float32 else 1e-13)
        # bitwise the sums of the edge-padded float64 copy, in their order (rows, then columns)
        p = np.pad(a.astype(np.float64), 1, mode="edge")
        rows = p[:-2] + p[1:-1] + p[2:]
        expected = ((rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) * (1.0 / 9.0)).astype(dtype)
        assert np.array_equal(out.view(np.uint8), expected.view(np.uint8))
    with pytest.raises(ValueError, match="mode"):
        box_mean3(np.ones((3, 3)), "wrap")
    with pytest.raises(ValueError, match="2-D"):
        box_mean3(np.ones(5), mode)
    # the largest float32 values (a frame's inf made finite) do not overflow
    top = np.full((4, 4), np.finfo(np.float32).max, np.float32)
    with np.errstate(over="raise"):
        assert np.all(box_mean3(top.astype(dtype), mode) == top.astype(dtype))


@pytest.mark.parametrize("sky, kw, how", [
    (1000.0, {"gain": 4.0, "read_noise": 5.0}, "gain+read_noise"),
    (0.0, {"gain": 4.0, "read_noise": 5.0}, "measured_sky+gain"),
    (1000.0, {}, "measured_sky+effective_gain"),
    (0.0, {}, "measured_sky"),
])
def test_variance_built_in_strips_is_the_whole_plane_model(rng, sky, kw, how):
    """build_variance interpolates the sky σ grid and adds the sources' term strip by strip: bitwise the planes
    of its definition (the σ map of :func:`sky_noise_map`, the excess of :func:`_source_excess`), each branch."""
    from diffim_dag.noise import _source_excess, measure_background, sky_noise_map

    noise = np.sqrt(sky / 4.0 + (5.0 / 4.0) ** 2) if sky else 5.0
    shape = (600, 520)  # (more rows than a strip, and a ragged last one)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    stars = np.zeros(shape)
    for _ in range(60):
        y, x = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        stars += rng.uniform(200, 5000) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 5.0)
    img = (sky + 0.01 * xx + stars + rng.normal(0.0, noise, shape)).astype(np.float32)
    bad = np.zeros(shape, bool)
    bad[:, 30:32] = True
    var, got = build_variance(img, bad=bad, **kw)
    assert got.startswith(how) and var.dtype == np.float32
    bkg = measure_background(img, bad, box=128)
    sigma = sky_noise_map(img, bad, box=64, level=bkg.level, rms=bkg.rms)
    src = _source_excess(img, bkg.level, sigma)
    gain = kw.get("gain")
    if how == "gain+read_noise":
        expected = np.maximum(bkg.level, np.float32(0)) / np.float32(gain) + np.float32((5.0 / gain) ** 2)
        expected += src / np.float32(gain)
    elif how == "measured_sky":
        expected = sigma * sigma
    else:
        g = gain if gain else float(np.median(bkg.level[::4, ::4].astype(np.float64))) / float(
            np.median((sigma * sigma)[::4, ::4].astype(np.float64)))
        expected = sigma * sigma + src / np.float32(g)
    assert np.count_nonzero(src) > 100
    np.testing.assert_array_equal(var, expected.astype(np.float32))


def test_sky_stage_removes_the_mesh_level_and_reports_it_over_the_kept_pixels(rng):
    """subtract_sky: the image less the mesh level (row by row), no-data pixels as they were, and the report's
    minimum and maximum of the level over the pixels the measurement keeps (strips with saturated or no-data
    pixels among them and strips without)."""
    from diffim_dag.config import SkyConfig
    from diffim_dag.exposure import Exposure
    from diffim_dag.masks import MaskPlanes
    from diffim_dag.noise import STRIP_ROWS, background_mesh, row_strips
    from diffim_dag.stages.sky import subtract_sky

    ny, nx = 2 * STRIP_ROWS + 90, 400
    yy, xx = np.mgrid[:ny, :nx]
    img = (1000.0 + 0.5 * xx + 0.3 * yy + rng.normal(0, 5.0, (ny, nx))).astype(np.float32)
    planes = MaskPlanes()
    mask = np.zeros((ny, nx), np.int32)
    mask[STRIP_ROWS + 10: STRIP_ROWS + 14, 380:] |= planes.bitmask("SAT")  # the level's largest columns
    mask[-6:, -40:] |= planes.bitmask("NO_DATA")  # the frame's corner of highest level
    img[-6:, -40:] = 7.0
    exp = Exposure.from_arrays(img, np.full((ny, nx), 25.0, np.float32), mask, mask_planes=planes)
    config = SkyConfig(box=64)
    out = subtract_sky(exp, config)
    bad = mask != 0
    level, _, _, _ = background_mesh(img, bad, box=64, filter_size=config.filter_size)
    plane = np.concatenate([level.rows(s) for s in row_strips(ny)])
    got = out.exposure.arrays()[0]
    np.testing.assert_array_equal(got[~bad | (mask == planes.bitmask("SAT"))],
                                  (img - plane)[~bad | (mask == planes.bitmask("SAT"))])
    np.testing.assert_array_equal(got[-6:, -40:], 7.0)
    assert out.report["subtracted"] and out.report["box"] == 64
    assert out.report["level_min"] == float(plane[~bad].min())
    assert out.report["level_max"] == float(plane[~bad].max()) < float(plane.max())
