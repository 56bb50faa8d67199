"""Public layer: subtract one (visit, detector), write the output contract, run the demo.

``subtract_exposures`` runs the stages in order — coverage check → variance
scaling → mode choice → kernel sources and per-cell kernel fits → spatial solve →
tiled convolve/subtract → decorrelate → quality metrics — with the tiled steps
as Dask graphs (``tiled=True``) or eagerly on one tile (``tiled=False``; the same
pure functions, used to prove tiled == eager).  Each stage is a function here
(:func:`prepare_subtraction`, :func:`kernel_sources_stage`, :func:`fit_cells_stage`,
:func:`spatial_solve_stage`, :func:`subtract_tiles_stage`, :func:`decorrelate_tiles_stage`,
:func:`difference_stage`, :func:`prepare_detection_stage`, :func:`detect_tiles_stage`,
:func:`catalog_stage`) that the batch graph (:func:`diffim_dag.visit.visit_graph`) also
calls, one task per stage, cell or tile.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import PipelineConfig, load_config
from .errors import DiffimError, NoWorkFound
from .exposure import Exposure
from .kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE
from .masks import MaskPlanes
from .stages import subtract as st
from .stages.inputs import SubtractionResult, Timings, _nbytes, prepare_inputs
from .stages.verdict import background_left

if TYPE_CHECKING:
    from .stages.zogy import ScoreSubtractionResult

__all__ = [
    "SubtractionResult",
    "subtract_exposures",
    "run_subtraction",
    "run_demo",
    "STAGES",
    "PreparedPair",
    "PreparedExposures",
    "prepare_exposures",
    "subtract",
    "KernelStage",
    "CellFits",
    "DetectedTiles",
    "CatalogStage",
    "prepare_subtraction",
    "kernel_sources_stage",
    "fit_cells_stage",
    "spatial_solve_stage",
    "subtract_tiles_stage",
    "decorrelate_tiles_stage",
    "difference_stage",
    "detection_config",
    "prepare_detection_stage",
    "detect_tiles_stage",
    "catalog_stage",
    "with_catalog",
]

log = logging.getLogger(__name__)

#: Stages of one (visit, detector) for each method, in order.
_INPUTS = ("read", "template warp (when the grids differ)", "PSF of each image (supplied, or estimated from its stars)",
           "sky of each image removed", "cosmic rays and hot pixels repaired")
STAGES = {
    "al": _INPUTS + ("kernel-source selection", "per-cell kernel fits", "spatial solve", "convolve/subtract (tiled)",
                     "decorrelate", "detect/measure", "verdict", "write"),
    "al-preconvolve": _INPUTS + ("kernel-source selection", "per-cell kernel fits", "spatial solve",
                                 "convolve/subtract (tiled)", "decorrelate", "pre-convolve science",
                                 "pre-convolution kernel fit", "score and score decorrelation",
                                 "detect on the score / measure on the difference", "verdict", "write"),
    "zogy": _INPUTS + ("flux ratio (zero points or matched stars)", "ZOGY cells: D, P_D, S, S_corr (one task per cell)",
                       "blend cells", "detect on S_corr / measure on D", "verdict", "write"),
}


@dataclass(eq=False)
class PreparedExposures:
    """Both exposures as every method starts from them: sky removed, PSF models attached.

    ``metrics`` holds ``sky`` and ``psf`` (one report per role) and ``timings`` their wall times.
    """

    science: Exposure
    template: Exposure
    metrics: dict
    timings: dict
    fakes: object = None  # pandas.DataFrame of the fakes injected (inject_stage), None without

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return 1024 + _nbytes(self.science) + _nbytes(self.template)


def inject_stage(prepared, config: PipelineConfig, kernel=None):
    """The ``inject`` stage: ``config.fakes`` point sources added to both exposures of ``prepared`` (a
    :class:`PreparedPair` or :class:`PreparedExposures`; :func:`~diffim_dag.stages.inject.inject_fakes`),
    returned with ``fakes``; ``prepared`` itself when no fakes are configured.

    ``al`` injects after the spatial solve, so the kernel is fitted on the images without fakes (a fake
    is no static source, and in a small image their masks would leave no kernel source); the score
    methods inject before their subtraction.  No fake sits within the matching kernel's half-width
    (``kernel``'s, else ``kernel.max_kernel_size``'s) of the edge, where the difference has no data.
    """
    import dataclasses

    from .stages.inject import inject_fakes

    if not config.fakes.enabled:
        return prepared
    t0 = time.perf_counter()
    border = kernel.fit.solution.half_width if kernel is not None else config.kernel.max_kernel_size // 2
    science, template, fakes = inject_fakes(prepared.science, prepared.template, config.fakes, border=border)
    fakes.attrs["seconds"] = time.perf_counter() - t0  # travels with the table to the match stage
    timings = {**prepared.timings, "inject": fakes.attrs["seconds"]}
    return dataclasses.replace(prepared, science=science, template=template, fakes=fakes, timings=timings)


def match_stage(result: SubtractionResult, catalog, fakes, config: PipelineConfig):
    """The ``match`` stage: the fakes matched to the DiaSources (``catalog``: a :class:`CatalogStage` or a
    DataFrame) of ``result`` (:func:`~diffim_dag.stages.inject.match_fakes`); None without fakes."""
    from .stages.inject import match_fakes

    if fakes is None:
        return None
    t0 = time.perf_counter()
    dia, metrics = catalog, result.metrics
    if isinstance(catalog, CatalogStage):
        dia, metrics = catalog.dia_sources, {**result.metrics, **catalog.metrics}
    injection = match_fakes(fakes, dia, result.difference, metrics, config.fakes)
    injection.summary["seconds"] = time.perf_counter() - t0
    injection.summary["inject_seconds"] = fakes.attrs.get("seconds")
    return injection


def with_injection(result: SubtractionResult, injection) -> SubtractionResult:
    """``result`` with the matched fakes and their summary in ``metrics["injection"]`` (unchanged for None)."""
    if injection is None:
        return result
    import dataclasses

    metrics = {**result.metrics, "injection": {k: v for k, v in injection.summary.items()
                                               if k not in ("seconds", "inject_seconds")}}
    timings = dict(metrics.get("timings_s", {}))
    timings["match"] = injection.summary.get("seconds", 0.0)
    if injection.summary.get("inject_seconds") is not None:
        timings["inject"] = injection.summary["inject_seconds"]
    metrics["timings_s"] = timings
    return dataclasses.replace(result, injection=injection, metrics=metrics)


def prepare_exposure(exposure: Exposure, config: PipelineConfig, role: str, *, psf=None):
    """The input stages of one exposure: PSF (:mod:`~diffim_dag.stages.psf`; ``psf``, a
    :class:`~diffim_dag.stages.psf.PsfResult` already computed, skips it), sky (:mod:`~diffim_dag.stages.sky`),
    cosmic rays and hot pixels (:mod:`~diffim_dag.stages.cosmic_rays`).

    Returns ``(exposure, {"psf": report, "sky": report, "cosmic_rays": report}, timings)``.
    """
    from .stages.cosmic_rays import repair_cosmic_rays
    from .stages.psf import measure_psf
    from .stages.sky import subtract_sky

    timings = Timings()
    if exposure.is_lazy:
        exposure = exposure.load()
    with timings.stage("psf"):
        result = psf if psf is not None else measure_psf(exposure, config.psf, role=role)
    if psf is not None:
        timings["psf"] = timings.get("psf", 0.0) + getattr(psf, "seconds", 0.0)
    exposure = exposure.with_attrs(psf=result.psf)
    with timings.stage("sky"):
        sky = subtract_sky(exposure, config.sky)
    with timings.stage("cosmic_rays"):
        cr = repair_cosmic_rays(sky.exposure, config.cosmic_rays)
    return cr.exposure, {"psf": result.report, "sky": sky.report, "cosmic_rays": cr.report}, timings


def prepare_exposures(science: Exposure, template: Exposure, config: PipelineConfig, *,
                      psfs: dict | None = None, threads: int = 1) -> PreparedExposures:
    """:func:`prepare_exposure` of the science and of the template, on ``threads`` threads (the two are
    independent; ``timings`` then hold the sum of both, as in turn).

    ``psfs`` maps ``"science"``/``"template"`` to a :class:`~diffim_dag.stages.psf.PsfResult`
    already computed (the batch graph's ``psf`` tasks); the others are measured here.
    """
    roles = (("science", science), ("template", template))

    def one(item):
        role, exposure = item
        return prepare_exposure(exposure, config, role, psf=(psfs or {}).get(role))

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(one, roles))
    else:
        done = [one(item) for item in roles]
    timings = Timings()
    metrics: dict = {"sky": {}, "psf": {}, "cosmic_rays": {}}
    out = {}
    for (role, _), (exposure, reports, t) in zip(roles, done):
        out[role] = exposure
        for name, report in reports.items():
            metrics[name][role] = report
        for name, seconds in t.items():
            timings[name] = timings.get(name, 0.0) + seconds
    return PreparedExposures(science=out["science"], template=out["template"], metrics=metrics, timings=timings)


def _decorrelation_inputs(mode, science, template, solution, bad_s, bad_t):
    from .kernels.decorrelate import clipped_mean_variance

    kernel = solution.kernel_at(*solution.center)
    kappa = float(kernel.sum())
    _, sv, _ = science.arrays()
    _, tv, _ = template.arrays()
    if mode == CONVOLVE_TEMPLATE:
        return kernel, clipped_mean_variance(sv, bad_s), clipped_mean_variance(tv, bad_t), kappa
    # convolveScience: D = S ⊗ (K/κ) − T/κ, the science convolved with a unit-sum kernel and the template
    # (the unconvolved image) on the science's scale
    return kernel / kappa, clipped_mean_variance(tv, bad_t) / kappa**2, clipped_mean_variance(sv, bad_s), 1.0


# --------------------------------------------------------------------------- the stages of one AL subtraction
#
# prepare → kernel sources → fit cells → spatial solve → subtract tiles → decorrelate tiles → difference
# → detection (whole image) → detect tiles → catalogue.  subtract_exposures runs them in turn (the tile
# steps on one tile, or through the tiled Dask arrays of graph.py); visit.visit_graph makes each one a task
# of the batch graph.  Every stage returns a new object and never modifies its inputs (a task's result may
# feed several tasks, or be recomputed after a worker is lost).


@dataclass(eq=False)
class PreparedPair:
    """The first stage's output: both exposures on one grid, checked and variance-scaled.

    Attributes
    ----------
    science, template : Exposure
        In memory, variance planes scaled to the measured noise.
    planes : MaskPlanes
        Merged mask planes, with EDGE, SAT_TEMPLATE, INJECTED_TEMPLATE and NO_DATA.
    coverage : float
        Fraction of science pixels with template data.
    mode : str
        ``convolveTemplate`` or ``convolveScience`` (``auto`` resolved).
    metrics, timings : dict
        What the later stages extend (copies, never in place).
    """

    science: Exposure
    template: Exposure
    planes: MaskPlanes
    coverage: float
    mode: str
    metrics: dict
    timings: Timings
    fakes: object = None  # pandas.DataFrame of the fakes injected after the kernel fit (inject_stage)

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        return 1024 + _nbytes(self.science) + _nbytes(self.template)


def prepare_subtraction(science: Exposure, template: Exposure, config: PipelineConfig, *,
                        metrics: dict | None = None, timings: dict | None = None) -> PreparedPair:
    """Stage 1: :func:`prepare_inputs` (grid, PSFs, coverage, variance scaling) and the mode choice.

    ``metrics`` and ``timings`` (e.g. the read and warp times of a batch) start the result's.
    """
    timings = Timings(timings or {})
    metrics = {"method": config.method, **(metrics or {})}
    science, template, planes, coverage = prepare_inputs(science, template, config, timings, metrics)
    cx, cy = science.center
    mode = st.choose_mode(config.subtract.mode, science.psf, template.psf, cx, cy)
    metrics["mode"] = mode
    return PreparedPair(science=science, template=template, planes=planes, coverage=coverage, mode=mode,
                        metrics=metrics, timings=timings)


def _raise_kernel_failure(exc: DiffimError, coverage: float, config: PipelineConfig):
    """A failed kernel fit on a poorly covered template is :class:`NoWorkFound`; otherwise ``exc`` itself."""
    if coverage < config.subtract.min_coverage_on_kernel_failure:
        raise NoWorkFound(
            f"kernel fit failed ({exc}) with template coverage {100 * coverage:.1f}% "
            f"< {100 * config.subtract.min_coverage_on_kernel_failure:.0f}%",
            coverage=coverage,
        ) from exc
    raise exc


def kernel_sources_stage(prepared: PreparedPair, config: PipelineConfig, *, sources=None):
    """Stage 2: kernel sources and their stamps by cell (:func:`~diffim_dag.stages.kernel_fit.select_kernel_cells`).

    Returns
    -------
    KernelCells

    Raises
    ------
    InsufficientKernelSourcesError, or NoWorkFound when the template coverage is low.
    """
    from .stages.kernel_fit import select_kernel_cells

    try:
        return select_kernel_cells(prepared.science, prepared.template, mode=prepared.mode, config=config.kernel,
                                   source_config=config.sources, sources=sources)
    except DiffimError as exc:
        _raise_kernel_failure(exc, prepared.coverage, config)


@dataclass(eq=False)
class CellFits:
    """Stage 3's output: the first fit of some cells (``{cell: CellFit}``) and its wall time."""

    fits: dict
    seconds: float

    def __sizeof__(self) -> int:
        return 1024 + 4096 * len(self.fits)


def fit_cells_stage(cells, cell_ids=None, *, map_cells=None) -> CellFits:
    """Stage 3: the first fit of the cells ``cell_ids`` (all when None; one graph task per cell)."""
    from .stages.kernel_fit import fit_kernel_cells

    t0 = time.perf_counter()
    fits = fit_kernel_cells(cells, cell_ids, map_cells=map_cells)
    return CellFits(fits=fits, seconds=time.perf_counter() - t0)


@dataclass(eq=False)
class KernelStage:
    """Stage 4's output: the fitted kernel and what convolution and decorrelation need.

    Attributes
    ----------
    fit : KernelFitResult
    kernel_sum : float
        Kernel sum at the image centre (κ).
    decorrelation_kernel : ndarray or None
        The (spatially constant) decorrelation kernel; None when decorrelation is off or spatially varying.
    sigma_unconvolved2, sigma_convolved2, kappa : float or None
        Inputs of the decorrelation (None when it is off).
    metrics, timings : dict
    """

    fit: object
    kernel_sum: float
    decorrelation_kernel: np.ndarray | None
    sigma_unconvolved2: float | None
    sigma_convolved2: float | None
    kappa: float | None
    metrics: dict
    timings: Timings
    variance_factor: float = 1.0
    psf_decorrelation_kernel: np.ndarray | None = None  # φ at the centre, for the difference's PSF

    def __sizeof__(self) -> int:
        return 65536


def spatial_solve_stage(prepared: PreparedPair, cells, cell_fits, config: PipelineConfig, *,
                        map_cells=None) -> KernelStage:
    """Stage 4: clipping, refits, spatial solve (:func:`~diffim_dag.stages.kernel_fit.solve_kernel` started
    from ``cell_fits``), the differential-background check and the decorrelation kernel.

    Parameters
    ----------
    prepared : PreparedPair
    cells : KernelCells
    cell_fits : sequence of CellFits
        Together the first fit of every cell of ``cells``.
    config : PipelineConfig
    map_cells : callable, optional
        How the refits run (in turn when None).

    Raises
    ------
    NoKernelCandidatesError, or NoWorkFound when the template coverage is low.
    """
    from .kernels.decorrelate import decorrelation_kernel_image
    from .stages.kernel_fit import kernel_fit_result, solve_kernel

    timings = Timings(prepared.timings)
    metrics = dict(prepared.metrics)
    t0 = time.perf_counter()
    initial: dict = {}
    for cf in cell_fits:
        initial.update(cf.fits)
    cell_seconds = sum(cf.seconds for cf in cell_fits)
    try:
        solve = solve_kernel(cells.cells, cells.basis, cells.config, cells.solution_bbox, mode=cells.mode,
                             map_cells=map_cells, initial=initial)
    except DiffimError as exc:
        _raise_kernel_failure(exc, prepared.coverage, config)
    fit = kernel_fit_result(cells, solve, solve_seconds=time.perf_counter() - t0 + cell_seconds)
    timings["kernel_fit"] = timings.get("kernel_fit", 0.0) + cells.seconds + cell_seconds + time.perf_counter() - t0
    solution = fit.solution
    metrics["kernel"] = dict(fit.diagnostics)
    kernel_sum = solution.kernel_sum_at_center()
    metrics["kernel"]["kernel_sum_center"] = kernel_sum
    k0 = solution.kernel_at(*solution.center)
    kh = k0.shape[0] // 2
    kg = np.arange(-kh, kh + 1)
    metrics["kernel"]["kernel_centroid_center"] = [float((k0.sum(0) * kg).sum() / k0.sum()),
                                                   float((k0.sum(1) * kg).sum() / k0.sum())]
    science, template, planes = prepared.science, prepared.template, prepared.planes
    _check_differential_background(solution, science, template, config, metrics)

    decorr = config.decorrelation
    decorr_kernel = psf_phi = None
    with timings.stage("decorrelation_kernel"):
        sm, tm = science.arrays()[2], template.arrays()[2]
        bad_s = (sm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0
        bad_t = (tm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0
        kernel, su2, sc2, kappa = _decorrelation_inputs(prepared.mode, science, template, solution, bad_s, bad_t)
        factor, correlations = _correlated_noise_factor(prepared, kernel, su2, sc2, kappa, bad_s, bad_t,
                                                        decorrelated=decorr.enabled)
        del bad_s, bad_t
        metrics["noise_correlation"] = {**correlations, "variance_factor": factor}
        if decorr.enabled:
            metrics["decorrelation"] = {"sigma_unconvolved2": su2, "sigma_convolved2": sc2, "kappa": kappa,
                                        "spatially_varying": bool(decorr.spatially_varying)}
            psf_phi = decorrelation_kernel_image(kernel, sigma_u2=su2, sigma_c2=sc2, kappa=kappa)
            if not decorr.spatially_varying:
                decorr_kernel = psf_phi
        else:
            su2 = sc2 = kappa = None
    return KernelStage(fit=fit, kernel_sum=kernel_sum, decorrelation_kernel=decorr_kernel, sigma_unconvolved2=su2,
                       sigma_convolved2=sc2, kappa=kappa, metrics=metrics, timings=timings, variance_factor=factor,
                       psf_decorrelation_kernel=psf_phi)


def _correlated_noise_factor(prepared, kernel, su2, sc2, kappa, bad_s, bad_t, *, decorrelated: bool):
    """The inputs' noise correlations and the factor they put on the difference's white-noise variance
    (:func:`~diffim_dag.kernels.decorrelate.correlated_variance_factor`)."""
    from .kernels.decorrelate import correlated_variance_factor

    si, sv, _ = prepared.science.arrays()
    ti, tv, _ = prepared.template.arrays()
    rho_s = st.measure_noise_correlation(si, sv, bad_s)
    rho_t = st.measure_noise_correlation(ti, tv, bad_t)
    rho_u, rho_c = (rho_s, rho_t) if prepared.mode == CONVOLVE_TEMPLATE else (rho_t, rho_s)
    factor = correlated_variance_factor(kernel, sigma_u2=su2, sigma_c2=sc2, kappa=kappa, correlation_u=rho_u,
                                        correlation_c=rho_c, decorrelated=decorrelated)
    h = rho_s.shape[0] // 2
    summary = {"science_lag1": [float(rho_s[h, h + 1]), float(rho_s[h + 1, h])],
               "template_lag1": [float(rho_t[h, h + 1]), float(rho_t[h + 1, h])]}
    return float(factor), summary


def _variances(prepared: PreparedPair, kernel_sum: float):
    """``(unconvolved, convolved)`` input variance planes, the unconvolved one on the science's scale
    (convolveScience: :math:`V_T / κ^2`)."""
    sv, tv = prepared.science.arrays()[1], prepared.template.arrays()[1]
    if prepared.mode == CONVOLVE_TEMPLATE:
        return sv, tv
    return (tv * np.float32(1.0 / kernel_sum**2)).astype(np.float32), sv


def subtract_tiles_stage(prepared: PreparedPair, kernel: KernelStage, config: PipelineConfig, cores, *,
                         halo: int | None = None) -> dict:
    """Stage 5: convolve and subtract the tiles ``cores`` (:func:`~diffim_dag.stages.subtract.subtract_tile`).

    ``halo=None`` reads the kernel half-width around each tile (tiles of a larger image);
    ``halo=0`` with the whole image as the one core is the eager path.  Returns ``{core: DifferenceTile}``.
    """
    planes = prepared.planes
    solution = kernel.fit.solution
    params = dict(
        xy0=prepared.science.xy0, shape=prepared.science.shape, mode=prepared.mode, kernel_sum=kernel.kernel_sum,
        mask_planes=planes.as_dict(), kept=tuple(config.subtract.template_mask_planes_kept),
        skip_bits=planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in planes]),
        subtract_background=config.subtract.subtract_background, edge_bit=planes["EDGE"],
    )
    h = solution.half_width if halo is None else int(halo)
    science, template = prepared.science.arrays(), prepared.template.arrays()
    return {tuple(c): st.subtract_tile(science, template, solution, core=tuple(c), halo=h, **params) for c in cores}


def decorrelate_tiles_stage(prepared: PreparedPair, kernel: KernelStage, cores, tiles) -> dict:
    """Stage 6: decorrelate the tiles ``cores`` (:func:`~diffim_dag.stages.subtract.decorrelate_tile`).

    ``tiles`` maps cores to :class:`~diffim_dag.stages.subtract.DifferenceTile` and holds each core
    and its neighbours.  Without a (spatially constant) decorrelation kernel the tiles pass unchanged.
    """
    if kernel.decorrelation_kernel is None:
        return {tuple(c): tiles[tuple(c)] for c in cores}
    vu, vc = _variances(prepared, kernel.kernel_sum)
    keep_bits = prepared.planes.bitmask(["NO_DATA", "EDGE"])
    return {tuple(c): st.decorrelate_tile(tiles, tuple(c), bbox=prepared.science.bbox,
                                          kernel=kernel.decorrelation_kernel, variance_unconvolved=vu,
                                          variance_convolved=vc, xy0=prepared.science.xy0, kappa=kernel.kappa,
                                          keep_bits=keep_bits)
            for c in cores}


def difference_stage(prepared: PreparedPair, kernel: KernelStage, config: PipelineConfig, tiles) -> SubtractionResult:
    """Stage 7: the difference, matched template and matched science from their tiles; spatially varying
    decorrelation (whole image), the difference PSF and the quality metrics.

    ``tiles`` maps cores to :class:`~diffim_dag.stages.subtract.DifferenceTile` and covers the image.
    Returns the :class:`SubtractionResult` without DiaSources (see :func:`with_catalog`).
    """
    timings = Timings(kernel.timings)
    metrics = dict(kernel.metrics)
    science, template, planes, mode = prepared.science, prepared.template, prepared.planes, prepared.mode
    fit = kernel.fit
    solution = fit.solution
    decorr = config.decorrelation
    pieces = list(tiles.values())
    for t in pieces:
        for k, v in t.seconds.items():
            timings[k] = timings.get(k, 0.0) + v

    def plane(name, dtype):
        return st.assemble(((t.core, getattr(t, name)) for t in pieces), science.bbox, dtype=dtype)

    d_img, d_var, d_msk = plane("image", np.float32), plane("variance", np.float32), plane("mask", np.int32)
    conv_img = plane("convolved_image", np.float32)
    conv_var = plane("convolved_variance", np.float32)
    conv_msk = plane("convolved_mask", np.int32)
    del pieces
    vu, vc = _variances(prepared, kernel.kernel_sum)
    if decorr.enabled and decorr.spatially_varying:
        with timings.stage("decorrelate_spatial"):
            from .kernels.decorrelate import decorrelate_spatial

            kfun = (lambda x, y: solution.kernel_at(x, y)) if mode == CONVOLVE_TEMPLATE else (
                lambda x, y: solution.kernel_at(x, y) / solution.kernel_sum_at(x, y))
            d_img, d_var = decorrelate_spatial(
                d_img, kernel_at=kfun, origin=science.xy0, grid_cells=decorr.grid_cells,
                sigma_u2=kernel.sigma_unconvolved2, sigma_c2=kernel.sigma_convolved2, variance_unconvolved=vu,
                variance_convolved=vc)

    if kernel.variance_factor != 1.0:
        # resampled inputs: their correlated noise makes the difference's per-pixel variance differ from
        # the white-noise propagation (the factor is 1 for white inputs)
        d_var = (d_var * np.float32(kernel.variance_factor)).astype(np.float32)
    decorr_kernel = kernel.decorrelation_kernel
    unconvolved = science if mode == CONVOLVE_TEMPLATE else template
    difference_psf = science.psf
    psf_phi = kernel.psf_decorrelation_kernel  # φ at the centre (also when the decorrelation varies)
    if mode == CONVOLVE_SCIENCE:
        # a source that changed in the science sits in the difference as P_S ⊗ K/κ, which matches the
        # template's PSF only as well as the kernel does: measure it with that very shape
        difference_psf = decorrelated_psf(science.psf, psf_phi, science.bbox, kernel_at=solution.kernel_at)
    elif psf_phi is not None:
        # decorrelation sharpens the difference: its PSF is the unconvolved PSF ⊗ the decorrelation kernel
        difference_psf = decorrelated_psf(science.psf, psf_phi, science.bbox)
    difference = Exposure.from_arrays(
        d_img, d_var, d_msk, xy0=science.xy0, mask_planes=planes, wcs=science.wcs, psf=difference_psf,
        info=science.info.replace(variance_source="propagated"), validate=False, copy=False,
    )
    kernel_sum = kernel.kernel_sum
    if mode == CONVOLVE_TEMPLATE:
        matched_template = Exposure.from_arrays(conv_img, conv_var, conv_msk, xy0=science.xy0, mask_planes=planes,
                                                wcs=template.wcs, psf=science.psf, info=template.info, validate=False,
                                                copy=False)
        matched_science = science
    else:
        # both on the science's photometric scale: S ⊗ K/κ and T/κ (the difference is their difference, less b/κ)
        ti, tv, tm = template.arrays()
        matched_template = Exposure.from_arrays(ti / np.float32(kernel_sum), tv / np.float32(kernel_sum**2), tm,
                                                xy0=science.xy0, mask_planes=planes, wcs=template.wcs,
                                                psf=template.psf, info=template.info, validate=False, copy=False)
        matched_science = Exposure.from_arrays(conv_img / np.float32(kernel_sum), conv_var / np.float32(kernel_sum**2),
                                               conv_msk, xy0=science.xy0, mask_planes=planes, wcs=science.wcs,
                                               psf=template.psf, info=science.info, validate=False,
                                               copy=False)

    with timings.stage("metrics"):
        cx, cy = science.center
        noise_bits = planes.bitmask([p for p in ("NO_DATA", "BAD", "SAT", "EDGE", "CR") if p in planes])
        d_var, scaled = st.scale_difference_variance(d_img, d_var, (d_msk & noise_bits) != 0,
                                                     enabled=config.subtract.scale_difference_variance)
        difference = difference.with_planes(variance=d_var)
        used = fit.candidates[fit.candidates["status"] == "used"] if len(fit.candidates) else fit.candidates
        star_xy = np.column_stack([used["x"] - science.xy0[0], used["y"] - science.xy0[1]]) if len(used) else np.zeros((0, 2))
        psf_c = unconvolved.psf
        q = st.quality_metrics(
            science=matched_science.arrays()[0], difference=d_img, difference_variance=d_var, difference_mask=d_msk,
            planes=planes, star_xy=star_xy, fwhm=psf_c.fwhm(cx, cy),
            ratio_mean_limit=config.subtract.bad_subtraction_ratio_mean,
            ratio_std_limit=config.subtract.bad_subtraction_ratio_std,
        )
        q.update(scaled)
        good_bits = planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])
        q["background_left"] = background_left(d_img, d_var, (d_msk & good_bits) != 0,
                                               difference.psf.kernel_image(cx, cy))
        metrics["quality"] = q
        metrics["photometric_scale"] = _photometric_scale(science, template, used, kernel_sum, mode)
        metrics["limiting_magnitude"] = {
            role: st.exposure_limit(exp, (cx, cy), zero_point=None if exp.info.photo_calib is None
                                    else exp.info.photo_calib.zero_point)
            for role, exp in (("science", science), ("template", template), ("difference", difference))}
    metrics["timings_s"] = dict(timings)
    return SubtractionResult(
        difference=difference, matched_template=matched_template, matched_science=matched_science, mode=mode,
        kernel_fit=fit, decorrelation_kernel=decorr_kernel, metrics=metrics, dia_sources=None,
    )


