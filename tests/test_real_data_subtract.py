"""AL subtraction of real DECam data (skipped when ../shared/data is absent).

Science DEC-OBS04a against template DEC-OBS18a: two epochs on one grid, sky-subtracted, with the
FWHM (px) in the headers.  The manifest documents a positive residual at (129, 128) and a bright
unsaturated star at (60, 181); SFFT's decorrelated difference of the two 5-exposure stacks ships
with the data for comparison.
"""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from diffim_dag.io import read_exposure
from diffim_dag.noise import robust_std
from diffim_dag.pipeline import subtract_exposures
from diffim_dag.psf import GaussianPsf


def _load(shared_data, name):
    path = shared_data / "decam-n6" / "input" / f"DEC-{name}.mini.fits"
    exposure = read_exposure(path)
    return exposure.with_attrs(psf=GaussianPsf.from_fwhm(fits.getheader(path)["FWHM"]))


def _psf_fit(image, variance, psf, x, y, half=10):
    sl = (slice(y - half, y + half + 1), slice(x - half, x + half + 1))
    w = 1.0 / variance[sl]
    flux = (psf * image[sl] * w).sum() / (psf**2 * w).sum()
    return flux, flux * np.sqrt((psf**2 * w).sum())


def footprint_residual(difference, science, x, y, radius):
    """Σ|D − sky| over r ≤ radius less its pure-noise expectation, over Σ|S − sky| (annulus skies)."""
    yy, xx = np.mgrid[0 : difference.shape[0], 0 : difference.shape[1]]
    rr = np.hypot(xx - x, yy - y)
    inner, ann = rr <= radius, (rr > radius + 3) & (rr < radius + 8)
    d = difference - np.median(difference[ann])
    s = science - np.median(science[ann])
    noise_floor = inner.sum() * robust_std(difference[ann]) * np.sqrt(2 / np.pi)
    return (np.abs(d[inner]).sum() - noise_floor) / np.abs(s[inner]).sum()


@pytest.fixture(scope="module")
def decam(shared_data):
    science = _load(shared_data, "OBS04a")
    template = _load(shared_data, "OBS18a")
    return science, template, subtract_exposures(science, template)


@pytest.mark.realdata
def test_known_source_stands_out(decam):
    _, _, result = decam
    img, var, _ = result.difference.arrays()
    psf = result.difference.psf.kernel_image(size=21)
    flux, snr = _psf_fit(img, var, psf, 129, 128)
    assert flux > 0 and snr > 8


@pytest.mark.realdata
def test_noise_is_described_by_the_variance_plane(decam):
    _, _, result = decam
    img, var, msk = result.difference.arrays()
    yy, xx = np.mgrid[0:256, 0:256]
    far = (msk == 0) & (np.hypot(xx - 129, yy - 128) > 15) & (np.hypot(xx - 60, yy - 181) > 20)
    assert robust_std((img / np.sqrt(var))[far]) == pytest.approx(1.0, abs=0.1)


@pytest.mark.realdata
def test_bright_star_residual_below_sfft(decam, shared_data):
    science, _, result = decam
    refs = shared_data / "decam-n6" / "sfft_reference_outputs"
    sfft_diff = fits.getdata(refs / "FinalDifference.DeCorr.fits").astype(np.float64)
    sfft_sci = fits.getdata(refs / "Stack-DEC-OBS04.fits").astype(np.float64)
    radius = 2 * science.psf.fwhm()
    ours = footprint_residual(result.difference.arrays()[0], science.arrays()[0], 60, 181, radius)
    theirs = footprint_residual(sfft_diff, sfft_sci, 60, 181, radius)
    assert ours < theirs
    # the star is not one of our kernel stars (S/N > 500): no fitting on itself
    cands = result.kernel_fit.candidates
    used = cands[cands["status"] == "used"]
    assert not (np.hypot(used["x"] - 60, used["y"] - 181) < 3).any()
    assert result.metrics["kernel"]["spatial_orders_reduced"]  # only a handful of stars on a 256² stamp
