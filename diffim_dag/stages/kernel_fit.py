r"""The Alard–Lupton PSF-matching kernel stage: sources → cells → candidate fits → spatial solve.

Fits :math:`T \approx R \otimes K(x, y) + b(x, y)` (Alard & Lupton 1998; Alard 2000),
where in ``convolveTemplate`` mode the reference ``R`` is the template and the target
``T`` the science image, and the other way round in ``convolveScience`` mode.

1. Basis from the two PSFs' FWHMs at the centre of the overlap
   (:func:`~diffim_dag.kernels.basis.basis_from_config`).
2. Kernel sources (:func:`~diffim_dag.stages.kernel_sources.select_kernel_sources`) with
   stamps of side ``2 × kernel_size + 1``.
3. Cells of ``cell_size`` px over the overlap; in each, candidates are fitted brightest
   first until ``candidates_per_cell`` pass the residual cuts
   (:func:`~diffim_dag.kernels.candidates.fit_cell`, a pure function: one Dask task per cell).
4. Kernel-sum clipping over all used candidates; each rejected candidate is replaced by
   the next one of its cell (its cell is refitted), until no new rejection.
5. Spatial solve and re-assessment of every candidate against the spatial model; the
   rejected are replaced and the whole repeated, at most ``max_spatial_iterations`` times.

:func:`fit_psf_matching_kernel` is the eager one-call entry point.  A task graph calls its steps:
:func:`select_kernel_cells` (steps 1–3, one task), :func:`fit_kernel_cells` (the first fit of a cell,
one task per cell), :func:`solve_kernel` with those fits as ``initial`` (steps 4–5, refits in the
same task) and :func:`kernel_fit_result`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import KernelConfig, KernelSourceConfig
from ..errors import NoKernelCandidatesError
from ..exposure import Exposure
from ..kernels.basis import KernelBasis, basis_from_config
from ..kernels.candidates import (
    USED,
    CandidateFit,
    CellFit,
    CellStamps,
    NormalEquations,
    assign_cells,
    clip_kernel_sums,
    fit_cell,
    fit_cells,
)
from ..kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE, KernelSolution
from ..kernels.spatial import SpatialFit, assess_spatial, solve_spatial
from .kernel_sources import overlap_bbox, select_kernel_sources

__all__ = [
    "KernelFitResult",
    "KernelCells",
    "resolve_mode",
    "select_kernel_cells",
    "fit_kernel_cells",
    "kernel_fit_result",
    "extract_cell_stamps",
    "solve_kernel",
    "fit_psf_matching_kernel",
    "plot_kernel_grid",
    "plot_candidates",
]

log = logging.getLogger(__name__)

#: Arguments of one cell task: ``fit_cell(cell, basis, config, exclude)``.
CellTask = tuple[CellStamps, KernelBasis, KernelConfig, frozenset]
#: ``map_cells(tasks) -> [fit_cell(*task) for task in tasks]``, e.g. through Dask.
CellMapper = Callable[[Sequence[CellTask]], Sequence[CellFit]]


def _map_eager(tasks: Sequence[CellTask]) -> list[CellFit]:
    """The tasks' :func:`~diffim_dag.kernels.candidates.fit_cell` here: those that share a basis and a config (all,
    as :func:`fit_kernel_cells` and :func:`solve_kernel` make them) fitted together
    (:func:`~diffim_dag.kernels.candidates.fit_cells`: the same values)."""
    tasks = list(tasks)
    if tasks and all(t[1] is tasks[0][1] and t[2] is tasks[0][2] for t in tasks):
        return fit_cells([t[0] for t in tasks], tasks[0][1], tasks[0][2], [t[3] for t in tasks])
    return [fit_cell(*task) for task in tasks]


def cells_on(runner) -> CellMapper:
    """A :data:`CellMapper` for a stage handed a ``runner`` (:mod:`diffim_dag.stages.runner`): the tasks in
    ``runner.threads`` chunks on it, each chunk's cells fitted together (:func:`_map_eager`: the same values as
    in turn); in turn when the runner has one thread."""
    threads = int(getattr(runner, "threads", 1) or 1)
    if threads <= 1:
        return _map_eager

    def mapper(tasks: Sequence[CellTask]) -> list[CellFit]:
        tasks = list(tasks)
        n = min(threads, len(tasks))
        if n <= 1:
            return _map_eager(tasks)
        bounds = [len(tasks) * i // n for i in range(n + 1)]
        # (a runner's tasks are dicts; the cells go in a box of their own, which a scheduler does not search for
        # collections: through the stamps of 800 stars that took 0.64 s a refit)
        chunks = [{"cells": _Cells(tasks[a:b])} for a, b in zip(bounds[:-1], bounds[1:])]
        return [fit for part in runner.map(_fit_chunk, chunks, prefix="fit-cells") for fit in part]

    return mapper


class _Cells:
    """A chunk of :func:`cells_on`'s cell tasks, opaque to the scheduler."""

    __slots__ = ("tasks",)

    def __init__(self, tasks: list):
        self.tasks = tasks


