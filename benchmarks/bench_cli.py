"""What the user waits for: ``diffim-dag subtract SCIENCE TEMPLATE --out DIR`` end to end (prints a table).

    python benchmarks/bench_cli.py [--sizes 1024 2048 4096] [--methods al zogy] [--repeats 3]
    HOTPANTS=/path/to/hotpants python benchmarks/bench_cli.py ...

For each size a simulated pair is written as plain FITS, as an archive serves it: raw sky, flux scale 1.1,
no PSF file, no GAIN or SATURATE, the science PSF broader, 8000 stars and 100 transients per 4096² (scaled
with the area).  The command then runs as a new process with no flags except ``--method``, so PSFs are
estimated and detection and measurement are on, ``--repeats`` times.  When ``$HOTPANTS`` names a HOTPANTS
binary it runs on the same pair in the same loop, interleaved with diffim-dag, and the table gives the
ratio of the medians.  HOTPANTS gets the pair's valid-data range (``-il/-tl 0 -iu/-tu 55000``) and
otherwise its defaults.

Measured per run:

* the wall time of the whole command, start-up included;
* its CPU time, user and system (the kernel's: page faults, page zeroing, file writes), of the command and the
  processes it waited for (``RUSAGE_CHILDREN`` before and after);
* the peak resident set of every process of the run: the CLI and each Dask worker it starts.  The process
  tree is polled every 50 ms and each process's high-water mark (``VmHWM``) is kept, so the per-process
  peaks are exact up to the last 50 ms of a process's life.  ``RUSAGE_CHILDREN`` gives the largest waited-for
  descendant as a cross-check.

Targets (issue 15, 2 cores):

* 4096² end to end ≤ 8 s (0.5× HOTPANTS), and ≤ 1.5 GB (1.40 GiB) peak in any process;
* 1024² ≤ 3 s;
* 8192² ≤ 4.5× the 4096² time;
* ``--method zogy`` ≤ 2× the AL time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HOTPANTS_ARGS = ["-il", "0", "-tl", "0", "-iu", "55000", "-tu", "55000"]


def _pair(folder: Path, size: int, seed: int) -> Path:
    from diffim_dag.sim import SimConfig, simulate_pair, write_pair

    scale = (size / 4096) ** 2
    config = SimConfig(size=size, seed=seed, psf_profile="moffat", moffat_beta=3.5, sky_level=1060.0,
                       template_sky_level=960.0, flux_scale=1.1, science_fwhm=3.7, template_fwhm=2.7,
                       n_stars=max(50, round(8000 * scale)), n_transients=max(5, round(100 * scale)),
                       n_cosmic_rays=0)
    write_pair(simulate_pair(config), folder, layout="plain", psf=False, keywords=False)
    return folder


def _peak_kb(proc: psutil.Process) -> int:
    """The process's resident high-water mark (kB), or its current RSS where /proc has no VmHWM."""
    try:
        with open(f"/proc/{proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        return proc.memory_info().rss // 1024
    except psutil.Error:
        return 0


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, the CPU time (user, system) of it and of the processes it waited for, and the
    peak RSS (GiB) of it and of every process it started."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(popen.pid)
    peaks: dict[int, tuple[str, int]] = {}
    while popen.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            kb = _peak_kb(p)
            if kb:
                role = "main" if p.pid == popen.pid else "child"
                peaks[p.pid] = (role, max(kb, peaks.get(p.pid, (role, 0))[1]))
        time.sleep(0.05)
    out, err = popen.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (this loop runs one command at a time)
    if popen.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}… exited {popen.returncode}: {err[-2000:]}")
    gb = 1024.0 ** 2
    children = sorted((kb / gb for role, kb in peaks.values() if role == "child"), reverse=True)
    main = max((kb for role, kb in peaks.values() if role == "main"), default=0) / gb
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "main_gb": main, "children_gb": children,
            "rusage_children_gb": after.ru_maxrss / gb}


def _diffim_dag(pair: Path, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "diffim_dag.cli", "subtract", str(pair / "science.fits"),
            str(pair / "template.fits"), "--out", str(out), "--overwrite", "--method", method]


def _hotpants(binary: str, pair: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [binary, "-inim", str(pair / "science.fits"), "-tmplim", str(pair / "template.fits"),
            "-outim", str(out / "hotpants_diff.fits"), *HOTPANTS_ARGS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--methods", nargs="+", default=["al", "zogy"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write the pairs and outputs here instead of a temporary folder")
    args = ap.parse_args()
    hotpants = os.environ.get("HOTPANTS")
    if hotpants and not shutil.which(hotpants):
        sys.exit(f"$HOTPANTS={hotpants}: not an executable")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_cli-"))
    rows = []
    try:
        for size in args.sizes:
            pair = _pair(root / f"pair{size}", size, seed=size % 97)
            tools = [(m, lambda out, m=m: _diffim_dag(pair, out, m)) for m in args.methods]
            if hotpants:
                tools.append(("HOTPANTS", lambda out: _hotpants(hotpants, pair, out)))
            results: dict[str, list[dict]] = {name: [] for name, _ in tools}
            for _ in range(args.repeats):  # interleaved: each repeat runs every tool once
                for name, cmd in tools:
                    results[name].append(run(cmd(root / f"out{size}-{name}")))
            for name, runs in results.items():
                walls = [r["wall"] for r in runs]
                metrics = root / f"out{size}-{name}" / "metrics.json"
                verdict = json.loads(metrics.read_text())["quality"]["verdict"] if metrics.exists() else "—"
                rows.append({"size": size, "tool": name, "median": statistics.median(walls), "min": min(walls),
                             "max": max(walls), "user": statistics.median(r["user"] for r in runs),
                             "sys": statistics.median(r["sys"] for r in runs),
                             "main_gb": max(r["main_gb"] for r in runs),
                             "worker_gb": max((max(r["children_gb"], default=0.0) for r in runs)),
                             "n_children": max(len(r["children_gb"]) for r in runs), "verdict": verdict})
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"diffim-dag subtract end to end, {args.repeats} run(s) each, {os.cpu_count()} cores")
    print("| size | tool | median s | min–max s | CPU user / sys s | peak GiB main | peak GiB largest child (n) "
          "| × HOTPANTS | × AL | verdict |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        same = {x["tool"]: x["median"] for x in rows if x["size"] == r["size"]}
        vs_hp = f"{r['median'] / same['HOTPANTS']:.2f}" if "HOTPANTS" in same and r["tool"] != "HOTPANTS" else "—"
        vs_al = f"{r['median'] / same['al']:.2f}" if "al" in same and r["tool"] not in ("al", "HOTPANTS") else "—"
        print(f"| {r['size']}² | {r['tool']} | {r['median']:.2f} | {r['min']:.2f}–{r['max']:.2f} "
              f"| {r['user']:.1f} / {r['sys']:.1f} | {r['main_gb']:.2f} "
              f"| {r['worker_gb']:.2f} ({r['n_children']}) | {vs_hp} | {vs_al} | {r['verdict']} |")
    by = {(r["size"], r["tool"]): r["median"] for r in rows}
    if (8192, "al") in by and (4096, "al") in by:
        print(f"8192² / 4096² (al): {by[(8192, 'al')] / by[(4096, 'al')]:.2f} (target ≤ 4.5)")


if __name__ == "__main__":
    main()
