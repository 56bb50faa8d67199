"""Issue 13 through the CLI, as a user meets it: bad inputs, unusable or reused ``--out`` folders, Ctrl-C and
SIGTERM, a cluster that loses its workers.  Every case runs ``diffim-dag`` as a new process.

A failure must be: the expected exit code (2 for an input problem), no traceback, at most 3 lines of output,
the file named, plain numbers, and nothing created in ``--out``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from astropy.io import fits

from acceptance import run_cli
from diffim_dag.batch import verify_outputs
from diffim_dag.io.outputs import OUTPUTS_MANIFEST, sha256
from diffim_dag.sim import SimConfig, simulate_pair, write_pair

CLI = [sys.executable, "-m", "diffim_dag.cli"]


def _pair(folder: Path, size: int, seed: int, layout: str = "lsst") -> Path:
    pair = simulate_pair(SimConfig(size=size, seed=seed, n_cosmic_rays=0))
    write_pair(pair, folder, layout=layout)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A 384² LSST-layout pair (fast to subtract)."""
    return _pair(tmp_path_factory.mktemp("small"), 384, 5)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """The issue's 2048² pair, as plain FITS."""
    return _pair(tmp_path_factory.mktemp("big"), 2048, 6, layout="plain")


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with its checksum."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Temporary folders a run left beside its outputs."""
    return sorted(p.name for p in parent.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or "probe" in p.name)


def assert_one_line_failure(proc, code: int, *needles: str, out: Path | None = None, before: dict | None = None):
    text = proc.stdout + proc.stderr
    lines = text.strip().splitlines()
    assert proc.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert 1 <= len(lines) <= 3, text
    assert "np.float" not in text and "np.int" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    if out is not None:
        assert _tree(out) == (before or {}), "the failed run changed --out"
        if not before:
            assert not out.exists() or not any(out.iterdir())


def _verify_set(out: Path) -> dict:
    """The completion manifest of an output set, after checking every file it lists and nothing else."""
    manifest = json.loads((out / OUTPUTS_MANIFEST).read_text())
    files = {k: v for k, v in _tree(out).items() if k != OUTPUTS_MANIFEST}
    assert files == {k: e["sha256"] for k, e in manifest["files"].items()}
    return manifest


# ------------------------------------------------------------------------------------------------ bad inputs


def test_truncated_fits_is_one_line_in_subtract_and_info(small, tmp_path):
    trunc = tmp_path / "cut.fits"
    trunc.write_bytes((small / "science.fits").read_bytes()[:30_000])
    out = tmp_path / "out"
    proc = run_cli("subtract", trunc, small / "template.fits", "--out", out)
    assert_one_line_failure(proc, 2, "cut.fits", "truncated", out=out)
    proc = run_cli("info", trunc)
    assert_one_line_failure(proc, 2, "cut.fits", "truncated")


def test_text_in_a_mask_plane_keyword(small, tmp_path):
    bad = tmp_path / "banana.fits"
    with fits.open(small / "science.fits") as hdul:
        hdul["MASK"].header["MP_CR"] = "banana"
        hdul.writeto(bad)
    out = tmp_path / "out"
    proc = run_cli("subtract", bad, small / "template.fits", "--out", out)
    assert_one_line_failure(proc, 2, "banana.fits", "MP_CR", "banana", out=out)


def test_typo_inside_a_pipeline_file_names_the_file(small, tmp_path):
    pipeline = tmp_path / "mine.yaml"
    pipeline.write_text("method: al\nkernel:\n  sizee: 21\n")
    out = tmp_path / "out"
    proc = run_cli("subtract", small / "science.fits", small / "template.fits", "--out", out, "--pipeline", pipeline)
    assert_one_line_failure(proc, 2, "mine.yaml", "kernel.sizee", out=out)


def _moved_template(pair: Path, folder: Path) -> Path:
    """The pair's template with its WCS moved 1° east in RA: no pixel of it overlaps the science."""
    far = folder / "faraway.fits"
    with fits.open(pair / "template.fits") as hdul:
        for hdu in hdul:
            if "CRVAL1" in hdu.header:
                hdu.header["CRVAL1"] += 1.0
        hdul.writeto(far)
    return far


