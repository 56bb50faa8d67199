"""FITS readers and writers.

* LSST-layout multi-extension FITS: ``IMAGE``, ``MASK`` (plane names in ``MP_*``
  keywords), ``VARIANCE``; WCS in the IMAGE header; origin in ``LTV1/LTV2``
  (``= -xy0``) and the ``A`` (PHYSICAL) WCS, as ``lsst.afw`` writes them; the
  PSF optionally in a ``PSF`` extension.
* Plain single-image FITS (float or scaled integer) with optional separate
  variance, inverse-variance weight or 1σ noise map, mask and PSF files.  With no
  variance the plane is built from GAIN and RDNOISE/READNOIS plus the source
  Poisson term, or from the measured sky noise (see :func:`diffim_dag.noise.build_variance`).

Every problem is raised as :class:`~diffim_dag.errors.InputError` naming the file
and the extension, keyword or plane at fault.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import DiffimError, InputError, PsfError
from ..exposure import Exposure, ExposureInfo, PhotoCalib, validate_planes
from ..masks import MASK_DTYPE, MaskPlanes, unknown_plane_message
from ..noise import build_variance
from ..psf import ImagePsf, Psf, psf_from_payload
from .atomic import atomic_path
from .wcs import wcs_from_header, wcs_to_header
from ..kernels.maskops import has_bits

__all__ = [
    "read_exposure",
    "write_exposure",
    "unswappable",
    "write_plain_image",
    "write_psf",
    "read_psf",
    "read_image_hdu",
    "open_fits",
]

log = logging.getLogger(__name__)

GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "READNOISE")
SATURATION_KEYS = ("SATURATE", "SATURATN", "SATLEVEL")
ZERO_POINT_KEYS = ("MAGZERO", "MAGZP", "ZEROPT", "ZP", "MAGZPT")
BAND_KEYS = ("BAND", "FILTER")
VISIT_KEYS = ("VISIT", "EXPNUM", "EXPID")
DETECTOR_KEYS = ("DETECTOR", "CCDNUM", "CHIPID")


def open_fits(path: str | os.PathLike) -> fits.HDUList:
    """Open a FITS file or raise an :class:`InputError` that names it."""
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a FITS file ({' '.join(str(exc).split())})") from None
    if len(hdul) == 0:
        raise InputError(f"{path}: not a FITS file (no HDU)")
    return hdul


@contextlib.contextmanager
def _reading(path):
    """Low-level failures while reading ``path`` (a truncated or corrupt file) as one :class:`InputError` naming it."""
    try:
        yield
    except DiffimError:
        raise
    except (ValueError, OSError, EOFError, TypeError, IndexError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: cannot read its data: truncated or corrupt FITS file ({detail})") from None


def _native_float32(data, *, source: str) -> np.ndarray:
    if data is None:
        raise InputError(f"{source}: extension holds no data")
    arr = np.asarray(data)
    if arr.ndim != 2:
        squeezed = np.squeeze(arr)
        if squeezed.ndim != 2:
            raise InputError(f"{source}: expected a 2-D image, got shape {arr.shape}")
        arr = squeezed
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{source}: data of type {arr.dtype} is not numeric")
    if arr.dtype == np.dtype(">f4") and arr.flags.writeable and arr.flags.c_contiguous and sys.byteorder == "little":
        # the buffer astropy read for this call alone: swapped where it is, instead of into a second plane (64 MB
        # of fresh pages for a 4096² frame); the HDU, which still sees it as big-endian, is dropped by the caller
        arr.byteswap(inplace=True)
        return arr.view(np.float32)
    return np.array(arr, dtype=np.float32)  # one copy, native byte order (FITS is big-endian)


def _first(header: fits.Header, keys, cast=float):
    for key in keys:
        if key in header and header[key] not in (None, ""):
            value = header[key]
            try:
                return cast(value)
            except (TypeError, ValueError):
                continue
    return None


def _info_from_header(header: fits.Header, *, filename: str | None) -> ExposureInfo:
    band = _first(header, BAND_KEYS, cast=str)
    if band is not None:
        band = band.split()[0] if band.strip() else None
    zp = _first(header, ZERO_POINT_KEYS)
    int_or_none = lambda v: int(v)  # noqa: E731
    return ExposureInfo(
        band=band,
        visit=_first(header, VISIT_KEYS, cast=int_or_none),
        detector=_first(header, DETECTOR_KEYS, cast=int_or_none),
        gain=_first(header, GAIN_KEYS),
        read_noise=_first(header, READ_NOISE_KEYS),
        saturation=_first(header, SATURATION_KEYS),
        exposure_time=_first(header, ("EXPTIME", "EXPOSURE")),
        date_obs=_first(header, ("DATE-OBS", "DATE-BEG"), cast=str),
        mjd_obs=_first(header, ("MJD-OBS", "MJD-BEG", "MJD-AVG")),
        photo_calib=None if zp is None else PhotoCalib(zero_point=zp),
        filename=filename,
        variance_source=_first(header, ("VARSRC",), cast=str),
        saturation_source=_first(header, ("SATSRC",), cast=str),
    )


def _info_to_header(info: ExposureInfo, header: fits.Header) -> None:
    cards = {
        "BAND": (info.band, "band / filter"),
        "VISIT": (info.visit, "visit id"),
        "DETECTOR": (info.detector, "detector id"),
        "GAIN": (info.gain, "[e-/count] gain"),
        "RDNOISE": (info.read_noise, "[e-] read noise"),
        "SATURATE": (info.saturation, "[count] saturation level"),
        "SATSRC": (info.saturation_source, "how the saturation level was found"),
        "EXPTIME": (info.exposure_time, "[s] exposure time"),
        "DATE-OBS": (info.date_obs, "observation start (UTC)"),
        "MJD-OBS": (info.mjd_obs, "observation start (MJD)"),
        "MAGZERO": (None if info.photo_calib is None else info.photo_calib.zero_point, "AB mag of 1 count"),
        "VARSRC": (info.variance_source, "how the variance plane was obtained"),
    }
    for key, (value, comment) in cards.items():
        if value is not None:
            if isinstance(value, str):  # FITS cards hold printable ASCII only
                value = value.encode("ascii", "replace").decode("ascii")
            header[key] = (value, comment)


def _plane_bit(key: str, value, source: str) -> int:
    """The bit number of an ``MP_*`` keyword, or an :class:`InputError` naming the keyword."""
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or not 0 <= value < 32:
        raise InputError(f"{source}: keyword {key} = {value!r} is not a mask bit number (0–31)")
    return int(value)


def _read_mask_planes(header: fits.Header, mask: np.ndarray, *, source: str) -> MaskPlanes:
    planes = {}
    for key, value in header.items():
        if key.startswith("MP_"):
            planes[key[3:]] = _plane_bit(key, value, source)
    if not planes:
        planes = None
    mp = MaskPlanes(planes)
    used = int(np.bitwise_or.reduce(mask.ravel())) if mask.size else 0
    declared = 0
    for bit in mp.values():
        declared |= 1 << bit
    stray = used & ~declared
    if stray:
        bits = [b for b in range(32) if stray & (1 << b)]
        raise InputError(f"{source}: MASK pixels use bit(s) {bits} that no MP_* keyword names")
    return mp


def _origin(header: fits.Header) -> tuple[int, int]:
    if str(header.get("WCSNAMEA", "")).strip().upper() == "PHYSICAL" and "CRVAL1A" in header:
        # physical = CRVALiA + (pixel - CRPIXiA) × CDELTiA at 1-based pixel 1 (LSST writes CRPIXiA = 1)
        x0 = header["CRVAL1A"] + (1.0 - header.get("CRPIX1A", 1.0)) * header.get("CDELT1A", 1.0)
        y0 = header.get("CRVAL2A", 0.0) + (1.0 - header.get("CRPIX2A", 1.0)) * header.get("CDELT2A", 1.0)
        return int(round(x0)), int(round(y0))
    return int(round(-header.get("LTV1", 0))), int(round(-header.get("LTV2", 0)))


def _read_psf_hdu(hdu, *, source: str) -> Psf:
    meta_text = hdu.header.get("PSFMETA")
    if meta_text is None:
        return ImagePsf(_as_float64(hdu.data, source=source), source=source)
    try:
        meta = json.loads(meta_text)
    except ValueError:
        raise InputError(f"{source}: PSFMETA keyword is not valid JSON") from None
    data = None if hdu.data is None else np.asarray(hdu.data, dtype=np.float64)
    return psf_from_payload(meta, data, source=source)


def _as_float64(data, *, source: str) -> np.ndarray:
    if data is None:
        raise PsfError(f"{source}: PSF extension holds no data")
    return np.asarray(data, dtype=np.float64)


def read_psf(path: str | os.PathLike, *, hdu: int | str | None = None) -> Psf:
    """Read a PSF from a FITS file: a ``PSF`` extension written by diffim_dag, or a plain PSF image."""
    path = str(path)
    with open_fits(path) as hdul, _reading(path):
        if hdu is None:
            hdu = "PSF" if "PSF" in hdul else next((i for i, h in enumerate(hdul) if h.data is not None), None)
            if hdu is None:
                raise PsfError(f"{path}: no PSF image in any extension")
        try:
            h = hdul[hdu]
        except (KeyError, IndexError):
            raise PsfError(f"{path}: no extension {hdu!r}") from None
        return _read_psf_hdu(h, source=f"{path}[{hdu}]")


def read_image_hdu(path: str | os.PathLike, hdu: int | str | None = None) -> tuple[np.ndarray, fits.Header]:
    """Read one 2-D image (native float32) and its header, merging the primary header for inheritance."""
    data, header, _ = _read_image(path, hdu)
    return data, header


def _read_image(path: str | os.PathLike, hdu: int | str | None = None) -> tuple[np.ndarray, fits.Header, float | None]:
    """:func:`read_image_hdu` plus the largest physical value the file's integer type holds (None: floats)."""
    from ..kernels.saturation import integer_limit

    path = str(path)
    with open_fits(path) as hdul, _reading(path):
        if hdu is None:
            candidates = [i for i, h in enumerate(hdul) if h.data is not None and np.ndim(h.data) >= 2]
            if not candidates:
                raise InputError(f"{path}: no image data in any extension")
            if len(candidates) > 1:
                names = [hdul[i].name or str(i) for i in candidates]
                raise InputError(
                    f"{path}: has no IMAGE extension and several image HDUs ({', '.join(names)}); choose one (hdu=...)"
                )
            hdu = candidates[0]
        try:
            h = hdul[hdu]
        except (KeyError, IndexError):
            names = [x.name for x in hdul]
            raise InputError(f"{path}: no extension {hdu!r} (extensions: {', '.join(names)})") from None
        # before the data are read: astropy drops BZERO/BSCALE from the header once it scales them
        try:
            limit = integer_limit(int(h.header.get("BITPIX", -32)), float(h.header.get("BZERO", 0.0)),
                                  float(h.header.get("BSCALE", 1.0)))
        except (TypeError, ValueError):
            limit = None
        data = _native_float32(h.data, source=f"{path}[{hdu}]")
        header = h.header.copy()
        if h is not hdul[0]:
            for key, value in hdul[0].header.items():
                if key not in header and key not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "HISTORY", ""):
                    header[key] = value
    return data, header, limit