def _photometric_scale(science: Exposure, template: Exposure, stars, kernel_sum: float, mode: str) -> dict:
    """The stars' aperture flux ratio (science / template counts) beside the kernel's (κ, or 1/κ in convolveScience)."""
    from .stages.photometry import aperture_flux_ratio

    kernel = kernel_sum if mode == CONVOLVE_TEMPLATE else 1.0 / kernel_sum
    if not len(stars):
        return {"stars": None, "n_stars": 0, "kernel": kernel}
    ratio, table = aperture_flux_ratio(science, template, stars["x"].to_numpy(), stars["y"].to_numpy(), min_snr=20.0)
    return {"stars": ratio, "n_stars": int(table["used"].sum()), "kernel": kernel}


def judge_result(result: SubtractionResult, config: PipelineConfig) -> SubtractionResult:
    """``result`` with its verdict (:func:`~diffim_dag.stages.verdict.judge`) in ``metrics["quality"]``."""
    from .stages.verdict import judge

    q = judge(result.metrics, result.dia_sources, shape=result.difference.shape, subtract_config=config.subtract,
              n_sky_requested=config.detection.n_sky_sources)
    result.metrics = {**result.metrics, "quality": q}
    return result


def detection_config(config: PipelineConfig, result=None, *, fft_workers: int = 1):
    """The :class:`~diffim_dag.stages.detect.DetectMeasureConfig` of a pipeline (tiles = subtraction tiles).

    ``result`` (a subtraction result) supplies the PSF-matching kernel's size for
    ``detection.systematic_radius="kernel"``.  ``fft_workers``: FFT threads of the matched filters (an
    in-process run has the machine to itself; a task on a Dask worker keeps 1).
    """
    from .stages.detect import DetectMeasureConfig

    kernel_size = None
    if result is not None:
        kernel_size = (getattr(result, "metrics", None) or {}).get("kernel", {}).get("kernel_size")
    return DetectMeasureConfig.from_detection_config(config.detection, tile_size=config.subtract.tile_size,
                                                     kernel_size=kernel_size, fft_workers=int(fft_workers))


