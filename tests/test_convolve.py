"""Tests of diffim_dag.kernels.convolve: exact spatially varying convolution of tiles."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from diffim_dag.kernels.chebyshev import chebyshev_terms, n_terms
from diffim_dag.kernels.convolve import (
    _spatial_factors,
    choose_method,
    convolve_spatial,
    convolve_tile,
    convolve_variance_spatial,
    squared_kernel_terms,
)
from diffim_dag.kernels.solution import KernelSolution
from diffim_dag.masks import DEFAULT_MASK_PLANES

P = DEFAULT_MASK_PLANES


def gaussian_basis(size: int) -> np.ndarray:
    """Three basis images, one asymmetric (offset, elongated) so that a flipped kernel would be caught."""
    h = size // 2
    v, u = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    b0 = np.exp(-(u**2 + v**2) / (2 * 1.2**2))
    b1 = np.exp(-(u**2 + v**2) / (2 * 2.0**2)) * (u + 0.5 * v)
    b2 = np.exp(-((u - 1.5) ** 2 / (2 * 0.8**2) + (v + 1.0) ** 2 / (2 * 1.6**2)))
    return np.stack([b0 / b0.sum(), b1 / np.abs(b1).sum(), b2 / b2.sum()])


def make_solution(order: int, size: int, bbox, seed: int = 3) -> KernelSolution:
    rng = np.random.default_rng(seed)
    basis = gaussian_basis(size)
    coeffs = rng.normal(0.0, 0.4, size=(3, n_terms(order)))
    coeffs[:, 0] = [1.0, 0.3, 0.5]
    return KernelSolution(
        basis=basis,
        kernel_coefficients=coeffs,
        spatial_order=order,
        background_coefficients=np.zeros(1),
        background_order=0,
        bbox=bbox,
    )


def brute_force(image, solution, origin, square=False):
    """Evaluate kernel_at at every output pixel and sum K(u; x) I(x − u) (or K² V)."""
    h = solution.half_width
    ny, nx = image.shape
    padded = np.pad(np.asarray(image, dtype=np.float64), h)
    out = np.zeros((ny, nx))
    for y in range(ny):
        for x in range(nx):
            k = solution.kernel_at(origin[0] + x, origin[1] + y)
            if square:
                k = k * k
            window = padded[y : y + 2 * h + 1, x : x + 2 * h + 1]  # I[y-h .. y+h, x-h .. x+h]
            out[y, x] = np.sum(k[::-1, ::-1] * window)
    return out


def assert_rel(actual, expected, rel=1e-5):
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(11)
    image = rng.normal(10.0, 3.0, size=(40, 48))  # [y, x]: 48 wide, 40 high
    image[20, 30] += 500.0
    variance = rng.uniform(1.0, 4.0, size=image.shape)
    origin = (131, 57)
    solution = make_solution(2, 7, bbox=(100.0, 220.0, 40.0, 120.0))
    return image, variance, origin, solution


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("method", ["fft", "direct", "auto"])
def test_against_brute_force(small_case, method, precision):
    image, _, origin, solution = small_case
    ref = brute_force(image, solution, origin)
    out = convolve_spatial(image, solution, origin=origin, method=method, precision=precision)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert_rel(out, ref)
    # the kernel really varies: a constant kernel taken at the centre is far off
    const = scipy.signal.fftconvolve(image, solution.kernel_at(*solution.center), mode="same")
    assert np.max(np.abs(const - ref)) > 1e-2 * np.max(np.abs(ref))


def test_origin_matters(small_case):
    image, _, origin, solution = small_case
    ref = brute_force(image, solution, origin)
    shifted = convolve_spatial(image, solution, origin=(origin[0] + 20, origin[1]), method="fft")
    assert np.max(np.abs(shifted - ref)) > 1e-3 * np.max(np.abs(ref))


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("method", ["fft", "direct"])
def test_variance_against_brute_force(small_case, method, precision):
    _, variance, origin, solution = small_case
    ref = brute_force(variance, solution, origin, square=True)
    out = convolve_variance_spatial(variance, solution, origin=origin, method=method, precision=precision)
    assert out.dtype == np.float32
    assert_rel(out, ref)


def test_order0_matches_scipy_fftconvolve():
    """Independent check of the convolution convention (not flipped, centred) with an asymmetric kernel."""
    rng = np.random.default_rng(5)
    image = rng.normal(size=(33, 41))
    sol = make_solution(0, 9, bbox=(0.0, 40.0, 0.0, 32.0))
    kernel = sol.kernel_at(0, 0)
    assert not np.allclose(kernel, kernel[::-1, ::-1])
    truth = scipy.signal.fftconvolve(image, kernel, mode="same")
    for method in ("fft", "direct"):
        assert_rel(convolve_spatial(image, sol, origin=(500, -20), method=method), truth)


def test_separable_terms_equal_spatial_terms(small_case):
    image, _, origin, solution = small_case
    fx, fy = _spatial_factors(solution, origin, image.shape)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    full = solution.spatial_terms(xx + origin[0], yy + origin[1])
    np.testing.assert_allclose(fy[:, :, None] * fx[:, None, :], full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["fft", "direct"])
@pytest.mark.parametrize("tile", [(97, 113), (128, 64), (260, 71)])
def test_tiled_equals_whole(method, tile):
    _tiled_equals_whole(method, tile, "single")


def test_tiled_equals_whole_double():
    _tiled_equals_whole("fft", (97, 113), "double")


def _tiled_equals_whole(method, tile, precision):
    """Ragged tiles with a halo of the half-width, each with its own origin, reassemble to the whole."""
    rng = np.random.default_rng(21)
    ny, nx = 260, 300
    parent_origin = (1000, 2000)
    image = rng.normal(size=(ny, nx)) + 50.0
    variance = rng.uniform(1.0, 2.0, size=(ny, nx))
    solution = make_solution(1, 9, bbox=(1000.0, 1299.0, 2000.0, 2259.0), seed=8)
    h = solution.half_width
    kw = dict(method=method, precision=precision)
    whole = convolve_spatial(image, solution, origin=parent_origin, **kw)
    whole_var = convolve_variance_spatial(variance, solution, origin=parent_origin, **kw)
    tiled = np.full((ny, nx), np.nan, dtype=np.float32)
    tiled_var = np.full((ny, nx), np.nan, dtype=np.float32)
    for ya in range(0, ny, tile[0]):
        for xa in range(0, nx, tile[1]):
            yb, xb = min(ya + tile[0], ny), min(xa + tile[1], nx)
            ey0, ey1 = max(ya - h, 0), min(yb + h, ny)
            ex0, ex1 = max(xa - h, 0), min(xb + h, nx)
            origin = (parent_origin[0] + ex0, parent_origin[1] + ey0)
            part = convolve_spatial(image[ey0:ey1, ex0:ex1], solution, origin=origin, **kw)
            pvar = convolve_variance_spatial(variance[ey0:ey1, ex0:ex1], solution, origin=origin, **kw)
            tiled[ya:yb, xa:xb] = part[ya - ey0 : yb - ey0, xa - ex0 : xb - ex0]
            tiled_var[ya:yb, xa:xb] = pvar[ya - ey0 : yb - ey0, xa - ex0 : xb - ex0]
    assert np.isfinite(tiled).all()
    assert_rel(tiled, whole)
    assert_rel(tiled_var, whole_var)


def test_constant_image_scales_by_kernel_sum():
    """A constant image convolves to c·ΣK(x) away from the border (exactly the local kernel sum)."""
    c = 7.5
    sol = make_solution(2, 9, bbox=(0.0, 80.0, 0.0, 60.0), seed=4)
    image = np.full((61, 81), c)
    out = convolve_spatial(image, sol, origin=(0, 0), method="fft")
    h = sol.half_width
    ys, xs = np.mgrid[h : 61 - h, h : 81 - h]
    sums = np.vectorize(sol.kernel_sum_at)(xs, ys)
    assert np.ptp(sums) > 0.05  # the sum really varies
    assert_rel(out[h:-h, h:-h], c * sums)
    # order-0 kernel: constant sum everywhere
    sol0 = make_solution(0, 9, bbox=(0.0, 80.0, 0.0, 60.0))
    out0 = convolve_spatial(image, sol0, origin=(3, 4))
    np.testing.assert_allclose(out0[h:-h, h:-h], c * sol0.kernel_sum_at(0, 0), rtol=1e-6)


def delta_solution(size=5):
    basis = np.zeros((1, size, size))
    basis[0, size // 2, size // 2] = 1.0
    return KernelSolution(
        basis=basis,
        kernel_coefficients=np.array([[1.0, 0.0, 0.0]]),
        spatial_order=1,
        background_coefficients=np.zeros(1),
        background_order=0,
        bbox=(0.0, 10.0, 0.0, 10.0),
    )


@pytest.mark.parametrize("method", ["fft", "direct"])
def test_delta_kernel_is_identity(method):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(30, 20)).astype(np.float32)
    variance = rng.uniform(0.5, 2.0, size=image.shape).astype(np.float32)
    sol = delta_solution()
    np.testing.assert_allclose(convolve_spatial(image, sol, origin=(4, 9), method=method), image, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        convolve_variance_spatial(variance, sol, origin=(4, 9), method=method), variance, rtol=1e-6
    )


def test_single_and_double_agree_on_a_bright_star_over_sky():
    """float32 FFT round-off is ~1e-7 of the RMS: far below the noise even with a 1e5-count star."""
    rng = np.random.default_rng(8)
    image = rng.normal(1000.0, 30.0, size=(200, 220))
    image[100, 110] += 1e5
    sol = make_solution(1, 15, bbox=(0.0, 219.0, 0.0, 199.0))
    single = convolve_spatial(image, sol, method="fft", precision="single")
    double = convolve_spatial(image, sol, method="fft", precision="double")
    assert np.max(np.abs(single - double)) < 1e-5 * np.max(np.abs(double))
    assert np.max(np.abs(single - double)) < 1e-3 * 30.0
    with pytest.raises(ValueError, match="precision"):
        convolve_spatial(image, sol, precision="half")


def test_choose_method():
    assert choose_method((4096, 4096), 23) == "fft"
    assert choose_method((4096, 4096), 5) == "fft"
    assert choose_method((4096, 4096), 3) == "direct"
    assert choose_method((30, 30), 23) == "fft"
    assert choose_method((30, 30), 23, "direct") == "direct"
    assert choose_method((30, 30), 23, "fft") == "fft"
    with pytest.raises(ValueError, match="method"):
        choose_method((30, 30), 23, "bogus")


def test_convolve_tile_mask_and_nan():
    rng = np.random.default_rng(9)
    ny, nx = 40, 50
    image = rng.normal(size=(ny, nx)).astype(np.float32)
    variance = np.ones((ny, nx), dtype=np.float32)
    mask = np.zeros((ny, nx), dtype=np.int32)
    mask[20, 25] = (1 << P["SAT"]) | (1 << P["INJECTED"])
    image[5, 40] = np.nan
    sol = make_solution(1, 7, bbox=(0.0, 100.0, 0.0, 100.0))
    h = sol.half_width
    out_img, out_var, out_mask = convolve_tile(
        image, variance, mask, sol, origin=(10, 0), mask_planes=P, parent_shape=(ny, 200)
    )
    assert out_img.shape == out_var.shape == out_mask.shape == (ny, nx)
    assert np.isfinite(out_img).all() and np.isfinite(out_var).all()
    sat = (out_mask & (1 << P["SAT"])) != 0
    assert sat.sum() == 49 and sat[17:24, 22:29].all()
    injected = (out_mask & (1 << P["INJECTED"])) != 0
    assert injected.sum() == 1 and injected[20, 25]
    no_data = (out_mask & (1 << P["NO_DATA"])) != 0
    assert no_data.sum() == 49 and no_data[2:9, 37:44].all()
    # parent x from 10 to 59 of 200: only rows y < h and y >= ny - h are at the parent border
    edge = (out_mask & (1 << P["EDGE"])) != 0
    truth = np.zeros((ny, nx), dtype=bool)
    truth[:h] = truth[ny - h :] = True
    np.testing.assert_array_equal(edge, truth)
    # the image part equals convolve_spatial with the NaN taken as zero
    clean = np.nan_to_num(image, nan=0.0)
    np.testing.assert_array_equal(out_img, convolve_spatial(clean, sol, origin=(10, 0)))


def test_convolve_tile_shape_mismatch():
    sol = delta_solution()
    with pytest.raises(ValueError, match="shapes differ"):
        convolve_tile(
            np.zeros((5, 5)), np.zeros((5, 6)), np.zeros((5, 5), dtype=np.int32), sol,
            origin=(0, 0), mask_planes=P,
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["same", "full"])
def test_fft_convolve_equals_scipy_signal_bit_for_bit(dtype, mode):
    """The project's FFT convolution (no scipy.signal import at start-up) is scipy.signal.fftconvolve."""
    import scipy.signal

    from diffim_dag.kernels.convolve import fft_convolve

    rng = np.random.default_rng(0)
    for sa, sk in [((100, 120), (11, 11)), ((257, 300), (31, 29)), ((64, 64), (65, 65)), ((5, 7), (3, 3))]:
        a = rng.normal(size=sa).astype(dtype)
        k = rng.normal(size=sk).astype(dtype)
        expected = scipy.signal.fftconvolve(a, k, mode=mode)
        got = fft_convolve(a, k, mode)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_fft_convolve_keeps_the_kernel_transform_per_shape_bit_for_bit():
    """``kernel_fts`` keeps the kernel's transform per padded shape and dtype: calls that reuse it (a frame's
    decorrelated tiles) equal those that transform it themselves, bit for bit, and each shape gets its own."""
    from diffim_dag.kernels.convolve import fft_convolve

    rng = np.random.default_rng(3)
    k = rng.normal(size=(9, 9))
    memo: dict = {}
    for shape, dtype in [((60, 70), np.float32), ((60, 70), np.float32), ((90, 70), np.float32),
                         ((60, 70), np.float64), ((61, 70), np.float32)]:  # (61 pads as 60 does)
        a = rng.normal(size=shape).astype(dtype)
        got = fft_convolve(a, k.astype(dtype), kernel_fts=memo)
        expected = fft_convolve(a, k.astype(dtype))
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert len(memo) == 3  # (two float32 padded shapes, one float64)


