"""AL, AL with pre-convolution and ZOGY side by side on one simulated pair (prints a table).

One pair (``--size``², 200 transients, sky-subtracted, template on the science grid) is simulated
and written as FITS; each method then runs in a fresh Python process (threaded Dask scheduler,
``--workers`` threads, FFT/BLAS pinned to one thread) that reads the pair, subtracts, detects and
measures, so ``ru_maxrss`` is that method's peak memory (inputs included).  Detection uses
``detect_and_measure(difference, science=..., template=..., score=...)`` — the score significance for
the score methods, the matched filter for AL.

Columns: completeness of injected (negative) transients with truth ``snr_difference ≥ 7`` (a DiaSource
within 2 px); false positives (DiaSources farther than 5 px from every injected non-star object and
farther than 25 px from every bright or saturated star); star residual (median over isolated field
stars of 1e4–5e4 counts of |Σ D| / F within 2 FWHM); wall time of the method call; peak RSS.

Targets (issue 6): every method ≥ 95 % completeness with ≤ 10 false positives; ZOGY on 4096² with a
4×4 PSF grid ≤ 2 GB peak and ≤ 2× the AL time.

    python benchmarks/bench_methods.py [--size 2048] [--workers 2] [--methods al al-preconvolve zogy] [--profile]

``--profile`` adds each method's peak RSS per pipeline stage (the ``Timings`` stages the method
reports, plus ``read``), to find which stage sets the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
import dask
from diffim_dag.config import PipelineConfig
from diffim_dag.io import read_exposure
method, sci, tmp, workers, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
profile = len(sys.argv) > 6 and sys.argv[6] == "1"
stage_peaks = {}
if profile:
    # --profile: the RSS sampled every 2 ms by a thread, its maximum over each Timings stage
    import contextlib, os, threading
    from diffim_dag.stages import inputs as _pipeline  # Timings
    page = os.sysconf("SC_PAGE_SIZE")
    samples = []
    def _poll():
        with open("/proc/self/statm") as f:
            while True:
                f.seek(0)
                samples.append((time.perf_counter(), int(f.read().split()[1]) * page))
                time.sleep(0.002)
    threading.Thread(target=_poll, daemon=True).start()
    _stage = _pipeline.Timings.stage
    @contextlib.contextmanager
    def _profiled(self, name):
        t0 = time.perf_counter()
        with _stage(self, name):
            yield
        t1 = time.perf_counter()
        seen = list(samples)
        inside = [r for t, r in seen if t0 <= t <= t1] or [r for t, r in seen if t <= t1][-1:]  # short stages
        peak = max(inside, default=0) / 1024**3
        stage_peaks[name] = max(stage_peaks.get(name, 0.0), peak)
    _pipeline.Timings.stage = _profiled
t_read = time.perf_counter()
science, template = read_exposure(sci), read_exposure(tmp)
if profile:
    t_done = time.perf_counter()
    stage_peaks["read"] = max((r for t, r in list(samples) if t_read <= t <= t_done), default=0) / 1024**3
config = PipelineConfig(method=method)
with dask.config.set(num_workers=workers, scheduler="threads"):
    t0 = time.perf_counter()
    if method == "al":
        from diffim_dag.pipeline import subtract_exposures
        r = subtract_exposures(science, template, config=config, detect=True)
    elif method == "al-preconvolve":
        from diffim_dag.pipeline import subtract_al_preconvolve
        r = subtract_al_preconvolve(science, template, config=config, detect=True)
    else:  # the visit graph from its inputs on: ZOGY's cells on the threads, then detection on S_corr
        import dataclasses
        from diffim_dag.pipeline import subtract_prepared
        from diffim_dag.stages.zogy import ZogyConfig
        config = dataclasses.replace(config, zogy=ZogyConfig(grid_cells=4))
        r = subtract_prepared(science, template, config=config, detect=True)
    total = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
r.dia_sources.to_parquet(out + "/dia.parquet")
np.save(out + "/difference.npy", r.difference.arrays()[0])
print(json.dumps({"total": total, "peak_gb": peak, "timings": r.metrics.get("timings_s", {}),
                  "stage_peak_gb": stage_peaks}, default=float))
"""


