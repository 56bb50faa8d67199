"""Detection on synthetic differences: matched filter, polarity merging, masks, tiles."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from diffim_dag import Exposure, GaussianPsf
from diffim_dag.kernels import detection as det
from diffim_dag.masks import DEFAULT_MASK_PLANES
from diffim_dag.sim import add_sources
from diffim_dag.stages.detect import DetectMeasureConfig, detect_and_measure, stitch_catalogs, TileResult

PSF = GaussianPsf(2.0)
NOISE = 5.0


def isolated_positions(rng, n, lo, hi, sep):
    out = []
    while len(out) < n:
        x, y = rng.uniform(lo, hi, 2)
        if all((x - a) ** 2 + (y - b) ** 2 > sep * sep for a, b in out):
            out.append((x, y))
    return np.array(out)


def make_difference(rng, shape, xy0, xs, ys, fluxes, noise=NOISE, mask=None):
    img = rng.normal(0.0, noise, shape)
    add_sources(img, xs, ys, fluxes, PSF, xy0=xy0)
    var = np.full(shape, noise**2)
    return Exposure.from_arrays(img, var, mask, xy0=xy0, psf=PSF)


@pytest.fixture
def transients(rng):
    xy0 = (300, 1200)
    pos = isolated_positions(rng, 10, 25, 231, 40) + np.array(xy0)
    flux = rng.uniform(1000, 2000, 10) * np.where(np.arange(10) % 2 == 0, 1, -1)
    return xy0, pos, flux


def match(cat, xs, ys, radius=1.0):
    """Index into cat of each truth (or -1), and how many catalogue rows matched anything."""
    idx = []
    used = np.zeros(len(cat), dtype=bool)
    for x, y in zip(xs, ys):
        d = np.hypot(cat["x"].to_numpy() - x, cat["y"].to_numpy() - y)
        hits = np.flatnonzero(d <= radius)
        idx.append(int(hits[0]) if len(hits) == 1 else (-1 if len(hits) == 0 else -2))
        used[hits] = True
    return np.array(idx), int(used.sum())


def test_ten_transients_found_once_with_psf_flux(rng, transients):
    xy0, pos, flux = transients
    # σ = 1: PSF-flux S/N 140-280, so that 2.5 % is > 3σ (at σ = 5 the flux error alone is 1.8-3.5 %)
    exp = make_difference(rng, (256, 256), xy0, pos[:, 0], pos[:, 1], flux, noise=1.0)
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    idx, n_used = match(cat, pos[:, 0], pos[:, 1])
    assert np.all(idx >= 0), idx  # each found exactly once within 1 px
    assert len(cat) == 10 and n_used == 10  # nothing else
    rel = cat["psf_flux"].to_numpy()[idx] / flux - 1
    assert np.max(np.abs(rel)) < 0.025, rel
    flux_pull = (cat["psf_flux"].to_numpy()[idx] - flux) / cat["psf_flux_err"].to_numpy()[idx]
    assert np.max(np.abs(flux_pull)) < 4.0
    assert np.array_equal(cat["is_negative"].to_numpy()[idx], flux < 0)
    assert np.all(cat["snr"].abs() > 20)
    assert not cat["is_dipole"].any()
    assert np.all(np.isfinite(cat[["x", "y", "x_err", "y_err"]].to_numpy()))
    # centroid errors are honest: pulls of order 1
    pulls = np.concatenate([(cat["x"].to_numpy()[idx] - pos[:, 0]) / cat["x_err"].to_numpy()[idx],
                            (cat["y"].to_numpy()[idx] - pos[:, 1]) / cat["y_err"].to_numpy()[idx]])
    assert np.std(pulls) < 2.0


def test_matched_filter_significance_is_unit_normal_on_noise(rng):
    img = rng.normal(0, 3.0, (300, 300))
    var = np.full(img.shape, 9.0)
    sm, sv = det.matched_filter(img, var, PSF.kernel_image())
    nu = det.significance_image(sm, sv)[20:-20, 20:-20]
    assert abs(np.std(nu) - 1.0) < 0.05
    # a wrong (unpropagated) σ would be √ΣP² times smaller: ~7x too large a significance
    assert abs(np.std(sm[20:-20, 20:-20] / 3.0) - 1.0) > 0.5
    # no 5σ false positives in 90k pixels of pure noise
    fps = det.detect_tile(img, var, np.zeros(img.shape, np.int32), PSF.kernel_image(), threshold=5.0)
    assert fps == []


def test_matched_filter_does_not_depend_on_its_threads(rng):
    """In process the matched filter's blocks run on every core, on a cluster on one: the same blocks, so the
    same values (a subtraction and a batch of one write the same bits), on a frame of several blocks each way."""
    from diffim_dag.kernels.convolve import BLOCK_TRANSFORM

    rows, columns = BLOCK_TRANSFORM
    img = rng.normal(0, 3.0, (rows * 2 + 77, columns + 90)).astype(np.float32)
    var = np.full(img.shape, 9.0, np.float32)
    bad = rng.uniform(size=img.shape) < 0.01
    one = det.matched_filter(img, var, PSF.kernel_image(), bad=bad, workers=1)
    two = det.matched_filter(img, var, PSF.kernel_image(), bad=bad, workers=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32), (np.float64, np.float64)])
def test_significance_image_in_strips_on_threads_is_the_formula(rng, dtypes):
    """S/√V_S, 0 where V_S is at most 1e-12 of its maximum (no data), in the inputs' precision; the strips on
    threads give the same bits as one thread."""
    sm = rng.normal(0.0, 3.0, (600, 130)).astype(dtypes[0])  # 3 strips of 256 rows, the last one short
    vs = rng.uniform(0.5, 10.0, sm.shape).astype(dtypes[1])
    vs[::7, ::5] = 0.0
    vs[3] = 1e-20
    one = det.significance_image(sm, vs)
    dtype = np.float32 if dtypes == (np.float32, np.float32) else np.float64
    assert one.dtype == dtype
    ok = vs > 1e-12 * vs.max()
    with np.errstate(divide="ignore"):
        want = np.where(ok, sm / np.sqrt(vs, dtype=dtype), 0.0).astype(dtype)
    np.testing.assert_array_equal(one, want)
    for workers in (2, 3):
        np.testing.assert_array_equal(det.significance_image(sm, vs, workers=workers), one)
    # thresholded strip by strip, without the plane: the same pixels, whatever the threads
    for threshold in (0.5, float(np.median(one))):
        for workers in (1, 2):
            above = det.significance_above(sm, vs, threshold, workers=workers)
            assert above.dtype == bool and above.any() and not above.all()
            np.testing.assert_array_equal(above, one >= threshold)


def test_positive_and_negative_footprints_merge_with_ordered_peaks(rng):
    img = rng.normal(0, 1.0, (120, 120))
    add_sources(img, [55.0, 62.0], [60.0, 60.0], [900.0, -1500.0], PSF)
    fps = det.detect_tile(img, np.ones_like(img), np.zeros(img.shape, np.int32), PSF.kernel_image())
    assert len(fps) == 1
    fp = fps[0]
    assert fp.has_both_polarities and not fp.is_negative
    s = np.abs(fp.peak_significance)
    assert np.all(np.diff(s) <= 0)  # ordered by significance
    assert fp.peak_significance[0] < 0  # the brighter negative lobe leads
    assert abs(fp.primary[0] - 62) <= 1
    # far apart: two sources, the negative one flagged
    img2 = rng.normal(0, 1.0, (120, 120))
    add_sources(img2, [30.0, 90.0], [60.0, 60.0], [900.0, -1500.0], PSF)
    fps2 = det.detect_tile(img2, np.ones_like(img2), np.zeros(img2.shape, np.int32), PSF.kernel_image())
    assert [f.is_negative for f in sorted(fps2, key=lambda f: f.primary[0])] == [False, True]


def test_footprints_grown_by_2p4_sigma():
    img = np.zeros((80, 80))
    img[40, 40] = 1.0
    # a single pixel above threshold grows into a disc of radius ceil(2.4 σ) = 5
    fps = det.detect_tile(img * 1e4, np.ones_like(img), np.zeros(img.shape, np.int32), np.ones((1, 1)),
                          psf_sigma=2.0, threshold=5.0)
    assert len(fps) == 1
    assert fps[0].area == int(det.disc(5).sum())


@pytest.mark.parametrize("plane", ["EDGE", "BAD", "SAT", "NO_DATA"])
def test_peaks_on_bad_planes_are_dropped(rng, transients, plane):
    xy0, pos, flux = transients
    shape = (256, 256)
    mask = np.zeros(shape, np.int32)
    hit = [0, 3, 7]
    for i in hit:
        ix, iy = int(round(pos[i, 0])) - xy0[0], int(round(pos[i, 1])) - xy0[1]
        mask[iy - 3 : iy + 4, ix - 3 : ix + 4] |= 1 << DEFAULT_MASK_PLANES[plane]
    exp = make_difference(rng, shape, xy0, pos[:, 0], pos[:, 1], flux, mask=mask)
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    idx, _ = match(cat, pos[:, 0], pos[:, 1])
    assert np.all(idx[hit] == -1)
    assert np.all(np.delete(idx, hit) >= 0)
    # configurable: not dropping that plane (nor, for EDGE, treating it as no data) finds them again
    # (except NO_DATA, which has no signal)
    if plane != "NO_DATA":
        keep = tuple(p for p in ("NO_DATA", "BAD", "SAT", "EDGE") if p != plane)
        cat2 = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, bad_peak_mask_planes=keep,
                                                                  no_data_mask_planes=("NO_DATA",)))
        idx2, _ = match(cat2, pos[:, 0], pos[:, 1])
        assert np.all(idx2 >= 0)
        assert cat2[f"pixel_flags_{plane.lower()}_center"].to_numpy()[idx2[hit]].all()


def _tiled_fixture(rng, n=512):
    xy0 = (64, 96)
    # sources exactly on 128- and 256-pixel tile borders (core edges), plus random ones
    border = []
    for b in (128, 256, 384):
        for t in (50.0, 150.3, 310.7, 450.2):
            border.append((xy0[0] + b, xy0[1] + t))
            border.append((xy0[0] + t + 11.0, xy0[1] + b - 0.5))
    border.append((xy0[0] + 256.0, xy0[1] + 256.0))  # a corner of four tiles
    border.append((xy0[0] + 128.4, xy0[1] + 384.6))
    rand = isolated_positions(rng, 30, 30, n - 30, 30) + np.array(xy0)
    pos = np.vstack([border, rand])
    keep = [0]
    for i in range(1, len(pos)):
        if np.min(np.hypot(*(pos[keep] - pos[i]).T)) > 25:
            keep.append(i)
    pos = pos[keep]
    flux = rng.uniform(800, 3000, len(pos)) * rng.choice([-1, 1], len(pos))
    # a dipole straddling the 256 border
    exp = make_difference(rng, (n, n), xy0, pos[:, 0], pos[:, 1], flux)
    img = exp.image.values.copy()
    add_sources(img, [xy0[0] + 254.5, xy0[0] + 257.5], [xy0[1] + 100.0, xy0[1] + 101.0], [2000.0, -2000.0], PSF, xy0=xy0)
    return exp.with_planes(image=img), pos


@pytest.mark.parametrize("tile_size", [256, 128])
def test_tiled_equals_untiled(rng, tile_size):
    exp, pos = _tiled_fixture(rng)
    cfg = DetectMeasureConfig(n_sky_sources=0)
    full = detect_and_measure(exp, config=cfg)
    tiled = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, tile_size=tile_size))
    assert len(full) >= len(pos)  # every source (plus the dipole)
    idx, _ = match(full, pos[:, 0], pos[:, 1])
    assert np.all(idx >= 0)
    assert full["dipole_fitted"].sum() == 1
    assert not tiled["footprint_truncated"].any()
    key = ["peak_y", "peak_x"]
    a = full.sort_values(key).reset_index(drop=True)
    b = tiled.sort_values(key).reset_index(drop=True)
    assert len(a) == len(b)
    assert not b.duplicated(key).any()
    pd.testing.assert_frame_equal(a.drop(columns="id"), b.drop(columns="id"), check_exact=False, rtol=1e-6, atol=1e-9)


def test_stitch_drops_duplicate_peaks():
    fp = det.Footprint(bbox=(0, 1, 0, 1), spans=np.ones((1, 1), bool), peak_x=np.array([5]), peak_y=np.array([7]),
                       peak_significance=np.array([9.0]), peak_value=np.array([1.0]))
    fp2 = det.Footprint(bbox=(0, 1, 0, 1), spans=np.ones((1, 1), bool), peak_x=np.array([2]), peak_y=np.array([3]),
                        peak_significance=np.array([-9.0]), peak_value=np.array([-1.0]))
    assert [f.primary for f in det.stitch_footprints([[fp], [fp, fp2]])] == [(2, 3), (5, 7)]
    c1 = pd.DataFrame({"peak_x": [5], "peak_y": [7], "v": [1.0]})
    c2 = pd.DataFrame({"peak_x": [5, 2], "peak_y": [7, 3], "v": [1.0, 2.0]})
    out = stitch_catalogs([TileResult(c1, [fp]), TileResult(c2, [fp, fp2])])
    assert out.catalog["peak_x"].tolist() == [2, 5] and [f.primary for f in out.footprints] == [(2, 3), (5, 7)]


def test_two_pass_background_removes_offset_and_gradient(rng):
    ny = nx = 200
    yy, xx = np.mgrid[0:ny, 0:nx]
    bg = 8.0 + 0.02 * xx - 0.01 * yy
    pos = isolated_positions(rng, 6, 30, 170, 40)
    flux = np.array([2000.0, -1800.0, 1500.0, 2500.0, -2200.0, 1200.0])
    img = rng.normal(0, 2.0, (ny, nx)) + bg
    add_sources(img, pos[:, 0], pos[:, 1], flux, PSF)
    est = det.two_pass_background(img, np.full(img.shape, 4.0), np.zeros(img.shape, bool), PSF.kernel_image())
    resid = (est - bg)[20:-20, 20:-20]
    assert np.max(np.abs(resid)) < 0.6
    exp = Exposure.from_arrays(img, np.full(img.shape, 4.0), psf=PSF)
    cat = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, subtract_background=True))
    idx, used = match(cat, pos[:, 0], pos[:, 1])
    assert np.all(idx >= 0) and len(cat) == 6
    assert np.max(np.abs(cat["psf_flux"].to_numpy()[idx] / flux - 1)) < 0.05
    # without background subtraction the offset (8σ of the filter) floods the detection
    cat_raw = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(cat_raw) != 6 or np.max(np.abs(cat_raw["psf_flux"].to_numpy() / flux[idx] - 1)) > 0.05


def test_cosmic_rays_are_masked_not_detected(rng):
    img = rng.normal(0, 2.0, (160, 160))
    add_sources(img, [50.0, 110.0], [60.0, 100.0], [3000.0, -2500.0], PSF)
    crs = [(20, 130), (140, 30), (90, 40)]
    for x, y in crs:
        img[y, x] += 400.0
    img[41, 90] += 250.0  # a two-pixel track
    var = np.full(img.shape, 4.0)
    cr = det.find_cosmic_rays(img, var, PSF.kernel_image())
    assert all(cr[y, x] for x, y in crs)
    assert not cr[55:66, 45:56].any() and not cr[95:106, 105:116].any()
    exp = Exposure.from_arrays(img, var, psf=PSF)
    with_cr = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, mask_cosmic_rays=True))
    without = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0))
    assert len(with_cr) == 2
    assert len(without) > 2


# ------------------------------------------------------------------ systematic fraction ε


def test_systematic_fraction_recovers_injected_scatter():
    rng = np.random.default_rng(11)
    sigma = rng.uniform(0.003, 0.03, 300)
    noise_only = rng.normal(0.0, sigma)
    assert det.systematic_fraction(noise_only, sigma) == 0.0  # residuals consistent with noise
    eps = 0.04
    r = rng.normal(0.0, np.sqrt(sigma**2 + eps**2))
    got = det.systematic_fraction(r, sigma)
    assert abs(got - eps) < 0.2 * eps, got
    # 10 % genuinely variable sources (±50 %) barely move the median-based estimate
    r_var = r.copy()
    r_var[::10] = rng.choice([-0.5, 0.5], r_var[::10].size)
    assert abs(det.systematic_fraction(r_var, sigma) - eps) < 0.3 * eps
    assert det.systematic_fraction(r[:5], sigma[:5]) == 0.0  # fewer than min_sources


def _static_residual_scene(eps: float, seed: int = 3, n: int = 512):
    """A matched template of 120 bright stars, and a difference holding ε-scaled residuals of them
    (r_j ~ N(0, ε) times each star) plus a transient of S/N ≈ 30 on blank sky."""
    rng = np.random.default_rng(seed)
    var = np.full((n, n), 4.0)
    xs, ys = rng.uniform(20, n - 20, 120), rng.uniform(20, n - 20, 120)
    flux = 10 ** rng.uniform(3.5, 5.0, 120)
    tmpl = np.zeros((n, n))
    add_sources(tmpl, xs, ys, flux, PSF)
    diff = rng.normal(0.0, 2.0, (n, n))
    add_sources(diff, xs, ys, flux * rng.normal(0.0, eps, 120), PSF)
    # blank-sky transient: ~ 30σ with the matched filter (σ_F = 2 sqrt(4π σ_psf²) ≈ 14.2)
    blank = None
    while blank is None:
        x, y = rng.uniform(40, n - 40, 2)
        if np.min(np.hypot(xs - x, ys - y)) > 30:
            blank = (x, y)
    add_sources(diff, [blank[0]], [blank[1]], [30 * 2.0 * np.sqrt(4 * np.pi * 4.0)], PSF)
    tmpl_var = var + np.clip(tmpl, 0, None)
    difference = Exposure.from_arrays(diff, var + tmpl_var, psf=PSF)
    template = Exposure.from_arrays(tmpl, tmpl_var, psf=PSF)
    return difference, template, blank


def test_systematic_fraction_suppresses_static_residuals_not_transients():
    difference, template, (bx, by) = _static_residual_scene(0.05)
    cfg = dict(n_sky_sources=0, threshold_type="variance")
    plain = detect_and_measure(difference, template=template, config=DetectMeasureConfig(systematic_fraction=0, **cfg))
    auto = detect_and_measure(difference, template=template,
                              config=DetectMeasureConfig(systematic_fraction="auto", **cfg))
    eps = auto.attrs["systematic_fraction"]
    assert 0.035 < eps < 0.065, eps
    assert plain.attrs["systematic_fraction"] is None
    assert len(plain) >= 30  # most 5 % residuals of 10^3.5–10^5 stars are far above 5σ
    assert len(auto) <= 8, auto[["x", "y", "peak_significance"]]
    # the blank-sky transient keeps its significance (no static flux under it)
    for cat in (plain, auto):
        d = np.hypot(cat["x"] - bx, cat["y"] - by)
        assert d.min() < 1.0
    sig = [cat.loc[np.hypot(cat["x"] - bx, cat["y"] - by).idxmin(), "peak_significance"] for cat in (plain, auto)]
    assert abs(sig[1] - sig[0]) < 0.01 * abs(sig[0])
    # a fixed ε is used as given; without residual scatter "auto" measures 0
    fixed = detect_and_measure(difference, template=template, config=DetectMeasureConfig(systematic_fraction=0.05, **cfg))
    assert fixed.attrs["systematic_fraction"] == 0.05
    clean, template0, _ = _static_residual_scene(0.0)
    none = detect_and_measure(clean, template=template0, config=DetectMeasureConfig(systematic_fraction="auto", **cfg))
    assert none.attrs["systematic_fraction"] == 0.0


def test_systematic_fraction_applies_to_a_methods_score_too():
    """ZOGY's S_corr and the pre-convolution score are thresholded as given, but the static sources' residuals are
    in them as in the difference: the score is divided by sqrt(1 + ε²M²/(s²V)), ε measured on the difference's own
    matched filter as for AL (before, the score methods reported bright stars' residuals that AL did not)."""
    difference, template, (bx, by) = _static_residual_scene(0.05)
    img, var, _ = difference.arrays()
    psf_image = PSF.kernel_image(*difference.center)
    score = det.significance_image(*det.matched_filter(img, var, psf_image))  # a score of unit noise
    cfg = dict(n_sky_sources=0, threshold_type="variance")
    plain = detect_and_measure(difference, template=template, score=score,
                               config=DetectMeasureConfig(systematic_fraction=0, **cfg))
    auto = detect_and_measure(difference, template=template, score=score,
                              config=DetectMeasureConfig(systematic_fraction="auto", **cfg))
    assert plain.attrs["systematic_fraction"] is None
    assert 0.035 < auto.attrs["systematic_fraction"] < 0.065, auto.attrs["systematic_fraction"]
    assert len(plain) >= 30 and len(auto) <= 8, auto[["x", "y", "peak_significance"]]
    sig = [cat.loc[np.hypot(cat["x"] - bx, cat["y"] - by).idxmin(), "peak_significance"] for cat in (plain, auto)]
    assert abs(sig[1] - sig[0]) < 0.01 * abs(sig[0])  # the blank-sky transient keeps its significance
    before = score.copy()
    detect_and_measure(difference, template=template, score=score, config=DetectMeasureConfig(systematic_fraction=0.05,
                                                                                             **cfg))
    np.testing.assert_array_equal(score, before)  # (the caller's score is not written)


def test_systematic_fraction_config_is_checked():
    from diffim_dag.errors import ConfigError

    for bad in ("sometimes", 1.5, -0.1, True):
        with pytest.raises(ConfigError, match="systematic_fraction"):
            DetectMeasureConfig(systematic_fraction=bad)


def test_local_abs_max_is_the_square_window_maximum():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(37, 23))
    for r in (0, 1, 4):
        got = det.local_abs_max(a, r)
        want = np.empty_like(a)
        for y in range(a.shape[0]):
            for x in range(a.shape[1]):
                want[y, x] = np.abs(a[max(y - r, 0): y + r + 1, max(x - r, 0): x + r + 1]).max()
        np.testing.assert_array_equal(got, want)


