r"""Template preparation: a template store, warping onto the science grid, registration and refinement.

:func:`prepare_template` returns the template resampled onto the science pixel grid (grown by ``border``
pixels on every side), with variance, mask and a PSF transformed by the local Jacobian of the mapping
(:class:`~diffim_dag.kernels.warp.WarpedPsf`), plus a metrics dictionary.

* Template store (:class:`TemplateStore`): a folder of patches (FITS or zarr exposures with WCS, variance,
  mask and PSF), indexed by their sky footprints.  Overlapping patches are warped and merged with
  inverse-variance weights; pixels that no patch covers are ``NO_DATA``; too little coverage raises
  :class:`~diffim_dag.errors.NoWorkFound` (with ``coverage``).
* Resampling: :func:`~diffim_dag.kernels.warp.warp_tile`, Lanczos-3 (or -5), one call per output tile
  (:func:`warp_tasks` gives the tiles and the source box each needs, the lead's graph runs them).
  Counts are conserved (pixel values × |det J|); see the kernel module for the convention.
* Registration without a (good) WCS: stars matched by triangles, an affine fit with clipping
  (:func:`register_exposures`), or the translation of the same stars where the affine's linear terms are not
  significant (:func:`~diffim_dag.kernels.register.prefer_translation`); the matched-star residual RMS goes to
  the metrics.
* Astrometric refinement: after a WCS-based warp, stars are matched between science and warped template;
  if their residual exceeds ``refine_threshold`` (0.1 px RMS), an affine correction :math:`C` is fitted and
  the template warped again with :math:`T' = T \circ C`; both residuals are reported.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NoWorkFound
from ..exposure import Exposure
from ..kernels.register import StarMatch, match_star_lists, prefer_translation
from ..kernels.warp import (
    AffineMapping,
    ComposedMapping,
    WarpedPsf,
    WcsMapping,
    kernel_order,
    source_bbox,
    warp_tile,
)
from ..masks import MaskPlanes
from ..memory import map_on_threads, started_on_thread
from ..psf import GridPsf, Psf, measure_fwhm
from ..kernels.maskops import has_bits, lacks_bits

__all__ = [
    "SAME_GRID_TOLERANCE",
    "WarpTileTask",
    "TemplatePatch",
    "TemplateStore",
    "grid_disagreement",
    "warp_tasks",
    "run_warp_task",
    "warp_exposure",
    "merge_warped",
    "register_exposures",
    "measure_alignment",
    "AlignmentCheck",
    "settle_alignment",
    "check_coverage",
    "centroided_stars",
    "prepare_template",
]

log = logging.getLogger(__name__)

#: Grids that differ by at most this (px, anywhere on the science grid) count as one grid.
SAME_GRID_TOLERANCE = 0.01
#: Mask planes whose pixels a merge avoids when another patch has a clean value there.
MERGE_REJECT_PLANES = ("BAD", "SAT", "CR", "EDGE", "SUSPECT", "INTRP")
#: Mask planes ignored when detecting registration stars.
STAR_BAD_PLANES = ("NO_DATA", "BAD", "SAT", "CR", "EDGE")


def _bits(planes: MaskPlanes, names: Iterable[str]) -> int:
    return planes.bitmask([n for n in names if n in planes])


def _grown_bbox(exposure: Exposure, border: int) -> tuple[int, int, int, int]:
    x0, x1, y0, y1 = exposure.bbox
    return x0 - border, x1 + border, y0 - border, y1 + border


def grid_disagreement(science: Exposure, template: Exposure, *, samples: int = 5) -> float:
    """Largest distance (template px) between a science pixel and its template position via the two WCSs.

    Zero when both exposures share one pixel grid; ``inf`` when either lacks a WCS.
    """
    if science.wcs is None or template.wcs is None:
        return math.inf
    x0, x1, y0, y1 = science.bbox
    gx, gy = np.meshgrid(np.linspace(x0, x1 - 1, samples), np.linspace(y0, y1 - 1, samples))
    u, v = WcsMapping(science.wcs, template.wcs)(gx, gy)
    return float(np.max(np.hypot(u - gx, v - gy)))


# ---------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WarpTileTask:
    """One output tile and the source box it needs (parent pixels, inclusive-exclusive)."""

    out_origin: tuple[int, int]
    out_shape: tuple[int, int]
    src_bbox: tuple[int, int, int, int]


def warp_tasks(
    source_bbox_parent: tuple[int, int, int, int],
    mapping,
    out_bbox: tuple[int, int, int, int],
    *,
    kernel: str = "lanczos3",
    tile: int | None = 1024,
) -> list[WarpTileTask]:
    """Split ``out_bbox`` into tiles and find, for each, the part of the source it reads.

    The source box is the bounding box of the mapped tile edges grown by the kernel radius, clipped to
    the source exposure's box ``source_bbox_parent``; tiles that need nothing from the source get an empty
    box (their output is all ``NO_DATA``).
    """
    ox0, ox1, oy0, oy1 = out_bbox
    t = max(ox1 - ox0, oy1 - oy0, 1) if not tile else int(tile)
    sx0, sx1, sy0, sy1 = source_bbox_parent
    tasks = []
    for y in range(oy0, oy1, t):
        for x in range(ox0, ox1, t):
            shape = (min(t, oy1 - y), min(t, ox1 - x))
            bx0, bx1, by0, by1 = source_bbox(mapping, out_origin=(x, y), out_shape=shape, kernel=kernel)
            bx0, bx1 = max(bx0, sx0), min(bx1, sx1)
            by0, by1 = max(by0, sy0), min(by1, sy1)
            if bx1 <= bx0 or by1 <= by0:
                bx0 = bx1 = sx0
                by0 = by1 = sy0
            tasks.append(WarpTileTask((x, y), shape, (bx0, bx1, by0, by1)))
    return tasks


def run_warp_task(task: WarpTileTask, source_planes, source_xy0, mapping, *, kernel="lanczos3", conserve="flux",
                  no_data_bit: int, invalid_variance_bit: int, variance_fill: float | None = None,
                  interp_length: int = 16, out=None):
    """Run one :class:`WarpTileTask` on the source planes ``(image, variance, mask)`` (numpy, whole source);
    ``out``: the tile's planes to write it into (:func:`~diffim_dag.kernels.warp.warp_tile`)."""
    img, var, msk = source_planes
    bx0, bx1, by0, by1 = task.src_bbox
    sl = (slice(by0 - source_xy0[1], by1 - source_xy0[1]), slice(bx0 - source_xy0[0], bx1 - source_xy0[0]))
    return warp_tile(img[sl], var[sl], msk[sl], mapping, out_origin=task.out_origin, out_shape=task.out_shape,
                     src_origin=(bx0, by0), kernel=kernel, conserve=conserve, no_data_bit=no_data_bit,
                     invalid_variance_bit=invalid_variance_bit, variance_fill=variance_fill,
                     interp_length=interp_length, out=out)


