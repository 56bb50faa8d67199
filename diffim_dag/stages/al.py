"""The Alard–Lupton stages of a visit, each a task of its graph (:mod:`diffim_dag.visit`):

prepare (:func:`prepare_subtraction`) → kernel sources (:func:`kernel_sources_stage`) → first cell fits
(:func:`fit_cells_stage`), beside them each input's noise (:func:`input_noise_stage`) → spatial solve
(:func:`kernel_solve_stage`) → each task's window of the pair (:func:`window_stage`) → convolve/subtract tiles
(:func:`subtract_tiles_stage`); the decorrelation kernel (:func:`decorrelation_kernel_stage`, from the solve and
the inputs' noise) → decorrelate tiles (:func:`decorrelate_tiles_stage`)
→ the difference, its PSF and quality metrics (:func:`difference_stage`).

Every stage returns a new object and never modifies its inputs (a task's result may feed several tasks, or
be recomputed after a worker is lost).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from ..config import PipelineConfig
from ..errors import DiffimError, NoWorkFound
from ..exposure import Exposure
from ..kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE
from ..masks import MaskPlanes
from ..memory import started_on_thread
from . import subtract as st
from .inputs import SubtractionResult, Timings, _nbytes, prepare_inputs
from .verdict import background_left
from ..kernels.maskops import FlaggedPixels, has_bits

__all__ = ["PreparedPair", "prepare_subtraction", "kernel_sources_stage", "CellFits", "fit_cells_stage",
           "KernelStage", "InputNoise", "input_noise_stage", "spatial_solve_stage", "kernel_solve_stage",
           "decorrelation_kernel_stage", "PairWindow", "window_stage", "subtract_tiles_stage",
           "decorrelate_tiles_stage", "difference_stage", "QualityStage", "quality_stage", "with_quality",
           "decorrelated_psf"]


@dataclass(frozen=True)
class InputNoise:
    """One input's noise as the decorrelation sees it (:func:`input_noise_stage`)."""

    mean_variance: float  # clipped mean of the variance plane (counts²)
    correlation: np.ndarray  # its sky's pixel-noise autocorrelation, lags ±3


def input_noise_stage(prepared: PreparedPair, index: int) -> InputNoise:
    """The ``("input-noise", V, D, i)`` task: the clipped mean variance and the noise correlation of the science
    (0) or the template (1), off NO_DATA, BAD and SAT pixels.  Neither depends on the kernel: the two tasks run
    beside the kernel-source selection and the cell fits, and the spatial solve takes their results."""
    from ..kernels.decorrelate import clipped_mean_variance

    image, variance, mask = (prepared.science if index == 0 else prepared.template).arrays()
    bad = has_bits(mask, prepared.planes.bitmask(["NO_DATA", "BAD", "SAT"]))
    return InputNoise(mean_variance=clipped_mean_variance(variance, bad),
                      correlation=st.measure_noise_correlation(image, variance, bad))


def _decorrelation_inputs(mode, solution, noise_s: InputNoise, noise_t: InputNoise):
    kernel = solution.kernel_at(*solution.center)
    kappa = float(kernel.sum())
    if mode == CONVOLVE_TEMPLATE:
        return kernel, noise_s.mean_variance, noise_t.mean_variance, kappa
    # convolveScience: D = S ⊗ (K/κ) − T/κ, the science convolved with a unit-sum kernel and the template
    # (the unconvolved image) on the science's scale
    return kernel / kappa, noise_t.mean_variance / kappa**2, noise_s.mean_variance, 1.0


# --------------------------------------------------------------------------- the stages of one AL subtraction
#
# prepare → kernel sources → fit cells → spatial solve → window, subtract and decorrelate per tile →
# difference; visit.visit_graph makes each one a task (per tile, per cell) of the visit's graph, the one
# path of every run.  Every stage returns a new object and never modifies its inputs (a task's result may
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
                        metrics: dict | None = None, timings: dict | None = None,
                        variance_scales: dict | None = None) -> PreparedPair:
    """Stage 1: :func:`prepare_inputs` (grid, PSFs, coverage, variance scaling) and the mode choice.

    ``metrics`` and ``timings`` (e.g. the read and warp times of a batch) start the result's;
    ``variance_scales`` are the factors the input stages measured (:func:`prepare_inputs`).
    """
    timings = Timings(timings or {})
    metrics = {"method": config.method, **(metrics or {})}
    science, template, planes, coverage = prepare_inputs(science, template, config, timings, metrics,
                                                         variance_scales)
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


