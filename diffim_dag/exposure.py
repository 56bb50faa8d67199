"""The exposure data model: an ``xarray.Dataset`` of image, variance and mask planes.

An :class:`Exposure` owns one ``xarray.Dataset`` with

* ``image`` (float32), ``variance`` (float32) and ``mask`` (int32 bit planes) on dims ``(y, x)``;
* integer coordinates ``y`` and ``x`` that are *parent-frame* pixel indices, so a
  sub-image whose origin ``xy0`` is not ``(0, 0)`` keeps its place everywhere;
* ``attrs``: ``mask_planes`` (name → bit), ``wcs`` (astropy WCS in the parent
  frame, 0-based pixels), ``psf`` (a :class:`~diffim_dag.psf.Psf`) and ``info``
  (:class:`ExposureInfo`: band, visit, detector, gain, saturation, exposure time,
  observation date and photometric calibration).

When the planes are dask-backed, their chunks are the tiles every later stage runs on.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputError
from .kernels.maskops import all_finite, lacks_bits
from .masks import MASK_DTYPE, MaskPlanes
from .psf import Psf

__all__ = ["PhotoCalib", "ExposureInfo", "Exposure", "validate_planes"]

#: AB zero point of 1 nJy: m_AB = 31.4 - 2.5 log10(f / nJy).
NJY_ZERO_POINT = 31.4


@dataclass(frozen=True, kw_only=True)
class PhotoCalib:
    """Photometric calibration: ``m_AB = zero_point - 2.5 log10(counts)``."""

    zero_point: float

    @property
    def flux_per_count(self) -> float:
        """Calibrated flux (nJy) of one count."""
        return 10.0 ** (-0.4 * (self.zero_point - NJY_ZERO_POINT))

    def magnitude(self, counts):
        return self.zero_point - 2.5 * np.log10(counts)


@dataclass(frozen=True, kw_only=True)
class ExposureInfo:
    """Metadata that travels with an exposure.  Unknown values are ``None``."""

    band: str | None = None
    visit: int | None = None
    detector: int | None = None
    gain: float | None = None  # electrons per count
    read_noise: float | None = None  # electrons
    saturation: float | None = None  # counts
    saturation_source: str | None = None  # how the saturation level was found (keyword, integer limit, plateau)
    exposure_time: float | None = None  # seconds
    date_obs: str | None = None  # ISO-8601 UTC
    mjd_obs: float | None = None
    photo_calib: PhotoCalib | None = None
    filename: str | None = None
    variance_source: str | None = None  # how the variance plane was obtained

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["photo_calib"] = None if self.photo_calib is None else {"zero_point": self.photo_calib.zero_point}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ExposureInfo:
        d = dict(d or {})
        pc = d.pop("photo_calib", None)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if pc is not None:
            kwargs["photo_calib"] = PhotoCalib(zero_point=float(pc["zero_point"]))
        return cls(**kwargs)

    def replace(self, **changes) -> ExposureInfo:
        return dataclasses.replace(self, **changes)


def validate_planes(image, variance, mask, *, source: str) -> None:
    """Check plane shapes and values; raise :class:`InputError` naming ``source`` and the plane."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(f"{source}: IMAGE plane must be 2-D, got shape {image.shape}")
    for name, plane in (("VARIANCE", variance), ("MASK", mask)):
        if plane is not None and np.shape(plane) != image.shape:
            raise InputError(
                f"{source}: {name} plane has shape {np.shape(plane)} but IMAGE has shape {image.shape}; planes must match"
            )
    if image.size and all_finite(image):  # (no whole-frame plane for the common case)
        finite = True
    else:
        finite = np.isfinite(image)
        if not finite.any():
            raise InputError(f"{source}: IMAGE plane has no finite pixel (all NaN/inf)")
    if variance is not None:
        var = np.asarray(variance)
        bad = finite & ~(var >= 0)  # catches NaN and negative
        if bad.any():
            y, x = np.argwhere(bad)[0]
            kind = "NaN" if np.isnan(var[y, x]) else "negative"
            raise InputError(
                f"{source}: VARIANCE plane has {int(bad.sum())} {kind} or invalid value(s) where the image has data "
                f"(first at x={x}, y={y}: {var[y, x]!r})"
            )


def _plane(values, lazy: bool) -> xr.Variable:
    """A ``(y, x)`` plane as an xarray variable.  NumPy planes skip xarray's conversion checks
    (``fastpath``): they are already arrays, and the checks' first call imports ``dask.array`` (0.5 s of
    every command's start-up) to ask whether the plane is one."""
    return xr.Variable(("y", "x"), values) if lazy else xr.Variable(("y", "x"), np.asarray(values), fastpath=True)