def prepare_detection_stage(result: SubtractionResult, config: PipelineConfig, *, fft_workers: int = 1):
    """Stage 8: the whole-image part of detection (:func:`~diffim_dag.stages.detect.prepare_detection`).

    Detection runs on the difference's matched filter, or on the significance of ``result.score``
    when the method made a score image (``al-preconvolve``, ``zogy``); measurement is on the
    difference, forced photometry on the matched science and template.
    """
    from .stages.detect import prepare_detection

    score = None
    if getattr(result, "score", None) is not None:
        from .stages.zogy import score_significance

        score = score_significance(result.score)
    return prepare_detection(result.difference, science=result.matched_science, template=result.matched_template,
                             config=detection_config(config, result, fft_workers=fft_workers), score=score)


@dataclass(eq=False)
class DetectedTiles:
    """Stage 9's output: ``{tile index: TileResult}`` of some tiles and the wall time."""

    tiles: dict
    seconds: float

    def __sizeof__(self) -> int:
        return 1024 + sum(int(r.catalog.memory_usage(deep=False).sum()) + 2048 * len(r.footprints)
                          for r in self.tiles.values())


def detect_tiles_stage(inputs, indices=None, *, map_tiles=None) -> DetectedTiles:
    """Stage 9: detect and measure the tiles ``indices`` (all when None) of the detection ``inputs``.

    ``map_tiles(function, list_of_kwargs)`` runs them (:func:`diffim_dag.graph.tile_mapper`); in turn when None.
    """
    from .stages.detect import _detect_measure_task, detect_tiles

    t0 = time.perf_counter()
    if map_tiles is None:
        tiles = detect_tiles(inputs, indices)
    else:
        idx = list(range(len(inputs.tiles()))) if indices is None else [int(k) for k in indices]
        tiles = dict(zip(idx, map_tiles(_detect_measure_task, [inputs.tile_kwargs(k) for k in idx])))
    return DetectedTiles(tiles=tiles, seconds=time.perf_counter() - t0)


