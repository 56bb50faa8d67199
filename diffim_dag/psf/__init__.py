"""PSF models (:mod:`.models`) and PSF estimation from an exposure's own stars (:mod:`.estimate`)."""
from .models import (
    FWHM_PER_SIGMA,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    Psf,
    VaryingPsf,
    image_moments,
    measure_fwhm,
    psf_from_payload,
    psf_to_payload,
)

__all__ = [
    "Psf",
    "GaussianPsf",
    "MoffatPsf",
    "ImagePsf",
    "VaryingPsf",
    "GridPsf",
    "FWHM_PER_SIGMA",
    "measure_fwhm",
    "image_moments",
    "psf_to_payload",
    "psf_from_payload",
]
