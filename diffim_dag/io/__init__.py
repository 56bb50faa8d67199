"""Readers and writers: LSST-layout and plain FITS, zarr tile stores, atomic outputs."""
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .fits import read_exposure, read_image_hdu, read_psf, write_exposure
from .wcs import wcs_equal, wcs_from_header, wcs_to_header
from .zarr_store import read_zarr, write_zarr

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "read_exposure",
    "read_image_hdu",
    "read_psf",
    "write_exposure",
    "read_zarr",
    "write_zarr",
    "wcs_equal",
    "wcs_from_header",
    "wcs_to_header",
]