def test_systematic_radius_weighs_wing_residuals_against_the_core():
    """A bright static star (flux 1e5) leaves a wing residual 6 px from its core (5 % of its flux: a
    ring or a rotated spike); a transient 40 px away has S/N ≈ 30.  With ε = 5 % on the pixel's own
    M_S the wing residual is still a ~10σ DiaSource; with the kernel's reach (10 px) it is weighed
    against the core and drops out, and the transient outside that reach keeps its significance."""
    rng = np.random.default_rng(21)
    n, star, flux = 160, (60.3, 70.6), 1e5
    tmpl = np.zeros((n, n))
    add_sources(tmpl, [star[0]], [star[1]], [flux], PSF)
    diff = rng.normal(0.0, 2.0, (n, n))
    wing = (star[0] + 6.0, star[1])
    transient = (star[0] + 40.0, star[1] + 20.0)
    add_sources(diff, [wing[0], transient[0]], [wing[1], transient[1]], [0.05 * flux, 30 * 2.0 * np.sqrt(4 * np.pi * 4.0)],
                PSF)
    tmpl_var = np.full((n, n), 4.0) + tmpl
    difference = Exposure.from_arrays(diff, np.full((n, n), 4.0) + tmpl_var, psf=PSF)
    template = Exposure.from_arrays(tmpl, tmpl_var, psf=PSF)

    def run(radius):
        cfg = DetectMeasureConfig(n_sky_sources=0, threshold_type="variance", systematic_fraction=0.05,
                                  systematic_radius=radius)
        return detect_and_measure(difference, template=template, config=cfg)

    def near(cat, xy):
        d = np.hypot(cat["x"] - xy[0], cat["y"] - xy[1])
        return cat.loc[d.idxmin()] if len(cat) and d.min() < 1.5 else None

    pixel, reach = run(0), run(10)
    assert near(pixel, wing) is not None and near(pixel, wing)["peak_significance"] > 7
    assert near(reach, wing) is None
    a, b = near(pixel, transient), near(reach, transient)
    assert a is not None and b is not None
    assert abs(a["peak_significance"] - b["peak_significance"]) < 0.01 * a["peak_significance"]