def kernel_sources_stage(prepared: PreparedPair, config: PipelineConfig, *, sources=None, detection=None):
    """Stage 2: kernel sources and their stamps by cell (:func:`~diffim_dag.stages.kernel_fit.select_kernel_cells`;
    ``detection``: the science's background and sources found already, by
    :func:`~diffim_dag.stages.kernel_sources.detect_kernel_sources`).

    Returns
    -------
    KernelCells

    Raises
    ------
    InsufficientKernelSourcesError, or NoWorkFound when the template coverage is low.
    """
    from .kernel_fit import select_kernel_cells

    try:
        return select_kernel_cells(prepared.science, prepared.template, mode=prepared.mode, config=config.kernel,
                                   source_config=config.sources, sources=sources, detection=detection)
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
    from .kernel_fit import fit_kernel_cells

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


def spatial_solve_stage(prepared: PreparedPair, cells, cell_fits, config: PipelineConfig, noise=None, *,
                        map_cells=None) -> KernelStage:
    """Stage 4: the spatial solve (:func:`kernel_solve_stage`) and the decorrelation kernel
    (:func:`decorrelation_kernel_stage`), one after the other.  The visit graph runs them as two tasks, so that
    the tiles' convolutions, which need the solve only, do not wait for the inputs' noise (``input-noise``)."""
    return decorrelation_kernel_stage(prepared, kernel_solve_stage(prepared, cells, cell_fits, config,
                                                                   map_cells=map_cells), config, noise)


