"""The task graph of one (visit, detector) (``diffim_dag.visit.visit_graph``): keys, failures, and results
equal to the in-process subtraction.

One simulated 300² pair with tiles of 128 px, detection's too (3 × 3 tiles, the last row and column ragged), and
kernel cells of 64 px (5 × 5 cells), so that every tile stage has neighbours and the cell fits are spread over tasks.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest

from diffim_dag.batch import VisitSpec, build_batch_graph, read_manifest, run_batch, simulate_batch, visit_dir
from diffim_dag.config import load_config
from diffim_dag.errors import InputError
from diffim_dag.graph import AlreadyWritten, StageFailure, run_stage, stage_of, task_key, write_key
from diffim_dag.visit import (CELLS_PER_TASK, VisitGrid, input_shape, process_visit, read_visit_inputs, visit_graph,
                              visit_grid)
from diffim_dag.io import read_exposure
from diffim_dag.pipeline import subtract
from diffim_dag.stages.template import prepare_template

REPO = Path(__file__).resolve().parents[1]
SIZE, TILE, CELL = 300, 128, 64


def _config(method: str = "al", **decorrelation):
    config = load_config(REPO / "pipelines" / ("al.yaml" if method == "al" else f"{method}.yaml"))
    return dataclasses.replace(
        config,
        subtract=dataclasses.replace(config.subtract, tile_size=TILE),
        kernel=dataclasses.replace(config.kernel, cell_size=CELL),
        decorrelation=dataclasses.replace(config.decorrelation, **decorrelation),
        detection=dataclasses.replace(config.detection, n_sky_sources=20, tile_size=TILE),
    )


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> VisitSpec:
    root = tmp_path_factory.mktemp("visit_graph")
    manifest = simulate_batch(root, n_visits=1, n_detectors=1, size=SIZE, seed=11,
                              sim_overrides={"template_offset": (0.0, 0.0), "n_stars": 120})
    return read_manifest(manifest)[0]


@pytest.fixture(scope="module")
def inputs(spec):
    """The science and the template on its grid, as the graph's template stage makes them."""
    science, template = read_visit_inputs(spec)
    template, _ = prepare_template(science, template, min_coverage=0.1)
    return science, template


def _keys(dsk, stage):
    """The keys of ``stage``, written without the run token: ``(stage, V, D, index...)``."""
    return sorted((stage, *k[1:]) for k in dsk if stage_of(k) == stage)