def test_pipeline_resolves_systematic_radius_to_the_kernel_half_width():
    from types import SimpleNamespace

    from diffim_dag.config import load_config
    from diffim_dag.errors import ConfigError
    from diffim_dag.pipeline import detection_config

    assert load_config(None).detection.systematic_radius == 0  # the default: the term at the pixel
    cfg = load_config(None, ["detection.systematic_radius=kernel"])
    assert cfg.detection.systematic_fraction == "auto"
    result = SimpleNamespace(metrics={"kernel": {"kernel_size": 23}})
    assert detection_config(cfg, result).systematic_radius == 11
    assert detection_config(cfg).systematic_radius == 0  # no kernel (e.g. a score method)
    # every other detection field of the pipeline reaches the detection stage as it is
    import dataclasses

    custom = load_config(None, ["detection.no_data_mask_planes=[NO_DATA]", "detection.subtract_background=true",
                                "detection.background_bin_sizes=[8,24]", "detection.mask_cosmic_rays=true",
                                "detection.n_sky_sources=7", "detection.threshold=6.0"])
    stage = detection_config(custom, result)
    for f in dataclasses.fields(custom.detection):
        if f.name != "systematic_radius":
            assert getattr(stage, f.name) == getattr(custom.detection, f.name), f.name
    assert detection_config(load_config(None, ["detection.systematic_radius=4"]), result).systematic_radius == 4
    with pytest.raises(ConfigError, match="systematic_radius"):
        load_config(None, ["detection.systematic_radius=-1"])
    with pytest.raises(ConfigError, match="systematic_radius"):
        DetectMeasureConfig(systematic_radius=-2)