def _fit_chunk(task: dict) -> list[CellFit]:
    """One chunk of :func:`cells_on`'s tasks (``{"cells": _Cells}``), fitted together."""
    return _map_eager(task["cells"].tasks)


@dataclass(frozen=True, eq=False)
class KernelFitResult:
    """Result of :func:`fit_psf_matching_kernel`.

    Attributes
    ----------
    solution : KernelSolution
    candidates : DataFrame
        ``id, x, y, cell, flux, snr, kernel_sum, status, reason``; ``status`` is ``"used"``,
        ``"rejected"`` or ``"unused"`` (never fitted: its cell already had enough candidates).
        Sources the selection removed are there too (``status`` ``"rejected"``, ``cell`` -1,
        ``reason`` ``"selection: <cut>"``), so every rejected star says why
        (``kernel_candidates.parquet``).
    diagnostics : dict
        JSON-able counts, kernel size, widths, kernel sum at the centre, condition number.
    """

    solution: KernelSolution
    candidates: pd.DataFrame
    diagnostics: dict


def resolve_mode(science: Exposure, template: Exposure, mode: str = CONVOLVE_TEMPLATE) -> str:
    """Resolve ``"auto"`` with the subtraction's rule (:func:`diffim_dag.stages.subtract.choose_mode`):
    convolve the science only when the template PSF is wider on both axes."""
    from .subtract import choose_mode

    if mode not in ("auto", CONVOLVE_TEMPLATE, CONVOLVE_SCIENCE):
        raise ValueError(f"mode must be 'auto', {CONVOLVE_TEMPLATE!r} or {CONVOLVE_SCIENCE!r}, got {mode!r}")
    cx, cy = science.center
    return choose_mode(mode, science.psf, template.psf, cx, cy)


def extract_cell_stamps(
    reference: Exposure,
    target: Exposure,
    sources: pd.DataFrame,
    kernel_size: int,
    bbox: tuple[int, int, int, int],
    cell_size: int,
) -> list[CellStamps]:
    """Cut the candidate stamps (side ``2 × kernel_size + 1``) and group them by cell.

    ``sources`` needs ``id, x, y`` and ``flux`` (candidates are ordered brightest first
    within a cell).  Every stamp must lie inside both exposures (as
    :func:`select_kernel_sources` guarantees).
    """
    half = int(kernel_size)
    r_img, r_var, _ = reference.arrays()
    t_img, t_var, _ = target.arrays()
    rx0, ry0 = reference.xy0
    tx0, ty0 = target.xy0
    ix = np.round(sources["x"].to_numpy()).astype(int)
    iy = np.round(sources["y"].to_numpy()).astype(int)
    cells, _, _ = assign_cells(ix, iy, bbox, cell_size)
    order = np.lexsort((-sources["flux"].to_numpy(), cells))
    ids = sources["id"].to_numpy()
    out: list[CellStamps] = []
    for cell in np.unique(cells):
        sel = order[cells[order] == cell]
        refs, tgts, vars_ = [], [], []
        for k in sel:
            rs = (slice(iy[k] - ry0 - half, iy[k] - ry0 + half + 1), slice(ix[k] - rx0 - half, ix[k] - rx0 + half + 1))
            ts = (slice(iy[k] - ty0 - half, iy[k] - ty0 + half + 1), slice(ix[k] - tx0 - half, ix[k] - tx0 + half + 1))
            refs.append(r_img[rs])
            tgts.append(t_img[ts])
            vars_.append(r_var[rs].astype(np.float64) + t_var[ts])
        out.append(
            CellStamps(
                cell=int(cell),
                ids=ids[sel].astype(np.int64),
                x=ix[sel].astype(np.float64),
                y=iy[sel].astype(np.float64),
                reference=np.asarray(refs, dtype=np.float64),
                target=np.asarray(tgts, dtype=np.float64),
                variance=np.asarray(vars_, dtype=np.float64),
            )
        )
    return out