@dataclass(eq=False)
class CatalogStage:
    """Stage 10's output: the DiaSource catalogue, its counts (``metrics``) and the detection wall time."""

    dia_sources: object
    metrics: dict
    seconds: float

    def __sizeof__(self) -> int:
        return 1024 + int(self.dia_sources.memory_usage(deep=False).sum())


def catalog_stage(inputs, detected) -> CatalogStage:
    """Stage 10: stitch the tiles of ``detected`` (sequence of :class:`DetectedTiles` covering every tile),
    add sky sources, ids and RA/Dec (:func:`~diffim_dag.stages.detect.finish_catalog`)."""
    from .stages.detect import finish_catalog

    t0 = time.perf_counter()
    results: dict = {}
    for d in detected:
        results.update(d.tiles)
    dia_sources = finish_catalog(inputs, [results[k] for k in sorted(results)])
    real = dia_sources[~dia_sources["sky_source"]]
    metrics = {"dia_sources": {
        "n": int(len(real)),
        "n_negative": int(real["is_negative"].sum()),
        "n_dipoles": int(real["is_dipole"].sum()) if "is_dipole" in real else None,
        "n_sky_sources": int(dia_sources["sky_source"].sum()),
        "systematic_fraction": dia_sources.attrs.get("systematic_fraction"),
        "significance_stdev": dia_sources.attrs.get("significance_stdev"),
    }}
    seconds = inputs.seconds + sum(d.seconds for d in detected) + time.perf_counter() - t0
    return CatalogStage(dia_sources=dia_sources, metrics=metrics, seconds=seconds)


