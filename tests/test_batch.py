"""Survey-scale batches: manifests, the batch graph, `diffim-dag run` on a LocalCluster and on a real
scheduler with a worker killed mid-run, permanent/transient failures, reruns that rewrite nothing.

Size: the two acceptance batches (40 visits on a LocalCluster; a real scheduler with a worker killed)
run on the issue's 1024² visits; the graph, failure and rerun checks use 256² visits to keep CI short.
The simulated templates share the science grid (``template_offset=(0, 0)``) except in the
template-store and warp checks.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split

from diffim_dag import cluster as cluster_setup
from diffim_dag import visit
from diffim_dag.batch import (
    OUTPUTS_MANIFEST,
    VisitSpec,
    build_batch_graph,
    read_dia_source_dataset,
    read_manifest,
    run_batch,
    simulate_batch,
    verify_outputs,
    visit_dir,
    write_manifest,
)
from diffim_dag.cli import main
from diffim_dag.config import ClusterConfig, PipelineConfig, load_config
from diffim_dag.errors import InputError
from diffim_dag.graph import run_token, stage_of, write_key

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "al.yaml"
SIZE = 256
N_VISITS, N_DETECTORS = 20, 2
# 100 stars per 256² (the default density gives ~25, too few kernel sources for some seeds)
SAME_GRID = {"template_offset": (0.0, 0.0), "n_stars": 100}


@pytest.fixture(scope="module")
def inputs40_1024(tmp_path_factory) -> Path:
    """20 visits × 2 detectors of simulated 1024² pairs (the issue's size) and their manifest."""
    root = tmp_path_factory.mktemp("batch_inputs_1024")
    return simulate_batch(root, n_visits=N_VISITS, n_detectors=N_DETECTORS, size=1024, seed=12,
                          sim_overrides={"template_offset": (0.0, 0.0)})


@pytest.fixture(scope="module")
def inputs40(tmp_path_factory) -> Path:
    """20 visits × 2 detectors of simulated 256² pairs and their manifest."""
    root = tmp_path_factory.mktemp("batch_inputs")
    return simulate_batch(root, n_visits=N_VISITS, n_detectors=N_DETECTORS, size=SIZE, seed=11,
                          sim_overrides=SAME_GRID)


def _files_state(out: Path) -> dict[str, tuple[int, int]]:
    """path → (mtime_ns, inode) of every output file except the run report."""
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino)
            for p in out.rglob("*") if p.is_file() and p.name != "run_report.json"}


def _check_complete_batch(out: Path, specs, report: dict) -> None:
    assert report["n_visits"] == len(specs)
    assert len({e["key"] for e in report["entries"]}) == len(specs)
    assert report["counts"] == {"done": len(specs), "skipped": 0, "failed": 0}
    run_ids = set()
    for s in specs:
        m = verify_outputs(out, s.visit, s.detector, checksums=True)
        assert m is not None, s.key
        run_ids.add(m["run_id"])
        folder = visit_dir(out, s.visit, s.detector)
        for name in ("difference.fits", "matched_template.fits", "kernel.fits", "dia_sources.parquet",
                     "metrics.json", OUTPUTS_MANIFEST):
            assert (folder / name).is_file(), folder / name
        metrics = json.loads((folder / "metrics.json").read_text())
        timings = metrics["timings_s"]
        for stage in ("read", "template_warp", "kernel_fit", "detect_measure", "write"):
            assert timings[stage] >= 0, stage
        assert any("convol" in k for k in timings) and len(timings) >= 7, timings
        assert metrics["visit"] == s.visit and metrics["detector"] == s.detector
    assert run_ids == {report["run_id"]}
    # no half-written folder left behind
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    entries = {e["key"]: e for e in report["entries"]}
    # the DiaSource dataset: partitioned by visit, readable by pandas and dask.dataframe
    df = read_dia_source_dataset(out)
    assert sorted(int(v) for v in df["visit"].unique()) == sorted({s.visit for s in specs})
    for (v, d), grp in df.groupby([df["visit"].astype(int), "detector"]):
        assert int((~grp["sky_source"]).sum()) == entries[f"visit-{v}-det-{d}"]["n_dia_sources"]
    per_visit = pd.concat([pd.read_parquet(visit_dir(out, s.visit, s.detector) / "dia_sources.parquet")
                           for s in specs])
    assert len(df) == len(per_visit)
    assert int((~df["sky_source"]).sum()) == report["n_dia_sources"] > 0
    ddf = read_dia_source_dataset(out, engine="dask")
    assert ddf.npartitions >= len({s.visit for s in specs})
    assert len(ddf) == len(df)
    assert ddf["visit"].astype(int).nunique().compute() == len({s.visit for s in specs})
    assert (Path(out) / "dia_sources" / f"visit={specs[0].visit}").is_dir()