def test_keys_name_stage_visit_detector_and_tile(spec, tmp_path):
    config = _config()
    assert input_shape(spec) == (SIZE, SIZE)
    grid = visit_grid(input_shape(spec), config)
    # 25 kernel cells, CELLS_PER_TASK to a task: one fit-cell task (a task per cell cost more than the fits)
    assert grid == VisitGrid(tiles=(3, 3), cells=max(1, 25 // CELLS_PER_TASK), shape=(SIZE, SIZE)) and grid.cells == 1
    dsk = visit_graph(spec, config, tmp_path, run_id="a")
    v, d = spec.visit, spec.detector
    tiles = [(ty, tx) for ty in range(3) for tx in range(3)]
    assert _keys(dsk, "fit-cell") == [("fit-cell", v, d, 0)]
    for stage in ("window", "subtract", "decorrelate", "detect"):
        assert _keys(dsk, stage) == [(stage, v, d, *t) for t in tiles]
    # a tile task reads its window, never the whole prepared pair
    for ty, tx in tiles:
        args = dsk[task_key("subtract", v, d, ty, tx, run_id="a")]
        assert [stage_of(a) for a in args if isinstance(a, tuple)] == ["window", "spatial-solve"]
    for stage in ("inputs", "prepare", "kernel-sources", "spatial-solve", "decorrelation-kernel", "difference",
                  "detect-prepare", "catalog", "result", "write"):
        assert _keys(dsk, stage) == [(stage, v, d)]
    # each input's noise needs no kernel: two tasks beside the source selection and cell fits, read by the
    # decorrelation kernel's task; the solve (which the tiles' convolutions wait for) does not wait for them
    assert _keys(dsk, "input-noise") == [("input-noise", v, d, 0), ("input-noise", v, d, 1)]
    solve = dsk[task_key("spatial-solve", v, d, run_id="a")]
    assert not any(stage_of(k) == "input-noise" for a in solve if isinstance(a, list) for k in a)
    decorrelation = dsk[task_key("decorrelation-kernel", v, d, run_id="a")]
    assert [stage_of(k) for k in decorrelation[-1]] == ["input-noise", "input-noise"]
    assert task_key("spatial-solve", v, d, run_id="a") in decorrelation
    for ty, tx in tiles:
        args = dsk[task_key("decorrelate", v, d, ty, tx, run_id="a")]
        assert [stage_of(a) for a in args if isinstance(a, tuple)] == ["window", "decorrelation-kernel"]
    # the residual metrics: a task beside detection, which the result task (the verdict) reads
    assert task_key("quality", v, d, run_id="a") in dsk[task_key("result", v, d, run_id="a")]
    assert len(dsk) == 10 + 1 + 4 * 9 + 2 + 1
    # fewer cells to a task: the cells are dealt out over several fit-cell tasks
    import diffim_dag.visit as visit_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(visit_module, "CELLS_PER_TASK", 4)
        spread = visit_graph(spec, config, tmp_path, run_id="a")
    assert _keys(spread, "fit-cell") == [("fit-cell", v, d, i) for i in range(25 // 4)]
    # on a cluster the input stages are one task, run in turn where it runs (the exposures stay on its worker)
    fused = dsk[task_key("inputs", v, d, run_id="a")][1]
    assert sorted({stage_of(k) for k in fused.dsk}) == ["exposure", "inputs", "read", "template"]
    # a single visit on this process's threads: the input stages as separate tasks (both reads, both
    # inputs' stages at once), a cell task per core, one detection task (its FFTs on every core)
    local = visit_grid(input_shape(spec), config, in_process=True)
    cores = min(os.cpu_count() or 1, 25)
    assert local == VisitGrid(tiles=(3, 3), cells=cores, shape=(SIZE, SIZE), detect=(1, 1))
    one = visit_graph(spec, config, tmp_path, grid=local, in_process=True)
    for stage in ("read", "exposure"):  # science, template
        assert _keys(one, stage) == [(stage, v, d, 0), (stage, v, d, 1)]
    assert _keys(one, "template") == [("template", v, d)]
    assert len(_keys(one, "fit-cell")) == cores and len(_keys(one, "detect")) == 1 and len(_keys(one, "subtract")) == 9
    # detection has tiles of its own size: on a cluster a detect task per detection tile
    coarse = dataclasses.replace(config, detection=dataclasses.replace(config.detection, tile_size=2 * TILE))
    assert visit_grid(input_shape(spec), coarse) == VisitGrid(tiles=(3, 3), cells=1, shape=(SIZE, SIZE), detect=(2, 2))
    assert _keys(visit_graph(spec, coarse, tmp_path), "detect") == [("detect", v, d, ty, tx) for ty in range(2)
                                                                    for tx in range(2)]
    # a decorrelate tile reads its neighbours' edges
    def deps(graph, *index, run_id="a"):
        task = graph[task_key("decorrelate", v, d, *index, run_id=run_id)]
        return sorted((stage_of(k), *k[1:]) for k in [a for a in task if isinstance(a, list)][0])

    assert deps(dsk, 1, 1) == [("subtract", v, d, ty, tx) for ty in range(3) for tx in range(3)]
    assert deps(dsk, 0, 0) == [("subtract", v, d, ty, tx) for ty in range(2) for tx in range(2)]
    assert deps(dsk, 2, 1) == [("subtract", v, d, ty, tx) for ty in (1, 2) for tx in range(3)]
    # a task grid coarser than the tiles (shape unknown): the neighbours wrap around it
    coarse = visit_graph(spec, config, tmp_path, grid=VisitGrid(tiles=(2, 2), cells=3))
    assert deps(coarse, 0, 0, run_id="") == [("subtract", v, d, ty, tx) for ty in range(2) for tx in range(2)]
    assert _keys(coarse, "fit-cell") == [("fit-cell", v, d, i) for i in range(3)]
    assert write_key(v, d) in coarse and stage_of(write_key(v, d)) == "write"
    # stable within a run (the same keys for another build); another run's keys are all different, so two
    # runs on one shared scheduler never share a task or its result
    assert list(visit_graph(spec, config, tmp_path, run_id="a")) == list(dsk)
    again = visit_graph(spec, config, tmp_path, run_id="b")
    assert len(again) == len(dsk) and not set(again) & set(dsk)
    assert sorted((stage_of(k), *k[1:]) for k in again) == sorted((stage_of(k), *k[1:]) for k in dsk)

    # spatially varying decorrelation runs on the whole difference: no per-tile decorrelate tasks
    sv = visit_graph(spec, _config(spatially_varying=True), tmp_path)
    assert not _keys(sv, "decorrelate") and _keys(sv, "subtract")
    # ZOGY: one subtract task, then the same detection tiles, catalogue and write; al-preconvolve: the AL
    # stages, the pre-convolution score (beside them: from the pair, not after the AL difference) and the score
    # task that joins the two
    zg = visit_graph(spec, _config("zogy"), tmp_path)
    assert sorted({stage_of(k) for k in zg}) == ["catalog", "detect", "detect-prepare", "inputs", "result", "subtract",
                                                 "write"]
    assert _keys(zg, "subtract") == [("subtract", v, d)]
    assert len(_keys(zg, "detect")) == 9
    pc = visit_graph(spec, _config("al-preconvolve"), tmp_path)
    assert {stage_of(k) for k in pc} == {stage_of(k) for k in dsk} | {"preconvolve", "score"}
    assert _keys(pc, "score") == [("score", v, d)] and len(_keys(pc, "subtract")) == 9
    (pre,) = [k for k in pc if stage_of(k) == "preconvolve"]
    needs = {stage_of(k) for k in pc if k in _flat(pc[pre])}
    assert needs == {"inputs"}
    (score,) = [k for k in pc if stage_of(k) == "score"]
    assert {stage_of(k) for k in pc if k in _flat(pc[score])} == {"difference", "preconvolve"}


def _flat(task) -> list:
    """Everything inside a task tuple: its arguments, and inside nested tuples and lists (a key is a tuple too)."""
    out = []
    for item in task if isinstance(task, (tuple, list)) else ():
        if isinstance(item, list):
            out.extend(_flat(item))
        elif isinstance(item, tuple):
            out += [item, *_flat(item)]
        else:
            out.append(item)
    return out


@pytest.mark.parametrize("method", ["al-preconvolve", "zogy"])
def test_a_batch_visit_of_a_score_method_equals_the_python_api(spec, inputs, tmp_path, method):
    """As below, for the score methods: on a worker their filters, convolutions and cells run through a runner
    with the worker's threads, cut into the same tiles as in process, so the score, the difference and the
    catalogue are the same bits (with a runner-less stage's whole-image filters the pre-convolution score
    differed by FFT rounding)."""
    config = _config(method)
    record = process_visit(spec, config, tmp_path / "out", run_id="r1")
    assert record["status"] == "done", record
    folder = visit_dir(tmp_path / "out", spec.visit, spec.detector)
    api = subtract(*inputs, config=config, detect=True)
    for name, exposure in (("score.fits", api.score), ("difference.fits", api.difference)):
        for a, b in zip(read_exposure(folder / name).arrays(), exposure.arrays()):
            np.testing.assert_array_equal(a, b)
    expected = api.dia_sources.copy()
    expected["visit"], expected["detector"] = spec.visit, spec.detector
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "dia_sources.parquet"), expected, check_dtype=False)


def test_a_batch_visit_equals_the_python_api(spec, inputs, tmp_path):
    """The visit's batch graph (run in turn here) writes the difference and catalogue that the Python API's
    graph of the same pair (on this process's threads, its in-process task grid) returns."""
    config = _config()
    record = process_visit(spec, config, tmp_path / "out", run_id="r1")
    assert record["status"] == "done", record
    folder = visit_dir(tmp_path / "out", spec.visit, spec.detector)
    written = read_exposure(folder / "difference.fits").arrays()
    catalog = pd.read_parquet(folder / "dia_sources.parquet")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"read", "template_warp", "kernel_fit", "convolve_subtract", "decorrelate", "detect_measure",
            "write"} <= set(metrics["timings_s"])

    science, template = inputs
    api = subtract(science, template, config=config, detect=True)
    for a, b in zip(written, api.difference.arrays()):
        np.testing.assert_array_equal(a, b)
    expected = api.dia_sources.copy()
    expected["visit"], expected["detector"] = spec.visit, spec.detector
    pd.testing.assert_frame_equal(catalog, expected, check_dtype=False)
    assert len(catalog) > 20 and (~catalog["sky_source"]).sum() >= 3

    # the grid only sets how many tasks share the work: one task for all tiles and cells (shape unknown), or a
    # task grid coarser than the tiles, gives the same result
    for i, grid in enumerate((VisitGrid(), VisitGrid(tiles=(2, 2), cells=3))):
        coarse = visit_graph(spec, config, tmp_path / f"coarse{i}", run_id="r2", grid=grid)
        assert len(_keys(coarse, "subtract")) == grid.tiles[0] * grid.tiles[1]
        assert len(_keys(coarse, "fit-cell")) == grid.cells
        assert dask.get(coarse, write_key(spec.visit, spec.detector, "r2"))["status"] == "done"
        folder2 = visit_dir(tmp_path / f"coarse{i}", spec.visit, spec.detector)
        for a, b in zip(read_exposure(folder2 / "difference.fits").arrays(), written):
            np.testing.assert_array_equal(a, b)
        pd.testing.assert_frame_equal(pd.read_parquet(folder2 / "dia_sources.parquet"), catalog)

    # the window of tile (1, 1) (a 128² core in the middle): the core grown by the kernel's half-width only
    dsk = visit_graph(spec, config, tmp_path / "w", run_id="r3")
    window, solved, kernel = dask.get(dsk, [task_key(s, spec.visit, spec.detector, *t, run_id="r3") for s, t in
                                            (("window", (1, 1)), ("spatial-solve", ()), ("decorrelation-kernel", ()))])
    h = solved.fit.solution.half_width
    assert window.cores == [(128, 256, 128, 256)] and window.origin == (128 - h, 128 - h)
    assert all(a.shape == (128 + 2 * h, 128 + 2 * h) for a in (*window.science, *window.template))
    # the window is cut from the solve, before the decorrelation kernel exists: it holds the input variances the
    # tiles' decorrelation reads, as a window cut from the whole kernel stage does
    from diffim_dag.stages import al

    assert solved.decorrelation_kernel is None and kernel.decorrelation_kernel is not None
    prepared = dask.get(dsk, task_key("prepare", spec.visit, spec.detector, run_id="r3"))
    whole = al.window_stage(prepared, kernel, window.cores)
    assert window.variances is not None and al.window_stage(prepared, solved, window.cores).variances is None
    for a, b in zip(window.variances, whole.variances):
        np.testing.assert_array_equal(a, b)

    # a rerun of the write task of the same run does not install again (exactly once)
    before = (folder / "_outputs.json").stat().st_mtime_ns
    again = dask.get(visit_graph(spec, config, tmp_path / "out", run_id="r1"), write_key(spec.visit, spec.detector, "r1"))
    assert again["status"] == "done" and again["reason"] == "written by an earlier attempt of this run"
    assert (folder / "_outputs.json").stat().st_mtime_ns == before


def test_batch_on_a_cluster_equals_the_in_process_subtraction(spec, inputs, tmp_path, monkeypatch):
    """The same visit as a batch on a (threaded) LocalCluster: tasks spread over two workers, the kernel cells
    over six fit-cell tasks."""
    from distributed import Client, LocalCluster

    import diffim_dag.visit as visit_module

    monkeypatch.setattr(visit_module, "CELLS_PER_TASK", 4)
    config = _config()
    assert len(_keys(build_batch_graph([spec], config, tmp_path / "g"), "fit-cell")) == 6
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            report = run_batch([spec], config, tmp_path / "out", client=client, progress=False)
    assert [r.status for r in report.records] == ["done"]
    folder = visit_dir(tmp_path / "out", spec.visit, spec.detector)
    science, template = inputs
    tiled = subtract(science, template, config=config, detect=True)
    for a, b in zip(read_exposure(folder / "difference.fits").arrays(), tiled.difference.arrays()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(read_exposure(folder / "matched_template.fits").arrays(), tiled.matched_template.arrays()):
        np.testing.assert_array_equal(a, b)
    expected = tiled.dia_sources.copy()
    expected["visit"], expected["detector"] = spec.visit, spec.detector
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "dia_sources.parquet"), expected, check_dtype=False)