def _variance_fill(var: np.ndarray) -> float | None:
    """The variance a warp gives pixels whose own is unusable (the median of the positive ones); None when every
    variance is usable, so that nothing is filled (the median of a 4096² plane took 0.2 s of every warp)."""
    usable = np.isfinite(var)
    usable &= var >= 0
    if usable.all():
        return None
    good = var[np.isfinite(var) & (var > 0)]
    return float(np.median(good)) if good.size else 0.0


def warp_exposure(
    source: Exposure,
    mapping,
    out_bbox: tuple[int, int, int, int],
    *,
    kernel: str = "lanczos3",
    conserve: str = "flux",
    tile: int | None = None,
    wcs=None,
    interp_length: int = 16,
    workers: int = 1,
) -> Exposure:
    """Warp ``source`` onto the parent-pixel box ``out_bbox`` (eagerly, tile by tile).

    ``mapping`` gives source parent pixels for output parent pixels.  The result carries ``wcs``, a
    :class:`WarpedPsf` of the source PSF, the source's mask planes and metadata.  ``workers`` > 1 warps
    the tiles on that many threads (the gathers and sums release the GIL: 4096² in tiles of 1024 on 2
    cores, 3.7 s against 7.0 s in one piece).
    """
    kernel_order(kernel)
    planes = source.mask_planes
    img, var, msk = source.arrays()
    ox0, ox1, oy0, oy1 = out_bbox
    out_i = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)
    out_v = np.zeros_like(out_i)
    out_m = np.zeros(out_i.shape, np.int32)
    fill = _variance_fill(var)
    nd = planes.bitmask("NO_DATA")
    bad = planes.bitmask("BAD") if "BAD" in planes else nd
    tasks = warp_tasks(source.bbox, mapping, out_bbox, kernel=kernel, tile=tile)

    def run(task):  # each tile written into its part of the output planes (the tiles do not overlap)
        x, y = task.out_origin
        sl = (slice(y - oy0, y - oy0 + task.out_shape[0]), slice(x - ox0, x - ox0 + task.out_shape[1]))
        run_warp_task(task, (img, var, msk), source.xy0, mapping, kernel=kernel, conserve=conserve,
                      no_data_bit=nd, invalid_variance_bit=bad, variance_fill=fill, interp_length=interp_length,
                      out=(out_i[sl], out_v[sl], out_m[sl]))

    for _ in map_on_threads(run, tasks, workers):
        pass
    psf = None if source.psf is None else WarpedPsf(source.psf, mapping, out_bbox)
    return Exposure.from_arrays(out_i, out_v, out_m, xy0=(ox0, oy0), mask_planes=planes, wcs=wcs, psf=psf,
                                info=source.info, source="warped template", validate=False, copy=False)


