"""The DiaSource catalogue's schema (every column's dtype and meaning, :data:`DIA_SOURCE_COLUMNS`), the empty
catalogue, and its Parquet writer and reader (the schema and column docs travel in the file's metadata)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from ..kernels.dipole import DIPOLE_COLUMNS
from ..kernels.measure import measurement_columns

log = logging.getLogger(__name__)


_SOURCE_DOC: dict[str, tuple[str, str]] = {
    "id": ("int64", "source id, unique within (visit, detector); real sources by peak (y, x), then sky sources"),
    "visit": ("int64", "visit id (-1 unknown)"),
    "detector": ("int64", "detector id (-1 unknown)"),
    "x": ("float64", "centroid x, parent pixels (dipoles: flux-weighted lobe centre)"),
    "y": ("float64", "centroid y, parent pixels"),
    "x_err": ("float64", "1σ error of x (px); NaN when the centroid fit failed"),
    "y_err": ("float64", "1σ error of y (px)"),
    "ra": ("float64", "right ascension of (x, y), degrees (NaN without a WCS)"),
    "dec": ("float64", "declination, degrees"),
    "ra_err": ("float64", "1σ error of ra·cos(dec), degrees, from x_err, y_err through the local WCS Jacobian"),
    "dec_err": ("float64", "1σ error of dec, degrees"),
    "peak_x": ("int64", "primary (most significant) peak x"),
    "peak_y": ("int64", "primary peak y"),
    "peak_significance": ("float64", "matched-filter significance at the primary peak (signed)"),
    "n_peaks_positive": ("int64", "positive peaks in the footprint"),
    "n_peaks_negative": ("int64", "negative peaks in the footprint"),
    "is_negative": ("bool", "footprint has negative peaks only"),
    "footprint_area": ("int64", "footprint pixels"),
    "bbox_x_min": ("int64", "footprint bbox, parent pixels, [min, max)"),
    "bbox_x_max": ("int64", ""),
    "bbox_y_min": ("int64", ""),
    "bbox_y_max": ("int64", ""),
    "footprint_truncated": ("bool", "footprint cut by a tile edge and not completed (pieces are re-measured whole)"),
}
_MEASURE_DOC = {
    "centroid_flag": "centroid fit failed (x, y = peak) or was not fitted (sky sources)",
    "psf_flux": "PSF flux ΣPD/V / ΣP²/V (counts)",
    "psf_flux_err": "1/√(ΣP²/V)",
    "psf_chi2": "χ² of the PSF model in its stamp",
    "psf_dof": "degrees of freedom of psf_chi2",
    "psf_flux_flag": "PSF flux failed or < half the PSF weight on good pixels",
    "snr": "psf_flux / psf_flux_err",
    "ap12_flux": "circular aperture flux, radius 12 px",
    "ap12_flux_err": "",
    "ap12_flag": "aperture touched excluded pixels or the tile edge",
    "ap2fwhm_flux": "circular aperture flux, radius 2 × FWHM",
    "ap2fwhm_flux_err": "",
    "ap2fwhm_flag": "",
    "ixx": "adaptive second moment xx (px²)",
    "iyy": "adaptive second moment yy",
    "ixy": "adaptive second moment xy",
    "shape_flag": "adaptive moments failed",
}
_FORCED_DOC = {
    "science_forced_flux": ("float64", "forced PSF flux on the science image at (x, y)"),
    "science_forced_flux_err": ("float64", ""),
    "science_forced_flag": ("bool", "no science image, or forced flux failed"),
    "template_forced_flux": ("float64", "forced PSF flux on the matched template at (x, y)"),
    "template_forced_flux_err": ("float64", ""),
    "template_forced_flag": ("bool", "no template image, or forced flux failed"),
    "sky_source": ("bool", "sky source (blank-sky position), not a DiaSource"),
}


def _build_columns() -> dict[str, tuple[str, str]]:
    cols = dict(_SOURCE_DOC)
    for name, dtype in measurement_columns().items():
        doc = _MEASURE_DOC.get(name)
        if doc is None and name.startswith("pixel_flags_"):
            plane = name[len("pixel_flags_") :].removesuffix("_center").upper()
            doc = f"{plane} set {'in the 3×3 centre' if name.endswith('_center') else 'anywhere in the footprint'}"
        cols[name] = (dtype, doc or "")
    for name, dtype in DIPOLE_COLUMNS.items():
        cols[name] = (dtype, f"dipole fit: {name[len('dipole_'):].replace('_', ' ')}" if name.startswith("dipole_") else
                      "classified as a dipole (S/N > 5√2, each lobe < 0.65 of the total)")
    cols.update(_FORCED_DOC)
    return cols


#: Column → (dtype, description) of ``dia_sources.parquet``.
DIA_SOURCE_COLUMNS: dict[str, tuple[str, str]] = _build_columns()


def empty_dia_sources() -> pd.DataFrame:
    """A zero-row catalogue with the full schema."""
    return pd.DataFrame({k: pd.Series([], dtype=v[0]) for k, v in DIA_SOURCE_COLUMNS.items()})


def _conform(df: pd.DataFrame) -> pd.DataFrame:
    out = {}
    for k, (dtype, _) in DIA_SOURCE_COLUMNS.items():
        if k in df:
            col = df[k]
            if col.dtype == np.dtype(dtype):  # already so (most columns): no fill, no cast (~1 ms of pandas each)
                out[k] = col.to_numpy()
                continue
            if dtype == "bool":
                col = col.fillna(False)
            elif dtype == "int64":
                col = col.fillna(-1)  # e.g. footprint fields of sky sources
            out[k] = col.astype(dtype).to_numpy()
        else:
            out[k] = np.full(len(df), False if dtype == "bool" else (-1 if dtype == "int64" else np.nan)).astype(dtype)
    return pd.DataFrame(out)


def write_dia_sources(catalog: pd.DataFrame, path: str | os.PathLike) -> str:
    """Write the catalogue to Parquet (full schema, column descriptions in the metadata).

    An empty catalogue is written with every column and ``n_dia_sources = 0`` in the
    metadata (and a log line saying so).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    df = _conform(catalog)
    table = pa.Table.from_pandas(df, preserve_index=False)
    n_real = int((~df["sky_source"]).sum()) if len(df) else 0
    meta = dict(table.schema.metadata or {})
    meta[b"diffim_dag.columns"] = json.dumps({k: v[1] for k, v in DIA_SOURCE_COLUMNS.items()}).encode()
    meta[b"diffim_dag.n_dia_sources"] = str(n_real).encode()
    table = table.replace_schema_metadata(meta)
    if n_real == 0:
        log.warning("%s: no DiaSource detected; writing a catalogue with the full schema and %d sky source rows",
                    path, len(df))
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return os.fspath(path)


def read_dia_sources(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``dia_sources.parquet`` back (pandas)."""
    return pd.read_parquet(path)