def read_exposure(
    path: str | os.PathLike,
    *,
    hdu: int | str | None = None,
    variance: str | os.PathLike | None = None,
    noise: str | os.PathLike | None = None,
    weight: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    mask_plane: str = "BAD",
    psf: str | os.PathLike | Psf | None = None,
    xy0: tuple[int, int] | None = None,
) -> Exposure:
    """Read an exposure from FITS.

    Parameters
    ----------
    path : path
        LSST-layout MEF (has an ``IMAGE`` extension) or a plain FITS image.
    hdu : int or str, optional
        The image HDU of a plain file with several images (e.g. ``"SCIENCE"`` of a ZTF alert).
    variance, noise, weight : path, optional
        A separate variance map, 1σ noise map or inverse-variance weight map (at most one).
    mask : path, optional
        A separate mask: integer bit planes with ``MP_*`` keywords, or any nonzero value → ``mask_plane``.
    psf : path or Psf, optional
        PSF model or PSF image file.
    xy0 : (int, int), optional
        Origin of a plain image in its parent frame (default (0, 0); IRAF LTV keywords are not trusted).
    """
    path = str(path)
    given = [n for n, v in (("variance", variance), ("noise", noise), ("weight", weight)) if v is not None]
    if len(given) > 1:
        raise InputError(f"{path}: give at most one of variance, noise and weight maps (got {', '.join(given)})")
    with open_fits(path) as hdul:
        names = [h.name.upper() for h in hdul]
        is_lsst = "IMAGE" in names and hdu is None
        lsst_like = hdu is None and ("MASK" in names or "VARIANCE" in names)
        if lsst_like and not is_lsst:
            raise InputError(f"{path}: missing IMAGE extension (extensions: {', '.join(n or '(primary)' for n in names)})")
    read = (lambda: _read_lsst(path)) if is_lsst else (lambda: _read_plain(path, hdu=hdu, xy0=xy0 or (0, 0)))
    # (the exposure as read is only _attach_aux's: it can drop the placeholder variance before building one)
    exposure = _attach_aux(read(), path, variance=variance, noise=noise, weight=weight, mask=mask,
                           mask_plane=mask_plane)
    if psf is not None:
        p = psf if isinstance(psf, Psf) else read_psf(psf)
        exposure = exposure.with_attrs(psf=p)
    return exposure


