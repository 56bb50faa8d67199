"""LSST-layout MEF and plain FITS: exact round trips and the plain-image readers."""
from __future__ import annotations


import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diffim_dag.exposure import Exposure, ExposureInfo, PhotoCalib
from diffim_dag.io.fits import read_exposure, read_psf, write_exposure
from diffim_dag.io.wcs import wcs_equal, wcs_from_header, wcs_to_header
from diffim_dag.masks import MaskPlanes
from diffim_dag.psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf, VaryingPsf

XY0 = (17, -5)


def _quiet():
    import warnings

    cm = warnings.catch_warnings()
    cm.__enter__()
    warnings.simplefilter("ignore")
    return _Exit(cm)


class _Exit:
    def __init__(self, cm):
        self.cm = cm

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def make_wcs(kind: str = "sip") -> WCS:
    w = WCS(naxis=2)
    if kind == "tpv":
        w.wcs.ctype = ["RA---TPV", "DEC--TPV"]
        w.wcs.set_pv([(1, 1, 1.0096547184981), (1, 4, -7.676233406907e-03), (2, 1, 1.006207625861), (2, 5, -2.5042745e-3)])
    else:
        w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if kind == "sip" else ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [30.123456789012345, 20.987654321098765]
    w.wcs.crval = [318.108280123456789, -66.015730987654321]
    w.wcs.cd = [[-7.288176943228e-05 / 3, 4.277769182710e-07], [4.2e-07, 7.285243193483e-05 / 3]]
    if kind == "sip":
        from astropy.wcs import Sip

        a = np.zeros((3, 3))
        b = np.zeros((3, 3))
        a[2, 0], a[1, 1], a[0, 2] = 1.234567890123e-6, -2.1e-7, 3.3e-7
        b[2, 0], b[1, 1], b[0, 2] = -4.4e-7, 5.55e-6, 1.0e-7
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


def make_exposure(psf=None, *, xy0=XY0, wcs_kind="sip", shape=(40, 52), seed=7) -> Exposure:
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 10.0, shape).astype(np.float32)
    img[3, 4] = np.nan  # → NO_DATA
    var = rng.uniform(50.0, 150.0, shape).astype(np.float32)
    planes = MaskPlanes().with_plane("MY_CUSTOM_LONG_PLANE_NAME")
    mask = np.zeros(shape, np.int32)
    mask[rng.random(shape) < 0.1] |= planes.bitmask("SAT")
    mask[rng.random(shape) < 0.1] |= planes.bitmask("CR")
    mask[rng.random(shape) < 0.1] |= planes.bitmask("MY_CUSTOM_LONG_PLANE_NAME")
    mask[0, 0] |= planes.bitmask("VIGNETTED")  # high bit
    info = ExposureInfo(
        band="i",
        visit=2018080412345,
        detector=37,
        gain=3.984046692260535,
        read_noise=11.83702,
        saturation=46536.1041736873,
        exposure_time=330.0,
        date_obs="2018-08-04T09:23:31.123456",
        mjd_obs=58334.391332446123,
        photo_calib=PhotoCalib(zero_point=31.123456789012345),
        filename="made-up.fits",
        variance_source="VARIANCE plane",
    )
    return Exposure.from_arrays(
        img, var, mask, xy0=xy0, mask_planes=planes, wcs=make_wcs(wcs_kind), psf=psf, info=info
    )


def _grid_images():
    rng = np.random.default_rng(3)
    imgs = np.empty((2, 3, 15, 15))
    for j in range(2):
        for i in range(3):
            imgs[j, i] = GaussianPsf(sigma_x=1.5 + 0.3 * i + 0.2 * j, sigma_y=1.7).kernel_image(size=15)
    return imgs + rng.uniform(0, 1e-6, imgs.shape)


PSFS = {
    "gaussian": GaussianPsf(sigma_x=1.7),
    "elliptical": GaussianPsf(sigma_x=2.3, sigma_y=1.4, theta=0.3),
    "moffat": MoffatPsf(fwhm_pixels=4.1, beta=2.5),
    "image": ImagePsf(GaussianPsf(sigma_x=1.9, sigma_y=1.3, theta=0.7).kernel_image(size=21) + 1e-5),
    "varying": VaryingPsf(profile="moffat", fwhm_coeffs=[4.0, 0.5, -0.25, 0.1], bbox=[17, 69, -5, 35], beta=3.5),
    "varying_gauss": VaryingPsf(
        profile="gaussian", fwhm_coeffs=[3.0, 0.2], bbox=[17, 69, -5, 35], ellipticity=0.2, theta=0.4
    ),
    "grid": GridPsf(_grid_images(), x_nodes=[17.0, 40.0, 68.0], y_nodes=[-5.0, 34.0]),
}


