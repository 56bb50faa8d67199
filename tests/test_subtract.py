"""Acceptance tests of the AL subtraction of one detector (ip_diffim's thresholds).

Fixtures are analytic: Gaussian PSFs (the matching kernel is then a Gaussian of
σ² = σ_sci² − σ_tmpl²), white Gaussian noise of known σ, stars injected with
:func:`diffim_dag.sim.add_sources`.
"""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from diffim_dag import Exposure, ExposureInfo, GaussianPsf, NoWorkFound, VaryingPsf
from diffim_dag.config import PipelineConfig, SubtractConfig, KernelConfig
from diffim_dag.kernels.chebyshev import chebyshev_terms
from diffim_dag.noise import clipped_stats
from diffim_dag.pipeline import subtract_exposures
from diffim_dag.sim import add_sources


def make_pair(*, sigma_science=2.4, sigma_template=2.0, noise_science=1.0, noise_template=1.0, size=512, n_stars=120,
              seed=0, science_background=None, xy0=(0, 0), psf_gradient=0.0, no_data_fraction=0.0, fluxes=None):
    """Science and template of the same star field with Gaussian PSFs and white noise."""
    rng = np.random.default_rng(seed)
    margin = 30
    x = rng.uniform(margin, size - margin, n_stars) + xy0[0]
    y = rng.uniform(margin, size - margin, n_stars) + xy0[1]
    noisiest = max(noise_science, noise_template)
    if fluxes is None:
        # S/N in the noisier image between ~15 and ~400 (NEA ≈ 4πσ²)
        nea = 4 * np.pi * max(sigma_science, sigma_template) ** 2
        fluxes = noisiest * np.sqrt(nea) * 10 ** rng.uniform(np.log10(15), np.log10(400), n_stars)
    bbox = (xy0[0], xy0[0] + size - 1, xy0[1], xy0[1] + size - 1)

    def psf(sigma):
        if psf_gradient:
            f = sigma * 2.3548
            return VaryingPsf(profile="gaussian", fwhm_coeffs=[f, psf_gradient * f / 2, psf_gradient * f / 2], bbox=bbox)
        return GaussianPsf(sigma_x=sigma)

    def exposure(sigma, noise, background, visit):
        p = psf(sigma)
        img = np.zeros((size, size))
        add_sources(img, x, y, fluxes, p, xy0=xy0)
        if background is not None:
            img += background
        img += rng.normal(0.0, noise, img.shape)
        var = np.full(img.shape, noise**2, dtype=np.float32)
        return Exposure.from_arrays(img.astype(np.float32), var, None, xy0=xy0, psf=p, info=ExposureInfo(visit=visit))

    science = exposure(sigma_science, noise_science, science_background, 1)
    template = exposure(sigma_template, noise_template, None, 2)
    if no_data_fraction:
        # NO_DATA over the right-hand part of the template
        tmask = template.mask.values.copy()
        ncols = int(round(no_data_fraction * size))
        tmask[:, size - ncols :] |= template.bitmask("NO_DATA")
        timg = template.image.values.copy()
        timg[:, size - ncols :] = 0
        template = template.with_planes(image=timg, mask=tmask)
    return science, template


def _good(diff: Exposure) -> np.ndarray:
    _, var, msk = diff.arrays()
    return ((msk & diff.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])) == 0) & (var > 0)


def _config(**subtract):
    return PipelineConfig(subtract=SubtractConfig(**subtract))


def test_equal_images():
    sigma = 1.0
    science, template = make_pair(sigma_science=2.4, sigma_template=2.4, noise_science=sigma, noise_template=sigma, seed=1)
    result = subtract_exposures(science, template)
    img, var, msk = result.difference.arrays()
    assert np.all(np.isfinite(img)) and np.all(np.isfinite(var))
    mean, std, n = clipped_stats(img[_good(result.difference)])
    assert abs(mean) < 5 * sigma / np.sqrt(n)
    assert std == pytest.approx(np.sqrt(2) * sigma, rel=0.1)
    assert result.solution.size == 17  # the minimum (min_kernel_size)