@pytest.mark.parametrize("method", ["zogy", "al-preconvolve"])
def test_score_methods_detect_and_write_as_separate_tasks(spec, inputs, tmp_path, method):
    config = _config(method)
    record = process_visit(spec, config, tmp_path / "out", run_id="r1")
    assert record["status"] == "done", record
    folder = visit_dir(tmp_path / "out", spec.visit, spec.detector)
    assert (folder / "score.fits").is_file()
    science, template = inputs
    direct = subtract(science, template, config=config, detect=True)
    expected = direct.dia_sources.copy()
    expected["visit"], expected["detector"] = spec.visit, spec.detector
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "dia_sources.parquet"), expected, check_dtype=False)


def test_a_permanent_error_becomes_a_value_that_reaches_the_write_task(spec, tmp_path):
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"not FITS\n" * 50)
    bad = VisitSpec(visit=9, detector=1, science=str(junk), template=spec.template)
    assert input_shape(bad) is None
    config = _config()
    dsk = build_batch_graph([bad], config, tmp_path / "out", run_id="r")
    assert len(_keys(dsk, "subtract")) == 1  # shape unknown here: one task for all tiles
    catalog, record = dask.get(dsk, [task_key("catalog", 9, 1, run_id="r"), write_key(9, 1, "r")])
    assert isinstance(catalog, StageFailure) and catalog.stage == "read" and catalog.error == "InputError"
    assert record["status"] == "failed" and record["error"] == "InputError" and "junk.fits" in record["reason"]
    assert not visit_dir(tmp_path / "out", 9, 1).exists()

    # run_stage: permanent → value, transient → raised (the scheduler retries it), markers pass through
    def boom(exc):
        raise exc

    failure = run_stage("kernel-sources", 9, 1, boom, InputError("bad"))
    assert failure == StageFailure(stage="kernel-sources", visit=9, detector=1, error="InputError", reason="bad")
    with pytest.raises(OSError):
        run_stage("subtract", 9, 1, boom, OSError("NFS hiccup"))
    assert run_stage("catalog", 9, 1, boom, 1, [2, failure]) is failure
    done = AlreadyWritten(visit=9, detector=1, manifest={})
    assert run_stage("detect", 9, 1, boom, done) is done