def evaluate(truth, dia, difference, xy0, fwhm):
    real = dia[~dia["sky_source"]]
    dx, dy = real["x"].to_numpy(), real["y"].to_numpy()
    inj = truth[truth["kind"].isin(["transient", "negative_transient"]) & (truth["snr_difference"] >= 7)]
    found = sum(bool(len(dx)) and bool((np.hypot(dx - r.x, dy - r.y) <= 2.0).any()) for r in inj.itertuples())
    others = truth[truth["kind"] != "star"]
    bright = truth[(truth["kind"] == "saturated_star") | ((truth["kind"] == "star") & (truth["science_flux"] > 5e4))]
    fp = 0
    for x, y in zip(dx, dy):
        if len(others) and (np.hypot(others["x"] - x, others["y"] - y) <= 5.0).any():
            continue
        if len(bright) and (np.hypot(bright["x"] - x, bright["y"] - y) <= 25.0).any():
            continue
        fp += 1
    stars = truth[(truth["kind"] == "star") & truth["science_flux"].between(1e4, 5e4)]
    r_ap = 2.0 * fwhm
    h = int(np.ceil(r_ap))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    disc = np.hypot(xx, yy) <= r_ap
    ratios = []
    ny, nx = difference.shape
    for s in stars.itertuples():
        ix, iy = int(round(s.x - xy0[0])), int(round(s.y - xy0[1]))
        if ix - h < 30 or iy - h < 30 or ix + h >= nx - 30 or iy + h >= ny - 30:
            continue
        if len(others) and (np.hypot(others["x"] - s.x, others["y"] - s.y) <= 20).any():
            continue
        stamp = difference[iy - h : iy + h + 1, ix - h : ix + h + 1]
        ratios.append(abs(float(stamp[disc].sum())) / s.science_flux)
    return {"n_injected": int(len(inj)), "found": int(found), "completeness": found / max(len(inj), 1),
            "false_positives": fp, "n_dia": int(len(real)),
            "star_residual": float(np.median(ratios)) if ratios else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="image side (the issue's target is 4096)")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["al", "al-preconvolve", "zogy"])
    ap.add_argument("--profile", action="store_true",
                    help="also print each method's peak RSS per pipeline stage (RSS sampled every 2 ms; Linux)")
    args = ap.parse_args()
    import pandas as pd

    from diffim_dag.sim import SimConfig, simulate_pair, write_pair

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cfg = SimConfig(size=args.size, seed=args.seed, n_transients=200, sky_subtracted=True, template_offset=(0.0, 0.0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pair = simulate_pair(cfg)
        paths = write_pair(pair, Path(tmp) / "pair")
        truth = pair.truth
        xy0 = pair.science.xy0
        cx, cy = pair.science.center
        fwhm = pair.science.psf.fwhm(cx, cy)
        del pair
        for method in args.methods:
            out = Path(tmp) / method
            out.mkdir()
            proc = subprocess.run([sys.executable, "-c", CHILD, method, str(paths["science"]), str(paths["template"]),
                                   str(args.workers), str(out), "1" if args.profile else "0"],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            quality = evaluate(truth, pd.read_parquet(out / "dia.parquet"), np.load(out / "difference.npy"), xy0, fwhm)
            rows.append({"method": method, **quality, "time_s": run["total"], "peak_gb": run["peak_gb"],
                         "stage_peak_gb": run.get("stage_peak_gb", {}), "timings": run.get("timings", {})})
            print(f"  done {method}: {run['timings']}", file=sys.stderr)
    print(f"pair {args.size}² seed {args.seed}, {args.workers} worker thread(s)")
    print(f"{'method':>15} {'complete':>9} {'found':>9} {'FPs':>5} {'DiaSrc':>7} {'star res':>9} {'time s':>7} {'peak GB':>8}")
    for r in rows:
        print(f"{r['method']:>15} {100 * r['completeness']:>8.1f}% {r['found']:>4}/{r['n_injected']:<4} "
              f"{r['false_positives']:>5} {r['n_dia']:>7} {r['star_residual']:>9.4f} {r['time_s']:>7.2f} {r['peak_gb']:>8.2f}")
    if args.profile:
        print("peak RSS per stage (GB; wall s), in the order the stages finished:")
        for r in rows:
            cells = [f"{k} {v:.2f} ({r['timings'].get(k, float('nan')):.1f} s)" if k in r["timings"] else f"{k} {v:.2f}"
                     for k, v in r["stage_peak_gb"].items()]
            print(f"{r['method']:>15}: " + ", ".join(cells))
    by = {r["method"]: r for r in rows}
    if "al" in by and "zogy" in by:
        print(f"ZOGY / AL time: {by['zogy']['time_s'] / by['al']['time_s']:.2f} (target ≤ 2 at 4096²); "
              f"ZOGY peak {by['zogy']['peak_gb']:.2f} GB (target ≤ 2 GB at 4096²)")


if __name__ == "__main__":
    main()
