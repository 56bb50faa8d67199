"""Detection + measurement time on a simulated 4096² difference with 500 sources.

Usage::

    python benchmarks/bench_detect.py [--size 4096] [--n 500] [--tile 1024] [--sky 100] [--repeat 3]

Prints a table of the wall time of :func:`diffim_dag.stages.detect.detect_and_measure`:
untiled (whole image, 2 FFT threads), tile by tile in turn in one thread, and tile by tile
as Dask tasks on the threaded scheduler (2 cores, as the visit graph runs them); each row
gives the first (cold) run and the median of ``--repeat`` runs, and how many sources were
found. Target: ≤ 3 s on 2 cores for 4096² with 500 sources (the CI tests use 1024²).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from diffim_dag import Exposure, GaussianPsf  # noqa: E402
from diffim_dag.sim import add_sources  # noqa: E402
from diffim_dag.stages.detect import DetectMeasureConfig, detect_and_measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--sky", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    psf = GaussianPsf(2.0)
    n = args.size
    t0 = time.perf_counter()
    img = rng.normal(0.0, 5.0, (n, n)).astype(np.float32)
    x = rng.uniform(20, n - 20, args.n)
    y = rng.uniform(20, n - 20, args.n)
    flux = rng.uniform(800, 5000, args.n) * rng.choice([-1, 1], args.n)
    add_sources(img, x, y, flux, psf)
    import photutils.geometry  # noqa: F401  (import once, outside the timings)

    exp = Exposure.from_arrays(img, np.full((n, n), 25.0, np.float32), psf=psf)
    print(f"simulated {n}x{n} difference with {args.n} sources in {time.perf_counter() - t0:.2f} s")
    from diffim_dag.graph import tile_mapper

    rows = [("untiled, 2 FFT threads", None, 2, None),
            (f"tiles {args.tile}², in turn", args.tile, 1, None),
            (f"tiles {args.tile}², Dask threads", args.tile, 2, tile_mapper())]
    print(f"{'run':<28} {'first s':>8} {'median s':>9} {'DiaSources':>11} {'sky':>4} {'dipoles':>8}")
    for label, tile, workers, mapper in rows:
        cfg = DetectMeasureConfig(n_sky_sources=args.sky, tile_size=tile, fft_workers=workers)
        times = []
        for _ in range(max(1, args.repeat)):
            t = time.perf_counter()
            cat = detect_and_measure(exp, config=cfg, map_tiles=mapper)
            times.append(time.perf_counter() - t)
        real = int((~cat["sky_source"]).sum())
        print(f"{label:<28} {times[0]:8.2f} {float(np.median(times)):9.2f} {real:11d} {len(cat) - real:4d} "
              f"{int(cat['is_dipole'].sum()):8d}")

if __name__ == "__main__":
    main()