@dataclass(frozen=True, eq=False)
class KernelSolve:
    """What :func:`solve_kernel` returns: the spatial fit, every candidate's fate and counts."""

    spatial: SpatialFit
    fits: dict[int, CandidateFit]  # latest single-candidate fit of every fitted candidate
    rejected: dict[int, str]  # id → reason (single fit, kernel sum or spatial)
    used_ids: list[int]
    iterations: int
    kernel_sum_mean: float
    kernel_sum_std: float


def solve_kernel(
    cells: Sequence[CellStamps],
    basis: KernelBasis,
    config: KernelConfig,
    bbox: tuple[float, float, float, float],
    *,
    mode: str = CONVOLVE_TEMPLATE,
    map_cells: CellMapper | None = None,
    initial: Mapping[int, CellFit] | None = None,
) -> KernelSolve:
    """Per-cell fits, kernel-sum clipping, spatial solve and re-assessment (see module doc).

    Parameters
    ----------
    cells : sequence of CellStamps
    basis : KernelBasis
    config : KernelConfig
    bbox : (x_min, x_max, y_min, y_max)
        Chebyshev box of the solution (max = last pixel index).
    map_cells : callable, optional
        Runs a list of ``(cell, basis, config, exclude)`` tasks through
        :func:`~diffim_dag.kernels.candidates.fit_cell` (eagerly by default; graph.py passes
        a Dask-backed mapper).
    initial : mapping of int to CellFit, optional
        The first fit of every cell (``fit_cell(cell, basis, config, frozenset())``, e.g. from
        :func:`fit_kernel_cells` run as one graph task per cell); fitted here through
        ``map_cells`` when None.  Refits after clipping always go through ``map_cells``.

    Raises
    ------
    NoKernelCandidatesError
        No candidate survives; ``rejected`` counts the reasons.
    """
    mapper = map_cells or _map_eager
    by_cell = {c.cell: c for c in cells}
    cell_fits: dict[int, CellFit] = {}
    fits: dict[int, CandidateFit] = {}
    rejected: dict[int, str] = {}
    late_rejected: dict[int, str] = {}  # kernel sum and spatial: excluded from later cell fits

    def record(c, cf):
        cell_fits[c] = cf
        for f in cf.fits:
            fits[f.id] = f
            if f.status != USED:
                rejected[f.id] = f.reason

    def refit(cell_ids):
        cell_ids = sorted(cell_ids)
        tasks = [(by_cell[c], basis, config, frozenset(i for i in by_cell[c].ids.tolist() if i in late_rejected))
                 for c in cell_ids]
        for c, cf in zip(cell_ids, mapper(tasks)):
            record(c, cf)

    def used_fits() -> list[CandidateFit]:
        return [f for c in sorted(cell_fits) for f in cell_fits[c].used if f.id not in late_rejected]

    def counts() -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rejected.values():
            out[r] = out.get(r, 0) + 1
        return out

    def spatial_of(used):
        eq = NormalEquations.stack(f.equations for f in used)
        x = np.array([f.x for f in used])
        y = np.array([f.y for f in used])
        sp = solve_spatial(
            eq, x, y, basis,
            spatial_order=config.spatial_kernel_order,
            background_order=config.spatial_background_order,
            bbox=bbox,
            fit_background=config.fit_background,
            mode=mode,
        )
        return sp, eq, x, y

    if initial is None:
        refit(by_cell)
    else:
        missing = sorted(set(by_cell) - set(initial))
        if missing:
            raise ValueError(f"solve_kernel: initial fits lack cell(s) {missing}")
        for c in sorted(by_cell):
            record(c, initial[c])
    k_mean = k_std = float("nan")
    spatial = None
    used: list[CandidateFit] = []
    iterations = 0
    for it in range(config.max_spatial_iterations):
        iterations = it + 1
        for _ in range(config.max_spatial_iterations):
            used = used_fits()
            if len(used) < 1:
                break
            keep, k_mean, k_std = clip_kernel_sums([f.kernel_sum for f in used], nsigma=config.kernel_sum_clip_nsigma)
            newly = [f for f, k in zip(used, keep) if not k]
            if not newly:
                break
            for f in newly:
                late_rejected[f.id] = rejected[f.id] = "kernel_sum"
            refit({f.cell for f in newly})
        used = used_fits()
        if not used:
            raise NoKernelCandidatesError(
                f"no kernel candidate survived the candidate fits (rejected: {counts()})", rejected=counts()
            )
        spatial, eq, x, y = spatial_of(used)
        _, _, reasons = assess_spatial(
            spatial, eq, x, y,
            fit_background=config.fit_background,
            max_residual_mean=config.max_residual_mean,
            max_residual_std=config.max_residual_std,
        )
        bad = [(f, r) for f, r in zip(used, reasons) if r]
        if not bad:
            break
        for f, r in bad:
            late_rejected[f.id] = rejected[f.id] = str(r)
        if it + 1 < config.max_spatial_iterations:
            refit({f.cell for f, _ in bad})
        else:
            used = [f for f in used if f.id not in late_rejected]
            if not used:
                raise NoKernelCandidatesError(
                    f"no kernel candidate survived the spatial re-assessment (rejected: {counts()})", rejected=counts()
                )
            spatial, _, _, _ = spatial_of(used)
    return KernelSolve(
        spatial=spatial,
        fits=fits,
        rejected=rejected,
        used_ids=[f.id for f in used],
        iterations=iterations,
        kernel_sum_mean=k_mean,
        kernel_sum_std=k_std,
    )


