"""Batch throughput of `diffim-dag run` (visits per minute) with 1 and 2 LocalCluster workers.

Simulates ``--visits`` (visit, detector) pairs of ``--size``² pixels (default 2048², the issue's size),
then runs the same manifest through :func:`diffim_dag.batch.run_batch` on a fresh LocalCluster of
1 and of 2 single-threaded workers (each into a fresh output folder, so nothing is skipped).
Throughput = visits done / batch wall time (cluster start included).  Target: ≥ 1.7× with 2 workers.
The batch is one task graph (per visit: one task per stage, kernel cell and tile); its size and build
time on the client are printed first.

    python benchmarks/bench_batch.py [--size 2048] [--visits 6] [--workers 1 2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--visits", type=int, default=6)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pipeline", default=str(Path(__file__).resolve().parents[1] / "pipelines" / "al.yaml"))
    ap.add_argument("--keep", metavar="DIR", help="keep inputs and outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    from diffim_dag.batch import build_batch_graph, read_manifest, run_batch, simulate_batch
    from diffim_dag.config import load_config
    from diffim_dag.graph import stage_of

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        t0 = time.perf_counter()
        manifest = simulate_batch(root / "inputs", n_visits=args.visits, n_detectors=1, size=args.size, seed=7)
        print(f"simulated {args.visits} visits of {args.size}² in {time.perf_counter() - t0:.1f} s", flush=True)
        specs = read_manifest(manifest)
        config = load_config(args.pipeline)
        t0 = time.perf_counter()
        graph = build_batch_graph(specs, config, root / "graph_out")
        stages = sorted({stage_of(k) for k in graph})
        print(f"batch graph: {len(graph)} tasks for {len(specs)} visits ({', '.join(stages)}), "
              f"built in {time.perf_counter() - t0:.2f} s", flush=True)
        del graph
        rows = []
        for n in args.workers:
            out = root / f"out_{n}w"
            shutil.rmtree(out, ignore_errors=True)
            report = run_batch(specs, config, out, n_workers=n, progress=False)
            per_visit = sorted(r.wall_s for r in report.records)
            rows.append((n, report.count("done"), report.count("failed"), report.wall_s, report.throughput_per_minute,
                         per_visit[len(per_visit) // 2]))
        base = rows[0][4]
        print(f"\n{'workers':>7} {'done':>5} {'failed':>6} {'wall s':>8} {'visits/min':>11} {'median visit s':>15} {'speed-up':>9}")
        for n, done, failed, wall, tp, med in rows:
            print(f"{n:>7} {done:>5} {failed:>6} {wall:>8.1f} {tp:>11.2f} {med:>15.1f} {tp / base:>8.2f}×")
        if len(rows) > 1:
            speedup = rows[-1][4] / base
            print(f"\nspeed-up with {rows[-1][0]} workers: {speedup:.2f}× (target ≥ 1.7×)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