def _read_lsst(path: str) -> Exposure:
    with open_fits(path) as hdul, _reading(path):
        primary = hdul[0].header
        img_hdu = hdul["IMAGE"]
        image = _native_float32(img_hdu.data, source=f"{path}[IMAGE]")
        del img_hdu.data  # drop the raw (big-endian) buffer before the next plane is read
        header = img_hdu.header
        xy0 = _origin(header)
        if "MASK" not in hdul:
            raise InputError(f"{path}: LSST-layout file has IMAGE but no MASK extension")
        if "VARIANCE" not in hdul:
            raise InputError(f"{path}: LSST-layout file has IMAGE but no VARIANCE extension")
        mask_data = hdul["MASK"].data
        if mask_data is None:
            raise InputError(f"{path}[MASK]: extension holds no data")
        if not np.issubdtype(mask_data.dtype, np.integer):
            raise InputError(f"{path}[MASK]: mask must hold integers, got {mask_data.dtype}")
        mask_arr = np.array(mask_data, dtype=MASK_DTYPE)
        del mask_data, hdul["MASK"].data
        var = _native_float32(hdul["VARIANCE"].data, source=f"{path}[VARIANCE]")
        del hdul["VARIANCE"].data
        validate_planes(image, var, mask_arr, source=path)
        planes = _read_mask_planes(hdul["MASK"].header, mask_arr, source=f"{path}[MASK]")
        wcs = wcs_from_header(header, xy0, source=f"{path}[IMAGE]")
        psf = _read_psf_hdu(hdul["PSF"], source=f"{path}[PSF]") if "PSF" in hdul else None
        merged = primary.copy()
        merged.update(header)
        info = _info_from_header(merged, filename=path)
        if info.variance_source is None:
            # the file's VARIANCE plane is the variance: never rebuild it from a model
            info = info.replace(variance_source="VARIANCE plane")
    return Exposure.from_arrays(
        image, var, mask_arr, xy0=xy0, mask_planes=planes, wcs=wcs, psf=psf, info=info, source=path, copy=False
    )