# ---------------------------------------------------------------------------------------------
# merging and the store
# ---------------------------------------------------------------------------------------------
def merge_warped(planes_list: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *, no_data_bit: int,
                 reject_bits: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Merge warped patches on one grid with inverse-variance weights.

    At each pixel the contributors are the patches with data (no ``NO_DATA``), restricted to those without
    any ``reject_bits`` when at least one such clean patch exists.  With :math:`w_k = 1/V_k`
    (equal weights if no contributor has a positive variance)

    .. math::  I = \frac{\sum_k w_k I_k}{\sum_k w_k}, \qquad V = \frac{\sum_k w_k^2 V_k}{(\sum_k w_k)^2},

    the mask is the OR of the contributors' masks, and pixels without contributors are ``NO_DATA``.
    """
    img = np.stack([p[0] for p in planes_list]).astype(np.float64)
    var = np.stack([p[1] for p in planes_list]).astype(np.float64)
    msk = np.stack([p[2] for p in planes_list]).astype(np.int32)
    has = lacks_bits(msk, no_data_bit)
    clean = has & lacks_bits(msk, reject_bits)
    use = np.where(clean.any(axis=0)[None], clean, has)
    w = np.where(use & (var > 0) & np.isfinite(var), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    nuse = use.sum(axis=0)
    wsum = w.sum(axis=0)
    w = np.where((wsum == 0)[None] & use, 1.0, w)
    wsum = w.sum(axis=0)
    safe = np.where(wsum > 0, wsum, 1.0)
    out_i = (w * np.where(use, img, 0.0)).sum(axis=0) / safe
    out_v = (w * w * np.where(use, var, 0.0)).sum(axis=0) / safe**2
    out_m = np.bitwise_or.reduce(np.where(use, msk, 0), axis=0)
    none = nuse == 0
    out_i[none] = 0.0
    out_v[none] = 0.0
    out_m[none] |= no_data_bit
    return out_i.astype(np.float32), out_v.astype(np.float32), out_m.astype(np.int32)


@dataclass
class TemplatePatch:
    """One patch of a :class:`TemplateStore`: where it is on the sky and how to load it."""

    name: str
    bbox: tuple[int, int, int, int]
    wcs: Any
    path: Path | None = None
    exposure: Exposure | None = field(default=None, repr=False)

    def load(self) -> Exposure:
        if self.exposure is not None:
            return self.exposure
        return _read_patch(self.path)

    def boundary_sky(self, samples: int = 9) -> tuple[np.ndarray, np.ndarray]:
        """RA, Dec (deg) of points along the patch's outer pixel edges."""
        x0, x1, y0, y1 = self.bbox
        xs = np.linspace(x0 - 0.5, x1 - 0.5, samples)
        ys = np.linspace(y0 - 0.5, y1 - 0.5, samples)
        bx = np.concatenate([xs, xs, np.full(samples, xs[0]), np.full(samples, xs[-1])])
        by = np.concatenate([np.full(samples, ys[0]), np.full(samples, ys[-1]), ys, ys])
        return self.wcs.all_pix2world(bx, by, 0)


def _read_patch(path: Path) -> Exposure:
    if path.suffix == ".zarr" or path.is_dir():
        from ..io.zarr_store import read_zarr

        return read_zarr(path).load()
    from ..io.fits import read_exposure

    return read_exposure(path)


class TemplateStore:
    """Template patches indexed by sky footprint.

    Build from a folder (``*.fits``, ``*.fits.gz`` and ``*.zarr`` patches, each an exposure with WCS,
    variance, mask and PSF) with :meth:`from_folder`, or from exposures in memory with
    :meth:`from_exposures`.
    """

    def __init__(self, patches: Sequence[TemplatePatch]):
        self.patches = list(patches)
        for p in self.patches:
            if p.wcs is None:
                raise InputError(f"template patch {p.name}: no WCS; store patches need one")

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> TemplateStore:
        root = Path(path)
        if not root.is_dir():
            raise InputError(f"template store {root}: not a folder")
        files = sorted([*root.glob("*.fits"), *root.glob("*.fits.gz"), *root.glob("*.fit"), *root.glob("*.zarr")])
        if not files:
            raise InputError(f"template store {root}: no *.fits or *.zarr patches")
        patches = []
        for f in files:
            e = _read_patch(f)
            patches.append(TemplatePatch(name=f.name, bbox=e.bbox, wcs=e.wcs, path=f))
        return cls(patches)

    @classmethod
    def from_exposures(cls, exposures: Sequence[Exposure]) -> TemplateStore:
        return cls([TemplatePatch(name=f"patch{i}", bbox=e.bbox, wcs=e.wcs, exposure=e)
                    for i, e in enumerate(exposures)])

    def overlapping(self, science: Exposure, *, border: int = 0) -> list[tuple[TemplatePatch, tuple]]:
        """Patches whose footprint meets the science box grown by ``border``, with the output sub-box each
        covers (science parent pixels)."""
        if science.wcs is None:
            raise InputError("a template store needs a science WCS to find the overlapping patches")
        gx0, gx1, gy0, gy1 = _grown_bbox(science, border)
        out = []
        for p in self.patches:
            ra, dec = p.boundary_sky()
            x, y = science.wcs.all_world2pix(ra, dec, 0)
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                continue
            bx0, bx1 = max(int(math.floor(x.min())), gx0), min(int(math.ceil(x.max())) + 1, gx1)
            by0, by1 = max(int(math.floor(y.min())), gy0), min(int(math.ceil(y.max())) + 1, gy1)
            if bx1 > bx0 and by1 > by0:
                out.append((p, (bx0, bx1, by0, by1)))
        return out


class PatchworkPsf(Psf):
    """The PSF of merged patches: at (x, y), the PSF of the patch whose box holds (x, y) farthest from its
    edges (the nearest box when none holds it).  Serializes as its :class:`GridPsf` realization."""

    kind = "patchwork"

    def __init__(self, psfs: Sequence[Psf], boxes: Sequence[tuple[int, int, int, int]],
                 bbox: tuple[int, int, int, int], grid_nodes: int = 5):
        self.psfs = list(psfs)
        self.boxes = [tuple(b) for b in boxes]
        self.bbox = tuple(bbox)
        self.grid_nodes = grid_nodes
        self._grid = None

    def _pick(self, x, y) -> Psf:
        x0, x1, y0, y1 = self.bbox
        x = 0.5 * (x0 + x1 - 1) if x is None else x
        y = 0.5 * (y0 + y1 - 1) if y is None else y
        depth = [min(x - b[0], b[1] - 1 - x, y - b[2], b[3] - 1 - y) for b in self.boxes]
        return self.psfs[int(np.argmax(depth))]

    def _evaluate(self, x, y, dx, dy):
        return self._pick(x, y)._evaluate(x, y, dx, dy)

    def kernel_image(self, x=None, y=None, *, size=None, offset=(0.0, 0.0)):
        return self._pick(x, y).kernel_image(x, y, size=size, offset=offset)

    def default_size(self, x=None, y=None) -> int:
        return self._pick(x, y).default_size(x, y)

    def fwhm(self, x=None, y=None) -> float:
        return measure_fwhm(self.kernel_image(x, y))

    def to_payload(self):
        if self._grid is None:
            x0, x1, y0, y1 = self.bbox
            xn = np.linspace(x0, x1 - 1, self.grid_nodes)
            yn = np.linspace(y0, y1 - 1, self.grid_nodes)
            size = max(self.default_size(x, y) for x in xn for y in yn)
            images = np.array([[self.kernel_image(x, y, size=size) for x in xn] for y in yn])
            self._grid = GridPsf(images, xn, yn, source="patchwork PSF", normalized=True)
        return self._grid.to_payload()

    def __repr__(self) -> str:
        return f"PatchworkPsf({len(self.psfs)} patches, bbox={self.bbox})"


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
#: Side (px) of the windows an alignment check finds its stars in, on images too large to search whole.
ALIGNMENT_WINDOW = 1024
#: Stars (the highest S/N) a registration or an alignment check matches per image.
ALIGNMENT_STARS = 150


def alignment_windows(bbox, side: int = ALIGNMENT_WINDOW, *, max_fraction: float = 0.4):
    """Boxes ``(x0, x1, y0, y1)`` (parent pixels) an alignment check looks for stars in: the four corners and the
    centre, ``side`` px each, when they cover less than ``max_fraction`` of ``bbox``; else ``[bbox]``.

    A misalignment shows at the corners as well as anywhere (a rotation or scale error most of all there),
    and five windows of a 4096² image hold 31 % of its pixels: the check's star finding (twice, once on the
    warped template) costs that much less."""
    x0, x1, y0, y1 = (int(v) for v in bbox)
    nx, ny = x1 - x0, y1 - y0
    if 5 * side * side >= max_fraction * nx * ny or side >= min(nx, ny):
        return [(x0, x1, y0, y1)]
    cx, cy = x0 + (nx - side) // 2, y0 + (ny - side) // 2
    corners = [(x0, y0), (x1 - side, y0), (x0, y1 - side), (x1 - side, y1 - side), (cx, cy)]
    return [(a, a + side, b, b + side) for a, b in corners]


def _stars(exposure: Exposure, *, max_stars: int = ALIGNMENT_STARS, min_snr: float = 30.0, windows=None) -> np.ndarray:
    """Bright point sources of an exposure, brightest first: ``(n, 3)`` of parent ``x, y`` and flux.

    The PSF star finder (:func:`~diffim_dag.psf.estimate.find_psf_stars`: stellar locus of the
    half-light radius, so elongated and undersampled PSFs qualify; saturated, masked and blended
    sources out), positions refined by a Gaussian-windowed centroid on the full-resolution pixels.
    ``windows`` (parent boxes, :func:`alignment_windows`) restricts the search to them, the brightest
    ``max_stars / len(windows)`` (at least 20) in each; the whole image by default.  The windows are searched at
    the binning the whole image would be (2×2 from 4 Mpix): the same stars as unbinned windows (147 of 150 on a
    4096² frame, the same centroids), at half the cost.
    """
    from ..psf.estimate import BIN_PIXELS

    img, var, msk = exposure.arrays()
    binning = 2 if img.size >= BIN_PIXELS else 1
    bad_bits, sat_bits = _bits(exposure.mask_planes, STAR_BAD_PLANES), _bits(exposure.mask_planes, ["SAT"])
    ex, ey = exposure.xy0
    found = []
    windows = windows or [exposure.bbox]
    per_window = max(20, max_stars // len(windows))  # the brightest of each: the best centroids, as in one search
    for box in windows:
        sl = (slice(box[2] - ey, box[3] - ey), slice(box[0] - ex, box[1] - ex))
        bad, sat = has_bits(msk[sl], bad_bits), has_bits(msk[sl], sat_bits)  # the window's pixels only
        stars = _stars_in(img[sl], bad, sat, exposure.info.saturation, max_stars=per_window, min_snr=min_snr,
                          binning=binning)
        found.append(stars + np.array([box[0], box[2], 0.0]))
    out = np.concatenate(found) if found else np.empty((0, 3))
    return out[np.argsort(-out[:, 2], kind="stable")] if len(found) > 1 else out


def _stars_in(img, bad, sat, saturation, *, max_stars: int, min_snr: float, binning: int | None = None) -> np.ndarray:
    """:func:`_stars` of one array: ``(n, 3)`` of ``x, y`` (array pixels) and flux, brightest first."""
    from ..config import PsfEstimationConfig
    from ..psf.estimate import find_psf_stars

    cfg = PsfEstimationConfig(min_snr=min_snr, max_stars=max_stars)
    stars, info = find_psf_stars(img, bad, saturated=sat, saturation=saturation, config=cfg, binning=binning)
    return centroided_stars(img, stars, info["fwhm_guess"], max_stars=max_stars)


def centroided_stars(img, stars, fwhm_guess, *, max_stars: int = ALIGNMENT_STARS) -> np.ndarray:
    """The ``max_stars`` highest-S/N point sources of a :func:`~diffim_dag.psf.estimate.find_psf_stars` table
    (those it kept, and those cut for their number only), at their Gaussian-windowed centroids on the
    full-resolution pixels of ``img`` (the array the table was measured on, its ``background`` taken off):
    ``(n, 3)`` of ``x, y`` (array pixels) and flux, brightest first.  A centroid more than 1.5 px from the
    detection's pixel (a blend, a cosmic ray's neighbour) drops the source."""
    from ..kernels.centroid import window_centroids
    from ..psf.estimate import _stamps

    use = stars[stars["reason"].isin(["", "max_stars"])].head(max_stars)
    if not len(use) or fwhm_guess is None or not np.isfinite(fwhm_guess):
        return np.empty((0, 3))
    sigma = max(fwhm_guess / 2.3548, 0.5)
    h = int(np.ceil(4 * sigma)) + 1
    ny, nx = img.shape
    ix, iy = np.round(use["x"].to_numpy()).astype(int), np.round(use["y"].to_numpy()).astype(int)
    inside = (ix - h >= 0) & (iy - h >= 0) & (ix + h < nx) & (iy + h < ny)
    ix, iy = ix[inside], iy[inside]
    stamps = _stamps(img, ix, iy, h).astype(np.float64) - use["background"].to_numpy()[inside, None, None]
    d = window_centroids(stamps, sigma)
    keep = (np.abs(d[:, 0]) < 1.5) & (np.abs(d[:, 1]) < 1.5)
    out = np.column_stack([ix + d[:, 0], iy + d[:, 1], use["flux"].to_numpy()[inside]])
    return np.asarray(out[keep], dtype=np.float64).reshape(-1, 3)


def register_exposures(science: Exposure, template: Exposure, *, guess: AffineMapping | None = None,
                       kind: str = "affine", match_radius: float = 2.0, stars=None) -> StarMatch:
    """Fit the affine mapping science parent pixel → template parent pixel from matched star lists (``stars``:
    the two lists of :func:`_stars`, when the caller has them).

    Raises
    ------
    InputError
        If too few stars match (the message says how many).
    """
    s, t = stars if stars is not None else (_stars(science), _stars(template))
    return match_star_lists(s, t, kind=kind, guess=guess, match_radius=match_radius)


def measure_alignment(science: Exposure, warped: Exposure, *, match_radius: float = 2.0) -> StarMatch:
    """Match stars of the science and of a template warped onto its grid.

    ``result.rms`` is the residual of the affine correction fit; :func:`_raw_rms` of the matched
    positions (no fit) is the alignment residual reported in the metrics.
    """
    s = _stars(science)
    t = _stars(warped)
    return match_star_lists(s, t, kind="affine", guess=AffineMapping.identity(), match_radius=match_radius)


def _raw_rms(science_stars: np.ndarray, warped_stars: np.ndarray, match: StarMatch) -> float:
    d = science_stars[match.src_index, :2] - warped_stars[match.dst_index, :2]
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1)))) if len(d) else math.nan