def assert_exposures_equal(a: Exposure, b: Exposure, *, lazy_ok: bool = False) -> None:
    ia, va, ma = a.arrays()
    ib, vb, mb = b.arrays()
    for x, y in ((ia, ib), (va, vb), (ma, mb)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert ib.dtype == np.float32 and vb.dtype == np.float32 and mb.dtype == np.int32
    assert ib.dtype.isnative and vb.dtype.isnative and mb.dtype.isnative
    assert a.xy0 == b.xy0
    np.testing.assert_array_equal(a.ds["x"].values, b.ds["x"].values)
    np.testing.assert_array_equal(a.ds["y"].values, b.ds["y"].values)
    assert a.mask_planes == b.mask_planes
    assert wcs_equal(a.wcs, b.wcs)
    assert a.psf == b.psf
    if a.psf is not None:
        x, y = a.center
        np.testing.assert_array_equal(a.psf.kernel_image(x + 3, y - 2), b.psf.kernel_image(x + 3, y - 2))
    assert a.info.replace(filename=None) == b.info.replace(filename=None)


@pytest.mark.parametrize("name", list(PSFS))
def test_mef_round_trip_exact(tmp_path, name):
    exp = make_exposure(PSFS[name])
    path = write_exposure(exp, tmp_path / f"{name}.fits")
    back = read_exposure(path)
    assert_exposures_equal(exp, back)
    assert back.info.filename == str(path)
    # and again: a second trip is stable
    back2 = read_exposure(write_exposure(back, tmp_path / f"{name}2.fits"))
    assert_exposures_equal(exp, back2)


def test_mef_mask_is_tile_compressed_losslessly_in_the_lsst_order(tmp_path):
    """The MASK extension is RICE tile-compressed (lossless for integers): every bit, the highest ones too, comes
    back, and the extensions keep the LSST order (IMAGE, MASK, VARIANCE by position)."""
    exp = make_exposure()
    img, var, msk = exp.arrays()
    planes = exp.mask_planes
    for i in range(31 - len(planes.as_dict())):  # every bit a mask may use (0–30: the sign bit stays clear) named
        planes = planes.with_plane(f"EXTRA{i}")
    top = max(planes.as_dict().values())
    rng = np.random.default_rng(5)
    bits = np.int32(1) << rng.integers(0, top + 1, size=msk.shape).astype(np.int32)
    wild = np.where(rng.random(msk.shape) < 0.3, bits, 0).astype(np.int32) | msk
    exp = Exposure.from_arrays(img, var, wild, xy0=exp.xy0, mask_planes=planes, wcs=exp.wcs, psf=exp.psf,
                               info=exp.info)
    assert top >= 30 and (wild >= 1 << 29).any()
    path = write_exposure(exp, tmp_path / "e.fits")
    with fits.open(path) as hdul:
        assert [h.name for h in hdul][:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert isinstance(hdul["MASK"], fits.CompImageHDU) and hdul["MASK"].header["EXTTYPE"] == "MASK"
        assert all(hdul["MASK"].header[f"MP_{k}"] == v for k, v in exp.mask_planes.items())
        np.testing.assert_array_equal(hdul[2].data, wild)
    np.testing.assert_array_equal(read_exposure(path).arrays()[2], wild)
    assert np.array_equal(exp.arrays()[2], wild)  # (the caller's plane untouched)


@pytest.mark.parametrize("wcs_kind", ["sip", "tpv", "tan"])
@pytest.mark.parametrize("xy0", [(0, 0), (17, -5), (-123, 4567)])
def test_mef_wcs_and_sky_positions(tmp_path, wcs_kind, xy0):
    exp = make_exposure(xy0=xy0, wcs_kind=wcs_kind)
    back = read_exposure(write_exposure(exp, tmp_path / "e.fits"))
    assert back.xy0 == xy0
    assert wcs_equal(exp.wcs, back.wcs)
    x0, x1, y0, y1 = exp.bbox
    xs = np.array([x0, x1 - 1, x0 + 7, 0.5 * (x0 + x1)])
    ys = np.array([y0, y1 - 1, y1 - 3, 0.5 * (y0 + y1)])
    ra1, dec1 = exp.pixel_to_sky(xs, ys)
    ra2, dec2 = back.pixel_to_sky(xs, ys)
    np.testing.assert_array_equal(ra1, ra2)
    np.testing.assert_array_equal(dec1, dec2)


@pytest.mark.parametrize("xy0", [(0, 0), (17, -5)])
def test_mef_local_fits_wcs_matches_parent_frame(tmp_path, xy0):
    """A plain FITS reader (astropy on the IMAGE HDU, local 1-based pixels) sees the same sky."""
    exp = make_exposure(xy0=xy0, wcs_kind="sip")
    path = write_exposure(exp, tmp_path / "e.fits")
    with fits.open(path) as hdul:
        hdr = hdul["IMAGE"].header
        assert hdr["LTV1"] == -xy0[0] and hdr["LTV2"] == -xy0[1]
        local = WCS(hdr)  # primary WCS only: the 'A' key is the PHYSICAL origin
    ra_l, dec_l = local.all_pix2world([0, 10], [0, 5], 0)
    ra_p, dec_p = exp.pixel_to_sky(np.array([0, 10]) + xy0[0], np.array([0, 5]) + xy0[1])
    np.testing.assert_allclose(ra_l, ra_p, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dec_l, dec_p, rtol=0, atol=1e-10)
    with fits.open(path) as hdul:
        with pytest.warns(Warning) if False else _quiet():
            phys = WCS(hdul["IMAGE"].header, key="A")
    np.testing.assert_allclose(phys.wcs_pix2world([[0, 0]], 0)[0], xy0)


def test_wcs_header_alternate_a_keys_are_ignored():
    w = make_wcs("tan")
    hdr = wcs_to_header(w, (0, 0))
    del hdr["DDWCS"]
    for k, v in {"CTYPE1A": "LINEAR", "CTYPE2A": "LINEAR", "CRPIX1A": 1.0, "CRPIX2A": 1.0, "CRVAL1A": 5.0,
                 "CRVAL2A": 6.0, "CUNIT1A": "PIXEL", "CUNIT2A": "PIXEL", "WCSNAMEA": "PHYSICAL",
                 "CD1_1A": 1.0, "CD2_2A": 1.0, "CDELT1A": 1.0, "CDELT2A": 1.0, "PC1_1A": 1.0}.items():
        hdr[k] = v
    back = wcs_from_header(hdr, (0, 0))
    assert back is not None
    np.testing.assert_allclose(back.wcs.crval, w.wcs.crval)
    np.testing.assert_allclose(back.pixel_to_world_values(3.0, 4.0), w.pixel_to_world_values(3.0, 4.0), rtol=0, atol=1e-9)
    assert not any(k.endswith("A") and k[:2] in ("CD", "PC", "CR", "CT", "CU", "WC") for k in back.to_header(relax=True))
    # a header whose only WCS is the PHYSICAL one has no celestial WCS
    only_a = fits.Header([("CTYPE1A", "LINEAR"), ("CTYPE2A", "LINEAR"), ("CRVAL1A", 5.0), ("WCSNAMEA", "PHYSICAL")])
    assert wcs_from_header(only_a) is None
    # other alternate-A cards are dropped too; primary keys that merely end in "A" are kept
    h2 = wcs_to_header(w, (0, 0))
    h2["RADESYSA"] = "ICRS"
    h2["LONPOLEA"] = 180.0
    assert wcs_from_header(h2) is not None


def test_mef_without_psf_or_wcs(tmp_path):
    exp = make_exposure(None).with_attrs(wcs=None)
    back = read_exposure(write_exposure(exp, tmp_path / "e.fits"))
    assert back.wcs is None and back.psf is None
    assert_exposures_equal(exp, back)


def test_mef_variance_plane_is_kept_not_rebuilt(tmp_path):
    """The stored VARIANCE plane is the variance: no model replaces it on read."""
    exp = make_exposure(None).with_info(variance_source=None)
    back = read_exposure(write_exposure(exp, tmp_path / "e.fits"))
    np.testing.assert_array_equal(back.variance.values, exp.variance.values)
    assert back.info.variance_source == "VARIANCE plane"


def test_mef_big_endian_and_scaled_planes(tmp_path):
    """LSST files written by other software: big-endian float64 image, int16 mask, scaled variance."""
    rng = np.random.default_rng(1)
    img = rng.normal(0, 1, (12, 9)).astype(">f8")
    var = np.full((12, 9), 2.5, ">f4")
    msk = np.zeros((12, 9), ">i2")
    msk[2, 2] = 1 << 3
    hdr = fits.Header([("MP_BAD", 0), ("MP_CR", 3), ("MP_SAT", 1)])
    hdr["HIERARCH MP_NO_DATA"] = 8
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(img, name="IMAGE"), fits.ImageHDU(msk, hdr, name="MASK"),
                         fits.ImageHDU(var, name="VARIANCE")])
    hdul.writeto(tmp_path / "be.fits")
    e = read_exposure(tmp_path / "be.fits")
    im, v, m = e.arrays()
    assert im.dtype == np.float32 and im.dtype.isnative and m.dtype == np.int32
    np.testing.assert_array_equal(im, img.astype(np.float32))
    assert m[2, 2] == 8 and e.mask_planes["CR"] == 3
    assert e.info.variance_source == "VARIANCE plane"