def test_fft_convolve_in_blocks_equals_the_whole_frame():
    from diffim_dag.kernels.convolve import _block_edges, fft_convolve, fft_convolve_blocks

    rng = np.random.default_rng(4)
    a = rng.normal(size=(333, 210))
    k = rng.uniform(size=(15, 13))
    whole = fft_convolve(a, k)
    # blocks of rows only, of both, ragged at the far edges, and an even kernel side
    for rows, columns in ((64, None), (64, 50), (100, 211), (333, 7)):
        np.testing.assert_allclose(fft_convolve_blocks(a, k, rows=rows, columns=columns), whole, rtol=0, atol=1e-12)
    even = rng.uniform(size=(8, 6))
    np.testing.assert_allclose(fft_convolve_blocks(a, even, rows=40, columns=30), fft_convolve(a, even), rtol=0,
                               atol=1e-12)
    np.testing.assert_array_equal(fft_convolve_blocks(a, k, rows=400, columns=None), whole)  # one block
    # blocks on two threads, cast and masked as the matched filter asks: the values of the blocks in turn, and of
    # each block convolved on its own (the kernel's transform made once per block shape changes nothing)
    hy, hx = k.shape[0] // 2, k.shape[1] // 2
    rows, columns = 64 + 4 * hy, 50 + 4 * hx
    zero = rng.uniform(size=a.shape) < 0.02
    in_turn = fft_convolve_blocks(a, k, rows=rows, columns=columns, zero=zero, dtype=np.float32)
    np.testing.assert_array_equal(
        fft_convolve_blocks(a, k, rows=rows, columns=columns, zero=zero, dtype=np.float32, workers=2), in_turn)
    masked = np.where(zero, 0.0, a).astype(np.float32)
    (y0, y1), (x0, x1) = _block_edges(a.shape[0], k.shape[0], rows)[2], _block_edges(a.shape[1], k.shape[1], columns)[1]
    np.testing.assert_array_equal(in_turn[y0:y1, x0:x1],
                                  fft_convolve(masked[y0 - hy:y1 + hy, x0 - hx:x1 + hx], k)[hy:-hy, hx:-hx])
    assert not np.array_equal(in_turn[y0:y1, x0 - 4:x1 - 4],
                              fft_convolve(masked[y0 - hy:y1 + hy, x0 - 4 - hx:x1 - 4 + hx], k)[hy:-hy, hx:-hx])
    with pytest.raises(ValueError, match="2-D"):
        fft_convolve_blocks(a[0], k[0])
    assert fft_convolve_blocks(np.zeros((0, 5)), k).size == 0  # (an empty image: the whole-frame call's answer)