@dataclass(eq=False)
class AlignmentCheck:
    """The alignment check after a warp, for the caller that has both images' stars (:func:`settle_alignment`):
    the raw template (or ``read_again``, which reads it again) and how it was warped (``mapping`` onto
    ``out_bbox``, with the science's ``wcs``), which a refinement warps again.  ``refine``: the warp followed the
    WCSs, and a matched-star residual above ``threshold`` (px RMS) refines it; else (a registration by stars) the
    residual is only reported."""

    template: Exposure | None
    mapping: object
    out_bbox: tuple
    wcs: object
    kernel: str = "lanczos3"
    tile: int | None = None
    workers: int = 1
    interp_length: int = 16
    refine: bool = True
    threshold: float = 0.1
    min_coverage: float = 0.1
    read_again: object = None  # () -> Exposure

    def warp(self, mapping) -> Exposure:
        """The raw template warped by ``mapping`` onto the output box."""
        template = self.template if self.template is not None else self.read_again()
        return warp_exposure(template, mapping, self.out_bbox, kernel=self.kernel, wcs=self.wcs,
                             tile=self.tile, workers=self.workers, interp_length=self.interp_length)

    def __sizeof__(self) -> int:
        from .inputs import _nbytes

        return 1024 + (_nbytes(self.template) if self.template is not None else 0)


