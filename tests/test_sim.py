"""Tests of the simulator: noise level, flux recovery, byte-exact reproducibility and the truth table."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffim_dag.errors import ConfigError, InputError
from diffim_dag.noise import robust_std
from diffim_dag.psf import GaussianPsf, MoffatPsf, VaryingPsf
from diffim_dag.sim import (
    TRUTH_COLUMNS,
    TRUTH_KINDS,
    SimConfig,
    add_sources,
    power_law_fluxes,
    simulate_pair,
    sky_model,
    write_pair,
)

NO_TRUTHS = dict(
    n_transients=0,
    n_negative_transients=0,
    n_variables=0,
    n_movers=0,
    n_cosmic_rays=0,
    n_saturated=0,
    n_bad_columns=0,
)


def far_from(truth, shape, xy0, radius):
    """Boolean image: pixels farther than ``radius`` from every truth position (both epochs)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    ok = np.ones(shape, dtype=bool)
    for xc, yc in zip(
        np.concatenate([truth["x"], truth["x_at_template_epoch"]]),
        np.concatenate([truth["y"], truth["y_at_template_epoch"]]),
    ):
        ok &= (xx - (xc - xy0[0])) ** 2 + (yy - (yc - xy0[1])) ** 2 > radius**2
    return ok


def box_sum(image, xc, yc, half, xy0=(0, 0)):
    ix, iy = int(math.floor(xc - xy0[0] + 0.5)), int(math.floor(yc - xy0[1] + 0.5))
    return float(np.sum(image[iy - half : iy + half + 1, ix - half : ix + half + 1], dtype=np.float64))


def centroid(image, xc, yc, half, xy0=(0, 0)):
    ix, iy = int(math.floor(xc - xy0[0] + 0.5)), int(math.floor(yc - xy0[1] + 0.5))
    cut = image[iy - half : iy + half + 1, ix - half : ix + half + 1].astype(np.float64)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    w = np.clip(cut, 0, None)
    return ix + xy0[0] + (w * xx).sum() / w.sum(), iy + xy0[1] + (w * yy).sum() / w.sum()


# ---------------------------------------------------------------------------------------------
# acceptance: noise, flux, bytes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sky_subtracted", [False, True])
def test_noise_in_empty_regions_matches_requested_level(sky_subtracted):
    cfg = SimConfig(size=256, seed=7, n_stars=8, **{**NO_TRUTHS, "n_transients": 2}, sky_gradient=(0.0, 0.0),
                    sky_subtracted=sky_subtracted)
    pair = simulate_pair(cfg)
    empty = far_from(pair.truth, cfg.shape, cfg.xy0, 25)
    assert empty.mean() > 0.5
    for epoch, exp in (("science", pair.science), ("template", pair.template)):
        img, var, _ = exp.arrays()
        requested = cfg.sky_noise(epoch)
        measured = robust_std(img[empty])
        assert measured == pytest.approx(requested, rel=0.02), epoch
        assert float(np.sqrt(np.median(var[empty]))) == pytest.approx(requested, rel=0.02), epoch
        level = 0.0 if sky_subtracted else (cfg.sky_level if epoch == "science" else cfg.resolved_template_sky_level)
        assert float(np.median(img[empty])) == pytest.approx(level, abs=0.05 * requested)
    # the template is deeper by the noise factor, and its header gain says so
    assert cfg.sky_noise("template") == pytest.approx(cfg.template_noise_factor * cfg.sky_noise("science"))
    assert pair.template.info.gain == pytest.approx(cfg.gain / cfg.template_noise_factor**2)


