"""The outputs of one (visit, detector): the ``write`` tasks that install them atomically — a batch visit's
folder with its checksummed manifest and its part of the DiaSource dataset (:func:`write_stage`), or one output
set (:func:`write_output_set_stage`) — the record a batch keeps of each visit (:class:`VisitRecord`), and the
check that a visit's outputs are complete (:func:`verify_outputs`)."""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .config import PipelineConfig
from .errors import DiffimError
from .io.outputs import OUTPUTS_MANIFEST, file_entry, install, sha256
from .manifest import VisitSpec, visit_dir, visit_key

#: Folder (under the output folder) of the batch's DiaSource dataset.
DIA_SOURCE_DATASET = "dia_sources"

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


@dataclass(frozen=True)
class StagedPlanes:
    """What the ``write-planes`` task of a single subtraction wrote into the set's temporary folder."""

    folder: str
    paths: dict  # name -> path inside ``folder``
    entries: dict  # path relative to ``folder`` -> its file entry (size, SHA-256)
    seconds: float


def write_planes_stage(result, folder: str, after=()) -> StagedPlanes:
    """The ``("write-planes", V, D)`` task of a single subtraction: the planes, kernel and kernel candidates
    (:func:`~diffim_dag.products.write_planes`), final once the method's result is, written and checksummed into
    the set's temporary folder ``folder`` while detection runs (the ``write`` task adds the catalogues and
    installs the set).  ``after``: results of tasks it waits for, unused."""
    from .io.outputs import open_temporary
    from .products import write_planes

    t0 = time.perf_counter()
    tmp = open_temporary(Path(folder))
    paths = write_planes(result, tmp)
    entries = {Path(p).relative_to(tmp).as_posix(): file_entry(Path(p), tmp) for p in paths.values()}
    return StagedPlanes(os.fspath(tmp), {k: os.fspath(v) for k, v in paths.items()}, entries,
                        time.perf_counter() - t0)


def write_output_set_stage(result, out_dir: str, config: PipelineConfig, plots: bool = False,
                           staged: StagedPlanes | None = None) -> dict:
    """The ``("write", V, D)`` task of a single subtraction: the output set written to ``out_dir`` (into
    ``staged``'s folder, when the ``write-planes`` task began it) and installed as a whole
    (:func:`~diffim_dag.products.write_output_set`); returns ``{name: path}``."""
    from .products import write_output_set

    write_output_set(result, out_dir, plots=plots, config=config, staged=staged)
    return {k: os.fspath(v) for k, v in result.paths.items()}


def write_set_task(visit: int, detector: int, result, staged, out_dir: str, config: PipelineConfig,
                   plots: bool = False):
    """The body of a single subtraction's ``write`` task (:func:`~diffim_dag.graph.run_stage` of
    :func:`write_output_set_stage`) that removes the ``write-planes`` task's folder whatever happens: installed,
    it is gone already; after a failed stage (handed on here) or a failed write, nothing of it stays."""
    from .graph import run_stage
    from .io.outputs import discard_temporary

    try:
        return run_stage("write", visit, detector, write_output_set_stage, result, out_dir, config, plots, staged)
    finally:
        if isinstance(staged, StagedPlanes):
            discard_temporary(Path(staged.folder))


def write_stage(spec: VisitSpec, config: PipelineConfig, out_dir: str, run_id: str, result) -> dict:
    """The last task of a visit: write its outputs and install them atomically; returns the visit's record (a dict).

    ``result`` is the ``result`` task's :class:`~diffim_dag.stages.inputs.SubtractionResult` (DiaSources, fakes,
    verdict), or a
    :class:`~diffim_dag.graph.StageFailure` (→ a ``failed`` record) or
    :class:`~diffim_dag.graph.AlreadyWritten` (→ ``done``, nothing written) handed on by an earlier stage.
    Outputs go to a hidden temporary folder, get checksummed into ``_outputs.json`` and the folder is
    renamed into place; an install by an earlier attempt of this run is not repeated (exactly once).
    Permanent errors while writing become a ``failed`` record; anything else is raised (retried).
    """
    from .cluster import worker_name
    from .graph import AlreadyWritten, StageFailure
    from .products import write_outputs

    t0 = time.perf_counter()
    root = Path(out_dir)
    final = visit_dir(root, spec.visit, spec.detector)
    worker = worker_name()
    marker = result if isinstance(result, (StageFailure, AlreadyWritten)) else None
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
    result = copy.copy(result)  # the result task's object and frame stay as they were
    catalog = result.dia_sources = result.dia_sources.copy()
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