def settle_alignment(check: AlignmentCheck, metrics: dict, science_stars: np.ndarray, warped_stars: np.ndarray,
                     warp_again):
    """Match the science's stars and the warped template's (parent ``x, y``, flux: :func:`_stars`, or
    :func:`centroided_stars` of the PSF stages' stars) and write the residual into ``metrics``.

    A registration by stars (``check.refine`` False) reports ``alignment_rms_after_px`` and
    ``alignment_n_matched_after``.  After a warp by the WCSs: ``alignment_rms_before_px``,
    ``alignment_n_matched``, ``refined``; above ``check.threshold`` an affine correction :math:`C` is fitted to the
    matches and ``warp_again(T ∘ C)`` gives ``(its result, its stars)``, matched again for
    ``alignment_rms_after_px`` (``refine_correction``: :math:`C`).  Returns that result, or None when the first warp
    stands.  Too few matches leave ``refine_error`` (and the residual None), never an exception."""
    try:
        match = match_star_lists(science_stars, warped_stars, kind="affine", guess=AffineMapping.identity(),
                                 match_radius=2.0)
    except InputError as exc:
        if check.refine:
            metrics.update(refined=False, refine_error=str(exc))
        else:
            metrics.update(alignment_rms_after_px=None, refine_error=str(exc))
        return None
    rms = _raw_rms(science_stars, warped_stars, match)
    if not check.refine:
        metrics.update(alignment_rms_after_px=rms, alignment_n_matched_after=match.n_matched)
        return None
    metrics.update(alignment_rms_before_px=rms, alignment_n_matched=match.n_matched, refined=False)
    if not rms > check.threshold:
        metrics["alignment_rms_after_px"] = rms
        return None
    # warped(x) = T(x); stars sit at warped ≈ C(science): new T' = T ∘ C
    again, stars = warp_again(ComposedMapping(match.mapping, check.mapping))
    metrics["refined"] = True
    metrics["refine_correction"] = {"matrix": match.mapping.matrix.tolist(), "offset": match.mapping.offset.tolist()}
    try:
        match2 = match_star_lists(science_stars, stars, kind="affine", guess=AffineMapping.identity(),
                                  match_radius=2.0)
        metrics.update(alignment_rms_after_px=_raw_rms(science_stars, stars, match2),
                       alignment_n_matched_after=match2.n_matched)
    except InputError as exc:
        metrics["alignment_rms_after_px"] = None
        metrics["refine_error"] = str(exc)
    return again


