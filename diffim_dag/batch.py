"""Survey-scale execution: many (visit, detector) subtractions as one Dask batch.

A batch is described by a **manifest** (CSV) with one row per (visit, detector)::

    visit,detector,science,template
    1001,0,raw/1001_0.fits,templates/patch_0.fits
    1001,1,raw/1001_1.fits,store:templates/          # a template store (folder of patches)

Paths are relative to the manifest's folder.  ``template`` may name a template store
(``store:DIR``, or a folder that is not a ``.zarr`` store); a ``template_store`` column
does the same.  Optional columns: ``science_psf``, ``science_variance``,
``science_noise``, ``science_weight``, ``science_mask``, ``science_hdu`` and the
``template_*`` twins (the options of ``diffim-dag subtract``).

Graph
-----
Each row becomes one small graph of tasks (:func:`diffim_dag.graph.visit_graph`), keyed
``(stage, visit, detector[, index...])``: ``("template", V, D)`` reads the inputs on a
worker and fetches/warps the template; then ``("kernel-sources", V, D)``, one
``("fit-cell", V, D, i)`` per kernel cell, ``("spatial-solve", V, D)``, one
``("subtract", V, D, ty, tx)`` and ``("decorrelate", V, D, ty, tx)`` per tile,
``("difference", V, D)``, ``("detect-prepare", V, D)``, one ``("detect", V, D, ty, tx)``
per tile, ``("catalog", V, D)`` (the tiles stitched) and ``("write", V, D)``, whose result
is the visit's record.  Every stage name carries the run's token (:func:`diffim_dag.graph.task_key`),
so two runs over the same visits on one scheduler never share keys.  The batch is the union of these graphs.  The tile and cell counts
come from the science header (``NAXIS`` cards, :func:`input_shape`); the graph holds only
paths, the frozen config, the output folder and indices — never pixels — so a graph of
100 visits of 2048² (256 kernel cells, 4 tiles each: 27 500 tasks) pickles to 1.5 MB and
builds in about half a second; pixels exist only in the workers.  Per-stage wall times land in every ``metrics.json``.

Nothing lost
------------
A visit's outputs are written into a hidden temporary folder beside
``DIR/visit=V/detector=D/``, checksummed into ``_outputs.json`` (the outputs
manifest) and the folder is renamed into place in one ``rename``; the visit's
DiaSources also land in the batch dataset ``DIR/dia_sources/visit=V/detector=D.parquet``
(written before the rename and listed, with its checksum, in the outputs manifest).
A rerun verifies the outputs manifests and skips every visit whose files all match.

Errors inside a stage that are :class:`~diffim_dag.errors.DiffimError` with
``permanent=True`` (bad input, NoWorkFound, too few kernel sources) are caught in
the task and returned as a :class:`~diffim_dag.graph.StageFailure` value that the
visit's later tasks hand on, so the ``write`` task returns a ``failed`` record and
nothing is retried; any other exception is transient and the scheduler retries that
task (``retries``, default 2).  When a worker dies, the scheduler recomputes the
results it held; a ``write`` task whose worker died after the install finds the
outputs manifest of its own run and does not install twice.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import PipelineConfig, config_to_dict
from .errors import DiffimError
from .manifest import VisitSpec, read_manifest, visit_dir, visit_key, write_manifest  # noqa: F401 - the batch API
from .io.outputs import (OUTPUTS_MANIFEST, check_output_root, file_entry, install, register_cleanup, sha256,
                         unregister_cleanup)

__all__ = [
    "VisitSpec",
    "VisitRecord",
    "BatchReport",
    "read_manifest",
    "visit_key",
    "visit_dir",
    "process_visit",
    "verify_outputs",
    "build_batch_graph",
    "run_batch",
    "dia_source_dataset",
    "read_dia_source_dataset",
    "simulate_batch",
    "OUTPUTS_MANIFEST",
    "RUN_REPORT",
    "STATUSES",
]

log = logging.getLogger(__name__)

#: Name of the batch report in the output folder.
RUN_REPORT = "run_report.json"
INJECTED_DIR = "injected"  # a run with fakes writes DIR/injected/…, never over the clean run's DIR/visit=…
#: Folder (under the output folder) of the batch's DiaSource dataset.
DIA_SOURCE_DATASET = "dia_sources"
STATUSES = ("done", "skipped", "failed")

# --------------------------------------------------------------------------- one visit (runs on a worker)


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

    The visit's graph (:func:`diffim_dag.graph.visit_graph`) run in turn in this process: the same
    stage functions a batch runs as separate tasks.  Permanent errors become a ``failed`` record;
    anything else is raised.  The outputs appear atomically.
    """
    from .graph import compute_visit

    return compute_visit(spec, config, os.fspath(Path(out_dir).resolve()), run_id=run_id)


