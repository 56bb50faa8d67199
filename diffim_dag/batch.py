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
Each row becomes one small graph of tasks (:func:`diffim_dag.visit.visit_graph`), keyed
``(stage, visit, detector[, index...])``: ``("template", V, D)`` reads the inputs on a
worker and fetches/warps the template; then ``("kernel-sources", V, D)``, one
``("fit-cell", V, D, i)`` per 64 kernel cells, ``("spatial-solve", V, D)``, one
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
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import PipelineConfig, config_to_dict
from .manifest import VisitSpec, read_manifest, visit_dir, visit_key, write_manifest  # noqa: F401 - the batch API
from .io.outputs import OUTPUTS_MANIFEST, check_output_root, register_cleanup, remove_tree, unregister_cleanup
from .visit import process_visit  # noqa: F401 - the batch API
from .visit_outputs import DIA_SOURCE_DATASET, VisitRecord, verify_outputs

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
STATUSES = ("done", "skipped", "failed")

# --------------------------------------------------------------------------- the graph


def build_batch_graph(specs: Sequence[VisitSpec], config: PipelineConfig, out_dir, *, run_id: str = "",
                      grids: dict | None = None) -> dict:
    """The batch's task graph (``{key: task}``): the union of every visit's graph.

    See :func:`diffim_dag.visit.visit_graph` for the stages and keys (``(stage, visit, detector[,
    index...])``); the result of ``("write", visit, detector)`` is the visit's record.  The tasks
    hold paths, the frozen config, the output folder and tile/cell indices only: no pixels travel
    through the client or sit in the graph.  The science headers are read here for the tile and
    cell counts (``grids`` may give them instead, keyed by (visit, detector)).
    """
    from .visit import batch_graph

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
        remove_tree(tmp)


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
    (:func:`build_batch_graph`: per visit, one task per stage and per tile, and one per 64 kernel cells) run on
    ``client``, or on ``scheduler`` (``tcp://HOST:PORT`` or ``kubernetes://...``), or on a new
    LocalCluster with one worker per core.  The records are collected from the visits'
    ``("write", visit, detector)`` tasks as they finish.  Every task that raises is retried
    ``retries`` times (transient errors); permanent ones are recorded and the batch carries on.
    """
    from .cluster import as_completed, dashboard_link, open_client, performance_report, scheduler_for
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
            link = ""
            if client is None:
                target = scheduler_for(scheduler, config.cluster)
                client = stack.enter_context(open_client(target, config.cluster, n_workers=n_workers))
                # a new LocalCluster serves a dashboard only when cluster.dashboard asks for one (its scheduler's
                # HTTP server, and so its link, is there either way); a scheduler of the user's has its own
                if progress and (target is not None or config.cluster.dashboard):
                    link = dashboard_link(client)
            if link:
                (stream if stream is not None else sys.stderr).write(f"Dask dashboard: {link}\n")
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
