"""The stars' aperture flux ratio (ZOGY's flux ratio without zero points; the AL verdict's photometric check) on
fields of galaxies, whose light the point-source aperture correction does not describe."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.sim import SimConfig, simulate_pair
from diffim_dag.stages.photometry import aperture_flux_ratio, captured_fraction

KAPPA = 1.1


def _galaxy_field(science_fwhm: float, template_fwhm: float, seed: int = 11):
    """A sky-subtracted 512² pair on one grid: 120 exponential discs (half-light radii 2–6 px) and 6 stars, Moffat
    PSFs (the true models attached), science counts 1.1 × the template's."""
    cfg = SimConfig(size=512, seed=seed, n_stars=6, n_galaxies=120, galaxy_flux=(2e4, 3e5), galaxy_radius=(2.0, 6.0),
                    psf_profile="moffat", science_fwhm=science_fwhm, template_fwhm=template_fwhm, flux_scale=KAPPA,
                    sky_subtracted=True, template_offset=(0.0, 0.0), science_fwhm_gradient=0.0,
                    template_fwhm_gradient=0.0, n_transients=0, n_variables=0, n_movers=0, n_negative_transients=0,
                    n_cosmic_rays=0, n_saturated=0, n_bad_columns=0)
    pair = simulate_pair(cfg)
    constant = pair.truth[pair.truth["kind"].isin(["star", "galaxy"])]
    return pair, constant["x"].to_numpy(), constant["y"].to_numpy()


@pytest.mark.parametrize("science_fwhm, template_fwhm", [(3.5, 2.5), (2.5, 3.5)], ids=["science-broader",
                                                                                       "template-broader"])
def test_flux_ratio_of_a_galaxy_field_is_not_biased_towards_the_sharper_image(science_fwhm, template_fwhm):
    pair, x, y = _galaxy_field(science_fwhm, template_fwhm)
    ratio, table = aperture_flux_ratio(pair.science, pair.template, x, y, min_snr=30.0)
    assert int(table["used"].sum()) >= 60
    assert abs(ratio / KAPPA - 1.0) < 0.02, ratio
    # the point-source aperture (2 × the larger FWHM) for every source: the galaxies' ratios lean ~3 % towards the
    # sharper image, whose aperture holds more of their light than the PSF's correction allows for
    fixed, _ = aperture_flux_ratio(pair.science, pair.template, x, y, min_snr=30.0, radius=2.0 * max(science_fwhm,
                                                                                                      template_fwhm))
    sharper_science = science_fwhm < template_fwhm
    assert (fixed / KAPPA - 1.0) * (1 if sharper_science else -1) > 0.025, fixed
    # the galaxies got the larger apertures (most stars here are faint: S/N below the cut)
    kinds = pair.truth[pair.truth["kind"].isin(["star", "galaxy"])]["kind"].to_numpy()
    base = 2.0 * max(science_fwhm, template_fwhm)
    radii = table["radius"].to_numpy()
    assert radii.min() == pytest.approx(base) and radii.max() <= 3.0 * base + 1e-9
    assert np.median(radii[(kinds == "galaxy") & table["used"].to_numpy()]) > 1.4 * base


def test_star_field_keeps_the_point_source_aperture():
    """Stars only (150 on 384²: crowded): every aperture is 2 × the larger FWHM, the ratios those of that aperture."""
    cfg = SimConfig(size=384, seed=5, n_stars=150, star_min_flux=3000.0, psf_profile="moffat", science_fwhm=3.2,
                    template_fwhm=2.4, flux_scale=KAPPA, sky_subtracted=True, template_offset=(0.0, 0.0),
                    science_fwhm_gradient=0.0, template_fwhm_gradient=0.0, n_transients=0, n_variables=0, n_movers=0,
                    n_negative_transients=0, n_cosmic_rays=0, n_saturated=0, n_bad_columns=0)
    pair = simulate_pair(cfg)
    stars = pair.truth[pair.truth["kind"] == "star"]
    x, y = stars["x"].to_numpy(), stars["y"].to_numpy()
    ratio, table = aperture_flux_ratio(pair.science, pair.template, x, y, min_snr=30.0)
    assert int(table["used"].sum()) >= 30
    assert np.all(table["radius"].to_numpy() == 2.0 * 3.2)
    assert ratio == pytest.approx(KAPPA, rel=0.015)
    fixed, fixed_table = aperture_flux_ratio(pair.science, pair.template, x, y, min_snr=30.0, radius=6.4)
    assert fixed == ratio and fixed_table.equals(table)


def test_captured_fraction_of_many_radii_is_each_radius_in_turn():
    yy, xx = np.mgrid[-40:41, -40:41]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 2.0**2))
    radii = np.array([3.0, 4.5, 9.0, 20.0])
    many = captured_fraction(psf, radii)
    assert many.shape == radii.shape
    assert many == pytest.approx([captured_fraction(psf, float(r)) for r in radii], rel=1e-12)
    assert np.all(np.diff(many) > 0) and many[-1] == pytest.approx(1.0, abs=1e-3)