def check_coverage(science: Exposure, warped: Exposure, metrics: dict, out_bbox, no_data_bit: int,
                   min_coverage: float) -> None:
    """The fraction of the science's pixels the warped template covers, into ``metrics["coverage"]``; too little
    raises :class:`~diffim_dag.errors.NoWorkFound`."""
    _, _, msk = warped.arrays()
    cov = _coverage(science, msk, out_bbox, no_data_bit)
    metrics["coverage"] = cov
    _check_coverage(cov, min_coverage, "the warped template")


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _wcs_overlap(science: Exposure, template: Exposure, mapping, samples: int = 17) -> float:
    """Fraction of a ``samples²`` grid of science pixels (corners and edges included) that the WCS mapping puts
    inside the template: the coverage known before any pixel is warped."""
    x0, x1, y0, y1 = science.bbox
    gx, gy = np.meshgrid(np.linspace(x0, x1 - 1, samples), np.linspace(y0, y1 - 1, samples))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # far outside a TAN projection the inverse may not converge
        u, v = mapping(gx, gy)
    tx0, tx1, ty0, ty1 = template.bbox
    inside = np.isfinite(u) & np.isfinite(v) & (u >= tx0 - 0.5) & (u <= tx1 - 0.5) & (v >= ty0 - 0.5) & (v <= ty1 - 0.5)
    return float(inside.mean())


def _cut_to_grid(template: Exposure, out_bbox, no_data_bit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template's pixels on the box ``out_bbox`` of its own pixel frame, NO_DATA outside it."""
    ox0, ox1, oy0, oy1 = out_bbox
    img = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)
    var = np.zeros_like(img)
    msk = np.full(img.shape, no_data_bit, np.int32)
    tx0, tx1, ty0, ty1 = template.bbox
    ix0, ix1, iy0, iy1 = max(ox0, tx0), min(ox1, tx1), max(oy0, ty0), min(oy1, ty1)
    if ix1 > ix0 and iy1 > iy0:
        ti, tv, tm = template.arrays()
        src = (slice(iy0 - ty0, iy1 - ty0), slice(ix0 - tx0, ix1 - tx0))
        dst = (slice(iy0 - oy0, iy1 - oy0), slice(ix0 - ox0, ix1 - ox0))
        img[dst], var[dst], msk[dst] = ti[src], tv[src], tm[src]
    return img, var, msk


def _coverage(science: Exposure, template_mask: np.ndarray, out_bbox, no_data_bit: int) -> float:
    sx0, sx1, sy0, sy1 = science.bbox
    ox0, _, oy0, _ = out_bbox
    sub = template_mask[sy0 - oy0: sy1 - oy0, sx0 - ox0: sx1 - ox0]
    _, _, smask = science.arrays()
    sgood = lacks_bits(smask, science.bitmask("NO_DATA")) if "NO_DATA" in science.mask_planes else np.ones(sub.shape, bool)
    n = int(sgood.sum())
    if n == 0:
        return 0.0
    return float(np.count_nonzero(sgood & lacks_bits(sub, no_data_bit))) / n


def _check_coverage(coverage: float, min_coverage: float, what: str) -> None:
    if coverage < min_coverage:
        raise NoWorkFound(f"{what} covers {100 * coverage:.1f}% of the science pixels "
                          f"(minimum {100 * min_coverage:.1f}%)", coverage=coverage)


def _from_store(science, store, *, border, kernel, min_coverage, interp_length, tile):
    if not isinstance(store, TemplateStore):
        store = TemplateStore.from_folder(store) if isinstance(store, (str, os.PathLike)) else \
            TemplateStore.from_exposures(list(store))
    out_bbox = _grown_bbox(science, border)
    ox0, ox1, oy0, oy1 = out_bbox
    hits = store.overlapping(science, border=border)
    if not hits:
        raise NoWorkFound("no template patch overlaps the science exposure (0.0% covered)", coverage=0.0)
    a = kernel_order(kernel)
    planes_list, psfs, boxes = [], [], []
    planes = None
    names = []
    for patch, (bx0, bx1, by0, by1) in hits:
        exp = patch.load()
        planes = exp.mask_planes if planes is None else planes.merged(exp.mask_planes)
        sub = (max(bx0 - a - 1, ox0), min(bx1 + a + 1, ox1), max(by0 - a - 1, oy0), min(by1 + a + 1, oy1))
        mapping = WcsMapping(science.wcs, exp.wcs)
        warped = warp_exposure(exp, mapping, sub, kernel=kernel, wcs=science.wcs, tile=tile,
                               interp_length=interp_length)
        nd = planes.bitmask("NO_DATA")
        full_i = np.zeros((oy1 - oy0, ox1 - ox0), np.float32)
        full_v = np.zeros_like(full_i)
        full_m = np.full(full_i.shape, nd, np.int32)
        wi, wv, wm = warped.arrays()
        sl = (slice(sub[2] - oy0, sub[3] - oy0), slice(sub[0] - ox0, sub[1] - ox0))
        full_i[sl], full_v[sl], full_m[sl] = wi, wv, wm
        planes_list.append((full_i, full_v, full_m))
        if warped.psf is not None:
            psfs.append(warped.psf)
            boxes.append(sub)
        names.append(patch.name)
    nd = planes.bitmask("NO_DATA")
    img, var, msk = merge_warped(planes_list, no_data_bit=nd, reject_bits=_bits(planes, MERGE_REJECT_PLANES))
    coverage = _coverage(science, msk, out_bbox, nd)
    metrics = {"template_source": "store", "patches": names, "n_patches": len(names), "coverage": coverage,
               "warped": True, "kernel": kernel, "border": border}
    _check_coverage(coverage, min_coverage, f"the template store ({len(names)} overlapping patches)")
    psf = None
    if len(psfs) == 1:
        psf = psfs[0]
    elif psfs:
        psf = PatchworkPsf(psfs, boxes, out_bbox)
    first = hits[0][0].load()
    out = Exposure.from_arrays(img, var, msk, xy0=(ox0, oy0), mask_planes=planes, wcs=science.wcs, psf=psf,
                               info=first.info, source="template store", validate=False)
    return out, metrics


