"""The batch manifest: one CSV row per (visit, detector) — where its science, template (or template store)
and optional PSF, variance, noise, weight and mask files are — read into :class:`VisitSpec` values."""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import InputError

__all__ = ["VisitSpec", "read_manifest", "write_manifest", "visit_key", "visit_dir", "input_shape", "image_shape"]

log = logging.getLogger(__name__)

_EXPOSURE_OPTIONS = ("psf", "variance", "noise", "weight", "mask", "hdu")
_REQUIRED = ("visit", "detector", "science")


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True, kw_only=True)
class VisitSpec:
    """One row of the manifest: where one (visit, detector)'s inputs are (absolute paths, no pixels)."""

    visit: int
    detector: int
    science: str
    template: str | None = None
    template_store: str | None = None
    science_options: tuple[tuple[str, str], ...] = ()
    template_options: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return visit_key(self.visit, self.detector)


def visit_key(visit: int, detector: int) -> str:
    """The readable, stable Dask key of one (visit, detector) task."""
    return f"visit-{visit}-det-{detector}"


def visit_dir(out_dir: str | os.PathLike, visit: int, detector: int) -> Path:
    """``out_dir/visit=V/detector=D`` (Hive-style, like the DiaSource dataset)."""
    return Path(out_dir) / f"visit={visit}" / f"detector={detector}"


def input_shape(spec: VisitSpec) -> tuple[int, int] | None:
    """``(ny, nx)`` of the visit's science image from its header alone (:func:`image_shape` with its ``hdu`` option):
    the batch graph's tile and cell task counts (:func:`diffim_dag.visit.visit_grid`).  The template is brought
    onto the science grid, so the science shape is the visit's."""
    return image_shape(spec.science, dict(spec.science_options).get("hdu"))


def image_shape(path: str | os.PathLike, hdu: str | int | None = None) -> tuple[int, int] | None:
    """``(ny, nx)`` of an image from its header alone, or None when it cannot be read.

    FITS: the ``NAXIS1``/``NAXIS2`` cards of the image HDU (``hdu``, else ``IMAGE`` of an LSST-layout file, else
    the only image HDU); zarr: the image array's metadata.  No pixel is read (the command line sizes the memory it
    touches ahead with it: :func:`diffim_dag.memory.touch_heap_ahead`).
    """
    path = Path(path)
    try:
        if path.is_dir():
            for name in ("image/.zarray", "image/zarr.json"):
                meta = path / name
                if meta.is_file():
                    shape = json.loads(meta.read_text()).get("shape")
                    return (int(shape[0]), int(shape[1])) if shape and len(shape) == 2 else None
            return None
        import warnings

        from astropy.io import fits

        with warnings.catch_warnings(), fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            warnings.simplefilter("ignore")  # a damaged file is the workers' to report
            if hdu is not None:
                header = hdul[int(hdu) if str(hdu).isdigit() else hdu].header
            else:
                names = [h.name.upper() for h in hdul]
                if "IMAGE" in names:
                    header = hdul["IMAGE"].header
                else:
                    images = [h.header for h in hdul if h.header.get("NAXIS", 0) >= 2]
                    if len(images) != 1:
                        return None
                    header = images[0]
            dims = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
        dims = [n for n in dims if n != 1]
        return (dims[1], dims[0]) if len(dims) == 2 and min(dims) > 0 else None
    except Exception:  # unreadable here (missing, corrupt, another filesystem): the workers will say why
        return None


def _int_field(value: str, column: str, where: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: column {column!r} must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise InputError(f"{where}: column {column!r} must be an integer, got {value!r}")
    return int(f)


def read_manifest(path: str | os.PathLike) -> list[VisitSpec]:
    """Read a batch manifest (CSV); relative paths are taken from the manifest's folder.

    Raises :class:`InputError` naming the file, line and column for a missing column,
    a non-integer visit/detector, a row without a template, or a duplicated (visit, detector).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    base = path.resolve().parent

    def resolve(p: str) -> str:
        p = p.strip()
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in _REQUIRED if c not in columns]
        if "template" not in columns and "template_store" not in columns:
            missing.append("template")
        if missing:
            raise InputError(f"{path}: manifest lacks column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
        known = set(_REQUIRED) | {"template", "template_store"} | {
            f"{role}_{o}" for role in ("science", "template") for o in _EXPOSURE_OPTIONS}
        unknown = [c for c in columns if c not in known]
        if unknown:
            log.warning("%s: ignoring unknown manifest column(s) %s", path, ", ".join(unknown))
        specs: list[VisitSpec] = []
        seen: dict[tuple[int, int], int] = {}
        for lineno, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            where = f"{path}, line {lineno}"
            visit = _int_field(row.get("visit", ""), "visit", where)
            detector = _int_field(row.get("detector", ""), "detector", where)
            if not row.get("science"):
                raise InputError(f"{where}: empty 'science' path")
            template = row.get("template") or None
            store = row.get("template_store") or None
            if template and template.startswith("store:"):
                store, template = template[len("store:"):], None
            elif template and Path(resolve(template)).is_dir() and not template.rstrip("/").endswith(".zarr"):
                store, template = template, None
            if (template is None) == (store is None):
                raise InputError(f"{where}: give exactly one of a template file and a template store")
            if (visit, detector) in seen:
                raise InputError(f"{where}: (visit {visit}, detector {detector}) repeats line {seen[visit, detector]}")
            seen[visit, detector] = lineno

            def options(role):
                out = []
                for o in _EXPOSURE_OPTIONS:
                    v = row.get(f"{role}_{o}")
                    if v:
                        out.append((o, v if o == "hdu" else resolve(v)))
                return tuple(out)

            specs.append(VisitSpec(
                visit=visit, detector=detector, science=resolve(row["science"]),
                template=resolve(template) if template else None, template_store=resolve(store) if store else None,
                science_options=options("science"), template_options=options("template"),
            ))
    if not specs:
        raise InputError(f"{path}: manifest has no rows")
    return specs


def write_manifest(specs: Iterable[VisitSpec], path: str | os.PathLike) -> Path:
    """Write ``specs`` as a manifest CSV with paths relative to its folder (where possible)."""
    from .io.atomic import atomic_path

    path = Path(path)
    specs = list(specs)
    base = path.resolve().parent
    opt_cols = sorted({f"{role}_{o}" for s in specs for role, opts in (("science", s.science_options),
                                                                        ("template", s.template_options))
                       for o, _ in opts})

    def rel(p):
        try:
            r = os.path.relpath(p, base)
        except ValueError:
            return p
        return p if r.startswith("..") else r

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["visit", "detector", "science", "template", *opt_cols])
            for s in specs:
                opts = {f"science_{o}": v for o, v in s.science_options}
                opts.update({f"template_{o}": v for o, v in s.template_options})
                tmpl = rel(s.template) if s.template else f"store:{rel(s.template_store)}"
                w.writerow([s.visit, s.detector, rel(s.science), tmpl,
                            *[(rel(opts[c]) if opts.get(c) and not c.endswith("_hdu") else opts.get(c, ""))
                              for c in opt_cols]])
    return path
