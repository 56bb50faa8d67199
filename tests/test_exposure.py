"""The exposure data model: planes, parent-frame coordinates, lazy tiles, metadata."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.exposure import Exposure, ExposureInfo, PhotoCalib
from diffim_dag.psf import GaussianPsf

from test_io_fits import make_exposure


def test_from_arrays_types_and_nodata(rng):
    img = rng.normal(0, 1, (10, 12)).astype(">f8")  # big-endian float64 in
    img[2, 3] = np.nan
    img[4, 5] = -np.inf
    e = Exposure.from_arrays(img, np.full((10, 12), 2.0), None, xy0=(17, -5))
    im, var, m = e.arrays()
    assert im.dtype == np.float32 and im.dtype.isnative and var.dtype == np.float32 and m.dtype == np.int32
    nodata = (m & e.bitmask("NO_DATA")) != 0
    assert set(zip(*np.nonzero(nodata))) == {(2, 3), (4, 5)}
    assert im[2, 3] == 0 and var[4, 5] == 0 and np.all(np.isfinite(im))
    assert e.info == ExposureInfo() and e.psf is None and e.wcs is None
    # the input array is not modified
    assert np.isnan(img[2, 3])


def test_parent_frame_coordinates_and_subset():
    e = make_exposure(None)
    assert e.xy0 == (17, -5) and e.shape == (40, 52) and e.bbox == (17, 69, -5, 35)
    assert e.center == (0.5 * (17 + 68), 0.5 * (-5 + 34))
    sub = e.subset(20, 30, 0, 7)
    assert sub.xy0 == (20, 0) and sub.shape == (7, 10)
    np.testing.assert_array_equal(sub.image.values, e.image.values[5:12, 3:13])
    # the same parent pixel has the same sky position in both
    np.testing.assert_array_equal(sub.pixel_to_sky(25, 3), e.pixel_to_sky(25, 3))
    assert sub.wcs is e.wcs and sub.info == e.info
    x, y = e.sky_to_pixel(*e.pixel_to_sky(33.25, 12.5))
    assert abs(x - 33.25) < 1e-6 and abs(y - 12.5) < 1e-6


def test_chunk_load_and_copy():
    e = make_exposure(GaussianPsf(sigma_x=2.0))
    lazy = e.chunk((16, 20))
    assert lazy.is_lazy and lazy.chunks == ((16, 16, 8), (20, 20, 12))
    assert lazy.psf is e.psf and lazy.xy0 == e.xy0
    for a, b in zip(lazy.arrays(), e.arrays()):
        np.testing.assert_array_equal(a, b)
    loaded = lazy.load()
    assert not loaded.is_lazy
    c = e.copy()
    c.image.values[0, 0] = 1e9
    assert e.image.values[0, 0] != 1e9
    assert c.wcs is not e.wcs


def test_with_planes_info_attrs():
    e = make_exposure(None)
    e2 = e.with_planes(variance=e.variance.values * 2)
    np.testing.assert_array_equal(e2.variance.values, e.variance.values * 2)
    np.testing.assert_array_equal(e2.image.values, e.image.values)
    e3 = e.with_info(band="r")
    assert e3.info.band == "r" and e.info.band == "i"
    info = e.info
    assert ExposureInfo.from_dict(info.to_dict()) == info
    assert PhotoCalib(zero_point=31.4).flux_per_count == pytest.approx(1.0)
    assert PhotoCalib(zero_point=27.0).magnitude(100.0) == pytest.approx(22.0)


def test_describe_is_json_able():
    import json

    e = make_exposure(GaussianPsf(sigma_x=2.0))
    d = e.describe()
    json.dumps(d)
    assert d["xy0"] == [17, -5] and d["psf"]["fwhm_pixels"] == pytest.approx(2.0 * 2.3548200450309493)
    assert d["planes"]["mask"]["fractions"]["SAT"] > 0
    assert d["wcs"]["ctype"][0].startswith("RA---TAN")


def test_lazy_requires_all_planes():
    import dask.array as da

    from diffim_dag.errors import InputError

    with pytest.raises(InputError, match="lazy"):
        Exposure.from_arrays(da.zeros((8, 8), chunks=4))


def _fresh_python(code: str, env: dict | None = None) -> str:
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    environ.update(env or {})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_numpy_planes_do_not_import_dask_array():
    """xarray's conversion checks import dask.array (0.5 s) to ask whether a plane is one; NumPy planes skip them,
    and the dataset is the one the checked path builds."""
    out = _fresh_python(
        "import sys, numpy as np\n"
        "from diffim_dag.exposure import Exposure\n"
        "a = np.arange(54, dtype=np.float32).reshape(6, 9)\n"
        "e = Exposure.from_arrays(a, a + 1, None, xy0=(3, 4))\n"
        "e = e.with_planes(image=a * 2).subset(4, 8, 5, 9)\n"
        "assert e.bbox == (4, 8, 5, 9) and e.arrays()[0][0, 0] == 2 * a[1, 1]\n"
        "print('dask.array' in sys.modules)\n")
    assert out == "False"
    import xarray as xr

    a = np.arange(54, dtype=np.float32).reshape(6, 9)
    e = Exposure.from_arrays(a, a + 1, None, xy0=(3, 4))
    checked = xr.Dataset({"image": (("y", "x"), a), "variance": (("y", "x"), a + 1),
                          "mask": (("y", "x"), np.zeros(a.shape, np.int32))},
                         coords={"y": np.arange(4, 10), "x": np.arange(3, 12)}, attrs=e.ds.attrs)
    assert e.ds.identical(checked)
    lazy = e.chunk(4).with_planes(image=e.chunk(4).ds["image"].data * 2)
    assert lazy.is_lazy and np.array_equal(lazy.load().arrays()[0], a * 2)


def test_openblas_idle_threads_sleep_unless_numpy_came_first_or_the_user_chose():
    show = "import os\nprint(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
    assert _fresh_python("import diffim_dag\n" + show) == "4"
    assert _fresh_python("import numpy, diffim_dag\n" + show) == "None"
    assert _fresh_python("import diffim_dag\n" + show, {"OPENBLAS_THREAD_TIMEOUT": "20"}) == "20"