SINGLE_REASONS = ("singular", "residual_mean", "residual_std")
SPATIAL_REASONS = ("spatial_residual_mean", "spatial_residual_std")


def adapt_spatial_orders(config: KernelConfig, n_sources: int) -> tuple[KernelConfig, bool]:
    """Lower the kernel and background spatial orders until each spatial term has enough sources.

    A term of the kernel's spatial polynomial is constrained only by the candidates spread over
    the image; with fewer than ``min_sources_per_spatial_term × n_terms(order)`` sources the
    order is reduced (down to 0, a constant kernel/background).  Returns the config actually
    used and whether anything was lowered.
    """
    import dataclasses

    from ..kernels.chebyshev import n_terms

    per = config.min_sources_per_spatial_term
    if per <= 0:
        return config, False
    k, b = config.spatial_kernel_order, config.spatial_background_order
    while k > 0 and n_sources < per * n_terms(k):
        k -= 1
    while b > 0 and n_sources < per * n_terms(b):
        b -= 1
    if (k, b) == (config.spatial_kernel_order, config.spatial_background_order):
        return config, False
    log.info("only %d kernel sources: spatial orders lowered to kernel %d, background %d", n_sources, k, b)
    return dataclasses.replace(config, spatial_kernel_order=k, spatial_background_order=b), True


@dataclass(frozen=True, eq=False)
class KernelCells:
    """The kernel-source stage's output: everything the per-cell fits and the spatial solve need.

    Attributes
    ----------
    mode : str
        ``convolveTemplate`` or ``convolveScience`` (resolved).
    basis : KernelBasis
    config : KernelConfig
        The kernel configuration actually used (spatial orders lowered by
        :func:`adapt_spatial_orders` when the sources are few).
    orders_reduced : bool
    sources : DataFrame
        The selected kernel sources (``id, x, y, flux, snr``).
    source_stats : dict
        Found / used / rejected counts of the source selection.
    cells : list of CellStamps
        The candidate stamps grouped by cell (only cells holding candidates).
    bbox : (x_min, x_max, y_min, y_max)
        The overlap of the two exposures (parent pixels, max exclusive): the cell grid.
    solution_bbox : (x_min, x_max, y_min, y_max)
        The Chebyshev box of the solution (max = last pixel index).
    fwhm_science, fwhm_template : float
        PSF FWHMs at the centre of the overlap.
    seconds : float
        Wall time of the source selection and stamp extraction.
    """

    mode: str
    basis: KernelBasis
    config: KernelConfig
    orders_reduced: bool
    sources: pd.DataFrame
    source_stats: dict
    cells: list[CellStamps]
    bbox: tuple[int, int, int, int]
    solution_bbox: tuple[float, float, float, float]
    fwhm_science: float
    fwhm_template: float
    seconds: float = 0.0

    @property
    def cell_grid(self) -> tuple[int, int]:
        """``(n_cells_x, n_cells_y)`` of the row-major cell numbering over :attr:`bbox`."""
        _, ncx, ncy = assign_cells(np.zeros(0), np.zeros(0), self.bbox, self.config.cell_size)
        return ncx, ncy

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees: the stamps
        return 1024 + sum(c.reference.nbytes + c.target.nbytes + c.variance.nbytes for c in self.cells)


