"""Zarr tile store for exposures: all planes chunked by tile, metadata in attributes.

Round trips are bit-exact: planes are stored in their own dtypes, the WCS as its
exact defining numbers (plus the FITS cards for other readers), the PSF as its
payload (metadata + array).  Reading returns dask-backed planes whose chunks are
the stored tiles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import InputError
from ..exposure import Exposure, ExposureInfo
from ..masks import MaskPlanes
from ..psf import psf_from_payload
from .atomic import atomic_path
from .wcs import apply_exact_state, wcs_exact_state, wcs_from_header, wcs_to_header

__all__ = ["write_zarr", "read_zarr"]

FORMAT = "diffim_dag.exposure/1"


def write_zarr(exposure: Exposure, path: str | os.PathLike, *, tile: int | tuple[int, int] | None = None) -> Path:
    """Write an exposure to a zarr store (atomically: temporary folder, then rename).

    ``tile`` sets the chunk size; default the exposure's dask chunks, else 1024².
    """
    path = Path(path)
    if tile is not None:
        exposure = exposure.chunk(tile)
    elif not exposure.is_lazy:
        exposure = exposure.chunk(1024)
    ds = exposure.ds
    chunks = {"y": ds.chunks["y"], "x": ds.chunks["x"]}
    # zarr needs regular chunks (all equal but the last)
    for dim, c in chunks.items():
        if len(set(c[:-1])) > 1 or (len(c) > 1 and c[-1] > c[0]):
            ds = ds.chunk({dim: c[0]})
    out = xr.Dataset({k: ds[k] for k in ("image", "variance", "mask")}, coords={"y": ds["y"], "x": ds["x"]})
    attrs: dict = {
        "format": FORMAT,
        "mask_planes": exposure.mask_planes.as_dict(),
        "info": exposure.info.to_dict(),
        "xy0": list(exposure.xy0),
    }
    if exposure.wcs is not None:
        attrs["wcs_header"] = wcs_to_header(exposure.wcs, exposure.xy0).tostring(sep="\n")
        attrs["wcs_exact"] = wcs_exact_state(exposure.wcs)
    if exposure.psf is not None:
        meta, data = exposure.psf.to_payload()
        attrs["psf_meta"] = meta
        if data is not None:
            out["psf_data"] = (tuple(f"psf_axis{i}" for i in range(data.ndim)), np.asarray(data))
    out.attrs = json.loads(json.dumps(attrs))  # JSON-clean
    encoding = {k: {"chunks": (out[k].data.chunksize if hasattr(out[k].data, "chunksize") else out[k].shape)} for k in ("image", "variance", "mask")}
    with atomic_path(path, directory=True) as tmp:
        out.to_zarr(tmp, mode="w", encoding=encoding, consolidated=False, compute=True)
    return path


def read_zarr(path: str | os.PathLike) -> Exposure:
    """Open an exposure zarr store lazily (dask chunks = stored tiles)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such zarr store")
    try:
        ds = xr.open_zarr(path, consolidated=False)
    except Exception as exc:  # zarr raises many types for a non-store
        raise InputError(f"{path}: not a zarr store ({exc})") from None
    attrs = dict(ds.attrs)
    if attrs.get("format") != FORMAT:
        raise InputError(f"{path}: zarr store is not a diffim_dag exposure (format={attrs.get('format')!r})")
    for plane in ("image", "variance", "mask"):
        if plane not in ds:
            raise InputError(f"{path}: zarr store has no {plane!r} plane")
    xy0 = tuple(attrs.get("xy0", (0, 0)))
    wcs = None
    if "wcs_header" in attrs:
        from astropy.io import fits

        header = fits.Header.fromstring(attrs["wcs_header"], sep="\n")
        wcs = wcs_from_header(header, xy0, source=str(path))
        if wcs is not None and "wcs_exact" in attrs:
            apply_exact_state(wcs, attrs["wcs_exact"])
    psf = None
    if "psf_meta" in attrs:
        data = ds["psf_data"].values if "psf_data" in ds else None
        psf = psf_from_payload(attrs["psf_meta"], data, source=str(path))
    planes = xr.Dataset({k: ds[k] for k in ("image", "variance", "mask")}, coords={"y": ds["y"], "x": ds["x"]})
    planes.attrs = {
        "mask_planes": MaskPlanes(attrs.get("mask_planes")).as_dict(),
        "wcs": wcs,
        "psf": psf,
        "info": ExposureInfo.from_dict(attrs.get("info")),
    }
    return Exposure(planes)
