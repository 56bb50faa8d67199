"""Each bad input gives a one-line InputError/PsfError naming the file and the problem."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from diffim_dag.config import load_config
from diffim_dag.errors import ConfigError, InputError, PsfError
from diffim_dag.exposure import Exposure
from diffim_dag.io.fits import read_exposure, read_psf
from diffim_dag.masks import MaskPlanes


def _check(exc, *needles):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _mef(path, image=True, shapes=((8, 8), (8, 8), (8, 8)), var_value=1.0, image_value=0.0):
    hdus = [fits.PrimaryHDU()]
    if image:
        hdus.append(fits.ImageHDU(np.full(shapes[0], image_value, np.float32), name="IMAGE"))
    hdus.append(fits.ImageHDU(np.zeros(shapes[1], np.int32), fits.Header([("MP_BAD", 0)]), name="MASK"))
    hdus.append(fits.ImageHDU(np.full(shapes[2], var_value, np.float32), name="VARIANCE"))
    fits.HDUList(hdus).writeto(path)
    return path


def test_not_a_fits_file(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("this is not FITS\n" * 20)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "not a FITS file")
    with pytest.raises(InputError) as exc:
        read_exposure(tmp_path / "missing.fits")
    _check(exc, "missing.fits", "no such file")


def test_missing_image_extension(tmp_path):
    p = _mef(tmp_path / "noimage.fits", image=False)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "missing IMAGE extension", "MASK", "VARIANCE")


@pytest.mark.parametrize("which,plane", [(1, "MASK"), (2, "VARIANCE")])
def test_planes_of_different_shapes(tmp_path, which, plane):
    shapes = [(8, 8), (8, 8), (8, 8)]
    shapes[which] = (8, 9)
    p = _mef(tmp_path / "shapes.fits", shapes=tuple(shapes))
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), plane, "(8, 9)", "(8, 8)")


def test_aux_map_of_different_shape(tmp_path):
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    fits.PrimaryHDU(np.ones((9, 8), np.float32)).writeto(tmp_path / "var.fits")
    with pytest.raises(InputError) as exc:
        read_exposure(tmp_path / "img.fits", variance=tmp_path / "var.fits")
    _check(exc, "var.fits", "img.fits", "shape")


def test_all_nan_image(tmp_path):
    p = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32)).writeto(p)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "no finite pixel")
    p2 = _mef(tmp_path / "nan_mef.fits", image_value=np.nan)
    with pytest.raises(InputError) as exc:
        read_exposure(p2)
    _check(exc, str(p2), "no finite pixel")


def test_unknown_mask_plane(tmp_path):
    with pytest.raises(InputError) as exc:
        MaskPlanes().bitmask("BADD")
    _check(exc, "'BADD'", "did you mean 'BAD'")
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["detection.bad_peak_mask_planes=[NO_DATA, SATT]"])
    _check(exc, "bad_peak_mask_planes", "'SATT'", "did you mean 'SAT'")
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    fits.PrimaryHDU(np.zeros((8, 8), np.uint8)).writeto(tmp_path / "m.fits")
    with pytest.raises(InputError) as exc:
        read_exposure(tmp_path / "img.fits", mask=tmp_path / "m.fits", mask_plane="CRR")
    _check(exc, "m.fits", "'CRR'", "did you mean 'CR'")


def test_mask_bits_without_plane_names(tmp_path):
    p = tmp_path / "stray.fits"
    m = np.zeros((8, 8), np.int32)
    m[1, 1] = 1 << 20
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((8, 8), np.float32), name="IMAGE"),
                  fits.ImageHDU(m, fits.Header([("MP_BAD", 0)]), name="MASK"),
                  fits.ImageHDU(np.ones((8, 8), np.float32), name="VARIANCE")]).writeto(p)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "MASK", "[20]")


@pytest.mark.parametrize("value,kind", [(-1.0, "negative"), (np.nan, "NaN")])
def test_bad_variance_in_lsst_mef(tmp_path, value, kind):
    p = tmp_path / "mef.fits"
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.ones((8, 8), np.float32), name="IMAGE"),
            fits.ImageHDU(np.zeros((8, 8), np.int32), name="MASK")]
    var = np.ones((8, 8), np.float32)
    var[2, 5] = value
    hdus.append(fits.ImageHDU(var, name="VARIANCE"))
    fits.HDUList(hdus).writeto(p)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "VARIANCE", kind, "x=5, y=2")


@pytest.mark.parametrize(
    "value,kind,arg",
    [(-1.0, "negative", "variance"), (np.nan, "NaN", "variance"), (np.nan, "NaN", "noise"), (np.nan, "NaN", "weight")],
)
def test_bad_values_in_separate_variance_file(tmp_path, value, kind, arg):
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    aux = np.ones((8, 8), np.float32)
    aux[3, 1] = value
    fits.PrimaryHDU(aux).writeto(tmp_path / "aux.fits")
    with pytest.raises(InputError) as exc:
        read_exposure(tmp_path / "img.fits", **{arg: tmp_path / "aux.fits"})
    _check(exc, "aux.fits", kind, "x=1, y=3")


def test_bad_variance_passed_to_from_arrays():
    var = np.ones((4, 4))
    var[0, 0] = -2
    with pytest.raises(InputError) as exc:
        Exposure.from_arrays(np.zeros((4, 4)), var, source="my-arrays")
    _check(exc, "my-arrays", "VARIANCE", "negative")


def test_two_variance_kinds(tmp_path):
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    with pytest.raises(InputError) as exc:
        read_exposure(tmp_path / "img.fits", variance=tmp_path / "img.fits", noise=tmp_path / "img.fits")
    _check(exc, "img.fits", "at most one")


def test_psf_image_even_size(tmp_path):
    p = tmp_path / "even.fits"
    fits.PrimaryHDU(np.ones((24, 24))).writeto(p)
    with pytest.raises(PsfError) as exc:
        read_psf(p)
    _check(exc, str(p), "even size 24x24", "odd")
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    with pytest.raises(PsfError) as exc:
        read_exposure(tmp_path / "img.fits", psf=p)
    _check(exc, str(p), "even size")


def test_psf_image_zero_sum(tmp_path):
    p = tmp_path / "zero.fits"
    k = np.zeros((25, 25))
    k[12, 12], k[0, 0] = 1.0, -1.0
    fits.PrimaryHDU(k).writeto(p)
    with pytest.raises(PsfError) as exc:
        read_psf(p)
    _check(exc, str(p), "sums to 0", "positive sum")


def test_psf_image_non_finite(tmp_path):
    p = tmp_path / "nanpsf.fits"
    k = np.ones((5, 5))
    k[1, 1] = np.nan
    fits.PrimaryHDU(k).writeto(p)
    with pytest.raises(PsfError) as exc:
        read_psf(p)
    _check(exc, str(p), "non-finite")


def test_several_image_hdus_need_a_choice(tmp_path):
    p = tmp_path / "alert.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((5, 5)), name="SCIENCE"),
                  fits.ImageHDU(np.ones((5, 5)), name="TEMPLATE")]).writeto(p)
    with pytest.raises(InputError) as exc:
        read_exposure(p)
    _check(exc, str(p), "SCIENCE", "TEMPLATE", "hdu=")
    with pytest.raises(InputError) as exc:
        read_exposure(p, hdu="DIFF")
    _check(exc, str(p), "'DIFF'")


@pytest.mark.parametrize("arg", ["noise", "weight"])
def test_non_positive_noise_or_weight_marks_nodata(tmp_path, arg):
    """σ ≤ 0 or weight ≤ 0 means no measurement (the real JWST noise map has one σ < 0 at its edge)."""
    fits.PrimaryHDU(np.ones((8, 8), np.float32)).writeto(tmp_path / "img.fits")
    aux = np.ones((8, 8), np.float32)
    aux[3, 1], aux[4, 4] = -1.0, 0.0
    fits.PrimaryHDU(aux).writeto(tmp_path / "aux.fits")
    e = read_exposure(tmp_path / "img.fits", **{arg: tmp_path / "aux.fits"})
    nodata = (e.mask.values & e.bitmask("NO_DATA")) != 0
    assert set(zip(*np.nonzero(nodata))) == {(3, 1), (4, 4)}
    assert np.all(e.variance.values[nodata] == 0) and np.all(e.variance.values[~nodata] == 1)
