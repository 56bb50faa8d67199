"""Detection + measurement time on a simulated 4096² difference with 500 sources.

Usage::

    python benchmarks/bench_detect.py [--size 4096] [--n 500] [--tile 1024] [--sky 100]

Prints the wall time of :func:`diffim_dag.stages.detect.detect_and_measure` (untiled and,
with ``--tile``, run tile by tile in one process) and how many sources were found.
Target: ≤ 3 s on 2 cores for 4096² with 500 sources (the CI tests use 1024²).
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
    for tile in (None, args.tile):
        cfg = DetectMeasureConfig(n_sky_sources=args.sky, tile_size=tile, fft_workers=2 if tile is None else 1)
        t = time.perf_counter()
        cat = detect_and_measure(exp, config=cfg)
        dt = time.perf_counter() - t
        real = int((~cat["sky_source"]).sum())
        label = "untiled" if tile is None else f"tiles {tile}²"
        print(f"detect+measure ({label}): {dt:.2f} s, {real} DiaSources (+{len(cat) - real} sky), "
              f"{int(cat['is_dipole'].sum())} dipoles")


if __name__ == "__main__":
    main()