def test_footprints_larger_than_the_halo_are_completed_across_tiles(rng):
    """Two extended sources (σ = 20 px: a saturated star's wings, a bright galaxy's residual) and a streak
    across the image span several 128-px tiles and are wider than the tiles' halo: the tiled catalogue
    still equals the untiled one, each big source once with its whole footprint; point sources elsewhere
    are unaffected."""
    n, xy0 = 512, (1000, 2000)
    pos = isolated_positions(rng, 20, 30, n - 30, 40)
    pos = pos[np.hypot(pos[:, 0] - 190, pos[:, 1] - 200) > 130]
    pos = pos[np.hypot(pos[:, 0] - 370, pos[:, 1] - 390) > 130] + np.array(xy0)
    flux = rng.uniform(1000, 3000, len(pos)) * rng.choice([-1, 1], len(pos))
    exp = make_difference(rng, (n, n), xy0, pos[:, 0], pos[:, 1], flux)
    img = exp.image.values.copy()
    big = GaussianPsf(20.0)
    add_sources(img, [xy0[0] + 190.0, xy0[0] + 370.0], [xy0[1] + 200.0, xy0[1] + 390.0], [3e6, -2e6], big, xy0=xy0)
    # and a satellite streak across the whole image (σ = 1.5 px, ~8σ per pixel on its ridge)
    yy, xx = np.mgrid[:n, :n]
    img += 40.0 * np.exp(-0.5 * ((yy - (60.0 + 0.05 * xx)) / 1.5) ** 2)
    exp = exp.with_planes(image=img)
    cfg = DetectMeasureConfig(n_sky_sources=0)
    full = detect_and_measure(exp, config=cfg)
    tiled = detect_and_measure(exp, config=DetectMeasureConfig(n_sky_sources=0, tile_size=128))
    widths = (full["bbox_x_max"] - full["bbox_x_min"]).to_numpy()
    halo = det.required_halo(exp.psf.kernel_image().shape[0], measure_radius=cfg.aperture_radius + 2)
    assert (widths > 2 * halo).sum() == 3  # the two big sources and the streak, each wider than two halos
    assert (widths == n).sum() == 1  # the streak, once, end to end
    assert not full["footprint_truncated"].any() and not tiled["footprint_truncated"].any()
    key = ["peak_y", "peak_x"]
    a = full.sort_values(key).reset_index(drop=True)
    b = tiled.sort_values(key).reset_index(drop=True)
    assert not b.duplicated(key).any()
    pd.testing.assert_frame_equal(a.drop(columns="id"), b.drop(columns="id"), check_exact=False, rtol=1e-6, atol=1e-9)