def _read_plain(path: str, *, hdu, xy0) -> Exposure:
    from ..kernels.saturation import find_saturation

    image, header, type_limit = _read_image(path, hdu)
    source = path if hdu is None else f"{path}[{hdu}]"
    validate_planes(image, None, None, source=source)
    info = _info_from_header(header, filename=path)
    try:
        wcs = wcs_from_header(header, xy0, source=source)
    except InputError:
        log.warning("%s: WCS keywords could not be parsed; continuing without a WCS", source)
        wcs = None
    planes = MaskPlanes()
    mask = np.zeros(image.shape, dtype=MASK_DTYPE)
    if info.saturation is not None:
        mask[np.isfinite(image) & (image >= info.saturation)] |= planes.bitmask("SAT")
    else:
        # no SATURATE keyword: pixels at the integer type's limit, or flat-topped stars
        found = find_saturation(image, type_limit=type_limit)
        if found.level is not None:
            mask[found.mask] |= planes.bitmask("SAT")
            info = info.replace(saturation=found.level)
        info = info.replace(saturation_source=found.rule)
        log.info("%s: saturation %s", source, found.rule)
    # the variance plane is built by _attach_aux, which takes this exposure: meanwhile a read-only placeholder of
    # ones that holds no memory (from_arrays zeroes non-finite pixels in its own copy of it)
    placeholder = np.broadcast_to(np.float32(1.0), image.shape)
    exp = Exposure.from_arrays(image, placeholder, mask, xy0=xy0, mask_planes=planes, wcs=wcs, info=info,
                               source=source, validate=False, copy=False)
    return exp.with_info(variance_source=None)


