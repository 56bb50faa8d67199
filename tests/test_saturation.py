"""Saturation found in the pixels when the header has no SATURATE keyword (issue 16)."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from diffim_dag.io import read_exposure
from diffim_dag.kernels.saturation import find_saturation, integer_limit
from diffim_dag.psf import GaussianPsf
from diffim_dag.sim import add_sources


def _stars(peak_clip=None, *, seed=0, size=200):
    rng = np.random.default_rng(seed)
    img = rng.normal(1000.0, 10.0, (size, size))
    add_sources(img, [50, 120, 160], [60, 140, 40], [2e6, 5e5, 3e4], GaussianPsf.from_fwhm(3.0))
    if peak_clip is not None:
        img = np.minimum(img, peak_clip)
    return img


def test_integer_limits():
    assert integer_limit(16, 32768.0, 1.0) == 65535.0
    assert integer_limit(16) == 32767.0
    assert integer_limit(8) == 255.0
    assert integer_limit(-32) is None


def test_pixels_at_the_integer_limit_are_saturated():
    img = _stars(65535.0)
    found = find_saturation(img, type_limit=65535.0)
    assert found.level == pytest.approx(65534.5) and "integer limit" in found.rule
    assert found.mask[60, 50] and not found.mask[40, 160]


def test_flat_topped_stars_of_a_float_image_are_saturated():
    img = _stars(61234.0) * 0.98  # a flat field scales the clip level
    found = find_saturation(img)
    assert "plateau" in found.rule and found.n_stars >= 1
    assert found.level < 61234.0 * 0.98 and found.level > 55000.0
    assert found.mask[60, 50] and not found.mask[40, 160]


def test_unsaturated_images_and_hot_columns_are_not_saturated():
    assert find_saturation(_stars()).level is None
    img = _stars()
    img[:, 100] = 40000.0  # a hot column: flat, but one pixel wide
    assert find_saturation(img).level is None


def test_a_faint_flat_top_is_noise_not_saturation():
    rng = np.random.default_rng(3)
    img = rng.normal(3000.0, 90.0, (200, 200))
    add_sources(img, [100], [100], [4e4], GaussianPsf.from_fwhm(6.0))  # peak ~1000 over a noisy sky
    assert find_saturation(img).level is None


def test_uint16_file_without_saturate_gets_a_sat_plane(tmp_path):
    img = np.clip(_stars(), 0, 65535).astype(np.uint16)
    hdu = fits.PrimaryHDU(img.astype(np.int32) - 32768)
    hdu.header["BZERO"] = 32768
    hdu.header["BSCALE"] = 1
    path = tmp_path / "raw.fits"
    fits.HDUList([fits.PrimaryHDU((img.astype(np.int32) - 32768).astype(np.int16))]).writeto(path)
    with fits.open(path, mode="update") as h:
        h[0].header["BZERO"] = 32768
    e = read_exposure(path)
    assert e.info.saturation == pytest.approx(65534.5)
    assert "integer limit" in e.info.saturation_source
    sat = (e.arrays()[2] & e.bitmask("SAT")) != 0
    assert sat[60, 50] and not sat[40, 160]
