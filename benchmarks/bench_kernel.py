"""Kernel-solve time for a 4096² pair with ~1000 kernel candidates (eager path, one process).

Run: ``python benchmarks/bench_kernel.py [--size 4096] [--stars 1300]``.  Prints a table of
source selection, stamp extraction, per-cell fits + spatial solve, and one 4096² FFT
convolution × 9 (a rough stand-in for the subtraction: one convolution per spatial term
of image and variance).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scipy.signal import fftconvolve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffim_dag.config import KernelConfig, KernelSourceConfig  # noqa: E402
from diffim_dag.kernels.basis import basis_from_config  # noqa: E402
from diffim_dag.psf import GaussianPsf  # noqa: E402
from diffim_dag.stages.kernel_fit import extract_cell_stamps, solve_kernel  # noqa: E402
from diffim_dag.stages.kernel_sources import overlap_bbox, select_kernel_sources  # noqa: E402


def make_pair(size: int, n_stars: int, seed: int = 0):
    try:  # the project simulator, when it exists
        from diffim_dag import sim  # noqa: F401
    except ImportError:
        pass
    from test_kernel_sources import make_pair as fixture_pair

    return fixture_pair((size, size), n_stars, psf_science=GaussianPsf(2.0), psf_template=GaussianPsf(1.4),
                        seed=seed, xy0=(0, 0), snr_range=(40.0, 450.0))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stars", type=int, default=1300)
    args = ap.parse_args(argv)
    cfg, scfg = KernelConfig(), KernelSourceConfig()
    t = time.perf_counter()
    sci, tmp, _ = make_pair(args.size, args.stars)
    rows = [("simulate pair (fixture)", time.perf_counter() - t, "")]
    basis = basis_from_config(cfg, tmp.psf.fwhm(), sci.psf.fwhm())
    t = time.perf_counter()
    sources, stats = select_kernel_sources(sci, tmp, basis.size, scfg)
    rows.append(("detect + measure + cut sources", time.perf_counter() - t, f"{stats['found']} found, {len(sources)} kept"))
    box = overlap_bbox(sci, tmp)
    t = time.perf_counter()
    cells = extract_cell_stamps(tmp, sci, sources, basis.size, box, cfg.cell_size)
    rows.append(("extract stamps into cells", time.perf_counter() - t, f"{len(cells)} cells"))
    t = time.perf_counter()
    res = solve_kernel(cells, basis, cfg, (box[0], box[1] - 1, box[2], box[3] - 1))
    solve = time.perf_counter() - t
    rows.append(("kernel solve (cell fits + clip + spatial)", solve,
                 f"{len(res.fits)} fitted, {len(res.used_ids)} used, {res.iterations} iteration(s), "
                 f"Σk={res.spatial.solution.kernel_sum_at_center():.4f}"))
    t = time.perf_counter()
    from diffim_dag.pipeline import subtract_exposures

    whole = subtract_exposures(sci, tmp)
    total = time.perf_counter() - t
    rows.append(("whole subtraction (subtract_exposures: the visit graph from its inputs on)", total, ""))
    rows.append(("kernel solve / whole subtraction", 100 * whole.metrics["kernel"]["timings_s"]["kernel_solve"] / total,
                 "percent (target < 10), solve as run inside the subtraction"))
    img = sci.arrays()[0]
    k = res.spatial.solution.kernel_at(*res.spatial.solution.center)
    t = time.perf_counter()
    fftconvolve(img, k, mode="same")
    one = time.perf_counter() - t
    rows.append((f"one {args.size}² FFT convolution (fftconvolve)", one, f"{basis.size}² kernel"))
    rows.append(("  × 9 (stand-in for subtraction)", 9 * one, ""))
    w = max(len(r[0]) for r in rows)
    print(f"{'step':<{w}}  {'seconds':>8}  notes")
    print("-" * (w + 40))
    for name, sec, note in rows:
        print(f"{name:<{w}}  {sec:8.2f}  {note}")
    print(f"(scipy.fft workers default; kernel size {basis.size}, {basis.n} basis functions)")


if __name__ == "__main__":
    main()
