"""Time a Lanczos-3 warp of a 4096² template (issue 7 target: ≤ 5 s on 2 cores).

Runs (1) one eager ``warp_tile`` call over the whole output with an exact WCS → WCS mapping
(TAN, rotated 0.5°, shifted by a fraction of a pixel), (2) the same split into 1024² output tiles run on a
2-thread pool (how the stage's tiles run under a threaded Dask scheduler), and (3) the affine mapping path.

Usage: ``python benchmarks/bench_warp.py [--size 4096] [--threads 2] [--kernel lanczos3]``
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from diffim_dag.kernels.warp import AffineMapping, WcsMapping, source_bbox, warp_tile  # noqa: E402


def tan_wcs(size: int, rotation_deg: float = 0.0, crpix_shift=(0.0, 0.0)) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [size / 2 + 1 + crpix_shift[0], size / 2 + 1 + crpix_shift[1]]
    s = 0.2 / 3600
    t = np.deg2rad(rotation_deg)
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.set()
    return w


def run_tiled(planes, mapping, size, tile, threads, kernel):
    img, var, msk = planes

    def one(origin):
        x0, y0 = origin
        shape = (min(tile, size - y0), min(tile, size - x0))
        bx0, bx1, by0, by1 = source_bbox(mapping, out_origin=origin, out_shape=shape, kernel=kernel)
        bx0, by0 = max(bx0, 0), max(by0, 0)
        bx1, by1 = min(bx1, size), min(by1, size)
        sl = (slice(by0, max(by1, by0)), slice(bx0, max(bx1, bx0)))
        return origin, warp_tile(img[sl], var[sl], msk[sl], mapping, out_origin=origin, out_shape=shape,
                                 src_origin=(bx0, by0), kernel=kernel)

    origins = [(x, y) for y in range(0, size, tile) for x in range(0, size, tile)]
    out = np.empty((size, size), np.float32)
    with ThreadPoolExecutor(threads) as pool:
        for (x0, y0), (i, _, _) in pool.map(one, origins):
            out[y0:y0 + i.shape[0], x0:x0 + i.shape[1]] = i
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--kernel", default="lanczos3")
    args = p.parse_args(argv)
    n = args.size
    rng = np.random.default_rng(1)
    img = rng.normal(1000.0, 30.0, (n, n)).astype(np.float32)
    var = np.full((n, n), 900.0, np.float32)
    msk = np.zeros((n, n), np.int32)
    msk[rng.integers(0, n, 2000), rng.integers(0, n, 2000)] = 1  # sparse BAD pixels
    wcs_map = WcsMapping(tan_wcs(n, 0.5, (0.37, -0.21)), tan_wcs(n))
    aff = AffineMapping.similarity(rotation=np.deg2rad(0.5), shift=(0.37, -0.21), center=(n / 2, n / 2))

    rows = []
    t = time.perf_counter()
    warp_tile(img, var, msk, wcs_map, out_origin=(0, 0), out_shape=(n, n), src_origin=(0, 0), kernel=args.kernel)
    rows.append(("eager, 1 thread, WCS mapping", time.perf_counter() - t))
    t = time.perf_counter()
    warp_tile(img, var, msk, aff, out_origin=(0, 0), out_shape=(n, n), src_origin=(0, 0), kernel=args.kernel)
    rows.append(("eager, 1 thread, affine mapping", time.perf_counter() - t))
    t = time.perf_counter()
    run_tiled((img, var, msk), wcs_map, n, args.tile, args.threads, args.kernel)
    rows.append((f"{args.tile}² tiles, {args.threads} threads, WCS mapping", time.perf_counter() - t))
    print(f"warp of a {n}x{n} float32 image (image+variance+mask), {args.kernel}")
    print(f"{'case':<42s} {'seconds':>8s}")
    for name, sec in rows:
        print(f"{name:<42s} {sec:8.2f}")


if __name__ == "__main__":
    main()