@pytest.mark.parametrize("noises", [(1.0, 1.0), (1.0, 0.1), (0.1, 0.1)])
@pytest.mark.parametrize("sigmas,mode", [((2.4, 2.0), "convolveTemplate"), ((2.0, 2.4), "convolveScience")])
def test_modes_noise_and_variance(noises, sigmas, mode):
    ns, nt = noises
    science, template = make_pair(sigma_science=sigmas[0], sigma_template=sigmas[1], noise_science=ns,
                                  noise_template=nt, seed=2)
    result = subtract_exposures(science, template, config=_config(mode=mode))
    assert result.mode == mode
    img, var, _ = result.difference.arrays()
    good = _good(result.difference)
    expected = ns**2 + nt**2
    assert float(np.mean(var[good])) == pytest.approx(expected, rel=0.1)
    _, std, _ = clipped_stats(img[good])
    assert std == pytest.approx(np.sqrt(expected), rel=0.1)


@pytest.mark.parametrize("sigmas,explicit", [((2.4, 2.0), "convolveTemplate"), ((2.0, 2.4), "convolveScience")])
def test_auto_mode_matches_explicit(sigmas, explicit):
    science, template = make_pair(sigma_science=sigmas[0], sigma_template=sigmas[1], seed=3, size=384, n_stars=80)
    auto = subtract_exposures(science, template, config=_config(mode="auto"))
    fixed = subtract_exposures(science, template, config=_config(mode=explicit))
    assert auto.mode == explicit
    for a, b in zip(auto.difference.arrays(), fixed.difference.arrays()):
        np.testing.assert_array_equal(a, b)


def test_swapping_science_and_template():
    sigma = 1.0
    a, b = make_pair(sigma_science=2.4, sigma_template=2.0, noise_science=sigma, noise_template=sigma, seed=4)
    ab = subtract_exposures(a, b)
    ba = subtract_exposures(b, a)
    assert {ab.mode, ba.mode} == {"convolveTemplate", "convolveScience"}
    good = _good(ab.difference) & _good(ba.difference)
    delta = (ab.difference.arrays()[0] - ba.difference.arrays()[0])[good]
    mean, std, n = clipped_stats(delta)
    assert abs(mean) < 5 * std / np.sqrt(n)
    assert std == pytest.approx(2 * np.sqrt(2) * sigma, rel=0.1)


def test_background_fit_and_subtraction():
    size, sigma = 512, 1.0
    bbox = (0.0, size - 1.0, 0.0, size - 1.0)
    truth = np.array([10.0, 2.0, -3.0, 1.5, 1.0, -2.0])  # Chebyshev order 2
    yy, xx = np.mgrid[0:size, 0:size]
    background = np.tensordot(truth, chebyshev_terms(xx, yy, 2, bbox), axes=(0, 0))
    science, template = make_pair(sigma_science=2.4, sigma_template=2.0, seed=5, science_background=background)
    result = subtract_exposures(science, template, config=_config(subtract_background=True))
    fitted = result.solution.background_coefficients
    np.testing.assert_allclose(fitted, truth, rtol=0.3)
    _, std, _ = clipped_stats(result.difference.arrays()[0][_good(result.difference)])
    assert std == pytest.approx(np.sqrt(2) * sigma, rel=0.1)


def test_background_kept_unless_asked():
    size = 512
    background = np.full((size, size), 25.0)
    science, template = make_pair(seed=6, science_background=background)
    result = subtract_exposures(science, template)
    mean, _, _ = clipped_stats(result.difference.arrays()[0][_good(result.difference)])
    assert mean == pytest.approx(25.0, abs=0.5)


def test_coverage_too_small_is_no_work():
    science, template = make_pair(seed=7, no_data_fraction=0.91)
    with pytest.raises(NoWorkFound) as info:
        subtract_exposures(science, template)
    assert info.value.coverage == pytest.approx(0.09, abs=0.005)


def test_kernel_failure_with_low_coverage_is_no_work():
    science, template = make_pair(seed=8, no_data_fraction=0.85)
    too_few = pd.DataFrame({"x": [100.0, 120.0], "y": [100.0, 300.0]})
    with pytest.raises(NoWorkFound, match="kernel fit failed"):
        subtract_exposures(science, template, sources=too_few)


