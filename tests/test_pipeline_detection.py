"""Pipeline-level acceptance of detection and measurement (issue 5).

* a simulated 4096² pair with 200 injected point transients at difference S/N ~4–50, AL-subtracted with
  ``subtract_exposures(..., detect=True)``: completeness, photometry and false positives;
* tiled and untiled catalogues of a 4096² difference with sources on the tile borders are identical;
* real data (skipped when ``../shared/data`` is absent): the JWST null pair, fakes injected into it, and
  the known DECam source.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from diffim_dag import Exposure, GaussianPsf
from diffim_dag.pipeline import subtract_exposures
from diffim_dag.sim import SimConfig, add_sources, simulate_pair
from truth_eval import nearest as _nearest
from truth_eval import real as _real
from diffim_dag.stages.detect import DetectMeasureConfig, detect_and_measure

MATCH_RADIUS = 2.0




# ------------------------------------------------------------------------------------ simulation


SIM = SimConfig(
    size=4096,
    seed=5,
    n_transients=200,
    # log-uniform 600–8000 counts: truth snr_difference spans ~4–51 (≈ half of them ≥ 15)
    transient_flux=(600.0, 8000.0),
    sky_subtracted=True,
    # no cosmic rays at all (rather than masked ones): they are not what this test counts
    n_cosmic_rays=0,
)


@pytest.fixture(scope="module")
def sim_result():
    pair = simulate_pair(SIM)
    result = subtract_exposures(pair.science, pair.template, detect=True)
    return pair, result


def _completeness(pair, real):
    """(found mask, matched catalogue rows, truth rows) of the transients with truth S/N ≥ 7."""
    tr = pair.truth_of("transient")
    bright = tr[tr["snr_difference"].to_numpy() >= 7]
    d, i = _nearest(real, bright["x"], bright["y"])
    return d <= MATCH_RADIUS, i, bright


@pytest.mark.acceptance
@pytest.mark.slow
def test_sim_transients_found_and_measured(sim_result):
    pair, result = sim_result
    real = _real(result.dia_sources)
    snr = pair.truth_of("transient")["snr_difference"].to_numpy()
    assert snr.min() < 7 and snr.max() > 45  # the S/N range the issue asks for (~5–50)
    found, i, bright = _completeness(pair, real)
    assert len(bright) >= 120
    assert found.mean() >= 0.95, f"found {found.sum()}/{len(bright)} transients with S/N ≥ 7"
    ratio = real["psf_flux"].to_numpy()[i[found]] / bright["difference_flux"].to_numpy()[found]
    assert abs(np.median(ratio) - 1.0) <= 0.02, f"median psf_flux / truth = {np.median(ratio):.4f}"


def _false_positives(pair, real):
    """DiaSources that are no injected truth, away from bright stars: (mask, near-bright mask).

    * Truths that are not false positives: transients, negative transients, variables (within 2 px) and
      movers (dipoles: within 3 FWHM + 2 px of either epoch's position).
    * "Away from bright stars": farther than 3·FWHM + the PSF stamp half-width from every star (field or
      saturated) whose noiseless peak pixel exceeds 50σ of the sky noise, and not on a BAD column
      (detections with ``pixel_flags_bad``).
    """
    truth = pair.truth
    cfg = pair.config
    sigma = cfg.sky_noise("science")
    psf = pair.science.psf
    fwhm = max(cfg.science_fwhm, cfg.template_fwhm) * (1 + abs(cfg.science_fwhm_gradient))
    half = psf.default_size() // 2
    x, y = real["x"].to_numpy(), real["y"].to_numpy()
    explained = np.zeros(len(real), bool)
    point = truth[truth["kind"].isin(["transient", "negative_transient", "variable"])]
    for _, t in point.iterrows():
        explained |= np.hypot(x - t["x"], y - t["y"]) <= MATCH_RADIUS
    for _, t in truth[truth["kind"] == "mover"].iterrows():
        r = 3 * fwhm + 2
        explained |= np.hypot(x - t["x"], y - t["y"]) <= r
        explained |= np.hypot(x - t["x_at_template_epoch"], y - t["y_at_template_epoch"]) <= r
    stars = truth[truth["kind"].isin(["star", "saturated_star"])]
    peak = stars["science_flux"].to_numpy() / (2 * np.pi * (stars["science_fwhm"].to_numpy() / 2.3548) ** 2)
    bright = stars[peak > 50 * sigma]
    near_bright = np.zeros(len(real), bool)
    for _, s in bright.iterrows():
        near_bright |= np.hypot(x - s["x"], y - s["y"]) <= 3 * fwhm + half
    on_bad = real["pixel_flags_bad"].to_numpy()
    return ~explained & ~near_bright & ~on_bad, near_bright


@pytest.mark.acceptance
@pytest.mark.slow
def test_sim_false_positives_away_from_bright_stars(sim_result):
    """≤ 10 DiaSources that are no injected truth, away from bright stars (see :func:`_false_positives`)."""
    pair, result = sim_result
    real = _real(result.dia_sources)
    false, near_bright = _false_positives(pair, real)
    assert false.sum() <= 10, real.loc[false, ["x", "y", "peak_significance", "psf_flux"]].to_string()
    # the definition leaves most of the image: the false-positive count means something
    assert near_bright.mean() < 0.9


@pytest.mark.acceptance
@pytest.mark.slow
@pytest.mark.parametrize("method", ["al-preconvolve", "zogy"])
def test_sim_score_methods_complete_with_few_false_positives(sim_result, method):
    """Issue 6: on the same 4096² pair with 200 transients, AL with pre-convolution and ZOGY (4×4 PSF
    grid, detection on their score images) each find ≥ 95 % of the transients with S/N ≥ 7 and leave
    ≤ 10 false positives away from bright stars, as AL does above."""
    from diffim_dag.config import PipelineConfig
    from diffim_dag.pipeline import subtract

    from diffim_dag.stages.template import prepare_template

    pair, _ = sim_result
    # the simulated template grid is offset by (0.3, -0.2) px: the pipeline warps it first (AL's kernel
    # absorbs such a shift, ZOGY's PSF-model filters cannot)
    template, warp = prepare_template(pair.science, pair.template)
    assert warp["warped"]
    result = subtract(pair.science, template, config=PipelineConfig(method=method), detect=True)
    assert result.score is not None
    real = _real(result.dia_sources)
    found, _, bright = _completeness(pair, real)
    assert found.mean() >= 0.95, f"{method}: found {found.sum()}/{len(bright)} transients with S/N ≥ 7"
    false, _ = _false_positives(pair, real)
    assert false.sum() <= 10, real.loc[false, ["x", "y", "peak_significance", "psf_flux"]].to_string()


# ------------------------------------------------------------------------------------ tiles


@pytest.mark.slow
def test_tiled_catalog_identical_to_untiled():
    """Sources (point, negative and dipole pairs) on and around the 1024-px tile borders of a 4096² difference."""
    rng = np.random.default_rng(7)
    n = 4096
    psf = GaussianPsf(2.0)
    img = rng.normal(0.0, 5.0, (n, n)).astype(np.float32)
    borders = np.arange(1024, n, 1024)
    xs, ys, fs = [], [], []
    for b in borders:  # on vertical and horizontal borders, at −3 … +3 px, along the whole border
        for off in (-3.3, -1.0, -0.5, 0.0, 0.4, 1.0, 2.7):
            t = rng.uniform(30, n - 30, 6)
            xs += list(b + off + np.zeros(6)) + list(t)
            ys += list(t) + list(b + off + np.zeros(6))
            fs += list(rng.uniform(300, 5000, 12) * rng.choice([-1, 1], 12))
    for bx in borders:  # the tile corners
        for by in borders:
            xs.append(bx - 0.5)
            ys.append(by + 0.3)
            fs.append(3000.0)
    # dipoles straddling a border
    for b in borders:
        t = rng.uniform(100, n - 100, 4)
        xs += list(b - 1.5 + np.zeros(4)) + list(b + 1.5 + np.zeros(4))
        ys += list(t) + list(t)
        fs += [2500.0] * 4 + [-2500.0] * 4
    # and elsewhere
    xs += list(rng.uniform(20, n - 20, 100))
    ys += list(rng.uniform(20, n - 20, 100))
    fs += list(rng.uniform(300, 5000, 100))
    add_sources(img, np.array(xs), np.array(ys), np.array(fs), psf)
    exp = Exposure.from_arrays(img, np.full((n, n), 25.0, np.float32), psf=psf)
    untiled = detect_and_measure(exp, config=DetectMeasureConfig(tile_size=None, fft_workers=2))
    tiled = detect_and_measure(exp, config=DetectMeasureConfig(tile_size=1024))
    real = _real(untiled)
    assert len(real) > 250
    # sources really are on the borders (primary peak within 3 px of one)
    px, py = real["peak_x"].to_numpy(), real["peak_y"].to_numpy()
    on_border = (np.abs(px[:, None] - borders[None]) <= 3).any(1) | (np.abs(py[:, None] - borders[None]) <= 3).any(1)
    assert on_border.sum() > 150
    assert real["is_dipole"].sum() >= 6
    assert not tiled["footprint_truncated"].any()
    pd.testing.assert_frame_equal(tiled, untiled, check_exact=False, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ real data


JWST_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
JWST_REF = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"


def _jwst(shared_data, stem):
    from diffim_dag.io import read_exposure

    root = shared_data / "jwst-nircam-a2744"
    return read_exposure(root / "input" / f"{stem}.fits", noise=root / "noise" / f"{stem}.noise.fits",
                         psf=root / "psf" / f"{stem}.WebbPSF.fits")


MASKED = ("no_data", "bad", "sat", "edge", "suspect")


def _unmasked(cat: pd.DataFrame) -> pd.DataFrame:
    keep = np.ones(len(cat), bool)
    for p in MASKED:
        keep &= ~cat[f"pixel_flags_{p}_center"].to_numpy()
    return cat[keep]


@pytest.fixture(scope="module")
def jwst(shared_data):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        science, template = _jwst(shared_data, JWST_SCI), _jwst(shared_data, JWST_REF)
    return science, template, subtract_exposures(science, template, detect=True)


def _strong(cat: pd.DataFrame) -> pd.DataFrame:
    real = _unmasked(_real(cat))
    return real[np.abs(real["peak_significance"]) >= 5.0]


PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(scope="module")
def jwst_drizzled(jwst):
    """The null pair through ``pipelines/al-drizzled.yaml``: it differs from ``al.yaml`` in its detection
    section only (the systematic term out to 15 px)."""
    import warnings

    from diffim_dag.config import load_config

    drizzled, default = load_config(PIPELINES / "al-drizzled.yaml"), load_config(PIPELINES / "al.yaml")
    assert replace(drizzled, detection=default.detection) == default
    science, template, _ = jwst
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return subtract_exposures(science, template, config=drizzled, detect=True)


@pytest.mark.realdata
def test_jwst_kernel_and_systematics(jwst, jwst_drizzled):
    """What holds on the JWST null pair with LSST's detection (no systematic term), and what the measured
    systematic term and the drizzled pipeline add.

    * Only 22 faint stars (Σ S/N² = 3.3e4) pass the point-source cut, so compact galaxies are admitted as kernel
      sources (``sources.min_point_snr2``): the kernel sum is then within 1.5 % of the measured
      flux ratio (aperture photometry of the brightest objects gives 1.005–1.02; the 22 stars alone
      gave 0.92, which left ~8 % of every galaxy in the difference).
    * The residuals at the static sources are several % of their matched-filtered flux (undersampled,
      differently drizzled PSFs), which ``detection.systematic_fraction="auto"`` measures and puts
      into the detection variance (out to 15 px in the drizzled pipeline): the ≥ 5σ DiaSources drop
      four-fold from what LSST's detection leaves.
    """
    from diffim_dag.config import load_config
    from diffim_dag.pipeline import detection_config
    from diffim_dag.stages.detect import detect_and_measure

    _, _, result = jwst
    kernel = result.metrics["kernel"]
    assert kernel["sources"]["extended_admitted"] > 0
    assert abs(kernel["kernel_sum_center"] - 1.0) < 0.015, kernel["kernel_sum_center"]
    lsst = load_config(PIPELINES / "al.yaml", ["detection.systematic_fraction=0"])
    plain = _strong(detect_and_measure(jwst_drizzled.difference, science=jwst_drizzled.matched_science,
                                       template=jwst_drizzled.matched_template,
                                       config=detection_config(lsst, jwst_drizzled)))
    eps = jwst_drizzled.dia_sources.attrs["systematic_fraction"]
    assert 0.03 < eps < 0.2, eps
    # measured: 21 → 5
    assert 4 * len(_strong(jwst_drizzled.dia_sources)) <= len(plain), (len(_strong(jwst_drizzled.dia_sources)),
                                                                        len(plain))
    # the default pipeline measures a systematic term too
    assert 0.02 < result.dia_sources.attrs["systematic_fraction"] < 0.2


@pytest.mark.realdata
def test_jwst_photometric_scale_of_its_galaxies_agrees_with_the_kernel(jwst):
    """The kernel sources of Abell 2744 are compact galaxies: in apertures of 2 FWHM of the WebbPSF models their
    flux ratio was 1.043 against the kernel sum's 1.001 (the PSF's aperture correction, exact for a star, lent the
    science epoch's galaxies ~4 % more flux), and the verdict called the subtraction bad (the command line, without
    the noise maps: 1.044 against 0.992); measured in apertures scaled to each galaxy's half-light radius, as
    apertures of 12–25 px say: 1.00–1.01."""
    _, _, result = jwst
    scale = result.metrics["photometric_scale"]
    assert scale["n_stars"] >= 20
    assert abs(scale["stars"] / scale["kernel"] - 1.0) < 0.03, scale
    assert result.metrics["quality"]["checks"]["photometric_scale"]["ok"]


@pytest.mark.realdata
def test_jwst_null_pair_has_few_dia_sources(jwst_drizzled):
    """The two epochs of Abell 2744 (no known transient): ≤ 5 DiaSources at ≥ 5σ outside masked pixels,
    with ``pipelines/al-drizzled.yaml`` (the systematic term that drizzled space data call for).

    Measured: 5 (features present only in the template epoch, also in SFFT's difference)."""
    strong = _strong(jwst_drizzled.dia_sources)
    assert len(strong) <= 5, strong[["x", "y", "peak_significance", "psf_flux", "footprint_area"]].to_string()


@pytest.mark.realdata
@pytest.mark.parametrize("pipeline", ["al.yaml", "al-drizzled.yaml"])
def test_jwst_fakes_recovered(jwst, pipeline):
    """30 point sources injected into the science image with its own (WebbPSF) model, S/N 10–30, found
    by the default pipeline and by the drizzled-data one (whose systematic term must not hide them).

    The S/N is that of PSF photometry in the difference with its measured noise: the flux is
    ``snr × s / sqrt(Σ P² / V)`` with ``V`` the difference variance at the fake and ``s`` the clipped
    standard deviation of the null difference's matched-filter significance (the drizzled JWST noise is
    correlated, ``s`` ≈ 1.8, so the variance plane alone would overstate the S/N).
    """
    science, template, null = jwst
    rng = np.random.default_rng(2024)
    img, var, msk = science.arrays()
    dimg, dvar, dmsk = null.difference.arrays()
    stdev = null.dia_sources.attrs.get("significance_stdev") or 1.0
    real = _real(null.dia_sources)
    ny, nx = img.shape
    xs, ys = [], []
    while len(xs) < 30:  # away from the edges, masked pixels, null detections and each other
        x, y = rng.uniform(40, nx - 40), rng.uniform(40, ny - 40)
        ix, iy = int(round(x)), int(round(y))
        if dmsk[iy - 6: iy + 7, ix - 6: ix + 7].any():
            continue
        if len(real) and np.min(np.hypot(real["x"] - x, real["y"] - y)) < 20:
            continue
        if xs and np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) < 30:
            continue
        xs.append(x)
        ys.append(y)
    xs, ys = np.array(xs), np.array(ys)
    snr = rng.uniform(10, 30, 30)
    p2 = np.array([float((science.psf.kernel_image(x, y) ** 2).sum()) for x, y in zip(xs, ys)])
    v = np.array([dvar[int(round(y)), int(round(x))] for x, y in zip(xs, ys)])
    flux = snr * stdev / np.sqrt(p2 / v)
    fake = img.astype(np.float64).copy()
    add_sources(fake, xs, ys, flux, science.psf)
    from diffim_dag.config import load_config

    result = subtract_exposures(science.with_planes(image=fake.astype(np.float32)), template,
                                config=load_config(PIPELINES / pipeline), detect=True)
    cat = _real(result.dia_sources)
    d, i = _nearest(cat, xs, ys)
    found = (d <= MATCH_RADIUS) & (cat["psf_flux"].to_numpy()[i] > 0)
    assert found.mean() >= 0.9, f"recovered {found.sum()}/30 fakes; missed S/N {np.round(snr[~found], 1)}"


@pytest.mark.realdata
def test_decam_known_source_detected(shared_data):
    """DEC-OBS04a − DEC-OBS18a (Gaussian PSFs from the FWHM keyword): the source at (129, 128)."""
    from diffim_dag.io import read_exposure

    def load(name):
        path = shared_data / "decam-n6" / "input" / f"DEC-{name}.mini.fits"
        return read_exposure(path).with_attrs(psf=GaussianPsf.from_fwhm(fits.getheader(path)["FWHM"]))

    result = subtract_exposures(load("OBS04a"), load("OBS18a"), detect=True)
    real = _real(result.dia_sources)
    d, i = _nearest(real, 129.0, 128.0)
    assert d[0] <= MATCH_RADIUS
    row = real.iloc[int(i[0])]
    assert row["psf_flux"] > 0 and row["snr"] > 5 and not row["is_negative"]