def test_local_max_at_is_the_3x3_maximum_filter():
    from scipy import ndimage

    from diffim_dag.kernels.detection import local_max_at

    rng = np.random.default_rng(1)
    img = rng.integers(0, 5, (40, 37)).astype(np.float32)  # many ties
    iy, ix = np.nonzero(np.ones(img.shape, bool))
    expected = (img >= ndimage.maximum_filter(img, size=3, mode="nearest"))[iy, ix]
    np.testing.assert_array_equal(local_max_at(img, iy, ix), expected)


def test_repair_cosmic_rays_flags_and_fills_only_the_hits(rng):
    """The input stage's repair: hits (grown by one) get the CR bit on top of their other bits, their values the
    mean of the unflagged pixels around them; stars, other pixels and the input exposure stay as they were."""
    from diffim_dag.stages.cosmic_rays import repair_cosmic_rays

    img = rng.normal(0, 2.0, (120, 120)).astype(np.float32)
    add_sources(img, [40.0], [50.0], [4000.0], PSF)
    img[90, 20] += 500.0
    var = np.full(img.shape, 4.0, np.float32)
    msk = np.zeros(img.shape, np.int32)
    msk[90, 21] = 1 << DEFAULT_MASK_PLANES["INTRP"]  # a neighbour with a bit of its own
    msk[10, 10] = 1 << DEFAULT_MASK_PLANES["BAD"]
    exp = Exposure.from_arrays(img, var, msk, psf=PSF)
    out = repair_cosmic_rays(exp)
    o_img, o_var, o_msk = out.exposure.arrays()
    cr = 1 << out.exposure.mask_planes["CR"]
    hit = (o_msk & cr) != 0
    assert hit[89:92, 19:22].all() and hit.sum() == 9 and out.report["pixels"] == 9 and out.report["groups"] == 1
    np.testing.assert_array_equal(o_msk & ~cr, msk)  # every other bit kept
    assert o_msk.dtype == msk.dtype and o_msk[90, 21] == (1 << DEFAULT_MASK_PLANES["INTRP"]) | cr
    np.testing.assert_array_equal(o_img[~hit], img[~hit])
    assert abs(float(o_img[90, 20])) < 10.0
    np.testing.assert_array_equal(o_var, var)
    np.testing.assert_array_equal(exp.arrays()[2], msk)  # the input is not modified
    np.testing.assert_array_equal(exp.arrays()[0], img)
    # an image plane that is the caller's alone (the sky stage's): the same result, repaired where it is
    own = Exposure.from_arrays(img.copy(), var, msk, psf=PSF)
    plane = own.arrays()[0]
    again = repair_cosmic_rays(own, own_image=True)
    np.testing.assert_array_equal(again.exposure.arrays()[0], o_img)
    np.testing.assert_array_equal(again.exposure.arrays()[2], o_msk)
    assert np.shares_memory(again.exposure.arrays()[0], plane) and plane[90, 20] == o_img[90, 20]