def with_catalog(result: SubtractionResult, catalog: CatalogStage) -> SubtractionResult:
    """A copy of ``result`` with the catalogue, its counts and the ``detect_measure`` time."""
    import dataclasses

    metrics = {**result.metrics, **catalog.metrics}
    timings = dict(metrics.get("timings_s", {}))
    timings["detect_measure"] = timings.get("detect_measure", 0.0) + catalog.seconds
    factor = catalog.metrics["dia_sources"].get("significance_stdev")
    limits = metrics.get("limiting_magnitude") or {}
    if factor and "difference" in limits and "noise_factor" not in limits["difference"]:
        # the 5σ that detection reaches: σ as measured on the significance (correlated noise included)
        metrics["limiting_magnitude"] = {**limits, "difference": st.detection_limit(limits["difference"], factor)}
    metrics["timings_s"] = timings
    return dataclasses.replace(result, dia_sources=catalog.dia_sources, metrics=metrics)


def _tiled_difference(prepared: PreparedPair, kernel: KernelStage, config: PipelineConfig, client) -> dict:
    """Stages 5–6 as tiled Dask arrays (graph.py) in this process or on ``client``: ``{bbox: DifferenceTile}``.

    Convolution, difference and decorrelation are each stored tile by tile into preallocated
    arrays, so no tile is held twice; the tiles run the same kernels as
    :func:`~diffim_dag.stages.subtract.subtract_tile` and :func:`~diffim_dag.stages.subtract.decorrelate_tile`.
    """
    from . import graph

    science, template, planes, mode = prepared.science, prepared.template, prepared.planes, prepared.mode
    solution = kernel.fit.solution
    si, sv, sm = science.arrays()
    ti, tv, tm = template.arrays()
    skip_bits = planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in planes])
    h = solution.half_width
    common = dict(mode=mode, subtract_background=config.subtract.subtract_background, xy0=science.xy0,
                  shape=science.shape, half_width=h, edge_bit=planes["EDGE"])
    tile = config.subtract.tile_size
    t0 = time.perf_counter()
    s_d = graph.planes_to_dask(si, sv, sm, tile)
    t_d = graph.planes_to_dask(ti, tv, tm, tile)
    t_d = (t_d[0], t_d[1], graph.template_mask_tiles(t_d[2], planes.as_dict(),
                                                     kept=config.subtract.template_mask_planes_kept))
    ref_d, other_d = (t_d, s_d) if mode == CONVOLVE_TEMPLATE else (s_d, t_d)
    conv = graph.convolve_tiles(*ref_d, solution, half_width=h, xy0=science.xy0, skip_bits=skip_bits)
    # stored first: a single graph would hold every convolved tile until its difference tile ran
    conv_img, conv_var, conv_msk = graph.compute(*conv, client=client)
    conv = graph.planes_to_dask(conv_img, conv_var, conv_msk, tile)
    s_side, t_side = (other_d, conv) if mode == CONVOLVE_TEMPLATE else (conv, other_d)
    diff_d = graph.difference_tiles(s_side, t_side, kernel_sum=kernel.kernel_sum, background_solution=solution,
                                    **common)
    d_img, d_var, d_msk = graph.compute(*diff_d, client=client)
    del s_d, t_d, ref_d, other_d, conv, s_side, t_side, diff_d
    seconds = {"convolve_subtract": time.perf_counter() - t0}
    decorr_kernel = kernel.decorrelation_kernel
    if decorr_kernel is not None:
        t0 = time.perf_counter()
        vu, vc = _variances(prepared, kernel.kernel_sum)
        d_d, dv_d, dm_d = graph.planes_to_dask(d_img, d_var, d_msk, tile)
        vu_d = graph.planes_to_dask(vu, vu, vu, tile)[0]
        vc_d = graph.planes_to_dask(vc, vc, vc, tile)[0]
        d_img, d_var = graph.compute(
            graph.filter_tiles(d_d, decorr_kernel, half_width=decorr_kernel.shape[0] // 2, xy0=science.xy0),
            graph.decorrelated_variance_tiles(dv_d, dm_d, vu_d, vc_d, kappa=kernel.kappa,
                                              keep_bits=planes.bitmask(["NO_DATA", "EDGE"])),
            client=client)
        del d_d, dv_d, dm_d, vu_d, vc_d
        seconds["decorrelate"] = time.perf_counter() - t0
    bbox = science.bbox
    return {bbox: st.DifferenceTile(core=bbox, image=d_img, variance=d_var, mask=d_msk, convolved_image=conv_img,
                                    convolved_variance=conv_var, convolved_mask=conv_msk, seconds=seconds)}


def subtract_exposures(
    science: Exposure,
    template: Exposure,
    *,
    config: PipelineConfig | None = None,
    client=None,
    tiled: bool = True,
    sources=None,
    detect: bool = False,
) -> SubtractionResult:
    """Alard–Lupton subtraction of ``template`` from ``science`` (same pixel grid).

    Runs the stages in turn: :func:`prepare_subtraction` → :func:`kernel_sources_stage` →
    :func:`fit_cells_stage` → :func:`spatial_solve_stage` → convolve/subtract and decorrelate
    (:func:`subtract_tiles_stage` and :func:`decorrelate_tiles_stage` on the whole image, or the
    tiled Dask arrays of graph.py) → :func:`difference_stage` → detection
    (:func:`prepare_detection_stage`, :func:`detect_tiles_stage`, :func:`catalog_stage`).  The batch
    graph (:func:`diffim_dag.visit.visit_graph`) runs the same stage functions as separate tasks.

    Parameters
    ----------
    science, template : Exposure
        With PSF models; the template must share the science pixel grid (warping is a separate stage).
    config : PipelineConfig
    client : distributed.Client, optional
        Where the tiled graphs run (threaded scheduler when None).
    tiled : bool
        Run convolution/subtraction/decorrelation tile by tile as Dask graphs (else eagerly on one tile).
    sources : pandas.DataFrame, optional
        Kernel-source catalog (columns x, y in parent pixels); detected on the science when None.
    detect : bool
        Also detect and measure DiaSources on the difference (``result.dia_sources``).
    """
    from .graph import cell_mapper

    config = config or PipelineConfig()
    prepared = prepare_subtraction(science, template, config)
    map_cells = cell_mapper(client)
    cells = kernel_sources_stage(prepared, config, sources=sources)
    kernel = spatial_solve_stage(prepared, cells, [fit_cells_stage(cells, map_cells=map_cells)], config,
                                 map_cells=map_cells)
    del cells
    prepared = inject_stage(prepared, config, kernel)
    if tiled:
        tiles = _tiled_difference(prepared, kernel, config, client)
    else:
        whole = [prepared.science.bbox]
        tiles = subtract_tiles_stage(prepared, kernel, config, whole, halo=0)
        tiles = decorrelate_tiles_stage(prepared, kernel, whole, tiles)
    result = difference_stage(prepared, kernel, config, tiles)
    del tiles
    if detect:
        if client is None:
            # in process, the tiles run in turn with all cores on each FFT: the per-source fits hold the GIL, and
            # two tile threads took 5.0–6.0 s against 4.4 s in turn on a 4096² difference (2 cores)
            inputs = prepare_detection_stage(result, config, fft_workers=os.cpu_count() or 1)
            detected = detect_tiles_stage(inputs)
        else:
            from .graph import tile_mapper

            inputs = prepare_detection_stage(result, config)
            detected = detect_tiles_stage(inputs, map_tiles=tile_mapper(client))
        result = with_catalog(result, catalog_stage(inputs, [detected]))
        result = with_injection(result, match_stage(result, result.dia_sources, prepared.fakes, config))
    return result


def decorrelated_psf(psf, decorrelation_kernel: np.ndarray | None, bbox, *, nodes: int = 5, kernel_at=None):
    """The difference's PSF: ``psf`` (⊗ the unit-sum matching kernel ``kernel_at(x, y)`` when given) ⊗ the
    decorrelation kernel, as a :class:`~diffim_dag.psf.GridPsf` on ``nodes × nodes`` positions over
    ``bbox`` (a single :class:`~diffim_dag.psf.ImagePsf` when nothing varies)."""
    from .kernels.convolve import fft_convolve as fftconvolve

    from .psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf

    x0, x1, y0, y1 = bbox
    extra = (0 if decorrelation_kernel is None else decorrelation_kernel.shape[0] - 1)
    if kernel_at is not None:
        extra += kernel_at((x0 + x1) / 2, (y0 + y1) / 2).shape[0] - 1
    size = psf.default_size((x0 + x1) / 2, (y0 + y1) / 2) + extra
    size += 1 - size % 2

    def at(x, y):
        img = psf.kernel_image(x, y, size=size)
        if kernel_at is not None:
            k = kernel_at(x, y)
            img = fftconvolve(img, k / k.sum(), mode="same")
        if decorrelation_kernel is not None:
            img = fftconvolve(img, decorrelation_kernel, mode="same")
        # no clipping of negative pixels: clipping an estimated PSF's noisy wings adds a few % of spurious
        # positive wing that the normalization takes from the core (PSF fluxes 5 % high, convolveScience)
        return img / img.sum()

    if kernel_at is None and isinstance(psf, (GaussianPsf, MoffatPsf, ImagePsf)):
        return ImagePsf(at(None, None), source="decorrelated difference PSF", normalized=True)
    xs = np.linspace(x0, x1 - 1, nodes)
    ys = np.linspace(y0, y1 - 1, nodes)
    images = np.stack([np.stack([at(x, y) for x in xs]) for y in ys])
    return GridPsf(images, xs, ys, source="difference PSF", normalized=True)


def _check_differential_background(solution, science, template, config, metrics) -> None:
    """Record the fitted differential background (at the centre, and in detection-σ units).

    A constant offset b in the difference shifts the matched-filter significance of every pixel by
    ``b √NEA / σ``; whether any is left in the difference is judged on the difference itself
    (``quality.background_left``, :mod:`~diffim_dag.stages.verdict`).
    """
    cx, cy = solution.center
    b = float(solution.background_at(cx, cy))
    var = float(np.median(science.arrays()[1])) + float(np.median(template.arrays()[1]))
    nea = 1.0 / float(np.sum(science.psf.kernel_image(cx, cy) ** 2))
    shift = abs(b) * np.sqrt(nea) / np.sqrt(max(var, 1e-30))
    metrics["differential_background"] = {"center": b, "detection_sigma": shift,
                                          "subtracted": bool(config.subtract.subtract_background)}


def run_subtraction(science: Exposure, template: Exposure | None, *, config: PipelineConfig, out_dir, scheduler=None,
                    client=None, plots: bool = False, warp: bool | None = None,
                    template_store=None) -> SubtractionResult:
    """Warp when needed, subtract, detect and measure, on a cluster, and write the output set to ``out_dir``.

    Runs on ``client``, or on ``scheduler`` (an address, or ``"local"`` for a new LocalCluster), or, by
    default, in this process with Dask's threaded scheduler: for one visit that is faster than starting a
    LocalCluster and shipping the planes to its workers (2048², 2 cores: 11.6 s against 19.2 s end to end,
    median of 3).  ``warp=None`` warps the
    template when the pixel grids differ by more than 0.01 px; ``warp=False`` declares one grid;
    ``template_store`` (a folder of patches) replaces ``template``.  The outputs are written into a
    temporary folder beside ``out_dir`` and installed as a whole (:func:`~diffim_dag.products.write_output_set`);
    ``out_dir=None`` writes nothing.
    """
    return run_pair([science, template], config=config, out_dir=out_dir, scheduler=scheduler, client=client,
                    plots=plots, warp=warp, template_store=template_store)


def run_pair(pair: list, *, config: PipelineConfig, out_dir, scheduler=None, client=None, plots: bool = False,
             warp: bool | None = None, template_store=None) -> SubtractionResult:
    """:func:`run_subtraction` of ``pair = [science, template]``, a list it empties as the run goes: the raw
    template once it is warped, both raw exposures once they are prepared.  A caller that hands over its
    only references (the CLI, which read the files) lets those planes go: ~0.45 GB less at 4096²."""
    cc = config.cluster
    target = scheduler or cc.scheduler
    if client is not None or target is None:  # the given client, or this process's threads
        result = _prepare_and_subtract(pair, config, client, warp, template_store)
    else:
        from .cluster import open_client

        with open_client(target, cc) as c:
            result = _prepare_and_subtract(pair, config, c, warp, template_store)
    if out_dir is not None:
        from .products import write_output_set

        write_output_set(result, out_dir, plots=plots, config=config)
    return result


def subtract(science: Exposure, template: Exposure, *, config: PipelineConfig | None = None, client=None,
             tiled: bool = True, detect: bool = True, psfs: dict | None = None) -> SubtractionResult:
    """Subtract ``template`` from ``science`` (one pixel grid) with ``config.method``: the public entry point.

    Runs :func:`prepare_exposures` (each input's sky removed; a PSF estimated where none is given)
    and then ``al`` (:func:`subtract_exposures`), ``al-preconvolve`` (score image) or ``zogy``
    (D and S_corr); the score methods return a result with a ``score`` exposure.  ``metrics``
    gains ``sky`` and ``psf`` (what was removed, where each PSF came from).  With ``config.fakes``, fakes
    are injected after those stages (:func:`inject_stage`) and matched after detection
    (:func:`match_stage`): ``result.injection`` and ``metrics["injection"]``.
    """
    return _subtract_pair([science, template], config=config, client=client, tiled=tiled, detect=detect, psfs=psfs)


def _subtract_pair(pair: list, *, config: PipelineConfig | None, client, tiled: bool, detect: bool,
                   psfs: dict | None = None) -> SubtractionResult:
    """:func:`subtract` of ``pair = [science, template]``, emptied once both are prepared (see :func:`run_pair`)."""
    config = config or PipelineConfig()
    # in process the science and template stages overlap (2 threads: 5.8–7.0 s → 4.1–4.9 s at 4096², 2 cores)
    prepared = prepare_exposures(pair[0], pair[1], config, psfs=psfs, threads=2 if client is None else 1)
    pair.clear()
    return subtract_prepared(prepared, config=config, client=client, tiled=tiled, detect=detect)


def subtract_al_preconvolve(science: Exposure, template: Exposure, *, config: PipelineConfig, client=None,
                            tiled: bool = True, detect: bool = False, sources=None) -> ScoreSubtractionResult:
    r"""AL subtraction plus the pre-convolution score; detection on the score, measurement on the difference.

    Parameters
    ----------
    science, template : Exposure
        On one pixel grid, with PSF models.
    config : PipelineConfig
        The AL configuration (``sources``, ``kernel``, ``subtract``, ``decorrelation``, ``detection``);
        the same kernel settings are used for the pre-convolution fit.
    client, tiled
        As :func:`diffim_dag.pipeline.subtract_exposures`.
    detect : bool
        Detect on the score significance (threshold ``detection.threshold``, no smoothing) and
        measure on the decorrelated AL difference.
    sources : DataFrame, optional
        Kernel-source catalog for both kernel fits.

    Returns
    -------
    ScoreSubtractionResult
        The AL result (difference, matched template/science, kernel fit, metrics) with
        ``score`` and ``metrics["preconvolution"]``.
    """
    from .graph import cell_mapper
    from .stages.preconvolve import preconvolved_score
    from .stages.zogy import ScoreSubtractionResult, detect_on_score, score_significance

    t = Timings()
    with t.stage("al_subtraction"):
        al = subtract_exposures(science, template, config=config, client=client, tiled=tiled, sources=sources,
                                detect=False)
    metrics = dict(al.metrics)
    metrics["method"] = "al-preconvolve"
    with t.stage("score"):
        score, _ = preconvolved_score(science, template, config=config, runner=_runner(client, tiled, config),
                                      map_cells=cell_mapper(client, prefix="fit-cell-preconvolved") if tiled else None,
                                      sources=sources, metrics=metrics)
        significance = score_significance(score)
    dia = None
    if detect:
        with t.stage("detect_measure"):
            dia = detect_on_score(al.difference, al.matched_science, al.matched_template, significance, config=config,
                                  runner=_runner(client, tiled, config), metrics=metrics)
    metrics["timings_s"] = {**metrics.get("timings_s", {}), **{f"preconvolve_{k}": v for k, v in t.items()}}
    return ScoreSubtractionResult(
        difference=al.difference, matched_template=al.matched_template, matched_science=al.matched_science,
        mode=al.mode, kernel_fit=al.kernel_fit, decorrelation_kernel=al.decorrelation_kernel, metrics=metrics,
        dia_sources=dia, score=score,
    )


def _runner(client, tiled: bool, config: PipelineConfig):
    """The runner a stage's tiles and cells go to (:mod:`diffim_dag.stages.runner`): Dask tasks on ``client`` (the
    threaded scheduler when None) when ``tiled``, else in turn in this thread."""
    if not tiled:
        return None
    from .graph import TileRunner

    return TileRunner(client, tile_size=config.subtract.tile_size)


def subtract_prepared(prepared: PreparedExposures, *, config: PipelineConfig, client=None, tiled: bool = True,
                      detect: bool = True) -> SubtractionResult:
    """The method's subtraction of exposures that went through :func:`prepare_exposures`."""
    if config.method != "al":  # (al injects after its kernel fit)
        prepared = inject_stage(prepared, config)
    science, template = prepared.science, prepared.template
    if config.method == "al":
        result = subtract_exposures(science, template, config=config, client=client, tiled=tiled, detect=detect)
    elif config.method == "al-preconvolve":
        result = subtract_al_preconvolve(science, template, config=config, client=client, tiled=tiled, detect=detect)
    else:
        from .stages.zogy import subtract_zogy

        result = subtract_zogy(science, template, config=config, zogy_config=config.zogy,
                               runner=_runner(client, tiled, config),
                               detect=detect)
    if config.method != "al" and detect:
        result = with_injection(result, match_stage(result, result.dia_sources, prepared.fakes, config))
    result.metrics = {**result.metrics, **prepared.metrics,
                      "timings_s": {**prepared.timings, **result.metrics.get("timings_s", {})}}
    return judge_result(result, config)


def _prepare_and_subtract(pair: list, config, client, warp, template_store):
    """Bring the template of ``pair = [science, template]`` onto the science grid (warp / store / registration),
    then subtract and detect; ``pair`` is emptied on the way (see :func:`run_pair`)."""
    from .stages.template import prepare_template

    t0 = time.perf_counter()
    pair[1], warp_metrics = prepare_template(pair[0], pair[1], store=template_store, warp=warp,
                                             min_coverage=config.subtract.min_template_coverage,
                                             tile=config.subtract.tile_size, workers=os.cpu_count() or 1)
    t_warp = time.perf_counter() - t0
    result = _subtract_pair(pair, config=config, client=client, tiled=True, detect=True)
    result.metrics["template"] = warp_metrics
    result.metrics["timings_s"] = {"template_warp": t_warp, **result.metrics["timings_s"]}
    return result


def run_demo(*, out_dir="demo_out", size: int = 1024, seed: int = 1, pipeline=None, overrides=(), scheduler=None,
             plots: bool = False) -> int:
    """Simulate a pair, write it, read it back and run every stage of the configured method (in this process, or
    on ``scheduler``)."""
    from .io.fits import read_exposure
    from .sim import SimConfig, simulate_pair, write_pair

    config = load_config(pipeline, list(overrides))
    out = Path(out_dir)
    print(f"diffim-dag demo: method {config.method}; stages of one (visit, detector):")
    for name in STAGES[config.method]:
        print(f"  [run] {name}")
    t0 = time.perf_counter()
    # sky-subtracted, like the calibrated exposures and coadds a survey subtracts
    pair = simulate_pair(SimConfig(size=size, seed=seed, sky_subtracted=True))
    with tempfile.TemporaryDirectory(prefix="diffim-dag-demo-") as scratch:
        inputs = write_pair(pair, Path(scratch) / "inputs")
        print(f"simulated a {size}x{size} pair (seed {seed}): {len(pair.truth)} injected objects -> {out / 'inputs'}")
        science = read_exposure(inputs["science"])
        template = read_exposure(inputs["template"])
        result = run_subtraction(science, template, config=config, out_dir=None, scheduler=scheduler, plots=plots)
        from .products import write_output_set

        write_output_set(result, out, plots=plots, config=config,
                         before_install=lambda tmp: shutil.copytree(Path(scratch) / "inputs", tmp / "inputs"))
    for line in result.summary_lines():
        print(line)
    print(_recovery_line(result.dia_sources, pair.truth))
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def _recovery_line(dia_sources, truth, *, radius: float = 2.0, min_snr: float = 7.0) -> str:
    """How many injected transients (S/N ≥ min_snr in the difference) the catalog holds within ``radius`` px."""
    real = dia_sources[~dia_sources["sky_source"]]
    inj = truth[truth["kind"].isin(["transient", "negative_transient"]) & (truth["snr_difference"] >= min_snr)]
    if not len(inj):
        return f"{len(real)} DiaSources detected"
    found = 0
    for _, row in inj.iterrows():
        if len(real) and (np.hypot(real["x"] - row["x"], real["y"] - row["y"]) <= radius).any():
            found += 1
    return (f"{len(real)} DiaSources detected; {found}/{len(inj)} injected transients with S/N ≥ {min_snr:g} "
            f"recovered within {radius:g} px")