def kernel_solve_stage(prepared: PreparedPair, cells, cell_fits, config: PipelineConfig, *,
                       map_cells=None) -> KernelStage:
    """Stage 4a: clipping, refits, spatial solve (:func:`~diffim_dag.stages.kernel_fit.solve_kernel` started
    from ``cell_fits``) and the differential-background check: a :class:`KernelStage` without its decorrelation
    (:func:`decorrelation_kernel_stage` adds it).

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
    from .kernel_fit import kernel_fit_result, solve_kernel

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
    science, template = prepared.science, prepared.template
    _check_differential_background(solution, science, template, config, metrics)
    return KernelStage(fit=fit, kernel_sum=kernel_sum, decorrelation_kernel=None, sigma_unconvolved2=None,
                       sigma_convolved2=None, kappa=None, metrics=metrics, timings=timings)


def decorrelation_kernel_stage(prepared: PreparedPair, solved: KernelStage, config: PipelineConfig,
                               noise=None) -> KernelStage:
    """Stage 4b: the decorrelation kernel of :func:`kernel_solve_stage`'s solution, from the inputs' noise
    (``noise``: the science's and the template's :class:`InputNoise`, :func:`input_noise_stage`; measured here
    when None), and the factor the inputs' noise correlations put on the difference's variance: ``solved``
    with those added."""
    from ..kernels.decorrelate import decorrelation_kernel_image

    timings = Timings(solved.timings)
    metrics = dict(solved.metrics)
    solution = solved.fit.solution
    decorr = config.decorrelation
    decorr_kernel = psf_phi = None
    with timings.stage("decorrelation_kernel"):
        noise_s, noise_t = noise if noise is not None else (input_noise_stage(prepared, 0),
                                                            input_noise_stage(prepared, 1))
        kernel, su2, sc2, kappa = _decorrelation_inputs(prepared.mode, solution, noise_s, noise_t)
        factor, correlations = _correlated_noise_factor(prepared.mode, kernel, su2, sc2, kappa, noise_s.correlation,
                                                        noise_t.correlation, decorrelated=decorr.enabled)
        metrics["noise_correlation"] = {**correlations, "variance_factor": factor}
        if decorr.enabled:
            metrics["decorrelation"] = {"sigma_unconvolved2": su2, "sigma_convolved2": sc2, "kappa": kappa,
                                        "spatially_varying": bool(decorr.spatially_varying)}
            psf_phi = decorrelation_kernel_image(kernel, sigma_u2=su2, sigma_c2=sc2, kappa=kappa)
            if not decorr.spatially_varying:
                decorr_kernel = psf_phi
        else:
            su2 = sc2 = kappa = None
    return dataclasses.replace(solved, decorrelation_kernel=decorr_kernel, sigma_unconvolved2=su2,
                               sigma_convolved2=sc2, kappa=kappa, metrics=metrics, timings=timings,
                               variance_factor=factor, psf_decorrelation_kernel=psf_phi)


def _correlated_noise_factor(mode, kernel, su2, sc2, kappa, rho_s, rho_t, *, decorrelated: bool):
    """The factor the inputs' noise correlations (``rho_s``, ``rho_t``) put on the difference's white-noise
    variance (:func:`~diffim_dag.kernels.decorrelate.correlated_variance_factor`), and their lag-1 summary."""
    from ..kernels.decorrelate import correlated_variance_factor

    rho_u, rho_c = (rho_s, rho_t) if mode == CONVOLVE_TEMPLATE else (rho_t, rho_s)
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
    return _scaled_variances(prepared.mode, sv, tv, kernel_sum)


def _scaled_variances(mode: str, sv, tv, kernel_sum: float):
    if mode == CONVOLVE_TEMPLATE:
        return sv, tv
    return (tv * np.float32(1.0 / kernel_sum**2)).astype(np.float32, copy=False), sv


@dataclass(eq=False)
class PairWindow:
    """What one ``subtract``/``decorrelate`` task reads (:func:`window_stage`): its tiles' cores and the pair's
    planes on their bounding box grown by the matching kernel's half-width — not the whole exposure.

    Attributes
    ----------
    cores : list of (x_min, x_max, y_min, y_max)
    origin : (int, int)
        Parent-frame ``(x, y)`` of the planes' ``[0, 0]``.
    science, template : (image, variance, mask)
        The planes on the window (pixels beyond the image 0; views of the pair's planes where inside it).
    variances : (ndarray, ndarray) or None
        ``(unconvolved, convolved)`` input variances on the window for the decorrelation (None without one).
    xy0, shape, bbox
        The whole image's frame (EDGE pixels, the decorrelation's mirrored border).
    mode : str
    planes : MaskPlanes
    """

    cores: list
    origin: tuple
    science: tuple
    template: tuple
    variances: tuple | None
    xy0: tuple
    shape: tuple
    bbox: tuple
    mode: str
    planes: MaskPlanes

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        arrays = [*self.science, *self.template, *(self.variances or ())]
        return 1024 + sum(int(a.nbytes) for a in arrays)


def window_stage(prepared: PreparedPair, kernel: KernelStage, cores, *, decorrelated: bool | None = None) -> PairWindow:
    """The window of ``cores`` (tiles of the image): the pair's planes on the cores' bounding box grown by the
    matching kernel's half-width, computed once from the kernel's shape (:class:`PairWindow`).  ``decorrelated``:
    whether the tiles are to be decorrelated (the window then holds the input variances the decorrelation needs);
    None: whether ``kernel`` has a (spatially constant) decorrelation kernel (a :func:`kernel_solve_stage` result
    has none yet: its caller says)."""
    h = kernel.fit.solution.half_width
    cores = [tuple(int(v) for v in c) for c in cores]
    box = (min(c[0] for c in cores) - h, max(c[1] for c in cores) + h,
           min(c[2] for c in cores) - h, max(c[3] for c in cores) + h)
    xy0 = prepared.science.xy0

    def cut(planes):
        return tuple(st.cut_box(np.asarray(a), xy0, box) for a in planes)

    science, template = cut(prepared.science.arrays()), cut(prepared.template.arrays())
    if decorrelated is None:
        decorrelated = kernel.decorrelation_kernel is not None
    variances = None
    if decorrelated:
        variances = _scaled_variances(prepared.mode, science[1], template[1], kernel.kernel_sum)
    return PairWindow(cores=cores, origin=(box[0], box[2]), science=science, template=template, variances=variances,
                      xy0=tuple(xy0), shape=tuple(prepared.science.shape), bbox=tuple(prepared.science.bbox),
                      mode=prepared.mode, planes=prepared.planes)


def subtract_tiles_stage(window: PairWindow, kernel: KernelStage, config: PipelineConfig, *,
                         workers: int = 1, planes: st.TilePlanes | None = None) -> dict:
    """Stage 5: convolve and subtract the tiles of ``window`` (:func:`~diffim_dag.stages.subtract.subtract_tile`,
    reading the kernel half-width around each).  Returns ``{core: DifferenceTile}``.  ``workers``: threads of
    each tile's convolutions (the same values).  ``planes``: the whole planes the convolved planes and the mask
    are written into (:class:`~diffim_dag.stages.subtract.TilePlanes`, shared by the tasks of one process)."""
    mask_planes = window.planes
    solution = kernel.fit.solution
    params = dict(
        xy0=window.xy0, shape=window.shape, mode=window.mode, kernel_sum=kernel.kernel_sum,
        mask_planes=mask_planes.as_dict(), kept=tuple(config.subtract.template_mask_planes_kept),
        skip_bits=mask_planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in mask_planes]),
        subtract_background=config.subtract.subtract_background, edge_bit=mask_planes["EDGE"],
        planes_xy0=window.origin, workers=workers, planes=planes,
    )
    return {c: st.subtract_tile(window.science, window.template, solution, core=c, halo=solution.half_width,
                                **params)
            for c in window.cores}


def decorrelate_tiles_stage(window: PairWindow, kernel: KernelStage, tiles,
                            planes: st.TilePlanes | None = None) -> dict:
    """Stage 6: decorrelate the tiles of ``window`` (:func:`~diffim_dag.stages.subtract.decorrelate_tile`).

    ``tiles`` maps cores to :class:`~diffim_dag.stages.subtract.DifferenceTile` and holds each core
    and its neighbours.  Without a (spatially constant) decorrelation kernel the tiles pass unchanged.
    ``planes``: the whole planes the decorrelated image and variance are written into (as
    :func:`subtract_tiles_stage`'s).
    """
    from ..kernels.convolve import transforms_memo

    if kernel.decorrelation_kernel is None:
        return {c: tiles[c] for c in window.cores}
    vu, vc = window.variances
    keep_bits = window.planes.bitmask(["NO_DATA", "EDGE"])
    fts = transforms_memo(kernel)  # (one transform per padded tile shape, kept as long as ``kernel``)
    return {c: st.decorrelate_tile(tiles, c, bbox=window.bbox, kernel=kernel.decorrelation_kernel,
                                   variance_unconvolved=vu, variance_convolved=vc, xy0=window.origin,
                                   kappa=kernel.kappa, keep_bits=keep_bits, planes=planes, kernel_fts=fts)
            for c in window.cores}


def difference_stage(prepared: PreparedPair, kernel: KernelStage, config: PipelineConfig, tiles, *,
                     consume: bool = False, quality: bool = True, workers: int = 1) -> SubtractionResult:
    """Stage 7: the difference, matched template and matched science from their tiles; spatially varying
    decorrelation (whole image), the difference PSF, its variance scaled to its noise, and the metrics.

    ``tiles`` maps cores to :class:`~diffim_dag.stages.subtract.DifferenceTile` (or is a list of such
    mappings) and covers the image.  ``consume=True``: the tiles are taken out of their mappings as they are
    assembled (:func:`~diffim_dag.stages.subtract.assemble_tiles`; the ``difference`` task is their only user).
    ``quality=False`` leaves out the residual metrics (:func:`quality_stage`, a task of its own beside
    detection; :func:`with_quality` adds them).  ``workers``: threads that copy the tiles into the planes and
    measure the difference's noise (the in-process run's cores, which nothing else uses while this task runs).
    Returns the :class:`SubtractionResult` without DiaSources (see :func:`with_catalog`).
    """
    timings = Timings(kernel.timings)
    metrics = dict(kernel.metrics)
    science, template, planes, mode = prepared.science, prepared.template, prepared.planes, prepared.mode
    fit = kernel.fit
    solution = fit.solution
    decorr = config.decorrelation
    assembled, seconds = st.assemble_tiles(tiles, science.bbox, consume=consume, workers=workers)
    for k, v in seconds.items():
        timings[k] = timings.get(k, 0.0) + v
    d_img, d_var, d_msk = (assembled.pop(n) for n in ("image", "variance", "mask"))
    conv_img, conv_var, conv_msk = (assembled.pop(n) for n in ("convolved_image", "convolved_variance",
                                                                "convolved_mask"))
    vu, vc = _variances(prepared, kernel.kernel_sum)
    if decorr.enabled and decorr.spatially_varying:
        with timings.stage("decorrelate_spatial"):
            from ..kernels.decorrelate import decorrelate_spatial

            kfun = (lambda x, y: solution.kernel_at(x, y)) if mode == CONVOLVE_TEMPLATE else (
                lambda x, y: solution.kernel_at(x, y) / solution.kernel_sum_at(x, y))
            d_img, d_var = decorrelate_spatial(
                d_img, kernel_at=kfun, origin=science.xy0, grid_cells=decorr.grid_cells,
                sigma_u2=kernel.sigma_unconvolved2, sigma_c2=kernel.sigma_convolved2, variance_unconvolved=vu,
                variance_convolved=vc)

    if kernel.variance_factor != 1.0:
        # resampled inputs: their correlated noise makes the difference's per-pixel variance differ from
        # the white-noise propagation (the factor is 1 for white inputs); a plane this task took (``consume``) is
        # its own and scaled where it is, the same values without a second plane
        if consume:
            d_var *= np.float32(kernel.variance_factor)
        else:
            d_var = (d_var * np.float32(kernel.variance_factor)).astype(np.float32, copy=False)
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
        used = _used_stars(fit)

        def limit(exp):
            return st.exposure_limit(exp, (cx, cy), zero_point=None if exp.info.photo_calib is None
                                     else exp.info.photo_calib.zero_point)

        # the inputs' metrics (whole-frame NumPy passes) on a thread beside the difference's noise, whose windows
        # take the other threads: in turn, they left a core idle while every tile waited on this task
        inputs_metrics = started_on_thread(
            lambda: (_photometric_scale(science, template, used, kernel_sum, mode), limit(science), limit(template)),
            workers > 1)
        d_var, scaled = st.scale_difference_variance(d_img, d_var, FlaggedPixels(d_msk, noise_bits),
                                                     enabled=config.subtract.scale_difference_variance,
                                                     workers=workers, in_place=consume)
        difference = difference.with_planes(variance=d_var)
        metrics["quality"] = dict(scaled)
        if quality:
            metrics["quality"] = _with_residuals(metrics["quality"], _residual_metrics(
                difference, matched_science, unconvolved.psf, used, config))
        photometric_scale, science_limit, template_limit = inputs_metrics()
        metrics["photometric_scale"] = photometric_scale
        metrics["limiting_magnitude"] = {"science": science_limit, "template": template_limit,
                                         "difference": limit(difference)}
    metrics["timings_s"] = dict(timings)
    return SubtractionResult(
        difference=difference, matched_template=matched_template, matched_science=matched_science, mode=mode,
        kernel_fit=fit, decorrelation_kernel=decorr_kernel, metrics=metrics, dia_sources=None,
    )


def _used_stars(fit):
    return fit.candidates[fit.candidates["status"] == "used"] if len(fit.candidates) else fit.candidates


def _residual_metrics(difference: Exposure, matched_science: Exposure, psf, used, config: PipelineConfig) -> dict:
    """The difference's residuals on the kernel stars (:func:`~diffim_dag.stages.subtract.quality_metrics`, with
    ``psf``'s FWHM: the unconvolved image's) and the background it has left
    (:func:`~diffim_dag.stages.verdict.background_left`)."""
    d_img, d_var, d_msk = difference.arrays()
    planes = difference.mask_planes
    cx, cy = difference.center
    x0, y0 = difference.xy0
    star_xy = np.column_stack([used["x"] - x0, used["y"] - y0]) if len(used) else np.zeros((0, 2))
    q = st.quality_metrics(
        science=matched_science.arrays()[0], difference=d_img, difference_variance=d_var, difference_mask=d_msk,
        planes=planes, star_xy=star_xy, fwhm=psf.fwhm(cx, cy),
        ratio_mean_limit=config.subtract.bad_subtraction_ratio_mean,
        ratio_std_limit=config.subtract.bad_subtraction_ratio_std,
    )
    bad_bits = planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])  # (tested on the sample it reads)
    q["background_left"] = background_left(d_img, d_var, FlaggedPixels(d_msk, bad_bits),
                                           difference.psf.kernel_image(cx, cy))
    return q


def _with_residuals(quality: dict, residuals: dict) -> dict:
    """``metrics["quality"]``: the residual metrics, the variance scaling's report, the background left."""
    left = {k: v for k, v in residuals.items() if k != "background_left"}
    return {**left, **quality, "background_left": residuals["background_left"]}


