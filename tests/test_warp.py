"""Lanczos warping of one tile: exactness, variance, masks, tiling, round trip, warped PSF."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.wcs import WCS

from diffim_dag.kernels.warp import (
    AffineMapping,
    WarpedPsf,
    WcsMapping,
    lanczos,
    lanczos_table,
    source_bbox,
    warp_tile,
)
from diffim_dag.errors import InputError
from diffim_dag.psf import GaussianPsf, ImagePsf, image_moments
from diffim_dag.sim import add_sources

ND = 1 << 8
BAD = 1 << 0
SAT = 1 << 1


def tan_wcs(crpix, *, scale=0.2, rotation_deg=0.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = list(crpix)
    t = np.deg2rad(rotation_deg)
    s = scale / 3600.0
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def test_lanczos_table_rows_sum_to_one_and_match_formula():
    w, _, first, last = lanczos_table(3)
    assert np.allclose(w.sum(axis=1), 1.0, atol=1e-12)
    b = int(round(0.3 * (w.shape[0] - 1)))
    f = b / (w.shape[0] - 1)
    taps = np.arange(-2, 4)
    raw = lanczos(f - taps, 3)
    raw /= raw.sum()
    delta = f - (raw * taps).sum()
    assert 0.005 < abs(delta) < 0.03  # the truncated sinc's shift bias that the table corrects
    raw[3] += delta / 2
    raw[1] -= delta / 2
    assert np.allclose(w[b], raw, atol=1e-12)
    fs = np.arange(w.shape[0]) / (w.shape[0] - 1)
    assert np.allclose((w * np.arange(-2, 4)).sum(axis=1), fs, atol=1e-12)
    assert first[0] == 2 and last[0] == 2  # f = 0: only the centre tap is needed
    assert first[b] == 0 and last[b] == 5


@pytest.mark.parametrize("kernel", ["lanczos3", "lanczos5"])
def test_constant_surface_exact_and_variance_formula(kernel):
    rng = np.random.default_rng(0)
    img = np.full((120, 150), 250.0, np.float32)
    var = rng.uniform(1, 5, img.shape).astype(np.float32)
    msk = np.zeros(img.shape, np.int32)
    m = AffineMapping.similarity(rotation=0.4, shift=(2.3, -1.7), center=(80, 60))
    out, ov, om = warp_tile(img, var, msk, m, out_origin=(10, 5), out_shape=(100, 130), src_origin=(10, 5),
                            kernel=kernel)
    good = om == 0
    assert good.mean() > 0.5
    assert np.allclose(out[good], 250.0, rtol=1e-6)
    assert np.all(out[~good] == 0) and np.all(ov[~good] == 0) and np.all(om[~good] == ND)
    # variance of one pixel by the explicit double sum  Σ w_y² w_x² V
    a = int(kernel[-1])
    yy, xx = np.argwhere(good)[len(np.argwhere(good)) // 2]
    u, v = m(np.array(xx + 10.0), np.array(yy + 5.0))
    u, v = float(u) - 10, float(v) - 5
    iu, iv = int(np.floor(u)), int(np.floor(v))
    taps = np.arange(-a + 1, a + 1)
    def weights(f):
        w = lanczos(f - taps, a)
        w /= w.sum()
        d = f - (w * taps).sum()
        w[a] += d / 2
        w[a - 2] -= d / 2
        return w

    wx, wy = weights(u - iu), weights(v - iv)
    expect = float((np.outer(wy**2, wx**2) * var[iv + taps[:, None], iu + taps[None, :]]).sum())
    assert ov[yy, xx] == pytest.approx(expect, rel=2e-3)


def test_masks_propagate_and_no_data_outside():
    img = np.ones((60, 60), np.float32)
    var = np.ones_like(img)
    msk = np.zeros(img.shape, np.int32)
    msk[30, 30] = SAT
    shift = AffineMapping.shift(0.5, 0.0)  # output x reads source x + 0.5
    out, ov, om = warp_tile(img, var, msk, shift, out_origin=(0, 0), out_shape=(60, 60), src_origin=(0, 0))
    flagged = np.argwhere(om & SAT)
    # with f = 0.5 all 6 x-taps contribute, only row 30 along y
    assert set(flagged[:, 0]) == {30}
    assert sorted(flagged[:, 1]) == list(range(27, 33))
    # the last 3 columns need source x ≥ 60: NO_DATA; the first two need x ≥ -2 ... ≥ 0 → x ≥ 2
    assert np.all(om[:, -3:] & ND) and np.all(om[:, :2] & ND) and not np.any(om[:, 2:-3] & ND)
    # integer shift: only one tap needed, no edge loss beyond the shift itself
    out, ov, om = warp_tile(img, var, msk, AffineMapping.shift(2, 0), out_origin=(0, 0), out_shape=(60, 60),
                            src_origin=(0, 0))
    assert np.all(om[:, -2:] & ND) and not np.any(om[:, :-2] & ND)
    assert np.argwhere(om & SAT).tolist() == [[30, 28]]


def test_nan_variance_and_nan_image_give_finite_outputs():
    rng = np.random.default_rng(3)
    img = rng.normal(100, 5, (80, 80)).astype(np.float32)
    var = np.full(img.shape, 25.0, np.float32)
    var[10:14, 20:25] = np.nan
    var[50, 50] = -1.0
    img[40, 10] = np.nan
    msk = np.zeros(img.shape, np.int32)
    m = AffineMapping.similarity(rotation=0.1, shift=(0.3, 0.2), center=(40, 40))
    out, ov, om = warp_tile(img, var, msk, m, out_origin=(0, 0), out_shape=(80, 80), src_origin=(0, 0))
    data = (om & ND) == 0
    assert data.mean() > 0.8
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(ov)) and np.all(ov[data] > 0)
    assert np.any(om & BAD)  # pixels fed by the invalid variances are flagged
    xs, ys = m(np.arange(80.0)[None, :], np.arange(80.0)[:, None])
    near_nan = (np.abs(xs - 10) < 1.5) & (np.abs(ys - 40) < 1.5)
    assert np.all(om[near_nan] & ND)  # a NaN image pixel is missing data


@pytest.mark.parametrize("tile", [37, 64, 100])
def test_tiled_equals_eager(tile):
    rng = np.random.default_rng(5)
    n = 150
    img = rng.normal(0, 1, (n, n)).astype(np.float32)
    var = rng.uniform(1, 2, (n, n)).astype(np.float32)
    msk = (rng.random((n, n)) < 0.01).astype(np.int32) * BAD
    wo, ws = tan_wcs((80.3, 70.1), rotation_deg=3), tan_wcs((75, 75))
    for mapping, atol in ((AffineMapping.similarity(rotation=0.05, shift=(1.3, -0.4), center=(75, 75)), 0.0),
                          (WcsMapping(wo, ws), 2e-4)):
        eager = warp_tile(img, var, msk, mapping, out_origin=(-5, 3), out_shape=(n, n), src_origin=(0, 0))
        tiled = [np.zeros_like(e) for e in eager]
        for y in range(0, n, tile):
            for x in range(0, n, tile):
                shape = (min(tile, n - y), min(tile, n - x))
                bx0, bx1, by0, by1 = source_bbox(mapping, out_origin=(x - 5, y + 3), out_shape=shape)
                bx0, by0, bx1, by1 = max(bx0, 0), max(by0, 0), min(bx1, n), min(by1, n)
                parts = warp_tile(img[by0:by1, bx0:bx1], var[by0:by1, bx0:bx1], msk[by0:by1, bx0:bx1], mapping,
                                  out_origin=(x - 5, y + 3), out_shape=shape, src_origin=(bx0, by0))
                for t, p in zip(tiled, parts):
                    t[y:y + shape[0], x:x + shape[1]] = p
        assert np.array_equal(eager[2], tiled[2])
        np.testing.assert_allclose(tiled[0], eager[0], atol=atol + 1e-5)
        np.testing.assert_allclose(tiled[1], eager[1], atol=atol + 1e-5)


def _aperture(img, x, y, r, sky):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    sel = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    w = img[sel] - sky
    return w.sum(), (w * xx[sel]).sum() / w.sum(), (w * yy[sel]).sum() / w.sum()


def test_round_trip_rotated_scaled_shifted_wcs():
    n = 1001
    sky = 100.0
    img = np.full((n, n), sky, np.float32)
    psf = GaussianPsf(sigma_x=2.0)
    grid = np.arange(50, n - 50 + 1, 100, dtype=np.float64)
    xs, ys = np.meshgrid(grid + 0.27, grid - 0.41)
    flux = 1.0e5
    add_sources(img, xs.ravel(), ys.ravel(), flux, psf, size=41)
    var = img.copy()
    msk = np.zeros(img.shape, np.int32)
    w_orig = tan_wcs((501.0, 501.0))
    # intermediate: pixels 0.9× the size (oversampled), rotated 30°, shifted
    m = 1560
    w_mid = tan_wcs((m / 2 + 3.3, m / 2 - 7.7), scale=0.2 * 0.9, rotation_deg=30.0)
    fwd = WcsMapping(w_mid, w_orig)
    mid = warp_tile(img, var, msk, fwd, out_origin=(0, 0), out_shape=(m, m), src_origin=(0, 0))
    # flux conserved in the intermediate as well (counts, pixel area 0.81)
    back = warp_tile(*mid, WcsMapping(w_orig, w_mid), out_origin=(0, 0), out_shape=(n, n), src_origin=(0, 0))
    out, ov, om = back
    good = om == 0
    assert good[60:-60, 60:-60].all()
    assert np.allclose(out[good], img[good], rtol=0.1, atol=4)
    for x, y in zip(xs.ravel(), ys.ravel()):
        f0, x0, y0 = _aperture(img, x, y, 12, sky)
        f1, x1, y1 = _aperture(out, x, y, 12, sky)
        assert f1 == pytest.approx(f0, rel=0.01)
        assert abs(x1 - x0) < 0.02 and abs(y1 - y0) < 0.02
    # surface-brightness convention: the intermediate keeps pixel values, so its sums are 1/0.81× larger
    mid_sb = warp_tile(img[400:601, 400:601], var[400:601, 400:601], msk[400:601, 400:601], fwd,
                       out_origin=(m // 2 - 60, m // 2 - 60), out_shape=(120, 120), src_origin=(400, 400),
                       conserve="surface_brightness")
    mid_fx = warp_tile(img[400:601, 400:601], var[400:601, 400:601], msk[400:601, 400:601], fwd,
                       out_origin=(m // 2 - 60, m // 2 - 60), out_shape=(120, 120), src_origin=(400, 400))
    g = (mid_sb[2] == 0) & (mid_fx[2] == 0)
    assert np.allclose(mid_fx[0][g], 0.81 * mid_sb[0][g], rtol=1e-4)


def test_warped_psf_follows_the_jacobian():
    src = GaussianPsf(sigma_x=2.5, sigma_y=1.5, theta=0.3)
    m = AffineMapping([[0.9, -0.2], [0.15, 1.1]], (3.0, -4.0))
    wp = WarpedPsf(src, m, (0, 200, 0, 200))
    k = wp.kernel_image(100, 100, size=41)
    _, _, ixx, iyy, ixy = image_moments(k)
    # source covariance Σ_s; output offsets d with J d ~ Σ_s → Σ_o = J⁻¹ Σ_s J⁻ᵀ
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s], [s, c]])
    sigma_s = rot @ np.diag([2.5**2, 1.5**2]) @ rot.T
    ji = np.linalg.inv(m.matrix)
    sigma_o = ji @ sigma_s @ ji.T
    assert np.allclose([ixx, iyy, ixy], [sigma_o[0, 0], sigma_o[1, 1], sigma_o[0, 1]], rtol=0.02, atol=0.02)
    # a pixelized source PSF gives the same answer
    wi = WarpedPsf(ImagePsf(src.kernel_image(size=41)), m, (0, 200, 0, 200))
    assert np.abs(wi.kernel_image(100, 100, size=41) - k).max() < 2e-3 * k.max() * 10
    # and the warped PSF matches a warped star
    img = np.zeros((200, 200), np.float32)
    ux, uy = m(100.0, 100.0)
    add_sources(img, ux, uy, 1.0, src, size=41)
    out, _, _ = warp_tile(img, np.ones_like(img), np.zeros(img.shape, np.int32), m, out_origin=(0, 0),
                          out_shape=(200, 200), src_origin=(0, 0), conserve="surface_brightness")
    stamp = out[80:121, 80:121]
    assert np.abs(stamp / stamp.sum() - k).max() < 0.02 * k.max()
    payload_meta, data = wp.to_payload()
    assert payload_meta["kind"] == "grid" and data.shape[:2] == (5, 5)


def test_warp_exposure_on_threads_equals_in_turn():
    """``workers`` only changes where the tiles run: the same tiles give the same pixels, and the tiles
    agree with one piece (to the coordinate-spline tolerance of a non-affine mapping)."""
    from diffim_dag.exposure import Exposure
    from diffim_dag.stages.template import warp_exposure

    rng = np.random.default_rng(9)
    n = 200
    src = Exposure.from_arrays(rng.normal(100, 5, (n, n)).astype(np.float32),
                               rng.uniform(20, 30, (n, n)).astype(np.float32),
                               np.zeros((n, n), np.int32), wcs=tan_wcs((100, 100)))
    mapping = WcsMapping(tan_wcs((101.4, 99.2), rotation_deg=2), src.wcs)
    out_bbox = (0, n, 0, n)
    one = warp_exposure(src, mapping, out_bbox)
    serial = warp_exposure(src, mapping, out_bbox, tile=64)
    threads = warp_exposure(src, mapping, out_bbox, tile=64, workers=3)
    for a, b, c in zip(one.arrays(), serial.arrays(), threads.arrays()):
        assert np.array_equal(b, c)
        np.testing.assert_allclose(b, a, atol=2e-3 * float(np.abs(a).max()))


def _flagged_tile(seed: int, shape: tuple[int, int], n_flagged: int):
    """A source tile: image ~ N(100, 10), variance in [1, 3], ``n_flagged`` random pixels BAD, SAT or NO_DATA."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 10.0, shape).astype(np.float32)
    var = rng.uniform(1.0, 3.0, shape).astype(np.float32)
    msk = np.zeros(shape, np.int32)
    msk[rng.integers(0, shape[0], n_flagged), rng.integers(0, shape[1], n_flagged)] = rng.choice([BAD, SAT, ND],
                                                                                                 n_flagged)
    return img, var, msk


