"""One (visit, detector) as a task graph: the one description of a subtraction's stages.

:func:`visit_graph` chains the stages with ``(stage, visit, detector[, index])`` keys; a batch is the union of
its visits' graphs (:func:`batch_graph`), and ``diffim-dag subtract`` and the Python API
(:mod:`diffim_dag.pipeline`) run the graph of one through :func:`diffim_dag.graph.execute`.

The task functions here read the inputs (``read``), bring the template onto the science grid (``template``),
prepare each exposure (``exposure``) and the pair (``inputs``, ``prepare``), run ZOGY and the pre-convolution
score, and assemble the result; the AL stages, detection and fakes come from :mod:`diffim_dag.stages`, the
``write`` tasks from :mod:`diffim_dag.visit_outputs`.  The graph's execution helpers (task keys,
:func:`~diffim_dag.graph.run_stage`, the markers a failed stage hands on) live in :mod:`diffim_dag.graph`.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PipelineConfig
from .graph import (Fused, TileRunner, run_fused, run_in_turn, run_stage, run_stage_keeping_freed,
                    run_stage_keeping_freed_below, task_key, write_key)
from .io.outputs import temporary_name
from .manifest import VisitSpec, input_shape
from .visit_outputs import verify_outputs, write_planes_stage, write_set_task, write_stage

log = logging.getLogger(__name__)

#: The exposures of a visit whose read and exposure tasks are ``("read"|"exposure", V, D, i)``, in index order.
PSF_ROLES = ("science", "template")


def _read_input(path: str, options: dict):
    from .io import read_exposure, read_zarr

    if Path(path).is_dir():
        return read_zarr(path).load()
    return read_exposure(path, **options)


def read_input(spec: VisitSpec, role: str):
    """Read the visit's ``role`` (``"science"``/``"template"``) exposure from its path (None: no template file)."""
    path = getattr(spec, role)
    if path is None:
        return None
    return _read_input(path, dict(getattr(spec, f"{role}_options")))


def read_visit_inputs(spec: VisitSpec):
    """Read the science exposure and the template exposure (None for a template store) of one visit."""
    return read_input(spec, "science"), read_input(spec, "template")


@dataclass(eq=False)
class Read:
    """A ``read`` task's result: the exposure as read (None: no template file) and the reading's wall time."""

    exposure: object
    seconds: float = 0.0

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees
        from .stages.inputs import _nbytes

        return 1024 + (_nbytes(self.exposure) if self.exposure is not None else 0)


def read_stage(spec: VisitSpec, role: str, out_dir: str | None = None, run_id: str = ""):
    """The ``("read", V, D, i)`` task: the science (0) or template (1) exposure read from its path.

    When this run already installed the visit's outputs (its worker died before reporting), the science's
    task returns :class:`~diffim_dag.graph.AlreadyWritten` instead, and the visit's later tasks hand that on
    without doing anything.
    """
    from .graph import AlreadyWritten

    if run_id and out_dir is not None and role == "science":
        existing = verify_outputs(out_dir, spec.visit, spec.detector, checksums=False)
        if existing is not None and existing.get("run_id") == run_id:
            return AlreadyWritten(visit=spec.visit, detector=spec.detector, manifest=existing)
    t0 = time.perf_counter()
    exposure = read_input(spec, role)
    return Read(exposure, time.perf_counter() - t0)


@dataclass(eq=False)
class Warped:
    """The ``template`` task's result: the template on the science grid, the warp's metrics and wall time."""

    exposure: object
    metrics: dict
    seconds: float
    read_seconds: float = 0.0  # both inputs' reads (the raw exposures themselves are not kept)
    check: object = None  # the alignment check after the warp, for the inputs task (the raw template, or its reader)

    def __sizeof__(self) -> int:
        from .stages.inputs import _nbytes

        return 1024 + _nbytes(self.exposure) + (self.check.__sizeof__() if self.check is not None else 0)


def template_stage(science: Read, template: Read, config: PipelineConfig, store=None, warp: bool | None = None,
                   workers: int = 1, read_again=None):
    """The ``("template", V, D)`` task: the template (or the ``store``'s patches) brought onto the science grid
    (:func:`~diffim_dag.stages.template.prepare_template`: warp, or registration when the grids already agree).
    ``warp=False`` declares one grid; ``workers``: the warp's threads.  The alignment check after a warp is the
    ``inputs`` task's (:func:`settle_alignment`): the ``exposure`` tasks find the two images' stars for their PSFs,
    and it matches those (``read_again``: reads the raw template again for a refinement, which the check then
    does not hold)."""
    from .stages.template import prepare_template

    t0 = time.perf_counter()
    exposure, metrics, check = prepare_template(science.exposure, template.exposure, store=store, warp=warp,
                                                min_coverage=config.subtract.min_template_coverage,
                                                tile=config.subtract.tile_size, workers=workers, check_later=True,
                                                read_again=read_again)
    return Warped(exposure, metrics, time.perf_counter() - t0, science.seconds + template.seconds, check)


def settle_alignment(science, template, warped: Warped, config: PipelineConfig, template_psf=None, workers: int = 1):
    """The alignment check that the ``template`` task left (``warped.check``), with the ``exposure`` tasks' results
    ``science`` and ``template``: returns ``(template's exposure-task result, the warp's metrics)``.

    The stars are those the exposure tasks centroided for their PSFs (the brightest of the whole image); an image
    whose PSF was supplied has its own searched here (in the alignment windows when both PSFs were supplied; in
    the whole image, as the other's PSF stars, when one was).  A warp by the WCSs whose residual is above the
    threshold is refined: the raw template is warped again and its exposure task's stages run again on it
    (``template_psf``: the PSF it was given) (:func:`~diffim_dag.stages.template.settle_alignment`)."""
    from .memory import map_on_threads
    from .stages.prepare import prepare_exposure
    from .stages.template import _stars, alignment_windows, check_coverage
    from .stages.template import settle_alignment as settle

    check = warped.check
    metrics = dict(warped.metrics)
    sci = science[0]
    s, t = science[1].get("alignment_stars"), template[1].get("alignment_stars")
    windows = alignment_windows(sci.bbox) if s is None and t is None else None  # (None: the whole images)
    if s is None or t is None:
        s, t = map_on_threads(lambda e: e[1] if e[1] is not None else _stars(e[0], windows=windows),
                              [(sci, s), (template[0], t)], workers)
    no_data = template[0].mask_planes.bitmask("NO_DATA")

    def warp_again(mapping):
        exposure = check.warp(mapping)
        check_coverage(sci, exposure, metrics, check.out_bbox, no_data, check.min_coverage)
        again = prepare_exposure(exposure, config, "template", psf=template_psf,
                                 scale="variance_scale" in template[1])
        stars = again[1].get("alignment_stars")
        return again, stars if stars is not None else _stars(again[0], windows=windows)

    again = settle(check, metrics, s, t, warp_again)
    return (again if again is not None else template), metrics


