r"""PSF stage: every exposure leaves it with a PSF model, and the metrics say where it came from.

A PSF shipped with the data — the LSST ``PSF`` extension, a ``--science-psf``/``--template-psf``
file, a manifest column, the model of a simulation, a template warped with its PSF — is used as it
is.  Otherwise it is estimated from the exposure's own stars (:func:`diffim_dag.psf.estimate.estimate_psf`:
star selection, mean model, spatial variation; a Moffat fit with a warning when there are too few
stars; :class:`~diffim_dag.errors.PsfError` naming the file when there are none).  Saturated and
unusable pixels (``SAT``, ``NO_DATA``, ``BAD``, ``EDGE``, ``CR``) are left out; the saturation level
(header keyword, integer limit or plateau) keeps near-saturated, non-linear stars out too.

The report (``metrics.json`` → ``psf.science`` / ``psf.template``): ``origin`` (``supplied`` or
``estimated``), the model, the stars found and used with the count each cut removed, the FWHM at the
centre and its minimum and maximum over the image, and the fit residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import PsfEstimationConfig
from ..exposure import Exposure
from ..psf.estimate import describe_psf, estimate_psf
from ..kernels.maskops import has_bits

__all__ = ["PsfResult", "measure_psf", "PSF_BAD_PLANES"]

#: Mask planes whose pixels PSF stars must not use.
PSF_BAD_PLANES = ("NO_DATA", "BAD", "EDGE", "CR", "SUSPECT")


@dataclass(eq=False)
class PsfResult:
    """The exposure with its PSF model, the model, how it was obtained (``report``, JSON-able) and the wall time;
    for an estimated model, the star finder's table (``stars``: :func:`~diffim_dag.psf.estimate.find_psf_stars`,
    array pixels of the exposure) and its FWHM guess, which the alignment check takes its stars from."""

    exposure: Exposure | None
    psf: object  # Psf
    report: dict
    seconds: float = 0.0
    stars: object = None  # DataFrame
    fwhm_guess: float | None = None

    def __sizeof__(self) -> int:  # what Dask's memory accounting sees (a batch task holds the model only)
        return 65536


def measure_psf(exposure: Exposure, config: PsfEstimationConfig = PsfEstimationConfig(), *,
                role: str = "image") -> PsfResult:
    """Keep a supplied PSF (and describe it) or estimate one from the exposure's stars."""
    name = exposure.info.filename or "in memory"
    if exposure.psf is not None:
        report = {"origin": "supplied", "model": exposure.psf.kind,
                  "source": getattr(exposure.psf, "source", None) or type(exposure.psf).__name__}
        report.update(describe_psf(exposure.psf, exposure.bbox))
        return PsfResult(exposure, exposure.psf, report)
    img, _, msk = exposure.arrays()
    planes = exposure.mask_planes
    bad = has_bits(msk, planes.bitmask([p for p in PSF_BAD_PLANES if p in planes]))
    sat = has_bits(msk, planes.bitmask("SAT")) if "SAT" in planes else np.zeros(img.shape, bool)
    est = estimate_psf(img, bad=bad, saturated=sat, saturation=exposure.info.saturation, xy0=exposure.xy0,
                       config=config, source=f"{role} {name}")
    return PsfResult(exposure.with_attrs(psf=est.psf), est.psf, est.report, stars=est.stars,
                     fwhm_guess=est.fwhm_guess)
