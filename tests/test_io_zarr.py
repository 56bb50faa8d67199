"""Zarr tile stores: exact, lazy round trips with the requested tile chunks."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.errors import InputError
from diffim_dag.io.fits import read_exposure, write_exposure
from diffim_dag.io.wcs import wcs_equal
from diffim_dag.io.zarr_store import read_zarr, write_zarr

from test_io_fits import PSFS, assert_exposures_equal, make_exposure


@pytest.mark.parametrize("name", list(PSFS))
def test_zarr_round_trip_exact(tmp_path, name):
    exp = make_exposure(PSFS[name])
    back = read_zarr(write_zarr(exp, tmp_path / "e.zarr", tile=16))
    assert back.is_lazy
    assert_exposures_equal(exp, back)


@pytest.mark.parametrize("tile,expected", [(16, ((16, 16, 8), (16, 16, 16, 4))), ((8, 25), ((8,) * 5, (25, 25, 2))),
                                           (64, ((40,), (52,)))])
def test_zarr_reads_lazily_with_tile_chunks(tmp_path, tile, expected):
    exp = make_exposure(None)
    back = read_zarr(write_zarr(exp, tmp_path / "e.zarr", tile=tile))
    assert back.is_lazy
    for plane in ("image", "variance", "mask"):
        assert back.ds[plane].chunks == expected
    assert back.chunks == expected
    assert back.ds["image"].dtype == np.float32 and back.ds["mask"].dtype == np.int32
    # the lazy exposure still knows its place
    assert back.xy0 == (17, -5) and back.bbox == exp.bbox


def test_zarr_default_and_existing_chunks(tmp_path):
    exp = make_exposure(None)
    back = read_zarr(write_zarr(exp, tmp_path / "a.zarr"))
    assert back.chunks == ((40,), (52,))
    # a ragged dask chunking is regularized (zarr needs equal chunks but the last)
    ragged = exp.chunk(16)
    ragged = type(ragged)(ragged.ds.chunk({"x": (10, 30, 12)}))
    back2 = read_zarr(write_zarr(ragged, tmp_path / "b.zarr"))
    assert_exposures_equal(exp, back2)
    assert back2.chunks[1][0] == 10


def test_zarr_sky_positions_and_fits_to_zarr(tmp_path):
    exp = make_exposure(PSFS["grid"], wcs_kind="tpv")
    via_fits = read_exposure(write_exposure(exp, tmp_path / "e.fits"))
    back = read_zarr(write_zarr(via_fits, tmp_path / "e.zarr", tile=(20, 26)))
    assert_exposures_equal(exp, back)
    xs, ys = np.array([17, 40, 68]), np.array([-5, 10, 34])
    for a, b in zip(exp.pixel_to_sky(xs, ys), back.pixel_to_sky(xs, ys)):
        np.testing.assert_array_equal(a, b)
    assert wcs_equal(exp.wcs, back.wcs)
    # and back to FITS from the lazy exposure
    again = read_exposure(write_exposure(back, tmp_path / "f.fits"))
    assert_exposures_equal(exp, again)


def test_zarr_overwrite_is_atomic(tmp_path):
    exp = make_exposure(None)
    path = write_zarr(exp, tmp_path / "e.zarr", tile=16)
    exp2 = exp.with_planes(image=exp.image.values + 1)
    write_zarr(exp2, path, tile=16)
    np.testing.assert_array_equal(read_zarr(path).image.values, exp2.image.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.zarr"]


def test_zarr_bad_stores(tmp_path):
    with pytest.raises(InputError, match="no such zarr store") as exc:
        read_zarr(tmp_path / "missing.zarr")
    assert "\n" not in str(exc.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError) as exc:
        read_zarr(tmp_path / "plain")
    assert "plain" in str(exc.value) and "\n" not in str(exc.value)