def exposure_stage(source, config: PipelineConfig, role: str, psf=None, scale: bool = True):
    """The ``("exposure", V, D, i)`` task: the input stages of the science (0) or the warped template (1):
    its PSF (supplied, ``psf``, or estimated from its stars, whose brightest the reports carry for the alignment
    check), sky and cosmic rays, and (``scale``) the factor its variance plane is to be scaled by
    (:func:`~diffim_dag.stages.prepare.prepare_exposure`).  Returns ``(exposure, reports, timings)``."""
    from .stages.prepare import prepare_exposure

    return prepare_exposure(source.exposure, config, role, psf=psf, scale=scale)


def inputs_stage(science, template, warped: Warped, config: PipelineConfig | None = None, workers: int = 1,
                 template_psf=None):
    """The ``("inputs", V, D)`` task: both prepared exposures as one
    :class:`~diffim_dag.stages.prepare.PreparedExposures`, with the reads', the warp's and the input stages'
    reports and wall times; the warp's alignment check (:func:`settle_alignment`, with ``template_psf``); the
    variance factors that the exposure tasks did not measure measured here (``config``; ``workers`` > 1: the two
    at once, their meshes and NumPy passes releasing the GIL)."""
    from .memory import map_on_threads
    from .stages.prepare import combine_prepared, variance_scale_stage

    metrics, check_seconds = warped.metrics, 0.0
    if warped.check is not None and config is not None:
        t0 = time.perf_counter()
        template, metrics = settle_alignment(science, template, warped, config, template_psf, workers)
        check_seconds = time.perf_counter() - t0
    done = {"science": science, "template": template}
    if config is not None:
        def measured(item):
            role, r = item
            return role, (r if "variance_scale" in r[1] else variance_scale_stage(r, config, role))

        done = dict(map_on_threads(measured, list(done.items()), workers))
    prepared = combine_prepared(done)
    first = {}
    if warped.read_seconds:  # (exposures in hand were not read here)
        first["read"] = warped.read_seconds
    if metrics:  # (the Python API's pair has no template task)
        prepared.metrics = {"template": metrics, **prepared.metrics}
        first["template_warp"] = warped.seconds
    if check_seconds:
        first["alignment_check"] = check_seconds
    prepared.timings = {**first, **prepared.timings}
    return prepared


def prepare_stage(inputs, config: PipelineConfig):
    """The ``("prepare", V, D)`` task of the AL methods: coverage, variance scaling and mode
    (:func:`~diffim_dag.stages.al.prepare_subtraction`) of the ``inputs`` task's pair."""
    from .stages.al import prepare_subtraction

    return prepare_subtraction(inputs.science, inputs.template, config, metrics=inputs.metrics,
                               timings=inputs.timings, variance_scales=inputs.variance_scales)


def _with_inputs(result, inputs):
    """A score method's result with the input stages' metrics and wall times first."""
    result.metrics = {**result.metrics, **inputs.metrics,
                      "timings_s": {**inputs.timings, **result.metrics.get("timings_s", {})}}
    return result


def zogy_stage(inputs, config: PipelineConfig, runner=None, consume: bool = False):
    """The ``("subtract", V, D)`` task of ``method: zogy``: D, P_D, S and S_corr cell by cell
    (:func:`~diffim_dag.stages.zogy.subtract_zogy`; ``runner``: where its cells run, in turn when None).

    ``consume`` (an in-process graph's own input stages, whose exposures no other task reads): the task takes
    the exposures out of ``inputs``, so that the planes variance scaling replaces are freed while the cells run
    (0.13 GB of a 4096² pair); a cluster's task leaves them, since a retried task needs them again.
    """
    from .stages.zogy import subtract_zogy

    if consume:  # (passed straight on: no reference stays here)
        result = subtract_zogy(_take(inputs, "science"), _take(inputs, "template"), config=config,
                               zogy_config=config.zogy, runner=runner, variance_scales=inputs.variance_scales)
    else:
        result = subtract_zogy(inputs.science, inputs.template, config=config, zogy_config=config.zogy, runner=runner,
                               variance_scales=inputs.variance_scales)
    return _with_inputs(result, inputs)


def _take(prepared, role: str):
    """``prepared``'s ``role`` exposure, which ``prepared`` then no longer holds."""
    exposure = getattr(prepared, role)
    if exposure is None:
        raise RuntimeError(f"the {role} exposure was already taken from the input stages' result")
    setattr(prepared, role, None)
    return exposure


@dataclass(eq=False)
class Preconvolved:
    """The ``preconvolve`` task's result: the pre-convolution score exposure, its metrics and wall time."""

    score: object
    metrics: dict
    seconds: float

    def __sizeof__(self) -> int:
        from .stages.inputs import _nbytes

        return 1024 + _nbytes(self.score)


def preconvolve_stage(inputs, config: PipelineConfig, runner=None, sources=None, detection=None) -> Preconvolved:
    """The ``("preconvolve", V, D)`` task of ``method: al-preconvolve``: the pre-convolution score of the pair
    (:func:`~diffim_dag.stages.preconvolve.preconvolved_score`, with its own kernel fit), beside the AL stages
    (``detection``: the AL stages' ``kernel-detect`` result, when it is of this pair's science)."""
    from .stages.preconvolve import preconvolved_score

    t0 = time.perf_counter()
    metrics: dict = {}
    score, _ = preconvolved_score(inputs.science, inputs.template, config=config, runner=runner, sources=sources,
                                  metrics=metrics, variance_scales=getattr(inputs, "variance_scales", None),
                                  detection=detection)
    return Preconvolved(score, metrics, time.perf_counter() - t0)