# --------------------------------------------------------------------------- manifests and the graph


def test_manifest_relative_paths_store_and_errors(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "m.csv").write_text(
        "visit,detector,science,template,science_psf\n"
        "1,0,raw/a.fits,tmpl/a.fits,psf/a.fits\n"
        "1,1,raw/b.fits,store:store,\n"
        "2,0,/abs/c.fits,store,\n")
    specs = read_manifest(tmp_path / "m.csv")
    assert [s.key for s in specs] == ["visit-1-det-0", "visit-1-det-1", "visit-2-det-0"]
    assert specs[0].science == str(tmp_path / "raw" / "a.fits")
    assert specs[0].science_options == (("psf", str(tmp_path / "psf" / "a.fits")),)
    assert specs[1].template is None and specs[1].template_store == str(tmp_path / "store")
    assert specs[2].science == "/abs/c.fits" and specs[2].template_store == str(tmp_path / "store")
    # round trip
    write_manifest(specs, tmp_path / "again.csv")
    assert read_manifest(tmp_path / "again.csv") == specs

    (tmp_path / "bad.csv").write_text("visit,science,template\n1,a.fits,b.fits\n")
    with pytest.raises(InputError, match="detector"):
        read_manifest(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("visit,detector,science,template\n1,0,a,b\n1,0,c,d\n")
    with pytest.raises(InputError, match="line 3.*repeats line 2"):
        read_manifest(tmp_path / "dup.csv")
    (tmp_path / "nonint.csv").write_text("visit,detector,science,template\nabc,0,a,b\n")
    with pytest.raises(InputError, match="'visit' must be an integer"):
        read_manifest(tmp_path / "nonint.csv")


def _arrays_in(obj) -> list[int]:
    """nbytes of every numpy array pickled as part of ``obj``."""
    arrays = []

    class Finder(pickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, np.ndarray):
                arrays.append(o.nbytes)
            return NotImplemented

    Finder(io.BytesIO(), protocol=5).dump(obj)
    return arrays


def test_batch_graph_of_100_visits_is_small_and_has_no_pixels(inputs40, tmp_path):
    import cloudpickle

    config = load_config(PIPELINE)
    # 100 visits whose science headers are readable here (the 40 simulated 256² pairs, repeated):
    # one task per stage, per kernel cell and per tile, counted from the NAXIS cards
    real = read_manifest(inputs40)
    specs = [VisitSpec(visit=7000 + i, detector=0, science=real[i % len(real)].science,
                       template=real[i % len(real)].template) for i in range(100)]
    t0 = time.perf_counter()
    graph = build_batch_graph(specs, config, tmp_path / "out", run_id="r1")
    blob = cloudpickle.dumps(graph)
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert len(blob) < 2_000_000
    assert max(_arrays_in(graph), default=0) <= 1024  # no pixels in the graph
    per_visit = {}
    token = run_token("r1")
    for key in graph:
        assert isinstance(key, tuple) and isinstance(key[0], str) and all(isinstance(k, int) for k in key[1:])
        assert key[0].endswith("-" + token)  # every key carries the run's token
        per_visit.setdefault(key[1:3], []).append((stage_of(key), *key[1:]))
    assert set(per_visit) == {(s.visit, 0) for s in specs}
    # 256² at tile 1024 and cell 128: one tile, 2 × 2 kernel cells in one fit-cell task
    assert sorted(per_visit[(7000, 0)]) == sorted([
        ("inputs", 7000, 0), ("prepare", 7000, 0),
        ("kernel-sources", 7000, 0), ("fit-cell", 7000, 0, 0), ("input-noise", 7000, 0, 0), ("input-noise", 7000, 0, 1),
        ("spatial-solve", 7000, 0), ("decorrelation-kernel", 7000, 0),
        ("window", 7000, 0, 0, 0), ("subtract", 7000, 0, 0, 0), ("decorrelate", 7000, 0, 0, 0),
        ("difference", 7000, 0), ("quality", 7000, 0), ("detect-prepare", 7000, 0), ("detect", 7000, 0, 0, 0), ("catalog", 7000, 0),
        ("result", 7000, 0), ("write", 7000, 0)])
    # stable keys within a run; another run over the same visits shares none (nor their results on a
    # shared scheduler), while the dashboard still groups both by stage
    assert list(build_batch_graph(specs, config, tmp_path / "out", run_id="r1")) == list(graph)
    other = build_batch_graph(specs, config, tmp_path / "out", run_id="r2")
    assert len(other) == len(graph) and not set(other) & set(graph)
    assert sorted(key_split(k) for k in other) == sorted(key_split(k) for k in graph) == sorted(
        stage_of(k) for k in graph)

    # paths this machine cannot read (the workers may): one task for all tiles and one for all cells
    fake = [VisitSpec(visit=5000 + i // 2, detector=i % 2, science=f"/data/raw/{i}.fits",
                      template=f"/data/templates/{i}.fits") for i in range(200)]
    t0 = time.perf_counter()
    graph100 = build_batch_graph(fake[:100], config, tmp_path / "out", run_id="r1")
    blob100 = cloudpickle.dumps(graph100)
    assert time.perf_counter() - t0 < 2.0
    assert len(blob100) < 2_000_000
    assert max(_arrays_in(graph100), default=0) <= 1024
    assert {k for k in graph100 if stage_of(k) == "write"} == {write_key(s.visit, s.detector, "r1") for s in fake[:100]}
    # the graph grows linearly with the number of visits (no shared pixel payload hidden in it)
    blob200 = cloudpickle.dumps(build_batch_graph(fake, config, tmp_path / "out"))
    assert len(blob200) < 2.5 * len(blob100)


# --------------------------------------------------------------------------- 20 visits × 2 detectors


@pytest.mark.acceptance
def test_run_40_visits_on_a_local_cluster(inputs40_1024, tmp_path, capsys):
    inputs40 = inputs40_1024
    out = tmp_path / "out"
    html = tmp_path / "perf.html"
    rc = main(["run", str(PIPELINE), "--manifest", str(inputs40), "--out", str(out), "--workers", "2",
               "--report", str(html)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    specs = read_manifest(inputs40)
    from diffim_dag.visit import input_shape

    assert input_shape(specs[0]) == (1024, 1024)
    _check_complete_batch(out, specs, report)
    assert report["n_workers"] == 2
    assert report["throughput_visits_per_minute"] > 0
    for e in report["entries"]:
        assert e["status"] == "done" and e["wall_s"] > 0 and e["outputs"]["difference"].startswith(
            f"visit={e['visit']}/detector={e['detector']}/")
    assert "40 visits: 40 done, 0 skipped, 0 failed" in captured.out
    assert "visits/min" in captured.out
    assert "visit-" not in captured.out.splitlines()[0] and captured.out.splitlines()[0].split()[:3] == [
        "visit", "detector", "status"]
    assert "40/40 visits" in captured.err  # the progress bar
    assert html.is_file()
    text = html.read_text()
    assert all(stage in text for stage in ("fit-cell", "spatial-solve", "subtract", "catalog", "write"))


def _start(cmd, env, log):
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc):
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.acceptance
def test_run_against_a_scheduler_with_a_worker_killed(inputs40_1024, tmp_path):
    inputs40 = inputs40_1024
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    dask_bin = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker_bin = [sys.executable, "-m", "distributed.cli.dask_worker"]
    sched_file = tmp_path / "scheduler.json"
    out = tmp_path / "out"
    logs = open(tmp_path / "cluster.log", "wb")
    scheduler = run = None
    workers: list = []
    try:
        scheduler = _start([*dask_bin, "--host", "127.0.0.1", "--port", "0", "--scheduler-file", str(sched_file),
                            "--no-dashboard", "--idle-timeout", "180s"], env, logs)  # exits by itself if pytest is killed
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            # no nanny: killing the process kills the worker for good
            workers.append(_start([*worker_bin, "--scheduler-file", str(sched_file), "--nthreads", "1",
                                   "--no-nanny", "--no-dashboard", "--name", f"w{i}", "--host", "127.0.0.1",
                                   "--death-timeout", "60"],
                                  env, logs))
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=60)
        run = subprocess.Popen([sys.executable, "-m", "diffim_dag.cli", "run", str(PIPELINE), "--manifest",
                                str(inputs40), "--out", str(out), "--scheduler", address, "--no-progress"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # kill one worker while tasks run: after a few visits are in place, before the end
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None:
            if len(list(out.glob("visit=*/detector=*/" + OUTPUTS_MANIFEST))) >= 4:
                break
            time.sleep(0.1)
        assert run.poll() is None, "the batch finished before a worker could be killed"
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        done_at_kill = len(list(out.glob("visit=*/detector=*/" + OUTPUTS_MANIFEST)))
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        assert done_at_kill < N_VISITS * N_DETECTORS
        report = json.loads((out / "run_report.json").read_text())
        _check_complete_batch(out, read_manifest(inputs40), report)
        assert report["scheduler"] == address
        workers_used = {e["worker"] for e in report["entries"]}
        assert len(workers_used) == 2  # both workers ran visits, the killed one before it died
    finally:
        _stop(run)
        for w in workers:
            _stop(w)
        _stop(scheduler)
        logs.close()


# --------------------------------------------------------------------------- failures and reruns


@pytest.fixture(scope="module")
def mixed_manifest(inputs40, tmp_path_factory) -> Path:
    """20 visits: 15 good, 3 corrupt inputs, 2 without template coverage (a far template, a far store)."""
    from diffim_dag.sim import SimConfig, simulate_pair, write_pair

    root = tmp_path_factory.mktemp("mixed")
    good = read_manifest(inputs40)[:15]
    specs = [VisitSpec(visit=2000 + i, detector=0, science=s.science, template=s.template)
             for i, s in enumerate(good)]
    sample = Path(good[0].science).read_bytes()
    (root / "truncated.fits").write_bytes(sample[: len(sample) // 2])
    (root / "junk.fits").write_bytes(b"this is not FITS\n" * 100)
    specs.append(VisitSpec(visit=2015, detector=0, science=str(root / "truncated.fits"), template=good[0].template))
    specs.append(VisitSpec(visit=2016, detector=0, science=str(root / "junk.fits"), template=good[1].template))
    specs.append(VisitSpec(visit=2017, detector=0, science=good[2].science, template=str(root / "missing.fits")))
    # a template of another patch of sky (1 degree away): no coverage
    far = simulate_pair(SimConfig(size=SIZE, seed=99, sky_subtracted=True, ra=151.0, n_stars=100))
    far_paths = write_pair(far, root / "far")
    (root / "far_store").mkdir()
    os.link(far_paths["template"], root / "far_store" / "patch.fits")
    specs.append(VisitSpec(visit=2018, detector=0, science=good[3].science, template=str(far_paths["template"])))
    specs.append(VisitSpec(visit=2019, detector=0, science=good[4].science, template_store=str(root / "far_store")))
    return write_manifest(specs, root / "manifest.csv")


@pytest.mark.acceptance
def test_failures_are_reported_and_a_rerun_rewrites_nothing(mixed_manifest, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", str(PIPELINE), "--manifest", str(mixed_manifest), "--out", str(out), "--workers", "2"]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 1
    report = json.loads((out / "run_report.json").read_text())
    assert report["counts"] == {"done": 15, "skipped": 0, "failed": 5}
    failed = {e["visit"]: e for e in report["entries"] if e["status"] == "failed"}
    assert sorted(failed) == [2015, 2016, 2017, 2018, 2019]
    assert "truncated.fits" in failed[2015]["reason"] and failed[2015]["error"] == "InputError"
    assert "not a FITS file" in failed[2016]["reason"]
    assert "missing.fits: no such file" in failed[2017]["reason"]
    for v in (2018, 2019):
        assert failed[v]["error"] == "NoWorkFound", failed[v]
    for e in failed.values():
        assert "transient" not in e["reason"]  # permanent: reported, not retried
        assert not visit_dir(out, e["visit"], 0).exists()
    specs = read_manifest(mixed_manifest)
    for s in specs[:15]:
        assert verify_outputs(out, s.visit, s.detector) is not None
    assert "20 visits: 15 done, 0 skipped, 5 failed" in captured.out
    for v in failed:
        assert any(line.split()[:3] == [str(v), "0", "failed"] for line in captured.out.splitlines())
    assert len(read_dia_source_dataset(out)["visit"].unique()) == 15

    before = _files_state(out)
    sums = {s.key: verify_outputs(out, s.visit, s.detector)["files"] for s in specs[:15]}
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 1
    report2 = json.loads((out / "run_report.json").read_text())
    assert report2["counts"] == {"done": 0, "skipped": 15, "failed": 5}
    assert report2["run_id"] != report["run_id"]
    assert _files_state(out) == before  # nothing rewritten (mtimes and inodes unchanged)
    assert {s.key: verify_outputs(out, s.visit, s.detector)["files"] for s in specs[:15]} == sums
    assert "20 visits: 0 done, 15 skipped, 5 failed" in captured.out

    # a damaged output is noticed and only that visit is redone
    victim = visit_dir(out, specs[0].visit, 0) / "difference.fits"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    report3 = run_batch(specs[:15], load_config(PIPELINE), out, n_workers=1, progress=False)
    assert report3.count("done") == 1 and report3.count("skipped") == 14
    assert verify_outputs(out, specs[0].visit, 0) is not None


# --------------------------------------------------------------------------- retries (in-process workers)


@pytest.fixture
def thread_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


def test_transient_errors_are_retried_permanent_ones_are_not(inputs40, tmp_path, monkeypatch, thread_client):
    specs = read_manifest(inputs40)[:3]
    real = visit.read_input
    calls: dict[str, int] = {}

    def flaky(spec, role):  # the reading step of each visit's ("read", V, D, i) tasks
        if role != "science":
            return real(spec, role)
        calls[spec.key] = calls.get(spec.key, 0) + 1
        if spec.visit == specs[0].visit and spec.detector == specs[0].detector and calls[spec.key] <= 2:
            raise OSError("NFS hiccup")  # transient: twice, then fine
        if spec.key == specs[1].key:
            raise OSError("disk on fire")  # transient forever
        if spec.key == specs[2].key:
            raise InputError(f"{spec.science}: broken")  # permanent
        return real(spec, role)

    monkeypatch.setattr(visit, "read_input", flaky)
    report = run_batch(specs, PipelineConfig(), tmp_path / "out", client=thread_client, retries=2, progress=False)
    status = {r.key: r for r in report.records}
    assert status[specs[0].key].status == "done" and calls[specs[0].key] == 3
    assert status[specs[1].key].status == "failed" and calls[specs[1].key] == 3
    assert "disk on fire" in status[specs[1].key].reason and "transient" in status[specs[1].key].reason
    assert status[specs[2].key].status == "failed" and calls[specs[2].key] == 1
    assert status[specs[2].key].error == "InputError"
    assert not report.ok
    assert verify_outputs(tmp_path / "out", specs[0].visit, specs[0].detector) is not None
    assert not visit_dir(tmp_path / "out", specs[1].visit, specs[1].detector).exists()


def test_warp_and_template_store_in_a_batch(tmp_path, thread_client):
    """A shifted template (warped on the worker) and the same template named as a store."""
    manifest = simulate_batch(tmp_path / "in", n_visits=1, n_detectors=1, size=SIZE, seed=5,
                              sim_overrides={"n_stars": 100})
    (spec,) = read_manifest(manifest)
    store = tmp_path / "store"
    store.mkdir()
    os.link(spec.template, store / "patch.fits")
    specs = [spec, VisitSpec(visit=spec.visit + 1, detector=0, science=spec.science, template_store=str(store))]
    report = run_batch(specs, PipelineConfig(), tmp_path / "out", client=thread_client, progress=False)
    assert [r.status for r in report.records] == ["done", "done"], [r.reason for r in report.records]
    for s in specs:
        m = json.loads((visit_dir(tmp_path / "out", s.visit, 0) / "metrics.json").read_text())
        assert m["template"]["warped"] is True
        assert m["template"]["template_source"] == ("exposure" if s.template else "store")


def test_kubernetes_scheduler_needs_dask_kubernetes(inputs40, tmp_path, monkeypatch, capsys):
    import types

    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    rc = main(["run", str(PIPELINE), "--manifest", str(inputs40), "--out", str(tmp_path / "o"),
               "--scheduler", "kubernetes://diffim?n_workers=3"])
    assert rc == 2
    assert "dask-kubernetes is not installed" in capsys.readouterr().err

    made = {}

    class FakeKubeCluster:
        def __init__(self, **kwargs):
            made.update(kwargs)

    fake = types.ModuleType("dask_kubernetes.operator")
    fake.KubeCluster = FakeKubeCluster
    monkeypatch.setitem(sys.modules, "dask_kubernetes", types.ModuleType("dask_kubernetes"))
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", fake)
    cluster_setup.kubernetes_cluster("kubernetes://survey?n_workers=3&image=reg/diffim:1&resources_memory=8Gi",
                                     PipelineConfig().cluster)
    assert made["name"] == "survey" and made["n_workers"] == 3 and made["image"] == "reg/diffim:1"
    assert made["resources"]["limits"] == {"memory": "8Gi"}
    assert made["env"]["DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING"] == "False"  # (its scheduler pod's config)
    # a DaskJob sets DASK_SCHEDULER_ADDRESS for its client pod: the run connects there
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert cluster_setup.scheduler_for(None, PipelineConfig().cluster) == "tcp://10.0.0.1:8786"
    assert cluster_setup.scheduler_for("tcp://h:1", PipelineConfig().cluster) == "tcp://h:1"


def test_orphaned_temporary_folders_of_the_run_are_removed(tmp_path):
    """A worker killed mid-write leaves ``.detector=D.tmp-<run>-<uuid>``; the run removes its own, not others'."""
    from diffim_dag.batch import _remove_orphans

    mine = tmp_path / "visit=1" / ".detector=0.tmp-RUN1-abc"
    other = tmp_path / "visit=1" / ".detector=1.tmp-RUN2-def"
    for d in (mine, other):
        d.mkdir(parents=True)
        (d / "difference.fits").write_bytes(b"partial")
    _remove_orphans(tmp_path, "RUN1")
    assert not mine.exists() and other.is_dir()


def test_a_local_cluster_serves_a_dashboard_only_when_asked_and_run_prints_its_link(inputs40, tmp_path):
    """No dashboard by default (its server took 0.35 s of every start-up, at a port nothing printed);
    ``cluster.dashboard`` asks for one, and ``run`` prints where it is."""
    import urllib.error
    import urllib.request

    from diffim_dag.cluster import dashboard_link, make_client

    def status_page(link: str) -> int:
        try:
            with urllib.request.urlopen(link, timeout=30) as page:
                return page.status
        except urllib.error.HTTPError as err:
            return err.code

    started, profiled, stealing = {}, {}, {}
    for asked in (None, "127.0.0.1:0"):
        client, cluster = make_client(None, n_workers=1, dashboard_address=asked)
        try:  # the scheduler's HTTP server answers either way; the dashboard's page only when asked for
            started[asked] = status_page(dashboard_link(client))
            # the workers' statistical profiler (the dashboard's Profile page) runs only with a dashboard
            profiled[asked] = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
            stealing[asked] = client.run_on_scheduler(lambda dask_scheduler: "stealing" in dask_scheduler.extensions)
            # every server's event loop ticks every 500 ms, not Dask's 20 ms (cluster.event_loop_tick)
            ticks = {*client.run(lambda dask_worker: dask_worker._tick_interval).values(),
                     client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval),
                     *(nanny._tick_interval for nanny in cluster.workers.values())}
            assert ticks == {0.5}, ticks
        finally:
            client.close()
            cluster.close()
    assert started == {None: 404, "127.0.0.1:0": 200}
    assert [list(p.values()) for p in profiled.values()] == [[False], [True]]
    assert stealing == {None: False, "127.0.0.1:0": False}  # (cluster.work_stealing)
    stream = io.StringIO()
    config = PipelineConfig(cluster=ClusterConfig(n_workers=1, dashboard="127.0.0.1:0"))
    report = run_batch(read_manifest(inputs40)[:1], config, tmp_path / "out", stream=stream)
    assert report.ok
    link = [line for line in stream.getvalue().splitlines() if line.startswith("Dask dashboard: ")]
    assert len(link) == 1 and link[0].split(": ", 1)[1].startswith("http://127.0.0.1:"), stream.getvalue()


def test_worker_profiling_follows_the_dashboard_unless_the_users_dask_config_says(monkeypatch):
    import dask

    from diffim_dag.cluster import worker_profiling

    monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", raising=False)
    assert (worker_profiling(None), worker_profiling("127.0.0.1:0")) == (False, True)
    with dask.config.set({"distributed.worker.profile.enabled": False}):  # turned off in this process
        assert worker_profiling("127.0.0.1:0") is False
    for stated, expected in (("True", True), ("False", False)):  # the user's environment (or config files)
        monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", stated)
        assert (worker_profiling(None), worker_profiling("127.0.0.1:0")) == (expected, expected)


def test_work_stealing_is_off_unless_the_users_dask_config_says(monkeypatch):
    """A new LocalCluster's scheduler does not steal (a stolen task takes its visit's planes along), unless the
    user's environment or config files turn it on."""
    from diffim_dag.cluster import WORK_STEALING, work_stealing

    monkeypatch.delenv("DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING", raising=False)
    assert WORK_STEALING == "distributed.scheduler.work-stealing"
    assert work_stealing() is False
    for stated, expected in (("True", True), ("False", False), ("true", True), ("off", False)):
        monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING", stated)
        assert work_stealing() is expected, stated


def test_event_loops_tick_every_500_ms_unless_the_users_dask_config_says(monkeypatch):
    from diffim_dag.cluster import TICK_INTERVAL, event_loop_tick

    monkeypatch.delenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", raising=False)
    assert TICK_INTERVAL == "distributed.admin.tick.interval"
    assert event_loop_tick() == "500ms"
    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "20ms")
    assert event_loop_tick() == "20ms"


def test_local_cluster_workers_are_forked_with_the_task_modules_loaded_unless_the_users_config_says(monkeypatch):
    """A new LocalCluster's workers are forked from a server that imported distributed and every task module once
    (not spawned as new interpreters that import them again): a worker starts with them loaded, in the workers'
    environment, and then freezes its objects out of the garbage collector's passes.  The user's Dask config can
    name another start method."""
    import multiprocessing

    from diffim_dag import cluster as cluster_module
    from diffim_dag.cluster import START_METHOD, make_client, task_module_names, worker_start_method

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork server on this platform")
    monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", raising=False)
    assert START_METHOD == "distributed.worker.multiprocessing-method"
    assert worker_start_method() == "forkserver"
    names = task_module_names()
    assert {"diffim_dag.stages.al", "diffim_dag.kernels.convolve", "diffim_dag.io.fits"} <= set(names)

    def probe():
        import gc
        import time

        missing = [name for name in names if name not in sys.modules]  # (before the start-up hook's thread imports)
        deadline = time.monotonic() + 30
        while not gc.get_freeze_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getppid(), missing, os.environ.get("OMP_NUM_THREADS"), gc.get_freeze_count()

    client, cluster = make_client(None, n_workers=1)
    try:
        [(parent, missing, threads, frozen)] = client.run(probe).values()
    finally:
        client.close()
        cluster.close()
    assert parent != os.getpid()  # (a spawned worker's parent is this process, its nanny's)
    assert missing == []
    assert threads == "1"
    assert frozen > 10_000
    monkeypatch.setenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "spawn")
    assert worker_start_method() == "spawn"
    monkeypatch.delenv("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD")

    def no_socket():
        raise OSError("No space left on device")

    monkeypatch.setattr(cluster_module, "start_worker_server", no_socket)  # the workers are then spawned
    assert cluster_module.prepare_local_workers() == "spawn"


def test_the_workers_fork_server_ends_without_the_interpreters_teardown(tmp_path):
    """The fork server (which holds the command's standard streams) exits at once when the command has ended:
    imported among its preloads, the cluster module makes its exit ``os._exit``, so the exit handlers registered
    before it and the teardown never run.  Without the cluster module among the preloads, they do (the check can
    fail); imported anywhere else, the module changes nothing."""
    import multiprocessing

    from diffim_dag import cluster as cluster_module

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork server on this platform")
    assert cluster_module._exit_fork_server_at_once() is False  # (this process is no fork server)
    (tmp_path / "teardown_marker.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda path=os.environ['TEARDOWN_MARKER']: open(path, 'w').close())\n")
    script = ("import multiprocessing, sys\n"
              "from multiprocessing import forkserver\n"
              "multiprocessing.get_context('forkserver').set_forkserver_preload(sys.argv[1:])\n"
              "forkserver.ensure_running()\n"
              "forkserver._forkserver._stop()\n")  # (closes the pipe the server watches, and waits for its end)
    for preload, torn_down in ((["teardown_marker"], True), (["teardown_marker", "diffim_dag.cluster"], False)):
        marker = tmp_path / f"torn_down_{len(preload)}"
        env = {**os.environ, "TEARDOWN_MARKER": str(marker),
               "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", script, *preload], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert marker.exists() is torn_down, preload


def test_local_cluster_workers_log_a_failed_heartbeat_without_its_traceback(tmp_path):
    """A restarted worker whose heartbeat meets the closing scheduler logs one line, not a traceback (the workers'
    start-up hook installs the filter, after the preloads the user's Dask config names)."""
    import logging

    import dask

    from diffim_dag.cluster import HeartbeatWithoutTraceback, make_client

    users = tmp_path / "users_preload.py"
    users.write_text("def dask_setup(worker):\n    worker.users_preload_ran = True\n")
    with dask.config.set({"distributed.worker.preload": [str(users)]}):
        client, cluster = make_client(None, n_workers=1)
    try:
        filters = client.run(lambda: [type(f).__name__ for f in logging.getLogger("distributed.worker").filters])
        users_ran = client.run(lambda dask_worker: getattr(dask_worker, "users_preload_ran", False))
    finally:
        client.close()
        cluster.close()
    assert list(filters.values()) == [["HeartbeatWithoutTraceback"]]
    assert list(users_ran.values()) == [True]
    stream = io.StringIO()
    logger = logging.getLogger("diffim_dag.test_heartbeat")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(HeartbeatWithoutTraceback())
    try:
        for message in ("Failed to communicate with scheduler during heartbeat.", "Unexpected exception"):
            try:
                raise OSError("Stream is closed")
            except OSError:
                logger.exception(message)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Failed to communicate with scheduler during heartbeat."
    assert lines[1] == "Unexpected exception" and "Traceback" in lines[2]  # other records keep theirs


@pytest.mark.parametrize("status, skips_teardown", [("closed", True), ("running", False)])
def test_a_closed_worker_process_ends_without_the_interpreter_teardown(tmp_path, status, skips_teardown):
    """The exit handler the workers' start-up hook registers ends a closed worker's process at once (exit status 0):
    the exit handlers registered before it (the libraries') and the module teardown are skipped.  A worker that did
    not close (its process is ending on an error) exits as usual, with its own status."""
    marker = tmp_path / "earlier_handler_ran"
    script = (
        "import atexit, sys\n"
        "from distributed.core import Status\n"
        "from diffim_dag.cluster import end_closed_worker_process\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "class Worker:\n"
        f"    status = Status.{status}\n"
        "atexit.register(end_closed_worker_process, Worker())\n"
        "print('done', flush=True)\n"
        "sys.exit(3)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "done", run.stderr
    assert run.returncode == (0 if skips_teardown else 3)
    assert marker.exists() != skips_teardown


def test_local_cluster_workers_import_the_task_modules_at_start():
    """A new LocalCluster worker loads the stages in the background as it starts, before any task asks for them."""
    client, cluster = cluster_setup.make_client(None, n_workers=1)
    wanted = ("diffim_dag.visit", "diffim_dag.stages.al", "diffim_dag.stages.detect", "diffim_dag.psf.estimate",
              "diffim_dag.kernels.warp", "diffim_dag.io.fits")
    try:
        deadline = time.monotonic() + 60
        while True:
            loaded = list(client.run(lambda: [m for m in wanted if m in sys.modules]).values())[0]
            if len(loaded) == len(wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        client.close()
        cluster.close()
    assert loaded == list(wanted)
