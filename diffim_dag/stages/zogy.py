r"""ZOGY subtraction stage: flux ratio → cell grid → one ZOGY task per cell → seamless blend → detect.

The maths of one cell is in :mod:`diffim_dag.kernels.zogy` (Zackay, Ofek & Gal-Yam 2016).
This stage

1. checks the template coverage and rescales both variance planes (as the AL path);
2. finds the photometric ratio :math:`\kappa = F_n / F_r` (science counts per template count
   of a constant source): from the two ``PhotoCalib`` zero points,
   :math:`\kappa = 10^{0.4 (z_n - z_r)}`, when both exposures have one, else fitted as the
   clipped mean of aperture-flux ratios of stars detected in both
   (:func:`fit_flux_ratio`); ``ZogyConfig.flux_ratio`` overrides both;
3. splits the image into ``grid_cells × grid_cells`` cells whose cores partition the
   image (:func:`~diffim_dag.kernels.zogy.cell_cores`), each blended into its neighbours
   over ``overlap`` pixels with C¹ cosine weights that sum to one
   (:func:`~diffim_dag.kernels.zogy.blend_weights`);
4. for each cell (one Dask task): the PSFs of both exposures evaluated at the cell centre
   (the spatial variation of the PSFs is followed cell by cell), their centroids checked
   (> ``max_centroid_offset`` px apart is an error), the noise :math:`\sigma_n^2, \sigma_r^2`
   as the clipped mean of the variance planes over the cell, and
   :func:`~diffim_dag.kernels.zogy.zogy_cell` on the cell's support plus ``margin``
   pixels of real data, padded with noise to a fast FFT length;
5. blends the weighted cells into :math:`D_N`, :math:`V(D_N)`, :math:`S`, :math:`V(S)` and
   forms :math:`S_\mathrm{corr} = S / \sqrt{V(S)}`;
   the cells run in batches of about twice the worker threads, each batch's float32
   planes added into the preallocated full-frame planes before the next batch starts (so
   the cell results held at once are one batch's, and the sums are the same bit for bit);
6. masks: science mask OR the template's kept planes (``SAT`` → ``SAT_TEMPLATE``), both
   dilated by the PSF footprint; noise-filled input pixels (non-finite, ``NO_DATA``,
   ``BAD``, ``SAT``) are ``NO_DATA`` when non-finite; ``EDGE`` within the PSF half-width
   of the border;
7. optionally detects on :math:`S_\mathrm{corr}` and measures on :math:`D_N` (PSF :math:`P_D`).

Inputs must be background-subtracted (calibrated exposures and coadds are): ZOGY has no
differential-background term.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import KernelSourceConfig, PipelineConfig, ZogyConfig  # noqa: F401  (ZogyConfig re-exported)
from ..errors import DiffimError
from ..exposure import Exposure
from ..kernels import zogy as zk
from ..kernels.decorrelate import clipped_mean_variance
from ..kernels.maskops import (FlaggedPixels, dilate_mask, edge_mask, has_bits, lacks_bits,
                              template_mask_for_difference)
from ..memory import map_on_threads, release_freed_memory, started_on_thread
from ..noise import MAX_STAT_SAMPLES, clipped_stats, row_strips
from .photometry import aperture_flux_ratio
from .verdict import background_left
from .inputs import SubtractionResult, Timings, prepare_inputs
from .runner import IN_TURN
from ..psf import GridPsf, ImagePsf
from ..psf.models import _kernel_from_image, _resize_centred

__all__ = ["ZogyConfig", "ScoreSubtractionResult", "CellPsf", "flux_ratio", "fit_flux_ratio", "zogy_cell_task",
           "subtract_zogy"]

log = logging.getLogger(__name__)


@dataclass
class ScoreSubtractionResult(SubtractionResult):
    """A :class:`~diffim_dag.stages.inputs.SubtractionResult` with the score exposure of a score method.

    ``score`` holds the score image and its variance plane, so that
    ``score.image / sqrt(score.variance)`` is the detection significance (written as
    ``score.fits``).  ZOGY has no PSF-matching kernel: ``kernel_fit`` is None there.
    """

    score: Exposure | None = None


class CellPsf(GridPsf):
    """:math:`P_D` of every ZOGY cell, bilinearly interpolated between the cell centres.

    A :class:`~diffim_dag.psf.GridPsf` that keeps one :class:`~diffim_dag.psf.ImagePsf` per node
    (GridPsf builds a new one, with its FWHM measurement, at every call, which dominated the
    measurement time: 35 s for a 1024² difference).  Rendering at ``(x, y)`` with a sub-pixel
    ``offset`` is linear in the image, so the nodes' images are interpolated first and the result
    is shifted once (one Lanczos render per call instead of one per node).
    """

    kind = "grid"

    def __init__(self, images, x_nodes, y_nodes, *, source: str = "ZOGY P_D"):
        super().__init__(images, x_nodes, y_nodes, source=source)
        self._nodes = [[ImagePsf(self.images[j, i], source=source, normalized=True)
                        for i in range(len(self.x_nodes))] for j in range(len(self.y_nodes))]

    def _combine(self, x, y, fn):
        out = None
        for j, wy in self._weights(self.y_nodes, y):
            for i, wx in self._weights(self.x_nodes, x):
                if wx * wy:
                    v = wx * wy * fn(self._nodes[j][i])
                    out = v if out is None else out + v
        return out

    def kernel_image(self, x=None, y=None, *, size=None, offset=(0.0, 0.0)):
        # the nodes' images interpolated, then shifted once (a shift is linear: one Lanczos render, not four)
        size = self.default_size(x, y) if size is None else int(size)
        img = self._combine(x, y, lambda p: _resize_centred(p.image, size))
        return _kernel_from_image(img, size, offset, self.source)

    def default_size(self, x=None, y=None) -> int:
        return int(max(p.default_size() for row in self._nodes for p in row))

    def fwhm(self, x=None, y=None) -> float:
        return float(self._combine(x, y, lambda p: p.fwhm()))


# ------------------------------------------------------------------------------ flux ratio


def fit_flux_ratio(science: Exposure, template: Exposure, *, min_snr: float = 30.0, match_radius: float = 1.0,
                   detection_threshold: float = 10.0, min_stars: int = 3,
                   bad_mask_planes=("NO_DATA", "BAD", "SAT", "EDGE"), workers: int = 1) -> tuple[float, pd.DataFrame]:
    r"""Photometric ratio :math:`\kappa = F_n / F_r` from stars detected in both exposures.

    Stars are detected on each image (PSF-smoothed, ``detection_threshold`` σ), matched
    within ``match_radius`` px, and measured in circular apertures of radius
    :math:`2\,\max(\mathrm{FWHM}_n, \mathrm{FWHM}_r)` (≥ 99.9 % of a Gaussian's flux, so the
    ratio does not depend on the two PSFs) with a local sky annulus.  Stars with an aperture
    S/N ≥ ``min_snr`` in both and no masked pixel give ratios :math:`f_n / f_r`, whose 3σ-clipped
    mean is κ.  ``workers``: the two detections at once on that many threads (their mesh, FFTs and extraction
    release the interpreter lock; the same tables).

    Returns
    -------
    kappa : float
    stars : DataFrame
        ``x, y, flux_science, flux_template, ratio, used`` of the matched stars.

    Raises
    ------
    DiffimError
        Fewer than ``min_stars`` usable stars.
    """
    from scipy.spatial import cKDTree

    from .kernel_sources import detect_sources

    cfg = KernelSourceConfig(detection_threshold=float(detection_threshold), bad_mask_planes=tuple(bad_mask_planes))
    ds, dt = map_on_threads(lambda exposure: detect_sources(exposure, cfg), [science, template], workers)
    cols = ["x", "y", "flux_science", "flux_template", "ratio", "used"]
    empty = pd.DataFrame({c: pd.Series(dtype=float if c != "used" else bool) for c in cols})
    if len(ds) and len(dt):
        dist, idx = cKDTree(dt[["x", "y"]].to_numpy()).query(ds[["x", "y"]].to_numpy(), k=1)
        ok = dist <= match_radius
        x = 0.5 * (ds["x"].to_numpy()[ok] + dt["x"].to_numpy()[idx[ok]])
        y = 0.5 * (ds["y"].to_numpy()[ok] + dt["y"].to_numpy()[idx[ok]])
    else:
        x = y = np.zeros(0)
    if x.size == 0:
        raise DiffimError(f"ZOGY flux ratio: no star detected in both exposures (science {len(ds)}, "
                          f"template {len(dt)}); give zogy.flux_ratio or PhotoCalib zero points")
    ratio, stars = aperture_flux_ratio(science, template, x, y, min_snr=min_snr, bad_mask_planes=bad_mask_planes)
    if int(stars["used"].sum()) < min_stars or ratio is None:
        raise DiffimError(f"ZOGY flux ratio: {int(stars['used'].sum())} matched stars with S/N ≥ {min_snr:g} in both "
                          f"exposures (need {min_stars}); give zogy.flux_ratio or PhotoCalib zero points")
    return ratio, stars if len(stars) else empty


def flux_ratio(science: Exposure, template: Exposure, config: ZogyConfig,
               workers: int = 1) -> tuple[float, str, pd.DataFrame | None]:
    """κ and where it came from: ``"config"``, ``"photo_calib"`` or ``"matched_stars"`` (with the star table;
    ``workers``: :func:`fit_flux_ratio`'s)."""
    if config.flux_ratio is not None:
        return float(config.flux_ratio), "config", None
    ps, pt = science.info.photo_calib, template.info.photo_calib
    if ps is not None and pt is not None:
        return float(10.0 ** (0.4 * (ps.zero_point - pt.zero_point))), "photo_calib", None
    kappa, stars = fit_flux_ratio(science, template, min_snr=config.flux_ratio_min_snr,
                                  match_radius=config.flux_ratio_match_radius,
                                  detection_threshold=config.flux_ratio_detection_threshold,
                                  min_stars=config.flux_ratio_min_stars, workers=workers)
    return kappa, "matched_stars", stars


# ------------------------------------------------------------------------------ cells


def zogy_cell_task(task: dict) -> dict:
    """One cell: ZOGY on the cell's region, weighted by its blend weights over its support.

    ``task`` holds the region's planes (``new``, ``reference``, ``new_variance``,
    ``reference_variance``, ``new_mask``, ``reference_mask``), the PSF images, noise
    variances, zero points, ``pad``, ``bad_bits``, ``seed``, ``workers``, and the support
    (``support``: ``(y0, y1, x0, x1)`` within the region) with its 1-D weights
    (``weight_y``, ``weight_x``).  Returns the weighted planes (float32) of the support and
    the cell's :math:`P_D` and :math:`F_D`.
    """
    bad_bits = int(task["bad_bits"])
    res = zk.zogy_cell(
        task["new"], task["reference"], task["new_variance"], task["reference_variance"],
        task["psf_new"], task["psf_reference"],
        sigma_new2=task["sigma_new2"], sigma_reference2=task["sigma_reference2"],
        flux_new=task["flux_new"], flux_reference=task["flux_reference"], pad=task["pad"],
        bad_new=has_bits(task["new_mask"], bad_bits), bad_reference=has_bits(task["reference_mask"], bad_bits),
        seed=task["seed"], workers=task["workers"],
    )
    y0, y1, x0, x1 = task["support"]
    w = task["weight_y"][:, None] * task["weight_x"][None, :]
    sl = (slice(y0, y1), slice(x0, x1))
    out = {}
    for name in ("difference", "difference_variance", "score", "score_variance"):
        # w·plane in float64, rounded once to float32, with no float64 temporary of the support
        out[name] = np.multiply(w, getattr(res, name)[sl], out=np.empty(w.shape, dtype=np.float32),
                                casting="same_kind")
    out["psf_difference"] = res.psf_difference
    out["flux_difference"] = res.flux_difference
    del res, w
    release_freed_memory()
    return out


#: The weighted planes a cell task returns, blended into full-frame float32 planes.
_CELL_PLANES = ("difference", "difference_variance", "score", "score_variance")


def _flag_nonfinite(mask: np.ndarray, image: np.ndarray, bit: int) -> np.ndarray:
    """``mask`` as int32 with ``bit`` set where ``image`` is not finite (``mask`` itself, no copy, when none is)."""
    nonfinite = ~np.isfinite(image)
    if mask.dtype == np.int32 and not nonfinite.any():
        return mask
    out = mask.astype(np.int32)
    out[nonfinite] |= np.int32(bit)
    return out


def _difference_mask(science_mask: np.ndarray, template_mask: np.ndarray, mask_planes: dict, *, size: int,
                     skip_bits: int, kept, rows: int = 512) -> np.ndarray:
    """``dilate(science) | dilate(template rules)`` (int32), built in bands of ``rows`` rows.

    Each band is dilated with ``size // 2`` rows of context on either side (clipped at the
    image edges), which is all the square footprint reads, so the result equals the
    whole-frame :func:`~diffim_dag.kernels.maskops.dilate_mask` of both masks OR-ed together
    while the temporaries stay the size of a band.
    """
    ny = science_mask.shape[0]
    h = int(size) // 2
    out = np.empty(science_mask.shape, dtype=np.int32)
    for a in range(0, ny, rows):
        b = min(a + rows, ny)
        a0, b0 = max(a - h, 0), min(b + h, ny)
        band = dilate_mask(science_mask[a0:b0], size, skip_bits=skip_bits)
        band |= dilate_mask(template_mask_for_difference(template_mask[a0:b0], mask_planes, kept=kept), size,
                            skip_bits=skip_bits)
        out[a:b] = band[a - a0 : b - a0]
    return out


def _cells_per_batch(n_cells: int, runner) -> int:
    """Cells submitted together: twice the runner's threads (all of them with more threads than cells).

    Each batch's weighted planes are blended before the next batch runs, so the cell results
    held at once are those of one batch, not of the whole image.
    """
    return max(1, min(n_cells, 2 * int(runner.threads)))


def _run_cells(tasks: list[dict], shape: tuple[int, int], *, runner):
    """Run the cell tasks and blend their weighted planes into preallocated float32 images.

    Returns ``(planes, psf_differences, flux_differences)``: ``planes`` maps each of
    :data:`_CELL_PLANES` to a full-frame float32 image (the sum of the cells' weighted planes,
    added in task order, so the batching does not change a bit of it); the lists are in task order.
    """
    planes = {name: np.zeros(shape, dtype=np.float32) for name in _CELL_PLANES}
    psf_differences, flux_differences = [], []
    step = _cells_per_batch(len(tasks), runner)
    for batch in (tasks[i : i + step] for i in range(0, len(tasks), step)):
        results = runner.map(zogy_cell_task, batch, prefix="zogy-cell")
        for i, task in enumerate(batch):
            res, results[i] = results[i], None  # drop each cell's planes once blended
            y0, y1, x0, x1 = task["support_parent"]
            sl = (slice(y0, y1), slice(x0, x1))
            for name in _CELL_PLANES:
                planes[name][sl] += res[name]
            psf_differences.append(res["psf_difference"])
            flux_differences.append(float(res["flux_difference"]))
            del res
        del results
    return planes, psf_differences, flux_differences


def _psf_size(science: Exposure, template: Exposure, fwhm_factor: float) -> int:
    cx, cy = science.center
    fwhm = max(science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy))
    size = max(science.psf.default_size(cx, cy), template.psf.default_size(cx, cy), int(math.ceil(fwhm_factor * fwhm)))
    return int(size + 1 - size % 2)


