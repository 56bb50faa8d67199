"""Batch throughput of `diffim-dag run` (visits per minute) with 1 and 2 LocalCluster workers.

Simulates ``--visits`` (visit, detector) pairs of ``--size``² pixels (default 2048², the issue's size),
then runs the same manifest through :func:`diffim_dag.batch.run_batch` on a fresh LocalCluster of
1 and of 2 single-threaded workers (each into a fresh output folder, so nothing is skipped).
Throughput = visits done / batch wall time (cluster start included).  Target: ≥ 1.7× with 2 workers.
The batch is one task graph (per visit: one task per stage, kernel cell and tile); its size and build
time on the client are printed first.

The worker counts run in turn ``--repeats`` times (1, 2, 1, 2, …), each batch into a fresh output folder:
a machine whose speed drifts by ±20 % within minutes (a shared virtual machine) would otherwise decide the
ratio by which configuration ran in its faster phase.  The table gives every run, the median wall time
per worker count and the median of the speed-ups of each round (one run of each count, back to back).

    python benchmarks/bench_batch.py [--size 2048] [--visits 6] [--workers 1 2] [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every worker count, in turn")
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
        rows = []  # (round, workers, done, failed, wall, visits/min, median visit compute)
        for r in range(max(1, args.repeats)):
            for n in args.workers:
                out = root / f"out_{n}w"
                shutil.rmtree(out, ignore_errors=True)
                report = run_batch(specs, config, out, n_workers=n, progress=False)
                per_visit = sorted(rec.wall_s for rec in report.records)
                rows.append((r, n, report.count("done"), report.count("failed"), report.wall_s,
                             report.throughput_per_minute, per_visit[len(per_visit) // 2]))
                print(f"round {r + 1}: {n} worker(s) {report.wall_s:.1f} s", flush=True)
        print(f"\n{'round':>5} {'workers':>7} {'done':>5} {'failed':>6} {'wall s':>8} {'visits/min':>11} "
              f"{'median visit s':>15} {'speed-up':>9}")
        base = {r: tp for r, n, _, _, _, tp, _ in rows if n == args.workers[0]}
        for r, n, done, failed, wall, tp, med in rows:
            print(f"{r + 1:>5} {n:>7} {done:>5} {failed:>6} {wall:>8.1f} {tp:>11.2f} {med:>15.1f} {tp / base[r]:>8.2f}×")
        print()
        for n in args.workers:
            walls = [row[4] for row in rows if row[1] == n]
            print(f"{n} worker(s): median wall {statistics.median(walls):.1f} s over {len(walls)} run(s)")
        if len(args.workers) > 1:
            last = args.workers[-1]
            ups = [tp / base[r] for r, n, _, _, _, tp, _ in rows if n == last]
            print(f"speed-up with {last} workers: {statistics.median(ups):.2f}× (median of {len(ups)} round(s): "
                  f"{', '.join(f'{u:.2f}' for u in ups)}; target ≥ 1.7×)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