def test_kernel_failure_with_good_coverage_is_the_error_itself():
    from diffim_dag.errors import InsufficientKernelSourcesError

    science, template = make_pair(seed=8)
    too_few = pd.DataFrame({"x": [100.0, 120.0], "y": [100.0, 300.0]})
    with pytest.raises(InsufficientKernelSourcesError):
        subtract_exposures(science, template, sources=too_few)


def test_coverage_70_percent_succeeds():
    science, template = make_pair(seed=9, no_data_fraction=0.30)
    result = subtract_exposures(science, template)
    assert result.metrics["template_coverage"] == pytest.approx(0.70, abs=0.005)
    msk = result.difference.arrays()[2]
    nodata = (msk & result.difference.bitmask("NO_DATA")) != 0
    assert nodata[:, -100:].all() and not nodata[:, :300].any()


@pytest.mark.parametrize("tile", [512, 256, 128])
def test_tiled_equals_eager(tile):
    """1, 4 and 16 tiles (one ``subtract`` task each) against the whole image as one tile: spatially varying
    PSFs (so a spatially varying kernel), non-zero origin."""
    science, template = make_pair(seed=10, psf_gradient=0.2, xy0=(1000, -300))
    eager = subtract_exposures(science, template, config=_config(tile_size=8192))
    tiled = subtract_exposures(science, template, config=_config(tile_size=tile))
    assert np.any(eager.solution.kernel_coefficients[1:, 1:] != 0)  # the kernel does vary
    for role in ("difference", "matched_template"):
        e_img, e_var, e_msk = getattr(eager, role).arrays()
        t_img, t_var, t_msk = getattr(tiled, role).arrays()
        np.testing.assert_array_equal(e_msk, t_msk)
        np.testing.assert_allclose(t_img, e_img, rtol=0, atol=1e-5 * np.abs(e_img).max())
        np.testing.assert_allclose(t_var, e_var, rtol=0, atol=1e-5 * np.abs(e_var).max())


def _tiles(box, step, seed=0):
    """DifferenceTile pieces of ``step``-sized cores covering ``box``, with random planes."""
    from diffim_dag.stages.subtract import TILE_PLANES, DifferenceTile

    rng = np.random.default_rng(seed)
    x0, x1, y0, y1 = box
    tiles = {}
    for ty in range(y0, y1, step):
        for tx in range(x0, x1, step):
            core = (tx, min(tx + step, x1), ty, min(ty + step, y1))
            shape = (core[3] - core[2], core[1] - core[0])
            planes = {n: (rng.normal(size=shape) * 100).astype(d) for n, d in TILE_PLANES}
            tiles[core] = DifferenceTile(core=core, seconds={"convolve_subtract": 1.0}, **planes)
    return tiles


def test_assemble_tiles_consumes_and_refuses_a_second_try():
    """The difference task's assembly: the same planes whether or not it takes the tiles out of their mappings;
    taking them empties the mappings (the planes are freed as they fill), and a second try on the emptied
    mappings is an error, not an image of zeros."""
    from diffim_dag.stages.subtract import TILE_PLANES, assemble_tiles

    box = (100, 230, -40, 60)  # ragged tiles, non-zero origin
    tiles = _tiles(box, 48)
    kept, seconds = assemble_tiles(tiles, box)
    # what the task gets: one mapping per tile task
    per_task = [{c: t} for c, t in tiles.items()]
    taken, seconds2 = assemble_tiles(per_task, box, consume=True)
    assert all(not m for m in per_task)
    assert seconds == seconds2 == {"convolve_subtract": float(len(tiles))}
    for name, dtype in TILE_PLANES:
        assert taken[name].dtype == dtype and taken[name].shape == (100, 130)
        np.testing.assert_array_equal(taken[name], kept[name])
        core = (148, 196, 8, 56)
        np.testing.assert_array_equal(kept[name][48:96, 48:96], getattr(tiles[core], name))
    with pytest.raises(RuntimeError, match="already assembled"):
        assemble_tiles(per_task, box, consume=True)
    partial = dict(list(tiles.items())[1:])
    with pytest.raises(RuntimeError, match="cover"):
        assemble_tiles(partial, box, consume=True)
    # the in-process task copies a tile's planes on two threads: the same planes
    threaded, seconds3 = assemble_tiles([{c: t} for c, t in tiles.items()], box, consume=True, workers=2)
    assert seconds3 == seconds
    for name, dtype in TILE_PLANES:
        assert threaded[name].dtype == dtype
        np.testing.assert_array_equal(threaded[name], kept[name])