def _attach_aux(exposure: Exposure, path: str, *, variance, noise, weight, mask, mask_plane) -> Exposure:
    img, var, msk = exposure.arrays()
    planes = exposure.mask_planes
    xy0, wcs, psf, info = exposure.xy0, exposure.wcs, exposure.psf, exposure.info
    del exposure
    nodata = has_bits(msk, planes.bitmask("NO_DATA"))
    if mask is not None:
        extra, extra_header = _read_mask_file(mask)
        if extra.shape != img.shape:
            raise InputError(f"{mask}: MASK has shape {extra.shape} but {path} IMAGE has shape {img.shape}")
        mp = {k[3:]: _plane_bit(k, v, f"{mask}[MASK]") for k, v in extra_header.items() if k.startswith("MP_")}
        if mp:
            if not np.issubdtype(extra.dtype, np.integer):
                if not np.all(np.isfinite(extra)) or np.any(extra != np.round(extra)):
                    raise InputError(f"{mask}: MASK with MP_* keywords must hold integer bit fields")
            extra = extra.astype(np.int64)
            declared = 0
            for bit in mp.values():
                declared |= 1 << bit
            stray = int(np.bitwise_or.reduce(extra.ravel())) & ~declared if extra.size else 0
            if stray:
                bits = [b for b in range(63) if stray & (1 << b)]
                raise InputError(f"{mask}: MASK pixels use bit(s) {bits} that no MP_* keyword names")
            planes = planes.merged(mp)
            msk = msk | extra.astype(MASK_DTYPE)
        else:
            if mask_plane not in planes:
                raise InputError(f"{mask}: " + unknown_plane_message(mask_plane, planes))
            msk = msk | np.where(np.nan_to_num(extra) != 0, planes.bitmask(mask_plane), 0).astype(MASK_DTYPE)
    how = info.variance_source
    if variance is not None or noise is not None or weight is not None:
        aux_path = str(variance or noise or weight)
        kind = "VARIANCE" if variance is not None else ("noise" if noise is not None else "weight")
        aux, _ = read_image_hdu(aux_path)
        if aux.shape != img.shape:
            raise InputError(f"{aux_path}: {kind} map has shape {aux.shape} but {path} IMAGE has shape {img.shape}")
        aux = aux.astype(np.float64)
        if noise is not None:
            # a 1σ map with σ ≤ 0 (e.g. drizzle edges) marks pixels without a usable measurement
            zero = np.isfinite(aux) & (aux <= 0) & ~nodata
            if zero.any():
                log.warning("%s: %d pixel(s) with noise ≤ 0 marked NO_DATA", aux_path, int(zero.sum()))
                msk = msk | np.where(zero, planes.bitmask("NO_DATA"), 0).astype(MASK_DTYPE)
                nodata = nodata | zero
            aux = aux**2
        elif weight is not None:
            with np.errstate(divide="ignore"):
                zero = aux <= 0
                aux = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, aux))
            msk = msk | np.where(zero & ~nodata, planes.bitmask("NO_DATA"), 0).astype(MASK_DTYPE)
            nodata = nodata | zero
        check = np.where(nodata, 0.0, aux)
        validate_planes(np.where(nodata, np.nan, img) if not nodata.all() else img, check, None, source=f"{aux_path} ({kind} map)")
        var = np.where(nodata, 0.0, aux).astype(np.float32, copy=False)
        how = f"{kind} map"
    elif how is None:
        bad = has_bits(msk, planes.bitmask(["NO_DATA", "BAD", "SAT"]))
        del var  # (the placeholder of ones)
        var, how = build_variance(img, gain=info.gain, read_noise=info.read_noise, bad=bad, source=path)
        var[nodata] = 0.0  # (a new float32 plane)
    out = Exposure.from_arrays(
        img, var, msk, xy0=xy0, mask_planes=planes, wcs=wcs, psf=psf,
        info=info.replace(variance_source=how), source=path, validate=False, copy=False,
    )
    return out