def prepare_template(
    science: Exposure,
    template: Exposure | None = None,
    *,
    store=None,
    warp: bool | None = None,
    kernel: str = "lanczos3",
    border: int = 0,
    refine: bool = True,
    refine_threshold: float = 0.1,
    min_coverage: float = 0.1,
    interp_length: int = 16,
    tile: int | None = None,
    workers: int = 1,
    check_later: bool = False,
    read_again=None,
) -> tuple[Exposure, dict] | tuple[Exposure, dict, AlignmentCheck | None]:
    """The template on the science pixel grid grown by ``border`` pixels, and metrics.

    Parameters
    ----------
    science : Exposure
        Defines the output grid (its parent frame; the output's xy0 is ``science.xy0 - border``).
    template : Exposure, optional
        A template exposure; exclusive with ``store``.
    store : TemplateStore, folder path or sequence of Exposure, optional
        Patches to find, warp and merge (needs WCSs).
    warp : bool, optional
        ``None``: warp when the WCS grids differ by more than 0.01 px (or, without WCSs, when the
        registered mapping does).  ``False``: the template is declared to share the science grid; it is
        cut/padded in pixel space, and if the WCSs disagree a warning gives the disagreement (px) and the
        template's WCS is kept.  ``True``: always warp.
    kernel : {'lanczos3', 'lanczos5'}
    border : int
        Pixels added on every side (≥ the matching kernel half-width lets convolution fill the science box).
    refine : bool
        After a WCS-based warp, measure the matched-star residual and, above ``refine_threshold`` px RMS,
        refine the mapping from the matches and warp again.
    min_coverage : float
        Fewer covered science pixels than this fraction raise :class:`NoWorkFound`.
    tile, workers : int
        The warp runs in tiles of ``tile`` px (default: one piece) on ``workers`` threads.
    check_later : bool
        Warp, and leave the alignment check after it (and a refinement's second warp) to the caller, who will
        have both images' stars (:class:`AlignmentCheck`, :func:`settle_alignment`): the visit graph's
        ``exposure`` tasks find them for their PSFs.  Returns ``(template, metrics, check)`` then (``check`` None
        when there is none to make).
    read_again : callable, optional
        With ``check_later``: reads the raw template again, for a refinement's second warp, so that the check does
        not hold it (a 4096² run that held it until its inputs task had its heap grown past what it keeps, and its
        tile tasks touched 0.5 GB of pages again).

    Returns
    -------
    template : Exposure
    metrics : dict
        ``warped``, ``grid_disagreement_px``, ``coverage``, and, where measured,
        ``registration_rms_px`` / ``registration_n_matched`` (star-list fit without WCS; ``registration_model``
        ``"affine"``, or ``"shift"`` where the affine's linear terms were not significant:
        ``registration_linear_terms_p``, :func:`~diffim_dag.kernels.register.prefer_translation`),
        ``alignment_rms_before_px`` / ``alignment_rms_after_px`` (matched-star residual after the first and
        the final warp), ``refined``.
    """
    if border < 0:
        raise InputError(f"prepare_template: border must be ≥ 0, got {border}")
    kernel_order(kernel)
    if (template is None) == (store is None):
        raise InputError("prepare_template: give exactly one of template= and store=")

    def result(out, m, check=None):
        return (out, m, check) if check_later else (out, m)

    if template is None:
        out, m = _from_store(science, store, border=border, kernel=kernel, min_coverage=min_coverage,
                             interp_length=interp_length, tile=tile)
        return result(out, m)

    out_bbox = _grown_bbox(science, border)
    planes = template.mask_planes
    nd = planes.bitmask("NO_DATA")
    metrics: dict[str, Any] = {"template_source": "exposure", "kernel": kernel, "border": border}
    disagreement = grid_disagreement(science, template)
    metrics["grid_disagreement_px"] = disagreement if math.isfinite(disagreement) else None

    def unwarped(wcs) -> tuple[Exposure, dict]:
        img, var, msk = _cut_to_grid(template, out_bbox, nd)
        cov = _coverage(science, msk, out_bbox, nd)
        metrics.update(warped=False, coverage=cov)
        _check_coverage(cov, min_coverage, "the template")
        out = Exposure.from_arrays(img, var, msk, xy0=out_bbox[::2], mask_planes=planes, wcs=wcs,
                                   psf=template.psf, info=template.info, source="template", validate=False)
        return out, metrics

    if warp is False:
        if math.isfinite(disagreement) and disagreement > SAME_GRID_TOLERANCE:
            msg = (f"template declared on the science grid (warp=False) but the WCSs disagree by "
                   f"{disagreement:.3f} px; using the template's WCS")
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
        out, m = unwarped(template.wcs if template.wcs is not None else science.wcs)
        return result(out, m)
    have_wcs = science.wcs is not None and template.wcs is not None
    if warp is None and have_wcs and disagreement <= SAME_GRID_TOLERANCE:
        out, m = unwarped(template.wcs)
        return result(out, m)

    def checked(check: AlignmentCheck, science_stars=None):
        """The warp's alignment check: made here (with the science's stars, when found beside the warp), or
        handed to the caller."""
        nonlocal warped
        if not check.refine:
            check.template = None  # (nothing to warp again: a registration's residual is only reported)
        if check_later:
            if read_again is not None and check.refine:
                check.template, check.read_again = None, read_again
            return check
        windows = alignment_windows(science.bbox)
        s = science_stars() if science_stars is not None else _stars(science, windows=windows)

        def warp_again(mapping):
            again = check.warp(mapping)
            return again, _stars(again, windows=windows)

        again = settle_alignment(check, metrics, s, _stars(warped, windows=windows), warp_again)
        warped = again if again is not None else warped
        return None

    check = None
    if have_wcs:
        mapping = WcsMapping(science.wcs, template.wcs)
        overlap = _wcs_overlap(science, template, mapping)
        metrics["wcs_overlap"] = overlap
        if overlap < min_coverage:  # said before any pixel is warped
            raise NoWorkFound(
                f"template {template.info.filename or '(in memory)'} covers {100 * overlap:.1f}% of science "
                f"{science.info.filename or '(in memory)'} by their WCSs (minimum {100 * min_coverage:.1f}%)",
                coverage=overlap)
        # the science's stars for the alignment check need no warp: found beside it (``workers`` > 1)
        science_stars = started_on_thread(lambda: _stars(science, windows=alignment_windows(science.bbox))) \
            if refine and workers > 1 and not check_later else None
        check = AlignmentCheck(template, mapping, out_bbox, science.wcs, kernel=kernel, tile=tile, workers=workers,
                               interp_length=interp_length, refine=True, threshold=refine_threshold,
                               min_coverage=min_coverage)
        warped = check.warp(mapping)
        metrics.update(warped=True, registration="wcs")
        check = checked(check, science_stars) if refine else None
    else:
        names = (f"template {template.info.filename or '(in memory)'} on science "
                 f"{science.info.filename or '(in memory)'}")
        s_stars, t_stars = map_on_threads(_stars, [science, template], workers)
        if min(len(s_stars), len(t_stars)) < 3:
            if warp is None and template.bbox == science.bbox:
                # no WCS and too few stars to register by (a small stamp, a sparse field): two frames of one size
                # are taken as one grid, as HOTPANTS takes its inputs; the verdict's kernel-shift check says if not
                msg = (f"{names}: no WCS and too few stars to register by ({len(s_stars)} and {len(t_stars)}, "
                       "need 3 each); the frames are the same size and taken as one pixel grid")
                log.warning(msg)
                out, m = unwarped(None)
                m.update(registration="none (too few stars; one grid assumed)", grid_disagreement_px=None)
                return result(out, m)
            raise InputError(f"cannot register {names}: no WCS and too few stars ({len(s_stars)} and "
                             f"{len(t_stars)}, need 3 each); give both frames a WCS, or the same size and --no-warp")
        try:
            reg = register_exposures(science, template, stars=(s_stars, t_stars))
        except InputError as exc:
            raise InputError(f"cannot register {names} by their stars (no WCS): {exc}") from None
        # a shift where the affine's linear terms fit only the centroids' noise: no rotation or scale made up,
        # and the warp's separable path (a 4096² pair shifted by a fraction of a pixel: its linear terms ~1e-6)
        reg, p_linear = prefer_translation(s_stars, t_stars, reg)
        model = "shift" if np.array_equal(reg.mapping.matrix, np.eye(2)) else "affine"
        metrics.update(registration="stars", registration_model=model,
                       registration_linear_terms_p=None if math.isnan(p_linear) else p_linear,
                       registration_rms_px=reg.rms, registration_n_matched=reg.n_matched,
                       registration_transform={"matrix": reg.mapping.matrix.tolist(),
                                               "offset": reg.mapping.offset.tolist()})
        x0, x1, y0, y1 = science.bbox
        gx, gy = np.meshgrid(np.linspace(x0, x1 - 1, 5), np.linspace(y0, y1 - 1, 5))
        u, v = reg.mapping(gx, gy)
        shift = float(np.max(np.hypot(u - gx, v - gy)))
        metrics["grid_disagreement_px"] = shift
        if warp is None and shift <= SAME_GRID_TOLERANCE:
            out, m = unwarped(science.wcs)
            return result(out, m)
        check = AlignmentCheck(template, reg.mapping, out_bbox, science.wcs, kernel=kernel, tile=tile,
                               workers=workers, interp_length=interp_length, refine=False,
                               threshold=refine_threshold, min_coverage=min_coverage)
        warped = check.warp(reg.mapping)
        metrics.update(warped=True)
        # a frame checked whole (no windows) has its stars already: the registration's, the same search
        same_search = alignment_windows(science.bbox) == [tuple(science.bbox)]
        check = checked(check, (lambda: s_stars) if same_search else None)
    check_coverage(science, warped, metrics, out_bbox, nd, min_coverage)
    return result(warped, metrics, check)
