"""What every subtraction method starts from and returns: the stage timer, the result type, the checks and
variance scaling of the pair on one grid (:func:`prepare_inputs`), and the one-tile convolution.

Below both the AL driver (:mod:`diffim_dag.pipeline`) and the score methods (:mod:`.zogy`,
:mod:`.preconvolve`), so that neither imports the other's orchestration.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import PipelineConfig
from ..errors import DiffimError
from ..exposure import Exposure
from ..kernels.solution import KernelSolution
from . import subtract as st
from ..kernels.maskops import FlaggedPixels

__all__ = ["Timings", "SubtractionResult", "input_variance_scale", "prepare_inputs", "eager_convolve"]


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
    injection: object = None  # stages.inject.InjectionResult when fakes were injected

    @property
    def solution(self) -> KernelSolution:
        return self.kernel_fit.solution

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees when a task returns the result
        exposures = [self.difference, self.matched_template, self.matched_science, getattr(self, "score", None)]
        return 4096 + sum(_nbytes(e) for e in exposures if e is not None)

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
        for reason in q.get("verdict_reasons") or []:
            lines.append(f"  bad_subtraction: {reason}")
        for role, rep in (m.get("psf") or {}).items():
            if rep.get("origin") == "estimated":
                lines.append(f"{role} PSF estimated from {rep.get('stars_used')} stars ({rep.get('model')}): FWHM "
                             f"{rep.get('fwhm_center', float('nan')):.2f} px at the centre, "
                             f"{rep.get('fwhm_min', float('nan')):.2f}–{rep.get('fwhm_max', float('nan')):.2f} over the image")
        if "template" in m and m["template"].get("warped"):
            lines.append(f"template warped onto the science grid (coverage {m['template'].get('coverage', float('nan')):.3f})")
        if "dia_sources" in m:
            d = m["dia_sources"]
            lines.append(f"DiaSources: {d['n']} ({d['n_negative']} negative, {d['n_dipoles']} dipoles) + {d['n_sky_sources']} sky sources")
        if "injection" in m:
            j = m["injection"]
            placed = "" if j["n_injected"] == j.get("n_requested") else f" (placed {j['n_injected']} of {j.get('n_requested')})"
            lines.append(f"fakes: {j['n_recovered']}/{j['n_injected']} recovered{placed}; blank sky 50 % at {_fmt(j.get('m50'))} mag "
                         f"(5σ limit {_fmt(j.get('limiting_magnitude_5sigma'))}, {j['magnitude_system']}), 90 % at "
                         f"{_fmt(j.get('m90'))}; S/N ≥ 10 recovered {_fmt(j.get('completeness_snr_ge_10'))}; flux ratio "
                         f"{_fmt(j['flux'].get('median_ratio'))} at S/N ≥ 20")
        for name, path in self.paths.items():
            lines.append(f"wrote {name}: {path}")
        return lines


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


def input_variance_scale(exposure: Exposure, config: PipelineConfig, role: str) -> float:
    """The factor that brings ``exposure``'s variance plane to its measured pixel noise
    (:func:`~diffim_dag.stages.subtract.measure_variance_scale`, off its NO_DATA, BAD and SAT pixels);
    :class:`~diffim_dag.errors.InputError` when it is beyond ``subtract.max_variance_scale``."""
    img, var, msk = exposure.arrays()
    bad = FlaggedPixels(msk, exposure.mask_planes.bitmask(["NO_DATA", "BAD", "SAT"]))  # (read in its windows)
    how = exposure.info.variance_source
    # a plane the file did not carry is the one built from the image's own noise: the message says which
    plane = "VARIANCE plane" if how in (None, "VARIANCE plane") else f"its variance (built from {how})"
    return st.measure_variance_scale(img, var, bad, source=f"{role} ({exposure.info.filename or 'in memory'})",
                                     max_scale=config.subtract.max_variance_scale, plane=plane)


def _variance_scaled(exposure: Exposure, config: PipelineConfig, role: str, metrics: dict,
                     factor: float | None = None) -> Exposure:
    """``exposure`` with its variance scaled by ``factor`` (:func:`input_variance_scale`, measured here when
    None), when ``subtract.scale_variance`` is on."""
    if factor is None:
        factor = input_variance_scale(exposure, config, role)
    metrics[f"{role}_variance_scale"] = factor
    if not config.subtract.scale_variance or abs(factor - 1.0) < 1e-3:
        return exposure
    var = exposure.arrays()[1]
    return exposure.with_planes(variance=(var * np.float32(factor)).astype(np.float32, copy=False))


def prepare_inputs(science: Exposure, template: Exposure, config: PipelineConfig, timings: Timings, metrics: dict,
                   variance_scales: dict | None = None):
    """Checks and steps every method starts with: one pixel grid, both PSFs, the merged mask planes,
    template coverage (:class:`NoWorkFound` below the minimum) and variance scaling.

    ``variance_scales``: ``{"science"|"template": factor}`` measured on these very exposures already (the input
    stages' :func:`input_variance_scale`); those not given are measured here.

    Returns ``(science, template, planes, coverage)`` (in-memory, variance-scaled exposures).
    """
    if science.shape != template.shape or science.xy0 != template.xy0:
        raise DiffimError(
            f"science {science.shape} at {science.xy0} and template {template.shape} at {template.xy0} "
            "are not on one pixel grid; warp the template first"
        )
    if science.psf is None or template.psf is None:
        raise DiffimError("both exposures need a PSF model: give --science-psf / --template-psf, or let "
                          "diffim_dag.subtract (the CLI's subtract) estimate them")
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
        scales = variance_scales or {}
        science = _variance_scaled(science, config, "science", metrics, scales.get("science"))
        template = _variance_scaled(template, config, "template", metrics, scales.get("template"))
    return science, template, planes, coverage


def _nbytes(exposure: Exposure) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in exposure.arrays())


def eager_convolve(planes, solution: KernelSolution, *, xy0, skip_bits: int):
    """The one-tile twin of :func:`diffim_dag.graph.convolve_tiles` (:func:`~diffim_dag.stages.subtract.convolve_planes`)."""
    return st.convolve_planes(*planes, solution, origin=xy0, skip_bits=skip_bits)
