"""diffim_dag: image differencing for time-domain astronomy, built as Dask graphs."""
from .memory import quiet_idle_blas_threads as _quiet_idle_blas_threads

_quiet_idle_blas_threads()  # before NumPy loads OpenBLAS

from .errors import (
    ConfigError,
    DiffimError,
    InputError,
    InsufficientKernelSourcesError,
    NoKernelCandidatesError,
    NoWorkFound,
    PsfError,
)
from .exposure import Exposure, ExposureInfo, PhotoCalib
from .masks import DEFAULT_MASK_PLANES, MaskPlanes
from .psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf, Psf, VaryingPsf

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DiffimError",
    "InputError",
    "InsufficientKernelSourcesError",
    "NoKernelCandidatesError",
    "NoWorkFound",
    "PsfError",
    "Exposure",
    "ExposureInfo",
    "PhotoCalib",
    "DEFAULT_MASK_PLANES",
    "MaskPlanes",
    "GaussianPsf",
    "GridPsf",
    "ImagePsf",
    "MoffatPsf",
    "Psf",
    "VaryingPsf",
    "__version__",
]
