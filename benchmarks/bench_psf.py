"""PSF estimation cost and accuracy (issue 16): ``python benchmarks/bench_psf.py [--sizes 2048 4096] [--compare]``.

For each size, a simulated raw-sky frame (Moffat β 3.5, FWHM 3.7 px varying ±4 % across x, the issue's star
density) is given to :func:`diffim_dag.psf.estimate.estimate_psf`; the table has the median wall time of 3 runs
(after one warm-up), split into the star finder and the model, and the FWHM error at the centre and at the
four corners against the simulator's truth.  Target: ≤ 1.5 s per exposure at 4096² on 2 cores.

``--compare`` also times, on the 2048² frame, the two library routes the issue names for the model:
photutils' ``EPSFBuilder`` run once per cell of a 3×3 grid (a spatially varying model built from the library
alone) and piff's ``PixelGrid`` with a ``BasisPolynomial`` interpolant (only when piff is installed: it is not
a dependency).  Measured on this 2-core machine (2026-12-02):

==============================================  ========  ==================================
route                                           time      FWHM error % (centre, 4 corners)
==============================================  ========  ==================================
estimate_psf, 2048² (188 stars, 3×3 grid)       0.51 s    −0.20, −0.19, +1.13, −0.93, +0.37
estimate_psf, 4096² (300 stars, 3×3 grid)       1.02 s    −0.25, +0.09, +0.50, −0.44, −0.07
photutils EPSFBuilder per 3×3 cell, 2048²       8.70 s    −0.41, +3.28, −2.06, +0.11, +5.65
piff 1.7.0 PixelGrid + BasisPolynomial(1), 213  35 s      (fit alone, 1.0 GB; not pursued)
==============================================  ========  ==================================

piff installs cleanly from wheels (with GalSim 2.8) but its fit alone took 35 s for the 213 stars of the
2048² frame (stamps cut beforehand; given the whole frame per star it ran out of memory), 70 times the
target.  photutils' builder is 1–2 s per model (the per-star astropy fits dominate) and its output is no better than
a re-centred stack where the PSF is well sampled; where it is undersampled (FWHM < 2.5 px) its oversampled
model is better (2.3 % against 4.4 % broad at FWHM 2.1), so estimate_psf uses it there for the mean model.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _frame(size: int, seed: int = 3):
    from diffim_dag.sim import SimConfig, simulate_pair

    pair = simulate_pair(SimConfig(size=size, seed=seed, psf_profile="moffat", moffat_beta=3.5, science_fwhm=3.7,
                                   science_fwhm_gradient=(0.08, 0.0), template_fwhm=2.7, sky_level=1060.0,
                                   n_stars=int(2600 * (size / 2048) ** 2), n_transients=20))
    return pair.science


def _inputs(exposure):
    img, _, msk = exposure.arrays()
    return img, (msk & exposure.bitmask(["BAD", "NO_DATA"])) != 0, (msk & exposure.bitmask("SAT")) != 0


def _errors(model, truth, shape) -> list[float]:
    n = shape[0] - 1
    pts = [(n / 2, n / 2), (0, 0), (n, 0), (0, n), (n, n)]
    return [100.0 * (model.fwhm(x, y) / truth.fwhm(x, y) - 1.0) for x, y in pts]


def bench(size: int, repeats: int = 3) -> dict:
    from diffim_dag.psf.estimate import estimate_psf, find_psf_stars

    exposure = _frame(size)
    img, bad, sat = _inputs(exposure)
    estimate_psf(img, bad=bad, saturated=sat)  # warm-up (imports, FFT plans)
    total, find = [], []
    est = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        find_psf_stars(img, bad, saturated=sat)
        find.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        est = estimate_psf(img, bad=bad, saturated=sat)
        total.append(time.perf_counter() - t0)
    t, f = statistics.median(total), statistics.median(find)
    return {"size": size, "total": t, "find": f, "model": t - f, "stars": est.report["stars_used"],
            "model_kind": est.report["model"], "errors": _errors(est.psf, exposure.psf, exposure.shape)}


def compare(size: int = 2048) -> list[tuple[str, float, list[float] | None]]:
    from diffim_dag.psf import GridPsf
    from diffim_dag.psf.estimate import _stamps, build_epsf, find_psf_stars

    exposure = _frame(size)
    img, bad, sat = _inputs(exposure)
    stars, info = find_psf_stars(img, bad, saturated=sat)
    used = stars[stars["reason"] == ""]
    h = info["stamp_size"] // 2
    rows = []
    t0 = time.perf_counter()
    n = 3
    images = np.empty((n, n, 2 * h + 1, 2 * h + 1))
    for j in range(n):
        for i in range(n):
            cell = used[(used["x"] >= i * size / n) & (used["x"] < (i + 1) * size / n)
                        & (used["y"] >= j * size / n) & (used["y"] < (j + 1) * size / n)].head(40)
            x, y = cell["x"].to_numpy(), cell["y"].to_numpy()
            ix, iy = np.round(x).astype(int), np.round(y).astype(int)
            st = _stamps(img, ix, iy, h).astype(np.float64) - cell["background"].to_numpy()[:, None, None]
            images[j, i] = build_epsf(st, np.ones_like(st), x - ix, y - iy, oversampling=2, max_iterations=6)
    nodes = (np.arange(n) + 0.5) * size / n - 0.5
    grid = GridPsf(images, nodes, nodes, normalized=True)
    rows.append(("photutils EPSFBuilder, 3x3 cells", time.perf_counter() - t0, _errors(grid, exposure.psf,
                                                                                           exposure.shape)))
    try:
        import galsim
        import piff
    except ImportError:
        rows.append(("piff (not installed)", float("nan"), None))
        return rows
    t0 = time.perf_counter()
    targets = []
    var = exposure.arrays()[1]
    for x, y in zip(used["x"], used["y"]):
        ix, iy = int(round(x)), int(round(y))
        sl = (slice(iy - 15, iy + 16), slice(ix - 15, ix + 16))
        im = galsim.Image(img[sl].astype(np.float64) - float(np.median(img[sl])), xmin=ix - 14, ymin=iy - 14)
        wt = galsim.Image(1.0 / var[sl].astype(np.float64), xmin=ix - 14, ymin=iy - 14)
        targets.append(piff.Star.makeTarget(x=x + 1, y=y + 1, image=im, weight=wt, stamp_size=25))
    model = piff.SimplePSF(piff.PixelGrid(scale=0.5, size=25), piff.BasisPolynomial(order=1), max_iter=10)
    model.fit(targets, {0: galsim.PixelScale(1.0)}, {0: None}, logger=None)
    rows.append((f"piff PixelGrid + BasisPolynomial(1), {len(targets)} stars", time.perf_counter() - t0, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="also time photutils per cell and piff (2048²)")
    args = parser.parse_args()
    print("| size | stars used | model | total s | star finder s | model s | FWHM error % (centre, 4 corners) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        r = bench(size, args.repeats)
        errs = ", ".join(f"{e:+.2f}" for e in r["errors"])
        print(f"| {size}² | {r['stars']} | {r['model_kind']} | {r['total']:.2f} | {r['find']:.2f} | {r['model']:.2f} | "
              f"{errs} |")
    if args.compare:
        print("\n| route (2048²) | time s | FWHM error % (centre, 4 corners) |")
        print("|---|---|---|")
        for name, seconds, errs in compare():
            e = "—" if errs is None else ", ".join(f"{v:+.2f}" for v in errs)
            print(f"| {name} | {seconds:.2f} | {e} |")


if __name__ == "__main__":
    main()