def test_block_edges_cover_the_axis_with_the_least_estimated_work():
    """Each axis is cut into blocks that cover it once, in order; of the layouts tried, the one of least work: a
    4096² frame and a 25² kernel in cores of 464 × 976 (transforms of 512 × 1024, the ragged blocks last), a 1024²
    frame in two blocks of 512 rows and one of all its columns (no ragged blocks of 96 and 48)."""
    from diffim_dag.kernels.convolve import _block_edges

    for n, side, n_fft in [(4096, 25, 512), (4096, 25, 1024), (1024, 25, 512), (1024, 25, 1024), (333, 15, 92),
                           (100, 3, 512), (7, 13, 512)]:
        edges = _block_edges(n, side, n_fft)
        assert edges[0][0] == 0 and edges[-1][1] == n
        assert all(b > a for a, b in edges) and all(e[1] == f[0] for e, f in zip(edges, edges[1:]))
    assert [b - a for a, b in _block_edges(4096, 25, 512)] == [464] * 8 + [384]
    assert [b - a for a, b in _block_edges(4096, 25, 1024)] == [976] * 4 + [192]
    assert [b - a for a, b in _block_edges(1024, 25, 512)] == [512, 512]
    assert _block_edges(1024, 25, 1024) == [(0, 1024)]


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_squared_kernel_terms_reproduce_the_squared_kernel(order):
    """K(u; x)² at any position is the twice-the-degree Chebyshev series of the regrouped products."""
    bbox = (0.0, 300.0, 0.0, 200.0)
    solution = make_solution(order, 9, bbox=bbox, seed=order + 5)
    squared, high = squared_kernel_terms(solution.term_kernels(), order)
    assert high == 2 * order and squared.shape[0] == n_terms(2 * order)
    assert squared.shape[0] <= n_terms(order) * (n_terms(order) + 1) // 2
    for x, y in [(0.0, 0.0), (300.0, 200.0), (37.5, 151.0), (222.0, 12.0)]:
        t = chebyshev_terms(x, y, high, bbox)
        np.testing.assert_allclose(np.tensordot(t, squared, axes=1), solution.kernel_at(x, y) ** 2,
                                   rtol=1e-12, atol=1e-14)


