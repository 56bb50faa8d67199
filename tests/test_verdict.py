"""The verdict (issue 16): every check on synthetic metrics, and three failed subtractions that must say why —
a pedestal left in, a misregistered template with the warp turned off, a template PSF supplied 2× too wide."""
from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from acceptance import run_cli
from diffim_dag.config import SubtractConfig, load_config
from diffim_dag.pipeline import subtract
from diffim_dag.sim import SimConfig, simulate_pair, write_pair
from diffim_dag.stages.verdict import judge

GOOD = {
    "quality": {"sky_ratio": 1.01, "sky_ratio_propagated": 0.99, "footprint_residual_ratio_mean": 0.004,
                "footprint_residual_ratio_std": 0.006, "background_left": {"level": 0.1, "detection_sigma": 0.02}},
    "photometric_scale": {"stars": 1.10, "n_stars": 80, "kernel": 1.098},
    "kernel": {"kernel_centroid_center": [0.05, -0.1]},
}


def _catalog(areas, n_sky):
    return pd.DataFrame({"footprint_area": list(areas) + [0] * n_sky,
                         "sky_source": [False] * len(areas) + [True] * n_sky})


def _judge(metrics, cat=None):
    return judge(metrics, cat if cat is not None else _catalog([30, 40], 100), shape=(1000, 1000),
                 subtract_config=SubtractConfig(), n_sky_requested=100)


def _with(**changes):
    m = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        node = m
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return m


def test_a_good_subtraction_is_ok_and_every_check_is_recorded():
    q = _judge(GOOD)
    assert q["verdict"] == "ok" and q["verdict_reasons"] == []
    assert set(q["checks"]) == {"sky_ratio", "difference_noise", "footprint_residual", "background_left",
                                "photometric_scale", "kernel_shift", "largest_footprint", "sky_sources"}
    assert all(c["ok"] for c in q["checks"].values())


@pytest.mark.parametrize("changes, check", [
    ({"quality__sky_ratio": 1.4}, "sky_ratio"),
    ({"quality__sky_ratio_propagated": 0.3}, "difference_noise"),
    ({"quality__footprint_residual_ratio_mean": 0.35}, "footprint_residual"),
    ({"quality__background_left": {"level": 40.0, "detection_sigma": 3.2}}, "background_left"),
    ({"photometric_scale__kernel": 1.2}, "photometric_scale"),
    ({"kernel__kernel_centroid_center": [3.0, 0.1]}, "kernel_shift"),
])
def test_each_failed_check_gives_bad_subtraction_with_its_reason(changes, check):
    q = _judge(_with(**changes))
    assert q["verdict"] == "bad_subtraction"
    assert [name for name, c in q["checks"].items() if not c["ok"]] == [check]
    assert q["verdict_reasons"] == [q["checks"][check]["reason"]]


def test_an_image_wide_footprint_and_no_blank_sky_are_bad():
    q = _judge(GOOD, _catalog([30, 20_000], 100))
    assert q["verdict"] == "bad_subtraction" and "2.00% of the image" in q["verdict_reasons"][0]
    q = _judge(GOOD, _catalog([30], 10))
    assert q["verdict"] == "bad_subtraction" and "only 10 of 100 sky sources" in q["verdict_reasons"][0]



def test_sky_sources_are_judged_against_the_room_the_image_has():
    """A small image holds fewer sky-source discs than asked for (a 256² stamp about 40 of a 39-px PSF): half of
    that room is what is asked of it, not half of the 100 requested; footprints over the blank sky still fail."""
    room = dict(GOOD, dia_sources={"sky_source_room": 41})
    q = _judge(room, _catalog([30], 37))
    assert q["verdict"] == "ok" and q["checks"]["sky_sources"]["limit"] == 20.5, q["verdict_reasons"]
    q = _judge(room, _catalog([30], 12))
    assert q["verdict"] == "bad_subtraction" and "only 12 of 41 sky sources" in q["verdict_reasons"][0]
    none = dict(GOOD, dia_sources={"sky_source_room": 0})  # a stamp with no room for one: not judged
    assert _judge(none, _catalog([], 0))["verdict"] == "ok"
    assert _judge(GOOD, _catalog([], 0))["verdict"] == "bad_subtraction"


def test_a_small_clean_subtraction_is_not_judged_bad_for_its_size():
    """The simulated 160² pair (a clean subtraction) has room for fewer than 50 sky sources; the run says so and
    its verdict stays good."""
    pair = simulate_pair(SimConfig(**{**BASE, "size": 160, "n_stars": 60}, sky_subtracted=True))
    result = subtract(pair.science, pair.template, detect=True)
    assert result.metrics["quality"]["verdict"] == "ok", result.metrics["quality"]["verdict_reasons"]
    ds = result.metrics["dia_sources"]
    assert ds["sky_source_room"] < 50 and ds["n_sky_sources"] >= 0.5 * ds["sky_source_room"]


BASE = dict(size=512, seed=31, psf_profile="moffat", moffat_beta=3.5, science_fwhm=3.7, template_fwhm=2.7,
            n_stars=650, n_cosmic_rays=0, n_bad_columns=0)


def _reasons(result):
    q = result.metrics["quality"]
    assert q["verdict"] == "bad_subtraction"
    return {name for name, c in q["checks"].items() if not c["ok"]}


def test_a_pedestal_left_in_is_bad():
    """Skies of 1500 and 1000 counts, the sky stage turned off (and the kernel's background not subtracted)."""
    pair = simulate_pair(SimConfig(**BASE, sky_level=1500.0, template_sky_level=1000.0))
    result = subtract(pair.science, pair.template, config=load_config(None, ["sky.subtract=false"]))
    assert "background_left" in _reasons(result)
    assert result.metrics["quality"]["background_left"]["level"] == pytest.approx(500.0, rel=0.05)


def test_a_misregistered_template_with_the_warp_off_is_bad(tmp_path):
    """The template's grid shifted by 3 px (its WCS says so) and ``--no-warp``: the CLI says why."""
    pair = simulate_pair(SimConfig(**BASE, template_offset=(3.0, 0.0), sky_subtracted=True))
    paths = write_pair(pair, tmp_path / "pair")
    proc = run_cli("subtract", paths["science"], paths["template"], "--out", tmp_path / "out", "--no-warp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bad_subtraction: the PSF-matching kernel shifts the image by 3." in proc.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["quality"]["verdict"] == "bad_subtraction"  # the outputs are written all the same


def test_a_template_psf_twice_too_wide_is_bad():
    pair = simulate_pair(SimConfig(**BASE, sky_subtracted=True))
    psf = pair.template.psf
    wide = dataclasses.replace(psf, fwhm_coeffs=tuple(2 * c for c in psf.fwhm_coeffs))
    result = subtract(pair.science, pair.template.with_attrs(psf=wide))
    assert {"footprint_residual", "photometric_scale"} & _reasons(result)
    assert result.metrics["psf"]["template"]["origin"] == "supplied"