def score_stage(al, preconvolved: Preconvolved):
    """The ``("score", V, D)`` task of ``method: al-preconvolve``: the AL ``difference`` task's result with the
    ``preconvolve`` task's score (detection runs on the score, measurement on the AL difference)."""
    from .stages.zogy import ScoreSubtractionResult

    metrics = {**al.metrics, "method": "al-preconvolve", **preconvolved.metrics}
    metrics["timings_s"] = {**metrics.get("timings_s", {}), "preconvolve_score": preconvolved.seconds}
    return ScoreSubtractionResult(
        difference=al.difference, matched_template=al.matched_template, matched_science=al.matched_science,
        mode=al.mode, kernel_fit=al.kernel_fit, decorrelation_kernel=al.decorrelation_kernel, metrics=metrics,
        dia_sources=None, score=preconvolved.score)


def result_stage(result, catalog, injection, config: PipelineConfig, quality=None):
    """The ``("result", V, D)`` task: the subtraction with its residual metrics (``quality``: the AL methods'
    ``quality`` task), its DiaSources (``catalog``: None without detection), the matched fakes and the verdict
    (:func:`~diffim_dag.stages.catalog.judge_result`)."""
    from .stages.al import with_quality
    from .stages.catalog import judge_result, with_catalog
    from .stages.prepare import with_injection

    result = with_quality(result, quality)
    if catalog is not None:
        result = with_catalog(result, catalog)
    return judge_result(with_injection(result, injection), config)


def summary_stage(result, paths: dict | None = None) -> list:
    """The ``("summary", V, D)`` task: the result's summary lines (all a client needs to print), with the
    files the ``write`` task installed (``paths``)."""
    import copy

    if paths is not None:
        result = copy.copy(result)
        result.paths = dict(paths)
    return result.summary_lines()


def process_visit(spec: VisitSpec, config: PipelineConfig, out_dir: str, *, run_id: str = "") -> dict:
    """Run one (visit, detector) of a batch where it is called and return its record (a dict).

    The visit's graph (:func:`visit_graph`) run here, in turn: the same stage functions a batch runs as
    separate tasks.  Permanent errors become a ``failed`` record; anything else is raised.  The outputs
    appear atomically.
    """
    return compute_visit(spec, config, os.fspath(Path(out_dir).resolve()), run_id=run_id)


# --------------------------------------------------------------------------- the graph of a visit


@dataclass(frozen=True)
class VisitGrid:
    """How many tile and cell tasks one visit's graph has.

    Attributes
    ----------
    tiles : (int, int)
        Task grid of the tile stages (subtract, decorrelate): tile ``(iy, ix)`` of the image
        runs in task ``(iy mod n_y, ix mod n_x)`` (:func:`~diffim_dag.stages.subtract.cores_of_task`).
    cells : int
        ``fit-cell`` tasks: cell ``c`` is fitted in task ``c mod cells``.
    shape : (int, int) or None
        The image shape the grid was derived from (None: unknown, one task for all tiles and
        one for all cells, with the same results).
    detect : (int, int) or None
        Task grid of the ``detect`` tasks (None: ``tiles``).
    """

    tiles: tuple[int, int] = (1, 1)
    cells: int = 1
    shape: tuple[int, int] | None = None
    detect: tuple[int, int] | None = None


#: The stages from each input's exposure stage to the spatial solve.  In process their tasks keep the memory they
#: free (:func:`~diffim_dag.graph.run_stage_keeping_freed`): the input stages' planes and temporaries, freed as the
#: kernel is fitted, are what the tile tasks allocate again a second later, and on a virtual machine memory handed
#: back is reclaimed by the host within 1–2 s and costs up to 8 s per GB to touch again.  A 4096² pair, each run
#: after 6 s of rest: 10.6–11.5 s against 11.0–13.2 s (4 pairs; system time 5.8–7.0 s against 6.4–9.1 s), and
#: 0.95× in 6 back-to-back pairs; the same peak (1.27–1.30 GiB).  ``tile-planes``, which only makes the planes the
#: tile tasks fill, is of the phase too: as the first task after it to compare the resident size with the limit, it
#: handed back everything freed (0.4 GB at 4096², above the limit by 8 MB with the memory touched ahead still in the
#: heap), which the tile tasks then touched again (157 thousand pages instead of 56).
KERNEL_PHASE = frozenset({"exposure", "inputs", "prepare", "kernel-detect", "input-noise", "kernel-sources",
                          "fit-cell", "spatial-solve", "decorrelation-kernel", "tile-planes"})

#: In process, the other tasks hand the memory they free back only while the process's resident size is above
#: what it held when the graph was built plus this many planes (float32) of the visit's image
#: (:func:`~diffim_dag.graph.run_stage_keeping_freed_below`); below it, the next tasks reuse that memory instead of
#: fresh pages, which the kernel must zero (a 4096² run touched 1.2 million 4 kB pages, handing back after every
#: task).  With 16 planes a 4096² pair took 0.92× the time (medians of 4 interleaved runs, 9.4 s against 10.2 s;
#: 0.7 million pages; system time 3.5 s against 4.3 s) with the same peak (1.29–1.31 GB against 1.28–1.31 GB);
#: 18 planes, 0.89× with a peak of 1.32–1.35 GB; never handing back, 0.92× in another set but a peak of 1.74–1.79 GB.
KEEP_PLANES = 16
#: ... and at most this many bytes (an 8192² image's 16 planes; 16 planes of a 4096² image are 1 GiB).  Capped at
#: 1 GiB, an 8192² run's live planes alone passed the limit, and each of its 64 tile tasks handed back what it had
#: freed, which the next touched again (3.8–4.0 million pages a run); with 4 GiB it took 0.88× the time (4
#: interleaved pairs: 26.6–28.6 s against 30.0–32.8 s; 1.4–1.6 million pages, system time 11.5–13.8 s against
#: 14.6–21.8 s) with the same peak (4.30–4.37 GB against 4.26–4.38 GB) and outputs.  (With 4 GiB an earlier stop
#: saw peaks of 4.38–4.72 GiB against 3.95–3.97 GiB, and no gain; the phase that sets the peak has changed since.)
KEEP_MAX_BYTES = 4 << 30