def test_kernel_phase_tasks_keep_the_memory_they_free(tmp_path, monkeypatch):
    """In process, the tasks from the input stages to the spatial solve keep what they free for the tile tasks (no
    trim after them); every other task hands it back once the resident size is above the graph's limit, what the
    process held when the graph was built plus KEEP_PLANES planes of the image, the tile tasks above that plus
    TILE_KEEP_PLANES planes of a tile (on a cluster every task runs
    :func:`run_stage`, which a worker's own limit governs: the next test); the runners treat failures alike."""
    import diffim_dag.memory as memory
    from diffim_dag.graph import run_stage_keeping_freed, run_stage_keeping_freed_below
    from diffim_dag.visit import KEEP_PLANES, KERNEL_PHASE, TILE_KEEP_PLANES, TILE_PHASE

    trims = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(1) or True)
    assert run_stage("fit-cell", 1, 2, lambda a: a + 1, 1) == 2 and len(trims) == 1
    assert run_stage_keeping_freed("fit-cell", 1, 2, lambda a: a + 1, 1) == 2 and len(trims) == 1
    monkeypatch.setattr(memory, "resident_bytes", lambda: 1000)
    assert run_stage_keeping_freed_below(1000, "subtract", 1, 2, lambda a: a + 1, 1) == 2 and len(trims) == 1
    assert run_stage_keeping_freed_below(999, "subtract", 1, 2, lambda a: a + 1, 1) == 2 and len(trims) == 2
    monkeypatch.setattr(memory, "resident_bytes", lambda: None)  # (no resident size to compare: handed back)
    assert run_stage_keeping_freed_below(1000, "subtract", 1, 2, lambda a: a + 1, 1) == 2 and len(trims) == 3
    monkeypatch.setattr(memory, "resident_bytes", lambda: 5000)

    def boom(exc):
        raise exc

    failure = run_stage_keeping_freed("kernel-sources", 9, 1, boom, InputError("bad"))
    assert failure == StageFailure(stage="kernel-sources", visit=9, detector=1, error="InputError", reason="bad")
    spec = VisitSpec(visit=1, detector=2, science=str(tmp_path / "s.fits"), template=str(tmp_path / "t.fits"))
    config = load_config()
    local = visit_graph(spec, config, tmp_path, grid=VisitGrid(tiles=(2, 2), cells=2, shape=(512, 512),
                                                              detect=(1, 1)), in_process=True)
    bodies = (run_stage, run_stage_keeping_freed, run_stage_keeping_freed_below)
    runners = {stage_of(k): task[0] for k, task in local.items() if isinstance(task, tuple) and callable(task[0])
               and task[0] in bodies}
    assert {s for s, r in runners.items() if r is run_stage_keeping_freed} == set(KERNEL_PHASE)
    limits = {stage_of(k): task[1] for k, task in local.items()
              if isinstance(task, tuple) and task[0] is run_stage_keeping_freed_below}
    base = 5000 + KEEP_PLANES * 4 * 512 * 512
    # the tile tasks' own headroom for the transforms and temporaries one tile frees and the next allocates again
    tiles = base + TILE_KEEP_PLANES * 4 * config.subtract.tile_size ** 2
    assert {s for s, limit in limits.items() if limit == tiles} == set(TILE_PHASE) == {"window", "subtract",
                                                                                         "decorrelate"}
    assert {limit for s, limit in limits.items() if s not in TILE_PHASE} == {base}
    zogy = visit_graph(spec, load_config(overrides=["method=zogy"]), tmp_path, in_process=True,
                       grid=VisitGrid(tiles=(2, 2), cells=2, shape=(512, 512), detect=(1, 1)))
    whole = [task[1] for k, task in zogy.items() if stage_of(k) == "subtract"]
    assert whole == [base]  # (ZOGY's one subtract task is the whole image's, no tile's)
    from diffim_dag.visit import KEEP_MAX_BYTES, _keep_below

    assert _keep_below((8192, 8192)) == 5000 + KEEP_PLANES * 4 * 8192 * 8192  # (16 planes of 8192², 4 GiB)
    assert _keep_below((16384, 16384)) == 5000 + KEEP_MAX_BYTES < 5000 + KEEP_PLANES * 4 * 16384 * 16384  # (capped)
    assert _keep_below(None) is None
    # memory the command line touched ahead is free memory inside the resident size, not held: part of the planes kept
    monkeypatch.setattr(memory, "_touched_ahead", 3000)
    assert _keep_below((512, 512)) == base - 3000
    monkeypatch.setattr(memory, "_touched_ahead", 0)
    assert {runners[s] for s in ("read", "subtract", "detect", "catalog")} == {run_stage_keeping_freed_below}
    spread = visit_graph(spec, config, tmp_path, grid=VisitGrid(tiles=(2, 2), cells=2, shape=(512, 512)))
    assert not any(isinstance(t, tuple) and t and t[0] in bodies[1:] for t in spread.values())


