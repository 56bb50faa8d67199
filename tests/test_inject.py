"""Injection–recovery: fakes rendered with each image's PSF, matched after subtraction, completeness figures.

The CLI tests run the user's command (plain FITS, raw sky, no PSF, no keywords, only ``--fakes``) in both
matching directions and hold the figures to the analytic expectation: the 50 % completeness magnitude is the
difference's 5σ point-source limit.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from diffim_dag.config import FakesConfig, PipelineConfig, load_config
from diffim_dag.errors import ConfigError
from diffim_dag.exposure import Exposure
from diffim_dag.kernels.measure import forced_psf_flux
from diffim_dag.pipeline import prepare_exposures
from diffim_dag.psf import GaussianPsf
from diffim_dag.sim import SimConfig, simulate_pair
from diffim_dag.stages.inject import completeness_summary, efficiency_fit, inject_fakes


def _blank(shape=(256, 256), psf=None, sigma=1.0):
    img = np.zeros(shape, np.float32)
    var = np.full(shape, sigma**2, np.float32)
    return Exposure.from_arrays(img, var, np.zeros(shape, np.int32), psf=psf or GaussianPsf.from_fwhm(3.0))


def test_fake_rendered_into_empty_image_sums_to_its_flux():
    science, template = _blank(), _blank()
    cfg = FakesConfig(n=12, seed=3, poisson=False, snr_range=(20.0, 200.0), galaxy_fraction=0, star_fraction=0)
    sci, tmp, fakes = inject_fakes(science, template, cfg)
    assert len(fakes) == 12 and (fakes["image"] == "science").all()
    img = sci.arrays()[0].astype(np.float64)
    for _, f in fakes.iterrows():  # each stamp alone (fakes are ≥ 5 FWHM apart, stamps ~4 FWHM)
        x, y, h = int(round(f.x)), int(round(f.y)), 7
        assert img[y - h:y + h + 1, x - h:x + h + 1].sum() == pytest.approx(f.flux, rel=1e-3)
    assert img.sum() == pytest.approx(fakes["flux"].sum(), rel=1e-3)
    assert not tmp.arrays()[0].any()  # nothing went into the template
    bit = 1 << sci.mask_planes["INJECTED"]
    msk = sci.arrays()[2]
    assert all(msk[int(round(f.y)), int(round(f.x))] & bit for _, f in fakes.iterrows())


def test_fake_psf_flux_on_the_science_matches_at_high_snr():
    """On a simulated science (sky and PSF estimated), the forced PSF flux of fakes at S/N ≥ 50 is their flux
    within 1 % (median), and their photon noise makes the pulls unit-width with the updated variance plane."""
    pair = simulate_pair(SimConfig(size=512, seed=11, sky_subtracted=False))
    config = PipelineConfig()
    prepared = prepare_exposures(pair.science, pair.template, config)
    cfg = FakesConfig(n=40, seed=2, snr_range=(50.0, 150.0))
    sci, _, fakes = inject_fakes(prepared.science, prepared.template, cfg)
    img, var, msk = sci.arrays()
    base = prepared.science.arrays()[0]
    good = np.ones(img.shape, bool)
    flux, err, _ = forced_psf_flux((img - base).astype(np.float64), var.astype(np.float64), good, sci.psf,
                                   fakes["x"].to_numpy(), fakes["y"].to_numpy(), origin=sci.xy0)
    ratio = flux / fakes["flux"].to_numpy()
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    assert (var > prepared.science.arrays()[1]).any()  # the fakes' photon noise is in the variance plane


def test_fakes_in_the_template_fade_and_are_masked_there():
    science, template = _blank(), _blank()
    sci, tmp, fakes = inject_fakes(science, template, FakesConfig(n=5, n_template=5, seed=1, poisson=False))
    assert (fakes["image"] == "template").sum() == 5
    assert tmp.arrays()[0].sum() == pytest.approx(fakes.loc[fakes["image"] == "template", "flux"].sum(), rel=1e-3)
    assert (tmp.arrays()[2] & (1 << tmp.mask_planes["INJECTED"])).any()


def test_efficiency_fit_recovers_a_known_logistic():
    rng = np.random.default_rng(0)
    mag = rng.uniform(18, 24, 4000)
    found = rng.random(4000) < 0.95 / (1 + np.exp((mag - 21.3) / 0.2))
    fit = efficiency_fit(mag, found)
    assert fit["m50"] == pytest.approx(21.3, abs=0.05)
    assert fit["efficiency_max"] == pytest.approx(0.95, abs=0.02)
    assert fit["m90"] is not None and fit["m90"] < fit["m50"]
    assert efficiency_fit(mag[:5], found[:5]) is None


def test_summary_counts_and_flux_figures():
    n = 200
    rng = np.random.default_rng(4)
    flux = 10 ** rng.uniform(2, 4, n)
    err = np.full(n, 50.0)
    found = flux / err > 5
    table = pd.DataFrame({"fake_id": np.arange(n), "x": 0.0, "y": 0.0, "environment": "blank", "image": "science",
                          "flux": flux, "flux_difference": flux, "flux_error_expected": err, "snr_expected": flux / err,
                          "matched": found, "psf_flux": np.where(found, flux * 1.002, np.nan), "psf_flux_err": err,
                          "distance": np.where(found, 0.05, np.nan), "dx": 0.0, "dy": 0.0, "zero_point": 30.0})
    table["flux_ratio"] = table["psf_flux"] / table["flux_difference"]
    s = completeness_summary(table, zero_point=30.0, limiting_flux=250.0)
    assert s["n_injected"] == n and s["n_recovered"] == int(found.sum())
    assert s["m50"] == pytest.approx(30 - 2.5 * np.log10(250.0), abs=0.1)  # a step: anywhere in the gap
    assert s["flux"]["median_ratio"] == pytest.approx(1.002)
    assert s["completeness_snr_ge_10"] == 1.0


def test_magnitude_range_needs_a_zero_point():
    with pytest.raises(ConfigError, match="zero point"):
        inject_fakes(_blank(), _blank(), FakesConfig(n=3, magnitude_range=(20.0, 22.0)))
    assert load_config(None, ["fakes.n=7", "fakes.snr_range=[3, 30]"]).fakes.snr_range == (3.0, 30.0)
    with pytest.raises(ConfigError, match="snr_range"):
        FakesConfig(snr_range=(5.0, 1.0))


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffim_dag.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("broader", ["science", "template"])
def test_cli_fakes_on_raw_plain_fits(tmp_path, broader):
    """``diffim-dag subtract SCI TMP --out DIR --fakes 600`` on raw-sky plain FITS without PSF or keywords."""
    # template broader: also galaxies (fakes on them) and a flux scale ≠ 1
    fwhm = [] if broader == "science" else ["--set", "science_fwhm=2.8", "--set", "template_fwhm=3.8",
                                            "--set", "n_galaxies=60", "--set", "flux_scale=1.3"]
    r = _cli("simulate", "--size", "1024", "--seed", "5", "--layout", "plain", "--no-psf", "--no-keywords",
             "--set", "sky_subtracted=false", *fwhm, "--out", str(tmp_path / "in"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = _cli("subtract", str(tmp_path / "in" / "science.fits"), str(tmp_path / "in" / "template.fits"),
             "--out", str(out), "--fakes", "600")  # ~200 at S/N ≥ 20: the median flux to ±0.4 %
    assert r.returncode == 0, r.stderr
    assert "fakes:" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    j = m["injection"]
    assert m["mode"] == ("convolveTemplate" if broader == "science" else "convolveScience")
    assert j["n_injected"] == 600
    assert abs(j["m50"] - j["limiting_magnitude_5sigma"]) <= 0.2
    assert j["completeness_snr_ge_10"] >= 0.97
    assert abs(j["flux"]["median_ratio"] - 1) <= 0.01
    assert j["astrometry"]["median_offset_px_snr_ge_20"] <= 0.1
    assert m["timings_s"]["inject"] > 0 and m["timings_s"]["match"] > 0
    assert abs(j["astrometry"]["median_dx_px"]) <= 0.05 and abs(j["astrometry"]["median_dy_px"]) <= 0.05
    if broader == "template":
        assert j["by_environment"]["galaxy"]["n"] >= 20
    table = pd.read_parquet(out / "injection.parquet")
    assert len(table) == 600 and table["matched"].sum() == j["n_recovered"]
    assert (out / "plots" / "completeness.png").stat().st_size > 10_000
    assert set(pd.read_csv(out / "completeness.csv")["environment"]) >= {"all", "blank"}


def test_simulated_galaxies_are_static_discs_in_both_epochs():
    base = SimConfig(size=256, seed=3, sky_subtracted=True, flux_scale=1.5, n_stars=20)
    with_gal = simulate_pair(base.replace(n_galaxies=3, galaxy_radius=(3.0, 3.0)))
    without = simulate_pair(base)
    gal = with_gal.truth[with_gal.truth["kind"] == "galaxy"]
    assert len(gal) == 3 and (gal["difference_flux"] == 0).all()
    assert np.allclose(gal["template_flux"], gal["science_flux"] / 1.5)
    for epoch in ("science", "template"):
        added = getattr(with_gal, epoch).arrays()[0] - getattr(without, epoch).arrays()[0]
        for _, g in gal.iterrows():
            x, y = (g.x, g.y) if epoch == "science" else (g.template_x, g.template_y)
            ix, iy = int(round(x)), int(round(y))
            if 30 <= ix < 226 and 30 <= iy < 226:  # wholly inside: the flux is there (noise aside)
                box = added[iy - 25:iy + 26, ix - 25:ix + 26]
                want = g.science_flux if epoch == "science" else g.template_flux
                assert box.sum() == pytest.approx(want, rel=0.05)


@pytest.mark.acceptance
@pytest.mark.slow
def test_batch_with_fakes_leaves_the_clean_run_alone(tmp_path):
    from diffim_dag.batch import simulate_batch

    manifest = simulate_batch(tmp_path / "b", n_visits=3, size=256, sim_overrides={"n_stars": 150})
    out = tmp_path / "out"
    r = _cli("run", "pipelines/al.yaml", "--manifest", str(manifest), "--out", str(out), "--no-progress",
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    clean = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _cli("run", "pipelines/al.yaml", "--manifest", str(manifest), "--out", str(out), "--no-progress",
             "--workers", "1", "--fakes", "30")
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in clean} == clean  # every clean file byte for byte
    inj = out / "injected"
    report = json.loads((inj / "run_report.json").read_text())
    assert report["injection"]["n_visits"] == 3 and report["injection"]["n_injected"] == 90
    assert all(e["injection"]["n_injected"] == 30 for e in report["entries"])
    visit = json.loads((inj / "visit=1000" / "detector=0" / "metrics.json").read_text())
    assert visit["timings_s"]["inject"] > 0 and visit["injection"]["n_injected"] == 30
    survey = pd.read_parquet(inj / "injection.parquet")
    assert len(survey) == 90 and set(survey["visit"]) == {1000, 1001, 1002}
    assert (inj / "plots" / "completeness.png").exists() and (inj / "completeness.csv").exists()
    assert (inj / "visit=1000" / "detector=0" / "injection.parquet").exists()


@pytest.mark.realdata
def test_decam_fakes(shared_data, tmp_path):
    d = shared_data / "decam-n6" / "input"
    out = tmp_path / "out"
    r = _cli("subtract", str(d / "DEC-OBS04a.mini.fits"), str(d / "DEC-OBS18a.mini.fits"), "--out", str(out),
             "--fakes", "200")
    assert r.returncode == 0, r.stderr
    j = json.loads((out / "metrics.json").read_text())["injection"]
    assert (out / "completeness.csv").exists() and (out / "plots" / "completeness.png").exists()
    assert j["n_requested"] == 200 and j["n_injected"] >= 50  # a 256² stamp holds ~65 fakes 5 FWHM apart
    assert abs(j["m50"] - j["limiting_magnitude_5sigma"]) <= 0.3


@pytest.mark.parametrize("method", ["zogy", "al-preconvolve"])
def test_score_methods_inject_before_their_subtraction(method):
    from diffim_dag.pipeline import subtract

    pair = simulate_pair(SimConfig(size=512, seed=12, sky_subtracted=False))
    config = load_config(None, [f"method={method}", "fakes.n=40", "fakes.snr_range=[15, 60]"])
    result = subtract(pair.science.with_attrs(psf=None), pair.template.with_attrs(psf=None), config=config)
    j = result.metrics["injection"]
    assert j["n_injected"] == 40 and result.metrics["timings_s"]["inject"] > 0
    assert j["n_recovered"] >= 34  # S/N 15–60: nearly all, wherever they sit
    assert abs(j["flux"]["median_ratio"] - 1) < 0.03
    bit = 1 << result.difference.mask_planes["INJECTED"]
    table = result.injection.table
    msk = result.difference.arrays()[2]
    x0, y0 = result.difference.xy0
    assert all(msk[int(round(y - y0)), int(round(x - x0))] & bit for x, y in zip(table["x"], table["y"]))