def select_kernel_cells(
    science: Exposure,
    template: Exposure,
    *,
    config: KernelConfig = KernelConfig(),
    source_config: KernelSourceConfig = KernelSourceConfig(),
    sources: pd.DataFrame | None = None,
    mode: str = CONVOLVE_TEMPLATE,
    detection=None,
) -> KernelCells:
    """Steps 1–3 of the module doc: basis, kernel sources and their stamps grouped by cell.

    Parameters
    ----------
    science, template : Exposure
        In-memory or lazy exposures with PSFs; the fit covers their overlap.
    config : KernelConfig
    source_config : KernelSourceConfig
    sources : DataFrame, optional
        Kernel-source catalog (``x``, ``y`` parent pixels, optional ``id``); detection
        on the science image when None.
    mode : {"convolveTemplate", "convolveScience", "auto"}
    detection : SourceDetection, optional
        The science's background and sources detected already
        (:func:`~diffim_dag.stages.kernel_sources.detect_kernel_sources`).

    Returns
    -------
    KernelCells

    Raises
    ------
    InsufficientKernelSourcesError
    """
    t0 = time.perf_counter()
    if science.psf is None or template.psf is None:
        raise ValueError("PSF matching needs the PSFs of both exposures")
    mode = resolve_mode(science, template, mode)
    if science.is_lazy:
        science = science.load()
    if template.is_lazy:
        template = template.load()
    box = overlap_bbox(science, template)
    cx, cy = 0.5 * (box[0] + box[1] - 1), 0.5 * (box[2] + box[3] - 1)
    fwhm_sci, fwhm_tmpl = science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy)
    reference, target = (template, science) if mode == CONVOLVE_TEMPLATE else (science, template)
    fwhm_ref, fwhm_tgt = (fwhm_tmpl, fwhm_sci) if mode == CONVOLVE_TEMPLATE else (fwhm_sci, fwhm_tmpl)
    basis = basis_from_config(config, fwhm_ref, fwhm_tgt)
    table, source_stats = select_kernel_sources(science, template, basis.size, source_config, sources, detection)
    config, reduced = adapt_spatial_orders(config, len(table))
    cells = extract_cell_stamps(reference, target, table, basis.size, box, config.cell_size)
    sol_bbox = (float(box[0]), float(box[1] - 1), float(box[2]), float(box[3] - 1))
    return KernelCells(mode=mode, basis=basis, config=config, orders_reduced=reduced, sources=table,
                       source_stats=source_stats, cells=cells, bbox=box, solution_bbox=sol_bbox,
                       fwhm_science=float(fwhm_sci), fwhm_template=float(fwhm_tmpl),
                       seconds=time.perf_counter() - t0)


def fit_kernel_cells(cells: KernelCells, cell_ids: Sequence[int] | None = None, *,
                     map_cells: CellMapper | None = None) -> dict[int, CellFit]:
    """The first fit of the cells ``cell_ids`` (all when None): ``{cell: CellFit}``.

    Each cell is :func:`~diffim_dag.kernels.candidates.fit_cell` with nothing excluded, the
    fit :func:`solve_kernel` starts from; a task graph runs one call per cell (``cell_ids``
    of one element) and hands the union to :func:`solve_kernel` as ``initial``.  Cells
    without candidates are absent from ``cells.cells`` and are skipped.
    """
    wanted = None if cell_ids is None else {int(c) for c in cell_ids}
    chosen = [c for c in cells.cells if wanted is None or c.cell in wanted]
    tasks = [(c, cells.basis, cells.config, frozenset()) for c in chosen]
    return {c.cell: cf for c, cf in zip(chosen, (map_cells or _map_eager)(tasks))}


