"""Pipeline-level acceptance of template warping and registration (issue 7).

Every case runs the subtraction after the warp (``prepare_template`` → ``subtract_exposures``) and compares
it with the correctly aligned subtraction of the same data.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from astropy.io import fits

from diffim_dag import GaussianPsf
from diffim_dag.errors import InputError
from diffim_dag.kernels.warp import AffineMapping, WcsMapping
from diffim_dag.noise import robust_std
from diffim_dag.pipeline import subtract_exposures
from diffim_dag.sim import SimConfig, simulate_pair
from diffim_dag.stages.template import prepare_template, warp_exposure

CFG = SimConfig(size=512, seed=11, sky_subtracted=True, n_cosmic_rays=0, n_transients=12)


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(CFG)


@pytest.fixture(scope="module")
def aligned(pair):
    """The reference: the simulated template warped with the true WCSs (template_offset (0.3, −0.2))."""
    template, _ = prepare_template(pair.science, pair.template)
    return template, subtract_exposures(pair.science, template, detect=True)


def _quiet_pixels(result, truth, extra_bad=None, radius=12.0):
    """Good difference pixels farther than ``radius`` from every injected object (stars included)."""
    d = result.difference
    img, var, msk = d.arrays()
    good = ((msk & d.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])) == 0) & (var > 0)
    if extra_bad is not None:
        good &= ~extra_bad
    ny, nx = img.shape
    x0, y0 = d.xy0
    pts = truth[truth["kind"] != "bad_column"]
    blocked = np.zeros((ny, nx), bool)
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = xx * xx + yy * yy <= radius * radius
    for x, y in zip(pts["x"].to_numpy() - x0, pts["y"].to_numpy() - y0):
        ix, iy = int(round(x)), int(round(y))
        ya, yb, xa, xb = max(iy - r, 0), min(iy + r + 1, ny), max(ix - r, 0), min(ix + r + 1, nx)
        if ya < yb and xa < xb:
            blocked[ya:yb, xa:xb] |= disc[ya - (iy - r): yb - (iy - r), xa - (ix - r): xb - (ix - r)]
    return good & ~blocked


def _noise_ratio(result, reference, truth):
    """Robust std of the two differences over the quiet pixels good in both."""
    both = _quiet_pixels(result, truth) & _quiet_pixels(reference, truth)
    assert both.mean() > 0.3
    return robust_std(result.difference.arrays()[0][both]) / robust_std(reference.difference.arrays()[0][both])


def _transient_fluxes(result, truth, min_snr=20.0):
    tr = truth[(truth["kind"] == "transient") & (truth["snr_difference"] >= min_snr)]
    cat = result.dia_sources[~result.dia_sources["sky_source"]]
    out = []
    for _, t in tr.iterrows():
        d = np.hypot(cat["x"] - t["x"], cat["y"] - t["y"])
        out.append(float(cat["psf_flux"].to_numpy()[int(np.argmin(d))]) if len(d) and d.min() <= 2 else np.nan)
    return np.array(out)


# ------------------------------------------------------------------------------------ no WCS


@pytest.mark.slow
def test_registration_without_wcs_shift_and_rotation(pair, aligned):
    """Template offset by (37.3, −12.8) px and rotated 2°, no WCS: star registration, warp, subtract."""
    science, template = pair.science, pair.template
    n = CFG.size[0]
    # the misaligned template: its pixel (x, y) shows the simulated template's pixel T(x, y)
    true_t = AffineMapping.similarity(rotation=math.radians(2.0), shift=(37.3, -12.8),
                                      center=(n / 2, n / 2))
    moved = warp_exposure(template, true_t, template.bbox).with_attrs(wcs=None)
    science_nowcs = science.with_attrs(wcs=None)
    warped, metrics = prepare_template(science_nowcs, moved)
    assert metrics["registration"] == "stars" and metrics["warped"]
    # the fitted science → moved-template mapping against the truth T⁻¹ ∘ (template offset)
    reg = AffineMapping(metrics["registration_transform"]["matrix"], metrics["registration_transform"]["offset"])
    expect = AffineMapping.shift(*CFG.template_offset).then(true_t.inverse())
    gx, gy = np.meshgrid(np.linspace(50, n - 50, 21), np.linspace(50, n - 50, 21))
    u1, v1 = reg(gx, gy)
    u2, v2 = expect(gx, gy)
    rms = float(np.sqrt(np.mean((u1 - u2) ** 2 + (v1 - v2) ** 2)))
    assert rms < 0.05, f"registration error {rms:.4f} px RMS (star residual {metrics['registration_rms_px']:.4f})"
    assert metrics["alignment_rms_after_px"] < 0.1
    result = subtract_exposures(science_nowcs, warped, detect=True)
    ratio = _noise_ratio(result, aligned[1], pair.truth)
    assert abs(ratio - 1) < 0.10, f"noise std ratio {ratio:.3f}"


def _stamp(n: int, stars, seed: int):
    """An ``n``² exposure of sky noise with Gaussian stars at ``stars`` [(x, y, flux)], no WCS."""
    from diffim_dag import Exposure
    from diffim_dag.sim import add_sources

    img = np.random.default_rng(seed).normal(0.0, 5.0, (n, n))
    xs, ys, fs = (np.array(c, dtype=float) for c in zip(*stars)) if stars else (np.zeros(0),) * 3
    add_sources(img, xs, ys, fs, GaussianPsf(1.5))
    return Exposure.from_arrays(img.astype(np.float32), np.full((n, n), 25.0, np.float32), None)


def test_frames_without_wcs_or_stars_to_register_are_taken_as_one_grid(caplog):
    """Two same-size frames with no WCS and fewer than 3 stars (an alert stamp, a sparse field) are taken as one
    pixel grid, as HOTPANTS takes its inputs, with a warning that says so; frames of different sizes cannot be,
    and the error names both."""
    stars = [(20.0, 30.0, 4000.0), (60.0, 45.0, 6000.0)]
    science, template = _stamp(80, stars, 1), _stamp(80, stars, 2)
    with caplog.at_level("WARNING"):
        out, metrics = prepare_template(science, template)
    assert not metrics["warped"] and metrics["registration"].startswith("none") and metrics["coverage"] == 1.0
    np.testing.assert_array_equal(out.arrays()[0], template.arrays()[0])
    assert "taken as one pixel grid" in caplog.text
    with pytest.raises(InputError, match=r"cannot register template .* on science .*: no WCS and too few stars"):
        prepare_template(science, _stamp(96, stars, 3))


# ------------------------------------------------------------------------------------ wrong WCS


@pytest.mark.slow
def test_wrong_science_wcs_is_refined(pair, aligned):
    """The science WCS is wrong by 6 px (its pixels are right): refinement, then the same subtraction."""
    science = pair.science
    wrong = science.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix + np.array([6.0 * math.cos(0.6), 6.0 * math.sin(0.6)])
    wrong.wcs.set()
    bad_science = science.with_attrs(wcs=wrong)
    warped, metrics = prepare_template(bad_science, pair.template)
    assert metrics["refined"], metrics
    assert metrics["alignment_rms_before_px"] > 5.0
    assert metrics["alignment_rms_after_px"] < 0.1
    # the warped template agrees with the correctly aligned one (pixel values, on good pixels)
    ref_t, ref = aligned
    a, _, ma = warped.arrays()
    b, vb, mb = ref_t.arrays()
    ok = (ma == 0) & (mb == 0) & (vb > 0)
    assert robust_std((a[ok] - b[ok]) / np.sqrt(vb[ok])) < 0.1
    result = subtract_exposures(bad_science, warped, detect=True)
    ratio = _noise_ratio(result, ref, pair.truth)
    assert abs(ratio - 1) < 0.10, f"noise std ratio {ratio:.3f}"
    f_wrong = _transient_fluxes(result, pair.truth)
    f_ref = _transient_fluxes(ref, pair.truth)
    both = np.isfinite(f_wrong) & np.isfinite(f_ref)
    assert both.sum() >= 5
    r = f_wrong[both] / f_ref[both]
    assert abs(np.median(r) - 1) < 0.10 and np.all(np.abs(r - 1) < 0.10), np.round(r, 3)


# ------------------------------------------------------------------------------------ real data


def _decam(shared_data, name):
    from diffim_dag.io import read_exposure

    path = shared_data / "decam-n6" / "input" / f"DEC-{name}.mini.fits"
    return read_exposure(path).with_attrs(psf=GaussianPsf.from_fwhm(fits.getheader(path)["FWHM"]))


def _psf_snr(result, x=129, y=128, half=10):
    img, var, _ = result.difference.arrays()
    psf = result.difference.psf.kernel_image(x, y, size=2 * half + 1)
    sl = (slice(y - half, y + half + 1), slice(x - half, x + half + 1))
    w = 1.0 / var[sl]
    flux = (psf * img[sl] * w).sum() / (psf**2 * w).sum()
    return flux * np.sqrt((psf**2 * w).sum())


@pytest.mark.realdata
def test_decam_template_on_rotated_grid(shared_data):
    """The DECam template reprojected onto a TAN grid rotated 10° and shifted, warped back by the pipeline."""
    from astropy.wcs import WCS

    science, template = _decam(shared_data, "OBS04a"), _decam(shared_data, "OBS18a")
    ref = subtract_exposures(science, template)
    n = 320  # covers the 256² stamp after a 10° rotation
    ra, dec = template.pixel_to_sky(127.5, 127.5)
    scale = 0.2623 / 3600
    t = math.radians(10.0)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    w.wcs.crpix = [n / 2 + 0.5 + 7.37, n / 2 + 0.5 - 4.61]  # centre shifted by (7.37, −4.61) px
    w.wcs.cd = scale * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    w.wcs.set()
    rotated = warp_exposure(template, WcsMapping(w, template.wcs), (0, n, 0, n), wcs=w)
    warped, metrics = prepare_template(science, rotated)
    # two Lanczos-3 resamplings eat ~3 px on each side of the stamp: ~9% of a 256² stamp
    assert metrics["warped"] and metrics["coverage"] > 0.85
    result = subtract_exposures(science, warped)
    img_r, _, _ = result.difference.arrays()
    img_a, _, msk_a = ref.difference.arrays()
    _, _, msk_r = result.difference.arrays()
    yy, xx = np.mgrid[0:256, 0:256]
    far = (msk_a == 0) & (msk_r == 0) & (np.hypot(xx - 129, yy - 128) > 15) & (np.hypot(xx - 60, yy - 181) > 20)
    ratio = robust_std(img_r[far]) / robust_std(img_a[far])
    assert abs(ratio - 1) < 0.10, f"noise std ratio {ratio:.3f}"
    snr_r, snr_a = _psf_snr(result), _psf_snr(ref)
    assert snr_a > 8
    assert abs(snr_r / snr_a - 1) < 0.10, f"S/N {snr_r:.2f} (rotated template) vs {snr_a:.2f} (aligned)"


def test_alignment_windows_searched_at_the_whole_images_binning():
    """A frame of 4 Mpix or more has its alignment windows searched binned 2×2, as the whole frame would be; the
    stars found are those of the unbinned search, with the same centroids."""
    import numpy as np
    from scipy.spatial import cKDTree

    from diffim_dag import Exposure
    import diffim_dag.psf.estimate as est
    from diffim_dag.sim import add_sources
    from diffim_dag.stages.template import _stars, alignment_windows
    from diffim_dag.psf import GaussianPsf

    rng = np.random.default_rng(7)
    n = 2048
    psf = GaussianPsf(1.5)
    img = rng.normal(100.0, 5.0, (n, n))
    xs, ys = rng.uniform(10, n - 10, 3000), rng.uniform(10, n - 10, 3000)
    add_sources(img, xs, ys, rng.uniform(3e3, 5e4, 3000), psf)
    exp = Exposure.from_arrays(img.astype(np.float32), np.full((n, n), 25.0, np.float32), psf=psf)
    windows = alignment_windows(exp.bbox, side=512)
    seen = []
    original = est.find_psf_stars

    def spy(*args, **kwargs):
        seen.append(kwargs.get("binning"))
        return original(*args, **kwargs)

    est.find_psf_stars = spy
    try:
        binned = _stars(exp, windows=windows)
        est.BIN_PIXELS, saved = n * n + 1, est.BIN_PIXELS  # the frame now counts as small: unbinned windows
        try:
            unbinned = _stars(exp, windows=windows)
        finally:
            est.BIN_PIXELS = saved
    finally:
        est.find_psf_stars = original
    assert seen == [2] * len(windows) + [1] * len(windows)
    assert len(binned) >= 0.9 * len(unbinned) > 20
    d, _ = cKDTree(unbinned[:, :2]).query(binned[:, :2])
    assert np.mean(d < 0.01) > 0.9


@pytest.mark.parametrize("given", ["none", "both", "science"])
def test_the_graph_checks_the_warp_on_its_psf_stages_stars_and_refines_a_wrong_wcs(pair, given):
    """The visit graph's alignment check is its inputs task's: it matches the stars the exposure tasks centroided
    for their PSFs (``given="none"``), or searches the images whose PSF was supplied (both: in the alignment
    windows; one: the whole image, as the other's PSF stars).  A science WCS wrong by 6 px is refined there: the
    raw template warped again and its input stages run again on it, and the subtraction is as good as the aligned
    one."""
    from diffim_dag.config import PipelineConfig
    from diffim_dag.pipeline import run_subtraction

    wrong = pair.science.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix + np.array([6.0, 0.0])
    wrong.wcs.set()
    science = pair.science.with_attrs(wcs=wrong, psf=pair.science.psf if given in ("both", "science") else None)
    template = pair.template.with_attrs(psf=pair.template.psf if given == "both" else None)
    result = run_subtraction(science, template, config=PipelineConfig(), out_dir=None)
    m = result.metrics["template"]
    assert m["registration"] == "wcs" and m["refined"] is True, m
    assert m["alignment_rms_before_px"] > 5.0 and m["alignment_rms_after_px"] < 0.1
    assert m["alignment_n_matched_after"] >= 5 and 0.9 < m["coverage"] <= 1.0  # (a sparse field: 12 bright stars)
    origins = {role: result.metrics["psf"][role]["origin"] for role in ("science", "template")}
    assert origins == {"science": "estimated" if given == "none" else "supplied",
                       "template": "supplied" if given == "both" else "estimated"}
    assert "alignment_check" in result.metrics["timings_s"]
    assert result.metrics["quality"]["verdict"] == "ok", result.metrics["quality"]


def test_a_refinement_of_files_reads_the_template_again(pair, tmp_path):
    """From files (the command line's path) the check does not hold the raw template: a refinement reads it again.
    A science WCS wrong by 6 px, both PSFs estimated: refined, and the same warp as with the exposures in hand."""
    from diffim_dag.config import PipelineConfig
    from diffim_dag.io import write_exposure
    from diffim_dag.pipeline import run_subtraction, subtract_files

    wrong = pair.science.wcs.deepcopy()
    wrong.wcs.crpix = wrong.wcs.crpix + np.array([6.0, 0.0])
    wrong.wcs.set()
    science = pair.science.with_attrs(wcs=wrong, psf=None)
    template = pair.template.with_attrs(psf=None)
    write_exposure(science, tmp_path / "science.fits")
    write_exposure(template, tmp_path / "template.fits")
    subtract_files(str(tmp_path / "science.fits"), str(tmp_path / "template.fits"), config=PipelineConfig(),
                   out_dir=tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["template"]
    assert m["refined"] is True and m["alignment_rms_before_px"] > 5.0 and m["alignment_rms_after_px"] < 0.1
    in_hand = run_subtraction(science, template, config=PipelineConfig(), out_dir=None).metrics["template"]
    assert m["refine_correction"] == in_hand["refine_correction"]
    assert m["alignment_rms_after_px"] == pytest.approx(in_hand["alignment_rms_after_px"], abs=1e-9)