def test_tiles_written_into_whole_planes_are_taken_as_they_are():
    """In process the tile tasks write their cores into the difference's whole planes (``TilePlanes``): the
    assembly returns those very planes, copies in only what the tiles did not write, and gives the planes that
    copying every tile gives; planes of another box are not taken."""
    import dataclasses

    from diffim_dag.stages.subtract import TILE_PLANES, TilePlanes, assemble_tiles

    box = (100, 230, -40, 60)  # ragged tiles, non-zero origin
    tiles = _tiles(box, 48, seed=3)
    expected, _ = assemble_tiles(tiles, box)
    written_names = ("mask", "convolved_image", "convolved_variance", "convolved_mask")

    def written(planes):
        return {core: dataclasses.replace(tile, planes=planes,
                                          **{n: planes.place(core, n, getattr(tile, n)) for n in written_names})
                for core, tile in tiles.items()}

    sink = TilePlanes(box)
    pieces = written(sink)
    some = next(iter(pieces.values()))
    assert some.__sizeof__() == 256 + some.image.nbytes + some.variance.nbytes  # (what it holds of its own)
    assembled, _ = assemble_tiles([{c: t} for c, t in pieces.items()], box, consume=True)
    for name, dtype in TILE_PLANES:
        assert assembled[name] is sink.planes[name] and assembled[name].dtype == dtype
        np.testing.assert_array_equal(assembled[name], expected[name])
    elsewhere = TilePlanes((0, 300, -100, 100))
    copied, _ = assemble_tiles(written(elsewhere), box)
    for name, _ in TILE_PLANES:
        assert not np.shares_memory(copied[name], elsewhere.plane(name))
        np.testing.assert_array_equal(copied[name], expected[name])


def test_masks_edge_and_template_rules():
    science, template = make_pair(seed=11)
    tmask = template.mask.values.copy()
    tmask[200, 200] |= template.bitmask("SAT")
    tmask[300, 300] |= template.bitmask("CR")  # cleared: template planes other than NO_DATA/BAD/HIGH_VARIANCE
    template = template.with_planes(mask=tmask)
    result = subtract_exposures(science, template)
    msk = result.difference.arrays()[2]
    planes = result.difference.mask_planes
    h = result.solution.half_width
    edge = (msk & planes.bitmask("EDGE")) != 0
    assert edge[:h].all() and edge[-h:].all() and edge[:, :h].all() and edge[:, -h:].all()
    assert not edge[h:-h, h:-h].any()
    sat_t = (msk & planes.bitmask("SAT_TEMPLATE")) != 0
    assert sat_t[200, 200] and sat_t[200 + h, 200 + h] and not sat_t[200 + h + 1, 200]  # dilated by the footprint
    assert not (msk & planes.bitmask("SAT")).any()
    assert not (msk & planes.bitmask("CR")).any()


