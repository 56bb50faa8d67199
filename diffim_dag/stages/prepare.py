"""The input stages of a visit, as every method starts from them: one exposure's PSF, sky and cosmic rays
(:func:`prepare_exposure`), both exposures (:func:`prepare_exposures`), and the fakes added to them
(:func:`inject_stage`) and matched to the DiaSources (:func:`match_stage`).

Each is a function of exposures and the frozen config; the visit graph (:mod:`diffim_dag.visit`) makes each
one a task.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..config import PipelineConfig
from ..exposure import Exposure
from .catalog import CatalogStage
from .inputs import SubtractionResult, Timings, _nbytes, input_variance_scale

__all__ = ["PreparedExposures", "prepare_exposure", "prepare_exposures", "combine_prepared", "inject_stage", "match_stage",
           "with_injection"]


@dataclass(eq=False)
class PreparedExposures:
    """Both exposures as every method starts from them: sky removed, PSF models attached.

    ``metrics`` holds ``sky`` and ``psf`` (one report per role) and ``timings`` their wall times;
    ``variance_scales`` the factors (``{"science"|"template": factor}``) that bring these exposures' variance
    planes to their measured noise (:func:`~diffim_dag.stages.inputs.input_variance_scale`), None when they are
    to be measured (fakes were added since).
    """

    science: Exposure
    template: Exposure
    metrics: dict
    timings: dict
    fakes: object = None  # pandas.DataFrame of the fakes injected (inject_stage), None without
    variance_scales: dict | None = None

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees (an exposure a task took is None)
        return 1024 + sum(_nbytes(e) for e in (self.science, self.template) if e is not None)


def inject_stage(prepared, config: PipelineConfig, kernel=None):
    """The ``inject`` stage: ``config.fakes`` point sources added to both exposures of ``prepared`` (a
    :class:`PreparedPair` or :class:`PreparedExposures`; :func:`~diffim_dag.stages.inject.inject_fakes`),
    returned with ``fakes``; ``prepared`` itself when no fakes are configured.

    ``al`` injects after the spatial solve, so the kernel is fitted on the images without fakes (a fake
    is no static source, and in a small image their masks would leave no kernel source); the score
    methods inject before their subtraction.  No fake sits within the matching kernel's half-width
    (``kernel``'s, else ``kernel.max_kernel_size``'s) of the edge, where the difference has no data.
    """
    import dataclasses

    from .inject import inject_fakes

    if not config.fakes.enabled:
        return prepared
    t0 = time.perf_counter()
    border = kernel.fit.solution.half_width if kernel is not None else config.kernel.max_kernel_size // 2
    science, template, fakes = inject_fakes(prepared.science, prepared.template, config.fakes, border=border)
    fakes.attrs["seconds"] = time.perf_counter() - t0  # travels with the table to the match stage
    timings = {**prepared.timings, "inject": fakes.attrs["seconds"]}
    changes = {"variance_scales": None} if isinstance(prepared, PreparedExposures) else {}  # (the planes changed)
    return dataclasses.replace(prepared, science=science, template=template, fakes=fakes, timings=timings, **changes)


def match_stage(result: SubtractionResult, catalog, fakes, config: PipelineConfig):
    """The ``match`` stage: the fakes matched to the DiaSources (``catalog``: a :class:`CatalogStage` or a
    DataFrame) of ``result`` (:func:`~diffim_dag.stages.inject.match_fakes`); None without fakes."""
    from .inject import match_fakes

    if fakes is None:
        return None
    t0 = time.perf_counter()
    dia, metrics = catalog, result.metrics
    if isinstance(catalog, CatalogStage):
        dia, metrics = catalog.dia_sources, {**result.metrics, **catalog.metrics}
    injection = match_fakes(fakes, dia, result.difference, metrics, config.fakes)
    injection.summary["seconds"] = time.perf_counter() - t0
    injection.summary["inject_seconds"] = fakes.attrs.get("seconds")
    return injection


def with_injection(result: SubtractionResult, injection) -> SubtractionResult:
    """``result`` with the matched fakes and their summary in ``metrics["injection"]`` (unchanged for None)."""
    if injection is None:
        return result
    import dataclasses

    metrics = {**result.metrics, "injection": {k: v for k, v in injection.summary.items()
                                               if k not in ("seconds", "inject_seconds")}}
    timings = dict(metrics.get("timings_s", {}))
    timings["match"] = injection.summary.get("seconds", 0.0)
    if injection.summary.get("inject_seconds") is not None:
        timings["inject"] = injection.summary["inject_seconds"]
    metrics["timings_s"] = timings
    return dataclasses.replace(result, injection=injection, metrics=metrics)


def prepare_exposure(exposure: Exposure, config: PipelineConfig, role: str, *, psf=None, scale: bool = True):
    """The input stages of one exposure: PSF (:mod:`~diffim_dag.stages.psf`; ``psf``, a
    :class:`~diffim_dag.stages.psf.PsfResult` already computed, skips it), sky (:mod:`~diffim_dag.stages.sky`),
    cosmic rays and hot pixels (:mod:`~diffim_dag.stages.cosmic_rays`), and the factor that brings the result's
    variance plane to its measured noise (:func:`~diffim_dag.stages.inputs.input_variance_scale`; the methods
    apply it), measured here so that the science's and the template's run at once (``scale=False``: not
    measured; the caller measures it with :func:`variance_scale_stage`).

    Returns ``(exposure, {"psf": report, "sky": report, "cosmic_rays": report, "variance_scale": factor,
    "alignment_stars": stars}, timings)`` (no ``variance_scale`` without ``scale``; ``alignment_stars``, with a PSF
    estimated here only: its brightest stars at their centroids, parent ``x, y`` and flux,
    :func:`~diffim_dag.stages.template.centroided_stars`, which an alignment check after a warp matches).
    """
    from .cosmic_rays import repair_cosmic_rays
    from .psf import measure_psf
    from .sky import subtract_sky

    timings = Timings()
    if exposure.is_lazy:
        exposure = exposure.load()
    with timings.stage("psf"):
        result = psf if psf is not None else measure_psf(exposure, config.psf, role=role)
    if psf is not None:
        timings["psf"] = timings.get("psf", 0.0) + getattr(psf, "seconds", 0.0)
    stars = None
    if psf is None and result.stars is not None:  # (a PsfResult handed in may be of other pixels)
        from .template import centroided_stars

        with timings.stage("psf"):  # (on the pixels the table was measured on: before the sky stage)
            stars = centroided_stars(exposure.arrays()[0], result.stars, result.fwhm_guess)
            stars[:, :2] += exposure.xy0
    exposure = exposure.with_attrs(psf=result.psf)
    with timings.stage("sky"):
        sky = subtract_sky(exposure, config.sky)
    with timings.stage("cosmic_rays"):
        # the sky stage's image is a fresh plane of its own (nothing else holds it): repaired where it is
        own = not np.may_share_memory(sky.exposure.arrays()[0], exposure.arrays()[0])
        cr = repair_cosmic_rays(sky.exposure, config.cosmic_rays, own_image=own)
    reports = {"psf": result.report, "sky": sky.report, "cosmic_rays": cr.report}
    if stars is not None:
        reports["alignment_stars"] = stars
    if scale:
        with timings.stage("variance_scaling"):
            reports["variance_scale"] = input_variance_scale(cr.exposure, config, role)
    return cr.exposure, reports, timings


def variance_scale_stage(prepared, config: PipelineConfig, role: str):
    """The variance factor of a :func:`prepare_exposure` result made with ``scale=False``, added to it: the same
    ``(exposure, reports, timings)`` as with ``scale``."""
    exposure, reports, timings = prepared
    timings = Timings(timings)
    with timings.stage("variance_scaling"):
        factor = input_variance_scale(exposure, config, role)
    return exposure, {**reports, "variance_scale": factor}, timings


def prepare_exposures(science: Exposure, template: Exposure, config: PipelineConfig, *,
                      psfs: dict | None = None) -> PreparedExposures:
    """:func:`prepare_exposure` of the science and of the template (the visit graph runs the two as separate
    ``exposure`` tasks, at once).

    ``psfs`` maps ``"science"``/``"template"`` to a :class:`~diffim_dag.stages.psf.PsfResult`
    already computed; the others are measured here.
    """
    done = {role: prepare_exposure(exposure, config, role, psf=(psfs or {}).get(role))
            for role, exposure in (("science", science), ("template", template))}
    return combine_prepared(done)


def combine_prepared(done: dict) -> PreparedExposures:
    """Both exposures' :func:`prepare_exposure` results (``{"science": ..., "template": ...}``) as one
    :class:`PreparedExposures` (``timings``: the sum over both, as in turn)."""
    timings = Timings()
    metrics: dict = {"sky": {}, "psf": {}, "cosmic_rays": {}}
    out, scales = {}, {}
    for role in ("science", "template"):
        exposure, reports, t = done[role]
        out[role] = exposure
        for name, report in reports.items():
            if name == "variance_scale":
                scales[role] = report
            elif name != "alignment_stars":  # (the inputs stage's, not a metric)
                metrics[name][role] = report
        for name, seconds in t.items():
            timings[name] = timings.get(name, 0.0) + seconds
    return PreparedExposures(science=out["science"], template=out["template"], metrics=metrics, timings=timings,
                             variance_scales=scales if len(scales) == 2 else None)