def test_variance_plane_matches_noise_with_sky_gradient():
    cfg = SimConfig(size=256, seed=8, n_stars=10, **NO_TRUTHS, sky_gradient=(0.8, -0.5), flux_scale=1.7)
    pair = simulate_pair(cfg)
    empty = far_from(pair.truth, cfg.shape, cfg.xy0, 25)
    for epoch, exp in (("science", pair.science), ("template", pair.template)):
        img, var, _ = exp.arrays()
        sky = pair.sky_model(epoch)
        pull = (img - sky) / np.sqrt(var)
        assert robust_std(pull[empty]) == pytest.approx(1.0, rel=0.02), epoch
        assert abs(float(np.median(pull[empty]))) < 0.03
        # the sky really has the gradient: left/right and bottom/top quarters
        q = cfg.shape[1] // 4
        left, right = np.median(img[:, :q][empty[:, :q]]), np.median(img[:, -q:][empty[:, -q:]])
        assert right - left == pytest.approx(float(sky[:, -q:].mean() - sky[:, :q].mean()), rel=0.05)


@pytest.mark.parametrize("profile", ["gaussian", "moffat"])
def test_injected_fluxes_recovered_by_aperture_sums(profile):
    cfg = SimConfig(size=384, seed=11, n_stars=8, star_min_flux=3e5, star_max_flux=1e6, saturation=1e9,
                    sky_level=100.0, gain=2.0, read_noise=3.0, psf_profile=profile, flux_scale=1.3, **NO_TRUTHS)
    pair = simulate_pair(cfg)
    truth = pair.truth
    stars = truth[truth["kind"] == "star"]
    half = 28  # ≥ the largest stamp half-size (Moffat wings down to 0.1σ at 1e6 counts)
    checked = 0
    for epoch, exp, xc, yc, fc in (
        ("science", pair.science, "x", "y", "science_flux"),
        ("template", pair.template, "template_x", "template_y", "template_flux"),
    ):
        img = exp.image.values.astype(np.float64) - pair.sky_model(epoch)
        for _, row in stars.iterrows():
            x, y = row[xc], row[yc]
            if not (half + 1 <= x <= cfg.shape[1] - half - 2 and half + 1 <= y <= cfg.shape[0] - half - 2):
                continue
            others = stars[stars["id"] != row["id"]]
            if np.min(np.hypot(others[xc] - x, others[yc] - y)) < half + 32:
                continue
            measured = box_sum(img, x, y, half)
            assert measured == pytest.approx(row[fc], rel=0.01), (epoch, row["id"])
            checked += 1
    assert checked >= 4
    # constant stars: science = κ × template
    assert np.allclose(stars["science_flux"], cfg.flux_scale * stars["template_flux"])
    assert np.allclose(stars["difference_flux"], 0.0, atol=1e-6 * stars["science_flux"].max())