def test_difference_tile_in_float32_is_the_float64_formula_and_edge_lines_are_the_bits(rng):
    """A convolveTemplate tile's difference and variance, taken in float32, are the float64 formula rounded to
    float32 bit for bit (huge, tiny, non-finite values too); the EDGE bits ORed on the border lines are the
    whole-tile plane of :func:`edge_bits_for_tile`."""
    from diffim_dag.stages.subtract import combine_tile, difference_tile, edge_bits_for_tile

    shape = (40, 50)
    si, ti, sv, tv = (rng.normal(0.0, 1.0, shape).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, shape)
                      .astype(np.float32) for _ in range(4))
    si[0, :4] = [np.nan, np.inf, -np.inf, 3.0e38]
    ti[0, :4] = [1.0, np.inf, 2.0, -3.0e38]
    sm, tm = (rng.integers(0, 8, shape).astype(np.int32) for _ in range(2))
    with np.errstate(over="ignore", invalid="ignore"):  # (3e38 − (−3e38) is inf either way)
        d, v, m = difference_tile(si, sv, sm, ti, tv, tm, mode="convolveTemplate", kernel_sum=1.0)
        np.testing.assert_array_equal(d, (si.astype(np.float64) - ti).astype(np.float32))
        np.testing.assert_array_equal(v, (sv.astype(np.float64) + tv).astype(np.float32))
        assert d.dtype == v.dtype == np.float32 and np.isinf(d[0, 3]) and np.isnan(d[0, 1])
        np.testing.assert_array_equal(m, sm | tm)
        for origin in ((0, 0), (30, 25), (60, 62)):  # a corner tile, an inner one, one on the far edges
            _, _, got = combine_tile(si, sv, sm, ti, tv, tm, None, 1.0, mode="convolveTemplate",
                                     subtract_background=False, origin=origin, xy0=(0, 0), shape=(102, 110),
                                     half_width=8, edge_bit=5)
            np.testing.assert_array_equal(got, sm | tm | edge_bits_for_tile(shape, origin, (0, 0), (102, 110), 8, 5))


def test_variance_scale_recorded_and_refused():
    from diffim_dag.errors import InputError

    science, template = make_pair(seed=12)
    var = science.variance.values * 0.5  # declared variance too small by 2 → factor ≈ 2
    result = subtract_exposures(science.with_planes(variance=var), template)
    assert result.metrics["science_variance_scale"] == pytest.approx(2.0, rel=0.05)
    with pytest.raises(InputError, match="factor"):
        subtract_exposures(science.with_planes(variance=science.variance.values * 0.05), template)


def test_variance_scale_does_not_depend_on_its_threads(rng):
    """The windows measured on threads give the factor measured in turn, bit for bit (a frame large enough for
    16 windows of 512²)."""
    from diffim_dag.stages.subtract import _windows, measure_variance_scale

    assert len(_windows((2100, 2100))) == 16
    thin = _windows((200, 8000))  # one window across the short side, four along the long one: none repeated
    assert len(thin) == 4 and len({(w[0].start, w[1].start) for w in thin}) == 4
    img = rng.normal(0.0, 3.0, (2100, 2100)).astype(np.float32)
    img[500:505, 500:505] += 400.0  # a source, left out
    var = np.full(img.shape, 4.0, np.float32)  # declared σ 2, measured 3: factor ≈ 2.25
    bad = np.zeros(img.shape, bool)
    bad[:, :40] = True
    alone = measure_variance_scale(img, var, bad, source="test", workers=1)
    assert alone == pytest.approx(2.25, rel=0.03)
    assert measure_variance_scale(img, var, bad, source="test", workers=2) == alone
    assert measure_variance_scale(img, var, bad, source="test", workers=5) == alone


def test_quality_metrics_flag_bad_subtraction():
    science, template = make_pair(seed=13)
    good = subtract_exposures(science, template)
    assert good.metrics["quality"]["verdict"] == "ok"
    assert good.metrics["quality"]["sky_ratio"] == pytest.approx(1.0, abs=0.1)
    # a kernel forced to a wrong shape: a much too wide template PSF model misleads the basis
    bad_cfg = PipelineConfig(kernel=KernelConfig(gaussian_degrees=(0,), width_multipliers=(1.0,)),
                             subtract=SubtractConfig(mode="convolveTemplate"))
    broad, _ = make_pair(sigma_science=4.5, sigma_template=1.2, seed=13)
    bad = subtract_exposures(broad, template, config=bad_cfg)
    q = bad.metrics["quality"]
    assert q["footprint_residual_ratio_mean"] > good.metrics["quality"]["footprint_residual_ratio_mean"]