def test_cosmic_ray_search_of_the_positive_image_and_its_group_count(rng):
    """``positive=True`` finds what the search of ``max(image, 0)`` finds, without that image; the repair's group
    count (from the hit pixels alone) is ``scipy.ndimage.label``'s."""
    from scipy import ndimage

    from diffim_dag.stages.cosmic_rays import _groups

    psf = GaussianPsf(1.3).kernel_image(0, 0)
    for _ in range(20):
        img = rng.normal(0, 1, (60, 70)).astype(np.float32)
        iy, ix = rng.integers(0, 60, 25), rng.integers(0, 70, 25)
        img[iy, ix] += rng.uniform(-80, 80, 25).astype(np.float32)  # hits of both signs, some at the edges
        bad = rng.random(img.shape) < 0.01
        clipped = det.find_cosmic_rays(np.where(img > 0, img, 0.0), np.ones_like(img), psf, bad=bad)
        assert clipped.any()
        assert np.array_equal(det.find_cosmic_rays(img, np.ones_like(img), psf, bad=bad, positive=True), clipped)
    for _ in range(200):
        hit = rng.random(tuple(rng.integers(1, 40, 2))) < rng.uniform(0.01, 0.6)
        if hit.any():
            assert _groups(*np.nonzero(hit), hit.shape[1]) == ndimage.label(hit)[1]