def _read_mask_file(path) -> tuple[np.ndarray, fits.Header]:
    """The integer (or flag) array of a mask file, read without a float conversion (bits stay exact)."""
    path = str(path)
    with open_fits(path) as hdul, _reading(path):
        if "MASK" in hdul:
            h = hdul["MASK"]
        else:
            candidates = [x for x in hdul if x.data is not None and np.ndim(x.data) >= 2]
            if len(candidates) != 1:
                raise InputError(f"{path}: mask file must hold exactly one image (or a MASK extension), found {len(candidates)}")
            h = candidates[0]
        arr = np.squeeze(np.asarray(h.data))
        if arr.ndim != 2:
            raise InputError(f"{path}: mask must be a 2-D image, got shape {np.shape(h.data)}")
        if not np.issubdtype(arr.dtype, np.number):
            raise InputError(f"{path}: mask data of type {arr.dtype} is not numeric")
        arr = arr.astype(arr.dtype.newbyteorder("=")) if not np.issubdtype(arr.dtype, np.floating) else np.nan_to_num(arr.astype(np.float64))
        header = h.header.copy()
    return arr, header


def write_psf(psf: Psf, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a PSF model as a FITS file that :func:`read_psf` (``--science-psf``) reads back exactly."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (overwrite=False)")
    meta, data = psf.to_payload()
    header = fits.Header()
    header["PSFMETA"] = json.dumps(meta, separators=(",", ":"))
    with atomic_path(path) as tmp:
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(unswappable(data), header=header, name="PSF")]).writeto(tmp, overwrite=True)
    return path