def kernel_fit_result(cells: KernelCells, solve: KernelSolve, *, solve_seconds: float = 0.0) -> KernelFitResult:
    """The :class:`KernelFitResult` (candidate table and diagnostics) of a solved kernel."""
    table, config, basis = cells.sources, cells.config, cells.basis
    solution = solve.spatial.solution
    cell_of = {int(i): c.cell for c in cells.cells for i in c.ids.tolist()}
    status, reason, ksum = [], [], []
    used = set(solve.used_ids)
    for i in table["id"].to_numpy().tolist():
        f = solve.fits.get(int(i))
        ksum.append(f.kernel_sum if f is not None else np.nan)
        if int(i) in used:
            status.append("used")
            reason.append("")
        elif int(i) in solve.rejected:
            status.append("rejected")
            reason.append(solve.rejected[int(i)])
        else:
            status.append("unused")
            reason.append("")
    candidates = pd.DataFrame(
        {
            "id": table["id"].to_numpy(),
            "x": table["x"].to_numpy(),
            "y": table["y"].to_numpy(),
            "cell": [cell_of[int(i)] for i in table["id"].to_numpy()],
            "flux": table["flux"].to_numpy(),
            "snr": table["snr"].to_numpy(),
            "kernel_sum": ksum,
            "status": status,
            "reason": reason,
        }
    )
    dropped = cells.source_stats.get("rejected_sources")
    if dropped is not None and len(dropped):
        candidates = pd.concat([candidates, pd.DataFrame({
            "id": dropped["id"].to_numpy(), "x": dropped["x"].to_numpy(), "y": dropped["y"].to_numpy(),
            "cell": -1, "flux": dropped["flux"].to_numpy(), "snr": dropped["snr"].to_numpy(),
            "kernel_sum": np.nan, "status": "rejected",
            "reason": ["selection: " + r for r in dropped["reason"]]})], ignore_index=True)
    by_reason: dict[str, int] = {}
    for r in solve.rejected.values():
        by_reason[r] = by_reason.get(r, 0) + 1
    source_stats = cells.source_stats
    diagnostics = {
        "mode": cells.mode,
        "basis": basis.kind,
        "kernel_size": basis.size,
        "gaussian_sigmas": [float(s) for s in basis.sigmas],
        "n_basis": basis.n,
        "fwhm_science": float(cells.fwhm_science),
        "fwhm_template": float(cells.fwhm_template),
        "sources": {
            "found": int(source_stats["found"]),
            "used": int(source_stats["used"]),
            "origin": source_stats["origin"],
            "rejected": {k: int(v) for k, v in source_stats["rejected"].items()},
            "point_like": int(source_stats.get("point_like", source_stats["used"])),
            "extended_admitted": int(source_stats.get("extended_admitted", 0)),
        },
        "candidates": {
            "available": int(len(table)),
            "fitted": int(len(solve.fits)),
            "used": int(len(solve.used_ids)),
            "rejected": {k: int(v) for k, v in sorted(by_reason.items())},
            "rejected_by_stage": {
                "single_fit": int(sum(by_reason.get(r, 0) for r in SINGLE_REASONS)),
                "kernel_sum": int(by_reason.get("kernel_sum", 0)),
                "spatial": int(sum(by_reason.get(r, 0) for r in SPATIAL_REASONS)),
            },
        },
        "n_cells": int(len(cells.cells)),
        "kernel_sum_center": float(solution.kernel_sum_at_center()),
        "background_center": float(solution.background_at(*solution.center)),
        "kernel_sum_clip": {"mean": float(solve.kernel_sum_mean), "std": float(solve.kernel_sum_std)},
        "spatial_condition_number": float(solve.spatial.condition_number),
        "spatial_condition_number_raw": float(solve.spatial.condition_number_raw),
        "spatial_iterations": int(solve.iterations),
        "spatial_kernel_order": int(config.spatial_kernel_order),
        "spatial_background_order": int(config.spatial_background_order),
        "spatial_orders_reduced": cells.orders_reduced,
        "timings_s": {"sources": cells.seconds, "kernel_solve": solve_seconds},
    }
    return KernelFitResult(solution=solution, candidates=candidates, diagnostics=diagnostics)