def test_cosmic_ray_threshold_is_exact_at_n_sigma():
    """The float32 pre-selection does not move the n σ threshold: a spike one float32 step above n σ is found,
    one at or below it is not, for either sign and for ``positive``."""
    psf = GaussianPsf(1.3).kernel_image(0, 0)
    var = np.full((40, 60), 2.7, np.float32)
    img = np.zeros(var.shape, np.float32)
    thr = 6.0 * math.sqrt(float(np.float32(2.7)))
    above = np.nextafter(np.float32(thr), np.float32(np.inf))
    below = np.float32(thr) if np.float32(thr) <= thr else np.nextafter(np.float32(thr), np.float32(0))
    img[10, 10], img[10, 30], img[30, 10], img[30, 30] = above, below, -above, -below
    hits = det.find_cosmic_rays(img, var, psf, nsigma=6.0, grow=0)
    assert hits[10, 10] and hits[30, 10] and not hits[10, 30] and not hits[30, 30]
    pos = det.find_cosmic_rays(img, var, psf, nsigma=6.0, grow=0, positive=True)
    assert pos[10, 10] and not pos[10, 30] and not pos[30, 10] and not pos[30, 30]


@pytest.mark.parametrize("squeeze_max", [0.0, 1.0, None])
def test_label_objects_is_ndimage_label_and_find_objects(monkeypatch, squeeze_max):
    """The labelling gives ``ndimage.label``'s labels (same numbering, dtype) and ``find_objects``' boxes, squeezed
    (``SQUEEZE_MAX_FRACTION`` 1), whole (0) or as the default chooses: sparse and dense regions, objects on the
    array's edges, runs of empty rows and columns, an empty region."""
    import scipy.ndimage as ndi

    from diffim_dag.kernels import detection
    from diffim_dag.kernels.detection import label_objects

    if squeeze_max is not None:
        monkeypatch.setattr(detection, "SQUEEZE_MAX_FRACTION", squeeze_max)
    rng = np.random.default_rng(11)
    for trial in range(60):
        shape = tuple(int(v) for v in rng.integers(1, 90, 2))
        region = rng.random(shape) < [0.002, 0.02, 0.2, 0.6][trial % 4]
        if trial % 9 == 0:
            region[:] = False
        if trial % 5 == 0:
            region[-1, :] = True
        labels, n = ndi.label(region)
        got, got_n, got_slices = label_objects(region)
        assert got.dtype == labels.dtype and got_n == n
        np.testing.assert_array_equal(got, labels)
        assert got_slices == ndi.find_objects(labels)