#: The stages of the convolution's tile tasks (ZOGY's whole-image ``subtract`` task is none).  In process these
#: hand back what they free only above the limit of the others (:data:`KEEP_PLANES`) plus :data:`TILE_KEEP_PLANES`
#: planes of a tile: the tiles' transforms and temporaries, freed by one tile and allocated again by the next, sit
#: on top of what the phase holds.  At 4096² the phase ran at 1.1–1.22 GiB, across the 1.14 GiB limit: the run
#: handed back 2.1 GiB in 49 calls, most of it in that phase, and its tile tasks touched 318 thousand fresh pages
#: (about 1 s of system time).  With 32 tile planes (128 MiB at tiles of 1024) it handed back 1.6 GiB in 29 calls,
#: its tile tasks touched 98 thousand pages, and it took 0.98× the time (14 interleaved pairs; system time 2.4 s
#: against 2.8 s) with the same peak (1.27–1.29 GiB against 1.24–1.31).  Sixteen 4096² planes more for every task
#: (1.26 GiB) gave 0.97× but a peak 40 MiB higher; 48 tile planes let the phase's heap grow to 1.32 GiB.
TILE_PHASE = frozenset({"window", "subtract", "decorrelate"})
TILE_KEEP_PLANES = 32

#: Kernel cells per ``fit-cell`` task on a cluster: a cell fit is ~1 ms, a task's overhead on a cluster several
#: ms, so a task per cell (256 for a 2048² image) cost more than the fits (6 visits of 2048² on one worker:
#: 113 s with a task per cell).
CELLS_PER_TASK = 64