def fit_psf_matching_kernel(
    science: Exposure,
    template: Exposure,
    *,
    config: KernelConfig = KernelConfig(),
    source_config: KernelSourceConfig = KernelSourceConfig(),
    sources: pd.DataFrame | None = None,
    mode: str = CONVOLVE_TEMPLATE,
    map_cells: CellMapper | None = None,
) -> KernelFitResult:
    """Fit the spatially varying Alard–Lupton PSF-matching kernel of a science/template pair.

    The three stage steps in one call: :func:`select_kernel_cells` → :func:`solve_kernel`
    (per-cell fits through ``map_cells``, clipping, spatial solve) → :func:`kernel_fit_result`.

    Parameters
    ----------
    science, template : Exposure
        In-memory or lazy exposures with PSFs; the fit covers their overlap.
    config : KernelConfig
    source_config : KernelSourceConfig
    sources : DataFrame, optional
        Kernel-source catalog (``x``, ``y`` parent pixels, optional ``id``); detection
        on the science image when None.
    mode : {"convolveTemplate", "convolveScience", "auto"}
    map_cells : callable, optional
        See :func:`solve_kernel`.

    Returns
    -------
    KernelFitResult

    Raises
    ------
    InsufficientKernelSourcesError, NoKernelCandidatesError
    """
    cells = select_kernel_cells(science, template, config=config, source_config=source_config, sources=sources,
                                mode=mode)
    t0 = time.perf_counter()
    solve = solve_kernel(cells.cells, cells.basis, cells.config, cells.solution_bbox, mode=cells.mode,
                         map_cells=map_cells)
    return kernel_fit_result(cells, solve, solve_seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------ plots


def plot_kernel_grid(solution: KernelSolution, bbox, path, *, n: int = 5) -> None:
    """PNG of the kernel realized on an ``n × n`` grid over ``bbox`` = (x_min, x_max, y_min, y_max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x0, x1, y0, y1 = [float(b) for b in bbox]
    xs = np.linspace(x0, x1, n)
    ys = np.linspace(y0, y1, n)
    kernels = np.array([[solution.kernel_at(x, y) for x in xs] for y in ys])
    vmin, vmax = float(kernels.min()), float(kernels.max())
    fig, axes = plt.subplots(n, n, figsize=(2 * n, 2 * n), squeeze=False)
    for j in range(n):
        for i in range(n):
            ax = axes[n - 1 - j, i]
            ax.imshow(kernels[j, i], origin="lower", vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_title(f"({xs[i]:.0f},{ys[j]:.0f}) Σ={kernels[j, i].sum():.4f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"PSF-matching kernel ({solution.mode}, {solution.size} px)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_candidates(science_image, candidates_table: pd.DataFrame, path) -> None:
    """PNG of the kernel candidates over the science image: used vs rejected, by reason.

    ``science_image`` is an :class:`Exposure` (parent coordinates) or a 2-D array (xy0 = 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(science_image, Exposure):
        img = science_image.arrays()[0]
        x0, y0 = science_image.xy0
    else:
        img = np.asarray(science_image)
        x0 = y0 = 0
    ny, nx = img.shape
    step = max(1, int(np.ceil(max(nx, ny) / 2048)))
    shown = img[::step, ::step]
    lo, hi = np.nanpercentile(shown, [1.0, 99.5])
    fig, ax = plt.subplots(figsize=(9, 9))
    ax.imshow(shown, origin="lower", cmap="gray", vmin=lo, vmax=hi,
              extent=(x0 - 0.5, x0 + nx - 0.5, y0 - 0.5, y0 + ny - 0.5))
    tab = candidates_table
    groups = [("used", tab["status"] == "used", "lime", "o")]
    if "unused" in set(tab["status"]):
        groups.append(("unused", tab["status"] == "unused", "cyan", "."))
    markers = "xs^vD*P"
    colors = ["red", "orange", "magenta", "yellow", "deepskyblue", "white", "brown"]
    for k, r in enumerate(sorted(set(tab.loc[tab["status"] == "rejected", "reason"]))):
        groups.append((f"rejected: {r}", (tab["status"] == "rejected") & (tab["reason"] == r),
                       colors[k % len(colors)], markers[k % len(markers)]))
    for label, sel, color, marker in groups:
        style = {"facecolors": "none", "edgecolors": color} if marker in "osD^v" else {"c": color}
        ax.scatter(tab.loc[sel, "x"], tab.loc[sel, "y"], s=30, marker=marker, label=f"{label} ({int(sel.sum())})",
                   linewidths=1, **style)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("x (parent pixels)")
    ax.set_ylabel("y (parent pixels)")
    ax.set_title("Kernel candidates")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