# ---------------------------------------------------------------- plain images


def _plain(tmp_path, data, name="plain.fits", **cards):
    hdr = fits.Header()
    for k, v in cards.items():
        hdr[k] = v
    path = tmp_path / name
    fits.PrimaryHDU(data, hdr).writeto(path)
    return path


def test_plain_scaled_integer_image(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(4, 6) * 3 - 10
    hdu = fits.PrimaryHDU(data.copy())  # scale() rewrites the array in place
    hdu.scale("int16", bzero=1000, bscale=0.5)
    hdu.writeto(tmp_path / "s.fits")
    e = read_exposure(tmp_path / "s.fits", variance=_plain(tmp_path, np.ones((4, 6)), "v.fits"))
    assert e.image.dtype == np.float32 and e.image.dtype.isnative
    np.testing.assert_array_equal(e.image.values, data.astype(np.float32))


def test_plain_saturation_and_nonfinite(tmp_path, caplog):
    rng = np.random.default_rng(5)
    data = rng.normal(1000, 20, (64, 64))
    data[10, 10] = 50000
    data[11, 10] = 60000
    data[20, 30] = np.nan
    data[21, 30] = np.inf
    for key in ("SATURATE", "SATURATN"):
        path = _plain(tmp_path, data, f"{key}.fits", **{key: 45000.0, "GAIN": 2.0, "RDNOISE": 5.0})
        e = read_exposure(path)
        sat = (e.mask.values & e.bitmask("SAT")) != 0
        nod = (e.mask.values & e.bitmask("NO_DATA")) != 0
        assert set(zip(*np.nonzero(sat))) == {(10, 10), (11, 10)}
        assert set(zip(*np.nonzero(nod))) == {(20, 30), (21, 30)}
        assert e.info.saturation == 45000.0
        assert np.all(np.isfinite(e.image.values)) and np.all(e.variance.values[nod] == 0)
        assert np.all(np.isfinite(e.variance.values)) and np.all(e.variance.values >= 0)


def test_plain_with_variance_noise_weight_maps(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.normal(0, 1, (16, 16))
    sig = rng.uniform(0.5, 2.0, (16, 16))
    img = _plain(tmp_path, data)
    ev = read_exposure(img, variance=_plain(tmp_path, sig**2, "v.fits"))
    en = read_exposure(img, noise=_plain(tmp_path, sig, "n.fits"))
    w = 1 / sig**2
    w[0, :3] = 0.0
    ew = read_exposure(img, weight=_plain(tmp_path, w, "w.fits"))
    np.testing.assert_allclose(ev.variance.values, (sig**2).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(en.variance.values, (sig**2).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(ew.variance.values[1:], (sig**2)[1:], rtol=1e-5)
    assert np.all((ew.mask.values[0, :3] & ew.bitmask("NO_DATA")) != 0)
    assert np.all(ew.variance.values[0, :3] == 0)
    assert (ev.info.variance_source, en.info.variance_source, ew.info.variance_source) == (
        "VARIANCE map", "noise map", "weight map")


def test_plain_with_mask_files(tmp_path):
    data = np.zeros((8, 8)) + 1.0
    img = _plain(tmp_path, data)
    flag = np.zeros((8, 8), np.uint8)
    flag[1, 2] = 1
    e = read_exposure(img, mask=_plain(tmp_path, flag, "m.fits"), mask_plane="SUSPECT", variance=img)
    assert e.mask.values[1, 2] == e.bitmask("SUSPECT") and e.mask.values.sum() == e.bitmask("SUSPECT")
    # a bit-plane mask with MP_* keywords and a high bit (exactness beyond float32's 24-bit mantissa)
    bits = np.zeros((8, 8), np.int32)
    bits[3, 3] = (1 << 30) | (1 << 0)
    hdu = fits.PrimaryHDU(bits)
    hdu.header["MP_BAD"] = 0
    hdu.header["HIERARCH MP_MYPLANE"] = 30
    hdu.writeto(tmp_path / "mp.fits")
    e2 = read_exposure(img, mask=tmp_path / "mp.fits", variance=img)
    assert e2.mask_planes["MYPLANE"] == 30
    assert e2.mask.values[3, 3] == (1 << 30) | 1 and e2.mask.dtype == np.int32


def test_plain_file_with_wcs_and_xy0(tmp_path):
    w = make_wcs("tan")
    hdr = wcs_to_header(w, (0, 0))
    del hdr["DDWCS"]
    path = tmp_path / "w.fits"
    fits.PrimaryHDU(np.ones((10, 12)), hdr).writeto(path)
    e = read_exposure(path, xy0=(17, -5), variance=path)
    assert e.xy0 == (17, -5)
    # parent pixel (17, -5) is the file's first pixel
    np.testing.assert_allclose(e.pixel_to_sky(17, -5), w.all_pix2world(0, 0, 0), rtol=0, atol=1e-9)


def test_read_psf_plain_image_and_diffim_extension(tmp_path):
    k = GaussianPsf(sigma_x=2.0).kernel_image(size=25) * 7.0
    fits.PrimaryHDU(k).writeto(tmp_path / "psf.fits")
    p = read_psf(tmp_path / "psf.fits")
    assert isinstance(p, ImagePsf)
    np.testing.assert_allclose(p.kernel_image(size=25), k / k.sum(), rtol=1e-12, atol=1e-15)
    exp = make_exposure(PSFS["moffat"])
    path = write_exposure(exp, tmp_path / "e.fits")
    assert read_psf(path) == PSFS["moffat"]


def test_write_is_atomic_and_overwrite_flag(tmp_path):
    exp = make_exposure(None)
    path = write_exposure(exp, tmp_path / "e.fits")
    from diffim_dag.errors import InputError

    with pytest.raises(InputError, match="exists"):
        write_exposure(exp, path, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["e.fits"]  # no temporary left behind


def test_writers_never_byte_swap_the_callers_arrays(tmp_path, monkeypatch):
    """astropy writes a writeable little-endian array by swapping it in place and back; a single subtraction
    writes its planes while detection reads them, so the writers hand astropy read-only arrays and every
    array of the exposure (planes and PSF stamps) holds its values while the file is written."""
    from astropy.io.fits.file import _File

    from diffim_dag.io.fits import write_plain_image, write_psf

    exp = make_exposure(PSFS["grid"])
    img, var, msk = exp.arrays()
    stamps = exp.psf.to_payload()[1]
    watched = [(a, a.copy()) for a in (img, var, msk, stamps)]
    writes = []
    real = _File.writearray

    def checked(self, array):
        writes.append(array.nbytes)
        for a, before in watched:
            np.testing.assert_array_equal(a, before)
        return real(self, array)

    monkeypatch.setattr(_File, "writearray", checked)
    back = read_exposure(write_exposure(exp, tmp_path / "e.fits"))
    write_plain_image(exp, tmp_path / "plain.fits")
    write_psf(exp.psf, tmp_path / "psf.fits")
    assert len(writes) >= 6
    assert_exposures_equal(exp, back)
    assert img.flags.writeable and var.flags.writeable and msk.flags.writeable  # the caller's arrays as they were


def test_a_frame_without_wcs_does_not_import_astropy_wcs(tmp_path):
    """astropy.wcs brings astropy.coordinates (~0.25 s of every command's start-up): a plain frame without WCS
    keywords is read without it; one with them gets its WCS."""
    import subprocess
    import sys

    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.ones((40, 50), np.float32)).writeto(plain)
    with_wcs = write_exposure(make_exposure(None), tmp_path / "wcs.fits")
    code = ("import sys; from diffim_dag.io.fits import read_exposure; "
            f"e = read_exposure({str(plain)!r}); print(e.wcs is None, 'astropy.wcs' in sys.modules); "
            f"e = read_exposure({str(with_wcs)!r}); print(e.wcs is not None, 'astropy.wcs' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "True", "True"]