def _cell_noise(task: dict) -> tuple[float, float]:
    """The σ-clipped mean variances of the science and the template over one cell's core (their good pixels)."""
    bad_bits = task["bad_bits"]
    return (clipped_mean_variance(task["new_variance"], has_bits(task["new_mask"], bad_bits)),
            clipped_mean_variance(task["reference_variance"], has_bits(task["reference_mask"], bad_bits)))


def _cell_tasks(science, template, smask, tmask, *, kappa, config: ZogyConfig, psf_size: int, bad_bits: int,
                runner):
    """The cell tasks of the grid and its description.  Each cell's noise variances (:func:`_cell_noise`, a
    clipped mean over a million pixels of each image) are measured by ``runner`` (on its threads in process: at
    4096² they took about a second on one)."""
    si, sv, _ = science.arrays()
    ti, tv, _ = template.arrays()
    ny, nx = science.shape
    x0, y0 = science.xy0
    overlap = int(math.ceil(config.overlap_psf_sizes * psf_size))
    overlap += overlap % 2
    gy = max(1, min(config.grid_cells, ny // max(overlap, 1)))
    gx = max(1, min(config.grid_cells, nx // max(overlap, 1)))
    wy, by = zk.blend_weights(ny, gy, overlap if gy > 1 else 0)
    wx, bx = zk.blend_weights(nx, gx, overlap if gx > 1 else 0)
    ey, ex = zk.cell_cores(ny, gy), zk.cell_cores(nx, gx)
    margin = overlap
    cores = [(slice(ey[i], ey[i + 1]), slice(ex[j], ex[j + 1])) for i in range(gy) for j in range(gx)]
    noise = runner.map(_cell_noise, [
        {"new_variance": sv[core], "new_mask": smask[core], "reference_variance": tv[core],
         "reference_mask": tmask[core], "bad_bits": bad_bits, "origin": (core[1].start, core[0].start)}
        for core in cores], prefix="zogy-cell-noise")  # ("origin": the task's name among its Dask keys)
    tasks, centres = [], []
    for i in range(gy):
        for j in range(gx):
            sy0, sy1 = int(by[i, 0]), int(by[i, 1])
            sx0, sx1 = int(bx[j, 0]), int(bx[j, 1])
            ry0, ry1 = max(sy0 - margin, 0), min(sy1 + margin, ny)
            rx0, rx1 = max(sx0 - margin, 0), min(sx1 + margin, nx)
            region = (slice(ry0, ry1), slice(rx0, rx1))
            # PSFs at the centre of the cell's core (parent coordinates)
            px = x0 + 0.5 * (ex[j] + ex[j + 1] - 1)
            py = y0 + 0.5 * (ey[i] + ey[i + 1] - 1)
            pn = science.psf.kernel_image(px, py, size=psf_size)
            pr = template.psf.kernel_image(px, py, size=psf_size)
            zk.check_psf_centroids(pn, pr, max_offset=config.max_centroid_offset,
                                   where=f" at ({px:.0f}, {py:.0f})")
            sn2, sr2 = noise[i * gx + j]
            if not (np.isfinite(sn2) and sn2 > 0):
                sn2 = clipped_mean_variance(sv, has_bits(smask, bad_bits))
            if not (np.isfinite(sr2) and sr2 > 0):
                sr2 = clipped_mean_variance(tv, has_bits(tmask, bad_bits))
            if not (np.isfinite(sn2) and sn2 > 0 and np.isfinite(sr2) and sr2 > 0):
                raise DiffimError(f"ZOGY: no usable variance in the cell at ({px:.0f}, {py:.0f})")
            tasks.append({
                "origin": (x0 + rx0, y0 + ry0),
                "core_bbox": (x0 + ex[j], x0 + ex[j + 1], y0 + ey[i], y0 + ey[i + 1]),
                "cell": (i, j),
                "new": si[region], "reference": ti[region],
                "new_variance": sv[region], "reference_variance": tv[region],
                "new_mask": smask[region], "reference_mask": tmask[region],
                "psf_new": pn, "psf_reference": pr,
                "sigma_new2": float(sn2), "sigma_reference2": float(sr2),
                "flux_new": 1.0, "flux_reference": 1.0 / float(kappa),
                "pad": margin, "bad_bits": bad_bits, "seed": (int(config.noise_seed), i * gx + j),
                "workers": int(config.fft_workers),
                "support": (sy0 - ry0, sy1 - ry0, sx0 - rx0, sx1 - rx0),
                "support_parent": (sy0, sy1, sx0, sx1),
                "weight_y": wy[i, sy0:sy1], "weight_x": wx[j, sx0:sx1],
            })
            centres.append((px, py))
    grid = {"cells": (gy, gx), "overlap": overlap, "margin": margin, "psf_size": psf_size,
            "x_nodes": sorted({c[0] for c in centres}), "y_nodes": sorted({c[1] for c in centres})}
    return tasks, grid


def subtract_zogy(
    science: Exposure,
    template: Exposure,
    *,
    config: PipelineConfig,
    zogy_config: ZogyConfig = ZogyConfig(),
    runner=None,
    variance_scales: dict | None = None,
):
    r"""ZOGY subtraction of ``template`` from ``science`` (same pixel grid), cell by cell.

    Parameters
    ----------
    science, template : Exposure
        Background-subtracted, with PSF models, on one pixel grid.
    config : PipelineConfig
        Uses ``subtract`` (coverage, variance scaling, template mask planes) and
        ``detection``.
    zogy_config : ZogyConfig
    runner : optional
        Runs the cell tasks (:mod:`diffim_dag.stages.runner`; in turn in this thread when None: the same
        function and, since cells are blended in task order, the same bits).
    variance_scales : dict, optional
        The input stages' variance factors of these exposures (:func:`~diffim_dag.stages.inputs.prepare_inputs`).

    Returns
    -------
    ScoreSubtractionResult
        ``difference`` (:math:`D_N`, science flux units, PSF :math:`P_D` per cell),
        ``matched_template`` (the template scaled by κ), ``matched_science`` (the science),
        ``mode = "zogy"``, ``kernel_fit = None``, and ``score`` (image :math:`S`, variance
        :math:`V(S)`).  ``score`` and ``difference`` share one mask array, and
        ``matched_template`` the template's mask array (none is modified in place downstream).

    Notes
    -----
    Peak memory of the CLI on a 4096² pair with a 4×4 grid and two threads is ≈ 1.27 GiB (inputs
    included; the in-process task takes its inputs, so the planes variance scaling replaces are freed):
    the full-frame planes are float32 (:math:`D_N`, :math:`V(D_N)`, :math:`S`,
    :math:`V(S)`, the mask, the κ-scaled template and :math:`S_\mathrm{corr}`), each cell's
    float64 FFT work is freed (and the heap trimmed) as soon as its weighted planes are
    made, the cells run in batches, and the masks are dilated in bands of rows.

    Raises
    ------
    PsfError
        The PSF centroids differ by more than ``max_centroid_offset`` in a cell.
    DiffimError
        Different pixel grids, missing PSFs, or no flux ratio.
    """
    from . import subtract as st

    runner = IN_TURN if runner is None else runner
    timings = Timings()
    metrics: dict = {"method": "zogy", "mode": "zogy", "kernel": {}}
    science, template, planes, coverage = prepare_inputs(science, template, config, timings, metrics,
                                                         variance_scales)

    with timings.stage("flux_ratio"):
        kappa, origin, stars = flux_ratio(science, template, zogy_config, workers=int(runner.threads))
        metrics["zogy"] = {"flux_ratio": kappa, "flux_ratio_origin": origin}
        if stars is not None:
            metrics["zogy"]["flux_ratio_stars"] = int(stars["used"].sum())

    si, sv, sm = science.arrays()
    ti, tv, tm = template.arrays()
    no_data = planes.bitmask("NO_DATA")
    smask = _flag_nonfinite(sm, si, no_data)
    tmask = _flag_nonfinite(tm, ti, no_data)
    bad_bits = planes.bitmask([p for p in zogy_config.bad_mask_planes if p in planes])
    psf_size = _psf_size(science, template, zogy_config.psf_size_fwhm)
    shape = science.shape

    skip_bits = planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in planes])

    def difference_mask(science_mask, template_mask):
        t0 = time.perf_counter()
        mask = _difference_mask(science_mask, template_mask, planes.as_dict(), size=psf_size, skip_bits=skip_bits,
                                kept=config.subtract.template_mask_planes_kept)
        mask |= edge_mask(shape, psf_size // 2, planes["EDGE"])
        return mask, time.perf_counter() - t0

    with timings.stage("zogy_cells"):
        tasks, grid = _cell_tasks(science, template, smask, tmask, kappa=kappa, config=zogy_config,
                                  psf_size=psf_size, bad_bits=bad_bits, runner=runner)
        # the difference's mask on a thread beside the cells: its dilations are passes over memory, the cells' work
        # transforms (a 4096² pair's mask took 0.37 s on one core after the cells, the other idle; no faster in
        # bands on two threads)
        mask_made = started_on_thread(functools.partial(difference_mask, smask, tmask), start=int(runner.threads) > 1)
        blended, pd_list, fd_list = _run_cells(tasks, shape, runner=runner)
        release_freed_memory()
        d_img, d_var, s_img, s_var = (blended[k] for k in _CELL_PLANES)
        del blended
        gy, gx = grid["cells"]
        pd_images = np.array(pd_list).reshape(gy, gx, psf_size, psf_size)
        metrics["zogy"].update({
            "grid_cells": [gy, gx], "overlap": grid["overlap"], "margin": grid["margin"], "psf_size": psf_size,
            "flux_difference": fd_list,
            "sigma_science2": [t["sigma_new2"] for t in tasks],
            "sigma_template2": [t["sigma_reference2"] for t in tasks],
        })
        del tasks  # views of the input planes and masks

    mask, timings["masks"] = mask_made()  # (its own time, beside the cells)
    del smask, tmask

    psf_d = CellPsf(pd_images, grid["x_nodes"], grid["y_nodes"])
    # D_N and S share the one mask plane (from_arrays flags non-finite pixels in place, so a
    # plane is shared only when neither image has any)
    shared = bool(np.isfinite(d_img).all() and np.isfinite(s_img).all())
    difference = Exposure.from_arrays(d_img, d_var, mask, xy0=science.xy0, mask_planes=planes, wcs=science.wcs,
                                      psf=psf_d, info=science.info.replace(variance_source="propagated"),
                                      validate=False, copy=False)
    score = Exposure.from_arrays(s_img, s_var, mask if shared else mask.copy(), xy0=science.xy0, mask_planes=planes,
                                 wcs=science.wcs, psf=psf_d, info=science.info.replace(variance_source="propagated"),
                                 validate=False, copy=False)
    k = np.float32(kappa)
    mt_img = ti * k
    mt_var = tv * k
    mt_var *= k  # (tv·κ)·κ, with no temporary plane
    mt_mask = tm if (tm.dtype == np.int32 and np.isfinite(mt_img).all()) else tm.copy()
    matched_template = Exposure.from_arrays(mt_img, mt_var, mt_mask, xy0=science.xy0, mask_planes=planes,
                                            wcs=template.wcs, psf=template.psf, info=template.info, validate=False,
                                            copy=False)
    del mt_img, mt_var, mt_mask

    with timings.stage("metrics"):
        noise_bits = planes.bitmask([p for p in ("NO_DATA", "BAD", "SAT", "EDGE", "CR") if p in planes])
        d_var, scaled = st.scale_difference_variance(d_img, d_var, FlaggedPixels(mask, noise_bits),
                                                     enabled=config.subtract.scale_difference_variance)
        difference = difference.with_planes(variance=d_var)
        star_xy = (np.column_stack([stars.loc[stars["used"], "x"] - science.xy0[0],
                                    stars.loc[stars["used"], "y"] - science.xy0[1]])
                   if stars is not None and len(stars) else np.zeros((0, 2)))
        cx, cy = science.center
        q = st.quality_metrics(
            science=si, difference=d_img, difference_variance=d_var, difference_mask=mask, planes=planes,
            star_xy=star_xy, fwhm=psf_d.fwhm(cx, cy),
            ratio_mean_limit=config.subtract.bad_subtraction_ratio_mean,
            ratio_std_limit=config.subtract.bad_subtraction_ratio_std,
        )
        good = lacks_bits(mask, planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])) & (s_var > 0)
        q["score_significance_std"] = float(clipped_stats(_significance_sample(score, good))[1]) if good.any() else None
        q["background_left"] = background_left(d_img, d_var, ~good, psf_d.kernel_image(cx, cy))
        q.update(scaled)
        del good
        metrics["quality"] = q

    metrics["timings_s"] = dict(timings)
    return ScoreSubtractionResult(difference=difference, matched_template=matched_template, matched_science=science, mode="zogy",
               kernel_fit=None, decorrelation_kernel=None, metrics=metrics, dia_sources=None, score=score)


def score_significance(score: Exposure, excluded: tuple[str, ...] = ("NO_DATA",)) -> np.ndarray:
    """``image / sqrt(variance)`` of a score exposure; 0 where the variance is not positive or the score's mask
    has any of the ``excluded`` planes it knows (detection passes ``score_excluded_mask_planes``)."""
    img, var, msk = score.arrays()
    bit = score.bitmask([p for p in dict.fromkeys(("NO_DATA", *excluded)) if p in score.mask_planes])
    out = np.zeros(img.shape, dtype=np.float32)
    step = max(1, _SIGNIFICANCE_PIXELS // max(img.shape[1], 1))
    for y0 in range(0, img.shape[0], step):  # row blocks: no full-frame temporaries
        sl = slice(y0, y0 + step)
        out[sl] = _significance(img[sl], var[sl], msk[sl], bit)
    return out


def _significance(img: np.ndarray, var: np.ndarray, msk: np.ndarray, excluded_bits: int) -> np.ndarray:
    """``img / sqrt(var)`` (float32), 0 where the variance is not positive, the image not finite or the mask has
    any of ``excluded_bits``."""
    ok = (var > 0) & np.isfinite(img) & lacks_bits(msk, excluded_bits)
    out = np.zeros(img.shape, dtype=np.float32)
    out[ok] = img[ok] / np.sqrt(var[ok])
    return out


def _significance_sample(score: Exposure, good: np.ndarray) -> np.ndarray:
    """``score_significance(score)[good]`` as :func:`~diffim_dag.noise.clipped_stats` samples it (every
    ``⌈n / MAX_STAT_SAMPLES⌉``-th of the ``n`` good pixels, in raster order), row strip by row strip: no
    full-frame plane and no index array of every good pixel."""
    n = int(np.count_nonzero(good))
    step = -(-n // MAX_STAT_SAMPLES) if n > MAX_STAT_SAMPLES else 1
    img, var, msk = score.arrays()
    bit = score.bitmask("NO_DATA")
    parts, seen = [], 0
    for rows in row_strips(good.shape[0]):
        idx = np.flatnonzero(good[rows])
        take = idx[(-seen) % step:: step]  # the strip's good pixels whose running number is a multiple of step
        seen += idx.size
        parts.append(_significance(*(a[rows].ravel()[take] for a in (img, var, msk)), bit))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


#: Pixels per row block of :func:`score_significance`.
_SIGNIFICANCE_PIXELS = 1 << 20