@dataclass(frozen=True)
class QualityStage:
    """The ``quality`` task's result: the residual metrics of a difference and their wall time."""

    residuals: dict
    seconds: float


def quality_stage(result: SubtractionResult, config: PipelineConfig) -> QualityStage:
    """The ``("quality", V, D)`` task of the AL methods: the residual metrics of the ``difference`` task's result
    (the same as :func:`difference_stage` computes with ``quality=True``), beside detection, which does not
    need them; the ``result`` task adds them (:func:`with_quality`) before the verdict."""
    t0 = time.perf_counter()
    # the unconvolved image's PSF: the matched science's (the science, or the template on its scale)
    residuals = _residual_metrics(result.difference, result.matched_science, result.matched_science.psf,
                                  _used_stars(result.kernel_fit), config)
    return QualityStage(residuals=residuals, seconds=time.perf_counter() - t0)


def with_quality(result: SubtractionResult, quality: QualityStage | None) -> SubtractionResult:
    """``result`` with the ``quality`` task's residual metrics in ``metrics["quality"]`` (unchanged for None)."""
    if quality is None:
        return result
    import dataclasses

    metrics = {**result.metrics, "quality": _with_residuals(result.metrics.get("quality") or {}, quality.residuals)}
    metrics["timings_s"] = {**metrics.get("timings_s", {}), "quality": quality.seconds}
    return dataclasses.replace(result, metrics=metrics)


