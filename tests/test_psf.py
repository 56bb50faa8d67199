"""PSF models: centred, normalized, odd kernels; widths, moments, spatial variation, serialization."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffim_dag.errors import PsfError
from diffim_dag.psf import (
    FWHM_PER_SIGMA,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    VaryingPsf,
    image_moments,
    measure_fwhm,
    psf_from_payload,
)


def _grid():
    imgs = np.empty((2, 2, 21, 21))
    widths = [[1.5, 2.5], [2.0, 3.5]]  # [row j][column i]
    for j in range(2):
        for i in range(2):
            imgs[j, i] = GaussianPsf(sigma_x=widths[j][i]).kernel_image(size=21)
    return GridPsf(imgs, x_nodes=[0.0, 100.0], y_nodes=[-50.0, 50.0]), imgs


MODELS = {
    "gaussian": GaussianPsf(sigma_x=1.8),
    "elliptical": GaussianPsf(sigma_x=2.5, sigma_y=1.5, theta=0.6),
    "moffat": MoffatPsf(fwhm_pixels=3.7, beta=2.8),
    "image": ImagePsf(GaussianPsf(sigma_x=2.1, sigma_y=1.6, theta=-0.4).kernel_image(size=31)),
    "varying": VaryingPsf(profile="gaussian", fwhm_coeffs=[4.0, 1.0, -0.5], bbox=[0, 200, 0, 100], ellipticity=0.1),
    "varying_moffat": VaryingPsf(profile="moffat", fwhm_coeffs=[4.0, 0.0, 0.8], bbox=[0, 200, 0, 100], beta=3.0),
    "grid": _grid()[0],
}
POSITIONS = [(None, None), (13.0, 77.0), (187.5, 3.25), (-40.0, 250.0)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pos", POSITIONS)
def test_kernel_centred_normalized_odd(name, pos):
    psf = MODELS[name]
    k = psf.kernel_image(*pos)
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert abs(k.sum() - 1.0) < 1e-12
    xc, yc, *_ = image_moments(k)
    assert abs(xc) < 1e-3 and abs(yc) < 1e-3
    assert np.unravel_index(np.argmax(k), k.shape) == (k.shape[0] // 2, k.shape[1] // 2)
    for size in (15, 25):
        ks = psf.kernel_image(*pos, size=size)
        assert ks.shape == (size, size) and abs(ks.sum() - 1) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("offset", [(0.3, -0.2), (-0.5, 0.5), (0.25, 0.0)])
def test_offset_moves_centroid(name, offset):
    psf = MODELS[name]
    # wide enough that truncating the Moffat wings does not bias the centroid
    k = psf.kernel_image(30.0, 40.0, size=61, offset=offset)
    assert abs(k.sum() - 1.0) < 1e-12
    xc, yc, *_ = image_moments(k)
    # analytic models are exact; pixelized ones are shifted by (centroid-corrected) Lanczos-5
    assert abs(xc - offset[0]) < 1e-3 and abs(yc - offset[1]) < 1e-3
    if name in ("image", "grid"):
        # the interpolated kernel matches the analytic shifted profile
        if name == "image":
            truth = GaussianPsf(sigma_x=2.1, sigma_y=1.6, theta=-0.4).kernel_image(size=61, offset=offset)
            assert np.abs(k - truth).max() < 1e-2 * truth.max()  # measured 0.5 %


@pytest.mark.parametrize("fwhm", [2.0, 2.5, 3.0, 4.0, 5.5, 8.0])
def test_rendered_fwhm_matches_parameter(fwhm):
    g = GaussianPsf.from_fwhm(fwhm)
    m = MoffatPsf(fwhm_pixels=fwhm, beta=3.0)
    m2 = MoffatPsf(fwhm_pixels=fwhm, beta=2.0)
    for psf in (g, m, m2):
        assert psf.fwhm() == pytest.approx(fwhm, rel=1e-12)
        assert measure_fwhm(psf.kernel_image()) == pytest.approx(fwhm, rel=0.01)
    # the image model measures its own FWHM the same way
    assert ImagePsf(g.kernel_image()).fwhm() == pytest.approx(fwhm, rel=0.01)


def test_measure_fwhm_is_tight_for_wider_profiles():
    for sigma in (1.5, 2.0, 2.5, 3.0):
        g = GaussianPsf(sigma_x=sigma)
        assert measure_fwhm(g.kernel_image()) == pytest.approx(FWHM_PER_SIGMA * sigma, rel=2e-3)


@pytest.mark.parametrize("sigma", [1.0, 2.0, 3.3])
def test_gaussian_second_moments_are_sigma_squared(sigma):
    ixx, iyy, ixy = GaussianPsf(sigma_x=sigma).second_moments()
    assert ixx == pytest.approx(sigma**2, rel=1e-4) and iyy == pytest.approx(sigma**2, rel=1e-4)
    assert abs(ixy) < 1e-10


def test_elliptical_gaussian_moments_follow_rotation():
    sx, sy, th = 3.0, 1.5, 0.5
    ixx, iyy, ixy = GaussianPsf(sigma_x=sx, sigma_y=sy, theta=th).second_moments()
    c, s = math.cos(th), math.sin(th)
    assert ixx == pytest.approx(c * c * sx**2 + s * s * sy**2, rel=1e-4)
    assert iyy == pytest.approx(s * s * sx**2 + c * c * sy**2, rel=1e-4)
    assert ixy == pytest.approx(c * s * (sx**2 - sy**2), rel=1e-4)
    a, b = GaussianPsf(sigma_x=sx, sigma_y=sy, theta=th).axis_sigmas()
    assert a == pytest.approx(sx, rel=1e-4) and b == pytest.approx(sy, rel=1e-4)
    assert GaussianPsf(sigma_x=sx, sigma_y=sy).fwhm() == pytest.approx(FWHM_PER_SIGMA * math.sqrt(sx * sy))


def test_varying_psf_follows_its_polynomial():
    psf = VaryingPsf(profile="gaussian", fwhm_coeffs=[4.0, 1.0, -0.5, 0.2, 0.1, -0.3], bbox=[0, 200, 0, 100])
    for x, y in [(0, 0), (200, 100), (50, 75), (100, 50)]:
        u, v = 2 * x / 200 - 1, 2 * y / 100 - 1
        expected = 4.0 + u - 0.5 * v + 0.2 * u * u + 0.1 * v * v - 0.3 * u * v
        assert psf.fwhm(x, y) == pytest.approx(expected, rel=1e-12)
        assert measure_fwhm(psf.kernel_image(x, y)) == pytest.approx(expected, rel=0.01)
        s = expected / FWHM_PER_SIGMA
        ixx, iyy, _ = psf.second_moments(x, y)
        assert ixx == pytest.approx(s * s, rel=1e-3) and iyy == pytest.approx(s * s, rel=1e-3)
    assert psf.fwhm() == pytest.approx(4.0 + 0.0)  # centre of the box: u = v = 0
    ell = VaryingPsf(profile="gaussian", fwhm_coeffs=[4.0], bbox=[0, 10, 0, 10], ellipticity=0.3, theta=0.0)
    a, b = ell.axis_sigmas(5, 5)
    assert b / a == pytest.approx(0.7, rel=1e-3)
    assert math.sqrt(a * b) == pytest.approx(4.0 / FWHM_PER_SIGMA, rel=1e-3)
    mof = VaryingPsf(profile="moffat", fwhm_coeffs=[3.0, 1.0], bbox=[0, 10, 0, 10], beta=2.5)
    np.testing.assert_allclose(mof.kernel_image(10, 3), MoffatPsf(fwhm_pixels=4.0, beta=2.5).kernel_image(size=mof.default_size(10, 3)))
    with pytest.raises(PsfError, match="positive"):
        VaryingPsf(profile="gaussian", fwhm_coeffs=[1.0, 2.0], bbox=[0, 10, 0, 10]).fwhm(0, 5)


def test_grid_psf_interpolates_between_nodes():
    psf, imgs = _grid()
    # at the nodes: the node image
    np.testing.assert_allclose(psf.kernel_image(0.0, -50.0, size=21), imgs[0, 0], atol=1e-15)
    np.testing.assert_allclose(psf.kernel_image(100.0, 50.0, size=21), imgs[1, 1], atol=1e-15)
    # between: bilinear weights
    k = psf.kernel_image(25.0, 0.0, size=21)
    expected = 0.75 * 0.5 * imgs[0, 0] + 0.25 * 0.5 * imgs[0, 1] + 0.75 * 0.5 * imgs[1, 0] + 0.25 * 0.5 * imgs[1, 1]
    np.testing.assert_allclose(k, expected / expected.sum(), atol=1e-15)
    # second moments interpolate linearly (each image has unit sum)
    ixx = psf.second_moments(25.0, 0.0)[0]
    m = [[image_moments(imgs[j, i])[2] for i in range(2)] for j in range(2)]  # truncated at 21 px
    want = 0.375 * m[0][0] + 0.125 * m[0][1] + 0.375 * m[1][0] + 0.125 * m[1][1]
    assert ixx == pytest.approx(want, rel=1e-9)
    # outside the grid: clamped to the edge nodes
    np.testing.assert_allclose(psf.kernel_image(-500.0, 900.0, size=21), imgs[1, 0], atol=1e-15)
    # FWHM varies monotonically along a row
    f = [psf.fwhm(x, -50.0) for x in (0.0, 50.0, 100.0)]
    assert f[0] < f[1] < f[2]


@pytest.mark.parametrize("name", list(MODELS))
def test_payload_round_trip(name):
    psf = MODELS[name]
    meta, data = psf.to_payload()
    back = psf_from_payload(meta, data)
    assert back == psf and hash(back) == hash(psf)
    np.testing.assert_array_equal(back.kernel_image(12.0, 34.0), psf.kernel_image(12.0, 34.0))


def test_psf_errors_are_one_line():
    cases = [
        lambda: ImagePsf(np.ones((4, 5)), source="psf.fits"),
        lambda: ImagePsf(np.zeros((5, 5)), source="psf.fits"),
        lambda: ImagePsf(np.full((5, 5), np.nan), source="psf.fits"),
        lambda: GaussianPsf(sigma_x=-1.0),
        lambda: MoffatPsf(fwhm_pixels=3.0, beta=0.5),
        lambda: GaussianPsf(sigma_x=2.0).kernel_image(size=10),
        lambda: psf_from_payload({"kind": "nope"}),
        lambda: GridPsf(np.ones((1, 2, 4, 4)), [0.0, 1.0], [0.0]),
        lambda: VaryingPsf(profile="airy", fwhm_coeffs=[3.0], bbox=[0, 1, 0, 1]),
    ]
    for case in cases:
        with pytest.raises(PsfError) as exc:
            case()
        assert "\n" not in str(exc.value)


def test_widths_at_many_positions_are_each_positions_own(rng):
    """fwhm_many / sigma_many give fwhm / sigma of each position bitwise: a grid's at once (nodes, between them,
    outside the grid, a grid of one column), every other model's one by one."""
    psf, imgs = _grid()
    one_column = GridPsf(imgs[:, :1], x_nodes=[40.0], y_nodes=[-50.0, 50.0])
    xs = np.concatenate([[0.0, 100.0, -500.0, 25.0], rng.uniform(-50, 150, 40)])
    ys = np.concatenate([[-50.0, 50.0, 900.0, 0.0], rng.uniform(-100, 100, 40)])
    for model in (psf, one_column, GaussianPsf(sigma_x=1.7), MoffatPsf(fwhm_pixels=3.1)):
        fwhm = model.fwhm_many(xs, ys)
        assert fwhm.dtype == np.float64 and fwhm.shape == xs.shape
        assert np.array_equal(fwhm, [model.fwhm(x, y) for x, y in zip(xs, ys)])
        assert np.array_equal(model.sigma_many(xs, ys), [model.sigma(x, y) for x, y in zip(xs, ys)])
    assert np.unique(psf.fwhm_many(xs, ys)).size > 10  # (the grid's width does vary)