def test_a_pair_too_sparse_to_subtract_names_both_files(tmp_path):
    """Two 96² frames with two stars each and no header beyond the data (an alert stamp): no WCS and too few
    stars to register by, so they are taken as one grid; then too few kernel sources.  The one line names both
    files (the failure is the pair's, not a file's)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :96]
    paths = []
    for name in ("sci.fits", "tmpl.fits"):
        img = 1000.0 + rng.normal(0.0, 10.0, (96, 96))
        for x, y in ((30.0, 40.0), (70.0, 60.0)):
            img += 20000.0 * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 1.7**2) / (2 * np.pi * 1.7**2)
        fits.PrimaryHDU(img.astype(np.float32)).writeto(tmp_path / name)
        paths.append(tmp_path / name)
    out = tmp_path / "out"
    proc = run_cli("subtract", *paths, "--out", out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text[-3000:]
    error = text.strip().splitlines()[-1]  # (after the warnings: one grid assumed, Moffat PSFs from 2 stars)
    assert error.startswith("diffim-dag subtract: error:") and "kernel source" in error, text
    assert "sci.fits" in error and "tmpl.fits" in error, error
    assert "taken as one pixel grid" in text
    assert not out.exists() or not any(out.iterdir())


def test_template_off_the_science_footprint_is_named_before_warping(small, tmp_path):
    far = _moved_template(small, tmp_path)
    out = tmp_path / "out"
    proc = run_cli("subtract", small / "science.fits", far, "--out", out)
    assert_one_line_failure(proc, 2, "faraway.fits", "science.fits", "covers 0.0%", out=out)


def test_overlap_is_checked_before_any_pixel_is_warped(small, tmp_path, monkeypatch):
    from diffim_dag.errors import NoWorkFound
    from diffim_dag.io import read_exposure
    from diffim_dag.stages import template as template_stage

    far = _moved_template(small, tmp_path)
    calls = []
    real_warp = template_stage.warp_exposure
    monkeypatch.setattr(template_stage, "warp_exposure", lambda *a, **k: calls.append(1) or real_warp(*a, **k))
    science = read_exposure(small / "science.fits")
    with pytest.raises(NoWorkFound, match="faraway.fits covers 0.0%"):
        template_stage.prepare_template(science, read_exposure(far), warp=True)
    assert calls == []
    template_stage.prepare_template(science, read_exposure(small / "template.fits"), warp=True)
    assert calls  # the same call warps when the footprints overlap


# ------------------------------------------------------------------------------------------------ --out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["a file", "under a file", "not writable"])
def test_unusable_out_is_reported_before_any_work(big, tmp_path, case):
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    if case == "a file":
        out, needle = afile, "is a file"
    elif case == "under a file":
        out, needle = afile / "sub", "cannot create"
    else:
        if os.geteuid() == 0:  # root writes into a mode-555 folder; not into sysfs
            if not Path("/sys").is_dir():
                pytest.skip("running as root without /sys: no folder that refuses root")
            out = Path("/sys/diffim-dag-out")
        else:
            ro = tmp_path / "ro"
            ro.mkdir()
            ro.chmod(0o555)
            out = ro / "out"
        needle = "cannot write in"
    t0 = time.monotonic()
    proc = run_cli("subtract", big / "science.fits", big / "template.fits", "--out", out)
    wall = time.monotonic() - t0
    assert_one_line_failure(proc, 2, str(out), needle)
    assert afile.read_text() == "mine\n"
    # the computation takes ~20 s on this pair: refusing in < 3 s means nothing was read or computed first
    assert wall < 3.0, f"--out problem reported after {wall:.1f} s"


def test_batch_out_that_is_a_file(small, tmp_path):
    manifest = tmp_path / "visits.csv"
    manifest.write_text(f"visit,detector,science,template\n1,0,{small / 'science.fits'},{small / 'template.fits'}\n")
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    proc = run_cli("run", "pipelines/al.yaml", "--manifest", manifest, "--out", afile, "--no-progress")
    assert_one_line_failure(proc, 2, "afile", "is a file")
    proc = run_cli("run", "pipelines/al.yaml", "--manifest", manifest, "--out", afile / "sub", "--no-progress")
    assert_one_line_failure(proc, 2, "afile", "cannot create")


def test_user_files_survive_and_earlier_output_is_replaced_whole_only_with_overwrite(small, tmp_path):
    sci, tmp = small / "science.fits", small / "template.fits"
    # a folder of the user's own: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": "numbers"}')
    before = _tree(mine)
    proc = run_cli("subtract", sci, tmp, "--out", mine)
    assert_one_line_failure(proc, 2, "mine", "metrics.json", "--overwrite", out=mine, before=before)

    # an earlier diffim-dag output (AL, with its kernel) is refused without --overwrite ...
    out = tmp_path / "out"
    proc = run_cli("subtract", sci, tmp, "--out", out, "--method", "al")
    assert proc.returncode == 0, proc.stderr[-3000:]
    al = _verify_set(out)
    assert "kernel.fits" in al["files"]
    before = _tree(out)
    proc = run_cli("subtract", sci, tmp, "--out", out, "--method", "zogy")
    assert_one_line_failure(proc, 2, "earlier diffim-dag output", "--overwrite", out=out, before=before)
    # ... and replaced as a whole with it: nothing of the AL set is left beside the ZOGY one
    proc = run_cli("subtract", sci, tmp, "--out", out, "--method", "zogy", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    zogy = _verify_set(out)
    assert "kernel.fits" not in zogy["files"] and not (out / "kernel.fits").exists()
    assert json.loads((out / "metrics.json").read_text())["method"] == "zogy"
    assert not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ signals


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD


def _stop_after(cmd: list, wait_s: float, signum: int, ready=None):
    """Start ``cmd``, send ``signum`` after ``wait_s`` s (or once ``ready()``), and return
    (returncode, output, seconds from the signal to the process's exit); fails if a child process is still
    running 2 s after the signal, or if it left named semaphores behind (``/dev/shm``, where there is one) or
    multiprocessing's temporary folder (``pymp-*``, with the workers' fork server's socket: the command runs with a
    temporary folder of its own)."""
    semaphores_before = _semaphores()
    own_tmp = Path(tempfile.mkdtemp(prefix="stop_after_"))
    env = {**os.environ, "TMPDIR": str(own_tmp)}
    proc = subprocess.Popen([*CLI, *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s and proc.poll() is None and not (ready and ready()):
        time.sleep(0.01 if ready else 0.1)
    assert proc.poll() is None, "the run ended before the signal: " + proc.stdout.read()[-2000:]
    children = _children(proc.pid)
    t_signal = time.monotonic()
    proc.send_signal(signum)
    try:
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    gone = time.monotonic() - t_signal
    # the children too must have exited by 2 s after the signal
    _, alive = psutil.wait_procs(children, timeout=max(0.0, 2.0 - (time.monotonic() - t_signal)))
    running = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)]
    for p in running:  # (a zombie has exited; it waits for whoever adopted it to reap it)
        p.kill()
    assert not running, f"{len(running)} child process(es) outlived the run"
    left = _left_semaphores(semaphores_before)
    assert not left, f"the stopped run left {len(left)} named semaphore(s) in /dev/shm: {sorted(left)[:4]}"
    left = sorted(p.name for p in own_tmp.glob("pymp-*"))
    shutil.rmtree(own_tmp, ignore_errors=True)
    assert not left, f"the stopped run left multiprocessing's temporary folder: {left}"
    return proc.returncode, proc.stdout.read(), gone


def _semaphores() -> set[str]:
    """The named semaphores of Python's multiprocessing on this machine (Linux: files ``/dev/shm/sem.mp-*``)."""
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def _left_semaphores(before: set[str]) -> set[str]:
    """The semaphores made since ``before`` that no live process holds open: those the stopped run left.  Another
    test's run on the other xdist worker may make its own meanwhile; it holds them open (mapped: glibc maps the file
    it made under a temporary name, so the mapping is matched by inode) and unlinks them as it ends."""
    def orphans() -> set[str]:
        new = {}
        for name in _semaphores() - before:
            try:
                new[name] = (Path("/dev/shm") / name).stat().st_ino
            except OSError:  # (unlinked meanwhile)
                continue
        if not new:
            return set()
        held = set()
        for maps in Path("/proc").glob("[0-9]*/maps"):
            try:
                held.update(int(fields[4]) for fields in (line.split() for line in maps.read_text().splitlines()
                                                          if "/dev/shm/" in line) if len(fields) > 4)
            except (OSError, ValueError):  # (a process that ended meanwhile, or one not ours to read)
                continue
        return {name for name, inode in new.items() if inode not in held}

    left = orphans()
    if left:  # (one that another run made the instant before it held it, or unlinks the instant after it ends)
        time.sleep(0.5)
        left &= orphans()
    return left