def test_worker_tasks_keep_freed_memory_below_half_the_memory_limit(monkeypatch):
    """On a Dask worker a task keeps what it frees for the worker's next tasks while the worker's resident size is
    at most half its memory limit (or it has none), and hands it back above that; outside a worker it hands it
    back as before."""
    import types

    import distributed

    import diffim_dag.memory as memory
    from diffim_dag.graph import WORKER_KEEP_FRACTION

    trims = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: trims.append(1) or True)

    def on_worker(limit, rss):
        worker = types.SimpleNamespace(memory_manager=types.SimpleNamespace(memory_limit=limit),
                                       monitor=types.SimpleNamespace(get_process_memory=lambda: rss))
        monkeypatch.setattr(distributed, "get_worker", lambda: worker)

    def trimmed():
        before = len(trims)
        assert run_stage("subtract", 1, 2, lambda a: a + 1, 1) == 2
        return len(trims) - before

    def no_worker():
        raise ValueError("No worker found")

    monkeypatch.setattr(distributed, "get_worker", no_worker)
    assert trimmed() == 1  # this process: handed back
    on_worker(8 << 30, 1 << 30)
    assert trimmed() == 0  # a worker well below its limit keeps it
    on_worker(8 << 30, int(WORKER_KEEP_FRACTION * (8 << 30)) + 1)
    assert trimmed() == 1  # above half its limit: handed back
    on_worker(None, 64 << 30)
    assert trimmed() == 0  # no memory limit: kept