def test_a_variance_far_from_the_noise_is_named_by_where_it_came_from():
    """A variance 20× below the pixel noise stops the run; the message names the file's VARIANCE plane, or the
    variance the reader built from the image (a coadd's sky and noise give no photon gain), and the factor."""
    from diffim_dag.errors import InputError
    from diffim_dag.stages.inputs import input_variance_scale

    rng = np.random.default_rng(2)
    img = rng.normal(0.0, 10.0, (200, 200)).astype(np.float32)
    exp = Exposure.from_arrays(img, np.full(img.shape, 5.0, np.float32), None,
                               info=ExposureInfo(filename="ref.fits"))
    with pytest.raises(InputError, match=r"template \(ref.fits\): VARIANCE plane disagrees .* factor (19|20)\.\d"):
        input_variance_scale(exp.with_info(variance_source="VARIANCE plane"), PipelineConfig(), "template")
    built = exp.with_info(variance_source="measured_sky+effective_gain (g=33.6)")
    with pytest.raises(InputError, match=r"its variance \(built from measured_sky\+effective_gain \(g=33.6\)\) "
                                         r"disagrees with the measured noise by a factor (19|20)\.\d"):
        input_variance_scale(built, PipelineConfig(), "template")


def test_difference_variance_is_scaled_to_its_noise_in_place_or_into_a_new_plane():
    """``scale_difference_variance``: a variance plane declared 2× too small is scaled by the measured factor
    (≈ 2); ``in_place`` scales the caller's own float32 plane where it is, to the same values."""
    from diffim_dag.stages.subtract import scale_difference_variance

    rng = np.random.default_rng(7)
    image = rng.normal(0.0, 2.0, (1024, 1024)).astype(np.float32)  # σ² = 4
    declared = np.full(image.shape, 2.0, np.float32)
    bad = np.zeros(image.shape, bool)
    new, report = scale_difference_variance(image, declared, bad)
    assert new is not declared and np.all(declared == 2.0)
    assert report["variance_scale"] == pytest.approx(2.0, rel=0.02)
    own = declared.copy()
    same, report_in_place = scale_difference_variance(image, own, bad, in_place=True)
    assert same is own and report_in_place == report
    assert np.array_equal(same, new)


def test_footprint_residual_ratio_of_each_star_as_measured_alone():
    """``quality_metrics`` measures every kernel star at once: each star's ratio is the one its own stamp gives
    (circle sums less the noise floor over the science's), and a difference that keeps 10 % of every star gives
    ≈ 0.1."""
    import math

    from diffim_dag.masks import MaskPlanes
    from diffim_dag.stages.subtract import quality_metrics

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    stars = np.array([[40.3, 50.6], [128.0, 128.5], [200.7, 90.2], [60.1, 210.9], [250.0, 10.0]])  # (last: edge)
    science = np.zeros((256, 256))
    for x, y in stars:
        science += 5e4 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5**2))
    science = (science + rng.normal(0, 5.0, science.shape)).astype(np.float32)
    difference = (0.1 * science + rng.normal(0, 5.0, science.shape)).astype(np.float32)
    variance = np.full(science.shape, 25.0, np.float32)
    out = quality_metrics(science=science, difference=difference, difference_variance=variance,
                          difference_mask=np.zeros(science.shape, np.int32), planes=MaskPlanes(), star_xy=stars,
                          fwhm=3.5, min_stars=1)
    r_in = 7.0
    half = int(math.ceil(r_in + 8.0)) + 1
    g = np.hypot(*np.mgrid[-half:half + 1, -half:half + 1])
    inner, ann = g <= r_in, (g >= r_in + 3.0) & (g <= r_in + 8.0)
    alone = []
    for x, y in stars[:4]:
        cx, cy = int(round(x)), int(round(y))
        sl = (slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
        s, d = science[sl].astype(np.float64), difference[sl].astype(np.float64)
        floor = np.sqrt(2.0 / np.pi) * np.sqrt(variance[sl][inner]).sum()
        alone.append(max(np.abs(d[inner] - np.median(d[ann])).sum() - floor, 0.0)
                     / np.abs(s[inner] - np.median(s[ann])).sum())
    assert out["footprint_residual_n_stars"] == 4  # (the star at the edge has no whole stamp)
    assert out["footprint_residual_ratio_mean"] == pytest.approx(np.mean(alone), rel=1e-12)
    assert out["footprint_residual_ratio_mean"] == pytest.approx(0.1, abs=0.02)
