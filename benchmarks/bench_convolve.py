"""Timings of the convolution, mask and decorrelation kernels on one tile.

Run:  python benchmarks/bench_convolve.py [--sizes 1024 4096] [--repeat 2] [--workers 1]

Prints a table of wall-clock times (best of ``--repeat``) for

* ``convolve_tile`` (image + variance + mask) with a 23×23, spatial-order-1 kernel
  (3 spatial terms: 3 image and 6 variance convolutions), ``method="fft"`` at every
  size and ``method="direct"`` at sizes ≤ ``--direct-max`` (direct is ~20× slower);
* its parts (``convolve_spatial``, ``convolve_variance_spatial``, ``dilate_mask``);
* ``decorrelate`` on the largest size.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from diffim_dag.kernels.chebyshev import n_terms  # noqa: E402
from diffim_dag.kernels.convolve import convolve_spatial, convolve_tile, convolve_variance_spatial  # noqa: E402
from diffim_dag.kernels.decorrelate import decorrelate  # noqa: E402
from diffim_dag.kernels.maskops import dilate_mask  # noqa: E402
from diffim_dag.kernels.solution import KernelSolution  # noqa: E402
from diffim_dag.masks import DEFAULT_MASK_PLANES  # noqa: E402


def make_solution(size: int, n: int) -> KernelSolution:
    h = size // 2
    v, u = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    basis = np.stack([np.exp(-(u**2 + v**2) / (2 * s**2)) for s in (1.5, 3.0, 5.0)])
    basis /= basis.sum(axis=(1, 2), keepdims=True)
    coeffs = np.zeros((3, n_terms(1)))
    coeffs[:, 0] = [0.5, 0.3, 0.2]
    coeffs[:, 1] = [0.05, -0.02, -0.03]
    coeffs[:, 2] = [-0.04, 0.01, 0.03]
    return KernelSolution(
        basis=basis, kernel_coefficients=coeffs, spatial_order=1,
        background_coefficients=np.zeros(1), background_order=0, bbox=(0.0, n - 1.0, 0.0, n - 1.0),
    )


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--kernel-size", type=int, default=23)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="scipy.fft threads")
    parser.add_argument("--direct-max", type=int, default=1024, help="largest size timed with method='direct'")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, str, float]] = []
    planes = DEFAULT_MASK_PLANES
    for n in args.sizes:
        sol = make_solution(args.kernel_size, n)
        image = rng.normal(100.0, 10.0, size=(n, n)).astype(np.float32)
        variance = np.full((n, n), 100.0, dtype=np.float32)
        mask = np.zeros((n, n), dtype=np.int32)
        hits = rng.random((n, n)) < 1e-3
        mask[hits] = (1 << planes["BAD"]) | (1 << planes["SAT"])
        shape = f"{n}x{n}"
        ksz = f"{args.kernel_size}x{args.kernel_size} order 1"
        methods = ["fft"] + (["direct"] if n <= args.direct_max else [])
        for method in methods:
            t = best_of(
                lambda: convolve_tile(
                    image, variance, mask, sol, origin=(0, 0), mask_planes=planes, method=method, workers=args.workers
                ),
                args.repeat if method == "fft" else 1,
            )
            rows.append(("convolve_tile", shape, f"{ksz}, {method}", t))
        rows.append(("  convolve_spatial", shape, f"{ksz}, fft",
                     best_of(lambda: convolve_spatial(image, sol, method="fft", workers=args.workers), args.repeat)))
        rows.append(("  convolve_variance_spatial", shape, f"{ksz}, fft",
                     best_of(lambda: convolve_variance_spatial(variance, sol, method="fft", workers=args.workers),
                             args.repeat)))
        rows.append(("  dilate_mask", shape, f"{args.kernel_size}x{args.kernel_size}",
                     best_of(lambda: dilate_mask(mask, args.kernel_size), args.repeat)))

    n = max(args.sizes)
    kernel = make_solution(args.kernel_size, n).kernel_at(n / 2, n / 2)
    diff = rng.normal(size=(n, n)).astype(np.float32)
    ones = np.ones((n, n), dtype=np.float32)
    t = best_of(
        lambda: decorrelate(diff, kernel=kernel, sigma_u2=1.0, sigma_c2=1.0, variance_unconvolved=ones,
                            variance_convolved=ones, workers=args.workers),
        args.repeat,
    )
    rows.append(("decorrelate", f"{n}x{n}", f"{args.kernel_size}x{args.kernel_size} kernel", t))

    print(f"workers={args.workers}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}  (best of {args.repeat})")
    print(f"{'function':<30} {'array':>10}  {'kernel / method':<28} {'time [s]':>9}")
    print("-" * 82)
    for name, shape, what, t in rows:
        print(f"{name:<30} {shape:>10}  {what:<28} {t:9.3f}")


if __name__ == "__main__":
    main()
