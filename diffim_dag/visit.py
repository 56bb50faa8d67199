"""One (visit, detector) as a task graph: its stages, as functions of paths and earlier results, and the
graph that chains them with ``(stage, visit, detector[, index])`` keys (:func:`visit_graph`); a batch is
the union of its visits' graphs (:func:`batch_graph`), a single visit runs the same graph in turn
(:func:`process_visit`).

The stage functions here read the inputs (``template``), measure the PSFs (``psf``), prepare the pair
(``prepare``), subtract for the score methods (``subtract``) and write and install the outputs (``write``);
the AL stages, detection and fakes come from :mod:`diffim_dag.pipeline`.  The graph's execution helpers
(task keys, :func:`~diffim_dag.graph.run_stage`, the markers a failed stage hands on) live in
:mod:`diffim_dag.graph`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .config import PipelineConfig
from .errors import DiffimError
from .graph import run_in_turn, run_stage, task_key, write_key
from .io.outputs import OUTPUTS_MANIFEST, file_entry, install, sha256
from .manifest import VisitSpec, visit_dir, visit_key

log = logging.getLogger(__name__)

#: Folder (under the output folder) of the batch's DiaSource dataset.
DIA_SOURCE_DATASET = "dia_sources"

#: The exposures of a visit whose PSF tasks are ``("psf", V, D, i)``, in index order.
PSF_ROLES = ("science", "template")


@dataclass
class VisitRecord:
    """What happened to one (visit, detector)."""

    visit: int
    detector: int
    status: str  # done | skipped | failed
    reason: str = ""
    error: str | None = None  # exception class for failures
    outputs: dict = field(default_factory=dict)  # name -> path relative to the output folder
    wall_s: float = 0.0
    n_dia_sources: int | None = None
    worker: str | None = None
    injection: dict | None = None  # with fakes: the visit's completeness figures

    @property
    def key(self) -> str:
        return visit_key(self.visit, self.detector)

    def to_dict(self) -> dict:
        return {"key": self.key, **dataclasses.asdict(self)}


def _read_input(path: str, options: dict):
    from .io import read_exposure, read_zarr

    if Path(path).is_dir():
        return read_zarr(path).load()
    return read_exposure(path, **options)




def _dataset_part(out_root: Path, visit: int, detector: int) -> Path:
    return out_root / DIA_SOURCE_DATASET / f"visit={visit}" / f"detector={detector}.parquet"


def verify_outputs(out_dir: str | os.PathLike, visit: int, detector: int, *, checksums: bool = True) -> dict | None:
    """The outputs manifest of a completed (visit, detector), or None when anything is missing or differs.

    ``checksums=False`` compares sizes only (cheaper on huge outputs).
    """
    root = Path(out_dir)
    folder = visit_dir(root, visit, detector)
    mpath = folder / OUTPUTS_MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("visit") != visit or manifest.get("detector") != detector or not manifest.get("files"):
        return None
    for entry in manifest["files"].values():
        p = root / entry["path"]
        try:
            if p.stat().st_size != entry["size"]:
                return None
        except OSError:
            return None
        if checksums and sha256(p) != entry["sha256"]:
            return None
    return manifest


def _write_dataset_part(catalog, path: Path) -> Path:
    """The visit's DiaSources for the batch dataset (Hive partition ``visit=V``: no ``visit`` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .io.atomic import atomic_path

    table = pa.Table.from_pandas(catalog.drop(columns=["visit"], errors="ignore"), preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def input_shape(spec: VisitSpec) -> tuple[int, int] | None:
    """``(ny, nx)`` of the visit's science image from its header alone, or None when it cannot be read.

    FITS: the ``NAXIS1``/``NAXIS2`` cards of the image HDU (``IMAGE`` of an LSST-layout file, the
    ``hdu`` option, or the only image HDU); zarr: the image array's metadata.  No pixel is read;
    the batch graph uses the shape for its tile and cell task counts (:func:`diffim_dag.graph.visit_grid`).
    The template is brought onto the science grid, so the science shape is the visit's.
    """
    path = Path(spec.science)
    try:
        if path.is_dir():
            for name in ("image/.zarray", "image/zarr.json"):
                meta = path / name
                if meta.is_file():
                    shape = json.loads(meta.read_text()).get("shape")
                    return (int(shape[0]), int(shape[1])) if shape and len(shape) == 2 else None
            return None
        import warnings

        from astropy.io import fits

        hdu = dict(spec.science_options).get("hdu")
        with warnings.catch_warnings(), fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            warnings.simplefilter("ignore")  # a damaged file is the workers' to report
            if hdu is not None:
                header = hdul[int(hdu) if str(hdu).isdigit() else hdu].header
            else:
                names = [h.name.upper() for h in hdul]
                if "IMAGE" in names:
                    header = hdul["IMAGE"].header
                else:
                    images = [h.header for h in hdul if h.header.get("NAXIS", 0) >= 2]
                    if len(images) != 1:
                        return None
                    header = images[0]
            dims = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
        dims = [n for n in dims if n != 1]
        return (dims[1], dims[0]) if len(dims) == 2 and min(dims) > 0 else None
    except Exception:  # unreadable here (missing, corrupt, another filesystem): the workers will say why
        return None


def read_visit_inputs(spec: VisitSpec):
    """Read the science exposure and the template exposure (None for a template store) of one visit."""
    science = _read_input(spec.science, dict(spec.science_options))
    template = _read_input(spec.template, dict(spec.template_options)) if spec.template else None
    return science, template


def template_stage(spec: VisitSpec, config: PipelineConfig, out_dir: str, run_id: str = ""):
    """The first task of a visit: read its inputs, fetch/warp the template onto the science grid.

    Returns the pair on one grid as a :class:`~diffim_dag.pipeline.PreparedExposures` (``metrics``: the
    warp's; not prepared yet: the ``psf`` and ``prepare`` tasks follow).  When this run already installed the visit's outputs (its worker
    died before reporting) it returns :class:`~diffim_dag.graph.AlreadyWritten` instead, and the
    visit's later tasks hand that on without doing anything.
    """
    from .graph import AlreadyWritten
    from .pipeline import PreparedExposures
    from .stages.template import prepare_template

    if run_id:
        existing = verify_outputs(out_dir, spec.visit, spec.detector, checksums=False)
        if existing is not None and existing.get("run_id") == run_id:
            return AlreadyWritten(visit=spec.visit, detector=spec.detector, manifest=existing)
    t0 = time.perf_counter()
    science, template = read_visit_inputs(spec)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    template, warp_metrics = prepare_template(science, template, store=spec.template_store,
                                              min_coverage=config.subtract.min_template_coverage,
                                              tile=config.subtract.tile_size,
                                              workers=config.cluster.threads_per_worker)
    timings = {"read": t_read, "template_warp": time.perf_counter() - t0}
    return PreparedExposures(science=science, template=template, metrics=warp_metrics, timings=timings)


def psf_stage(warped, config: PipelineConfig, role: str):
    """The ``("psf", V, D, role)`` task: the supplied PSF of one exposure, or one estimated from its stars."""
    from .stages.psf import measure_psf

    t0 = time.perf_counter()
    result = measure_psf(getattr(warped, role), config.psf, role=role)
    result.seconds = time.perf_counter() - t0
    result.exposure = None  # the task's result is the model and its report; the pixels stay in the warped pair
    return result


def prepare_stage(warped, psf_science, psf_template, config: PipelineConfig):
    """The ``("prepare", V, D)`` task: sky removed, PSFs attached (:func:`~diffim_dag.pipeline.prepare_exposures`);
    for ``method: al`` also :func:`~diffim_dag.pipeline.prepare_subtraction` (coverage, variance scaling, mode)."""
    from .pipeline import PreparedExposures, prepare_exposures, prepare_subtraction

    prepared = prepare_exposures(warped.science, warped.template, config,
                                 psfs={"science": psf_science, "template": psf_template})
    metrics = {"template": warped.metrics, **prepared.metrics}
    timings = {**warped.timings, **prepared.timings}
    if config.method == "al":
        return prepare_subtraction(prepared.science, prepared.template, config, metrics=metrics, timings=timings)
    return PreparedExposures(science=prepared.science, template=prepared.template, metrics=metrics, timings=timings)


def score_subtract_stage(prepared, config: PipelineConfig):
    """The ``subtract`` task of the score methods (``al-preconvolve``, ``zogy``): the whole subtraction of the
    ``prepare`` task's pair (its metrics: the warp's, the skies', the PSFs'), no detection."""
    from .pipeline import subtract_prepared

    return subtract_prepared(prepared, config=config, client=None, tiled=False, detect=False)


def write_stage(spec: VisitSpec, config: PipelineConfig, out_dir: str, run_id: str, result, catalog,
                injection=None) -> dict:
    """The last task of a visit: write its outputs and install them atomically; returns the visit's record (a dict).

    ``result`` is the :class:`~diffim_dag.pipeline.SubtractionResult` (without DiaSources) and
    ``catalog`` the :class:`~diffim_dag.pipeline.CatalogStage` (``injection``: the matched fakes, or None), or a
    :class:`~diffim_dag.graph.StageFailure` (→ a ``failed`` record) or
    :class:`~diffim_dag.graph.AlreadyWritten` (→ ``done``, nothing written) handed on by an earlier stage.
    Outputs go to a hidden temporary folder, get checksummed into ``_outputs.json`` and the folder is
    renamed into place; an install by an earlier attempt of this run is not repeated (exactly once).
    Permanent errors while writing become a ``failed`` record; anything else is raised (retried).
    """
    from .cluster import worker_name
    from .graph import AlreadyWritten, StageFailure
    from .pipeline import judge_result, with_catalog, with_injection
    from .products import write_outputs

    t0 = time.perf_counter()
    root = Path(out_dir)
    final = visit_dir(root, spec.visit, spec.detector)
    worker = worker_name()
    marker = next((a for a in (result, catalog, injection) if isinstance(a, (StageFailure, AlreadyWritten))), None)
    if isinstance(marker, StageFailure):
        return VisitRecord(spec.visit, spec.detector, "failed", reason=marker.reason, error=marker.error,
                           worker=worker).to_dict()
    existing = marker.manifest if isinstance(marker, AlreadyWritten) else (
        verify_outputs(root, spec.visit, spec.detector, checksums=False) if run_id else None)
    if existing is not None and existing.get("run_id") == run_id:
        # an earlier attempt of this very run finished (its worker died before reporting): done exactly once
        return VisitRecord(spec.visit, spec.detector, "done", reason="written by an earlier attempt of this run",
                           outputs={k: v["path"] for k, v in existing["files"].items()},
                           wall_s=time.perf_counter() - t0, n_dia_sources=existing.get("n_dia_sources"),
                           worker=worker).to_dict()
    result = judge_result(with_injection(with_catalog(result, catalog), injection), config)
    catalog = result.dia_sources = result.dia_sources.copy()  # the catalog task's frame stays as it was
    # the manifest is the authority on (visit, detector)
    catalog["visit"] = spec.visit
    catalog["detector"] = spec.detector
    result.metrics = {**result.metrics, "visit": spec.visit, "detector": spec.detector}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{run_id + '-' if run_id else ''}{uuid.uuid4().hex[:12]}"
    part = _dataset_part(root, spec.visit, spec.detector)
    try:
        try:
            write_outputs(result, tmp, config=config)
        except DiffimError as exc:
            if not getattr(exc, "permanent", True):
                raise
            return VisitRecord(spec.visit, spec.detector, "failed", reason=str(exc), error=type(exc).__name__,
                               worker=worker).to_dict()
        n_real = int((~catalog["sky_source"]).sum()) if len(catalog) else 0
        _write_dataset_part(catalog, part)
        t_sum = time.perf_counter()
        files = {}
        for name, p in sorted(result.paths.items()):
            rel = Path(p).relative_to(tmp)
            files[name] = file_entry(Path(p), root)
            files[name]["path"] = os.path.relpath(final / rel, root)  # where it will live
        files["dataset_part"] = file_entry(part, root)
        manifest = {
            "visit": spec.visit, "detector": spec.detector, "run_id": run_id, "n_dia_sources": n_real,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "worker": worker, "checksum_s": time.perf_counter() - t_sum, "files": files,
        }
        (tmp / OUTPUTS_MANIFEST).write_text(json.dumps(manifest, indent=2))
        install(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = verify_outputs(root, spec.visit, spec.detector, checksums=False)
    if done is None or (done.get("run_id") != run_id):
        raise RuntimeError(f"{final}: outputs not in place after the rename")  # transient: retried
    # the visit's compute time: the sum of its stages' wall times (tasks may have run on several workers)
    wall = float(sum(v for v in result.metrics.get("timings_s", {}).values() if isinstance(v, (int, float))))
    return VisitRecord(spec.visit, spec.detector, "done", outputs={k: v["path"] for k, v in files.items()},
                       wall_s=wall + time.perf_counter() - t0, n_dia_sources=n_real, worker=worker,
                       injection=_injection_figures(result.metrics.get("injection"))).to_dict()


def _injection_figures(summary: dict | None) -> dict | None:
    """The per-visit fakes figures of the run report."""
    if not summary:
        return None
    return {"n_injected": summary.get("n_injected"), "n_recovered": summary.get("n_recovered"),
            "m50": summary.get("m50"), "m90": summary.get("m90"),
            "limiting_magnitude_5sigma": summary.get("limiting_magnitude_5sigma"),
            "completeness_snr_ge_10": summary.get("completeness_snr_ge_10"),
            "flux_median_ratio": (summary.get("flux") or {}).get("median_ratio"),
            "median_offset_px": (summary.get("astrometry") or {}).get("median_offset_px")}


def process_visit(spec: VisitSpec, config: PipelineConfig, out_dir: str, *, run_id: str = "") -> dict:
    """Run one (visit, detector) end to end where it is called and return its record (a dict).

    The visit's graph (:func:`visit_graph`) run in turn in this process: the same
    stage functions a batch runs as separate tasks.  Permanent errors become a ``failed`` record;
    anything else is raised.  The outputs appear atomically.
    """
    return compute_visit(spec, config, os.fspath(Path(out_dir).resolve()), run_id=run_id)


# --------------------------------------------------------------------------- the graph of a visit


@dataclass(frozen=True)
class VisitGrid:
    """How many tile and cell tasks one visit's graph has.

    Attributes
    ----------
    tiles : (int, int)
        Task grid of the tile stages (subtract, decorrelate, detect): tile ``(iy, ix)`` of the image
        runs in task ``(iy mod n_y, ix mod n_x)`` (:func:`~diffim_dag.stages.subtract.cores_of_task`).
    cells : int
        ``fit-cell`` tasks: cell ``c`` is fitted in task ``c mod cells``.
    shape : (int, int) or None
        The image shape the grid was derived from (None: unknown, one task for all tiles and
        one for all cells, with the same results).
    """

    tiles: tuple[int, int] = (1, 1)
    cells: int = 1
    shape: tuple[int, int] | None = None


def visit_grid(shape: tuple[int, int] | None, config) -> VisitGrid:
    """The task grid of a visit whose science image has ``shape`` (ny, nx): one task per tile and per cell."""
    from .stages.subtract import tile_grid

    if shape is None:
        return VisitGrid()
    ny, nx = (int(v) for v in shape)
    cell = config.kernel.cell_size
    n_cells = max(1, -(-nx // cell)) * max(1, -(-ny // cell))
    return VisitGrid(tiles=tile_grid((0, nx, 0, ny), config.subtract.tile_size), cells=n_cells, shape=(ny, nx))


def _fit_cells_task(cells, index: int, n_tasks: int):
    from .pipeline import fit_cells_stage

    return fit_cells_stage(cells, [c.cell for c in cells.cells if c.cell % n_tasks == index])


def _own_cores(prepared, config, ty, tx, nty, ntx):
    from .stages.subtract import cores_of_task

    return list(cores_of_task(prepared.science.bbox, config.subtract.tile_size, (ty, tx), (nty, ntx)).values())


def _subtract_task(prepared, kernel, config, ty: int, tx: int, nty: int, ntx: int):
    from .pipeline import subtract_tiles_stage

    return subtract_tiles_stage(prepared, kernel, config, _own_cores(prepared, config, ty, tx, nty, ntx))


def _merge(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _decorrelate_task(prepared, kernel, config, ty: int, tx: int, nty: int, ntx: int, neighbours: list):
    from .pipeline import decorrelate_tiles_stage

    return decorrelate_tiles_stage(prepared, kernel, _own_cores(prepared, config, ty, tx, nty, ntx),
                                   _merge(neighbours))


def _difference_task(prepared, kernel, config, tiles: list):
    from .pipeline import difference_stage

    return difference_stage(prepared, kernel, config, _merge(tiles))


def _fakes_of(prepared):
    return prepared.fakes


def _detect_task(inputs, ty: int, tx: int, nty: int, ntx: int):
    from .pipeline import detect_tiles_stage
    from .stages.subtract import tile_grid

    n_y, n_x = tile_grid(inputs.bbox, inputs.config.tile_size)
    own = [iy * n_x + ix for iy in range(n_y) for ix in range(n_x) if (iy % nty, ix % ntx) == (ty, tx)]
    return detect_tiles_stage(inputs, own)


def visit_graph(spec, config, out_dir, *, run_id: str = "", grid: VisitGrid | None = None) -> dict:
    """The task graph of one (visit, detector): a dict ``{key: task}`` in Dask's graph format.

    Keys are ``(stage, visit, detector)`` or ``(stage, visit, detector, index...)``, the stage name carrying
    the run's token (:func:`task_key`: ``"fit-cell-<32 hex>"``; :func:`stage_of` gives the stage back):

    ============================================  ===============================================================
    ``("template", V, D)``                        read the inputs, fetch/warp the template
                                                  (:func:`diffim_dag.template_stage`)
    ``("psf", V, D, i)``                          the PSF of the science (0) / the (warped) template (1): supplied, or
                                                  estimated from its stars (:func:`diffim_dag.psf_stage`)
    ``("prepare", V, D)``                         skies removed, PSFs attached; coverage, variance scaling and
                                                  mode for ``al`` (:func:`diffim_dag.prepare_stage`)
    ``("kernel-sources", V, D)``                  kernel sources and their stamps by cell
    ``("fit-cell", V, D, i)``                     first fit of cell ``i`` (``i`` < ``grid.cells``)
    ``("spatial-solve", V, D)``                   clipping, refits, spatial solve, decorrelation kernel
    ``("subtract", V, D, ty, tx)``                convolve and subtract tile ``(ty, tx)``
    ``("decorrelate", V, D, ty, tx)``             decorrelate the tile (reads the neighbouring tiles' edges)
    ``("difference", V, D)``                      assemble the planes, quality metrics
    ``("detect-prepare", V, D)``                  whole-image matched filter / significance
    ``("detect", V, D, ty, tx)``                  detect and measure the tile
    ``("inject", V, D)``                          with ``fakes``: fake sources added (``al``: after the spatial
                                                  solve; :func:`diffim_dag.pipeline.inject_stage`); the
                                                  subtraction tasks read its pair
    ``("catalog", V, D)``                         stitch the tiles (footprints cut by tile edges), sky sources
    ``("fakes", V, D)``, ``("match", V, D)``      with ``fakes``: the fakes' table; matched to the DiaSources
    ``("write", V, D)``                           write, checksum and install the outputs; the visit's record
    ============================================  ===============================================================

    ``al-preconvolve`` and ``zogy`` replace kernel-sources … difference by one ``("subtract", V, D)`` task
    (:func:`diffim_dag.pipeline.subtract_prepared`); ``decorrelate`` tasks exist when a spatially constant
    decorrelation is configured.  The keys depend on (visit, detector), the grid and ``run_id`` only: the
    same for every build of one run, disjoint between runs.

    Parameters
    ----------
    spec : VisitSpec
        Paths of the visit's inputs.
    config : PipelineConfig
    out_dir : path
        The batch's output folder.
    run_id : str
        Identifies this run in the outputs manifests (exactly-once install) and in every task key.
    grid : VisitGrid, optional
        Tile and cell task counts; by default from the science image's shape read from its header
        (:func:`diffim_dag.input_shape`), one task for all tiles/cells when it cannot be read.
    """
    import os

    from . import pipeline

    v, d = int(spec.visit), int(spec.detector)
    if grid is None:
        grid = visit_grid(input_shape(spec), config)
    out = os.fspath(out_dir)
    nty, ntx = grid.tiles
    tiles = [(ty, tx) for ty in range(nty) for tx in range(ntx)]
    dsk: dict = {}

    def key(stage, *index):
        return task_key(stage, v, d, *index, run_id=run_id)

    def task(stage, index, function, *args):
        dsk[key(stage, *index)] = (run_stage, stage, v, d, function, *args)

    task("template", (), template_stage, spec, config, out, run_id)
    for index, role in enumerate(PSF_ROLES):
        task("psf", (index,), psf_stage, key("template"), config, role)
    task("prepare", (), prepare_stage, key("template"), key("psf", 0), key("psf", 1), config)
    fakes = config.fakes.enabled
    if config.method == "al":
        prepared = key("prepare")
        task("kernel-sources", (), pipeline.kernel_sources_stage, prepared, config)
        for i in range(grid.cells):
            task("fit-cell", (i,), _fit_cells_task, key("kernel-sources"), i, grid.cells)
        task("spatial-solve", (), pipeline.spatial_solve_stage, prepared, key("kernel-sources"),
             [key("fit-cell", i) for i in range(grid.cells)], config)
        kernel = key("spatial-solve")
        if fakes:  # after the kernel fit (on the images without fakes), before the convolution
            task("inject", (), pipeline.inject_stage, prepared, config, kernel)
            prepared = key("inject")
        for ty, tx in tiles:
            task("subtract", (ty, tx), _subtract_task, prepared, kernel, config, ty, tx, nty, ntx)
        last = "subtract"
        if config.decorrelation.enabled and not config.decorrelation.spatially_varying:
            for ty, tx in tiles:
                # the tasks owning the tiles next to this one: the adjacent tasks, or, when the task grid
                # was not derived from the image shape (coarser than the tiles), the adjacent ones modulo it
                near = sorted({((ty + dy) % nty, (tx + dx) % ntx) if grid.shape is None else (ty + dy, tx + dx)
                               for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                               if grid.shape is None or (0 <= ty + dy < nty and 0 <= tx + dx < ntx)})
                task("decorrelate", (ty, tx), _decorrelate_task, prepared, kernel, config, ty, tx, nty, ntx,
                     [key("subtract", *n) for n in near])
            last = "decorrelate"
        task("difference", (), _difference_task, prepared, kernel, config, [key(last, *t) for t in tiles])
        result = key("difference")
    else:
        prepared = key("prepare")
        if fakes:
            task("inject", (), pipeline.inject_stage, prepared, config)
            prepared = key("inject")
        task("subtract", (), score_subtract_stage, prepared, config)
        result = key("subtract")
    task("detect-prepare", (), pipeline.prepare_detection_stage, result, config)
    for ty, tx in tiles:
        task("detect", (ty, tx), _detect_task, key("detect-prepare"), ty, tx, nty, ntx)
    task("catalog", (), pipeline.catalog_stage, key("detect-prepare"), [key("detect", *t) for t in tiles])
    injection = None
    if fakes:
        task("fakes", (), _fakes_of, key("inject"))  # the table alone travels to the match task
        task("match", (), pipeline.match_stage, result, key("catalog"), key("fakes"), config)
        injection = key("match")
    dsk[write_key(v, d, run_id)] = (write_stage, spec, config, out, run_id, result, key("catalog"), injection)
    return dsk


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
