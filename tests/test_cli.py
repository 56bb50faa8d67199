"""The command line: simulate, subtract (output contract), info, demo, config errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from diffim_dag.cli import main


def test_simulate_then_subtract_writes_the_output_contract(tmp_path, capsys):
    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--size", "384", "--seed", "4", "--out", str(sim_dir), "--set", "n_transients=5",
                 "--set", "sky_subtracted=true"]) == 0
    for name in ("science.fits", "template.fits", "truth.csv"):
        assert (sim_dir / name).is_file()
    out = tmp_path / "out"
    rc = main(["subtract", str(sim_dir / "science.fits"), str(sim_dir / "template.fits"), "--out", str(out),
               "--plots", "-c", "subtract.tile_size=128", "--scheduler", ""])
    assert rc == 0
    for name in ("difference.fits", "matched_template.fits", "kernel.fits", "metrics.json", "dia_sources.parquet"):
        assert (out / name).is_file(), name
    import pandas as pd

    cat = pd.read_parquet(out / "dia_sources.parquet")
    truth = pd.read_csv(sim_dir / "truth.csv")
    transients = truth[(truth["kind"] == "transient") & (truth["snr_difference"] >= 10)]
    real = cat[~cat["sky_source"]]
    for _, t in transients.iterrows():
        assert (np.hypot(real["x"] - t["x"], real["y"] - t["y"]) < 1.5).any(), "injected transient not found"
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == [
        "difference.png", "kernel_candidates.png", "kernel_grid.png", "matched_template.png", "residual_stamps.png"]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("template_coverage", "science_variance_scale", "template_variance_scale", "mode", "kernel",
                "quality", "limiting_magnitude", "timings_s", "decorrelation", "template", "dia_sources",
                "differential_background"):
        assert key in metrics, key
    kernel = metrics["kernel"]
    for key in ("kernel_size", "gaussian_sigmas", "kernel_sum_center", "spatial_condition_number", "candidates"):
        assert key in kernel, key
    assert metrics["quality"]["verdict"] == "ok"
    from diffim_dag.io import read_exposure

    diff = read_exposure(out / "difference.fits")
    assert diff.info.variance_source == "propagated"
    assert diff.psf is not None
    assert np.isfinite(diff.arrays()[0]).all()


def test_unknown_config_key_names_the_nearest(tmp_path, capsys):
    rc = main(["subtract", "a.fits", "b.fits", "--out", str(tmp_path), "-c", "kernel.spatial_kernel_ordr=2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "kernel.spatial_kernel_ordr" in err and "kernel.spatial_kernel_order" in err
    assert err.count("\n") == 1


def test_bad_input_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "x.fits"
    bogus.write_text("not fits")
    assert main(["info", str(bogus)]) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "not a FITS file" in err and err.count("\n") == 1


@pytest.mark.realdata
def test_info_on_each_real_file(shared_data, capsys):
    cases = []
    for f in sorted((shared_data / "decam-n6" / "input").glob("*.fits")):
        cases.append([str(f)])
    jw = shared_data / "jwst-nircam-a2744"
    for f in sorted((jw / "input").glob("*.fits")):
        stem = f.name.replace(".fits", "")
        cases.append([str(f), "--noise", str(jw / "noise" / f"{stem}.noise.fits"),
                      "--psf", str(jw / "psf" / f"{stem}.WebbPSF.fits")])
    for f in sorted((shared_data / "ztf-alert-stamps" / "alerts").glob("*.fits.gz")):
        cases.append([str(f), "--hdu", "SCIENCE"])
    for args in cases:
        assert main(["info", *args]) == 0
        out = capsys.readouterr().out
        for word in ("planes", "WCS", "noise", "PSF", "saturation"):
            assert word in out, (args, word)
    assert main(["info", cases[0][0], "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["wcs"] is not None and desc["noise"]["measured_sky_noise"] > 0


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "diffim_dag.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for sub in ("simulate", "subtract", "demo", "info"):
        assert sub in proc.stdout


def test_command_line_ends_with_its_code_and_all_its_output(tmp_path):
    """The command line's process ends at once when its work is done (no interpreter teardown): everything it
    printed reaches a pipe, and the exit code is the command's, for a success, a bad input and a long output."""
    sim = subprocess.run([sys.executable, "-m", "diffim_dag.cli", "simulate", "--size", "128", "--seed", "3",
                          "--out", str(tmp_path / "sim")], capture_output=True, text=True)
    assert sim.returncode == 0, sim.stderr
    assert "wrote" in sim.stdout and sim.stdout.endswith("\n")
    bad = subprocess.run([sys.executable, "-m", "diffim_dag.cli", "info", str(tmp_path / "missing.fits")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.fits" in bad.stderr
    info = subprocess.run([sys.executable, "-m", "diffim_dag.cli", "info", str(tmp_path / "sim" / "science.fits"),
                           "--json"], capture_output=True, text=True)
    assert info.returncode == 0
    assert json.loads(info.stdout)["shape"]  # the whole JSON document arrived


def test_no_warp_and_missing_template(tmp_path, capsys):
    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--size", "256", "--seed", "5", "--out", str(sim_dir), "--set", "sky_subtracted=true",
                 "--set", "template_offset=[0.0,0.0]"]) == 0
    out = tmp_path / "out"
    assert main(["subtract", str(sim_dir / "science.fits"), str(sim_dir / "template.fits"), "--out", str(out),
                 "--no-warp", "--scheduler", ""]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["template"]["warped"] is False
    assert main(["subtract", str(sim_dir / "science.fits"), "--out", str(out)]) == 2
    assert "--template-store" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["al-preconvolve", "zogy"])
def test_score_methods_write_score(tmp_path, method):
    sim_dir = tmp_path / "sim"
    assert main(["simulate", "--size", "384", "--seed", "6", "--out", str(sim_dir), "--set", "sky_subtracted=true",
                 "--set", "template_offset=[0.0,0.0]", "--set", "n_transients=6", "--set", "n_cosmic_rays=0"]) == 0
    out = tmp_path / method
    assert main(["subtract", str(sim_dir / "science.fits"), str(sim_dir / "template.fits"), "--out", str(out),
                 "--method", method, "--no-warp", "--scheduler", "", "-c", "detection.n_sky_sources=10"]) == 0
    assert (out / "score.fits").is_file() and (out / "difference.fits").is_file()
    assert (out / "kernel.fits").is_file() == (method != "zogy")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method
    import pandas as pd

    cat = pd.read_parquet(out / "dia_sources.parquet")
    truth = pd.read_csv(sim_dir / "truth.csv")
    bright = truth[(truth["kind"] == "transient") & (truth["snr_difference"] >= 15)]
    real = cat[~cat["sky_source"]]
    for _, t in bright.iterrows():
        assert (np.hypot(real["x"] - t["x"], real["y"] - t["y"]) < 1.5).any(), f"{method} missed a transient"