def test_kernel_transforms_kept_per_solution_and_shape_give_the_same_tiles(small_case):
    """Tiles of one shape share the kernels' transforms (kept with the solution); a tile convolved with them
    kept equals one convolved afresh, a tile of another shape gets its own, and they go with the solution."""
    import gc

    from diffim_dag.kernels.convolve import _KERNEL_FTS

    image, variance, origin, _ = small_case
    solution = make_solution(2, 7, bbox=(100.0, 220.0, 40.0, 120.0))
    first = convolve_spatial(image, solution, origin=origin, method="fft")
    first_var = convolve_variance_spatial(variance, solution, origin=origin, method="fft")
    memo = _KERNEL_FTS[solution]
    assert {name for name, _, _ in memo} == {"image", "variance"}
    again = convolve_spatial(image, solution, origin=origin, method="fft")
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(convolve_variance_spatial(variance, solution, origin=origin, method="fft"), first_var)
    part = convolve_spatial(image[:30, :35], solution, origin=origin, method="fft")
    assert len(memo) == 3
    assert_rel(part, brute_force(image[:30, :35], solution, origin))
    n = len(_KERNEL_FTS)
    del solution, memo
    gc.collect()
    assert len(_KERNEL_FTS) == n - 1


def test_tile_planes_convolved_on_two_threads_are_the_same(small_case):
    """A single tile in process convolves its variance on a thread of its own beside the image: the same planes."""
    from diffim_dag.stages.subtract import convolve_planes

    image, variance, origin, _ = small_case
    solution = make_solution(1, 7, bbox=(100.0, 220.0, 40.0, 120.0))
    mask = np.zeros(image.shape, np.int32)
    mask[10, 12] = 1 << 3
    one = convolve_planes(image, variance, mask, solution, origin=origin)
    two = convolve_planes(image, variance, mask, solution, origin=origin, workers=2)
    for a, b in zip(one, two):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
