"""Where the time of ``diffim-dag subtract`` goes: a table per stage and a timeline of the cores' use.

    python benchmarks/timeline_cli.py [--size 4096] [--method al] [--keep DIR]
    python benchmarks/timeline_cli.py --pair SCIENCE TEMPLATE [--method zogy]

Runs the command line's ``subtract`` in this process, as the command line runs it (its allocator settings, its
in-process visit graph, no flags but ``--method``), on bench_cli.py's simulated pair of ``--size``² (raw sky,
flux scale 1.1, no PSF file; written once into ``--keep`` and reused) or on the pair given.  Each task of the
visit graph is recorded as its body runs (:func:`diffim_dag.graph.run_stage` and its variants): start, end,
and its thread's CPU time (user, system) and minor page faults; a sampler reads the process's CPU time and
resident size every 0.1 s.

Prints, once the outputs are written:

* per stage: tasks, first start, last end, summed wall, CPU user / system, page faults;
* the timeline in ``--bin`` s steps: cores busy (the process's CPU time over the step), resident GiB, the
  stages running;
* totals: wall, CPU, the idle core-seconds (cores × wall − CPU) and the CPU time outside the tasks (imports,
  the main thread, the tiles' and FFTs' helper threads).

For finding where the time goes; bench_cli.py times what the user waits for (a new process, start-up included,
interleaved runs, the peak of every process).  Here the clock starts when the command does, with the modules
this script and the pair's simulation loaded already (NumPy, SciPy, the graph's): the stages' own imports are
lighter than in a new process.  On a machine whose speed drifts, compare code with bench_cli.py, not with this.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path


def _thread_usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _resident_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--pair", nargs=2, metavar=("SCIENCE", "TEMPLATE"), help="a pair of FITS files instead")
    ap.add_argument("--method", default="al")
    ap.add_argument("--bin", type=float, default=0.5, help="timeline step, s")
    ap.add_argument("--keep", metavar="DIR", help="folder for the simulated pair and the outputs (default: temporary)")
    args = ap.parse_args(argv)
    if not hasattr(resource, "RUSAGE_THREAD"):
        print("timeline_cli.py: needs per-thread CPU times (Linux)", file=sys.stderr)
        return 2

    # the command line's settings first: they must precede NumPy's import, which the pair's simulation does
    from diffim_dag.memory import reuse_freed_memory, small_pages_for_arrays

    reuse_freed_memory()
    small_pages_for_arrays()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="timeline_cli_"))
    if args.pair:
        science, template = args.pair
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_cli import _pair

        folder = root / f"pair{args.size}"
        if not (folder / "science.fits").exists():
            _pair(folder, args.size, seed=args.size)
        science, template = str(folder / "science.fits"), str(folder / "template.fits")

    import diffim_dag.cli as cli
    import diffim_dag.graph as graph

    tasks: list = []  # (stage, start, end, user, sys, faults)
    samples: list = []  # (t, process CPU, resident GiB)
    t0 = time.perf_counter()
    body = graph._run_stage

    def recorded(stage, visit, detector, function, args_, *, release):
        start, (u0, s0, f0) = time.perf_counter(), _thread_usage()
        try:
            return body(stage, visit, detector, function, args_, release=release)
        finally:
            u1, s1, f1 = _thread_usage()
            tasks.append((stage, start - t0, time.perf_counter() - t0, u1 - u0, s1 - s0, f1 - f0))

    def sample(stop: threading.Event):
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, _process_cpu(), _resident_gib()))
            stop.wait(0.1)

    def report():
        wall, cpu = time.perf_counter() - t0, _process_cpu() - cpu0
        stop.set()
        cores = os.cpu_count() or 1
        print(f"\n{Path(science).name} − {Path(template).name}, --method {args.method}, {cores} cores")
        print(f"{'stage':<16} {'tasks':>5} {'from s':>7} {'to s':>7} {'wall s':>7} {'user s':>7} {'sys s':>6} "
              f"{'faults':>9}")
        stages: dict = {}
        for stage, a, b, u, s, f in tasks:
            row = stages.setdefault(stage, [0, a, b, 0.0, 0.0, 0.0, 0])
            row[0] += 1
            row[1], row[2] = min(row[1], a), max(row[2], b)
            row[3] += b - a
            row[4] += u
            row[5] += s
            row[6] += f
        for stage, (n, a, b, w, u, s, f) in sorted(stages.items(), key=lambda kv: kv[1][1]):
            print(f"{stage:<16} {n:>5} {a:>7.2f} {b:>7.2f} {w:>7.2f} {u:>7.2f} {s:>6.2f} {f:>9d}")
        print(f"\n{'t s':>6} {'cores':>5} {'GiB':>5}  stages running")
        edges = [samples[0]] if samples else []
        for s in samples[1:]:
            if s[0] - edges[-1][0] >= args.bin - 1e-9:
                edges.append(s)
        for (ta, ca, _), (tb, cb, rb) in zip(edges, edges[1:]):
            running = sorted({stage for stage, a, b, *_ in tasks if a < tb and b > ta})
            print(f"{ta:>6.1f} {(cb - ca) / (tb - ta):>5.2f} {rb:>5.2f}  {' '.join(running)}")
        in_tasks = sum(u + s for _, _, _, u, s, _ in tasks)
        print(f"\nwall {wall:.2f} s, CPU {cpu:.2f} s ({cpu / wall:.2f} cores of {cores}); "
              f"idle {cores * wall - cpu:.2f} core-s; "
              f"CPU in the tasks' own threads {in_tasks:.2f} s, outside them {cpu - in_tasks:.2f} s; "
              f"peak resident {max((s[2] for s in samples), default=0.0):.2f} GiB")
        sys.stdout.flush()

    graph._run_stage = recorded
    stop = threading.Event()
    cpu0 = _process_cpu()
    threading.Thread(target=sample, args=(stop,), daemon=True).start()
    end_process = cli._end_process

    def reported_then_ended(code):
        report()
        end_process(code)

    cli._end_process = reported_then_ended
    sys.argv = ["diffim-dag", "subtract", science, template, "--out", str(root / f"out-{args.method}"),
                "--overwrite", "--method", args.method]
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