class Exposure:
    """An image with variance, mask, WCS, PSF and metadata, held as an ``xarray.Dataset``.

    Build one with :meth:`from_arrays`; wrap an existing dataset with ``Exposure(ds)``.
    """

    __slots__ = ("ds",)

    def __init__(self, ds: xr.Dataset):
        for name in ("image", "variance", "mask"):
            if name not in ds:
                raise InputError(f"exposure dataset has no {name!r} variable")
        self.ds = ds

    # construction -------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        image,
        variance=None,
        mask=None,
        *,
        xy0: tuple[int, int] = (0, 0),
        mask_planes: MaskPlanes | dict | None = None,
        wcs=None,
        psf: Psf | None = None,
        info: ExposureInfo | None = None,
        source: str = "exposure",
        validate: bool = True,
        copy: bool = True,
    ) -> Exposure:
        """Make an exposure from numpy (or dask) arrays.

        Non-finite image pixels are set to 0 with NO_DATA and zero variance.
        ``variance`` defaults to ones (callers that know better pass it).  With
        ``copy=False`` arrays already of the right dtype are used as they are (and may be
        modified in place for non-finite pixels): for callers that own them.
        """
        is_lazy = hasattr(image, "dask")
        planes = mask_planes if isinstance(mask_planes, MaskPlanes) else MaskPlanes(mask_planes)
        if not is_lazy:
            if validate:
                validate_planes(image, variance, mask, source=source)
            conv = np.array if copy else np.asarray  # np.float32 / int32 are native byte order
            img = conv(image, dtype=np.float32)
            var = np.ones_like(img) if variance is None else conv(variance, dtype=np.float32)
            msk = np.zeros(img.shape, dtype=MASK_DTYPE) if mask is None else conv(mask, dtype=MASK_DTYPE)
            nonfinite = None if all_finite(img) else ~np.isfinite(img)
            if nonfinite is not None and nonfinite.any():
                img[nonfinite] = 0.0
                if not var.flags.writeable:  # (a read-only or broadcast plane, e.g. a reader's placeholder)
                    var = np.array(var)
                var[nonfinite] = 0.0
                msk[nonfinite] |= planes.bitmask("NO_DATA")
        else:
            img, var, msk = image, variance, mask
            if var is None or msk is None:
                raise InputError(f"{source}: lazy exposures need variance and mask arrays")
        ny, nx = img.shape
        x0, y0 = int(xy0[0]), int(xy0[1])
        coords = {"y": np.arange(y0, y0 + ny, dtype=np.int64), "x": np.arange(x0, x0 + nx, dtype=np.int64)}
        ds = xr.Dataset(
            {"image": _plane(img, is_lazy), "variance": _plane(var, is_lazy), "mask": _plane(msk, is_lazy)},
            coords={k: xr.IndexVariable((k,), v, fastpath=True) for k, v in coords.items()},
            attrs={
                "mask_planes": planes.as_dict(),
                "wcs": wcs,
                "psf": psf,
                "info": info if info is not None else ExposureInfo(),
            },
        )
        return cls(ds)

    # accessors -----------------------------------------------------------
    @property
    def image(self) -> xr.DataArray:
        return self.ds["image"]

    @property
    def variance(self) -> xr.DataArray:
        return self.ds["variance"]

    @property
    def mask(self) -> xr.DataArray:
        return self.ds["mask"]

    @property
    def mask_planes(self) -> MaskPlanes:
        return MaskPlanes(self.ds.attrs.get("mask_planes"))

    @property
    def wcs(self):
        return self.ds.attrs.get("wcs")

    @property
    def psf(self) -> Psf | None:
        return self.ds.attrs.get("psf")

    @property
    def info(self) -> ExposureInfo:
        return self.ds.attrs.get("info") or ExposureInfo()

    @property
    def xy0(self) -> tuple[int, int]:
        return int(self.ds["x"].values[0]), int(self.ds["y"].values[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ds.sizes["y"], self.ds.sizes["x"])

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x_min, x_max, y_min, y_max)`` in parent pixels, inclusive-exclusive."""
        x0, y0 = self.xy0
        ny, nx = self.shape
        return x0, x0 + nx, y0, y0 + ny

    @property
    def center(self) -> tuple[float, float]:
        x0, x1, y0, y1 = self.bbox
        return 0.5 * (x0 + x1 - 1), 0.5 * (y0 + y1 - 1)

    @property
    def is_lazy(self) -> bool:
        return self.ds["image"].chunks is not None

    @property
    def chunks(self):
        return self.ds["image"].chunks

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, variance, mask)`` as numpy arrays (computes lazy planes)."""
        ds = self.ds.compute() if self.is_lazy else self.ds
        return ds["image"].values, ds["variance"].values, ds["mask"].values

    # transformations -------------------------------------------------------
    def with_attrs(self, **attrs) -> Exposure:
        ds = self.ds.copy(deep=False)
        ds.attrs = {**self.ds.attrs, **attrs}
        return Exposure(ds)

    def with_planes(self, *, image=None, variance=None, mask=None) -> Exposure:
        """A new exposure with some planes replaced (same coordinates and attrs)."""
        ds = self.ds.copy(deep=False)
        for name, value in (("image", image), ("variance", variance), ("mask", mask)):
            if value is not None:
                ds[name] = _plane(value, hasattr(value, "dask"))
        ds.attrs = dict(self.ds.attrs)
        return Exposure(ds)

    def with_info(self, **changes) -> Exposure:
        return self.with_attrs(info=self.info.replace(**changes))

    def chunk(self, tile: int | tuple[int, int]) -> Exposure:
        """Dask-backed copy whose chunks (tiles) are ``tile`` pixels (y, x)."""
        ty, tx = (tile, tile) if isinstance(tile, int) else tile
        ds = self.ds.chunk({"y": ty, "x": tx})
        ds.attrs = dict(self.ds.attrs)
        return Exposure(ds)

    def load(self) -> Exposure:
        """In-memory copy (computes lazy planes)."""
        ds = self.ds.compute()
        ds.attrs = dict(self.ds.attrs)
        return Exposure(ds)

    def subset(self, x_min: int, x_max: int, y_min: int, y_max: int) -> Exposure:
        """The sub-exposure ``[x_min, x_max) × [y_min, y_max)`` in parent pixels (xy0 follows)."""
        ds = self.ds.sel(x=slice(x_min, x_max - 1), y=slice(y_min, y_max - 1))
        ds.attrs = dict(self.ds.attrs)
        return Exposure(ds)

    def copy(self) -> Exposure:
        ds = self.ds.copy(deep=True)
        ds.attrs = {k: (copy.deepcopy(v) if k == "wcs" else v) for k, v in self.ds.attrs.items()}
        return Exposure(ds)

    def bitmask(self, names) -> int:
        return self.mask_planes.bitmask(names)

    def sky_to_pixel(self, ra, dec):
        if self.wcs is None:
            raise InputError("exposure has no WCS")
        return self.wcs.all_world2pix(ra, dec, 0)

    def pixel_to_sky(self, x, y):
        if self.wcs is None:
            raise InputError("exposure has no WCS")
        return self.wcs.all_pix2world(x, y, 0)

    def __repr__(self) -> str:
        ny, nx = self.shape
        info = self.info
        return (
            f"Exposure({nx}x{ny} at xy0={self.xy0}, band={info.band!r}, visit={info.visit}, detector={info.detector}, "
            f"psf={self.psf!r}, wcs={'yes' if self.wcs is not None else 'no'}, lazy={self.is_lazy})"
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: planes, WCS, PSF, noise, saturation (used by ``diffim-dag info``)."""
        from .noise import sky_noise

        img, var, msk = self.arrays()
        planes = self.mask_planes
        good = lacks_bits(msk, planes.bitmask(["NO_DATA", "BAD", "SAT"]))
        out: dict[str, Any] = {
            "shape": list(self.shape),
            "xy0": list(self.xy0),
            "planes": {
                "image": {"dtype": str(img.dtype), "median": float(np.median(img[good])) if good.any() else None},
                "variance": {
                    "dtype": str(var.dtype),
                    "median": float(np.median(var[good])) if good.any() else None,
                    "source": self.info.variance_source,
                },
                "mask": {"dtype": str(msk.dtype), "fractions": {k: v for k, v in planes.describe(msk).items() if v > 0}},
            },
            "mask_planes": planes.as_dict(),
            "noise": {
                # (not the σ of the pixel values: a raw frame's sky gradient and vignetting are in that)
                "measured_sky_noise": float(sky_noise(img, good)) if good.any() else None,
                "median_sqrt_variance": float(np.sqrt(np.median(var[good]))) if good.any() else None,
            },
            "info": self.info.to_dict(),
        }
        if self.wcs is not None:
            cx, cy = self.center
            ra, dec = self.pixel_to_sky(cx, cy)
            from astropy.wcs.utils import proj_plane_pixel_scales

            scale = proj_plane_pixel_scales(self.wcs.celestial) * 3600.0
            out["wcs"] = {
                "ctype": list(self.wcs.wcs.ctype),
                "center_ra_dec": [float(ra), float(dec)],
                "pixel_scale_arcsec": [float(s) for s in scale],
            }
        else:
            out["wcs"] = None
        if self.psf is not None:
            cx, cy = self.center
            ixx, iyy, ixy = self.psf.second_moments(cx, cy)
            out["psf"] = {"model": repr(self.psf), "fwhm_pixels": self.psf.fwhm(cx, cy), "moments": [ixx, iyy, ixy]}
        else:
            out["psf"] = None
        if self.info.saturation is not None:
            out["saturation"] = self.info.saturation
        return out
