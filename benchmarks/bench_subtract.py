"""Wall time and peak memory of the AL subtraction of simulated pairs (prints a table).

Each (size, workers) run is a fresh Python process that reads the pair from FITS and subtracts
with the threaded Dask scheduler limited to ``workers`` threads (FFT/BLAS pinned to one thread
each), so peak RSS is that of the run alone (inputs included).  Timed: kernel fit + convolve/
subtract + decorrelate ("core"), and the whole subtract_exposures call ("total").

Targets (issue 4, 2 cores, median of 3): 4096² core ≤ 8 s and ≤ 1.5 GB peak; 8192² ≤ 4.5× 4096².
For scale, HOTPANTS takes 23.6 s and 0.9 GB for a 4096² pair on this machine.

    python benchmarks/bench_subtract.py [--sizes 2048 4096 8192] [--workers 1 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time
import dask
from diffim_dag.io import read_exposure
from diffim_dag.pipeline import subtract_exposures
sci, tmp, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
science, template = read_exposure(sci), read_exposure(tmp)
with dask.config.set(num_workers=workers, scheduler="threads"):
    t0 = time.perf_counter()
    r = subtract_exposures(science, template)
    total = time.perf_counter() - t0
t = r.metrics["timings_s"]
core = t["kernel_fit"] + t["convolve_subtract"] + t.get("decorrelate", 0.0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # GB (ru_maxrss is in kB)
print(json.dumps({"core": core, "total": total, "peak_gb": peak, "timings": t,
                  "verdict": r.metrics["quality"]["verdict"], "sky_ratio": r.metrics["quality"]["sky_ratio"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from diffim_dag.sim import SimConfig, simulate_pair, write_pair

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            pair = simulate_pair(SimConfig(size=size, seed=size))
            paths = write_pair(pair, Path(tmp) / str(size))
            del pair
            for workers in args.workers:
                runs = []
                for _ in range(args.repeats):
                    out = subprocess.run([sys.executable, "-c", CHILD, str(paths["science"]), str(paths["template"]),
                                          str(workers)], capture_output=True, text=True, env=env, check=True)
                    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append({
                    "size": size, "workers": workers,
                    "core_s": statistics.median(r["core"] for r in runs),
                    "total_s": statistics.median(r["total"] for r in runs),
                    "peak_gb": max(r["peak_gb"] for r in runs),
                    "kernel_fit_s": statistics.median(r["timings"]["kernel_fit"] for r in runs),
                    "convolve_s": statistics.median(r["timings"]["convolve_subtract"] for r in runs),
                    "decorrelate_s": statistics.median(r["timings"].get("decorrelate", 0.0) for r in runs),
                    "verdict": runs[0]["verdict"],
                })
                print(f"  done {size}² with {workers} worker(s)", file=sys.stderr)
    print(f"{'size':>6} {'workers':>7} {'core s':>8} {'total s':>8} {'peak GB':>8} {'fit s':>7} {'conv s':>7} {'decorr s':>8}  verdict")
    for r in rows:
        print(f"{r['size']:>6} {r['workers']:>7} {r['core_s']:>8.2f} {r['total_s']:>8.2f} {r['peak_gb']:>8.2f} "
              f"{r['kernel_fit_s']:>7.2f} {r['convolve_s']:>7.2f} {r['decorrelate_s']:>8.2f}  {r['verdict']}")
    by = {(r["size"], r["workers"]): r["core_s"] for r in rows}
    for w in args.workers:
        if (4096, w) in by and (8192, w) in by:
            print(f"8192²/4096² core-time ratio with {w} worker(s): {by[(8192, w)] / by[(4096, w)]:.2f} (target ≤ 4.5)")


if __name__ == "__main__":
    main()