def test_grid_psf_cache_never_returns_another_positions_image():
    """The per-thread last-position cache: alternating positions, many threads and a pickle round trip
    give exactly what a fresh model gives."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from diffim_dag.psf import GridPsf

    rng = np.random.default_rng(5)
    images = rng.uniform(0.1, 1.0, (3, 3, 21, 21))
    nodes = [0.0, 500.0, 1000.0]
    grid = GridPsf(images, nodes, nodes)
    pts = rng.uniform(0, 1000, (40, 2))

    def fresh(x, y):
        return GridPsf(images, nodes, nodes).kernel_image(x, y, offset=(0.3, -0.2))

    want = [fresh(x, y) for x, y in pts]
    for _ in range(2):  # twice: repeated and alternating positions
        for (x, y), w in zip(pts, want):
            np.testing.assert_array_equal(grid.kernel_image(x, y, offset=(0.3, -0.2)), w)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: grid.kernel_image(p[0], p[1], offset=(0.3, -0.2)), list(pts) * 3))
    for g, w in zip(got, want * 3):
        np.testing.assert_array_equal(g, w)
    again = pickle.loads(pickle.dumps(grid))
    np.testing.assert_array_equal(again.kernel_image(*pts[0], offset=(0.3, -0.2)), want[0])
    assert again == grid


def test_kernel_images_equal_kernel_image_bit_for_bit():
    """A fit renders its model and shifted copies in one call; each must be what kernel_image gives alone."""
    from diffim_dag.psf import GaussianPsf, GridPsf, ImagePsf

    rng = np.random.default_rng(1)
    base = GaussianPsf.from_fwhm(3.5)
    nodes = [0.0, 500.0, 1000.0]
    images = np.array([[base.kernel_image(size=31, offset=tuple(rng.uniform(-0.3, 0.3, 2))) for _ in nodes]
                       for _ in nodes])
    for psf in (GridPsf(images, nodes, nodes), ImagePsf(images[1, 1]), base):
        for _ in range(30):
            x, y = rng.uniform(-100, 1100, 2)
            size = int(rng.choice([15, 25, 31, 41]))
            offsets = [tuple(rng.uniform(-0.5, 0.5, 2)) for _ in range(3)] + [(0.0, 0.0), (0.0, 0.3), (-0.2, 0.0)]
            offsets += [(offsets[0][0] + 0.05, offsets[0][1]), (offsets[0][0], offsets[0][1] - 0.05)]
            many = psf.kernel_images(x, y, size=size, offsets=offsets)
            one = np.stack([psf.kernel_image(x, y, size=size, offset=o) for o in offsets])
            np.testing.assert_array_equal(many, one)


def test_kernel_images_many_equal_kernel_images_position_by_position():
    """The batch renderer (every source's model and shifted copies at once) gives each position's
    :meth:`kernel_images` to rounding: grid (interpolated per position), image and analytic models, zero and
    half-pixel offsets, positions off the grid's nodes."""
    from diffim_dag.psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf

    rng = np.random.default_rng(2)
    nodes = np.stack([np.stack([MoffatPsf(fwhm_pixels=3.0 + 0.3 * i + 0.2 * j, beta=3.5).kernel_image(size=31)
                                for i in range(3)]) for j in range(4)])
    models = [GridPsf(nodes, [0, 500, 1000], [0, 300, 600, 900]), ImagePsf(GaussianPsf.from_fwhm(3.5).kernel_image(size=25)),
              GaussianPsf.from_fwhm(3.5)]
    xs, ys = rng.uniform(-50, 1050, 40), rng.uniform(-50, 950, 40)
    offsets = rng.uniform(-0.55, 0.55, (40, 5, 2))
    offsets[3] = 0.0
    for psf in models:
        for size in (15, 21):
            many = psf.kernel_images_many(xs, ys, size=size, offsets=offsets)
            one = np.stack([psf.kernel_images(x, y, size=size, offsets=[tuple(o) for o in off])
                            for x, y, off in zip(xs, ys, offsets)])
            np.testing.assert_allclose(many, one, rtol=0, atol=1e-15)
            np.testing.assert_allclose(many.sum(axis=(2, 3)), 1.0, rtol=1e-12)
