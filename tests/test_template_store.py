"""Template store (patches, merge, NO_DATA, coverage), same-grid handling and the DECam round trip."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.wcs import WCS

from diffim_dag.errors import NoWorkFound
from diffim_dag.exposure import Exposure
from diffim_dag.io.fits import read_exposure, write_exposure
from diffim_dag.io.zarr_store import write_zarr
from diffim_dag.noise import robust_std
from diffim_dag.psf import GaussianPsf
from diffim_dag.stages.template import TemplateStore, grid_disagreement, prepare_template

ND = 1 << 8


def tract_wcs(shift=(0.0, 0.0), rotation_deg=0.0, crpix=(1000.0, 1000.0)):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [crpix[0] + shift[0], crpix[1] + shift[1]]
    t = np.deg2rad(rotation_deg)
    s = 0.2 / 3600
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def sky(x, y):
    return 500.0 + 0.05 * x - 0.03 * y  # a plane: Lanczos reproduces it exactly


# science parent pixel (x, y) lies at tract pixel (x + DX, y + DY)
DX, DY = -1000.0 + 7.3, -2000.0 + 4.6
PATCH, STEP = 300, 290  # 300-px patches with 10-px overlaps


def make_patch(i, j, variance):
    x0, y0 = i * STEP, j * STEP
    yy, xx = np.mgrid[y0:y0 + PATCH, x0:x0 + PATCH].astype(float)
    img = sky(xx - DX, yy - DY).astype(np.float32)
    return Exposure.from_arrays(img, np.full(img.shape, variance, np.float32), xy0=(x0, y0),
                                wcs=tract_wcs(), psf=GaussianPsf(sigma_x=1.5))


def science_exposure(size=512, x0=1000, y0=2000):
    img = np.zeros((size, size), np.float32)
    # science parent pixel p ↔ tract pixel p + (DX, DY): shift CRPIX by -(DX, DY)
    return Exposure.from_arrays(img, np.ones_like(img), xy0=(x0, y0), wcs=tract_wcs(shift=(-DX, -DY)),
                                psf=GaussianPsf(sigma_x=2.0))


def test_four_patches_one_missing(tmp_path):
    variances = {(0, 0): 4.0, (1, 0): 1.0, (0, 1): 9.0, (1, 1): 2.0}
    folder = tmp_path / "store"
    folder.mkdir()
    present = [(0, 0), (1, 0), (0, 1)]  # (1, 1) is missing
    for k, ij in enumerate(present):
        p = make_patch(*ij, variances[ij])
        if k == 1:
            write_zarr(p, folder / f"patch{ij[0]}{ij[1]}.zarr")
        else:
            write_exposure(p, folder / f"patch{ij[0]}{ij[1]}.fits")
    science = science_exposure()
    border = 8
    tmpl, metrics = prepare_template(science, store=folder, border=border)
    assert metrics["n_patches"] == 3
    img, var, msk = tmpl.arrays()
    assert tmpl.xy0 == (1000 - border, 2000 - border) and img.shape == (512 + 2 * border,) * 2
    # expected data: a present patch holds every needed tap (floor(u)-2 … floor(u)+3) of the pixel
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    u = xs + tmpl.xy0[0] + DX
    v = ys + tmpl.xy0[1] + DY
    iu, iv = np.floor(u + 1e-9), np.floor(v + 1e-9)
    expect = np.zeros(img.shape, bool)
    for i, j in present:
        x0, y0 = i * STEP, j * STEP
        expect |= (iu - 2 >= x0) & (iu + 3 <= x0 + PATCH - 1) & (iv - 2 >= y0) & (iv + 3 <= y0 + PATCH - 1)
    has = (msk & ND) == 0
    assert np.array_equal(has, expect)
    assert (~has).sum() > 200 * 200  # the missing quadrant is there
    np.testing.assert_allclose(img[has], sky(u - DX, v - DY)[has], rtol=2e-6)
    # coverage of the science pixels is reported
    s = (slice(border, -border), slice(border, -border))
    assert metrics["coverage"] == pytest.approx(has[s].mean(), abs=1e-12)
    # overlaps are inverse-variance weighted: in the (0,0)/(1,0) overlap V = Σw²V/(Σw)² with w = 1/V
    overlap = has & (u >= STEP + 3) & (u <= PATCH - 4) & (v < 200)
    assert overlap.sum() > 100
    single = var[has & (u < STEP - 5) & (v < 200)]
    right = var[has & (u > PATCH + 5) & (v < 200)]
    np.testing.assert_allclose(var[overlap], 1 / (1 / single.mean() + 1 / right.mean()), rtol=1e-4)
    # the PSF of the merged template is a (warped) Gaussian of the patches
    assert tmpl.psf.fwhm(1100, 2100) == pytest.approx(GaussianPsf(sigma_x=1.5).fwhm(), rel=0.02)


def test_too_little_coverage_is_no_work_found():
    patch = make_patch(0, 0, 1.0)
    # science box that only clips the patch corner: ~5 % covered
    science = science_exposure(size=512, x0=1000 + 160, y0=2000 + 160)
    with pytest.raises(NoWorkFound) as info:
        prepare_template(science, store=TemplateStore.from_exposures([patch]))
    assert 0.0 < info.value.coverage < 0.1
    far = science_exposure(size=200, x0=9000, y0=9000)
    with pytest.raises(NoWorkFound) as info:
        prepare_template(far, store=[patch])
    assert info.value.coverage == 0.0


def test_same_grid_is_not_warped_and_declared_grid_warns():
    science = science_exposure(size=100)
    tmpl_img = np.random.default_rng(0).normal(0, 1, (100, 100)).astype(np.float32)
    same = Exposure.from_arrays(tmpl_img, xy0=science.xy0, wcs=science.wcs.deepcopy(), psf=GaussianPsf(sigma_x=1))
    out, metrics = prepare_template(science, same, border=3)
    assert metrics["warped"] is False and metrics["grid_disagreement_px"] < 1e-6
    np.testing.assert_array_equal(out.arrays()[0][3:-3, 3:-3], tmpl_img)
    assert np.all(out.arrays()[2][:3] & ND)
    off = science.wcs.deepcopy()
    off.wcs.crpix = off.wcs.crpix + np.array([0.5, 0.0])
    off.wcs.set()
    shifted = same.with_attrs(wcs=off)
    assert grid_disagreement(science, shifted) == pytest.approx(0.5, abs=1e-6)
    with pytest.warns(UserWarning, match=r"disagree by 0\.500 px"):
        out, metrics = prepare_template(science, shifted, warp=False)
    assert metrics["warped"] is False and out.wcs is off
    out, metrics = prepare_template(science, shifted, refine=False)  # automatic: 0.5 px > 0.01 px → warp
    assert metrics["warped"] is True


def test_decam_round_trip_noise_and_source(shared_data):
    root = shared_data / "decam-n6" / "input"
    template = read_exposure(root / "DEC-OBS18a.mini.fits")
    science = read_exposure(root / "DEC-OBS04a.mini.fits")
    assert grid_disagreement(science, template) < 0.01  # one common grid
    from reproject import reproject_interp

    img, var, msk = template.arrays()
    # a WCS rotated 10° about the stamp centre and shifted
    rot = template.wcs.deepcopy()
    t = np.deg2rad(10.0)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    rot.wcs.cd = template.wcs.wcs.cd @ r
    rot.wcs.crpix = template.wcs.wcs.crpix + np.array([5.3, -3.7])
    rot.wcs.set()
    c = np.array([127.5, 127.5])
    ra, dec = template.wcs.all_pix2world([c[0]], [c[1]], 0)
    cx, cy = rot.all_world2pix(ra, dec, 0)
    # keep the stamp centre inside a 300² intermediate
    rot.wcs.crpix = rot.wcs.crpix + np.array([150 - cx[0], 150 - cy[0]])
    rot.wcs.set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mid_img, footprint = reproject_interp((img, template.wcs), rot, shape_out=(300, 300), order="nearest-neighbor")
        mid_var, _ = reproject_interp((var, template.wcs), rot, shape_out=(300, 300), order="nearest-neighbor")
    mid_msk = np.where(footprint > 0, 0, ND).astype(np.int32)
    mid = Exposure.from_arrays(np.where(footprint > 0, mid_img, np.nan), np.nan_to_num(mid_var), mid_msk, wcs=rot,
                               validate=False)
    back, metrics = prepare_template(science, mid, refine=False)
    assert metrics["warped"] is True
    bi, bv, bm = back.arrays()
    good = (bm == 0) & (msk == 0)
    # source-free pixels: below 3σ in a 7×7 smoothed original
    from scipy import ndimage

    smooth = ndimage.uniform_filter(img, 7)
    sigma0 = robust_std(img[good])
    quiet = good & (np.abs(smooth) < 3 * sigma0 / 7) & (ndimage.minimum_filter(good, 15))
    assert quiet.sum() > 5000
    s_orig, s_back = robust_std(img[quiet]), robust_std(bi[quiet])
    predicted = float(np.sqrt(np.median(bv[quiet])))
    assert s_back == pytest.approx(s_orig, rel=0.10)
    assert s_back == pytest.approx(predicted, rel=0.10)
    # the known source at (129, 128): position and flux recovered
    yy, xx = np.mgrid[0:256, 0:256]
    ap = (xx - 129) ** 2 + (yy - 128) ** 2 <= 36
    f0, f1 = img[ap].sum(), bi[ap].sum()
    assert f1 == pytest.approx(f0, rel=0.03)
    x0 = (img[ap] * xx[ap]).sum() / f0
    x1 = (bi[ap] * xx[ap]).sum() / f1
    y0 = (img[ap] * yy[ap]).sum() / f0
    y1 = (bi[ap] * yy[ap]).sum() / f1
    assert abs(x1 - x0) < 0.1 and abs(y1 - y0) < 0.1