@pytest.mark.acceptance
@pytest.mark.parametrize("fakes", [[], ["--fakes", "20"]])
def test_cli_subtract_and_a_batch_of_one_write_the_same_bits(tmp_path, fakes):
    """The user's two commands on one plain-FITS raw-sky pair (PSFs estimated): ``subtract`` and ``run`` with a
    one-row manifest write bitwise-identical planes and identical catalogues (and fakes)."""
    import subprocess
    import sys

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "diffim_dag.cli", *args], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r

    cli("simulate", "--size", "256", "--seed", "7", "--layout", "plain", "--no-psf", "--no-keywords",
        "--set", "sky_subtracted=false", "--out", "in")
    pipeline = str(Path(__file__).resolve().parent.parent / "pipelines" / "al.yaml")
    cli("subtract", "--pipeline", pipeline, "in/science.fits", "in/template.fits", "--out", "one", *fakes)
    (tmp_path / "m.csv").write_text("visit,detector,science,template\n1,0,in/science.fits,in/template.fits\n")
    cli("run", pipeline, "--manifest", "m.csv", "--out", "batch", "--no-progress", "--workers", "1", *fakes)
    folder = tmp_path / "batch" / ("injected" if fakes else "") / "visit=1" / "detector=0"
    for name in ("difference.fits", "matched_template.fits"):
        for a, b in zip(read_exposure(tmp_path / "one" / name).arrays(), read_exposure(folder / name).arrays()):
            np.testing.assert_array_equal(a, b)
    one = pd.read_parquet(tmp_path / "one" / "dia_sources.parquet")
    batch = pd.read_parquet(folder / "dia_sources.parquet").drop(columns=["visit", "detector"])
    pd.testing.assert_frame_equal(one.drop(columns=[c for c in ("visit", "detector") if c in one]), batch,
                                  check_dtype=False)
    if fakes:
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / "injection.parquet"),
                                      pd.read_parquet(folder / "injection.parquet"))


def test_in_process_zogy_takes_its_inputs_and_gives_the_same_result(spec, inputs, tmp_path):
    """In process the ZOGY task takes the exposures out of the input stages' result (their planes are freed as
    variance scaling replaces them); the result is bitwise the one of a task that leaves them, and a second
    try is refused rather than run on nothing.  Exposures handed in by a caller are never taken."""
    from diffim_dag.stages.prepare import prepare_exposures
    from diffim_dag.visit import zogy_stage

    config = _config("zogy")
    science, template = inputs
    kept = prepare_exposures(science, template, config)
    taken = dataclasses.replace(kept)
    a = zogy_stage(kept, config)
    b = zogy_stage(taken, config, consume=True)
    assert kept.science is not None and taken.science is None and taken.template is None
    for x, y in zip(a.difference.arrays() + a.score.arrays(), b.difference.arrays() + b.score.arrays()):
        np.testing.assert_array_equal(x, y)
    assert a.metrics["zogy"] == b.metrics["zogy"] and taken.__sizeof__() == 1024
    with pytest.raises(RuntimeError, match="already taken"):
        zogy_stage(taken, config, consume=True)

    def consumes(dsk):
        (task,) = [t for k, t in dsk.items() if stage_of(k) == "subtract"]
        return task[-1]

    local = visit_grid(input_shape(spec), config, in_process=True)
    assert consumes(visit_graph(spec, config, tmp_path, grid=local, in_process=True)) is True
    assert consumes(visit_graph(spec, config, tmp_path, grid=local)) is False
    assert consumes(visit_graph(spec, config, tmp_path, grid=local, in_process=True, prepared=kept)) is False