def test_same_seed_same_bytes(tmp_path):
    cfg = SimConfig(size=256, seed=5, n_transients=2, n_movers=1, n_variables=1, n_negative_transients=1,
                    n_cosmic_rays=4, n_saturated=1, n_bad_columns=1, xy0=(100, 50))
    a = write_pair(simulate_pair(cfg), tmp_path / "a")
    b = write_pair(simulate_pair(cfg), tmp_path / "b")
    c = write_pair(simulate_pair(cfg, seed=6), tmp_path / "c")
    assert set(a) == {"science", "template", "truth"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
        assert a[key].read_bytes() != c[key].read_bytes(), key
    # the written files read back as the same exposures
    from diffim_dag.io.fits import read_exposure

    pair = simulate_pair(cfg)
    back = read_exposure(a["science"])
    assert back.xy0 == (100, 50)
    np.testing.assert_array_equal(back.image.values, pair.science.image.values)
    np.testing.assert_array_equal(back.variance.values, pair.science.variance.values)
    np.testing.assert_array_equal(back.mask.values, pair.science.mask.values)
    assert back.psf == pair.science.psf
    import pandas as pd

    truth = pd.read_csv(a["truth"])
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    assert len(truth) == len(pair.truth)


# ---------------------------------------------------------------------------------------------
# truth table and each kind of injected object
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def busy_pair():
    """No field stars, every kind of truth, non-zero origin, κ ≠ 1, Moffat PSFs."""
    cfg = SimConfig(size=384, seed=21, xy0=(1000, 2000), n_stars=0, n_transients=4, n_negative_transients=2,
                    n_variables=3, n_movers=3, n_cosmic_rays=12, n_saturated=2, n_bad_columns=2,
                    n_template_bad_columns=1, flux_scale=2.0, psf_profile="moffat",
                    transient_flux=(2e4, 4e4), variable_flux=(2e4, 4e4), mover_flux=(3e4, 5e4),
                    cosmic_ray_flux=(5e3, 1e4), template_offset=(0.4, -0.3))
    return simulate_pair(cfg)


def test_truth_table_contents(busy_pair):
    cfg, truth = busy_pair.config, busy_pair.truth
    assert list(truth.columns) == list(TRUTH_COLUMNS)
    assert truth["id"].tolist() == list(range(1, len(truth) + 1))
    assert set(truth["kind"]) <= set(TRUTH_KINDS)
    counts = truth["kind"].value_counts().to_dict()
    assert counts == {"saturated_star": 2, "transient": 4, "negative_transient": 2, "variable": 3, "mover": 3,
                      "cosmic_ray": 12, "bad_column": 3}
    x_min, x_max, y_min, y_max = cfg.bbox
    assert x_min == 1000 and y_min == 2000
    assert truth["x"].between(x_min - 0.5, x_max - 0.5).all()
    assert truth["y"].between(y_min - 0.5, y_max - 0.5).all()
    # injected truths are isolated and away from the edges
    special = truth[truth["kind"].isin(["transient", "negative_transient", "variable", "mover"])]
    xy = special[["x", "y"]].to_numpy()
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    assert d[np.triu_indices(len(xy), 1)].min() > cfg.isolation_radius
    assert (xy[:, 0] - x_min).min() > cfg.isolation_radius and (x_max - 1 - xy[:, 0]).min() > cfg.isolation_radius
    # template positions: offset grid
    pts = truth[truth["npix"] == 0]
    np.testing.assert_allclose(pts["template_x"] - pts["x_at_template_epoch"], cfg.template_offset[0])
    np.testing.assert_allclose(pts["template_y"] - pts["y_at_template_epoch"], cfg.template_offset[1])
    # difference flux = science − κ template; S/N positive where something changes
    np.testing.assert_allclose(pts["difference_flux"], pts["science_flux"] - cfg.flux_scale * pts["template_flux"])
    assert (special["snr_difference"] > 5).all()
    assert truth.loc[truth["kind"] == "cosmic_ray", "snr_difference"].isna().all()


def test_snr_difference_matches_formula(busy_pair):
    cfg, truth = busy_pair.config, busy_pair.truth
    row = truth[truth["kind"] == "transient"].iloc[0]
    psf_s, psf_t = busy_pair.science.psf, busy_pair.template.psf
    neff_s = 1.0 / np.sum(psf_s.kernel_image(row["x"], row["y"], size=61) ** 2)
    neff_t = 1.0 / np.sum(psf_t.kernel_image(row["template_x"], row["template_y"], size=61) ** 2)
    vs = busy_pair.sky_model("science")[int(round(row["y"])) - 2000, int(round(row["x"])) - 1000] / cfg.gain \
        + (cfg.read_noise / cfg.gain) ** 2
    vt = busy_pair.sky_model("template")[int(round(row["y"])) - 2000, int(round(row["x"])) - 1000] / cfg.template_gain \
        + (cfg.template_read_noise / cfg.template_gain) ** 2
    sigma = math.sqrt(neff_s * vs + row["science_flux"] / cfg.gain + cfg.flux_scale**2 * neff_t * vt)
    assert row["snr_difference"] == pytest.approx(row["difference_flux"] / sigma, rel=0.03)


def test_saturated_stars_clipped_and_flagged(busy_pair):
    cfg = busy_pair.config
    sat_bit = busy_pair.science.bitmask("SAT")
    bad_bit = busy_pair.science.bitmask("BAD")
    for epoch, exp, xc, yc in (("science", busy_pair.science, "x", "y"), ("template", busy_pair.template, "template_x", "template_y")):
        img, _, msk = exp.arrays()
        assert img.max() <= cfg.saturation
        clipped = img == cfg.saturation
        assert np.array_equal(clipped & ((msk & bad_bit) == 0), (msk & sat_bit) != 0), epoch
        for _, row in busy_pair.truth_of("saturated_star").iterrows():
            ix, iy = int(math.floor(row[xc] + 0.5)) - 1000, int(math.floor(row[yc] + 0.5)) - 2000
            assert img[iy, ix] == cfg.saturation
            assert msk[iy, ix] & sat_bit
            assert (msk[iy - 1 : iy + 2, ix - 1 : ix + 2] & sat_bit).all()
            assert row["saturated"]
    assert not busy_pair.truth.loc[busy_pair.truth["kind"] == "transient", "saturated"].any()


def test_bad_columns_flagged(busy_pair):
    truth = busy_pair.truth
    bad_bit = busy_pair.science.bitmask("BAD")
    for epoch, exp, xc in (("science", busy_pair.science, "x"), ("template", busy_pair.template, "template_x")):
        rows = truth[(truth["kind"] == "bad_column") & (truth["epoch"] == epoch)]
        msk = exp.mask.values
        bad = (msk & bad_bit) != 0
        assert bad.sum() == rows["npix"].sum()
        for _, row in rows.iterrows():
            col = int(round(row[xc])) - 1000
            assert bad[:, col].sum() == row["npix"]
        assert set(np.nonzero(bad.any(axis=0))[0]) == {int(round(v)) - 1000 for v in rows[xc]}
    assert (truth.loc[truth["kind"] == "bad_column", "epoch"].value_counts().to_dict()) == {"science": 2, "template": 1}


def test_cosmic_rays_only_in_science(busy_pair):
    cfg, truth = busy_pair.config, busy_pair.truth
    sci = busy_pair.science.image.values - busy_pair.sky_model("science")
    tmp = busy_pair.template.image.values - busy_pair.sky_model("template")
    crs = truth[truth["kind"] == "cosmic_ray"]
    assert (crs["epoch"] == "science").all() and (crs["template_flux"] == 0).all()
    assert crs["npix"].between(1, 4).all()
    assert not (busy_pair.science.mask.values & busy_pair.science.bitmask("CR")).any()  # left to the pipeline
    sat = truth[truth["kind"] == "saturated_star"]
    msk = busy_pair.science.mask.values
    checked = 0
    for _, row in crs.iterrows():
        ix, iy = int(round(row["x"])) - 1000, int(round(row["y"])) - 2000
        if msk[max(iy - 4, 0) : iy + 5, max(ix - 4, 0) : ix + 5].any() or np.hypot(sat["x"] - row["x"], sat["y"] - row["y"]).min() < 40:
            continue  # on a bad column or in a saturated star's wings
        checked += 1
        s = box_sum(sci, row["x"], row["y"], 3, cfg.xy0)
        t = box_sum(tmp, row["template_x"], row["template_y"], 3, cfg.xy0)
        if row["science_flux"] > 0 and not np.isnan(s):
            # sharp: nearly all the deposit within a 7×7 box, nothing in the template
            assert s == pytest.approx(row["science_flux"], abs=8 * 7 * cfg.sky_noise("science") + 0.02 * row["science_flux"])
            assert abs(t) < 8 * 7 * cfg.sky_noise("template") + 0.05 * row["science_flux"]
    assert checked >= 6
    masked = simulate_pair(busy_pair.config, mask_cosmic_rays=True)
    cr_bit = masked.science.bitmask("CR")
    assert ((masked.science.mask.values & cr_bit) != 0).sum() == crs["npix"].sum()
    assert not (masked.template.mask.values & cr_bit).any()


def test_transients_variables_and_movers(busy_pair):
    cfg, truth = busy_pair.config, busy_pair.truth
    sci = busy_pair.science.image.values - busy_pair.sky_model("science")
    tmp = busy_pair.template.image.values - busy_pair.sky_model("template")
    half = 14
    tol_s = 5 * (2 * half + 1) * cfg.sky_noise("science")
    tol_t = 5 * (2 * half + 1) * cfg.sky_noise("template")
    # Moffat β = 3 within ±14 px (≥ 4 FWHM) holds ≥ 98 % of the flux
    frac = 0.98
    for _, row in truth[truth["kind"].isin(["transient", "negative_transient", "variable", "mover"])].iterrows():
        s = box_sum(sci, row["x"], row["y"], half, cfg.xy0)
        t = box_sum(tmp, row["template_x"], row["template_y"], half, cfg.xy0)
        assert row["science_flux"] * frac - tol_s <= s <= row["science_flux"] + tol_s, row["kind"]
        assert row["template_flux"] * frac - tol_t <= t <= row["template_flux"] + tol_t, row["kind"]
        if row["kind"] == "transient":
            assert row["template_flux"] == 0 and row["epoch"] == "science"
        if row["kind"] == "negative_transient":
            assert row["science_flux"] == 0 and row["epoch"] == "template" and row["difference_flux"] < 0
        if row["kind"] == "variable":
            ratio = row["science_flux"] / (cfg.flux_scale * row["template_flux"])
            assert 1.2 <= max(ratio, 1 / ratio) <= 2.0 + 1e-9
        if row["kind"] == "mover":
            shift = math.hypot(row["x"] - row["x_at_template_epoch"], row["y"] - row["y_at_template_epoch"])
            assert 1.0 <= shift <= 3.0
            assert row["difference_flux"] == pytest.approx(0.0, abs=1e-6 * row["science_flux"])
            # the image centroids follow the truth in each epoch (parent frame, xy0 ≠ 0)
            cs = centroid(busy_pair.science.image.values - busy_pair.sky_model("science"), row["x"], row["y"], 6, cfg.xy0)
            ct = centroid(tmp, row["template_x"], row["template_y"], 6, cfg.xy0)
            assert np.hypot(cs[0] - row["x"], cs[1] - row["y"]) < 0.15
            assert np.hypot(ct[0] - row["template_x"], ct[1] - row["template_y"]) < 0.15
        else:
            assert row["x"] == row["x_at_template_epoch"]


def test_nonzero_origin_wcs_and_psf(busy_pair):
    cfg, truth = busy_pair.config, busy_pair.truth
    sci, tmp = busy_pair.science, busy_pair.template
    assert sci.xy0 == tmp.xy0 == (1000, 2000)
    assert sci.shape == tmp.shape == (384, 384)
    # truth RA/Dec are the science WCS at the parent position
    ra, dec = sci.pixel_to_sky(truth["x"].to_numpy(), truth["y"].to_numpy())
    np.testing.assert_allclose(ra, truth["ra"], rtol=0, atol=1e-12)
    # same sky, shifted grid: the template WCS puts the source at template_x, template_y
    pts = truth[(truth["npix"] == 0) & (truth["kind"] != "mover")]
    tx, ty = tmp.sky_to_pixel(pts["ra"].to_numpy(), pts["dec"].to_numpy())
    np.testing.assert_allclose(tx, pts["template_x"], atol=1e-6)
    np.testing.assert_allclose(ty, pts["template_y"], atol=1e-6)
    # the image centre is at (ra, dec)
    cra, cdec = sci.pixel_to_sky(*sci.center)
    assert (float(cra), float(cdec)) == pytest.approx((cfg.ra, cfg.dec), abs=1e-9)
    # PSFs are parent-frame VaryingPsfs whose FWHM changes by the gradient corner to corner
    assert isinstance(sci.psf, VaryingPsf) and sci.psf.profile == "moffat"
    lo, hi = sci.psf.fwhm(999.5, 1999.5), sci.psf.fwhm(1383.5, 2383.5)
    assert (hi - lo) / cfg.science_fwhm == pytest.approx(cfg.science_fwhm_gradient)
    assert tmp.psf.fwhm() == pytest.approx(cfg.template_fwhm)
    # metadata: distinct epochs, κ in the zero points
    assert sci.info.visit != tmp.info.visit and sci.info.mjd_obs != tmp.info.mjd_obs
    assert sci.info.date_obs.startswith("2024") and tmp.info.date_obs.startswith("2023")
    dzp = sci.info.photo_calib.zero_point - tmp.info.photo_calib.zero_point
    assert dzp == pytest.approx(2.5 * math.log10(cfg.flux_scale))


# ---------------------------------------------------------------------------------------------
# helpers and configuration
# ---------------------------------------------------------------------------------------------
def test_add_sources_conserves_flux_and_clips():
    psf = GaussianPsf.from_fwhm(3.0)
    img = np.zeros((64, 80), dtype=np.float32)
    add_sources(img, 140.3, 231.6, 1000.0, psf, xy0=(100, 200))
    assert float(img.sum()) == pytest.approx(1000.0, rel=1e-5)
    cy, cx = np.unravel_index(np.argmax(img), img.shape)
    assert (cx + 100, cy + 200) == (140, 232)
    xc, yc = centroid(img, 140.3, 231.6, 8, (100, 200))
    assert (xc, yc) == pytest.approx((140.3, 231.6), abs=1e-3)
    edge = np.zeros((64, 80))
    add_sources(edge, [0.0, 500.0], [10.0, 10.0], [1000.0, 1000.0], psf)  # on the border; far outside
    from scipy.stats import norm

    # only the columns x ≥ -0.5 (the image's edge) are kept
    assert edge.sum() == pytest.approx(1000.0 * norm.cdf(0.5 / psf.sigma_x), rel=0.01)
    moffat = np.zeros((101, 101))
    add_sources(moffat, 50, 50, 1.0, MoffatPsf(fwhm_pixels=3.0, beta=2.5))
    assert moffat.sum() == pytest.approx(1.0)
    with pytest.raises(InputError):
        add_sources(np.zeros((10, 10), dtype=int), 1, 1, 1, psf)


def test_power_law_fluxes():
    rng = np.random.default_rng(0)
    f = power_law_fluxes(rng, 20000, 100.0, 1e4, 2.0)
    assert f.min() >= 100 and f.max() <= 1e4
    # dN/dF ∝ F^-2 → N(>F) ∝ 1/F − 1/F_max: half the stars lie above F = 2/(1/100 + 1/1e4)
    assert np.mean(f > 2.0 / (1 / 100 + 1 / 1e4)) == pytest.approx(0.5, abs=0.02)
    g = power_law_fluxes(rng, 20000, 100.0, 1e4, 1.0)
    assert np.mean(g > 1000) == pytest.approx(0.5, abs=0.02)


def test_config_defaults_scale_with_area():
    small, big = SimConfig(size=256).counts(), SimConfig(size=2048).counts()
    assert big["n_stars"] == 1600 and small["n_stars"] == 25
    assert all(v >= 1 for k, v in small.items() if k != "n_template_bad_columns")
    assert SimConfig(size=(256, 512)).shape == (256, 512)
    # the default pair at 256² works and holds every kind
    pair = simulate_pair(size=256, seed=1)
    assert set(pair.truth["kind"]) == set(TRUTH_KINDS)
    assert pair.science.image.dtype == np.float32 and pair.science.variance.dtype == np.float32
    # changing a truth count leaves the field stars where they were
    other = simulate_pair(size=256, seed=1, n_transients=0)
    a, b = pair.truth_of("star"), other.truth_of("star")
    np.testing.assert_array_equal(a[["x", "y", "science_flux"]].to_numpy(), b[["x", "y", "science_flux"]].to_numpy())


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"science_fwhm": -1.0}, "science_fwhm"),
        ({"psf_profile": "gauss"}, "psf_profile"),
        ({"size": 10}, "size"),
        ({"sky_gradient": (1.5, 1.0)}, "sky_gradient"),
        ({"transient_flux": (5.0, 1.0)}, "transient_flux"),
        ({"n_movers": -2}, "n_movers"),
        ({"template_visit": 2024001}, "template_visit"),
        ({"flux_scale": 0.0}, "flux_scale"),
        ({"seed": -1}, "seed"),
        ({"size": 128, "n_transients": 200}, "n_transients"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        simulate_pair(**changes)


def test_unknown_override_suggests_field():
    with pytest.raises(ConfigError, match="n_stars"):
        simulate_pair(n_star=3)
    with pytest.raises(ConfigError, match="n_stars"):
        SimConfig().replace(n_star=3)


def test_sky_model_shape_and_gradient():
    cfg = SimConfig(size=(128, 256), sky_level=200.0, sky_gradient=(0.4, 0.0), xy0=(7, 9))
    sky = sky_model(cfg)
    assert sky.shape == (128, 256)
    # edge-to-edge fractional change equals the gradient (up to the half-pixel at each edge)
    assert (sky[0, -1] - sky[0, 0]) / 200.0 == pytest.approx(0.4 * 255 / 256)
    assert sky_model(cfg, "template").mean() == pytest.approx(200.0 / cfg.flux_scale)
    with pytest.raises(InputError):
        sky_model(cfg, "difference")


# ------------------------------------------------------------------ what users have (issue 16)


def test_rotated_offset_template_and_its_wcs_agree():
    """A source's template pixel (truth ``template_x/y``) is where the template's WCS puts its sky position."""
    from diffim_dag.sim import to_template

    cfg = SimConfig(size=256, seed=2, template_offset=(40.0, -12.5), template_rotation=1.0, n_transients=3)
    pair = simulate_pair(cfg)
    tr = pair.truth_of("transient")
    u, v = to_template(cfg, tr["x"].to_numpy(), tr["y"].to_numpy())
    np.testing.assert_allclose(u, tr["template_x"]) and np.testing.assert_allclose(v, tr["template_y"])
    ra, dec = pair.science.wcs.all_pix2world(tr["x"], tr["y"], 0)
    tu, tv = pair.template.wcs.all_world2pix(ra, dec, 0)
    np.testing.assert_allclose(tu, tr["template_x"], atol=1e-3)
    np.testing.assert_allclose(tv, tr["template_y"], atol=1e-3)
    # the truths lie where both images have data; field stars fill the template beyond the science frame too
    x0, x1, y0, y1 = cfg.bbox
    assert ((u >= x0) & (u < x1) & (v >= y0) & (v < y1)).all()
    stars = pair.truth_of("star")
    assert (stars["x"] > x1).any() or (stars["x"] < x0).any()


def test_fwhm_gradient_along_one_axis():
    cfg = SimConfig(size=512, science_fwhm=3.7, science_fwhm_gradient=(0.08, 0.0), n_transients=0)
    psf = simulate_pair(cfg, n_stars=10).science.psf
    assert psf.fwhm(-0.5, 255.5) == pytest.approx(3.7 * 0.96)
    assert psf.fwhm(511.5, 255.5) == pytest.approx(3.7 * 1.04)
    assert psf.fwhm(255.5, -0.5) == pytest.approx(psf.fwhm(255.5, 511.5))


def test_plain_layout_is_what_an_archive_serves(tmp_path):
    from astropy.io import fits

    from diffim_dag.io import read_exposure
    from diffim_dag.io.fits import read_psf

    pair = simulate_pair(SimConfig(size=256, seed=4, n_transients=2, sky_level=1060.0))
    paths = write_pair(pair, tmp_path, layout="plain", keywords=False)
    with fits.open(paths["science"]) as hdul:
        assert len(hdul) == 1 and hdul[0].data.dtype.kind == "f"
        header = hdul[0].header
        for key in ("GAIN", "RDNOISE", "SATURATE", "MAGZERO"):
            assert key not in header
        assert "CTYPE1" in header and "EXPTIME" in header
    np.testing.assert_array_equal(fits.getdata(paths["science"]), pair.science.arrays()[0])
    e = read_exposure(paths["science"])
    assert e.psf is None and e.info.gain is None
    assert e.info.variance_source.startswith("measured_sky+effective_gain")
    assert read_psf(paths["science_psf"]) == pair.science.psf  # the truth beside, for --science-psf
