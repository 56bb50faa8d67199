"""Public layer: subtract one (visit, detector), write the output contract, run the demo.

``subtract_exposures`` runs the stages in order — coverage check → variance
scaling → mode choice → kernel sources and per-cell kernel fits → spatial solve →
tiled convolve/subtract → decorrelate → quality metrics — with the tiled steps
as Dask graphs (``tiled=True``) or eagerly on one tile (``tiled=False``; the same
pure functions, used to prove tiled == eager).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import PipelineConfig, config_to_dict, load_config
from .errors import DiffimError, NoWorkFound
from .exposure import Exposure
from .io.atomic import atomic_path, atomic_write_text
from .io.fits import write_exposure
from .kernels.solution import CONVOLVE_SCIENCE, CONVOLVE_TEMPLATE, KernelSolution
from .stages import subtract as st

__all__ = ["SubtractionResult", "subtract_exposures", "write_outputs", "run_subtraction", "run_demo", "STAGES"]

log = logging.getLogger(__name__)

#: Stages of one (visit, detector) for each method, in order.
STAGES = {
    "al": ("read", "template warp (when the grids differ)", "kernel-source selection", "per-cell kernel fits",
           "spatial solve", "convolve/subtract (tiled)", "decorrelate", "detect/measure", "write"),
    "al-preconvolve": ("read", "template warp (when the grids differ)", "kernel-source selection",
                       "per-cell kernel fits", "spatial solve", "convolve/subtract (tiled)", "decorrelate",
                       "pre-convolve science", "pre-convolution kernel fit", "score and score decorrelation",
                       "detect on the score / measure on the difference", "write"),
    "zogy": ("read", "template warp (when the grids differ)", "flux ratio (zero points or matched stars)",
             "ZOGY cells: D, P_D, S, S_corr (one task per cell)", "blend cells",
             "detect on S_corr / measure on D", "write"),
}


class Timings(dict):
    """Per-stage wall times in seconds."""

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class SubtractionResult:
    """Everything one subtraction produced."""

    difference: Exposure
    matched_template: Exposure
    matched_science: Exposure
    mode: str
    kernel_fit: object  # stages.kernel_fit.KernelFitResult
    decorrelation_kernel: np.ndarray | None
    metrics: dict
    dia_sources: object = None  # pandas.DataFrame (detect/measure), None when not run
    paths: dict = field(default_factory=dict)

    @property
    def solution(self) -> KernelSolution:
        return self.kernel_fit.solution

    def summary_lines(self) -> list[str]:
        m = self.metrics
        q = m.get("quality", {})
        k = m.get("kernel") or {}
        lines = [
            f"method {m.get('method')}, mode {self.mode}"
            + (f"; kernel {k.get('kernel_size')} px, sum at centre {k.get('kernel_sum_center', float('nan')):.4f}; "
               f"{k.get('candidates', {}).get('used')} kernel stars used" if k else ""),
            f"difference: sky ratio {q.get('sky_ratio', float('nan')):.3f}, footprint residual ratio "
            f"{_fmt(q.get('footprint_residual_ratio_mean'))} ± {_fmt(q.get('footprint_residual_ratio_std'))}, verdict {q.get('verdict')}",
        ]
        if "template" in m and m["template"].get("warped"):
            lines.append(f"template warped onto the science grid (coverage {m['template'].get('coverage', float('nan')):.3f})")
        if "dia_sources" in m:
            d = m["dia_sources"]
            lines.append(f"DiaSources: {d['n']} ({d['n_negative']} negative, {d['n_dipoles']} dipoles) + {d['n_sky_sources']} sky sources")
        for name, path in self.paths.items():
            lines.append(f"wrote {name}: {path}")
        return lines


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def _variance_scaled(exposure: Exposure, config: PipelineConfig, role: str, metrics: dict) -> Exposure:
    img, var, msk = exposure.arrays()
    planes = exposure.mask_planes
    bad = (msk & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0
    factor = st.measure_variance_scale(
        img, var, bad, source=f"{role} ({exposure.info.filename or 'in memory'})", max_scale=config.subtract.max_variance_scale
    )
    metrics[f"{role}_variance_scale"] = factor
    if not config.subtract.scale_variance or abs(factor - 1.0) < 1e-3:
        return exposure
    return exposure.with_planes(variance=(var * np.float32(factor)).astype(np.float32))


def prepare_inputs(science: Exposure, template: Exposure, config: PipelineConfig, timings: Timings, metrics: dict):
    """Checks and steps every method starts with: one pixel grid, both PSFs, the merged mask planes,
    template coverage (:class:`NoWorkFound` below the minimum) and variance scaling.

    Returns ``(science, template, planes, coverage)`` (in-memory, variance-scaled exposures).
    """
    if science.shape != template.shape or science.xy0 != template.xy0:
        raise DiffimError(
            f"science {science.shape} at {science.xy0} and template {template.shape} at {template.xy0} "
            "are not on one pixel grid; warp the template first"
        )
    if science.psf is None or template.psf is None:
        raise DiffimError("both exposures need a PSF model (give --science-psf / --template-psf)")
    if science.is_lazy:
        science = science.load()
    if template.is_lazy:
        template = template.load()
    planes = science.mask_planes.merged(template.mask_planes)
    for name in ("EDGE", "SAT_TEMPLATE", "INJECTED_TEMPLATE", "NO_DATA"):
        planes = planes.with_plane(name)
    with timings.stage("coverage"):
        coverage = st.template_coverage(template.arrays()[2], science.arrays()[2], planes)
        metrics["template_coverage"] = coverage
        st.check_coverage(coverage, config.subtract.min_template_coverage)
    with timings.stage("variance_scaling"):
        science = _variance_scaled(science, config, "science", metrics)
        template = _variance_scaled(template, config, "template", metrics)
    return science, template, planes, coverage


def _decorrelation_inputs(mode, science, template, solution, bad_s, bad_t):
    from .kernels.decorrelate import clipped_mean_variance

    kernel = solution.kernel_at(*solution.center)
    kappa = float(kernel.sum())
    _, sv, _ = science.arrays()
    _, tv, _ = template.arrays()
    if mode == CONVOLVE_TEMPLATE:
        return kernel, clipped_mean_variance(sv, bad_s), clipped_mean_variance(tv, bad_t), kappa
    # convolveScience: the science is convolved with K/κ (unit sum)
    return kernel / kappa, clipped_mean_variance(tv, bad_t), clipped_mean_variance(sv, bad_s), 1.0


def subtract_exposures(
    science: Exposure,
    template: Exposure,
    *,
    config: PipelineConfig | None = None,
    client=None,
    tiled: bool = True,
    sources=None,
    detect: bool = False,
) -> SubtractionResult:
    """Alard–Lupton subtraction of ``template`` from ``science`` (same pixel grid).

    Parameters
    ----------
    science, template : Exposure
        With PSF models; the template must share the science pixel grid (warping is a separate stage).
    config : PipelineConfig
    client : distributed.Client, optional
        Where the tiled graphs run (threaded scheduler when None).
    tiled : bool
        Run convolution/subtraction/decorrelation tile by tile as Dask graphs (else eagerly on one tile).
    sources : pandas.DataFrame, optional
        Kernel-source catalog (columns x, y in parent pixels); detected on the science when None.
    detect : bool
        Also detect and measure DiaSources on the difference (``result.dia_sources``).
    """
    from .kernels.decorrelate import decorrelation_kernel_image
    from .kernels.maskops import template_mask_for_difference
    from .stages.kernel_fit import fit_psf_matching_kernel

    config = config or PipelineConfig()
    timings = Timings()
    metrics: dict = {"method": config.method}
    science, template, planes, coverage = prepare_inputs(science, template, config, timings, metrics)

    cx, cy = science.center
    mode = st.choose_mode(config.subtract.mode, science.psf, template.psf, cx, cy)
    metrics["mode"] = mode

    with timings.stage("kernel_fit"):
        try:
            from .graph import cell_mapper

            fit = fit_psf_matching_kernel(science, template, mode=mode, config=config.kernel,
                                          source_config=config.sources, sources=sources,
                                          map_cells=cell_mapper(client))
        except DiffimError as exc:
            if coverage < config.subtract.min_coverage_on_kernel_failure:
                raise NoWorkFound(
                    f"kernel fit failed ({exc}) with template coverage {100 * coverage:.1f}% "
                    f"< {100 * config.subtract.min_coverage_on_kernel_failure:.0f}%",
                    coverage=coverage,
                ) from exc
            raise
    solution = fit.solution
    metrics["kernel"] = dict(fit.diagnostics)
    kernel_sum = solution.kernel_sum_at_center()
    metrics["kernel"]["kernel_sum_center"] = kernel_sum
    _check_differential_background(solution, science, template, config, metrics)

    si, sv, sm = science.arrays()
    ti, tv, tm = template.arrays()
    decorr = config.decorrelation
    decorr_kernel = None
    if decorr.enabled:
        with timings.stage("decorrelation_kernel"):
            bad_s = (sm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0
            bad_t = (tm & planes.bitmask(["NO_DATA", "BAD", "SAT"])) != 0
            kernel, su2, sc2, kappa = _decorrelation_inputs(mode, science, template, solution, bad_s, bad_t)
            del bad_s, bad_t
            metrics["decorrelation"] = {"sigma_unconvolved2": su2, "sigma_convolved2": sc2, "kappa": kappa,
                                        "spatially_varying": bool(decorr.spatially_varying)}
            if not decorr.spatially_varying:
                decorr_kernel = decorrelation_kernel_image(kernel, sigma_u2=su2, sigma_c2=sc2, kappa=kappa)
    vu, vc = (sv, tv) if mode == CONVOLVE_TEMPLATE else (tv, sv)  # unconvolved / convolved input variances
    skip_bits = planes.bitmask([p for p in ("INJECTED", "INJECTED_TEMPLATE") if p in planes])
    kept = config.subtract.template_mask_planes_kept
    h = solution.half_width
    common = dict(mode=mode, subtract_background=config.subtract.subtract_background, xy0=science.xy0,
                  shape=science.shape, half_width=h, edge_bit=planes["EDGE"])
    keep_var_bits = planes.bitmask(["NO_DATA", "EDGE"])

    with timings.stage("convolve_subtract"):
        if tiled:
            # convolve → difference, stored tile by tile into preallocated outputs
            from . import graph

            tile = config.subtract.tile_size
            s_d = graph.planes_to_dask(si, sv, sm, tile)
            t_d = graph.planes_to_dask(ti, tv, tm, tile)
            t_d = (t_d[0], t_d[1], graph.template_mask_tiles(t_d[2], planes.as_dict(), kept=kept))
            ref_d, other_d = (t_d, s_d) if mode == CONVOLVE_TEMPLATE else (s_d, t_d)
            conv = graph.convolve_tiles(*ref_d, solution, half_width=h, xy0=science.xy0, skip_bits=skip_bits)
            # stored first: a single graph would hold every convolved tile until its difference tile ran
            conv_img, conv_var, conv_msk = graph.compute(*conv, client=client)
            conv = graph.planes_to_dask(conv_img, conv_var, conv_msk, tile)
            s_side, t_side = (other_d, conv) if mode == CONVOLVE_TEMPLATE else (conv, other_d)
            diff_d = graph.difference_tiles(s_side, t_side, kernel_sum=kernel_sum, background_solution=solution,
                                            **common)
            d_img, d_var, d_msk = graph.compute(*diff_d, client=client)
            del s_d, t_d, ref_d, other_d, conv, s_side, t_side, diff_d
        else:
            tm_rules = template_mask_for_difference(tm, planes.as_dict(), kept=kept)
            ref_planes, other_planes = ((ti, tv, tm_rules), (si, sv, sm)) if mode == CONVOLVE_TEMPLATE else (
                (si, sv, sm), (ti, tv, tm_rules))
            conv_img, conv_var, conv_msk = eager_convolve(ref_planes, solution, xy0=science.xy0, skip_bits=skip_bits)
            s_side, t_side = (other_planes, (conv_img, conv_var, conv_msk)) if mode == CONVOLVE_TEMPLATE else (
                (conv_img, conv_var, conv_msk), other_planes)
            d_img, d_var, d_msk = st.combine_tile(*s_side, *t_side, solution, kernel_sum, origin=science.xy0, **common)
            del tm_rules, ref_planes, other_planes, s_side, t_side

    if decorr_kernel is not None:
        with timings.stage("decorrelate"):
            if tiled:
                from . import graph

                tile = config.subtract.tile_size
                d_d, dv_d, dm_d = graph.planes_to_dask(d_img, d_var, d_msk, tile)
                vu_d = graph.planes_to_dask(vu, vu, vu, tile)[0]
                vc_d = graph.planes_to_dask(vc, vc, vc, tile)[0]
                d_img, d_var = graph.compute(
                    graph.filter_tiles(d_d, decorr_kernel, half_width=decorr_kernel.shape[0] // 2, xy0=science.xy0),
                    graph.decorrelated_variance_tiles(dv_d, dm_d, vu_d, vc_d, kappa=kappa, keep_bits=keep_var_bits),
                    client=client)
                del d_d, dv_d, dm_d, vu_d, vc_d
            else:
                d_img = st.apply_small_kernel_padded(d_img, decorr_kernel).astype(np.float32)
                d_var = st.decorrelated_variance(d_var, d_msk, vu, vc, kappa=kappa, keep_bits=keep_var_bits)

    if decorr.enabled and decorr.spatially_varying:
        with timings.stage("decorrelate_spatial"):
            from .kernels.decorrelate import decorrelate_spatial

            kfun = (lambda x, y: solution.kernel_at(x, y)) if mode == CONVOLVE_TEMPLATE else (
                lambda x, y: solution.kernel_at(x, y) / solution.kernel_sum_at(x, y))
            d_img, d_var = decorrelate_spatial(
                d_img, kernel_at=kfun, origin=science.xy0, grid_cells=decorr.grid_cells,
                sigma_u2=su2, sigma_c2=sc2, variance_unconvolved=vu, variance_convolved=vc)

    unconvolved = science if mode == CONVOLVE_TEMPLATE else template
    difference_psf = unconvolved.psf
    if decorr_kernel is not None:
        # decorrelation sharpens the difference: its PSF is the unconvolved PSF ⊗ the decorrelation kernel
        difference_psf = decorrelated_psf(unconvolved.psf, decorr_kernel, science.bbox)
    difference = Exposure.from_arrays(
        d_img, d_var, d_msk, xy0=science.xy0, mask_planes=planes, wcs=science.wcs, psf=difference_psf,
        info=science.info.replace(variance_source="propagated"), validate=False, copy=False,
    )
    if mode == CONVOLVE_TEMPLATE:
        matched_template = Exposure.from_arrays(conv_img, conv_var, conv_msk, xy0=science.xy0, mask_planes=planes,
                                                wcs=template.wcs, psf=science.psf, info=template.info, validate=False,
                                                copy=False)
        matched_science = science
    else:
        matched_template = template
        matched_science = Exposure.from_arrays(conv_img / np.float32(kernel_sum), conv_var / np.float32(kernel_sum**2),
                                               conv_msk, xy0=science.xy0, mask_planes=planes, wcs=science.wcs,
                                               psf=template.psf, info=science.info, validate=False,
                                               copy=False)

    with timings.stage("metrics"):
        used = fit.candidates[fit.candidates["status"] == "used"] if len(fit.candidates) else fit.candidates
        star_xy = np.column_stack([used["x"] - science.xy0[0], used["y"] - science.xy0[1]]) if len(used) else np.zeros((0, 2))
        psf_c = unconvolved.psf
        q = st.quality_metrics(
            science=matched_science.arrays()[0], difference=d_img, difference_variance=d_var, difference_mask=d_msk,
            planes=planes, star_xy=star_xy, fwhm=psf_c.fwhm(cx, cy),
            ratio_mean_limit=config.subtract.bad_subtraction_ratio_mean,
            ratio_std_limit=config.subtract.bad_subtraction_ratio_std,
        )
        metrics["quality"] = q
        good_bits = planes.bitmask(["NO_DATA", "BAD", "SAT", "EDGE"])
        limits = {}
        for role, exp in (("science", science), ("template", template), ("difference", difference)):
            img, var, msk = exp.arrays()
            step = max(1, int(np.sqrt(var.size / 2**20)))  # ~1M samples pin a median variance
            var, msk = var[::step, ::step], msk[::step, ::step]
            good = ((msk & good_bits) == 0) & (var > 0)
            sigma = float(np.sqrt(np.median(var[good]))) if good.any() else float("nan")
            zp = exp.info.photo_calib.zero_point if exp.info.photo_calib is not None else None
            limits[role] = st.limiting_magnitude(sigma, exp.psf.kernel_image(cx, cy), zp)
        metrics["limiting_magnitude"] = limits
    dia_sources = None
    if detect:
        from .graph import tile_mapper
        from .stages.detect import DetectMeasureConfig, detect_and_measure

        with timings.stage("detect_measure"):
            dcfg = DetectMeasureConfig.from_detection_config(config.detection, tile_size=config.subtract.tile_size)
            dia_sources = detect_and_measure(difference, science=matched_science, template=matched_template,
                                             config=dcfg, map_tiles=tile_mapper(client) if tiled else None)
            real = dia_sources[~dia_sources["sky_source"]]
            metrics["dia_sources"] = {
                "n": int(len(real)),
                "n_negative": int(real["is_negative"].sum()),
                "n_dipoles": int(real["is_dipole"].sum()) if "is_dipole" in real else None,
                "n_sky_sources": int(dia_sources["sky_source"].sum()),
            }
    metrics["timings_s"] = dict(timings)
    return SubtractionResult(
        difference=difference, matched_template=matched_template, matched_science=matched_science, mode=mode,
        kernel_fit=fit, decorrelation_kernel=decorr_kernel, metrics=metrics, dia_sources=dia_sources,
    )


def decorrelated_psf(psf, decorrelation_kernel: np.ndarray, bbox, *, nodes: int = 5):
    """``psf ⊗ φ`` as a :class:`~diffim_dag.psf.GridPsf` on ``nodes × nodes`` positions over ``bbox``
    (a single :class:`~diffim_dag.psf.ImagePsf` when the PSF does not vary)."""
    from scipy.signal import fftconvolve

    from .psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf

    x0, x1, y0, y1 = bbox
    size = psf.default_size((x0 + x1) / 2, (y0 + y1) / 2) + decorrelation_kernel.shape[0] - 1
    size += 1 - size % 2

    def at(x, y):
        img = fftconvolve(psf.kernel_image(x, y, size=size), decorrelation_kernel, mode="same")
        return img / img.sum()

    if isinstance(psf, (GaussianPsf, MoffatPsf, ImagePsf)):
        return ImagePsf(at(None, None), source="decorrelated difference PSF", normalized=True)
    xs = np.linspace(x0, x1 - 1, nodes)
    ys = np.linspace(y0, y1 - 1, nodes)
    images = np.stack([np.stack([at(x, y) for x in xs]) for y in ys])
    return GridPsf(images, xs, ys, source="decorrelated difference PSF", normalized=True)


def _check_differential_background(solution, science, template, config, metrics) -> None:
    """Record the fitted differential background in detection-σ units; warn when it is left in and large.

    A constant offset b in the difference shifts the matched-filter significance of every pixel by
    ``b √NEA / σ``; at half a σ a 5σ threshold already finds hundreds of false sources of one sign.
    """
    cx, cy = solution.center
    b = float(solution.background_at(cx, cy))
    var = float(np.median(science.arrays()[1])) + float(np.median(template.arrays()[1]))
    nea = 1.0 / float(np.sum(science.psf.kernel_image(cx, cy) ** 2))
    shift = abs(b) * np.sqrt(nea) / np.sqrt(max(var, 1e-30))
    metrics["differential_background"] = {"center": b, "detection_sigma": shift,
                                          "subtracted": bool(config.subtract.subtract_background)}
    if shift > 0.5 and not config.subtract.subtract_background:
        log.warning(
            "the fitted differential background (%.3g counts at the centre, %.2g sigma in detection units) is left "
            "in the difference; subtract the sky from both inputs or set subtract.subtract_background=true",
            b, shift)


def eager_convolve(planes, solution: KernelSolution, *, xy0, skip_bits: int):
    """The one-tile twin of :func:`diffim_dag.graph.convolve_tiles`."""
    from .kernels.convolve import convolve_spatial, convolve_variance_spatial
    from .kernels.maskops import dilate_mask

    img, var, msk = planes
    return (
        convolve_spatial(img, solution, origin=xy0).astype(np.float32),
        convolve_variance_spatial(var, solution, origin=xy0).astype(np.float32),
        dilate_mask(msk, solution.size, skip_bits=skip_bits).astype(np.int32),
    )


def _write_kernel(result: SubtractionResult, path: Path) -> None:
    from astropy.io import fits

    sol = result.solution
    meta, arrays = sol.to_payload()
    primary = fits.PrimaryHDU(sol.kernel_at(*sol.center).astype(np.float64))
    primary.header["KSUM"] = (sol.kernel_sum_at_center(), "kernel sum at the image centre")
    primary.header["MODE"] = (result.mode, "which image the kernel convolves")
    primary.header["SPORDER"] = (sol.spatial_order, "kernel spatial order (Chebyshev)")
    primary.header["BGORDER"] = (sol.background_order, "background spatial order (Chebyshev)")
    for i, v in enumerate(sol.bbox):
        primary.header[f"BBOX{i}"] = v
    hdus = [primary]
    for name, arr in arrays.items():
        hdus.append(fits.ImageHDU(np.asarray(arr, dtype=np.float64), name=name.upper()[:8] if len(name) <= 8 else {
            "basis": "BASIS", "kernel_coefficients": "KCOEFFS", "background_coefficients": "BGCOEFFS"}[name]))
    if result.decorrelation_kernel is not None:
        hdus.append(fits.ImageHDU(result.decorrelation_kernel.astype(np.float64), name="DECORR"))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def write_outputs(result: SubtractionResult, out_dir, *, plots: bool = False, config: PipelineConfig | None = None) -> dict:
    """Write the output contract into ``out_dir`` (every file atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    t0 = time.perf_counter()
    paths["difference"] = write_exposure(result.difference, out / "difference.fits")
    paths["matched_template"] = write_exposure(result.matched_template, out / "matched_template.fits")
    if getattr(result, "score", None) is not None:
        paths["score"] = write_exposure(result.score, out / "score.fits")
    if result.kernel_fit is not None:  # ZOGY has no matching kernel
        _write_kernel(result, out / "kernel.fits")
        paths["kernel"] = out / "kernel.fits"
    if result.dia_sources is not None:
        from .stages.detect import write_dia_sources

        paths["dia_sources"] = Path(write_dia_sources(result.dia_sources, out / "dia_sources.parquet"))
    if plots:
        paths.update(_write_plots(result, out / "plots"))
    result.metrics.setdefault("timings_s", {})["write"] = time.perf_counter() - t0
    metrics = dict(result.metrics)
    if config is not None:
        metrics["config"] = config_to_dict(config)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
    paths["metrics"] = out / "metrics.json"
    result.paths = {k: str(v) for k, v in paths.items()}
    return result.paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _write_plots(result: SubtractionResult, folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stages.kernel_fit import plot_candidates, plot_kernel_grid

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, exp in (("difference", result.difference), ("matched_template", result.matched_template)):
        img = exp.arrays()[0]
        lo, hi = np.percentile(img, [1, 99])
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(name)
        p = folder / f"{name}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        paths[f"plot_{name}"] = p
    if result.kernel_fit is None:
        return paths
    p = folder / "kernel_grid.png"
    with atomic_path(p) as tmp:
        plot_kernel_grid(result.solution, result.solution.bbox, tmp)
    paths["plot_kernel_grid"] = p
    p = folder / "kernel_candidates.png"
    with atomic_path(p) as tmp:
        plot_candidates(result.matched_science.arrays()[0], result.kernel_fit.candidates, tmp)
    paths["plot_kernel_candidates"] = p
    p = folder / "residual_stamps.png"
    with atomic_path(p) as tmp:
        _plot_residual_stamps(result, tmp)
    paths["plot_residual_stamps"] = p
    return paths


def _plot_residual_stamps(result: SubtractionResult, path) -> None:
    import matplotlib.pyplot as plt

    cands = result.kernel_fit.candidates
    used = cands[cands["status"] == "used"].head(8) if len(cands) else cands
    n = max(len(used), 1)
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    sci = result.matched_science.arrays()[0]
    tmp_img = result.matched_template.arrays()[0]
    diff = result.difference.arrays()[0]
    x0, y0 = result.difference.xy0
    for j, (_, row) in enumerate(used.iterrows()):
        ix, iy = int(round(row["x"] - x0)), int(round(row["y"] - y0))
        sl = (slice(max(iy - 12, 0), iy + 13), slice(max(ix - 12, 0), ix + 13))
        vmax = float(np.abs(sci[sl]).max()) or 1.0
        for i, (img, title) in enumerate(((sci, "science"), (tmp_img, "template"), (diff, "difference"))):
            axes[i, j].imshow(img[sl], origin="lower", cmap="gray", vmin=-0.1 * vmax, vmax=vmax if i < 2 else 0.1 * vmax)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, n_workers: int | None = None, threads_per_worker: int = 1,
                memory_limit: str = "auto"):
    """A distributed client: to ``scheduler`` when given, else to a new LocalCluster (workers = cores)."""
    import warnings

    from .graph import make_client

    # in-memory exposures travel to the workers inside the graph (one visit: tens of MB)
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    client, cluster = make_client(scheduler, n_workers=n_workers, threads_per_worker=threads_per_worker,
                                  memory_limit=memory_limit)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_subtraction(science: Exposure, template: Exposure | None, *, config: PipelineConfig, out_dir, scheduler=None,
                    client=None, plots: bool = False, warp: bool | None = None,
                    template_store=None) -> SubtractionResult:
    """Warp when needed, subtract, detect and measure, on a cluster, and write the outputs.

    Runs on ``client``, or on ``scheduler``, or on a new LocalCluster.  ``warp=None`` warps the
    template when the pixel grids differ by more than 0.01 px; ``warp=False`` declares one grid;
    ``template_store`` (a folder of patches) replaces ``template``.
    """
    if client is not None:
        result = _prepare_and_subtract(science, template, config, client, warp, template_store)
    else:
        cc = config.cluster
        with dask_client(scheduler or cc.scheduler, n_workers=cc.n_workers, threads_per_worker=cc.threads_per_worker,
                         memory_limit=cc.memory_limit) as c:
            result = _prepare_and_subtract(science, template, config, c, warp, template_store)
    write_outputs(result, out_dir, plots=plots, config=config)
    return result


def subtract_by_method(science: Exposure, template: Exposure, *, config: PipelineConfig, client=None,
                       tiled: bool = True, detect: bool = True) -> SubtractionResult:
    """Dispatch on ``config.method``: ``al`` (:func:`subtract_exposures`), ``al-preconvolve`` (score image)
    or ``zogy`` (D and S_corr); the score methods return a result with a ``score`` exposure."""
    if config.method == "al":
        return subtract_exposures(science, template, config=config, client=client, tiled=tiled, detect=detect)
    if config.method == "al-preconvolve":
        from .stages.preconvolve import subtract_al_preconvolve

        return subtract_al_preconvolve(science, template, config=config, client=client, tiled=tiled, detect=detect)
    from .stages.zogy import subtract_zogy

    return subtract_zogy(science, template, config=config, zogy_config=config.zogy, client=client, tiled=tiled,
                         detect=detect)


def _prepare_and_subtract(science, template, config, client, warp, template_store):
    """Bring the template onto the science grid (warp / store / registration), then subtract and detect."""
    from .stages.template import prepare_template

    t0 = time.perf_counter()
    template, warp_metrics = prepare_template(science, template, store=template_store, warp=warp)
    t_warp = time.perf_counter() - t0
    result = subtract_by_method(science, template, config=config, client=client, detect=True)
    result.metrics["template"] = warp_metrics
    result.metrics["timings_s"] = {"template_warp": t_warp, **result.metrics["timings_s"]}
    return result


def run_demo(*, out_dir="demo_out", size: int = 1024, seed: int = 1, pipeline=None, overrides=(), scheduler=None,
             plots: bool = False) -> int:
    """Simulate a pair, write it, read it back and run every stage of the configured method on a LocalCluster."""
    from .io.fits import read_exposure
    from .sim import SimConfig, simulate_pair, write_pair

    config = load_config(pipeline, list(overrides))
    out = Path(out_dir)
    print(f"diffim-dag demo: method {config.method}; stages of one (visit, detector):")
    for name in STAGES[config.method]:
        print(f"  [run] {name}")
    t0 = time.perf_counter()
    # sky-subtracted, like the calibrated exposures and coadds a survey subtracts
    pair = simulate_pair(SimConfig(size=size, seed=seed, sky_subtracted=True))
    inputs = write_pair(pair, out / "inputs")
    print(f"simulated a {size}x{size} pair (seed {seed}): {len(pair.truth)} injected objects -> {out / 'inputs'}")
    science = read_exposure(inputs["science"])
    template = read_exposure(inputs["template"])
    result = run_subtraction(science, template, config=config, out_dir=out, scheduler=scheduler, plots=plots)
    for line in result.summary_lines():
        print(line)
    print(_recovery_line(result.dia_sources, pair.truth))
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def _recovery_line(dia_sources, truth, *, radius: float = 2.0, min_snr: float = 7.0) -> str:
    """How many injected transients (S/N ≥ min_snr in the difference) the catalog holds within ``radius`` px."""
    real = dia_sources[~dia_sources["sky_source"]]
    inj = truth[truth["kind"].isin(["transient", "negative_transient"]) & (truth["snr_difference"] >= min_snr)]
    if not len(inj):
        return f"{len(real)} DiaSources detected"
    found = 0
    for _, row in inj.iterrows():
        if len(real) and (np.hypot(real["x"] - row["x"], real["y"] - row["y"]) <= radius).any():
            found += 1
    return (f"{len(real)} DiaSources detected; {found}/{len(inj)} injected transients with S/N ≥ {min_snr:g} "
            f"recovered within {radius:g} px")