@pytest.mark.parametrize("error", [None, "permanent", "transient"])
def test_an_output_set_is_begun_beside_detection_and_never_left_half_written(spec, inputs, tmp_path, monkeypatch,
                                                                              error):
    """A single subtraction's ``write-planes`` task writes the planes into the set's temporary folder while
    detection runs (in process, after the matched filter); the ``write`` task completes and installs the set,
    whose manifest checksums are those of the files.  When detection fails — a permanent error (raised as the
    user's one-line error) or any other — neither the set nor its temporary folder is left."""
    from diffim_dag.errors import NoWorkFound
    from diffim_dag.io.outputs import read_manifest, sha256
    from diffim_dag.pipeline import run_subtraction
    import diffim_dag.stages.catalog as catalog

    config = _config()
    dsk = visit_graph(inputs, config, tmp_path / "g", output="set", in_process=True, warp="none")
    planes = [k for k in dsk if stage_of(k) == "write-planes"]
    assert len(planes) == 1
    assert task_key("detect-prepare", 0, 0) in dsk[planes[0]][-1]  # after the matched filter, in process
    out = tmp_path / "set"
    if error:
        def fail(*args, **kwargs):
            raise NoWorkFound("no detection today") if error == "permanent" else RuntimeError("worker lost")

        monkeypatch.setattr(catalog, "detect_tiles_stage", fail)
        with pytest.raises(NoWorkFound if error == "permanent" else RuntimeError):
            run_subtraction(*inputs, config=config, out_dir=out, warp=False)
        assert not out.exists()
    else:
        result = run_subtraction(*inputs, config=config, out_dir=out, warp=False)
        manifest = read_manifest(out)
        assert {"difference.fits", "matched_template.fits", "kernel.fits", "kernel_candidates.parquet",
                "dia_sources.parquet", "metrics.json"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            assert entry["sha256"] == sha256(out / name) and entry["size"] == (out / name).stat().st_size
        assert "write_planes" in json.loads((out / "metrics.json").read_text())["timings_s"]
        np.testing.assert_array_equal(read_exposure(out / "difference.fits").arrays()[0],
                                      result.difference.arrays()[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_noise_measured_beside_the_kernel_fit_equals_the_solve_measuring_it(spec, inputs):
    """The input stages measure each input's variance factor, and the ``input-noise`` tasks its clipped mean
    variance and noise correlation, each beside other work; what the later stages compute from them is
    bitwise what they compute measuring it themselves.  Fakes added to the exposures drop the factors (their
    planes changed)."""
    from diffim_dag.stages import al
    from diffim_dag.stages.inputs import input_variance_scale
    from diffim_dag.stages.prepare import inject_stage, prepare_exposures

    config = _config()
    prepared = prepare_exposures(*inputs, config)
    assert prepared.variance_scales == {role: input_variance_scale(getattr(prepared, role), config, role)
                                        for role in ("science", "template")}
    given = al.prepare_subtraction(prepared.science, prepared.template, config,
                                   variance_scales=prepared.variance_scales)
    measured = al.prepare_subtraction(prepared.science, prepared.template, config)
    for a, b in zip(given.science.arrays() + given.template.arrays(),
                    measured.science.arrays() + measured.template.arrays()):
        np.testing.assert_array_equal(a, b)
    assert given.metrics == measured.metrics
    cells = al.kernel_sources_stage(given, config)
    fits = [al.fit_cells_stage(cells)]
    noise = [al.input_noise_stage(given, i) for i in range(2)]
    a = al.spatial_solve_stage(given, cells, fits, config, noise)
    b = al.spatial_solve_stage(given, cells, fits, config)
    np.testing.assert_array_equal(a.decorrelation_kernel, b.decorrelation_kernel)
    assert (a.variance_factor, a.sigma_unconvolved2, a.sigma_convolved2) == (b.variance_factor, b.sigma_unconvolved2,
                                                                           b.sigma_convolved2)
    assert a.metrics["noise_correlation"] == b.metrics["noise_correlation"]
    with_fakes = dataclasses.replace(config, fakes=dataclasses.replace(config.fakes, n=5))
    assert inject_stage(prepared, with_fakes).variance_scales is None


def test_residual_metrics_beside_detection_equal_the_difference_stage_computing_them(inputs):
    """The ``quality`` task's residual metrics, added to the ``difference`` task's result, are those the
    difference stage computes itself with ``quality=True``, key order included (metrics.json is unchanged)."""
    from diffim_dag.stages.al import difference_stage, with_quality

    config = _config()
    dsk = visit_graph(inputs, config, warp="none", detect=False)
    tiles = sorted(k for k in dsk if stage_of(k) == "decorrelate")
    keys = [task_key(s, 0, 0) for s in ("prepare", "decorrelation-kernel", "difference", "quality")] + tiles
    prepared, kernel, difference, quality, *decorrelated = dask.get(dsk, keys)
    assert set(difference.metrics["quality"]) == {"sky_ratio_propagated", "variance_scale"}
    whole = difference_stage(prepared, kernel, config, decorrelated, quality=True)
    merged = with_quality(difference, quality)
    assert list(merged.metrics["quality"].items()) == list(whole.metrics["quality"].items())
    assert "footprint_residual_ratio_mean" in merged.metrics["quality"] and "quality" in merged.metrics["timings_s"]


def test_kernel_sources_detected_once_the_science_is_ready_are_the_selection_s_own(spec, inputs, tmp_path):
    """In process a ``kernel-detect`` task finds the science's sources right after its ``exposure`` task (the
    template's input stages still running); the selection that takes them equals the one that detects itself,
    and so does the one from a catalogue with the background measured early.  A cluster's graph (input stages
    fused) has no such task."""
    from diffim_dag.stages import al
    from diffim_dag.stages.kernel_sources import detect_kernel_sources
    from diffim_dag.stages.prepare import prepare_exposures

    config = _config()
    one = visit_graph(spec, config, tmp_path, in_process=True)
    detect = one[task_key("kernel-detect", spec.visit, spec.detector)]
    assert task_key("exposure", spec.visit, spec.detector, 0) in detect
    assert task_key("kernel-detect", spec.visit, spec.detector) in one[task_key("kernel-sources", spec.visit,
                                                                               spec.detector)]
    assert not [k for k in visit_graph(spec, config, tmp_path) if stage_of(k) == "kernel-detect"]

    prepared = prepare_exposures(*inputs, config)
    pair = al.prepare_subtraction(prepared.science, prepared.template, config,
                                  variance_scales=prepared.variance_scales)
    early = detect_kernel_sources(prepared.science, config.sources)
    a = al.kernel_sources_stage(pair, config, detection=early)
    b = al.kernel_sources_stage(pair, config)
    pd.testing.assert_frame_equal(a.sources, b.sources)
    assert a.source_stats["found"] == b.source_stats["found"] > 0 and a.source_stats["origin"] == b.source_stats["origin"]
    catalog = b.sources[["x", "y"]]
    c = al.kernel_sources_stage(pair, config, sources=catalog,
                                detection=detect_kernel_sources(prepared.science, config.sources, detect=False))
    d = al.kernel_sources_stage(pair, config, sources=catalog)
    pd.testing.assert_frame_equal(c.sources, d.sources)


def test_a_retried_write_task_installs_the_whole_set(inputs, tmp_path, monkeypatch):
    """A single subtraction's write task that fails transiently removes the folder the write-planes task began;
    its retry (on a cluster) writes the planes again, so the installed set is never without them."""
    import diffim_dag.stages.detect as detect_module
    from diffim_dag.io.outputs import read_manifest, temporary_name
    from diffim_dag.visit_outputs import write_planes_stage, write_set_task

    config = _config()
    result = subtract(*inputs, config=config)
    out = tmp_path / "set"
    staged = write_planes_stage(result, temporary_name(out))
    assert (Path(staged.folder) / "difference.fits").is_file()
    real = detect_module.write_dia_sources
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("NFS hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(detect_module, "write_dia_sources", flaky)
    with pytest.raises(OSError):
        write_set_task(0, 0, result, staged, str(out), config)
    assert not Path(staged.folder).exists() and not out.exists()
    paths = write_set_task(0, 0, result, staged, str(out), config)
    assert {"difference.fits", "matched_template.fits", "kernel.fits", "dia_sources.parquet"} <= set(
        read_manifest(out)["files"])
    np.testing.assert_array_equal(read_exposure(paths["difference"]).arrays()[0], result.difference.arrays()[0])
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_the_executor_imports_scipy_before_its_threads_can():
    """SciPy's first import must not happen on two task threads at once (one initialising ``scipy``, another a
    subpackage: a cycle across threads that fails one task with a partially initialised module): the executor
    imports the package before its threads start (``graph.SHARED_IMPORTS``), in a fresh interpreter that has not."""
    import subprocess
    import sys

    code = ("import sys; from diffim_dag.graph import execute; before = 'scipy' in sys.modules; "
            "print(before, execute({'a': (lambda: 'scipy' in sys.modules,)}, 'a'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
