"""Kernel-source selection, plus the simulated science/template pairs the kernel tests share."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffim_dag.config import KernelSourceConfig
from diffim_dag.errors import InsufficientKernelSourcesError
from diffim_dag.exposure import Exposure, ExposureInfo
from diffim_dag.psf import GaussianPsf
from diffim_dag.stages.kernel_sources import select_kernel_sources

STAR_STAMP = 41


def star_positions(shape, n_stars, rng, *, margin=48):
    """Jittered grid of ``n_stars`` positions (array frame), spaced for isolation."""
    ny, nx = shape
    nside = int(np.ceil(np.sqrt(n_stars)))
    gx = np.linspace(margin, nx - 1 - margin, nside)
    gy = np.linspace(margin, ny - 1 - margin, nside)
    xx, yy = np.meshgrid(gx, gy)
    pos = np.column_stack([xx.ravel(), yy.ravel()])
    pick = rng.choice(len(pos), size=n_stars, replace=False)
    jitter = 0.15 * min(gx[1] - gx[0] if nside > 1 else 0, gy[1] - gy[0] if nside > 1 else 0)
    return pos[pick] + rng.uniform(-jitter, jitter, size=(n_stars, 2))


def render(shape, xy, fluxes, psf, *, xy0=(0, 0), size=STAR_STAMP):
    """Sum of PSF stars at array positions ``xy`` (PSF evaluated at parent positions)."""
    img = np.zeros(shape)
    h = size // 2
    ny, nx = shape
    for (x, y), f in zip(xy, fluxes):
        ix, iy = int(round(x)), int(round(y))
        stamp = psf.kernel_image(x + xy0[0], y + xy0[1], size=size, offset=(x - ix, y - iy))
        y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
        sy0, sx0 = max(0, -y0), max(0, -x0)
        sy1, sx1 = size - max(0, y1 - ny), size - max(0, x1 - nx)
        img[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)] += f * stamp[sy0:sy1, sx0:sx1]
    return img


def make_pair(
    shape=(512, 512),
    n_stars=40,
    *,
    psf_science=GaussianPsf(2.0),
    psf_template=GaussianPsf(1.4),
    seed=1,
    xy0=(100, 200),
    sky_science=5.0,
    sky_template=2.5,
    snr_range=(60.0, 400.0),
    scale=1.0,
    background=0.0,
    variable=None,
    positions=None,
):
    """A science/template pair of Gaussian-PSF stars with Gaussian sky noise.

    science = scale × (template stars, re-rendered with the science PSF) + background;
    ``variable`` maps star index → extra flux factor in the science image.
    Returns ``(science, template, truth)``; truth has parent ``x, y, flux``.
    """
    rng = np.random.default_rng(seed)
    xy = star_positions(shape, n_stars, rng) if positions is None else np.asarray(positions, float)
    sigma = psf_science.sigma()
    snr = np.exp(rng.uniform(*np.log(snr_range), size=len(xy)))
    flux = snr * sky_science * np.sqrt(4 * np.pi * sigma**2)
    sci_flux = scale * flux.copy()
    for k, f in (variable or {}).items():
        sci_flux[k] *= f
    sci = render(shape, xy, sci_flux, psf_science, xy0=xy0) + background
    tmp = render(shape, xy, flux, psf_template, xy0=xy0)
    sci += rng.normal(0.0, sky_science, shape)
    tmp += rng.normal(0.0, sky_template, shape)
    science = Exposure.from_arrays(sci, np.full(shape, sky_science**2), xy0=xy0, psf=psf_science,
                                   info=ExposureInfo(band="r", visit=1))
    template = Exposure.from_arrays(tmp, np.full(shape, sky_template**2), xy0=xy0, psf=psf_template,
                                    info=ExposureInfo(band="r"))
    truth = pd.DataFrame({"x": xy[:, 0] + xy0[0], "y": xy[:, 1] + xy0[1], "flux": flux})
    return science, template, truth


def test_detection_finds_stars_with_parent_coordinates():
    sci, tmp, truth = make_pair(n_stars=36, seed=3)
    sources, stats = select_kernel_sources(sci, tmp, 21)
    assert stats["origin"].startswith("detected")
    assert len(sources) >= 30
    # every selected source is one of the injected stars (parent frame, xy0 != 0)
    d = np.hypot(sources["x"].to_numpy()[:, None] - truth["x"].to_numpy()[None],
                 sources["y"].to_numpy()[:, None] - truth["y"].to_numpy()[None]).min(axis=1)
    assert np.all(d < 0.5)
    snr = sources["snr"].to_numpy()
    assert np.all(np.diff(snr) <= 0) and snr.min() >= 10 and snr.max() <= 500
    # measured S/N follows the injected one (flux / (sky sqrt(4 pi sigma^2)))
    k = np.argmin(np.hypot(truth["x"].to_numpy()[:, None] - sources["x"].to_numpy()[None],
                           truth["y"].to_numpy()[:, None] - sources["y"].to_numpy()[None]), axis=0)
    expected = truth["flux"].to_numpy()[k] / (5.0 * np.sqrt(4 * np.pi * 4.0))
    assert np.median(snr / expected) == pytest.approx(1.0, abs=0.1)


def test_binned_detection_finds_the_stars_unbinned_detection_finds(monkeypatch):
    import diffim_dag.psf.estimate as est
    from diffim_dag.stages import kernel_sources as ks

    sci, _, truth = make_pair(n_stars=49, seed=5, snr_range=(12.0, 400.0))
    config = KernelSourceConfig()
    monkeypatch.setattr(est, "BIN_PIXELS", 10**12)
    full = ks.detect_sources(sci, config)
    monkeypatch.setattr(est, "BIN_PIXELS", 0)  # every image binned 2×2
    binned = ks.detect_sources(sci, config)

    def nearest(found):
        return np.hypot(truth["x"].to_numpy()[:, None] - found["x"].to_numpy()[None],
                        truth["y"].to_numpy()[:, None] - found["y"].to_numpy()[None]).min(axis=1)

    # the stars the full-resolution filter finds, the binned one finds too, at their positions to a fraction of a
    # pixel (S/N 12 … 400), and with no offset on average (a binned pixel's centre mapped back half a pixel off
    # would show as one)
    seen = nearest(full) < 1.0
    assert seen.sum() >= 45
    d = nearest(binned)
    assert np.all(d[seen] < 1.0) and np.median(d[seen]) < 0.2
    k = np.argmin(np.hypot(truth["x"].to_numpy()[:, None] - binned["x"].to_numpy()[None],
                           truth["y"].to_numpy()[:, None] - binned["y"].to_numpy()[None]), axis=1)
    for axis in ("x", "y"):
        offset = binned[axis].to_numpy()[k] - truth[axis].to_numpy()
        assert abs(np.mean(offset[seen])) < 0.1
    assert len(binned) <= len(full) + 2  # (no crop of spurious detections from the binning)


def test_binned_background_is_the_full_resolution_one_at_a_quarter_of_the_pixels(monkeypatch):
    import diffim_dag.psf.estimate as est
    from diffim_dag.stages import kernel_sources as ks

    # what is left of a sky after its subtraction (a slope and a broad bump of 10 counts) under stars, noise σ 5
    sci, _, _ = make_pair(shape=(512, 512), n_stars=49, seed=7, snr_range=(12.0, 400.0))
    yy, xx = np.mgrid[0:512, 0:512]
    sky = 0.01 * xx - 0.005 * yy + 10.0 * np.exp(-((xx - 300.0) ** 2 + (yy - 200.0) ** 2) / (2 * 150.0**2))
    img, var, msk = sci.arrays()
    sci = Exposure.from_arrays(img + sky.astype(np.float32), var, msk, xy0=sci.xy0, psf=sci.psf, info=sci.info)
    config = KernelSourceConfig()
    monkeypatch.setattr(est, "BIN_PIXELS", 10**12)
    full = ks.science_background(sci, config)
    monkeypatch.setattr(est, "BIN_PIXELS", 0)  # binned 2×2
    b, binned, _ = ks.binned_science(sci, config)
    block = ks.science_background(sci, config)
    assert b == 2 and binned.shape == (256, 256) and isinstance(block.level, ks.BlockLevel)
    assert block.level.nbytes == 256 * 256 * 4
    # the level of every pixel, from its block: the full-resolution mesh's to a small fraction of the noise
    rows, cols = np.mgrid[16:496:3, 16:496:3]
    assert np.abs(block.level[rows, cols] - full.level[rows, cols]).max() < 0.2 * 5.0
    assert np.median(np.abs(block.level[rows, cols] - sky[rows, cols])) < 0.05 * 5.0
    # a block's own value, repeated over its pixels
    assert block.level[np.array([6, 7]), np.array([9, 8])].tolist() == [block.level.binned[3, 4] / 4] * 2
    # an odd side's last row and column, which the binning left out, take the last block's
    odd = ks.BlockLevel(np.arange(6, dtype=np.float32).reshape(2, 3), 2)  # a 5 × 7 image's blocks
    assert odd[np.array([4, 4, 3]), np.array([6, 5, 1])].tolist() == [5 / 4, 5 / 4, 3 / 4]
    # the rms: a sum of 4 pixels' noise, twice a pixel's
    ratio = block.rms.sampled(8) / full.rms.sampled(16)[: 32, : 32]
    assert np.median(ratio) == pytest.approx(2.0, rel=0.05)


def test_binned_psf_is_the_odd_centred_matched_filter_of_a_binned_star():
    from diffim_dag.stages.kernel_sources import binned_psf

    for size, sigma in ((15, 1.5), (17, 2.0), (37, 4.0)):
        psf = GaussianPsf(sigma).kernel_image(0.0, 0.0, size=size)
        b = binned_psf(psf)
        assert b.shape[0] == b.shape[1] and b.shape[0] % 2 == 1
        np.testing.assert_allclose(b, b[::-1, ::-1], rtol=1e-12, atol=1e-15)  # centred, symmetric
        np.testing.assert_allclose(b, b.T, rtol=1e-12, atol=1e-15)
        c = b.shape[0] // 2
        assert np.unravel_index(np.argmax(b), b.shape) == (c, c)
        # a Gaussian star binned 2×2 is a Gaussian of about half the width: the filter's second moment says so
        g = np.arange(b.shape[0]) - c
        var = (b.sum(axis=0) * g**2).sum() / b.sum()
        expected = (sigma**2 + 0.5) / 4.0  # (the ½, 1, ½ weights add ½ px² before the sampling)
        assert var == pytest.approx(expected, rel=0.05)


def test_cuts_edge_mask_isolation_snr_and_max_sources():
    shape = (400, 400)
    pos = [(200, 200), (10, 200), (300, 100), (100, 300), (112, 300), (300, 300), (150, 100), (200, 330), (250, 250)]
    sci, tmp, truth = make_pair(shape, positions=pos, seed=7, snr_range=(100, 100.0001))
    img, var, msk = tmp.arrays()
    msk = msk.copy()
    msk[100 - 15, 300 + 3] |= tmp.bitmask("SAT")  # template SAT pixel in the stamp of (300, 100)
    tmp = tmp.with_planes(mask=msk)
    cat = truth[["x", "y"]].copy()
    cat.loc[len(cat)] = (cat.x.iloc[-1] + 0.0, cat.y.iloc[-1] + 0.0)
    faint = pd.DataFrame({"x": [50.0 + 100], "y": [50.0 + 200]})  # a star at S/N ≈ 6
    img = sci.arrays()[0] + render(shape, [(50.0, 50.0)], [6.0 * 5.0 * np.sqrt(4 * np.pi * 4.0)], GaussianPsf(2.0))
    sci = sci.with_planes(image=img)
    cat = pd.concat([cat, faint], ignore_index=True)
    cfg = KernelSourceConfig(max_sources=3)
    sources, stats = select_kernel_sources(sci, tmp, 21, cfg, catalog=cat)
    r = stats["rejected"]
    assert stats["found"] == len(cat)
    assert r["outside"] == 1  # (10, 200): 43-px stamp leaves the image
    assert r["masked"] == 1  # SAT pixel in the template stamp
    assert r["not_isolated"] == 4  # the (100,300)/(112,300) pair and the duplicated last star
    assert r["snr_low"] == 1
    assert len(sources) == 3 and r["max_sources"] == 1
    assert sum(r.values()) + len(sources) == stats["found"]


def test_not_point_like_source_is_cut():
    pos = [(100, 100), (200, 100), (300, 100), (100, 250), (250, 250)]
    sci, tmp, truth = make_pair((400, 400), positions=pos, seed=2, snr_range=(150, 150.001))
    img = sci.arrays()[0].copy()
    galaxy = GaussianPsf(6.0).kernel_image(size=41) * 60000.0
    img[300 - 20 : 300 + 21, 300 - 20 : 300 + 21] += galaxy
    sci = sci.with_planes(image=img)
    cat = pd.concat([truth[["x", "y"]], pd.DataFrame({"x": [300.0 + 100], "y": [300.0 + 200]})], ignore_index=True)
    strict = KernelSourceConfig(min_point_snr2=0)  # never admit extended sources
    sources, stats = select_kernel_sources(sci, tmp, 21, strict, catalog=cat)
    assert stats["rejected"]["not_point_like"] == 1
    assert len(sources) == 5 and stats["extended_admitted"] == 0
    # 5 stars at S/N 150: Σ S/N² ≈ 1.1e5 is enough under the default (1e5)
    sources, stats = select_kernel_sources(sci, tmp, 21, catalog=cat)
    assert stats["point_like"] == 5 and abs(stats["point_snr2"] / (5 * 150**2) - 1) < 0.1
    assert stats["rejected"]["not_point_like"] == 1 and stats["extended_admitted"] == 0
    # ask for more point-source signal than they carry: the isolated galaxy is admitted as well
    sources, stats = select_kernel_sources(sci, tmp, 21, KernelSourceConfig(min_point_snr2=1e6), catalog=cat)
    assert stats["extended_admitted"] == 1
    assert stats["rejected"]["not_point_like"] == 0 and len(sources) == 6
    assert sources["size_ratio"].max() > KernelSourceConfig().max_size_ratio


def test_too_few_sources_raises_with_counts():
    sci, tmp, truth = make_pair((300, 300), positions=[(150, 150), (15, 150), (150, 60), (5, 5)], seed=4)
    with pytest.raises(InsufficientKernelSourcesError) as info:
        select_kernel_sources(sci, tmp, 21, catalog=truth)
    err = info.value
    assert err.found == 4 and err.used == 2
    assert err.rejected["outside"] == 2  # (15, 150) and (5, 5): their 43-px stamps leave the image
    assert "only 2 kernel source(s) left of 4" in str(err) and "outside: 2" in str(err)


def test_batched_source_measures_equal_a_source_by_source_reference(monkeypatch):
    """The kernel sources' flux, S/N and size ratio, measured in batches of stamps (PSFs rendered together),
    equal the plain per-source computation: a grid PSF that varies over the image, sub-pixel positions,
    zero-variance pixels, batches that do not divide the sources."""
    import math

    from diffim_dag.noise import measure_background
    from diffim_dag.psf import GridPsf, MoffatPsf
    from diffim_dag.stages import kernel_sources as ks

    rng = np.random.default_rng(4)
    ny, nx, xy0 = 300, 340, (50, 80)
    nodes = np.stack([np.stack([MoffatPsf(fwhm_pixels=2.8 + 0.6 * i + 0.3 * j, beta=3.5).kernel_image(size=31)
                                for i in range(3)]) for j in range(3)])
    psf = GridPsf(nodes, [60, 200, 380], [90, 230, 370])
    img = (100.0 + rng.normal(0, 4.0, (ny, nx))).astype(np.float32)
    var = np.full((ny, nx), 16.0, np.float32)
    var[rng.random((ny, nx)) < 0.02] = 0.0
    n, half = 23, 9
    x = rng.uniform(xy0[0] + half + 1, xy0[0] + nx - half - 2, n)
    y = rng.uniform(xy0[1] + half + 1, xy0[1] + ny - half - 2, n)
    exp = Exposure.from_arrays(img, var, None, xy0=xy0, psf=psf)
    background = measure_background(img, None, box=64, rms=False)
    monkeypatch.setattr(ks, "MEASURE_BATCH", 5)
    got = ks.measure_sources(exp, x, y, half, background)

    def trace(stamp, xc, yc, sigma_w):
        g = np.arange(stamp.shape[0], dtype=np.float64)
        dx, dy = g[None, :] - xc, g[:, None] - yc
        w = np.exp(-0.5 * (dx * dx + dy * dy) / sigma_w**2) * stamp
        tot = w.sum()
        if not tot > 0:
            return float("nan")
        mx, my = (w * dx).sum() / tot, (w * dy).sum() / tot
        return float((w * ((dx - mx) ** 2 + (dy - my) ** 2)).sum() / tot)

    for k in range(n):
        ix, iy = int(round(x[k])), int(round(y[k]))
        sl = (slice(iy - xy0[1] - half, iy - xy0[1] + half + 1), slice(ix - xy0[0] - half, ix - xy0[0] + half + 1))
        stamp = img[sl].astype(np.float64) - background.level[sl]
        v = var[sl].astype(np.float64)
        off = (x[k] - ix, y[k] - iy)
        p = psf.kernel_image(x[k], y[k], size=2 * half + 1, offset=off)
        w = np.where(v > 0, 1.0 / np.where(v > 0, v, 1.0), 0.0)
        ppw = (p * p * w).sum()
        flux = (p * stamp * w).sum() / ppw
        sigma_w = psf.sigma(x[k], y[k])
        ratio = trace(stamp, half + off[0], half + off[1], sigma_w) / trace(p, half + off[0], half + off[1], sigma_w)
        np.testing.assert_allclose(got["flux"][k], flux, rtol=1e-10)
        np.testing.assert_allclose(got["snr"][k], flux * math.sqrt(ppw), rtol=1e-10)
        np.testing.assert_allclose(got["size_ratio"][k], ratio, rtol=1e-10, equal_nan=True)
