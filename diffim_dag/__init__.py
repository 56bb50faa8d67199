"""diffim_dag: image differencing for time-domain astronomy, built as Dask graphs.

The names below are loaded when first used (PEP 562): ``import diffim_dag.cli`` loads no NumPy, so that the
command line sets up the process (its allocator, :mod:`diffim_dag.memory`) before NumPy starts OpenBLAS's
threads.
"""
from __future__ import annotations

import importlib

from .memory import quiet_idle_blas_threads as _quiet_idle_blas_threads

_quiet_idle_blas_threads()  # before NumPy loads OpenBLAS

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    **dict.fromkeys(("ConfigError", "DiffimError", "InputError", "InsufficientKernelSourcesError",
                     "NoKernelCandidatesError", "NoWorkFound", "PsfError"), ".errors"),
    **dict.fromkeys(("Exposure", "ExposureInfo", "PhotoCalib"), ".exposure"),
    **dict.fromkeys(("DEFAULT_MASK_PLANES", "MaskPlanes"), ".masks"),
    **dict.fromkeys(("GaussianPsf", "GridPsf", "ImagePsf", "MoffatPsf", "Psf", "VaryingPsf"), ".psf"),
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