def _photometric_scale(science: Exposure, template: Exposure, stars, kernel_sum: float, mode: str) -> dict:
    """The stars' aperture flux ratio (science / template counts) beside the kernel's (κ, or 1/κ in convolveScience)."""
    from .photometry import aperture_flux_ratio

    kernel = kernel_sum if mode == CONVOLVE_TEMPLATE else 1.0 / kernel_sum
    if not len(stars):
        return {"stars": None, "n_stars": 0, "kernel": kernel}
    ratio, table = aperture_flux_ratio(science, template, stars["x"].to_numpy(), stars["y"].to_numpy(), min_snr=20.0)
    return {"stars": ratio, "n_stars": int(table["used"].sum()), "kernel": kernel}



def decorrelated_psf(psf, decorrelation_kernel: np.ndarray | None, bbox, *, nodes: int = 5, kernel_at=None):
    """The difference's PSF: ``psf`` (⊗ the unit-sum matching kernel ``kernel_at(x, y)`` when given) ⊗ the
    decorrelation kernel, as a :class:`~diffim_dag.psf.GridPsf` on ``nodes × nodes`` positions over
    ``bbox`` (a single :class:`~diffim_dag.psf.ImagePsf` when nothing varies)."""
    from ..kernels.convolve import fft_convolve as fftconvolve

    from ..psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf

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
    # every 4th pixel each way gives the planes' medians (sky pixels, nearly all of them) to well under 1 % (the
    # whole 4096² planes' took 0.18 s on the spatial solve's path)
    var = float(np.median(science.arrays()[1][::4, ::4])) + float(np.median(template.arrays()[1][::4, ::4]))
    nea = 1.0 / float(np.sum(science.psf.kernel_image(cx, cy) ** 2))
    shift = abs(b) * np.sqrt(nea) / np.sqrt(max(var, 1e-30))
    metrics["differential_background"] = {"center": b, "detection_sigma": shift,
                                          "subtracted": bool(config.subtract.subtract_background)}


