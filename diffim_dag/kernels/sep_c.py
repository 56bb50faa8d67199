"""SEP's mesh background and source extraction through its C interface, with the interpreter lock released.

``sep`` (SExtractor as a library) is a C library with a Cython wrapper, and the wrapper holds the interpreter
lock for the whole of each call: while one thread measures a 4096² background (0.2–0.4 s), no other thread of
the process runs Python.  The visit graph runs the science's and the template's input stages on two threads,
and each measures several mesh backgrounds and extracts sources (variance, sky, PSF stars, kernel sources), so
the two threads took turns.  The wheel's extension module also exports SEP's C functions (``sep.h``, its public
C interface); called through :mod:`ctypes`, which releases the lock for the length of a foreign call, they run at
once.  :func:`mesh` keeps SEP's mesh and gives its maps row by row (:class:`Mesh`), for work done in strips.

The C structures are declared here as ``sep.h`` has them in SEP 1.4 (64-bit sizes and the segmentation-map
fields of ``sep_image``, new in 1.4.0); another version of SEP, or a build without the exported symbols, falls
back to the Python wrapper, with the same results.  Both paths call the same C code with the arguments the wrapper passes
for ``sep.Background(data, mask=mask, bw=…, bh=…, fw=…, fh=…)`` and ``sep.extract(…)``, so the maps and
catalogues are bitwise the same (tested).  SEP's C library is thread-safe since 1.4 (its extraction state is
thread-local); the pixel-stack and sub-object limits (``sep.set_extract_pixstack`` …) are the library's own,
shared by both paths.
"""
from __future__ import annotations

import ctypes
import functools
import weakref

import numpy as np

__all__ = ["Mesh", "mesh", "mesh_background", "extract", "c_interface_available"]

#: ``sep.h`` codes: element types, noise and threshold kinds, filter types.
_SEP_TBYTE, _SEP_TFLOAT, _SEP_TDOUBLE = 11, 42, 82
_SEP_NOISE_NONE, _SEP_NOISE_STDDEV = 0, 1
_SEP_THRESH_REL, _SEP_THRESH_ABS = 0, 1
_SEP_FILTER_CONV, _SEP_FILTER_MATCHED = 0, 1
_MEMORY_ALLOC_ERROR = 1

#: ``sep.extract``'s default filter (SExtractor's 3×3 pyramid).
DEFAULT_FILTER = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)


