"""The issue-16 acceptance tests of one matching direction, imported by ``test_accept_convolve_template.py`` and
``test_accept_convolve_science.py`` (each defines the ``direction`` fixture; two modules, so that the two
directions run on two pytest workers): a 2048² plain-FITS pair with raw sky and a flux scale of 1.1, through
the CLI with no flags (PSFs estimated), for every method; the same pair with the true PSFs supplied; the
estimated PSFs against the truth."""
from __future__ import annotations

import pytest

from acceptance import DIRECTIONS, assert_user_criteria, make_pair, subtract

#: What each direction's kernel does: the AL mode and the photometric scale read off the kernel sum
#: (science counts per template count: κ in convolveTemplate, 1/κ in convolveScience).
MODES = {"template": ("convolveTemplate", lambda k: k), "science": ("convolveScience", lambda k: 1.0 / k)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, direction):
    return make_pair(tmp_path_factory.mktemp(f"accept-{direction}") / "pair", direction)


@pytest.fixture(scope="module")
def al(pair):
    return subtract(pair, pair.parent / "al")


def test_al_no_flags(al, direction):
    mode, scale = MODES[direction]
    assert al.metrics["mode"] == mode
    assert_user_criteria(al)
    for role in ("science", "template"):
        assert al.metrics["psf"][role]["origin"] == "estimated"
        assert al.metrics["sky"][role]["level_median"] > 900  # raw sky, removed
    assert abs(scale(al.metrics["kernel"]["kernel_sum_center"]) - 1.1) < 0.02


def test_true_psf_supplied_matches_the_estimated_run(pair, al):
    true = subtract(pair, pair.parent / "true_psf", "--science-psf", pair / "science_psf.fits",
                    "--template-psf", pair / "template_psf.fits")
    assert true.metrics["psf"]["science"]["origin"] == "supplied"
    assert_user_criteria(true)
    assert abs(true.score.completeness - al.score.completeness) <= 0.02
    assert abs(true.score.flux_ratio - al.score.flux_ratio) <= 0.01


@pytest.mark.parametrize("method", ["al-preconvolve", "zogy"])
def test_score_methods_no_flags(pair, method):
    run = subtract(pair, pair.parent / method, "--method", method)
    assert_user_criteria(run, residual=False)


def test_estimated_psfs_within_3_percent_of_the_truth(pair, direction):
    from diffim_dag.io import read_exposure
    from diffim_dag.io.fits import read_psf
    from diffim_dag.stages.psf import measure_psf

    assert direction in DIRECTIONS
    for role in ("science", "template"):
        exposure = read_exposure(pair / f"{role}.fits")
        truth = read_psf(pair / f"{role}_psf.fits")
        model = measure_psf(exposure, role=role).psf
        n = exposure.shape[0] - 1
        for x, y in ((n / 2, n / 2), (0, 0), (n, 0), (0, n), (n, n)):
            assert abs(model.fwhm(x, y) / truth.fwhm(x, y) - 1) < 0.03, (role, x, y)