def _writing(parent: Path):
    """True once a temporary output folder beside ``--out`` holds a file: the set is being written."""

    def ready() -> bool:
        try:
            return any(p.is_file() for tmp in parent.glob(".out.tmp-*") for p in tmp.rglob("*"))
        except OSError:  # the folder was renamed into place (or removed) while it was being listed
            return False

    return ready


@pytest.mark.slow
@pytest.mark.parametrize("when", ["computing", "writing"])
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "earlier-set"])
def test_ctrl_c_during_a_2048_subtract(big, small, tmp_path, earlier, when):
    """Ctrl-C while the stages run (after 2.5 s) or while the output set is being written (its planes are
    written beside detection, by another thread than the signal handler's)."""
    out = tmp_path / "out"
    if earlier:  # --out holds a complete earlier set, which the interrupted --overwrite run must leave intact
        proc = run_cli("subtract", small / "science.fits", small / "template.fits", "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = _tree(out)
    args = ["subtract", big / "science.fits", big / "template.fits", "--out", out] + (["--overwrite"] if earlier else [])
    if when == "computing":
        code, text, gone = _stop_after(args, 2.5, signal.SIGINT)
    else:
        code, text, gone = _stop_after(args, 120.0, signal.SIGINT, ready=_writing(tmp_path))
    assert code == 130, text[-3000:]
    assert gone < 2.0, f"still running {gone:.1f} s after Ctrl-C"
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 3, text[-3000:]
    assert "interrupted" in text
    assert _tree(out) == before
    if earlier:
        _verify_set(out)
    assert not _leftovers(tmp_path)


def _batch_inputs(root: Path, n: int) -> Path:
    rows = ["visit,detector,science,template"]
    for i in range(n):
        folder = _pair(root / f"v{i}", 320, 40 + i)
        rows.append(f"{100 + i},0,{folder.name}/science.fits,{folder.name}/template.fits")
    manifest = root / "visits.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _installed(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob(f"visit=*/detector=*/{OUTPUTS_MANIFEST}"))


@pytest.mark.acceptance
def test_sigterm_on_run_keeps_finished_visits_and_the_rerun_completes_the_rest(tmp_path):
    n = 6
    manifest = _batch_inputs(tmp_path / "in", n)
    out = tmp_path / "out"
    cmd = ["run", "pipelines/al.yaml", "--manifest", manifest, "--out", out, "--no-progress", "--workers", "1"]
    code, text, gone = _stop_after(cmd, 240.0, signal.SIGTERM, ready=lambda: len(_installed(out)) >= 2)
    assert code == 143, text[-3000:]
    assert gone < 2.0, f"still running {gone:.1f} s after SIGTERM"
    assert "Traceback" not in text and len(text.strip().splitlines()) <= 3, text[-3000:]
    finished = _installed(out)
    assert 2 <= len(finished) < n, text
    for folder in finished:  # complete, every checksum right
        visit, detector = (int(part.split("=")[1]) for part in folder.relative_to(out).parts)
        assert verify_outputs(out, visit, detector) is not None, folder
    assert not _leftovers(out)
    # the rerun skips what was finished (its files untouched) and completes the rest
    kept = {f: _tree(f) for f in finished}
    proc = run_cli("run", "pipelines/al.yaml", "--manifest", manifest, "--out", out, "--no-progress", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    status = {(r["visit"], r["detector"]): r["status"] for r in report["entries"]}
    assert sorted(status.values()).count("skipped") == len(finished)
    assert sorted(status.values()).count("done") == n - len(finished)
    assert len(_installed(out)) == n
    assert all(_tree(f) == files for f, files in kept.items())


def test_batch_with_a_truncated_file_marks_it_failed_without_retries(small, tmp_path):
    (tmp_path / "cut.fits").write_bytes((small / "science.fits").read_bytes()[:30_000])
    manifest = tmp_path / "visits.csv"
    manifest.write_text("visit,detector,science,template\n"
                        f"1,0,{small / 'science.fits'},{small / 'template.fits'}\n"
                        f"2,0,cut.fits,{small / 'template.fits'}\n")
    out = tmp_path / "out"
    proc = run_cli("run", "pipelines/al.yaml", "--manifest", manifest, "--out", out, "--no-progress",
                   "--workers", "1", "--retries", "3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    report = json.loads((out / "run_report.json").read_text())
    rec = {r["visit"]: r for r in report["entries"]}
    assert rec[1]["status"] == "done"
    assert rec[2]["status"] == "failed" and rec[2]["error"] == "InputError"
    assert "cut.fits" in rec[2]["reason"] and "transient" not in rec[2]["reason"]
    assert "attempt" not in rec[2]["reason"]  # a retried failure says how many attempts it took


# ------------------------------------------------------------------------------------------------ lost workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.acceptance
def test_a_cluster_whose_workers_all_die_ends_the_run_with_an_error(tmp_path):
    """`run` on a scheduler whose only worker is killed mid-run: an error within cluster.no_worker_timeout,
    not a hang (the worker runs without a nanny, as a pod would, so nothing restarts it)."""
    manifest = _batch_inputs(tmp_path / "in", 4)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2.0)
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--no-nanny",
                                   "--nthreads", "1", "--no-dashboard"], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        out = tmp_path / "out"
        run = subprocess.Popen([*CLI, "run", "pipelines/al.yaml", "--manifest", str(manifest), "--out", str(out),
                                "--no-progress", "--scheduler", address, "-c", "cluster.no_worker_timeout=4"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append(run)
        t0 = time.monotonic()
        while not _installed(out) and run.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.2)
        assert run.poll() is None, run.stdout.read()[-3000:]
        worker.kill()
        t_kill = time.monotonic()
        run.wait(timeout=60)
        ended = time.monotonic() - t_kill
        text = run.stdout.read()
        assert run.returncode == 1, text[-3000:]
        assert "no worker" in text and "Traceback" not in text, text[-3000:]
        assert ended < 4 + 6, f"ended {ended:.1f} s after the last worker died (timeout 4 s)"
        assert _installed(out), "the visit finished before the workers died was lost"
        assert not _leftovers(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_worker_watchdog_fires_once_after_the_timeout_and_not_while_workers_exist():
    from diffim_dag.cluster import WorkerWatchdog

    class FakeClient:
        def __init__(self):
            self.workers = {"w0": {}}

        def scheduler_info(self):
            return {"workers": dict(self.workers)}

    client, calls = FakeClient(), []
    dog = WorkerWatchdog(client, 1.5, on_stall=calls.append).start()
    try:
        time.sleep(2.5)
        assert calls == []  # a worker all along
        client.workers = {}
        t0 = time.monotonic()
        while not calls and time.monotonic() - t0 < 6:
            time.sleep(0.1)
        waited = time.monotonic() - t0
        assert len(calls) == 1 and "no worker for 1.5 s" in calls[0]
        assert 1.5 <= waited <= 4.0, waited
        time.sleep(1.5)
        assert len(calls) == 1  # once
    finally:
        dog.stop()
    # disabled with 0; and a worker coming back resets the clock
    assert not WorkerWatchdog(FakeClient(), 0).start()._thread.is_alive()
    client2, calls2 = FakeClient(), []
    client2.workers = {}
    dog2 = WorkerWatchdog(client2, 2.5, on_stall=calls2.append).start()
    try:
        time.sleep(1.6)
        client2.workers = {"w1": {}}
        time.sleep(1.6)
        client2.workers = {}
        time.sleep(1.6)
        assert calls2 == []  # never 2.5 s in a row without a worker
    finally:
        dog2.stop()


@pytest.mark.acceptance
def test_a_local_cluster_whose_worker_is_killed_mid_run_still_ends(tmp_path):
    """`run` on its own LocalCluster: its only worker process is SIGKILLed after the first visit (as the
    OOM killer would). The nanny restarts it and the run finishes every visit, with no traceback and no hang."""
    manifest = _batch_inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    run = subprocess.Popen([*CLI, "run", "pipelines/al.yaml", "--manifest", str(manifest), "--out", str(out),
                            "--no-progress", "--workers", "1", "-c", "cluster.no_worker_timeout=4"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not _installed(out) and run.poll() is None and time.monotonic() - t0 < 240:
            time.sleep(0.2)
        assert run.poll() is None, run.stdout.read()[-3000:]
        workers = [p for p in _children(run.pid) if "resource_tracker" not in " ".join(p.cmdline())]
        assert workers
        for p in workers:
            p.kill()
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    text = run.stdout.read()
    assert "Traceback" not in text, text[-3000:]
    assert run.returncode == 0, text[-3000:]
    assert len(_installed(out)) == 4