class _SepImage(ctypes.Structure):
    """``sep_image`` (SEP ≥ 1.4)."""

    _fields_ = [("data", ctypes.c_void_p), ("noise", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                ("segmap", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndtype", ctypes.c_int),
                ("mdtype", ctypes.c_int), ("sdtype", ctypes.c_int), ("segids", ctypes.c_void_p),
                ("idcounts", ctypes.c_void_p), ("numids", ctypes.c_int64), ("w", ctypes.c_int64),
                ("h", ctypes.c_int64), ("noiseval", ctypes.c_double), ("noise_type", ctypes.c_short),
                ("gain", ctypes.c_double), ("maskthresh", ctypes.c_double)]


#: ``sep_catalog``'s arrays in order, with their C type and the column type of ``sep.extract``'s table.
_I64, _F32, _F64 = (ctypes.c_int64, np.int64), (ctypes.c_float, np.float64), (ctypes.c_double, np.float64)
_CATALOG = [(name, *types) for names, types in (
    (("thresh",), _F32), (("npix", "tnpix", "xmin", "xmax", "ymin", "ymax"), _I64),
    (("x", "y", "x2", "y2", "xy", "errx2", "erry2", "errxy"), _F64),
    (("a", "b", "theta", "cxx", "cyy", "cxy", "cflux", "flux", "cpeak", "peak"), _F32),
    (("xcpeak", "ycpeak", "xpeak", "ypeak"), _I64), (("flag",), (ctypes.c_short, np.short))) for name in names]


class _SepCatalog(ctypes.Structure):
    """``sep_catalog`` (SEP ≥ 1.4): one array per quantity, ``nobj`` long."""

    _fields_ = ([("nobj", ctypes.c_int)] + [(name, ctypes.POINTER(ctype)) for name, ctype, _ in _CATALOG]
                + [("pix", ctypes.POINTER(ctypes.POINTER(ctypes.c_int64))),
                   ("objectspix", ctypes.POINTER(ctypes.c_int64))])


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
    if _version(getattr(sep, "__version__", "")) != (1, 4):  # (the layout declared here; a later one may differ)
        return None
    try:
        lib = ctypes.CDLL(sep.__file__)  # (already loaded by the import: the same handle)
        signatures = {
            "sep_background": ([ctypes.POINTER(_SepImage), ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_double, ctypes.POINTER(ctypes.c_void_p)], ctypes.c_int),
            "sep_bkg_array": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_rmsarray": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_line": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_rmsline": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "sep_bkg_global": ([ctypes.c_void_p], ctypes.c_float),
            "sep_bkg_globalrms": ([ctypes.c_void_p], ctypes.c_float),
            "sep_bkg_free": ([ctypes.c_void_p], None),
            "sep_extract": ([ctypes.POINTER(_SepImage), ctypes.c_float, ctypes.c_int, ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                             ctypes.c_double, ctypes.c_int, ctypes.c_double,
                             ctypes.POINTER(ctypes.POINTER(_SepCatalog))], ctypes.c_int),
            "sep_catalog_free": ([ctypes.POINTER(_SepCatalog)], None),
            "sep_get_errmsg": ([ctypes.c_int, ctypes.c_char_p], None),
            "sep_get_errdetail": ([ctypes.c_char_p], None),
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
    text, detail = ctypes.create_string_buffer(61), ctypes.create_string_buffer(512)
    lib.sep_get_errmsg(status, text)
    lib.sep_get_errdetail(detail)
    message = text.value.decode(errors="replace")
    if detail.value:
        message += ": " + detail.value.decode(errors="replace")
    raise RuntimeError(message)  # (the wrapper's bare Exception, with its text: "pixel buffer full" …)


def _element_type(array: np.ndarray) -> int:
    codes = {np.dtype(np.float32): _SEP_TFLOAT, np.dtype(np.float64): _SEP_TDOUBLE, np.dtype(bool): _SEP_TBYTE,
             np.dtype(np.uint8): _SEP_TBYTE}
    if array.dtype not in codes:
        raise ValueError(f"sep: array type {array.dtype} not supported here")
    return codes[array.dtype]


class Mesh:
    """SEP's mesh background of an image (:func:`mesh`): the level and rms maps row by row, without the whole
    planes (a 4096² frame's are 64 MB each), for callers that work in strips.

    ``level_rows(rows)`` and ``rms_rows(rows)`` are the rows ``rows`` (a slice or a sequence of row indices) of
    ``sep.Background(…).back()`` and ``.rms()``, bitwise (SEP fills its whole maps row by row with the same
    function); ``global_level`` and ``global_rms`` its global figures.  Through the C interface the mesh itself (a
    few thousand boxes) is all that is held; the fallback computes the planes once and slices them."""

    def __init__(self, shape, handle=None, planes=None, global_level=0.0, global_rms=0.0):
        self.shape = (int(shape[0]), int(shape[1]))
        self.global_level, self.global_rms = float(global_level), float(global_rms)
        self._handle, self._planes = handle, planes
        if handle is not None:
            self._free = weakref.finalize(self, _library().sep_bkg_free, handle)

    def _rows(self, rows, which: int, out: np.ndarray | None) -> np.ndarray:
        index = range(*rows.indices(self.shape[0])) if isinstance(rows, slice) else [int(r) for r in rows]
        if out is None:
            out = np.empty((len(index), self.shape[1]), dtype=np.float32)
        if self._handle is None:
            plane = self._planes()[which]
            out[...] = plane[rows] if isinstance(rows, slice) else plane[list(index)]
            return out
        lib = _library()
        if not out.flags.c_contiguous or out.dtype != np.float32:
            raise ValueError("out must be a C-contiguous float32 array")
        if index == range(self.shape[0]):  # the whole map: SEP fills it in one call (the same rows)
            fill = lib.sep_bkg_array if which == 0 else lib.sep_bkg_rmsarray
            _check(lib, fill(self._handle, out.ctypes.data, _SEP_TFLOAT))
            return out
        # one call a row (~10 µs of spline), the lock released for each as for every foreign call: with it held
        # instead, a 4096² subtraction ran 1.03× (6 pairs; the other input thread waited on the rows)
        line = lib.sep_bkg_line if which == 0 else lib.sep_bkg_rmsline
        base, step = out.ctypes.data, out.strides[0]
        for i, y in enumerate(index):
            if not 0 <= y < self.shape[0]:
                raise IndexError(f"row {y} outside the image's {self.shape[0]}")
            _check(lib, line(self._handle, y, base + i * step, _SEP_TFLOAT))
        return out

    def level_rows(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` of the level map (float32; into ``out``, C-contiguous float32, when given)."""
        return self._rows(rows, 0, out)

    def rms_rows(self, rows, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` of the rms map (float32; into ``out`` when given)."""
        return self._rows(rows, 1, out)


def mesh(data: np.ndarray, mask: np.ndarray | None, *, bw: int, bh: int, fw: int, fh: int) -> Mesh:
    """SEP's mesh background of ``data`` (float32, C order; ``mask``: bool, True = ignored) as a :class:`Mesh`:
    that of ``sep.Background(data, mask=mask, bw=bw, bh=bh, fw=fw, fh=fh)``, measured without holding the
    interpreter lock where SEP's C interface can be reached."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=bool)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the data's {data.shape}")
    lib = _library()
    if lib is None:
        import sep

        bkg = sep.Background(data, mask=mask, bw=bw, bh=bh, fw=fw, fh=fh)
        planes = functools.lru_cache(maxsize=1)(
            lambda: (np.asarray(bkg.back(), dtype=np.float32), np.asarray(bkg.rms(), dtype=np.float32)))
        return Mesh(data.shape, planes=planes, global_level=bkg.globalback, global_rms=bkg.globalrms)
    image = _SepImage()
    image.data, image.dtype = data.ctypes.data, _SEP_TFLOAT
    image.h, image.w = data.shape
    if mask is not None:
        image.mask, image.mdtype = mask.ctypes.data, _SEP_TBYTE
    handle = ctypes.c_void_p()
    _check(lib, lib.sep_background(ctypes.byref(image), bw, bh, fw, fh, 0.0, ctypes.byref(handle)))
    return Mesh(data.shape, handle=handle.value, global_level=lib.sep_bkg_global(handle),
                global_rms=lib.sep_bkg_globalrms(handle))


def mesh_background(data: np.ndarray, mask: np.ndarray | None, *, bw: int, bh: int, fw: int, fh: int,
                    rms: bool = True) -> tuple[np.ndarray, np.ndarray | None, float, float]:
    """SEP's mesh background of ``data`` (float32, C order; ``mask``: bool, True = ignored): the level map, the
    rms map (None unless ``rms``), and the global level and rms — those of ``sep.Background(data, mask=mask,
    bw=bw, bh=bh, fw=fw, fh=fh)``, computed without holding the interpreter lock where SEP's C interface can be
    reached (:func:`mesh` gives the maps row by row instead)."""
    m = mesh(data, mask, bw=bw, bh=bh, fw=fw, fh=fh)
    everything = slice(0, m.shape[0])
    return m.level_rows(everything), (m.rms_rows(everything) if rms else None), m.global_level, m.global_rms


def extract(data: np.ndarray, thresh: float, *, err=None, mask: np.ndarray | None = None, minarea: int = 5,
            filter_kernel: np.ndarray | None = DEFAULT_FILTER, filter_type: str = "matched", deblend_nthresh: int = 32,
            deblend_cont: float = 0.005, clean: bool = True, clean_param: float = 1.0) -> np.ndarray:
    """``sep.extract(data, thresh, err=err, mask=mask, …)`` with its defaults and its structured table of objects,
    without holding the interpreter lock where SEP's C interface can be reached.  ``data`` and a 2-D ``err`` are
    float32 or float64 arrays, ``mask`` a bool array (True: left out); ``thresh`` is in units of ``err`` when it is
    given and absolute otherwise."""
    lib = _library()
    if lib is None:
        import sep

        return sep.extract(data, thresh, err=err, mask=mask, minarea=minarea, filter_kernel=filter_kernel,
                           filter_type=filter_type, deblend_nthresh=deblend_nthresh, deblend_cont=deblend_cont,
                           clean=clean, clean_param=clean_param)
    if filter_type not in ("matched", "conv"):
        raise ValueError(f"unknown filter_type: {filter_type!r}")
    image = _SepImage()  # (the arrays it points to are locals here: alive until the call returns)
    data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("="))  # (SEP reads native byte order)
    image.data, image.dtype = data.ctypes.data, _element_type(data)
    image.h, image.w = data.shape
    image.noise_type = _SEP_NOISE_NONE
    if err is not None:
        image.noise_type = _SEP_NOISE_STDDEV
        if np.ndim(err) == 2:
            noise = np.ascontiguousarray(err)
            if noise.shape != data.shape:
                raise ValueError("size of error/variance array must match data")
            image.noise, image.ndtype = noise.ctypes.data, _element_type(noise)
        else:
            image.noiseval = float(err)
    if mask is not None:
        mask = np.ascontiguousarray(mask)
        if mask.shape != data.shape:
            raise ValueError("size of mask array must match data")
        image.mask, image.mdtype = mask.ctypes.data, _element_type(mask)
    kernel, kw, kh = None, 0, 0
    if filter_kernel is not None:
        kernel = np.ascontiguousarray(filter_kernel, dtype=np.float32)
        kh, kw = kernel.shape
    catalog = ctypes.POINTER(_SepCatalog)()
    status = lib.sep_extract(ctypes.byref(image), thresh,
                             _SEP_THRESH_ABS if image.noise_type == _SEP_NOISE_NONE else _SEP_THRESH_REL, minarea,
                             None if kernel is None else kernel.ctypes.data, kw, kh,
                             _SEP_FILTER_MATCHED if filter_type == "matched" else _SEP_FILTER_CONV,
                             deblend_nthresh, deblend_cont, int(bool(clean)), clean_param, ctypes.byref(catalog))
    _check(lib, status)
    try:
        cat = catalog.contents
        n = int(cat.nobj)
        out = np.empty(n, dtype=np.dtype([(name, dtype) for name, _, dtype in _CATALOG]))
        for name, _, _ in _CATALOG:
            if n:
                out[name] = np.ctypeslib.as_array(getattr(cat, name), shape=(n,))
        return out
    finally:
        lib.sep_catalog_free(catalog)
