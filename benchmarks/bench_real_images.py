"""What the user waits for on the issue-16 pairs: ``python benchmarks/bench_real_images.py [--repeats 3]``.

The two 2048² acceptance pairs (plain FITS as an archive serves them: raw sky, flux scale 1.1, Moffat PSFs,
no PSF, no GAIN or SATURATE; science broader / template broader) are written once; then
``diffim-dag subtract SCIENCE TEMPLATE --out DIR`` runs as a new process, with no flags (PSFs estimated) and
with the true PSF files given, interleaved, ``--repeats`` times each.  The table gives the median wall time of
the whole command (start-up included), the largest resident set of any process of the run (the CLI and its
Dask workers), and what the PSF stage took inside the run (``metrics.json`` → ``timings_s.psf``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_RUN = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t0
if p.returncode:
    sys.stderr.write(p.stderr[-2000:])
    sys.exit(p.returncode)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _pair(folder: Path, direction: str) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from acceptance import make_pair

    return make_pair(folder, direction)


def _run(pair: Path, out: Path, *extra) -> tuple[float, float, float]:
    cmd = [sys.executable, "-m", "diffim_dag.cli", "subtract", str(pair / "science.fits"), str(pair / "template.fits"),
           "--out", str(out), *map(str, extra)]
    proc = subprocess.run([sys.executable, "-c", _RUN, *cmd], capture_output=True, text=True, check=True)
    wall, rss_kb = proc.stdout.split()
    psf = json.loads((out / "metrics.json").read_text())["timings_s"].get("psf", float("nan"))
    return float(wall), float(rss_kb) / 1024.0**2, float(psf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = {d: _pair(root / d, d) for d in ("template", "science")}
        results: dict = {}
        for k in range(args.repeats):
            for direction, pair in pairs.items():
                for label, extra in (("PSFs estimated", ()),
                                     ("true PSFs given", ("--science-psf", pair / "science_psf.fits",
                                                          "--template-psf", pair / "template_psf.fits"))):
                    out = root / f"out-{direction}-{label[:4]}-{k}"
                    t0 = time.perf_counter()
                    results.setdefault((direction, label), []).append(_run(pair, out, *extra))
                    print(f"  {direction} broader side, {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        print("| pair (2048²) | PSFs | wall s (median) | peak RSS GB (max) | PSF stage s (median) |")
        print("|---|---|---|---|---|")
        for (direction, label), rows in results.items():
            name = "science broader (convolveTemplate)" if direction == "template" else "template broader (convolveScience)"
            print(f"| {name} | {label} | {statistics.median(r[0] for r in rows):.1f} | "
                  f"{max(r[1] for r in rows):.2f} | {statistics.median(r[2] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