# --------------------------------------------------------------------------- the graph


def build_batch_graph(specs: Sequence[VisitSpec], config: PipelineConfig, out_dir, *, run_id: str = "",
                      grids: dict | None = None) -> dict:
    """The batch's task graph (``{key: task}``): the union of every visit's graph.

    See :func:`diffim_dag.graph.visit_graph` for the stages and keys (``(stage, visit, detector[,
    index...])``); the result of ``("write", visit, detector)`` is the visit's record.  The tasks
    hold paths, the frozen config, the output folder and tile/cell indices only: no pixels travel
    through the client or sit in the graph.  The science headers are read here for the tile and
    cell counts (``grids`` may give them instead, keyed by (visit, detector)).
    """
    from .graph import batch_graph

    return batch_graph(specs, config, os.fspath(Path(out_dir).resolve()), run_id=run_id, grids=grids)


# --------------------------------------------------------------------------- running a batch


@dataclass
class BatchReport:
    """The outcome of a batch: one record per (visit, detector) and totals."""

    run_id: str
    records: list[VisitRecord]
    wall_s: float
    out_dir: str
    scheduler: str = ""
    n_workers: int = 0
    manifest: str = ""
    pipeline: dict = field(default_factory=dict)
    dataset: str | None = None
    injection: dict | None = None  # with fakes: the survey-level completeness summary

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    @property
    def n_dia_sources(self) -> int:
        return sum(r.n_dia_sources or 0 for r in self.records if r.status == "done")

    @property
    def throughput_per_minute(self) -> float:
        """Visits processed (done) per minute of batch wall time."""
        return 60.0 * self.count("done") / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id, "out": self.out_dir, "manifest": self.manifest, "scheduler": self.scheduler,
            "n_workers": self.n_workers, "wall_s": self.wall_s,
            "counts": {s: self.count(s) for s in STATUSES}, "n_visits": len(self.records),
            "n_dia_sources": self.n_dia_sources, "throughput_visits_per_minute": self.throughput_per_minute,
            "dia_source_dataset": self.dataset, "pipeline": self.pipeline,
            **({"injection": self.injection} if self.injection is not None else {}),
            "entries": [r.to_dict() for r in self.records],
        }

    def table(self) -> str:
        rows = [("visit", "detector", "status", "wall s", "DiaSources", "reason")]
        for r in self.records:
            rows.append((str(r.visit), str(r.detector), r.status, f"{r.wall_s:.1f}",
                         "" if r.n_dia_sources is None else str(r.n_dia_sources), r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)

    def summary(self) -> str:
        line = (f"{len(self.records)} visits: {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed; {self.n_dia_sources} DiaSources; wall time {self.wall_s:.1f} s; "
                f"throughput {self.throughput_per_minute:.1f} visits/min on {self.n_workers} worker(s)")
        j = self.injection
        if j and j.get("n_injected"):
            fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
            line += (f"\nfakes: {j['n_recovered']}/{j['n_injected']} recovered over {j['n_visits']} visits; blank sky "
                     f"50 % at {fmt(j.get('m50'))} mag (median 5σ limit {fmt(j.get('limiting_magnitude_5sigma'))}), "
                     f"90 % at {fmt(j.get('m90'))}; table and plot in {self.out_dir}")
        return line


class _Progress:
    """A one-line text progress bar (works under distributed, unlike dask.diagnostics.ProgressBar)."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.total, self.n, self.failed, self.width = total, 0, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.draw()

    def update(self, record: dict) -> None:
        self.n += 1
        self.failed += record["status"] == "failed"
        self.draw()

    def draw(self) -> None:
        frac = self.n / self.total if self.total else 1.0
        bar = "#" * int(round(frac * self.width))
        end = "\n" if self.n >= self.total else ""
        self.stream.write(f"\r[{bar:<{self.width}}] {self.n}/{self.total} visits, {self.failed} failed, "
                          f"{time.perf_counter() - self.t0:.0f} s{end}")
        self.stream.flush()


def _failure_record(spec: VisitSpec, exc: BaseException, retries: int, wall: float) -> dict:
    reason = f"{type(exc).__name__}: {exc} (transient; failed {retries + 1} attempt(s))"
    return VisitRecord(spec.visit, spec.detector, "failed", reason=reason, error=type(exc).__name__,
                       wall_s=wall).to_dict()


def _remove_orphans(out: Path, run_id: str) -> None:
    """Remove this run's temporary visit folders that a worker left when it died mid-write.

    Called once every task of the run has finished, so none of them is still being written; the
    run id in their names keeps other runs' folders out of it.
    """
    for tmp in out.glob(f"visit=*/.detector=*.tmp-{run_id}-*"):
        log.info("removing %s, left by a worker lost while writing it", tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def run_batch(
    specs: Sequence[VisitSpec] | str | os.PathLike,
    config: PipelineConfig | None = None,
    out_dir: str | os.PathLike = "batch_out",
    *,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    retries: int = 2,
    progress: bool = True,
    report_html: str | os.PathLike | None = None,
    verify_checksums: bool = True,
    stream=None,
) -> BatchReport:
    """Run every (visit, detector) of ``specs`` (or of a manifest path) and write ``out_dir/run_report.json``.

    Completed visits (outputs manifest verified) are skipped; the others form one task graph
    (:func:`build_batch_graph`: per visit, one task per stage, per cell and per tile) run on
    ``client``, or on ``scheduler`` (``tcp://HOST:PORT`` or ``kubernetes://...``), or on a new
    LocalCluster with one worker per core.  The records are collected from the visits'
    ``("write", visit, detector)`` tasks as they finish.  Every task that raises is retried
    ``retries`` times (transient errors); permanent ones are recorded and the batch carries on.
    """
    from .cluster import as_completed, open_client, performance_report, scheduler_for
    from .graph import write_key
    from .io.atomic import atomic_write_text

    t_start = time.perf_counter()
    config = config or PipelineConfig()
    out = check_output_root(out_dir)  # before any work
    if config.fakes.enabled:  # the injected run is its own output set: the clean outputs stay as they are
        out = check_output_root(out / INJECTED_DIR)
    manifest_path = ""
    if isinstance(specs, (str, os.PathLike)):
        manifest_path = os.fspath(specs)
        specs = read_manifest(specs)
    specs = list(specs)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    records: dict[str, dict] = {}
    todo: list[VisitSpec] = []
    for s in specs:
        m = verify_outputs(out, s.visit, s.detector, checksums=verify_checksums)
        if m is not None:
            records[s.key] = VisitRecord(s.visit, s.detector, "skipped", reason="outputs complete (checksums verified)"
                                         if verify_checksums else "outputs complete (sizes verified)",
                                         outputs={k: v["path"] for k, v in m["files"].items()},
                                         n_dia_sources=m.get("n_dia_sources")).to_dict()
        else:
            todo.append(s)
    by_key = {write_key(s.visit, s.detector, run_id): s for s in todo}
    address, n_w = "", 0
    # an interrupted run (Ctrl-C, SIGTERM, a stalled cluster) sweeps its temporary visit folders too
    sweep = register_cleanup(lambda: _remove_orphans(out, run_id))
    import contextlib

    with contextlib.ExitStack() as stack:
        if todo:
            if client is None:
                client = stack.enter_context(open_client(scheduler_for(scheduler, config.cluster), config.cluster,
                                                         n_workers=n_workers))
            address = client.scheduler.address if client.scheduler is not None else ""
            n_w = len(client.scheduler_info().get("workers", {}))
            graph = build_batch_graph(todo, config, out, run_id=run_id)
            bar = _Progress(len(by_key), stream=stream) if progress else None
            ctx = performance_report(os.fspath(report_html)) if report_html else contextlib.nullcontext()
            submitted = {}
            with ctx:
                futures = client.get(graph, list(by_key), sync=False, retries=retries)
                del graph
                submitted = {f.key: time.perf_counter() for f in futures}
                for fut in as_completed(futures):
                    spec = by_key[fut.key]
                    try:
                        rec = fut.result()
                    except Exception as exc:  # transient error that outlived its retries (or a lost task)
                        rec = _failure_record(spec, exc, retries, time.perf_counter() - submitted[fut.key])
                    records[spec.key] = rec
                    if bar is not None:
                        bar.update(rec)
                    fut.release()
    unregister_cleanup(sweep)
    if todo:
        _remove_orphans(out, run_id)
    ordered = [VisitRecord(**{k: v for k, v in records[s.key].items() if k != "key"}) for s in specs]
    report = BatchReport(run_id=run_id, records=ordered, wall_s=time.perf_counter() - t_start, out_dir=str(out),
                         scheduler=address, n_workers=n_w, manifest=manifest_path, pipeline=config_to_dict(config))
    ds = out / DIA_SOURCE_DATASET
    report.dataset = str(ds) if ds.is_dir() else None
    if config.fakes.enabled:
        report.injection = _survey_completeness(out, specs, records)
    atomic_write_text(out / RUN_REPORT, json.dumps(report.to_dict(), indent=2, default=str))
    return report


def _survey_completeness(out: Path, specs: Sequence[VisitSpec], records: dict) -> dict:
    """One completeness table and plot over every finished visit's fakes (``out/injection.parquet``,
    ``out/completeness.csv``, ``out/plots/completeness.png``); the survey-level summary."""
    import pandas as pd

    from .io.atomic import atomic_path
    from .stages.inject import survey_summary, write_completeness

    tables = []
    for s in specs:
        path = visit_dir(out, s.visit, s.detector) / "injection.parquet"
        if records.get(s.key, {}).get("status") in ("done", "skipped") and path.exists():
            t = pd.read_parquet(path)
            t.insert(0, "detector", s.detector)
            t.insert(0, "visit", s.visit)
            tables.append(t)
    table, summary = survey_summary(tables)
    if len(table):
        with atomic_path(out / "injection.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        paths = write_completeness(table, summary, out, title=f"{summary['n_recovered']}/{summary['n_injected']} fakes "
                                   f"recovered over {summary['n_visits']} visits")
        summary["files"] = {"injection": "injection.parquet", **{k: os.path.relpath(v, out) for k, v in paths.items()}}
    return summary


# --------------------------------------------------------------------------- the DiaSource dataset


def dia_source_dataset(out_dir: str | os.PathLike) -> Path:
    """The batch's DiaSource dataset folder (Hive-partitioned by ``visit``; one file per detector)."""
    return Path(out_dir) / DIA_SOURCE_DATASET


def read_dia_source_dataset(out_dir: str | os.PathLike, *, engine: str = "pandas", real_only: bool = False):
    """Read the batch's DiaSources with pandas (default) or dask.dataframe (``engine="dask"``).

    ``visit`` comes back from the partition folder names (``visit=V``).
    """
    path = dia_source_dataset(out_dir)
    # both infer the Hive partitioning (visit=V) themselves; sharing one pyarrow Partitioning object
    # between dask's reader threads crashed pyarrow here
    if engine == "dask":
        from .graph import lazy_parquet

        df = lazy_parquet(path)
    else:
        import pandas as pd

        df = pd.read_parquet(path)
    if real_only:
        df = df[~df["sky_source"]]
    return df


# --------------------------------------------------------------------------- simulated batches


def simulate_batch(out_dir: str | os.PathLike, *, n_visits: int = 4, n_detectors: int = 1, size: int = 256,
                   seed: int = 0, first_visit: int = 1000, sim_overrides: dict | None = None) -> Path:
    """Simulate ``n_visits × n_detectors`` science/template pairs and write ``out_dir/manifest.csv``.

    Each (visit, detector) gets its own seed; inputs live in ``out_dir/inputs/v{visit}_d{detector}/``.
    Returns the manifest path.
    """
    from .sim import SimConfig, simulate_pair, write_pair

    out = Path(out_dir)
    specs = []
    for i in range(n_visits):
        visit = first_visit + i
        for det in range(n_detectors):
            cfg = SimConfig(size=size, seed=seed + 1000 * i + det, sky_subtracted=True, **(sim_overrides or {}))
            pair = simulate_pair(cfg)
            pair_sci = pair.science.with_info(visit=visit, detector=det)
            paths = write_pair(dataclasses.replace(pair, science=pair_sci), out / "inputs" / f"v{visit}_d{det}")
            specs.append(VisitSpec(visit=visit, detector=det, science=str(paths["science"].resolve()),
                                   template=str(paths["template"].resolve())))
    return write_manifest(specs, out / "manifest.csv")
