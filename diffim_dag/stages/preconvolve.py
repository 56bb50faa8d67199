r"""Alard–Lupton subtraction with pre-convolution (score image), as LSST's ``AlardLuptonPreconvolveSubtractTask``.

:func:`preconvolved_score`:

1. pixels on ``NO_DATA``, ``BAD``, ``SAT`` and ``EDGE`` (and non-finite ones) of both
   images are set to the median of the good pixels (:func:`~diffim_dag.kernels.preconvolve.median_fill`);
2. the science is convolved with its own PSF at the image centre, reflected and normalized
   (:math:`H`, odd size), tile by tile; its variance with :math:`H^2`, its mask dilated by
   the footprint of :math:`H`; its PSF becomes :math:`P_s \otimes H`;
3. kernel sources are selected on the original science (S/N window, masks, and isolation at
   the stamp scale of the AL problem: :func:`preconvolution_kernel_sources`) and
   the AL kernel is fitted to match the template to the pre-convolved science at them
   (:func:`~diffim_dag.stages.kernel_fit.fit_psf_matching_kernel`, ``convolveTemplate``:
   the pre-convolved science is always the wider image, so no deconvolution is asked for);
4. raw score :math:`\Sigma = S \otimes H - T \otimes K\;[-b]` on the same tiled graph as the
   AL difference, ``EDGE`` within :math:`h_K + h_H` of the border;
5. score correction :math:`\phi_S` and the propagated variance plane
   (:mod:`diffim_dag.kernels.preconvolve`), applied tile by tile with a reflected halo.

The visit graph of ``method: al-preconvolve`` (:mod:`diffim_dag.visit`) runs the AL stages for the
difference that DiaSources are *measured* on, adds the score exposure (its ``score`` task), and *detects* on
the score's significance :math:`\phi_S\Sigma/\sqrt V` directly (no further smoothing).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
from ..kernels.convolve import fft_convolve as fftconvolve

from ..config import PipelineConfig
from ..errors import DiffimError
from ..exposure import Exposure
from ..kernels.decorrelate import clipped_mean_variance
from ..kernels.maskops import dilate_mask, template_mask_for_difference
from ..kernels.preconvolve import median_fill, preconvolution_kernel, score_correction_kernels
from ..kernels.solution import CONVOLVE_TEMPLATE
from ..memory import release_freed_memory
from .inputs import Timings, _variance_scaled
from .runner import IN_TURN
from ..psf import ImagePsf

__all__ = ["FILLED_PLANES", "preconvolution_kernel_sources", "preconvolved_score"]

log = logging.getLogger(__name__)

#: Planes median-filled before convolving.
FILLED_PLANES = ("NO_DATA", "BAD", "SAT", "EDGE")


def preconvolution_kernel_sources(science: Exposure, template: Exposure, *, config: PipelineConfig, sources=None,
                                  detection=None):
    r"""Kernel sources of the pre-convolution fit, selected on the *original* science image.

    The pre-convolution kernel :math:`K` maps :math:`P_t` onto :math:`P_s \otimes H`, so its
    basis and size come from the FWHMs of the template and of the pre-convolved science
    (:math:`\sqrt2\,\mathrm{FWHM}_s` for Gaussians): for template/science σ of 2.0/2.4 px,
    :math:`\sigma_K = \sqrt{2 \cdot 2.4^2 - 2.0^2} = 2.74` px, widths 1.37, 2.74, 5.49 px and a
    33-px kernel, against 21 px for the AL kernel of the same pair, hence stamps of
    :math:`2 \times 33 + 1 = 67` px.

    The cuts on the star itself are made on the original science, as LSST passes the
    science source catalog to the pre-convolved fit:

    * S/N: on the pre-convolved image the per-pixel variance :math:`V \otimes H^2` ignores the
      correlated noise, so its PSF-flux S/N would be overestimated by :math:`\sim\sqrt{\mathrm{NEA}}`
      and the S/N window would drop the bright stars;
    * isolation (no other detection within ``isolation_factor`` × the stamp half-size) at the
      stamp scale of the *AL* problem template → science (``basis_from_config`` with the
      original FWHMs), the same protection the AL fit of the pair has.  Requiring it over the
      wider pre-convolution stamp instead would starve the fit: isolated fractions fall as
      :math:`e^{-\pi r^2 \rho}`, and with 100 stars on 400² the 33-px radius keeps ~10 stars
      (vs ~40 at 21 px), too few and too unevenly spread for the spatially varying kernel,
      whose errors the score — a matched filter — shows at each star's full S/N.  A neighbour
      inside the wider stamp does not bias the fit: on the fit interior (the stamp shrunk by
      :math:`h_K`) both :math:`S \otimes H` and :math:`T \otimes K` contain it in full, since
      :math:`T \otimes K` there only needs template pixels within the stamp.

    The caller fits at these positions with the pre-convolution stamps, which re-checks that
    each stamp lies inside both images and is unmasked.

    Parameters
    ----------
    science, template : Exposure
        The original (not pre-convolved) exposures, with PSFs.
    config : PipelineConfig
        ``kernel`` (basis widths and sizes) and ``sources`` (cuts).
    sources : DataFrame, optional
        Candidate catalog (``x``, ``y``); detection on the science image when None.
    detection : SourceDetection, optional
        :func:`~diffim_dag.stages.kernel_sources.detect_kernel_sources` of this science done already (the AL
        stages' ``kernel-detect`` task): not detected again.

    Returns
    -------
    DataFrame
        As :func:`~diffim_dag.stages.kernel_sources.select_kernel_sources`.
    """
    from ..kernels.basis import basis_from_config
    from .kernel_sources import select_kernel_sources

    cx, cy = science.center
    al_size = basis_from_config(config.kernel, template.psf.fwhm(cx, cy), science.psf.fwhm(cx, cy)).size
    table, _ = select_kernel_sources(science, template, al_size, config.sources, sources, detection=detection)
    return table


def preconvolved_score(science: Exposure, template: Exposure, *, config: PipelineConfig, runner=None,
                       map_cells=None, sources=None, metrics: dict | None = None,
                       variance_scales: dict | None = None, detection=None):
    r"""The corrected pre-convolution score exposure (module doc, steps 1–5).

    ``runner`` runs the filters and the convolution (:mod:`diffim_dag.stages.runner`; in turn on the whole
    image when None) and ``map_cells`` the kernel's cell fits (by default on the runner's threads:
    :func:`~diffim_dag.stages.kernel_fit.cells_on`).  ``variance_scales``: the input stages' variance factors of
    these exposures (measured here when None).  ``detection``: the science's kernel-source detection done
    already (:func:`preconvolution_kernel_sources`).

    Returns
    -------
    score : Exposure
        Image :math:`\phi_S \Sigma`, variance :math:`V_S \otimes c_S^2 + V_T \otimes c_T^2`,
        mask; PSF :math:`P_s \otimes H` (at the centre).
    fit : KernelFitResult
        The pre-convolution kernel fit.
    """
    from ..stages.kernel_fit import cells_on, fit_psf_matching_kernel

    metrics = {} if metrics is None else metrics
    runner = IN_TURN if runner is None else runner
    timings = Timings()
    if science.shape != template.shape or science.xy0 != template.xy0:
        raise DiffimError(f"science {science.shape} at {science.xy0} and template {template.shape} at {template.xy0} "
                          "are not on one pixel grid; warp the template first")
    if science.psf is None or template.psf is None:
        raise DiffimError("both exposures need a PSF model (give --science-psf / --template-psf)")
    planes = science.mask_planes.merged(template.mask_planes)
    for name in ("EDGE", "SAT_TEMPLATE", "INJECTED_TEMPLATE", "NO_DATA"):
        planes = planes.with_plane(name)
    xy0, shape = science.xy0, science.shape
    scale_metrics: dict = {}
    scales = variance_scales or {}
    science = _variance_scaled(science, config, "science", scale_metrics, scales.get("science"))
    template = _variance_scaled(template, config, "template", scale_metrics, scales.get("template"))
    si, sv, sm = science.arrays()
    ti, tv, tm = template.arrays()
    fill_bits = planes.bitmask([p for p in FILLED_PLANES if p in planes])
    bad_s = ((sm & fill_bits) != 0) | ~np.isfinite(si)
    bad_t = ((tm & fill_bits) != 0) | ~np.isfinite(ti)
    cx, cy = science.center
    psf_s = science.psf.kernel_image(cx, cy)
    h_kernel = preconvolution_kernel(psf_s)
    hh = h_kernel.shape[0] // 2
    skip_bits = planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in planes])

    with timings.stage("preconvolve"):
        s_fill = median_fill(si, bad_s)
        t_fill = median_fill(ti, bad_t)
        del bad_s, bad_t
        s_pre = runner.filter(s_fill, h_kernel, xy0=xy0)
        del s_fill  # (each plane is let go once used: this task runs beside the AL tiles, a 4096² plane is 64 MB)
        v_pre = runner.filter(sv, h_kernel**2, xy0=xy0)
        m_pre = dilate_mask(sm, h_kernel.shape[0], skip_bits=skip_bits).astype(np.int32)
        pre_psf = ImagePsf(fftconvolve(psf_s, h_kernel, mode="full"), source="science PSF ⊗ pre-convolution kernel")
        pre_science = Exposure.from_arrays(s_pre, v_pre, m_pre, xy0=xy0, mask_planes=planes, wcs=science.wcs,
                                           psf=pre_psf, info=science.info, validate=False, copy=False)
        filled_template = template.with_planes(image=t_fill)

    with timings.stage("kernel_fit"):
        table = preconvolution_kernel_sources(science, template, config=config, sources=sources, detection=detection)
        # The S/N window and the isolation were applied on the original science; the fit re-checks
        # only what its wider stamps need (inside both images, unmasked, not saturated, point-like).
        pre_sources = dataclasses.replace(config.sources, min_snr=1e-6, max_snr=1e30, isolation_factor=0.0)
        fit = fit_psf_matching_kernel(pre_science, filled_template, mode=CONVOLVE_TEMPLATE, config=config.kernel,
                                      source_config=pre_sources, sources=table[["x", "y"]],
                                      map_cells=map_cells or cells_on(runner))
    solution = fit.solution
    kernel_sum = solution.kernel_sum_at_center()
    hk = solution.half_width

    with timings.stage("convolve_subtract"):
        tm_rules = template_mask_for_difference(tm, planes.as_dict(), kept=config.subtract.template_mask_planes_kept)
        raw, _, mask = runner.convolve_difference(
            (s_pre, v_pre, m_pre), (t_fill, tv, tm_rules), solution, kernel_sum=kernel_sum, xy0=xy0,
            skip_bits=skip_bits, mode=CONVOLVE_TEMPLATE, subtract_background=config.subtract.subtract_background,
            shape=shape, half_width=hk + hh, edge_bit=planes["EDGE"])
        del s_pre, v_pre, m_pre, pre_science, t_fill, filled_template, tm_rules
        release_freed_memory()  # (the pre-convolved planes and the convolution's tiles, before the score's filters)

    with timings.stage("score_correction"):
        kernel = solution.kernel_at(*solution.center)
        ss2 = clipped_mean_variance(sv, (sm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0)
        st2 = clipped_mean_variance(tv, (tm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0)
        phi, c_science, c_template = score_correction_kernels(kernel, h_kernel, sigma_science2=ss2,
                                                              sigma_template2=st2)
        score_img = runner.filter(raw, phi, xy0=xy0)
        del raw
        score_var = runner.filter(sv, c_science**2, xy0=xy0)
        score_var += runner.filter(tv, c_template**2, xy0=xy0)
    metrics["preconvolution"] = {
        "preconvolution_kernel_size": int(h_kernel.shape[0]),
        "kernel": {k: v for k, v in fit.diagnostics.items() if k != "timings_s"},
        "kernel_sum_center": float(kernel_sum),
        "sigma_science2": float(ss2), "sigma_template2": float(st2),
        "score_correction_size": int(phi.shape[0]),
        "variance_scale": scale_metrics,
        "timings_s": dict(timings),
    }
    np.maximum(score_var, np.float32(0), out=score_var)  # (float32, as the filters give it)
    score = Exposure.from_arrays(score_img, score_var, mask, xy0=xy0,
                                 mask_planes=planes, wcs=science.wcs, psf=pre_psf,
                                 info=science.info.replace(variance_source="propagated"), validate=False, copy=False)
    return score, fit
