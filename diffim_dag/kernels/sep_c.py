"""SEP's mesh background through its C interface, with the interpreter lock released.

``sep`` (SExtractor as a library) is a C library with a Cython wrapper, and the wrapper holds the interpreter
lock for the whole of each call: while one thread measures a 4096² background (0.2–0.4 s), no other thread of
the process runs Python.  The visit graph runs the science's and the template's input stages on two threads,
and each measures several mesh backgrounds (variance, sky, PSF stars, kernel sources), so the two threads took
turns.  The wheel's extension module also exports SEP's C functions (``sep.h``, its public C interface);
called through :mod:`ctypes`, which releases the lock for the length of a foreign call, they run at once.

The C structures are declared here as ``sep.h`` has them since SEP 1.4.0 (64-bit sizes and the segmentation-map
fields of ``sep_image``); another version of SEP, or a build without the exported symbols, falls back to the
Python wrapper, with the same results.  Both paths call the same C code with the same arguments as
``sep.Background(data, mask=mask, bw=…, bh=…, fw=…, fh=…)``, so the level and rms maps are bitwise the same
(tested).
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["mesh_background", "c_interface_available"]

#: ``sep.h`` type codes.
_SEP_TBYTE, _SEP_TFLOAT = 11, 42
_MEMORY_ALLOC_ERROR = 1


class _SepImage(ctypes.Structure):
    """``sep_image`` (SEP ≥ 1.4)."""

    _fields_ = [("data", ctypes.c_void_p), ("noise", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                ("segmap", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndtype", ctypes.c_int),
                ("mdtype", ctypes.c_int), ("sdtype", ctypes.c_int), ("segids", ctypes.c_void_p),
                ("idcounts", ctypes.c_void_p), ("numids", ctypes.c_int64), ("w", ctypes.c_int64),
                ("h", ctypes.c_int64), ("noiseval", ctypes.c_double), ("noise_type", ctypes.c_short),
                ("gain", ctypes.c_double), ("maskthresh", ctypes.c_double)]


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in text.split(".")[:2])
    except ValueError:
        return (0, 0)
    return major, minor


@functools.lru_cache(maxsize=None)
def _library():
    """SEP's C functions with their signatures, or None where they cannot be reached as declared here."""
    try:
        import sep
    except ImportError:
        return None
    if not (1, 4) <= _version(getattr(sep, "__version__", "")) < (2, 0):
        return None
    try:
        lib = ctypes.CDLL(sep.__file__)  # (already loaded by the import: the same handle)
        signatures = {
            "sep_background": ([ctypes.POINTER(_SepImage), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
            "sep_bkg_array": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_rmsarray": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_global": ([ctypes.c_void_p], ctypes.c_float),
            "sep_bkg_globalrms": ([ctypes.c_void_p], ctypes.c_float),
            "sep_bkg_free": ([ctypes.c_void_p], None),
            "sep_get_errmsg": ([ctypes.c_int, ctypes.c_char_p], None),
        }
        for name, (args, result) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = args, result
    except (OSError, AttributeError):
        return None
    return lib


def c_interface_available() -> bool:
    """Whether :func:`mesh_background` calls SEP's C interface (True) or its Python wrapper."""
    return _library() is not None


def _check(lib, status: int) -> None:
    if status == 0:
        return
    if status == _MEMORY_ALLOC_ERROR:
        raise MemoryError("sep: memory allocation failed")
    text = ctypes.create_string_buffer(61)
    lib.sep_get_errmsg(status, text)
    raise RuntimeError(f"sep: {text.value.decode(errors='replace')}")


def mesh_background(data: np.ndarray, mask: np.ndarray | None, *, bw: int, bh: int, fw: int, fh: int,
                    rms: bool = True) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """SEP's mesh background of ``data`` (float32, C order; ``mask``: bool, True = ignored): the level map, the
    rms map (None unless ``rms``), and the global level and rms — those of ``sep.Background(data, mask=mask,
    bw=bw, bh=bh, fw=fw, fh=fh)``, computed without holding the interpreter lock where SEP's C interface can be
    reached."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the data's {data.shape}")
    lib = _library()
    if lib is None:
        import sep

        bkg = sep.Background(data, mask=mask, bw=bw, bh=bh, fw=fw, fh=fh)
        return (np.asarray(bkg.back(), dtype=np.float32), np.asarray(bkg.rms(), dtype=np.float32) if rms else None,
                float(bkg.globalback), float(bkg.globalrms))
    image = _SepImage()
    image.data, image.dtype = data.ctypes.data, _SEP_TFLOAT
    image.h, image.w = data.shape
    if mask is not None:
        image.mask, image.mdtype = mask.ctypes.data, _SEP_TBYTE
    handle = ctypes.c_void_p()
    _check(lib, lib.sep_background(ctypes.byref(image), bw, bh, fw, fh, 0.0, ctypes.byref(handle)))
    try:
        level = np.empty(data.shape, dtype=np.float32)
        _check(lib, lib.sep_bkg_array(handle, level.ctypes.data, _SEP_TFLOAT))
        noise = None
        if rms:
            noise = np.empty(data.shape, dtype=np.float32)
            _check(lib, lib.sep_bkg_rmsarray(handle, noise.ctypes.data, _SEP_TFLOAT))
        return level, noise, float(lib.sep_bkg_global(handle)), float(lib.sep_bkg_globalrms(handle))
    finally:
        lib.sep_bkg_free(handle)
