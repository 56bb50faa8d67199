"""Detection stages of a visit (tasks of its graph, :mod:`diffim_dag.visit`): the whole-image part
(:func:`prepare_detection_stage`), the tiles (:func:`detect_tiles_stage`), the stitched DiaSource catalogue
(:func:`catalog_stage`), and the verdict on the finished result (:func:`judge_result`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import PipelineConfig
from . import subtract as st
from .inputs import SubtractionResult

__all__ = ["judge_result", "detection_config", "prepare_detection_stage", "DetectedTiles", "detect_tiles_stage",
           "CatalogStage", "catalog_stage", "with_catalog"]


def judge_result(result: SubtractionResult, config: PipelineConfig) -> SubtractionResult:
    """``result`` with its verdict (:func:`~diffim_dag.stages.verdict.judge`) in ``metrics["quality"]``."""
    from .verdict import judge

    q = judge(result.metrics, result.dia_sources, shape=result.difference.shape, subtract_config=config.subtract,
              n_sky_requested=config.detection.n_sky_sources)
    result.metrics = {**result.metrics, "quality": q}
    return result


def detection_config(config: PipelineConfig, result=None, *, fft_workers: int = 1):
    """The :class:`~diffim_dag.stages.detect.DetectMeasureConfig` of a pipeline (tiles = subtraction tiles).

    ``result`` (a subtraction result) supplies the PSF-matching kernel's size for
    ``detection.systematic_radius="kernel"``.  ``fft_workers``: FFT threads of the matched filters (an
    in-process run has the machine to itself; a task on a Dask worker keeps 1).
    """
    from .detect import DetectMeasureConfig

    kernel_size = None
    if result is not None:
        kernel_size = (getattr(result, "metrics", None) or {}).get("kernel", {}).get("kernel_size")
    return DetectMeasureConfig.from_detection_config(config.detection, kernel_size=kernel_size,
                                                     fft_workers=int(fft_workers))


def prepare_detection_stage(result: SubtractionResult, config: PipelineConfig, *, fft_workers: int = 1):
    """Stage 8: the whole-image part of detection (:func:`~diffim_dag.stages.detect.prepare_detection`).

    Detection runs on the difference's matched filter, or on the significance of ``result.score``
    when the method made a score image (``al-preconvolve``, ``zogy``); measurement is on the
    difference, forced photometry on the matched science and template.
    """
    from .detect import prepare_detection

    score = None
    detection = detection_config(config, result, fft_workers=fft_workers)
    if getattr(result, "score", None) is not None:
        from .zogy import score_significance

        # not detected where the score took filled pixels (saturated, bad, missing, off the template's edge)
        score = score_significance(result.score, detection.score_excluded_mask_planes)
    return prepare_detection(result.difference, science=result.matched_science, template=result.matched_template,
                             config=detection, score=score)


@dataclass(eq=False)
class DetectedTiles:
    """Stage 9's output: ``{tile index: TileResult}`` of some tiles and the wall time."""

    tiles: dict
    seconds: float

    def __sizeof__(self) -> int:
        return 1024 + sum(int(r.catalog.memory_usage(deep=False).sum()) + 2048 * len(r.footprints)
                          for r in self.tiles.values())


def detect_tiles_stage(inputs, indices=None, *, map_tiles=None) -> DetectedTiles:
    """Stage 9: detect and measure the tiles ``indices`` (all when None) of the detection ``inputs``.

    ``map_tiles(function, list_of_kwargs)`` runs them (:func:`diffim_dag.graph.tile_mapper`); in turn when None.
    """
    from .detect import _detect_measure_task, detect_tiles

    t0 = time.perf_counter()
    if map_tiles is None:
        tiles = detect_tiles(inputs, indices)
    else:
        idx = list(range(len(inputs.tiles()))) if indices is None else [int(k) for k in indices]
        tiles = dict(zip(idx, map_tiles(_detect_measure_task, [inputs.tile_kwargs(k) for k in idx])))
    return DetectedTiles(tiles=tiles, seconds=time.perf_counter() - t0)


@dataclass(eq=False)
class CatalogStage:
    """Stage 10's output: the DiaSource catalogue, its counts (``metrics``) and the detection wall time."""

    dia_sources: object
    metrics: dict
    seconds: float

    def __sizeof__(self) -> int:
        return 1024 + int(self.dia_sources.memory_usage(deep=False).sum())


def catalog_stage(inputs, detected) -> CatalogStage:
    """Stage 10: stitch the tiles of ``detected`` (sequence of :class:`DetectedTiles` covering every tile),
    add sky sources, ids and RA/Dec (:func:`~diffim_dag.stages.detect.finish_catalog`)."""
    from .detect import finish_catalog

    t0 = time.perf_counter()
    results: dict = {}
    for d in detected:
        results.update(d.tiles)
    dia_sources = finish_catalog(inputs, [results[k] for k in sorted(results)])
    real = dia_sources[~dia_sources["sky_source"]]
    metrics = {"dia_sources": {
        "n": int(len(real)),
        "n_negative": int(real["is_negative"].sum()),
        "n_dipoles": int(real["is_dipole"].sum()) if "is_dipole" in real else None,
        "n_sky_sources": int(dia_sources["sky_source"].sum()),
        "sky_source_room": dia_sources.attrs.get("sky_source_room"),
        "systematic_fraction": dia_sources.attrs.get("systematic_fraction"),
        "significance_stdev": dia_sources.attrs.get("significance_stdev"),
    }}
    seconds = inputs.seconds + sum(d.seconds for d in detected) + time.perf_counter() - t0
    return CatalogStage(dia_sources=dia_sources, metrics=metrics, seconds=seconds)


def with_catalog(result: SubtractionResult, catalog: CatalogStage) -> SubtractionResult:
    """A copy of ``result`` with the catalogue, its counts and the ``detect_measure`` time."""
    import dataclasses

    metrics = {**result.metrics, **catalog.metrics}
    timings = dict(metrics.get("timings_s", {}))
    timings["detect_measure"] = timings.get("detect_measure", 0.0) + catalog.seconds
    factor = catalog.metrics["dia_sources"].get("significance_stdev")
    limits = metrics.get("limiting_magnitude") or {}
    if factor and "difference" in limits and "noise_factor" not in limits["difference"]:
        # the 5σ that detection reaches: σ as measured on the significance (correlated noise included)
        metrics["limiting_magnitude"] = {**limits, "difference": st.detection_limit(limits["difference"], factor)}
    metrics["timings_s"] = timings
    return dataclasses.replace(result, dia_sources=catalog.dia_sources, metrics=metrics)


