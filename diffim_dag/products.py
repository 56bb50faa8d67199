"""The output set of one subtraction: the files of ``--out`` (FITS planes, kernel, catalogues, metrics, the
fakes' tables and plots), written into a temporary folder and installed whole (:func:`write_output_set`)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import PipelineConfig, config_to_dict
from .io.atomic import atomic_path, atomic_write_text
from .io.fits import unswappable, write_exposure
from .io.outputs import make_folder, output_set

if TYPE_CHECKING:
    from .stages.inputs import SubtractionResult

__all__ = ["write_planes", "write_outputs", "write_output_set"]


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
        hdus.append(fits.ImageHDU(unswappable(arr, np.float64), name=name.upper()[:8] if len(name) <= 8 else {
            "basis": "BASIS", "kernel_coefficients": "KCOEFFS", "background_coefficients": "BGCOEFFS"}[name]))
    if result.decorrelation_kernel is not None:
        hdus.append(fits.ImageHDU(result.decorrelation_kernel.astype(np.float64), name="DECORR"))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp)


def write_planes(result: SubtractionResult, out_dir) -> dict:
    """The outputs that the subtraction fixes before detection — the difference, matched template (and score)
    exposures, the kernel and its candidates — written into ``out_dir`` (every file atomically); returns
    ``{name: path}``.  Detection reads the same planes while they are written (the write task of a single
    subtraction runs beside it): :func:`~diffim_dag.io.fits.write_exposure` never byte-swaps them in place."""
    out = Path(out_dir)
    make_folder(out)
    paths = {}
    paths["difference"] = write_exposure(result.difference, out / "difference.fits")
    paths["matched_template"] = write_exposure(result.matched_template, out / "matched_template.fits")
    if getattr(result, "score", None) is not None:
        paths["score"] = write_exposure(result.score, out / "score.fits")
    if result.kernel_fit is not None:  # ZOGY has no matching kernel
        _write_kernel(result, out / "kernel.fits")
        paths["kernel"] = out / "kernel.fits"
        with atomic_path(out / "kernel_candidates.parquet") as tmp:
            result.kernel_fit.candidates.to_parquet(tmp, index=False)
        paths["kernel_candidates"] = out / "kernel_candidates.parquet"
    return paths


def write_outputs(result: SubtractionResult, out_dir, *, plots: bool = False, config: PipelineConfig | None = None,
                  planes: dict | None = None) -> dict:
    """Write the output contract into ``out_dir`` (every file atomically).

    ``planes``: the ``{name: path}`` of :func:`write_planes` already written into ``out_dir`` (by the
    ``write-planes`` task), taken as they are while they are all there (a retried write task finds the folder
    its first attempt removed: then they are written again)."""
    out = Path(out_dir)
    make_folder(out)
    t0 = time.perf_counter()
    if planes is not None and all(Path(v).is_file() for v in planes.values()):
        paths = {k: Path(v) for k, v in planes.items()}
    else:
        paths = write_planes(result, out)
    if result.dia_sources is not None:
        from .stages.detect import write_dia_sources

        paths["dia_sources"] = Path(write_dia_sources(result.dia_sources, out / "dia_sources.parquet"))
    if result.injection is not None:
        from .stages.inject import write_completeness

        with atomic_path(out / "injection.parquet") as tmp:
            result.injection.table.to_parquet(tmp, index=False)
        paths["injection"] = out / "injection.parquet"
        paths.update(write_completeness(result.injection.table, result.injection.summary, out))
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

    make_folder(folder)
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


def write_output_set(result: SubtractionResult, out_dir, *, plots: bool = False, config: PipelineConfig | None = None,
                     before_install=None, staged=None) -> dict:
    """:func:`write_outputs` into a temporary folder beside ``out_dir``, installed as a whole with its
    completion manifest (:func:`~diffim_dag.io.outputs.output_set`); ``result.paths`` name the final files.

    ``before_install(tmp)`` may write more into the set (the demo's inputs).  ``staged``: the
    :class:`~diffim_dag.visit_outputs.StagedPlanes` of the ``write-planes`` task — the set's temporary
    folder, already holding the planes (and their checksums)."""
    final = Path(out_dir)
    with output_set(final, extra={"method": result.metrics.get("method")},
                    folder=None if staged is None else Path(staged.folder),
                    entries=None if staged is None else staged.entries) as tmp:
        if before_install is not None:
            before_install(tmp)
        if staged is not None:
            result.metrics.setdefault("timings_s", {})["write_planes"] = staged.seconds
        write_outputs(result, tmp, plots=plots, config=config, planes=None if staged is None else staged.paths)
        inside = dict(result.paths)
    result.paths = {k: str(final / Path(v).relative_to(tmp)) for k, v in inside.items()}
    return result.paths
