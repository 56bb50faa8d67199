"""Every real file in ../shared/data reads into a valid exposure (skipped when the folder is absent)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from diffim_dag.exposure import Exposure
from diffim_dag.io.fits import read_exposure, write_exposure
from diffim_dag.psf import ImagePsf, measure_fwhm

from test_io_fits import assert_exposures_equal

pytestmark = pytest.mark.realdata


def assert_valid(e: Exposure, *, wcs: bool, psf: bool):
    img, var, msk = e.arrays()
    nodata = (msk & e.bitmask("NO_DATA")) != 0
    assert img.dtype == np.float32 and var.dtype == np.float32 and msk.dtype == np.int32
    assert img.dtype.isnative and var.dtype.isnative
    assert np.all(np.isfinite(img[~nodata]))
    assert np.all(np.isfinite(var)) and np.all(var >= 0)
    assert np.all(var[~nodata] > 0)
    assert (~nodata).any()
    assert (e.wcs is not None) == wcs
    assert (e.psf is not None) == psf
    if e.wcs is not None:
        ra, dec = e.pixel_to_sky(*e.center)
        assert np.isfinite(ra) and np.isfinite(dec)
    assert e.info.variance_source is not None


def test_decam_all_inputs(shared_data, tmp_path):
    files = sorted((shared_data / "decam-n6" / "input").glob("*.fits"))
    assert len(files) == 10
    for f in files:
        e = read_exposure(f)
        assert_valid(e, wcs=True, psf=False)
        assert e.info.band == "i" and e.info.detector == 37 and e.info.gain == pytest.approx(4.0, rel=0.1)
        assert e.info.variance_source == "measured_sky+gain"  # sky-subtracted stamps
        # astropy holds TPV as TAN + a polynomial distortion and writes it back as TPV
        assert e.wcs.to_header(relax=True)["CTYPE1"] == "RA---TPV"
    # the manifest's known signal sits where it says (common WCS grid)
    x, y = e.sky_to_pixel(318.10828, -66.01573)
    assert abs(x - 129) < 1.5 and abs(y - 128) < 1.5
    # a real file survives the MEF round trip exactly (TPV WCS, sky positions)
    back = read_exposure(write_exposure(e, tmp_path / "decam.fits"))
    assert_exposures_equal(e, back)


def _jwst(shared_data):
    root = shared_data / "jwst-nircam-a2744"
    out = []
    for f in sorted((root / "input").glob("*.fits")):
        stem = f.name[: -len(".fits")]
        out.append((f, root / "noise" / f"{stem}.noise.fits", root / "psf" / f"{stem}.WebbPSF.fits"))
    assert len(out) == 2
    return out


def test_jwst_science_and_reference(shared_data):
    for image, noise, psf in _jwst(shared_data):
        e = read_exposure(image, noise=noise, psf=psf)
        assert_valid(e, wcs=True, psf=True)
        assert e.info.variance_source == "noise map"
        assert isinstance(e.psf, ImagePsf)
        k = e.psf.kernel_image(*e.center)
        assert k.shape[0] % 2 == 1 and abs(k.sum() - 1) < 1e-12
        assert 1.8 < e.psf.fwhm() < 3.0  # manifest: ~2.5 px (measured 2.14–2.16)
        assert measure_fwhm(k) == pytest.approx(e.psf.fwhm(), rel=0.02)
        assert np.sqrt(np.median(e.variance.values)) == pytest.approx(0.0043, rel=0.5)
        ra, dec = e.pixel_to_sky(*e.center)
        assert abs(ra - 3.58) < 0.2 and abs(dec + 30.4) < 0.2  # Abell 2744


def test_jwst_with_sfft_mask(shared_data):
    image, noise, psf = _jwst(shared_data)[1]
    mask = shared_data / "jwst-nircam-a2744" / "mask" / f"{image.name[:-5]}.mask4sfft.fits"
    e = read_exposure(image, noise=noise, psf=psf, mask=mask, mask_plane="SUSPECT")
    assert_valid(e, wcs=True, psf=True)
    frac = e.mask_planes.describe(e.mask.values)["SUSPECT"]
    assert 0 <= frac <= 1


def test_ztf_all_alert_stamps(shared_data):
    files = sorted((shared_data / "ztf-alert-stamps" / "alerts").glob("*.fits.gz"))
    with open(shared_data / "ztf-alert-stamps" / "alerts.csv") as fh:
        n_rows = sum(1 for _ in csv.DictReader(fh))
    assert len(files) == n_rows == 16
    for f in files:
        for hdu in ("SCIENCE", "TEMPLATE"):
            e = read_exposure(f, hdu=hdu)
            assert_valid(e, wcs=False, psf=False)
            # no GAIN in the stamps: an effective gain from the sky they still hold, or the sky noise alone
            assert e.info.variance_source.startswith(("measured_sky+effective_gain", "measured_sky"))
            assert e.shape[0] <= 63 and e.shape[1] <= 63