def write_plain_image(exposure: Exposure, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write only the IMAGE plane as a plain FITS file (primary HDU, float32) with the WCS and metadata
    keywords, atomically: what a telescope archive serves (no variance, mask or PSF)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (overwrite=False)")
    img = exposure.arrays()[0]
    header = fits.Header()
    if exposure.wcs is not None:
        header.extend(wcs_to_header(exposure.wcs, exposure.xy0), update=True)
    _info_to_header(exposure.info.replace(variance_source=None), header)
    hdu = fits.PrimaryHDU(unswappable(img, np.float32), header=header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        with atomic_path(path) as tmp:
            hdu.writeto(tmp, overwrite=True, output_verify="silentfix")
    return path


def unswappable(plane, dtype=None) -> np.ndarray:
    """``plane`` as ``dtype`` (default its own) for astropy's writer, read-only where it is the caller's array.

    astropy writes a writeable little-endian array by byte-swapping it in place and back; another thread
    reading the array meanwhile (detection, while a single subtraction writes its planes and PSFs) would see
    swapped values.  A read-only array makes astropy swap a copy instead (the same bytes in the file)."""
    if plane is None:
        return None
    out = np.asarray(plane, dtype=dtype)
    if np.may_share_memory(out, plane):
        out = out.view()
        out.flags.writeable = False
    return out


def write_exposure(exposure: Exposure, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write an LSST-layout MEF (IMAGE, MASK, VARIANCE[, PSF]) atomically, the MASK losslessly tile-compressed
    (:func:`_append_compressed`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (overwrite=False)")
    img, var, msk = exposure.arrays()
    x0, y0 = exposure.xy0
    primary = fits.PrimaryHDU()
    _info_to_header(exposure.info, primary.header)
    primary.header["ORIGIN"] = ("diffim_dag", "software that wrote this file")
    img_header = fits.Header()
    if exposure.wcs is not None:
        img_header.extend(wcs_to_header(exposure.wcs, (x0, y0)), update=True)
    img_header["LTV1"] = (-x0, "-x0: parent-frame origin (LSST convention)")
    img_header["LTV2"] = (-y0, "-y0: parent-frame origin (LSST convention)")
    img_header["CRPIX1A"] = 1.0
    img_header["CRPIX2A"] = 1.0
    img_header["CRVAL1A"] = float(x0)
    img_header["CRVAL2A"] = float(y0)
    img_header["CTYPE1A"] = "LINEAR"
    img_header["CTYPE2A"] = "LINEAR"
    img_header["CUNIT1A"] = "PIXEL"
    img_header["CUNIT2A"] = "PIXEL"
    img_header["WCSNAMEA"] = "PHYSICAL"
    img_header["EXTTYPE"] = "IMAGE"
    mask_header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long names become HIERARCH cards
        for name, bit in exposure.mask_planes.items():
            mask_header[f"MP_{name}"] = bit
    mask_header["EXTTYPE"] = "MASK"
    planes = [(img, np.float32, img_header, "IMAGE"), (msk, np.int32, mask_header, "MASK"),
              (var, np.float32, fits.Header([("EXTTYPE", "VARIANCE")]), "VARIANCE")]
    if exposure.psf is not None:
        meta, data = exposure.psf.to_payload()
        psf_header = fits.Header()
        psf_header["PSFMETA"] = json.dumps(meta, separators=(",", ":"))
        planes.append((data, None, psf_header, "PSF"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        with atomic_path(path) as tmp:
            fits.HDUList([primary]).writeto(tmp, overwrite=True, output_verify="silentfix")
            for plane, dtype, header, name in planes:
                if name == "MASK":
                    _append_compressed(tmp, plane, dtype, header, name)
                else:
                    _stream_extension(tmp, plane, dtype, header, name)
    return path


#: Bytes of a tile of a losslessly compressed (RICE) integer plane (:func:`_append_compressed`): whole rows.
COMPRESSED_TILE_BYTES = 4 << 20


def _append_compressed(path, plane, dtype, header: fits.Header, name: str) -> None:
    """Append ``plane`` (integers, as ``dtype``) to the FITS file ``path`` as extension ``name``, tile-compressed
    with RICE, which is lossless for integers (FITS tiled image compression: astropy, cfitsio, ds9 and the LSST
    stack read it as the image it holds, with the header's cards).

    A mask plane is mostly zeros: a 4096² difference's MASK took 64 MB as a plain image and takes under 1 MB so
    (written in 0.03 s, read in 0.02 s), and on a virtual machine every page a file write brings into the page
    cache costs as much as a fresh page of memory (a 4096² subtraction's two plain masks, 128 MB of its 400 MB of
    planes).  The array is only read (a read-only view: astropy swaps a copy, not the caller's plane)."""
    a = unswappable(plane, dtype)  # (an exposure's 2-D plane)
    rows = min(max(1, COMPRESSED_TILE_BYTES // max(1, a.dtype.itemsize * a.shape[1])), max(1, a.shape[0]))
    with fits.open(os.fspath(path), mode="append") as hdul:
        hdul.append(fits.CompImageHDU(a, header=header, name=name, compression_type="RICE_1",
                                      tile_shape=(rows, a.shape[1])))


#: Bytes of a plane converted to FITS's byte order and written at a time by :func:`_stream_extension`.
STREAM_BYTES = 4 << 20


def _stream_extension(path, plane, dtype, header: fits.Header, name: str) -> None:
    """Append ``plane`` (as ``dtype``; default its own) to the FITS file ``path`` as image extension ``name``, in
    blocks of rows each cast to big-endian (:data:`STREAM_BYTES`).

    astropy's writer byte-swaps a whole native array, in place and back (another thread reading it meanwhile,
    as detection does while a single subtraction writes its planes, would see swapped values) or into a copy of
    the whole plane, in NumPy's byte swap, which holds the interpreter lock: 0.25 s of a 4096² subtraction's
    planes, while detection waited for the lock.  A cast releases the lock, a block is a few MB, and the
    caller's array is only read; the file's bytes are those astropy writes."""
    if plane is None:  # a header without data (a PSF model whose payload has no pixels)
        hdu = fits.ImageHDU(None, header=header, name=name)
        hdu.verify("silentfix")
        fits.StreamingHDU(os.fspath(path), hdu.header).close()
        return
    a = np.asarray(plane)
    want = np.dtype(dtype if dtype is not None else a.dtype)
    big = want.newbyteorder(">")
    # the header astropy makes for such an array (BITPIX, NAXISn, EXTNAME ...), from a stand-in without pixels
    hdu = fits.ImageHDU(np.broadcast_to(np.zeros((), big), a.shape), header=header, name=name)
    hdu.verify("silentfix")
    rows = max(1, STREAM_BYTES // max(1, big.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))))
    with fits.StreamingHDU(os.fspath(path), hdu.header) as stream:  # (a Path: astropy takes its name for the file)
        for r0 in range(0, max(a.shape[0], 1), rows):
            stream.write(np.ascontiguousarray(a[r0:r0 + rows], dtype=big))