@pytest.mark.parametrize("mapping", [
    AffineMapping.shift(0.3, -0.2),
    AffineMapping.shift(-4.0, 3.0),  # a whole-pixel shift
    WcsMapping(tan_wcs((50.0, 40.0)), tan_wcs((52.73, 38.41))),  # two grids one shift apart (CRPIX)
])
def test_translated_tile_equals_the_general_gather(monkeypatch, mapping):
    """A tile the mapping moves by one offset takes two 1-D passes; they give the 36-tap gather's values (to
    float32 rounding) and exactly its mask, NO_DATA edges and renormalized edge taps included."""
    import diffim_dag.kernels.warp as warp

    img, var, msk = _flagged_tile(11, (120, 140), 30)
    img[5, 7] = np.nan  # a missing source pixel: NO_DATA around it
    out = dict(out_origin=(-3, 2), out_shape=(110, 150), src_origin=(0, 0))
    assert warp._translation(mapping, out["out_origin"], out["out_shape"]) is not None
    fast = warp_tile(img, var, msk, mapping, **out)
    monkeypatch.setattr(warp, "_translation", lambda *a, **k: None)
    general = warp_tile(img, var, msk, mapping, **out)
    np.testing.assert_array_equal(fast[2], general[2])
    assert (fast[2] & ND).any() and (fast[2] & SAT).any()
    np.testing.assert_allclose(fast[0], general[0], rtol=0, atol=2e-4)
    np.testing.assert_allclose(fast[1], general[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows, block, band_rows, columns", [(1, 32, 16, 512), (7, 5, 3, 7), (200, 1, 1, 1)])
def test_translated_tile_strips_and_blocks(monkeypatch, rows, block, band_rows, columns):
    """The translated tile's mask ORs run in strips of rows: any strip height gives the same bits (one row, strips
    that do not divide the tile, one strip for the whole tile).  Its sums run in strips and blocks of matrix
    products: any sizes give the same sums to float32 rounding (BLAS's kernels may add a product's terms in another
    order for another shape; one column: a matrix-vector product) and the same mask bits."""
    import diffim_dag.kernels.warp as warp

    img, var, msk = _flagged_tile(12, (90, 70), 40)
    out = dict(out_origin=(-2, 3), out_shape=(85, 75), src_origin=(0, 0))
    mapping = AffineMapping.shift(0.37, -0.61)
    reference = warp_tile(img, var, msk, mapping, **out)
    monkeypatch.setattr(warp, "TRANSLATED_STRIP_ROWS", rows)
    for a, b in zip(reference, warp_tile(img, var, msk, mapping, **out)):
        assert a.tobytes() == b.tobytes()
    monkeypatch.setattr(warp, "BAND_STRIP_ROWS", rows)
    monkeypatch.setattr(warp, "BAND_COLUMNS", block)
    monkeypatch.setattr(warp, "BAND_ROWS", band_rows)
    monkeypatch.setattr(warp, "BAND_ROW_COLUMNS", columns)
    got = warp_tile(img, var, msk, mapping, **out)
    assert got[2].tobytes() == reference[2].tobytes()
    for a, b in zip(reference[:2], got[:2]):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)
    assert (reference[2] & SAT).any() and (reference[2] & ND).any()


def test_band_passes_are_the_tap_sums():
    """The banded matrix products give each output's sum of its taps (float64 reference, to float32 rounding),
    with blocks that do not divide the outputs and a zero or a negative weight among the taps."""
    from diffim_dag.kernels.warp import _band_blocks, _band_pass_x, _band_pass_y

    rng = np.random.default_rng(5)
    src = rng.normal(0.0, 50.0, (23, 41)).astype(np.float32)
    w = rng.normal(0.0, 1.0, (36, 6)).astype(np.float32)
    w[3, 2] = 0.0
    along_x = _band_pass_x(src, _band_blocks(w, 7), np.full((23, 36), np.nan, np.float32))
    expect = sum(w[:, j].astype(np.float64)[None, :] * src[:, j:j + 36] for j in range(6))
    scale = sum(np.abs(w[:, j].astype(np.float64))[None, :] * np.abs(src[:, j:j + 36]) for j in range(6))
    assert np.all(np.abs(along_x - expect) <= 1e-6 * scale)
    wy = rng.normal(0.0, 1.0, (18, 6)).astype(np.float32)
    along_y = _band_pass_y(along_x, wy, np.full((18, 36), np.nan, np.float32))
    ax = along_x.astype(np.float64)
    expect = sum(wy[:, i].astype(np.float64)[:, None] * ax[i:i + 18] for i in range(6))
    scale = sum(np.abs(wy[:, i].astype(np.float64))[:, None] * np.abs(ax[i:i + 18]) for i in range(6))
    assert np.all(np.abs(along_y - expect) <= 1e-6 * scale)


@pytest.mark.parametrize("mapping, origin", [
    (AffineMapping.shift(0.37, -0.61), (-2, 3)),  # one offset: summed in the given planes; NO_DATA edges
    (AffineMapping.shift(0.37, -0.61), (500, 500)),  # no source pixel reaches the tile
    (AffineMapping.similarity(rotation=0.05, shift=(1.3, -0.4), center=(40, 40)), (-2, 3)),  # the gather
])
def test_tile_written_into_given_planes_is_the_tile(mapping, origin):
    """warp_tile(out=...) writes every pixel of the given planes (strided views of a larger frame, filled with
    garbage first) with the values of the tile it returns without them, bitwise, and returns those planes."""
    img, var, msk = _flagged_tile(12, (90, 70), 40)
    kw = dict(out_origin=origin, out_shape=(85, 75), src_origin=(0, 0))
    reference = warp_tile(img, var, msk, mapping, **kw)
    frame = [np.full((100, 90), np.nan, np.float32), np.full((100, 90), -1.0, np.float32),
             np.full((100, 90), -1, np.int32)]
    views = tuple(f[10:95, 7:82] for f in frame)
    got = warp_tile(img, var, msk, mapping, out=views, **kw)
    assert all(g is v for g, v in zip(got, views))
    for a, b in zip(reference, views):
        assert a.tobytes() == np.ascontiguousarray(b).tobytes()
    assert np.isnan(frame[0][:10]).all() and (frame[2][95:] == -1).all()  # nothing written outside the views
    with pytest.raises(InputError, match="out must be"):
        warp_tile(img, var, msk, mapping, out=(views[0], views[1], views[1]), **kw)


def test_rotation_is_not_taken_for_a_translation():
    import diffim_dag.kernels.warp as warp

    rotated = AffineMapping.similarity(rotation=np.deg2rad(0.01), shift=(0.3, 0.2))
    assert warp._translation(rotated, (0, 0), (1024, 1024)) is None
    assert warp._translation(AffineMapping.shift(0.3, 0.2), (0, 0), (1024, 1024)) == (0.3, 0.2)
