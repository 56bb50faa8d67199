"""Tests of diffim_dag.kernels.maskops: dilation, template planes, edge frame."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.kernels.maskops import bits_of, dilate_mask, edge_mask, template_mask_for_difference
from diffim_dag.masks import DEFAULT_MASK_PLANES

P = DEFAULT_MASK_PLANES


def brute_dilate(mask: np.ndarray, k: int, skip_bits: int = 0) -> np.ndarray:
    """OR over every offset of the square footprint, by explicit shifts (zero outside)."""
    h = k // 2
    ny, nx = mask.shape
    work = mask & ~np.int32(skip_bits)
    out = np.zeros_like(mask)
    for y in range(ny):
        for x in range(nx):
            out[y, x] = np.bitwise_or.reduce(
                work[max(y - h, 0) : y + h + 1, max(x - h, 0) : x + h + 1], axis=None
            )
    return out | (mask & np.int32(skip_bits))


def test_single_pixel_becomes_square():
    mask = np.zeros((20, 25), dtype=np.int32)
    mask[10, 12] = 1 << P["BAD"]
    out = dilate_mask(mask, 5)
    truth = np.zeros_like(mask)
    truth[8:13, 10:15] = 1 << P["BAD"]
    np.testing.assert_array_equal(out, truth)
    assert out.dtype == mask.dtype


def test_two_bits_dilate_independently_and_clip_at_border():
    mask = np.zeros((12, 12), dtype=np.int32)
    mask[0, 0] = 1 << P["SAT"]
    mask[11, 6] = 1 << P["CR"]
    mask[6, 6] = (1 << P["SAT"]) | (1 << P["CR"])
    out = dilate_mask(mask, 3)
    sat = (out & (1 << P["SAT"])) != 0
    cr = (out & (1 << P["CR"])) != 0
    assert sat.sum() == 4 + 9  # corner block 2x2 + interior 3x3
    assert cr.sum() == 6 + 9  # bottom-edge block 2x3 + interior 3x3
    assert sat[0:2, 0:2].all() and sat[5:8, 5:8].all()
    assert cr[10:12, 5:8].all() and cr[5:8, 5:8].all()


@pytest.mark.parametrize("k", [1, 3, 7, 9, 17, 23, 31, 45])
def test_matches_brute_force_random(k):
    rng = np.random.default_rng(7)
    mask = np.zeros((31, 37), dtype=np.int32)
    for bit in (0, 3, 5, 13, 30):
        hits = rng.random(mask.shape) < 0.02
        mask[hits] |= np.int32(1 << bit)
    skip = 1 << 13
    out = dilate_mask(mask, k, skip_bits=skip)
    np.testing.assert_array_equal(out, brute_dilate(mask, k, skip))


def test_skip_bits_copied_undilated_and_input_untouched():
    mask = np.zeros((15, 15), dtype=np.int32)
    mask[7, 7] = (1 << P["INJECTED"]) | (1 << P["BAD"])
    before = mask.copy()
    out = dilate_mask(mask, 5, skip_bits=bits_of(P, ["INJECTED", "INJECTED_TEMPLATE"]))
    np.testing.assert_array_equal(mask, before)
    injected = (out & (1 << P["INJECTED"])) != 0
    assert injected.sum() == 1 and injected[7, 7]
    assert ((out & (1 << P["BAD"])) != 0).sum() == 25


def test_footprint_validation():
    mask = np.zeros((5, 5), dtype=np.int32)
    with pytest.raises(ValueError, match="odd"):
        dilate_mask(mask, 4)
    with pytest.raises(ValueError, match="odd"):
        dilate_mask(mask, 0)
    with pytest.raises(TypeError):
        dilate_mask(mask.astype(float), 3)


def test_large_footprint_on_small_mask_fills_everything():
    mask = np.zeros((4, 6), dtype=np.int32)
    mask[2, 3] = 1 << P["EDGE"]
    out = dilate_mask(mask, 23)
    assert (out == (1 << P["EDGE"])).all()


def test_template_mask_rule():
    planes = dict(P)
    b = {name: np.int32(1 << bit) for name, bit in planes.items()}
    tmask = np.array(
        [
            [b["NO_DATA"], b["BAD"] | b["DETECTED"], b["HIGH_VARIANCE"] | b["CR"]],
            [b["SAT"], b["INJECTED"] | b["EDGE"], b["SAT"] | b["BAD"] | b["INJECTED"]],
        ],
        dtype=np.int32,
    )
    out = template_mask_for_difference(tmask, planes)
    truth = np.array(
        [
            [b["NO_DATA"], b["BAD"], b["HIGH_VARIANCE"]],
            [b["SAT_TEMPLATE"], b["INJECTED_TEMPLATE"], b["SAT_TEMPLATE"] | b["BAD"] | b["INJECTED_TEMPLATE"]],
        ],
        dtype=np.int32,
    )
    np.testing.assert_array_equal(out, truth)
    # a narrower kept list drops BAD and HIGH_VARIANCE
    out2 = template_mask_for_difference(tmask, planes, kept=("NO_DATA",))
    assert out2[0, 1] == 0 and out2[0, 2] == 0 and out2[0, 0] == b["NO_DATA"]


def test_template_mask_needs_target_planes():
    planes = {"SAT": 1, "NO_DATA": 8}
    with pytest.raises(KeyError, match="SAT_TEMPLATE"):
        template_mask_for_difference(np.zeros((2, 2), dtype=np.int32), planes)


@pytest.mark.parametrize("shape,h", [((20, 30), 3), ((7, 9), 0), ((10, 10), 5), ((5, 40), 4)])
def test_edge_mask(shape, h):
    out = edge_mask(shape, h, P["EDGE"])
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    truth = (xx < h) | (xx >= nx - h) | (yy < h) | (yy >= ny - h)
    np.testing.assert_array_equal(out != 0, truth)
    assert set(np.unique(out)) <= {0, 1 << P["EDGE"]}
    assert out.dtype == np.int32
    assert (out != 0).sum() == ny * nx - max(ny - 2 * h, 0) * max(nx - 2 * h, 0)


def test_grow_square_is_binary_dilation_by_the_square():
    from scipy import ndimage

    from diffim_dag.kernels.maskops import grow_square

    rng = np.random.default_rng(1)
    square = np.ones((3, 3), bool)
    for _ in range(20):
        m = rng.uniform(size=(int(rng.integers(1, 60)), int(rng.integers(1, 60)))) > 0.95
        for it in (1, 2, 4):
            np.testing.assert_array_equal(grow_square(m, it), ndimage.binary_dilation(m, square, iterations=it))


def test_grow_square_of_a_sparse_mask_from_its_pixels_is_the_same_dilation():
    """Saturated stars and cosmic rays are a few pixels in a million: grown from their coordinates (the
    sparse path), with pixels on every edge and corner, the result is the dense path's and the filter's."""
    from scipy import ndimage

    from diffim_dag.kernels.maskops import _or_window_1d, grow_square, nonzero_2d

    rng = np.random.default_rng(7)
    square = np.ones((3, 3), bool)
    for shape in ((300, 410), (2000, 3), (3, 2000)):
        m = rng.uniform(size=shape) > 0.9995
        m[0, 0] = m[-1, -1] = m[0, -1] = m[-1, 0] = True
        for it in (1, 2):
            k = 2 * it + 1
            assert np.count_nonzero(m) * k * k * 16 < m.size  # (the sparse path is the one taken)
            dense = _or_window_1d(_or_window_1d(m, k, axis=1), k, axis=0)
            np.testing.assert_array_equal(grow_square(m, it), dense)
            np.testing.assert_array_equal(grow_square(m, it), ndimage.binary_dilation(m, square, iterations=it))
        ys, xs = nonzero_2d(m)
        ny, nx = np.nonzero(m)
        np.testing.assert_array_equal(ys, ny)
        np.testing.assert_array_equal(xs, nx)


def test_all_finite_from_one_sum():
    """True only when no NaN or infinity is present; a sum that overflows says False (the callers then test pixel by
    pixel, so an exposure of huge finite values keeps them and flags nothing)."""
    from diffim_dag.exposure import Exposure
    from diffim_dag.kernels.maskops import all_finite

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert all_finite(a) and all_finite(np.zeros((0, 3))) and all_finite(np.arange(5))
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[2, 1] = bad
        assert not all_finite(b)
    b = a.copy()
    b[0, 0], b[1, 1] = np.inf, -np.inf  # (their sum is NaN)
    assert not all_finite(b)
    huge = np.full((4, 4), 3e38, np.float32)  # finite, but their sum overflows float32
    assert not all_finite(huge)
    exp = Exposure.from_arrays(huge, validate=True)
    image, _, mask = exp.arrays()
    np.testing.assert_array_equal(image, huge)
    assert not mask.any()


def test_good_pixels_where_indexed_equal_the_whole_plane():
    """``GoodPixels(mask, bits)[index]`` is ``lacks_bits(mask, bits)[index]`` (``FlaggedPixels``: ``has_bits``) for the
    indexes the measurements use: slices (dipole stamps, noise windows), broadcast stamp index arrays (forced
    photometry) and a single row."""
    from diffim_dag.kernels.maskops import FlaggedPixels, GoodPixels, has_bits, lacks_bits

    rng = np.random.default_rng(5)
    mask = rng.integers(0, 1 << 6, size=(70, 90)).astype(np.int32) * (rng.random((70, 90)) < 0.3)
    bits = 0b100110
    whole = lacks_bits(mask, bits)
    good = GoodPixels(mask, bits)
    assert good.shape == mask.shape
    rows = rng.integers(0, 70, size=(5, 7))[:, :, None]
    cols = rng.integers(0, 90, size=(5, 7))[:, None, :]
    for index in ((slice(3, 40), slice(10, 77)), (rows, cols), (12,)):
        got = good[index]
        assert got.dtype == bool
        np.testing.assert_array_equal(got, whole[index])
    assert not good[(slice(None), slice(None))].all() and good[(slice(None), slice(None))].any()
    flagged = FlaggedPixels(mask, bits)
    for index in ((slice(3, 40), slice(10, 77)), (rows, cols), (slice(None), slice(None))):
        np.testing.assert_array_equal(flagged[index], has_bits(mask, bits)[index])
