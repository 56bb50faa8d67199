"""Measurement: PSF/aperture fluxes, moments, flags, forced photometry, sky sources, RA/Dec, parquet."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from astropy.wcs import WCS

from diffim_dag import Exposure, ExposureInfo, GaussianPsf
from diffim_dag.kernels.measure import aperture_fluxes, adaptive_moments, forced_psf_flux, psf_fit
from diffim_dag.masks import DEFAULT_MASK_PLANES
from diffim_dag.sim import add_sources
from diffim_dag.stages.detect import (
    DIA_SOURCE_COLUMNS,
    DetectMeasureConfig,
    detect_and_measure,
    empty_dia_sources,
    read_dia_sources,
    write_dia_sources,
)

PSF = GaussianPsf(2.0)


def _wcs(xy0=(0, 0)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [xy0[0] + 100.0, xy0[1] + 100.0]
    w.wcs.cd = np.array([[-0.2, 0.01], [0.012, 0.2]]) / 3600.0
    return w


def _scene(rng, noise=3.0, n=8, shape=(240, 240), xy0=(50, 80)):
    pos = []
    while len(pos) < n:
        x, y = rng.uniform(30, shape[1] - 30), rng.uniform(30, shape[0] - 30)
        if all((x - a) ** 2 + (y - b) ** 2 > 40**2 for a, b in pos):
            pos.append((x, y))
    pos = np.array(pos) + np.array(xy0)
    flux = rng.uniform(1500, 4000, n) * np.where(np.arange(n) % 3 == 0, -1, 1)
    img = rng.normal(0, noise, shape)
    add_sources(img, pos[:, 0], pos[:, 1], flux, PSF, xy0=xy0)
    var = np.full(shape, noise**2)
    return img, var, pos, flux, xy0


def test_psf_fit_and_apertures_on_noiseless_source():
    img = np.zeros((61, 61))
    add_sources(img, 130.3, 229.6, 1000.0, PSF, xy0=(100, 200), size=41)
    var = np.ones_like(img)
    good = np.ones(img.shape, bool)
    r = psf_fit(img, var, good, PSF, 130.0, 230.0, origin=(100, 200))
    assert abs(r["x"] - 130.3) < 1e-3 and abs(r["y"] - 229.6) < 1e-3
    assert abs(r["flux"] / 1000.0 - 1) < 1e-4
    assert abs(r["flux_err"] - math.sqrt(4 * math.pi * 4.0)) < 0.05  # 1/√ΣP² = √(4πσ²) for V = 1
    f, e, fl = aperture_fluxes(img, var, good, np.array([130.3]), np.array([229.6]), 12.0, origin=(100, 200))
    assert abs(f[0] - 1000.0 * (1 - math.exp(-(12.0**2) / 8))) < 1.0 and not fl[0]
    assert abs(e[0] - math.sqrt(math.pi * 144)) < 0.1
    ixx, iyy, ixy, flag = adaptive_moments(img, good, r["x"], r["y"], origin=(100, 200))
    assert not flag and abs(ixx - 4.0) < 0.05 and abs(iyy - 4.0) < 0.05 and abs(ixy) < 0.02
    # negative source: same numbers with the opposite sign
    r2 = psf_fit(-img, var, good, PSF, 130.0, 230.0, origin=(100, 200))
    assert abs(r2["flux"] + 1000.0) < 0.1 and abs(r2["x"] - 130.3) < 1e-3


def test_catalog_columns_flags_and_radec(rng):
    img, var, pos, flux, xy0 = _scene(rng)
    mask = np.zeros(img.shape, np.int32)
    ix, iy = int(round(pos[1, 0])) - xy0[0], int(round(pos[1, 1])) - xy0[1]
    mask[iy, ix] |= 1 << DEFAULT_MASK_PLANES["INJECTED"]  # at the centre
    mask[iy + 4, ix + 1] |= 1 << DEFAULT_MASK_PLANES["STREAK"]  # in the footprint, off centre
    mask[iy - 3, ix] |= 1 << DEFAULT_MASK_PLANES["SAT_TEMPLATE"]
    wcs = _wcs(xy0)
    exp = Exposure.from_arrays(img, var, mask, xy0=xy0, psf=PSF, wcs=wcs,
                               info=ExposureInfo(visit=4242, detector=17))
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(cat) == len(pos)
    assert list(cat.columns) == list(DIA_SOURCE_COLUMNS)
    i = int(np.argmin(np.hypot(cat["x"] - pos[1, 0], cat["y"] - pos[1, 1])))
    row = cat.iloc[i]
    assert row["pixel_flags_injected"] and row["pixel_flags_injected_center"]
    assert row["pixel_flags_streak"] and not row["pixel_flags_streak_center"]
    assert row["pixel_flags_sat_template"] and not row["pixel_flags_sat_template_center"]
    others = cat.drop(index=i)
    assert not others["pixel_flags_injected"].any() and not others["pixel_flags_streak"].any()
    assert (cat["visit"] == 4242).all() and (cat["detector"] == 17).all()
    assert cat["id"].is_unique
    ra, dec = wcs.all_pix2world(cat["x"], cat["y"], 0)
    assert np.allclose(cat["ra"], ra, atol=1e-10) and np.allclose(cat["dec"], dec, atol=1e-10)
    scale = 0.2 / 3600.0
    assert np.allclose(cat["dec_err"] / scale, cat["y_err"], rtol=0.1)
    # moments near the PSF's, aperture and PSF fluxes agree with the truth
    assert np.allclose(cat["ixx"], 4.0, atol=0.5) and np.allclose(cat["iyy"], 4.0, atol=0.5)
    order = [int(np.argmin(np.hypot(cat["x"] - x, cat["y"] - y))) for x, y in pos]
    assert np.allclose(cat["ap12_flux"].to_numpy()[order], flux, atol=5 * cat["ap12_flux_err"].max())
    fwhm2 = 2 * PSF.fwhm()
    enclosed = 1 - math.exp(-(fwhm2**2) / 8)
    assert np.allclose(cat["ap2fwhm_flux"].to_numpy()[order], flux * enclosed, atol=5 * cat["ap2fwhm_flux_err"].max())
    assert np.allclose(cat["snr"], cat["psf_flux"] / cat["psf_flux_err"])


def test_forced_photometry_on_science_and_template(rng):
    shape, noise = (160, 160), 2.0
    stars = np.array([[50.2, 60.7], [110.6, 100.1]])
    sci = rng.normal(0, noise, shape)
    tmp = rng.normal(0, noise, shape)
    add_sources(sci, stars[:, 0], stars[:, 1], [5000.0, 3000.0], PSF)  # variable star brightened by 2000
    add_sources(tmp, stars[:, 0], stars[:, 1], [3000.0, 3000.0], PSF)  # and a constant one
    var = np.full(shape, noise**2)
    science = Exposure.from_arrays(sci, var, psf=PSF)
    template = Exposure.from_arrays(tmp, var, psf=PSF)
    diff = Exposure.from_arrays(sci - tmp, 2 * var, psf=PSF)
    cat = detect_and_measure(diff, science=science, template=template, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(cat) == 1
    row = cat.iloc[0]
    assert abs(row["psf_flux"] - 2000.0) < 4 * row["psf_flux_err"]
    assert abs(row["science_forced_flux"] - 5000.0) < 4 * row["science_forced_flux_err"]
    assert abs(row["template_forced_flux"] - 3000.0) < 4 * row["template_forced_flux_err"]
    assert not row["science_forced_flag"] and not row["template_forced_flag"]
    f, e, fl = forced_psf_flux(tmp, var, np.ones(shape, bool), PSF, [110.6], [100.1])
    assert abs(f[0] - 3000.0) < 4 * e[0]


def test_sky_sources(rng):
    img, var, pos, flux, xy0 = _scene(rng, n=10, shape=(400, 400))
    mask = np.zeros(img.shape, np.int32)
    mask[:, :30] |= 1 << DEFAULT_MASK_PLANES["BAD"]
    exp = Exposure.from_arrays(img, var, mask, xy0=xy0, psf=PSF)
    n_sky = 100
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=n_sky, sky_source_seed=3))
    sky = cat[cat["sky_source"]]
    real = cat[~cat["sky_source"]]
    assert len(sky) == n_sky
    assert len(real) == len(pos)
    half = PSF.default_size() // 2
    d = np.hypot(sky["x"].to_numpy()[:, None] - pos[:, 0][None], sky["y"].to_numpy()[:, None] - pos[:, 1][None])
    assert d.min() > half
    assert (sky["x"] - xy0[0] >= 30 + half).all()  # away from the BAD columns
    pull = sky["psf_flux"] / sky["psf_flux_err"]
    assert abs(pull.mean()) < 0.35 and 0.75 < pull.std() < 1.25
    assert not sky["is_dipole"].any() and sky["centroid_flag"].all()
    assert cat["id"].is_unique
    # deterministic: same seed, same positions
    again = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=n_sky, sky_source_seed=3))
    assert np.array_equal(again.loc[again["sky_source"], "x"], sky["x"])


def test_parquet_roundtrip_and_empty_run(rng, tmp_path, caplog):
    img, var, pos, flux, xy0 = _scene(rng)
    exp = Exposure.from_arrays(img, var, xy0=xy0, psf=PSF, wcs=_wcs(xy0), info=ExposureInfo(visit=1, detector=2))
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=20))
    path = tmp_path / "dia_sources.parquet"
    write_dia_sources(cat, path)
    back = read_dia_sources(path)
    pd.testing.assert_frame_equal(back, cat.reset_index(drop=True), check_like=False)
    assert np.all(np.isfinite(back[["x", "y"]].to_numpy()))
    meta = pq.read_schema(path).metadata
    assert int(meta[b"diffim_dag.n_dia_sources"]) == len(pos)
    # a run on pure noise: no DiaSource, only sky sources; with no sky sources, an empty table
    noise = Exposure.from_arrays(rng.normal(0, 3.0, (128, 128)), np.full((128, 128), 9.0), psf=PSF)
    with caplog.at_level("WARNING"):
        empty = detect_and_measure(noise, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(empty) == 0 and empty.attrs["n_dia_sources"] == 0
    assert any("no DiaSource" in r.message for r in caplog.records)
    p2 = tmp_path / "empty.parquet"
    write_dia_sources(empty, p2)
    back2 = pd.read_parquet(p2)
    assert list(back2.columns) == list(DIA_SOURCE_COLUMNS) and len(back2) == 0
    assert dict(back2.dtypes.astype(str)) == dict(empty_dia_sources().dtypes.astype(str))
    assert int(pq.read_schema(p2).metadata[b"diffim_dag.n_dia_sources"]) == 0


# ------------------------------------------------------- sky-source placement and whole-frame mask helpers


def _exact_allowed(fpm, bad, r, src_pix):
    """Brute-force map of the allowed sky-source centres (the definition in ``place_sky_sources``)."""
    from scipy import ndimage

    from diffim_dag.kernels import detection as det

    ny, nx = fpm.shape
    allowed = ~ndimage.binary_dilation(fpm | bad, structure=det.disc(r))
    allowed[:r] = allowed[ny - r :] = False
    allowed[:, :r] = allowed[:, nx - r :] = False
    yy, xx = np.mgrid[:ny, :nx]
    for sx, sy in src_pix:
        allowed &= (xx - sx) ** 2 + (yy - sy) ** 2 > (r + 1) ** 2
    return allowed


@pytest.mark.parametrize("n,seed,density", [(1, 0, 0.002), (30, 1, 0.002), (60, 2, 0.002), (40, 3, 0.02)])
def test_sky_source_placement_properties(n, seed, density):
    """Exactly n, every one on an allowed centre, separated by > 2r, seeded; both sampling phases
    (blind rejection on sparse masks, the exact map on crowded ones) obey the same rules."""
    from diffim_dag.stages.detect import place_sky_sources

    rng = np.random.default_rng(seed)
    xy0 = (100, 200)
    shape = (150, 170)
    r = 6
    fpm = rng.random(shape) < density
    bad = np.zeros(shape, bool)
    bad[40:45, :] = True
    src = rng.uniform(0, 160, size=(12, 2)) + np.array(xy0)
    got = place_sky_sources(n, fpm, bad, avoid_radius=r, origin=xy0, seed=seed, source_xy=src)
    allowed = _exact_allowed(fpm, bad, r, np.rint(src - np.array(xy0)).astype(int))
    assert got.shape == (n, 2)
    ix, iy = (got[:, 0] - xy0[0]).astype(int), (got[:, 1] - xy0[1]).astype(int)
    assert np.array_equal(got[:, 0] - xy0[0], ix) and np.array_equal(got[:, 1] - xy0[1], iy)  # pixel centres
    assert allowed[iy, ix].all()
    d2 = (ix[:, None] - ix[None]) ** 2 + (iy[:, None] - iy[None]) ** 2
    np.fill_diagonal(d2, 10**9)
    assert d2.min() > (2 * r) ** 2
    again = place_sky_sources(n, fpm, bad, avoid_radius=r, origin=xy0, seed=seed, source_xy=src)
    np.testing.assert_array_equal(again, got)
    other = place_sky_sources(n, fpm, bad, avoid_radius=r, origin=xy0, seed=seed + 100, source_xy=src)
    assert not np.array_equal(other, got) or n == 0


def _sky_sources_one_by_one(n, fpm, bad, *, avoid_radius, origin, seed, source_xy, max_tries=200):
    """The placement's definition, one draw and one distance at a time (the same draws, in the same order, as
    ``place_sky_sources``): the reference its array operations must reproduce position for position."""
    from scipy import ndimage

    from diffim_dag.kernels import detection as det

    ny, nx = fpm.shape
    r = avoid_radius
    masked = fpm | bad
    src = np.rint(np.asarray(source_xy, dtype=float).reshape(-1, 2) - np.asarray(origin)).astype(int)
    dy, dx = np.nonzero(det.disc(r))
    dy, dx = dy - r, dx - r
    rng = np.random.default_rng(seed)
    placed = []

    def take(y, x):
        if len(placed) < n and all((qy - y) ** 2 + (qx - x) ** 2 > (2 * r) ** 2 for qy, qx in placed):
            placed.append((y, x))

    def clear(y, x):
        return all((sx - x) ** 2 + (sy - y) ** 2 > (r + 1) ** 2 for sx, sy in src)

    budget, drawn, accepted, batch = max_tries * n, 0, 0, max(64, 4 * n)
    while len(placed) < n and drawn < budget:
        k = min(batch, budget - drawn)
        iy, ix = rng.integers(r, ny - r, size=k), rng.integers(r, nx - r, size=k)
        drawn += k
        for y, x in zip(iy.tolist(), ix.tolist()):
            if not masked[y + dy, x + dx].any() and clear(y, x):
                accepted += 1
                take(y, x)
        if drawn >= 20 * batch and accepted < 0.01 * drawn:
            break
    if len(placed) < n:
        allowed = ~ndimage.binary_dilation(masked, structure=det.disc(r))
        allowed[:r] = allowed[ny - r:] = False
        allowed[:, :r] = allowed[:, nx - r:] = False
        yy, xx = np.mgrid[:ny, :nx]
        for sx, sy in src:
            allowed &= (xx - sx) ** 2 + (yy - sy) ** 2 > (r + 1) ** 2
        for qy, qx in placed:
            allowed &= (yy - qy) ** 2 + (xx - qx) ** 2 > (2 * r) ** 2
        centres = np.flatnonzero(allowed)
        if centres.size:
            for k in rng.choice(centres.size, size=min(centres.size, max_tries * n), replace=False).tolist():
                take(*divmod(int(centres[k]), nx))
    return np.array([(x + origin[0], y + origin[1]) for y, x in placed], dtype=float).reshape(-1, 2)


@pytest.mark.parametrize("exact_map_reads", [0, 8, 10**12])
def test_sky_source_placement_equals_its_one_by_one_definition(monkeypatch, exact_map_reads):
    """Position for position the reference's, on sparse and crowded frames (a DECam 256² cut-out had room for 54 of
    100), whether the blind draws test their windows or look the exact map up (from the first draw, from the
    default point, never)."""
    from diffim_dag.stages import sky_sources
    from diffim_dag.stages.detect import place_sky_sources

    monkeypatch.setattr(sky_sources, "EXACT_MAP_READS", exact_map_reads)
    for seed, (shape, density, n, r) in enumerate([((150, 170), 0.002, 40, 6), ((256, 256), 0.02, 100, 10),
                                                    ((120, 300), 0.05, 60, 4), ((90, 90), 0.0, 30, 7)]):
        rng = np.random.default_rng(seed)
        fpm = rng.random(shape) < density
        bad = np.zeros(shape, bool)
        bad[: shape[0] // 5, : shape[1] // 3] = True
        src = rng.uniform(0, min(shape), size=(25, 2)) + np.array([30, -20])
        kw = dict(avoid_radius=r, origin=(30, -20), seed=seed, source_xy=src)
        got = place_sky_sources(n, fpm, bad, warn=False, **kw)
        want = _sky_sources_one_by_one(n, fpm, bad, **kw)
        np.testing.assert_array_equal(got, want)
        assert 0 < len(got) <= n
    # blank sky only in four narrow holes: the blind draws give up (under 1 % accepted) with 6–11 placed, and the
    # exact map places the rest (12 of 12; 21 of 30, all there is room for)
    bad = np.ones((300, 300), bool)
    for y0, y1, x0, x1 in [(200, 216, 50, 90), (40, 55, 40, 200), (100, 114, 200, 290), (250, 266, 150, 180)]:
        bad[y0:y1, x0:x1] = False
    for seed, n, density in [(4, 12, 0.0), (5, 12, 0.001), (6, 30, 0.0)]:
        rng = np.random.default_rng(seed)
        fpm = rng.random(bad.shape) < density
        kw = dict(avoid_radius=6, origin=(0, 0), seed=seed, source_xy=rng.uniform(0, 300, size=(10, 2)))
        got = place_sky_sources(n, fpm, bad, warn=False, **kw)
        np.testing.assert_array_equal(got, _sky_sources_one_by_one(n, fpm, bad, **kw))
        assert len(got) == min(n, 21)


def test_sky_sources_fill_the_only_hole_and_say_when_there_is_no_room(caplog):
    """A frame blocked but for one small hole: the exact-map phase still finds it; asking for more
    than fit gives what fits and a warning."""
    from diffim_dag.stages.detect import place_sky_sources

    shape = (300, 300)
    bad = np.ones(shape, bool)
    bad[200:214, 50:120] = False  # room for exactly the centres y = 206..207 at r = 6 → 3 sources 13 px apart
    got = place_sky_sources(3, np.zeros(shape, bool), bad, avoid_radius=6, seed=4)
    assert got.shape == (3, 2)
    assert (got[:, 1] >= 206).all() and (got[:, 1] <= 207).all()
    with caplog.at_level("WARNING"):
        many = place_sky_sources(50, np.zeros(shape, bool), bad, avoid_radius=6, seed=4)
    assert 3 <= len(many) < 50
    assert "placed only" in caplog.text


def test_sky_sources_are_uniform_over_blank_sky():
    """Rejection sampling draws uniformly: the four quadrants of a blank frame get equal shares."""
    from diffim_dag.stages.detect import place_sky_sources

    shape = (2000, 2000)
    counts = np.zeros(4)
    for seed in range(5):
        got = place_sky_sources(200, np.zeros(shape, bool), np.zeros(shape, bool), avoid_radius=6, seed=seed)
        q = (got[:, 0] >= 1000).astype(int) + 2 * (got[:, 1] >= 1000).astype(int)
        counts += np.bincount(q, minlength=4)
    expected = counts.sum() / 4
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 for 3 degrees of freedom


def test_bit_tests_equal_the_whole_frame_expressions(monkeypatch):
    """The blockwise bit tests give the whole-frame expressions' values, for blocks that do not divide the rows."""
    from diffim_dag.kernels import maskops

    monkeypatch.setattr(maskops, "BIT_TEST_BLOCK", 97)
    rng = np.random.default_rng(6)
    for shape in [(0, 4), (1, 1), (7,), (300, 211), (3, 4, 5)]:
        m = rng.integers(0, 1 << 20, size=shape).astype(np.int32)
        for bits in (0, 1, 0b1011000, (1 << 20) - 1):
            np.testing.assert_array_equal(maskops.lacks_bits(m, bits), (m & bits) == 0)
            np.testing.assert_array_equal(maskops.has_bits(m, bits), (m & bits) != 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apertures_on_stamps_equal_the_whole_tile(monkeypatch, rng, dtype):
    """Few apertures on a large tile are summed on stamps: bitwise the whole tile's sums, edges (circles cut by
    the tile), excluded pixels, per-source radii and positions off the tile included."""
    import diffim_dag.kernels.measure as measure

    shape, origin = (300, 340), (1000, 2000)
    img = rng.normal(5.0, 3.0, shape).astype(dtype)
    var = rng.uniform(4.0, 16.0, shape).astype(dtype)
    good = rng.random(shape) > 0.02
    n = 60
    x = rng.uniform(-20, shape[1] + 20, n) + origin[0]
    y = rng.uniform(-20, shape[0] + 20, n) + origin[1]
    x[:4] = [origin[0] + 0.3, origin[0] + shape[1] - 1.2, origin[0] + 150.5, np.nan]  # on both edges, a NaN
    r = rng.uniform(1.5, 14.0, n)
    monkeypatch.setattr(measure, "APERTURE_STAMP_PIXELS", 0)  # stamps
    stamps = measure.aperture_fluxes(img, var, good, x, y, r, origin=origin)
    monkeypatch.setattr(measure, "APERTURE_STAMP_PIXELS", 10**9)  # whole-tile planes
    whole = measure.aperture_fluxes(img, var, good, x, y, r, origin=origin)
    for a, b in zip(stamps, whole):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(whole[0]).sum() > 40 and whole[2][np.isfinite(whole[0])].any()


def test_measurement_with_good_pixels_tested_where_read_equals_the_plane(monkeypatch, rng):
    """A few positions on a large image (the sky sources on the whole difference) are measured with their stamps'
    good pixels tested where they are read, not from a whole-image plane: the same table, bit for bit, with excluded
    pixels, edges and both aperture paths."""
    import diffim_dag.kernels.measure as measure
    from diffim_dag.kernels.maskops import GoodPixels, bits_of, lacks_bits

    shape, origin = (400, 380), (100, 50)
    img = rng.normal(5.0, 3.0, shape).astype(np.float32)
    var = rng.uniform(4.0, 16.0, shape).astype(np.float32)
    planes = dict(DEFAULT_MASK_PLANES)
    msk = np.where(rng.random(shape) < 0.03, np.int32(1 << planes["BAD"]), np.int32(0))
    msk[::7, ::5] |= np.int32(1 << planes["DETECTED"])  # a plane the measurement does not exclude
    x = np.concatenate([rng.uniform(10, shape[1] - 10, 12), [2.0, shape[1] - 1.5]]) + origin[0]
    y = np.concatenate([rng.uniform(10, shape[0] - 10, 12), [shape[0] / 2, 3.0]]) + origin[1]
    plane = lacks_bits(msk, bits_of(planes, measure.DEFAULT_EXCLUDED_PLANES))
    for stamp_pixels in (0, 10**9):  # apertures on stamps, and on the whole image
        monkeypatch.setattr(measure, "APERTURE_STAMP_PIXELS", stamp_pixels)
        kw = dict(origin=origin, mask_planes=planes, fit_centroid=False)
        lazy = measure.measure_sources(img, var, msk, PSF, x=x, y=y,
                                       good=GoodPixels(msk, bits_of(planes, measure.DEFAULT_EXCLUDED_PLANES)), **kw)
        whole = measure.measure_sources(img, var, msk, PSF, x=x, y=y, good=plane, **kw)
        pd.testing.assert_frame_equal(lazy, whole)
        assert np.isfinite(whole["psf_flux"]).all() and whole["ap12_flag"].any()
    # the default: 14 positions on 152 thousand pixels are few enough to have their pixels tested where read
    monkeypatch.setattr(measure, "APERTURE_STAMP_PIXELS", 4096)
    pd.testing.assert_frame_equal(measure.measure_sources(img, var, msk, PSF, x=x, y=y, **kw), whole)

@pytest.mark.parametrize("model", ["grid", "varying"])
def test_psf_fits_of_a_batch_equal_each_source_alone(model):
    """The batched fits (all sources' Gauss–Newton iterations at once, grouped by kernel size) give what each
    source's fit alone gives: sources of both signs, faint and bright, cut by the tile's edge, on masked rows,
    with a grid PSF (interpolated per source) and with an analytic PSF whose kernel size varies over the image
    (several size groups); forced photometry too."""
    from diffim_dag.kernels.measure import psf_fits, render_psf
    from diffim_dag.psf import GridPsf, MoffatPsf, VaryingPsf

    rng = np.random.default_rng(11)
    origin, shape = (100, 200), (500, 560)
    box = (origin[0], origin[0] + shape[1], origin[1], origin[1] + shape[0])
    if model == "grid":
        nodes = np.stack([np.stack([MoffatPsf(fwhm_pixels=2.6 + 0.8 * i + 0.5 * j, beta=3.5).kernel_image(size=41)
                                    for i in range(3)]) for j in range(3)])
        psf = GridPsf(nodes, [100, 400, 700], [200, 500, 800])
    else:
        psf = VaryingPsf(profile="moffat", fwhm_coeffs=[3.6, 1.2, 0.6, 0.0, 0.0, 0.0], bbox=box, beta=3.5)
    n = 60
    xs = rng.uniform(box[0] - 2, box[1] + 2, n)
    ys = rng.uniform(box[2] - 2, box[3] + 2, n)
    img = rng.normal(0.0, 3.0, shape)
    for x, y, f in zip(xs, ys, rng.choice([-1.0, 1.0], n) * rng.uniform(20, 4000, n)):
        img += f * render_psf(psf, x, y, box)
    var = np.full(shape, 9.0)
    good = rng.random(shape) > 0.01
    good[240:246] = False
    sx, sy = np.round(xs), np.round(ys)
    on = (sx >= box[0]) & (sx < box[1]) & (sy >= box[2]) & (sy < box[3])
    sx, sy = sx[on], sy[on]
    if model == "varying":
        assert len({psf.default_size(x, y) for x, y in zip(sx, sy)}) > 1  # several size groups
    for fit_centroid in (True, False):
        batch = psf_fits(img, var, good, psf, sx, sy, origin=origin, fit_centroid=fit_centroid)
        for i, (x, y) in enumerate(zip(sx, sy)):
            alone = psf_fit(img, var, good, psf, x, y, origin=origin, fit_centroid=fit_centroid)
            for key, value in alone.items():
                if isinstance(value, float):
                    np.testing.assert_allclose(batch[key][i], value, rtol=1e-10, atol=1e-12, err_msg=key)
                else:
                    assert batch[key][i] == value, key
        if fit_centroid:
            assert (~batch["centroid_flag"]).sum() > len(sx) // 2


def test_adaptive_moments_of_a_batch_equal_each_source_alone():
    """Batched adaptive moments equal each source's alone (both signs, per-source starting widths, stamps cut by
    the tile's edge, a source that fails: flagged with NaNs), and recover a Gaussian's covariance."""
    from diffim_dag.kernels.measure import adaptive_moments_many

    rng = np.random.default_rng(8)
    shape, origin = (120, 150), (10, 20)
    yy, xx = np.mgrid[origin[1]:origin[1] + shape[0], origin[0]:origin[0] + shape[1]]
    img = rng.normal(0.0, 0.01, shape)
    truth = [(40.3, 50.6, 4.0, 2.0, 0.8, 300.0), (120.2, 90.1, 2.5, 3.0, -0.5, -200.0), (12.0, 25.0, 3.0, 3.0, 0.0, 250.0)]
    for x0, y0, sxx, syy, sxy, f in truth:
        c = np.array([[sxx, sxy], [sxy, syy]])
        ci = np.linalg.inv(c)
        dx, dy = xx - x0, yy - y0
        q = ci[0, 0] * dx * dx + 2 * ci[0, 1] * dx * dy + ci[1, 1] * dy * dy
        img += f * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(c)))
    good = np.ones(shape, bool)
    xs = np.array([40.3, 120.2, 12.0, 80.0])
    ys = np.array([50.6, 90.1, 25.0, 60.0])  # the last: empty sky, fails
    signs = np.array([1.0, -1.0, 1.0, 1.0])
    sig0 = np.array([1.5, 2.0, 1.7, 2.0])
    many = adaptive_moments_many(img, good, xs, ys, origin=origin, sigma0=sig0, sign=signs, half=10)
    for i in range(len(xs)):
        one = adaptive_moments(img, good, xs[i], ys[i], origin=origin, sigma0=sig0[i], sign=signs[i], half=10)
        np.testing.assert_allclose([m[i] for m in many[:3]], one[:3], rtol=1e-12, equal_nan=True)
        assert bool(many[3][i]) == one[3]
    np.testing.assert_allclose([many[0][0], many[1][0], many[2][0]], [4.0, 2.0, 0.8], rtol=2e-3)
    np.testing.assert_allclose([many[0][1], many[1][1], many[2][1]], [2.5, 3.0, -0.5], rtol=2e-3)
    assert not many[3][0] and not many[3][1]