def visit_grid(shape: tuple[int, int] | None, config, *, in_process: bool = False) -> VisitGrid:
    """The task grid of a visit whose science image has ``shape`` (ny, nx): one task per tile, and one
    ``fit-cell`` task per :data:`CELLS_PER_TASK` kernel cells.

    ``in_process`` (a single visit on this process's threads): a ``fit-cell`` task per core, each fitting every
    n-th cell (the cells' candidates are fitted in batches whose FFTs and solves release the GIL: a 4096²
    pair's 0.33 s of fits took 0.18–0.20 s on two tasks, 2 cores; the same kernels), and one ``detect`` task
    with every core on its FFTs and its tiles (a second detect task gained nothing, 1.01× over 6 interleaved
    4096² runs; the one task's tiles on two threads, 0.97× over 14, as the planes' writing and the quality
    metrics ending beside it leave a core to the tiles); the tile tasks of the convolution run at once.
    """
    from .stages.subtract import tile_grid

    if shape is None:
        return VisitGrid()
    ny, nx = (int(v) for v in shape)
    tiles = tile_grid((0, nx, 0, ny), config.subtract.tile_size)
    cell = config.kernel.cell_size
    n_cells = max(1, -(-nx // cell)) * max(1, -(-ny // cell))
    if in_process:
        return VisitGrid(tiles=tiles, cells=min(os.cpu_count() or 1, n_cells), shape=(ny, nx), detect=(1, 1))
    detect = tile_grid((0, nx, 0, ny), config.detection.tile_size or max(nx, ny))  # (a task per detection tile)
    return VisitGrid(tiles=tiles, cells=max(1, n_cells // CELLS_PER_TASK), shape=(ny, nx),
                     detect=None if detect == tiles else detect)


def _keep_below(shape: tuple[int, int] | None) -> int | None:
    """The resident size above which an in-process task hands back what it freed: now's plus :data:`KEEP_PLANES`
    float32 planes of ``shape``, at most :data:`KEEP_MAX_BYTES` (None, every task hands it back: no shape, or no
    resident size to compare).  Memory the command line touched ahead (:func:`~diffim_dag.memory.touch_heap_ahead`)
    is free memory the tasks will reuse, not held: it is part of the planes kept, not added to them."""
    from .memory import heap_touched_ahead, resident_bytes

    resident = resident_bytes()
    if shape is None or resident is None:
        return None
    resident = max(resident - heap_touched_ahead(), 0)
    return resident + min(KEEP_PLANES * 4 * int(shape[0]) * int(shape[1]), KEEP_MAX_BYTES)


def _fit_cells_task(cells, index: int, n_tasks: int):
    from .stages.al import fit_cells_stage

    return fit_cells_stage(cells, [c.cell for c in cells.cells if c.cell % n_tasks == index])


def _window_task(prepared, kernel, config, ty: int, tx: int, nty: int, ntx: int, decorrelated: bool):
    from .stages.al import window_stage
    from .stages.subtract import cores_of_task

    cores = cores_of_task(prepared.science.bbox, config.subtract.tile_size, (ty, tx), (nty, ntx)).values()
    return window_stage(prepared, kernel, list(cores), decorrelated=decorrelated)


def _subtract_task(window, kernel, config, workers: int = 1, planes=None):
    from .stages.al import subtract_tiles_stage

    return subtract_tiles_stage(window, kernel, config, workers=workers, planes=planes)


def _merge(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _decorrelate_task(window, kernel, neighbours: list, planes=None):
    from .stages.al import decorrelate_tiles_stage

    return decorrelate_tiles_stage(window, kernel, _merge(neighbours), planes)


def _tile_planes_task(prepared):
    """The ``tile-planes`` task of the in-process run: the difference's whole planes, which its tile tasks write
    their cores into (:class:`~diffim_dag.stages.subtract.TilePlanes`)."""
    from .stages.subtract import TilePlanes

    return TilePlanes(prepared.science.bbox)


def _difference_task(prepared, kernel, config, tiles: list, consume: bool, workers: int = 1):
    from .stages.al import difference_stage

    return difference_stage(prepared, kernel, config, tiles, consume=consume, quality=False, workers=workers)


def _alone_threads(alone: bool) -> int:
    """Threads for a task that has the in-process run's machine to itself (every core), else 1."""
    return (os.cpu_count() or 1) if alone else 1


def _quality_task(result, config):
    from .stages.al import quality_stage

    return quality_stage(result, config)


def _after(waited: list, function, *args):
    """``function(*args)`` once the tasks ``waited`` for are done (their results are not used): a task placed
    where a core is idle (:meth:`_Builder.task`'s ``after``)."""
    return function(*args)


def _kernel_sources_task(prepared, config, sources, detection=None):
    from .stages.al import kernel_sources_stage

    return kernel_sources_stage(prepared, config, sources=sources, detection=detection)


def _kernel_detect_task(science, config, sources):
    """The ``kernel-detect`` task: the science's background and (without a catalogue) its sources, from the
    science's ``exposure`` task (its image and mask are those of the prepared pair; only the variance is
    scaled later)."""
    from .stages.kernel_sources import detect_kernel_sources

    return detect_kernel_sources(science[0], config.sources, detect=sources is None)


def _detect_prepare_task(result, config, fft_workers: int):
    from .stages.catalog import prepare_detection_stage

    return prepare_detection_stage(result, config, fft_workers=fft_workers)


def _fakes_of(prepared):
    return prepared.fakes


def _detect_task(inputs, ty: int, tx: int, nty: int, ntx: int, workers: int = 1):
    """A ``detect`` task: its tiles of the detection ``inputs``, on ``workers`` threads (in turn for 1)."""
    from .memory import map_on_threads
    from .stages.catalog import detect_tiles_stage
    from .stages.subtract import tile_grid

    n_y, n_x = tile_grid(inputs.bbox, inputs.config.tile_size)
    own = [iy * n_x + ix for iy in range(n_y) for ix in range(n_x) if (iy % nty, ix % ntx) == (ty, tx)]
    if workers <= 1:
        return detect_tiles_stage(inputs, own)
    return detect_tiles_stage(inputs, own, map_tiles=lambda function, kwargs: map_on_threads(function, kwargs,
                                                                                              workers))


class _Builder:
    """Adds one visit's tasks to a graph: ``(stage, visit, detector[, index])`` keys with the run's token, each
    task's body :func:`~diffim_dag.graph.run_stage`."""

    def __init__(self, visit: int, detector: int, run_id: str, keep_freed=(), keep_below: int | None = None,
                 tile_headroom: int = 0):
        self.v, self.d, self.run_id = int(visit), int(detector), run_id
        self.keep_freed = frozenset(keep_freed)
        self.keep_below = keep_below
        self.tile_headroom = int(tile_headroom)
        self.dsk: dict = {}

    def key(self, stage, *index):
        return task_key(stage, self.v, self.d, *index, run_id=self.run_id)

    def task(self, stage, index, function, *args, after=()):
        """Add task ``(stage, *index)``: its body keeps the memory it frees (a :attr:`keep_freed` stage), hands it
        back above the resident size :attr:`keep_below` (a tile task of a :data:`TILE_PHASE` stage: plus
        :attr:`tile_headroom`), or (:func:`~diffim_dag.graph.run_stage`) hands it back.
        ``after``: keys of tasks it waits for without using their results."""
        if after:
            function, args = _after, (list(after), function, *args)
        if stage in self.keep_freed:
            runner = (run_stage_keeping_freed,)
        elif self.keep_below is not None:
            limit = self.keep_below + (self.tile_headroom if stage in TILE_PHASE and index else 0)
            runner = (run_stage_keeping_freed_below, limit)
        else:
            runner = (run_stage,)
        self.dsk[self.key(stage, *index)] = (*runner, stage, self.v, self.d, function, *args)
        return self.key(stage, *index)

    def value(self, stage, index, value):
        """A result already in hand (an in-memory exposure) as the graph's ``stage`` key."""
        self.dsk[self.key(stage, *index)] = value
        return self.key(stage, *index)


def _input_tasks(g: _Builder, config, source, *, out_dir, run_id, warp, workers, psfs, template_store=None,
                 in_process: bool = False) -> tuple:
    """read ×2 → template → exposure ×2 → inputs: the pair on one grid, sky removed, PSFs attached
    (``in_process``: the variance factors measured by the inputs task, not the exposure tasks).

    ``source`` is a :class:`VisitSpec` (paths: each ``read`` task reads its file where it runs) or a
    ``(science, template)`` pair of exposures in hand.  Returns the ``inputs`` key."""
    if isinstance(source, VisitSpec):
        reads = [g.task("read", (i,), read_stage, source, role, out_dir, run_id) for i, role in enumerate(PSF_ROLES)]
        store = source.template_store
    else:
        reads = [g.value("read", (i,), Read(exposure)) for i, exposure in enumerate(source)]
        store = template_store
    if warp == "none":  # the Python API's pair: one pixel grid, the template taken as it is
        g.value("template", (), Warped(source[1], {}, 0.0))
    else:
        # a refinement reads the template file again: the check made after the exposure tasks does not hold it
        again = functools.partial(read_input, source, "template") if isinstance(source, VisitSpec) else None
        g.task("template", (), template_stage, reads[0], reads[1], config, store, warp, workers, again)
    # in process, the inputs task measures both variance factors, at once on every core (0.16 s instead of 0.31 s
    # at 4096²): the science's source detection (kernel-detect, which needs no variance) starts as soon as its
    # exposure task is done, and the factors take the other core
    done = [g.task("exposure", (i,), exposure_stage, reads[0] if i == 0 else g.key("template"), config, role,
                   (psfs or {}).get(role), not in_process)
            for i, role in enumerate(PSF_ROLES)]
    # the raw template goes once warped, the raw science once both its tasks are done
    return g.task("inputs", (), inputs_stage, *done, g.key("template"), config, _alone_threads(in_process),
                  (psfs or {}).get("template"))


def _al_tasks(g: _Builder, config, grid: VisitGrid, inputs, *, sources=None, in_process: bool = False) -> tuple:
    """The AL stages: prepare → kernel-sources → fit-cell × n (and input-noise × 2) → spatial-solve → (inject) →
    subtract per tile → (decorrelation-kernel →) decorrelate per tile → difference.  Returns ``(prepare key,
    prepared-pair key, difference key)``.

    ``in_process``: the ``difference`` task frees the tiles as it assembles them (it is their only user; a
    4096² image's tiles and planes are 0.4 GB each).  Not on a cluster: there a retried ``difference`` task
    needs its tiles again."""
    from .stages import al

    nty, ntx = grid.tiles
    tiles = [(ty, tx) for ty in range(nty) for tx in range(ntx)]
    prepared = g.task("prepare", (), prepare_stage, inputs, config)
    detection = None
    if g.key("exposure", 0) in g.dsk:
        # in process, the science's source detection runs as soon as its input stages are done, beside the
        # template's (which wait for the warp)
        detection = g.task("kernel-detect", (), _kernel_detect_task, g.key("exposure", 0), config, sources)
    g.task("kernel-sources", (), _kernel_sources_task, prepared, config, sources, detection)
    for i in range(grid.cells):
        g.task("fit-cell", (i,), _fit_cells_task, g.key("kernel-sources"), i, grid.cells)
    # the inputs' noise needs no kernel: measured beside the source selection and the cell fits (in process, once
    # the science's source detection is done: beside it, the three tasks on two cores slowed the kernel fit's way)
    after = [detection] if detection is not None else []
    noise = [g.task("input-noise", (i,), al.input_noise_stage, prepared, i, after=after) for i in range(2)]
    solved = g.task("spatial-solve", (), al.kernel_solve_stage, prepared, g.key("kernel-sources"),
                    [g.key("fit-cell", i) for i in range(grid.cells)], config)
    # the decorrelation kernel needs the inputs' noise, the tiles' convolutions only the solve: they start at once
    # (a 1024² frame's one tile beside the second input-noise task, which had held the solve back)
    kernel = g.task("decorrelation-kernel", (), al.decorrelation_kernel_stage, prepared, solved, config, noise)
    pair = prepared
    if config.fakes.enabled:  # after the kernel fit (on the images without fakes), before the convolution
        from .stages.prepare import inject_stage

        pair = g.task("inject", (), inject_stage, prepared, config, solved)
    # in process, a single tile task (an image of one tile) has the machine to itself: its image's and variance's
    # convolutions run at once
    workers = _alone_threads(in_process and len(tiles) == 1)
    tiled_decorrelation = config.decorrelation.enabled and not config.decorrelation.spatially_varying
    # in process the tile tasks write their cores into the difference's whole planes, which the difference task
    # then takes as they are (on a cluster each tile travels to it as its own arrays, to be copied there)
    planes = g.task("tile-planes", (), _tile_planes_task, pair) if in_process and tiled_decorrelation else None
    for ty, tx in tiles:
        # each tile task reads its window (core + the kernel's half-width), cut where the pair is
        window = g.task("window", (ty, tx), _window_task, pair, solved, config, ty, tx, nty, ntx, tiled_decorrelation)
        g.task("subtract", (ty, tx), _subtract_task, window, solved, config, workers, planes)
    last = "subtract"
    if tiled_decorrelation:
        for ty, tx in tiles:
            # the tasks owning the tiles next to this one: the adjacent tasks, or, when the task grid
            # was not derived from the image shape (coarser than the tiles), the adjacent ones modulo it
            near = sorted({((ty + dy) % nty, (tx + dx) % ntx) if grid.shape is None else (ty + dy, tx + dx)
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                           if grid.shape is None or (0 <= ty + dy < nty and 0 <= tx + dx < ntx)})
            g.task("decorrelate", (ty, tx), _decorrelate_task, g.key("window", ty, tx), kernel,
                   [g.key("subtract", *n) for n in near], planes)
        last = "decorrelate"
    # in process the difference task runs alone (it waits for every tile): the tiles are copied on every core
    return pair, g.task("difference", (), _difference_task, pair, kernel, config, [g.key(last, *t) for t in tiles],
                        in_process, _alone_threads(in_process))


def _method_tasks(g: _Builder, config, grid: VisitGrid, inputs, *, runner=None, sources=None,
                  in_process: bool = False, consume: bool = False) -> tuple:
    """The tasks of ``config.method`` from the ``inputs`` pair to its result (no DiaSources yet).

    ``al``: :func:`_al_tasks`; ``al-preconvolve``: those and a ``score`` task (the pre-convolution score of
    the same pair); ``zogy``: one ``subtract`` task (its cells on ``runner``).  With fakes, ``inject`` adds
    them (``al``: after the spatial solve; the score methods: before their subtraction).  ``consume``: the
    ``zogy`` task may take the exposures out of the pair (:func:`zogy_stage`).
    Returns ``(key of the pair with fakes, key of the result)``."""
    from .stages.prepare import inject_stage

    if config.method == "zogy":
        pair = g.task("inject", (), inject_stage, inputs, config) if config.fakes.enabled else inputs
        return pair, g.task("subtract", (), zogy_stage, pair, config, runner, consume)
    pair, difference = _al_tasks(g, config, grid, inputs, sources=sources, in_process=in_process)
    if config.method == "al-preconvolve":
        # the score of the pair the AL difference saw (with its fakes), on the input stages' planes; without fakes
        # its science is the one the kernel-detect task detected on, and it is not detected again
        scored = pair if config.fakes.enabled else inputs
        detection = g.key("kernel-detect") if not config.fakes.enabled and g.key("kernel-detect") in g.dsk else None
        # (beside the AL stages: it needs the pair, not the AL kernel, and its serial parts fill the idle core)
        g.task("preconvolve", (), preconvolve_stage, scored, config, runner, sources, detection)
        return pair, g.task("score", (), score_stage, difference, g.key("preconvolve"))
    return pair, difference


def _detect_tasks(g: _Builder, config, grid: VisitGrid, result, *, fft_workers: int) -> tuple:
    """detect-prepare (whole image) → detect per tile → catalog.  Returns the ``catalog`` key."""
    from .stages.catalog import catalog_stage

    nty, ntx = grid.detect or grid.tiles
    tiles = [(ty, tx) for ty in range(nty) for tx in range(ntx)]
    g.task("detect-prepare", (), _detect_prepare_task, result, config, fft_workers)
    for ty, tx in tiles:
        g.task("detect", (ty, tx), _detect_task, g.key("detect-prepare"), ty, tx, nty, ntx, fft_workers)
    return g.task("catalog", (), catalog_stage, g.key("detect-prepare"), [g.key("detect", *t) for t in tiles])


def visit_graph(source, config, out_dir=None, *, visit: int | None = None, detector: int | None = None,
                run_id: str = "", grid: VisitGrid | None = None, output: str = "visit", plots: bool = False,
                detect: bool = True, in_process: bool = False, runner=None, warp: bool | None = None,
                psfs: dict | None = None, sources=None, prepared=None, template_store=None,
                staging=None) -> dict:
    """The task graph of one (visit, detector): a dict ``{key: task}`` in Dask's graph format.

    The one description of a subtraction's stages: a batch is the union of its visits' graphs
    (:func:`batch_graph`), and ``diffim-dag subtract`` and the Python API
    (:mod:`diffim_dag.pipeline`) run the graph of one.  Keys are ``(stage, visit, detector)`` or
    ``(stage, visit, detector, index...)``, the stage name carrying the run's token (:func:`task_key`:
    ``"fit-cell-<32 hex>"``; :func:`stage_of` gives the stage back):

    ============================================  ===============================================================
    ``("read", V, D, i)``                         read the science (0) / the template (1)
    ``("template", V, D)``                        bring the template onto the science grid (warp, or registration)
    ``("exposure", V, D, i)``                     PSF (supplied, or estimated from its stars), sky, cosmic rays and
                                                  (on a cluster) variance factor of the science (0) / the warped
                                                  template (1)
    ``("inputs", V, D)``                          the warp's alignment check (on the exposure tasks' PSF stars;
                                                  a refinement warps again), the prepared pair and its reports
                                                  (in process, with both variance factors measured here)
    ``("prepare", V, D)``                         ``al``: coverage, variance scaled (by the measured factors), mode
    ``("kernel-detect", V, D)``                   in process: the science's background and sources, once its
                                                  ``exposure`` task is done
    ``("kernel-sources", V, D)``                  kernel sources and their stamps by cell
    ``("fit-cell", V, D, i)``                     first fit of cell ``i`` (``i`` < ``grid.cells``)
    ``("input-noise", V, D, i)``                  the science's (0) / template's (1) clipped mean variance and
                                                  noise correlation
    ``("spatial-solve", V, D)``                   clipping, refits, spatial solve
    ``("decorrelation-kernel", V, D)``            the decorrelation kernel, from the solve and the inputs' noise
    ``("inject", V, D)``                          with ``fakes``: fake sources added (``al``: after the spatial
                                                  solve; the score methods: before their subtraction)
    ``("tile-planes", V, D)``                     in process: the difference's whole planes, which the tile tasks
                                                  write their cores into
    ``("window", V, D, ty, tx)``                  the pair's planes on tile ``(ty, tx)`` and its halo
    ``("subtract", V, D, ty, tx)``                convolve and subtract tile ``(ty, tx)`` (reads its window)
    ``("decorrelate", V, D, ty, tx)``             decorrelate the tile (reads the neighbouring tiles' edges)
    ``("difference", V, D)``                      assemble the planes (in process: take them), scale the variance
                                                  to the noise
    ``("quality", V, D)``                         the AL methods: residuals on the kernel stars, background left
    ``("preconvolve", V, D)``                     ``al-preconvolve``: the pre-convolution score of the pair (its own
                                                  kernel fit), beside the AL stages
    ``("score", V, D)``                           ``al-preconvolve``: the AL difference with that score
    ``("subtract", V, D)``                        ``zogy``: D, P_D, S, S_corr
    ``("detect-prepare", V, D)``                  whole-image matched filter / significance
    ``("detect", V, D, ty, tx)``                  detect and measure the tile
    ``("catalog", V, D)``                         stitch the tiles (footprints cut by tile edges), sky sources
    ``("fakes", V, D)``, ``("match", V, D)``      with ``fakes``: the fakes' table; matched to the DiaSources
    ``("result", V, D)``                          the result with its DiaSources, fakes and verdict
    ``("write-planes", V, D)``                    ``output="set"``: the planes and kernel written into the set's
                                                  temporary folder (beside detection)
    ``("write", V, D)``                           write, checksum and install the outputs
    ``("summary", V, D)``                         ``output="set"``: the result's summary lines
    ============================================  ===============================================================

    On a cluster (``in_process=False``) the input stages — ``read`` … ``inputs`` — run as the one ``inputs`` task
    (:class:`~diffim_dag.graph.Fused`: the same tasks in turn), so that the raw and prepared exposures do not
    travel between workers.  ``decorrelate`` tasks exist when a spatially constant decorrelation is
    configured.  The keys depend
    on (visit, detector), the grid and ``run_id`` only: the same for every build of one run, disjoint
    between runs.

    Parameters
    ----------
    source : VisitSpec or (Exposure, Exposure)
        Paths of the visit's inputs (read by the ``read`` tasks where they run), or the science and
        template exposures in hand.
    config : PipelineConfig
    out_dir : path, optional
        Where the ``write`` task writes: the batch's output folder (``output="visit"``: the visit's folder
        in it, its manifest and its part of the DiaSource dataset; the task's result is the visit's record),
        or the folder of one output set (``output="set"``); no ``write`` task when None.
    visit, detector : int
        The keys' (visit, detector) (default: the spec's, else 0, 0).
    run_id : str
        Identifies this run in the outputs manifests (exactly-once install) and in every task key.
    grid : VisitGrid, optional
        Tile and cell task counts; by default from the science image's shape (the exposure in hand, or
        its header: :func:`input_shape`), one task for all tiles/cells when it cannot be read.
    detect : bool
        Detect and measure DiaSources (else the ``result`` has none).
    in_process : bool
        The graph runs on this process's threads (:func:`visit_grid`'s in-process grid, the warp and
        detection FFTs on every core).
    runner : optional
        Where the score methods' cells and tiles run (:mod:`diffim_dag.stages.runner`; in turn when None).
    warp : bool or "none", optional
        ``False`` declares one pixel grid (cut/padded, no warp); None warps when the grids differ; ``"none"``
        (exposures in hand only) takes the template as it is, with no ``template`` task.
    psfs : dict, optional
        ``{"science"|"template": PsfResult}`` measured already.
    sources : DataFrame, optional
        The kernel-source catalogue (columns x, y in parent pixels); detected on the science when None.
    prepared : PreparedExposures, optional
        Exposures that went through the input stages already (sky removed, PSFs attached): the graph
        starts at ``inputs``, ``source`` is ignored.
    template_store : optional
        With exposures in hand: the store (folder of patches) the template comes from (``source[1]`` None).
    staging : path, optional
        ``output="set"``: the temporary folder (:func:`~diffim_dag.io.outputs.temporary_name`) the set is
        written into before it is installed; the caller removes it if the run stops before its ``write`` task
        (default: a new name).
    """
    spec = source if isinstance(source, VisitSpec) else None
    v = int(visit if visit is not None else (spec.visit if spec else 0))
    d = int(detector if detector is not None else (spec.detector if spec else 0))
    if grid is None:
        if spec is not None:
            shape = input_shape(spec)
        else:
            shape = (prepared.science if prepared is not None else source[0]).shape
        grid = visit_grid(shape, config, in_process=in_process)
    g = _Builder(v, d, run_id, keep_freed=KERNEL_PHASE if in_process else (),
                 keep_below=_keep_below(grid.shape) if in_process else None,
                 tile_headroom=TILE_KEEP_PLANES * 4 * config.subtract.tile_size ** 2)
    out = os.fspath(out_dir) if out_dir is not None else None
    workers = (os.cpu_count() or 1) if in_process else config.cluster.threads_per_worker
    if prepared is not None:
        inputs = g.value("inputs", (), prepared)
    elif in_process:
        inputs = _input_tasks(g, config, source, out_dir=out if output == "visit" else None, run_id=run_id,
                              warp=warp, workers=workers, psfs=psfs, template_store=template_store, in_process=True)
    else:
        # on a cluster the input stages run as one task: the raw and prepared exposures stay on one worker (a
        # batch of 6 visits of 2048² on 2 workers: 1.5–1.7× one worker's throughput with them as separate
        # tasks, whose exposures travelled between the workers); the visits keep the workers busy
        sub = _Builder(v, d, run_id)
        inputs = _input_tasks(sub, config, source, out_dir=out if output == "visit" else None, run_id=run_id,
                              warp=warp, workers=workers, psfs=psfs, template_store=template_store)
        g.dsk[inputs] = (run_fused, Fused(sub.dsk, inputs))
    # in process, the graph's own input stages (not exposures handed in, which are the caller's) feed one task
    if runner is None and not in_process and config.method != "al":
        # on a worker the score methods' tiles and cells run on its threads, cut as the command line's run cuts
        # them: the same bits (the whole-image filters of a runner-less stage differ in FFT rounding)
        runner = TileRunner(None, tile_size=config.subtract.tile_size, threads=config.cluster.threads_per_worker)
    pair, result = _method_tasks(g, config, grid, inputs, runner=runner, sources=sources, in_process=in_process,
                                 consume=in_process and prepared is None)
    catalog = injection = None
    if detect:
        fft_workers = _alone_threads(in_process and (grid.detect or grid.tiles) == (1, 1))
        catalog = _detect_tasks(g, config, grid, result, fft_workers=fft_workers)
        if config.fakes.enabled:
            from .stages.prepare import match_stage

            g.task("fakes", (), _fakes_of, pair)  # the table alone travels to the match task
            injection = g.task("match", (), match_stage, result, catalog, g.key("fakes"), config)
    # the AL methods' residual metrics: beside detection (the verdict needs them, detection does not); in process
    # after the matched filter, which has every core, beside the per-source fits that leave one idle (4096²: faster
    # in 7 of 10 interleaved pairs, median 0.11 s; the same outputs)
    quality = None if config.method == "zogy" else g.task(
        "quality", (), _quality_task, g.key("difference"), config,
        after=[g.key("detect-prepare")] if detect and in_process else ())
    final = g.task("result", (), result_stage, result, catalog, injection, config, quality)
    if out is not None and output == "visit":
        g.dsk[write_key(v, d, run_id)] = (write_stage, spec, config, out, run_id, final)
    elif out is not None:
        # the planes are final with the method's result: written (and checksummed) into the set's temporary
        # folder beside detection, whose per-source fits leave a core idle (in process: after the matched
        # filter, which has every core); the write task adds the rest
        folder = os.fspath(staging or temporary_name(Path(out)))
        after = [g.key("detect-prepare")] if detect and in_process else []
        staged = g.task("write-planes", (), write_planes_stage, result, folder, after)
        g.dsk[g.key("write")] = (write_set_task, v, d, final, staged, out, config, plots)
        g.task("summary", (), summary_stage, final, g.key("write"))
    return g.dsk


def batch_graph(specs, config, out_dir, *, run_id: str = "", grids: dict | None = None) -> dict:
    """The union of :func:`visit_graph` over ``specs``: one graph for the whole batch.

    ``grids`` may give the :class:`VisitGrid` of some (visit, detector) pairs; the others come from
    their science headers.  Visits whose shape cannot be read here (e.g. a path only the workers
    see) get one task for all their tiles and one for all their cells.
    """
    dsk: dict = {}
    unknown = 0
    for s in specs:
        grid = (grids or {}).get((s.visit, s.detector))
        if grid is None:
            grid = visit_grid(input_shape(s), config)
        unknown += grid.shape is None
        dsk.update(visit_graph(s, config, out_dir, run_id=run_id, grid=grid))
    if unknown:
        log.info("%d of %d visit(s): image shape not readable on the client; their tiles and cells run as one task "
                 "each", unknown, len(specs))
    return dsk


def compute_visit(spec, config, out_dir, *, run_id: str = "") -> dict:
    """Run one visit's graph here, in turn (Dask's synchronous scheduler), and return its record."""
    dsk = visit_graph(spec, config, out_dir, run_id=run_id)
    return run_in_turn(dsk, write_key(spec.visit, spec.detector, run_id))
