r"""Measurement of sources on one tile of a difference (or direct) image.

All positions are parent-frame pixels; a tile's ``image[0, 0]`` sits at ``origin``.

PSF photometry
--------------
At a centroid :math:`\mathbf{x}` with the unit-sum PSF :math:`P_\mathbf{x}` rendered
there (sub-pixel offset), the maximum-likelihood flux and its error are

.. math::

    F = \frac{\sum_i P_i D_i / V_i}{\sum_i P_i^2 / V_i}, \qquad
    \sigma_F = \Big(\sum_i P_i^2 / V_i\Big)^{-1/2},

over the good pixels of a PSF-sized stamp (LSST ``PsfFlux``).

Centroid
--------
Gauss–Newton fit of :math:`F P_{\mathbf{x}}` to the stamp: linearising
:math:`P_{\mathbf{x}+\delta} \approx P_\mathbf{x} - \delta_x \partial_x P - \delta_y \partial_y P`
(derivatives by central differences of rendered PSFs), the weighted linear model
:math:`D \approx F P + a\,(-\partial_x P) + b\,(-\partial_y P)` gives
:math:`\delta = (a, b) / F`; iterate to :math:`|\delta| < 10^{-4}` px.  The centroid
errors are :math:`\sqrt{C_{aa}}/|F|`, :math:`\sqrt{C_{bb}}/|F|` with
:math:`C = (A^T W A)^{-1}`.  Sources of either sign are fitted the same way.

Second moments
--------------
Adaptive Gaussian-weighted moments (Bernstein & Jarvis 2002; LSST ``SdssShape``):
the weight's covariance is iterated to twice the weighted moments,
:math:`C_w \leftarrow 2 M(C_w)`; at the fixed point :math:`C_w` equals the
covariance of a Gaussian source, which is reported as ``(ixx, iyy, ixy)``.

Apertures
---------
Exact circular-aperture sums (SEP) of radius 12 px and 2×FWHM, with
error :math:`\sqrt{\sum V}`; masked (no-data) pixels are excluded and flagged.

Pixel flags
-----------
For each plane, ``pixel_flags_<plane>`` is set when any footprint pixel (or, without a
footprint, any pixel within the PSF half-width) has it, ``pixel_flags_<plane>_center``
when any pixel of the 3×3 box at the centroid has it (LSST ``PixelFlags``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..masks import DEFAULT_MASK_PLANES
from ..psf import Psf
from .detection import Footprint
from .maskops import GoodPixels, bits_of, lacks_bits

__all__ = [
    "FLAG_PLANES",
    "render_psf",
    "render_psfs",
    "psf_fit",
    "psf_fits",
    "forced_psf_flux",
    "aperture_fluxes",
    "adaptive_moments",
    "adaptive_moments_many",
    "measure_sources",
    "measurement_columns",
]

#: Planes reported as pixel flags (anywhere / centre).
FLAG_PLANES: tuple[str, ...] = (
    "BAD",
    "SAT",
    "INTRP",
    "CR",
    "EDGE",
    "SUSPECT",
    "NO_DATA",
    "SAT_TEMPLATE",
    "INJECTED",
    "INJECTED_TEMPLATE",
    "STREAK",
    "HIGH_VARIANCE",
)
#: Pixels with these planes get zero weight in fits and are excluded from apertures.
DEFAULT_EXCLUDED_PLANES: tuple[str, ...] = ("NO_DATA", "BAD", "SAT")

_DERIV_STEP = 0.05


def render_psf(
    psf: Psf,
    x: float,
    y: float,
    bbox: tuple[int, int, int, int],
    *,
    size: int | None = None,
    shape_at: tuple[float, float] | None = None,
) -> np.ndarray:
    """The unit-sum PSF centred at parent ``(x, y)``, sampled on the parent box ``bbox``.

    The kernel (``size``², default ``psf.default_size``) is rendered at the nearest pixel
    with the sub-pixel offset and pasted into the box (parts outside it are cut).  Its shape is
    the model's at ``shape_at`` (default ``(x, y)``): fits that move a source by fractions of a
    pixel keep one shape, so their derivatives are those of the position alone.
    """
    bx0, bx1, by0, by1 = bbox
    out = np.zeros((by1 - by0, bx1 - bx0), dtype=np.float64)
    sx, sy = (x, y) if shape_at is None else shape_at
    size = psf.default_size(sx, sy) if size is None else int(size)
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    _paste(out, psf.kernel_image(sx, sy, size=size, offset=(x - ix, y - iy)), ix, iy, bbox)
    return out


def _paste(out: np.ndarray, k: np.ndarray, ix: int, iy: int, bbox) -> None:
    """Put the kernel ``k`` centred on parent pixel ``(ix, iy)`` into ``out`` (the parent box ``bbox``), cut to it."""
    bx0, bx1, by0, by1 = bbox
    h = k.shape[0] // 2
    xa, xb, ya, yb = ix - h, ix + h + 1, iy - h, iy + h + 1
    cxa, cxb, cya, cyb = max(xa, bx0), min(xb, bx1), max(ya, by0), min(yb, by1)
    if cxa < cxb and cya < cyb:
        out[cya - by0 : cyb - by0, cxa - bx0 : cxb - bx0] = k[cya - ya : cyb - ya, cxa - xa : cxb - xa]


def render_psfs(
    psf: Psf,
    positions,
    bbox: tuple[int, int, int, int],
    *,
    size: int,
    shape_at: tuple[float, float],
) -> np.ndarray:
    """``(n, ny, nx)``: :func:`render_psf` at each ``(x, y)`` of ``positions`` with one shape (``shape_at``),
    equal to it bit for bit; the model renders its shifted copies together (:meth:`Psf.kernel_images`)."""
    bx0, bx1, by0, by1 = bbox
    centres = [(int(math.floor(x + 0.5)), int(math.floor(y + 0.5))) for x, y in positions]
    kernels = psf.kernel_images(shape_at[0], shape_at[1], size=int(size),
                                offsets=[(x - ix, y - iy) for (x, y), (ix, iy) in zip(positions, centres)])
    out = np.zeros((len(centres), by1 - by0, bx1 - bx0), dtype=np.float64)
    for o, k, (ix, iy) in zip(out, kernels, centres):
        _paste(o, k, ix, iy, bbox)
    return out


def _stamp(shape, origin, x, y, half):
    """Parent box of half-width ``half`` around the nearest pixel to (x, y), clipped to the tile."""
    ny, nx = shape
    x0, y0 = origin
    ix, iy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    return (max(ix - half, x0), min(ix + half + 1, x0 + nx), max(iy - half, y0), min(iy + half + 1, y0 + ny))


def _cut(arr, bbox, origin):
    bx0, bx1, by0, by1 = bbox
    return arr[by0 - origin[1] : by1 - origin[1], bx0 - origin[0] : bx1 - origin[0]]


def _weights(var, good):
    w = np.zeros(var.shape, dtype=np.float64)
    ok = good & (var > 0) & np.isfinite(var)
    w[ok] = 1.0 / var[ok]
    return w


def _stamp_pixels(shape, cx, cy, half: int, origin):
    """Index arrays ``(rows, cols)`` of the ``(n, size, size)`` stamps of half-width ``half`` centred on parent
    pixels ``(cx, cy)`` in an array of ``shape`` at ``origin`` (clipped to it), and where each stamp pixel is
    on the array."""
    ny, nx = shape
    grid = np.arange(-half, half + 1)
    rows = np.asarray(cy)[:, None] - origin[1] + grid  # (n, size) array rows
    cols = np.asarray(cx)[:, None] - origin[0] + grid
    on = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    return np.clip(rows, 0, ny - 1)[:, :, None], np.clip(cols, 0, nx - 1)[:, None, :], on


def _frames(image, variance, good, cx, cy, half: int, origin):
    """Data and inverse-variance weights ``(n, size, size)`` (float64) of the stamps of half-width ``half`` centred
    on parent pixels ``(cx, cy)``: the tile's pixels where the stamp lies on it, 0 (no weight) off it."""
    r, c, on = _stamp_pixels(image.shape, cx, cy, half, origin)
    d = np.where(on, np.asarray(image[r, c], dtype=np.float64), 0.0)
    return d, _weights(np.asarray(variance[r, c], dtype=np.float64), on & np.asarray(good[r, c], dtype=bool))


def _renders(psf: Psf, xs, ys, positions, cx, cy, size: int) -> np.ndarray:
    """``(n, k, size, size)``: the unit-sum PSF of shape ``(xs[i], ys[i])`` centred at each of ``positions[i]``
    (``(n, k, 2)``), rendered at its nearest pixel with the sub-pixel offset and placed in the stamp centred on
    ``(cx[i], cy[i])`` (:func:`render_psfs`, for a batch of sources)."""
    centre = np.floor(positions + 0.5)
    kern = psf.kernel_images_many(xs, ys, size=size, offsets=positions - centre)
    grid = np.arange(size)
    # stamp pixel a sits at kernel pixel a + (stamp centre − kernel centre); none where that is off the kernel
    u = grid + (np.asarray(cx)[:, None] - centre[..., 0]).astype(np.int64)[..., None]  # (n, k, size)
    v = grid + (np.asarray(cy)[:, None] - centre[..., 1]).astype(np.int64)[..., None]
    if not (np.all(u[..., 0] == 0) and np.all(v[..., 0] == 0)):
        n, k = u.shape[:2]
        on = ((u >= 0) & (u < size))[:, :, None, :] & ((v >= 0) & (v < size))[:, :, :, None]
        kern = kern[np.arange(n)[:, None, None, None], np.arange(k)[None, :, None, None],
                    np.clip(v, 0, size - 1)[:, :, :, None], np.clip(u, 0, size - 1)[:, :, None, :]]
        kern[~on] = 0.0
    return kern


def _inverses(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverses of the ``(n, 3, 3)`` matrices and whether each exists (NaN where it does not)."""
    try:
        return np.linalg.inv(m), np.ones(len(m), dtype=bool)
    except np.linalg.LinAlgError:
        out, ok = np.full(m.shape, np.nan), np.ones(len(m), dtype=bool)
        for i, a in enumerate(m):
            try:
                out[i] = np.linalg.inv(a)
            except np.linalg.LinAlgError:
                ok[i] = False
        return out, ok


def _fit_group(image, variance, good, psf, xs, ys, size: int, *, origin, fit_centroid: bool, max_iter: int) -> dict:
    """:func:`psf_fits` of sources whose kernels have one ``size``: every source's Gauss–Newton iteration of
    the module notes, all sources at once (each stops where its own fit stops)."""
    n = len(xs)
    half = size // 2
    x0, y0 = np.array(xs, dtype=np.float64), np.array(ys, dtype=np.float64)
    x, y = x0.copy(), y0.copy()
    x_err, y_err = np.full(n, np.nan), np.full(n, np.nan)
    cx, cy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    d, w = _frames(image, variance, good, cx, cy, half, origin)
    converged = np.zeros(n, dtype=bool)
    if fit_centroid:
        active = np.ones(n, dtype=bool)
        s = _DERIV_STEP
        shifts = np.array([(0.0, 0.0), (s, 0.0), (-s, 0.0), (0.0, s), (0.0, -s)])
        for _ in range(max_iter):
            ia = np.flatnonzero(active)
            if not ia.size:
                break
            pos = np.stack([x[ia], y[ia]], axis=-1)[:, None, :] + shifts  # (m, 5, 2)
            r = _renders(psf, x[ia], y[ia], pos, cx[ia], cy[ia], size)
            m = len(ia)
            a = np.stack([r[:, 0], (r[:, 1] - r[:, 2]) / (2 * s), (r[:, 3] - r[:, 4]) / (2 * s)], axis=1).reshape(m, 3, -1)
            ww = w[ia].reshape(m, -1)
            ata = np.einsum("nip,njp->nij", a, a * ww[:, None, :])
            atb = np.einsum("nip,np->ni", a, d[ia].reshape(m, -1) * ww)
            cov, ok = _inverses(ata)
            sol = np.einsum("nij,nj->ni", cov, atb)
            f = sol[:, 0]
            with np.errstate(invalid="ignore", divide="ignore"):
                ok &= np.isfinite(f) & (f != 0) & (np.sqrt(np.maximum(cov[:, 0, 0], 0.0)) < np.abs(f))
                dx, dy = sol[:, 1] / f, sol[:, 2] / f
            active[ia[~ok]] = False  # (no update: the fit stops where it is)
            ia, dx, dy, f, cov = ia[ok], dx[ok], dy[ok], f[ok], cov[ok]
            step = np.hypot(dx, dy)
            big = step > 1.0
            dx[big], dy[big] = dx[big] / step[big], dy[big] / step[big]
            x[ia] += dx
            y[ia] += dy
            x_err[ia] = np.sqrt(np.maximum(cov[:, 1, 1], 0.0)) / np.abs(f)
            y_err[ia] = np.sqrt(np.maximum(cov[:, 2, 2], 0.0)) / np.abs(f)
            far = np.hypot(x[ia] - x0[ia], y[ia] - y0[ia]) > half / 2
            done = ~far & (step < 1e-4)
            converged[ia[done]] = True
            active[ia[far | done]] = False
        keep = converged & np.isfinite(x) & np.isfinite(y)
        x, y = np.where(keep, x, x0), np.where(keep, y, y0)
        x_err[~keep], y_err[~keep] = np.nan, np.nan
        centroid_flag = ~keep
        ncx, ncy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
        moved = np.flatnonzero((ncx != cx) | (ncy != cy))
        if moved.size:
            d[moved], w[moved] = _frames(image, variance, good, ncx[moved], ncy[moved], half, origin)
            cx[moved], cy[moved] = ncx[moved], ncy[moved]
    else:
        centroid_flag = np.ones(n, dtype=bool)
    # the flux at the final position: the PSF there, one render, in the stamp centred on its pixel
    p = _renders(psf, x, y, np.stack([x, y], axis=-1)[:, None, :], cx, cy, size)[:, 0]
    spp = np.einsum("nij,nij->n", p * p, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        pos = spp > 0
        flux = np.where(pos, np.einsum("nij,nij->n", p * d, w) / np.where(pos, spp, 1.0), np.nan)
        flux_err = np.where(pos, 1.0 / np.sqrt(np.where(pos, spp, 1.0)), np.nan)
        chi2 = np.where(pos, np.einsum("nij,nij->n", (d - flux[:, None, None] * p) ** 2, w), np.nan)
        # flag when the stamp lost more than half of the PSF's weight (masked or cut pixels); p is the whole,
        # uncut kernel (the stamp is centred on its pixel)
        covered = np.einsum("nij,nij->n", p * p, (w > 0).astype(np.float64)) / np.maximum(
            np.einsum("nij,nij->n", p, p), 1e-300)
    dof = np.count_nonzero(w.reshape(n, -1), axis=1) - (3 if fit_centroid else 1)
    return {"x": x, "y": y, "x_err": x_err, "y_err": y_err, "flux": flux, "flux_err": flux_err, "chi2": chi2,
            "dof": dof.astype(np.int64), "centroid_flag": centroid_flag,
            "flux_flag": ~np.isfinite(flux) | (covered < 0.5)}


def psf_fits(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    psf: Psf,
    x: Sequence[float],
    y: Sequence[float],
    *,
    origin: tuple[int, int] = (0, 0),
    fit_centroid: bool = True,
    max_iter: int = 10,
    size: int | None = None,
) -> dict[str, np.ndarray]:
    r"""PSF fluxes (and optionally centroids) of a batch of sources (:func:`psf_fit` of each), as arrays.

    The sources' fits run together, in array operations (a Python loop per source held the GIL for ~1 ms a
    fit); sources are grouped by kernel size (``size``, default ``psf.default_size`` at each start).

    Returns
    -------
    dict of ndarray
        ``x, y, x_err, y_err, flux, flux_err, chi2, dof, centroid_flag, flux_flag``, one entry per source.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    out = {"x": x.copy(), "y": y.copy(), "x_err": np.full(n, np.nan), "y_err": np.full(n, np.nan),
           "flux": np.full(n, np.nan), "flux_err": np.full(n, np.nan), "chi2": np.full(n, np.nan),
           "dof": np.zeros(n, dtype=np.int64), "centroid_flag": np.ones(n, dtype=bool),
           "flux_flag": np.ones(n, dtype=bool)}
    if n == 0:
        return out
    sizes = np.array([psf.default_size(x[i], y[i]) if size is None else int(size) for i in range(n)])
    for k in np.unique(sizes):
        idx = np.flatnonzero(sizes == k)
        res = _fit_group(image, variance, good, psf, x[idx], y[idx], int(k), origin=origin,
                         fit_centroid=fit_centroid, max_iter=max_iter)
        for name, values in res.items():
            out[name][idx] = values
    return out


def psf_fit(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    psf: Psf,
    x: float,
    y: float,
    *,
    origin: tuple[int, int] = (0, 0),
    fit_centroid: bool = True,
    max_iter: int = 10,
    size: int | None = None,
) -> dict[str, float]:
    r"""PSF flux (and optionally centroid) of one source (:func:`psf_fits` of one).

    Parameters
    ----------
    image, variance : ndarray
        Tile planes.
    good : ndarray of bool
        Pixels usable in the fit.
    psf : Psf
        PSF model (parent frame).
    x, y : float
        Starting (or, with ``fit_centroid=False``, fixed) parent position.
    fit_centroid : bool
        Fit the centroid by Gauss–Newton (see module notes); else forced photometry.

    Returns
    -------
    dict
        ``x, y, x_err, y_err, flux, flux_err, chi2, dof, centroid_flag, flux_flag``.
    """
    r = psf_fits(image, variance, good, psf, [x], [y], origin=origin, fit_centroid=fit_centroid, max_iter=max_iter,
                 size=size)
    return {k: (bool(v[0]) if v.dtype == bool else int(v[0]) if k == "dof" else float(v[0])) for k, v in r.items()}


def forced_psf_flux(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    psf: Psf,
    x: Sequence[float],
    y: Sequence[float],
    *,
    origin: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Forced PSF photometry :math:`F = \sum PD/V / \sum P^2/V` at fixed positions.

    Returns
    -------
    flux, flux_err : ndarray
    flag : ndarray of bool
        Set where under half the PSF weight fell on good pixels of the tile.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    flux, err, flag = np.full(n, np.nan), np.full(n, np.nan), np.ones(n, dtype=bool)
    ny, nx = image.shape
    with np.errstate(invalid="ignore"):
        on = (np.isfinite(x) & np.isfinite(y) & (origin[0] - 0.5 <= x) & (x < origin[0] + nx - 0.5)
              & (origin[1] - 0.5 <= y) & (y < origin[1] + ny - 0.5))
    if on.any():
        r = psf_fits(image, variance, good, psf, x[on], y[on], origin=origin, fit_centroid=False)
        flux[on], err[on], flag[on] = r["flux"], r["flux_err"], r["flux_flag"]
    return flux, err, flag


def aperture_fluxes(
    image: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    radius,
    *,
    origin: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Exact circular-aperture sums :math:`\sum_{r\le R} D` and errors :math:`\sqrt{\sum_{r \le R} V}`.

    ``radius``: one radius or one per source.  The sums are SEP's exact pixel–circle overlaps
    (``sep.sum_circle``, ``subpix=0``) of the planes with excluded pixels set to 0.

    Returns
    -------
    flux, flux_err : ndarray
        NaN where the circle misses the tile or the position is not finite.
    flag : ndarray of bool
        The aperture touched excluded pixels or the tile edge (those pixels count as 0).
    """
    xl = np.asarray(x, dtype=np.float64) - origin[0]
    yl = np.asarray(y, dtype=np.float64) - origin[1]
    n = xl.size
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), (n,))
    flux, err, flag = np.full(n, np.nan), np.full(n, np.nan), np.ones(n, dtype=bool)
    ny, nx = image.shape
    ok = np.isfinite(xl) & np.isfinite(yl) & np.isfinite(r) & (r > 0)
    # the pixel range the circle covers (pixel centres at integers) must not be empty
    ok &= (np.floor(xl + r + 0.5) >= 0) & (np.floor(xl - r + 0.5) < nx)
    ok &= (np.floor(yl + r + 0.5) >= 0) & (np.floor(yl - r + 0.5) < ny)
    if not ok.any():
        return flux, err, flag
    if not isinstance(good, GoodPixels):  # (the good pixels as a plane, or tested where they are read)
        good = np.asarray(good, dtype=bool)
    xo, yo, ro = xl[ok], yl[ok], r[ok]
    if xo.size * APERTURE_STAMP_PIXELS < ny * nx:
        # a few apertures on a large tile: each on a stamp holding its circle's pixels (2 px to spare) instead
        # of whole-tile planes.  The same pixels in the same order, and the centre moves by whole pixels
        # (exact), so SEP's overlaps and sums are those of the whole tile.
        f, e, excluded = (np.empty(xo.size) for _ in range(3))
        for i in range(xo.size):
            ya, yb = max(math.floor(yo[i] - ro[i] + 0.5) - 2, 0), min(math.floor(yo[i] + ro[i] + 0.5) + 3, ny)
            xa, xb = max(math.floor(xo[i] - ro[i] + 0.5) - 2, 0), min(math.floor(xo[i] + ro[i] + 0.5) + 3, nx)
            win = (slice(ya, yb), slice(xa, xb))
            f[i:i + 1], e[i:i + 1], excluded[i:i + 1] = _circle_sums(
                image[win], variance[win], good[win], xo[i:i + 1] - xa, yo[i:i + 1] - ya, ro[i:i + 1])
    else:
        f, e, excluded = _circle_sums(image, variance, good[...], xo, yo, ro)
    cut = (xo - ro < -0.5) | (xo + ro > nx - 0.5) | (yo - ro < -0.5) | (yo + ro > ny - 0.5)
    flux[ok], err[ok], flag[ok] = f, e, cut | (excluded > 0)
    return flux, err, flag


#: Whole-tile planes cost about as much as this many pixels per aperture on its own stamp: below it (few
#: apertures on a large tile) :func:`aperture_fluxes` measures each on a stamp.
APERTURE_STAMP_PIXELS = 4096


def _circle_sums(image, variance, good, x, y, r):
    """SEP's exact circle sums of the image and variance with excluded pixels set to 0, and of the excluded
    pixels (``subpix=0``)."""
    import sep

    zero = np.float32(0.0)
    d = np.where(good, image, zero).astype(np.float32, copy=False)
    v = np.where(good, variance, zero).astype(np.float32, copy=False)
    f, e, _ = sep.sum_circle(d, x, y, r, var=v, subpix=0)
    excluded, _, _ = sep.sum_circle((~good).astype(np.float32), x, y, r, subpix=0)
    return f, e, excluded


def adaptive_moments_many(
    image: np.ndarray,
    good: np.ndarray,
    x,
    y,
    *,
    origin: tuple[int, int] = (0, 0),
    sigma0=2.0,
    sign=1.0,
    half: int = 12,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r""":func:`adaptive_moments` of a batch of sources with one stamp half-width ``half`` (``sigma0`` and
    ``sign``: one per source or one for all): every source's iteration at once, each stopping where its own
    stops.  Returns arrays ``(ixx, iyy, ixy, flag)``."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    n = x.size
    out = np.full((3, n), np.nan)
    flag = np.ones(n, dtype=bool)
    if n == 0:
        return out[0], out[1], out[2], flag
    grid = np.arange(-half, half + 1)
    cx, cy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    r, c, on = _stamp_pixels(image.shape, cx, cy, half, origin)
    sign = np.broadcast_to(np.asarray(sign, dtype=np.float64), (n,))
    # the stamp off the tile and its excluded pixels count as 0 (the tile's own stamp is cut there)
    d = np.where(on & np.asarray(good[r, c], dtype=bool), sign[:, None, None] * np.asarray(image[r, c], np.float64), 0.0)
    dx = (cx[:, None] + grid)[:, None, :] - x[:, None, None]
    dy = (cy[:, None] + grid)[:, :, None] - y[:, None, None]
    s0 = np.broadcast_to(np.asarray(sigma0, dtype=np.float64), (n,))
    cxx, cyy, cxy = s0 * s0, s0 * s0, np.zeros(n)
    active = np.ones(n, dtype=bool)
    for _ in range(max_iter):
        ia = np.flatnonzero(active)
        if not ia.size:
            break
        axx, ayy, axy = cxx[ia], cyy[ia], cxy[ia]
        det = axx * ayy - axy * axy
        # a weight narrower than ~1e-3 px (a one-pixel spike) is no moment measurement: flag it
        ok = (det > 1e-12 * axx * ayy) & (np.minimum(axx, ayy) > 1e-6)
        active[ia[~ok]] = False
        ia, axx, ayy, axy, det = ia[ok], axx[ok], ayy[ok], axy[ok], det[ok]
        if not ia.size:
            break
        ex, ey = dx[ia], dy[ia]
        q = (ayy[:, None, None] * ex * ex - 2 * axy[:, None, None] * ex * ey + axx[:, None, None] * ey * ey) \
            / det[:, None, None]
        wgt = np.exp(-0.5 * q) * d[ia]
        s = wgt.sum(axis=(1, 2))
        ok = s > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            ss = np.where(ok, s, 1.0)
            nxx = 2 * (wgt * ex * ex).sum(axis=(1, 2)) / ss
            nyy = 2 * (wgt * ey * ey).sum(axis=(1, 2)) / ss
            nxy = 2 * (wgt * ex * ey).sum(axis=(1, 2)) / ss
            ok &= (nxx > 0) & (nyy > 0) & (nxx * nyy - nxy * nxy > 0) & ~(np.maximum(nxx, nyy) > 4 * half * half)
        active[ia[~ok]] = False
        ia, axx, ayy, axy, nxx, nyy, nxy = ia[ok], axx[ok], ayy[ok], axy[ok], nxx[ok], nyy[ok], nxy[ok]
        change = np.abs(nxx - axx) + np.abs(nyy - ayy) + np.abs(nxy - axy)
        cxx[ia], cyy[ia], cxy[ia] = nxx, nyy, nxy
        done = change < tol * (nxx + nyy)
        out[:, ia[done]] = np.stack([nxx[done], nyy[done], nxy[done]])
        flag[ia[done]] = False
        active[ia[done]] = False
    return out[0], out[1], out[2], flag


def adaptive_moments(
    image: np.ndarray,
    good: np.ndarray,
    x: float,
    y: float,
    *,
    origin: tuple[int, int] = (0, 0),
    sigma0: float = 2.0,
    sign: float = 1.0,
    half: int = 12,
    max_iter: int = 30,
    tol: float = 1e-4,
) -> tuple[float, float, float, bool]:
    r"""Adaptive second moments ``(ixx, iyy, ixy, flag)`` about the fixed centre ``(x, y)``.

    Iterates :math:`C_w \leftarrow 2 M(C_w)` where
    :math:`M = \sum W I\, \mathbf{d}\mathbf{d}^T / \sum W I`,
    :math:`W = \exp(-\tfrac12 \mathbf{d}^T C_w^{-1} \mathbf{d})`, ``I = sign × image``.
    ``flag`` is set (and NaNs returned) when the weighted flux is not positive, the
    matrix stops being positive definite or the iteration does not converge.
    (:func:`adaptive_moments_many` of one source.)
    """
    ixx, iyy, ixy, flag = adaptive_moments_many(image, good, [x], [y], origin=origin, sigma0=sigma0, sign=sign,
                                                half=half, max_iter=max_iter, tol=tol)
    return float(ixx[0]), float(iyy[0]), float(ixy[0]), bool(flag[0])


def measurement_columns(flag_planes: Sequence[str] = FLAG_PLANES) -> dict[str, str]:
    """Column name → dtype of :func:`measure_sources`'s table."""
    cols = {
        "x": "float64",
        "y": "float64",
        "x_err": "float64",
        "y_err": "float64",
        "centroid_flag": "bool",
        "psf_flux": "float64",
        "psf_flux_err": "float64",
        "psf_chi2": "float64",
        "psf_dof": "int64",
        "psf_flux_flag": "bool",
        "snr": "float64",
        "ap12_flux": "float64",
        "ap12_flux_err": "float64",
        "ap12_flag": "bool",
        "ap2fwhm_flux": "float64",
        "ap2fwhm_flux_err": "float64",
        "ap2fwhm_flag": "bool",
        "ixx": "float64",
        "iyy": "float64",
        "ixy": "float64",
        "shape_flag": "bool",
    }
    for plane in flag_planes:
        cols[f"pixel_flags_{plane.lower()}"] = "bool"
        cols[f"pixel_flags_{plane.lower()}_center"] = "bool"
    return cols


def measure_sources(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    psf: Psf,
    *,
    x: Sequence[float],
    y: Sequence[float],
    footprints: Sequence[Footprint] | None = None,
    origin: tuple[int, int] = (0, 0),
    mask_planes: Mapping[str, int] | None = None,
    fit_centroid: bool = True,
    aperture_radius: float = 12.0,
    excluded_planes: Sequence[str] = DEFAULT_EXCLUDED_PLANES,
    flag_planes: Sequence[str] = FLAG_PLANES,
    good: np.ndarray | None = None,
) -> pd.DataFrame:
    """Measure sources at (starting) parent positions ``x, y`` on one tile.

    Runs the centroid/PSF fit, the two apertures (``aperture_radius`` and 2×FWHM),
    adaptive moments (of ``sign(flux) × image``) and pixel flags (over ``footprints[i]``
    when given, else the PSF half-width disc).  A failed centroid falls back to the
    starting position with ``centroid_flag`` set, so every row has a finite centroid.  ``good``: the pixels
    without ``excluded_planes``, when the caller has them already.

    Returns
    -------
    pandas.DataFrame
        Columns :func:`measurement_columns`, one row per input position.
    """
    planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
    image = np.asarray(image)
    variance = np.asarray(variance)
    mask = np.asarray(mask)
    n = len(x)
    if good is None:
        bits = bits_of(planes, excluded_planes)
        # a few sources on a large image (the sky sources on the whole difference): the good pixels of their stamps,
        # tested where they are read, instead of a whole-image plane (a pass over a 4096² mask for 100 positions)
        good = GoodPixels(mask, bits) if n * APERTURE_STAMP_PIXELS < mask.size else lacks_bits(mask, bits)
    cols = measurement_columns(flag_planes)
    out: dict[str, np.ndarray] = {k: np.zeros(n, dtype=v) if v != "float64" else np.full(n, np.nan) for k, v in cols.items()}
    ny, nx = image.shape
    fits = psf_fits(image, variance, good, psf, x, y, origin=origin, fit_centroid=fit_centroid)
    for ours, theirs in (("x", "x"), ("y", "y"), ("x_err", "x_err"), ("y_err", "y_err"),
                         ("centroid_flag", "centroid_flag"), ("psf_flux", "flux"), ("psf_flux_err", "flux_err"),
                         ("psf_chi2", "chi2"), ("psf_dof", "dof"), ("psf_flux_flag", "flux_flag")):
        out[ours][:] = fits[theirs]
    xs, ys, fl = out["x"], out["y"], out["psf_flux"]
    with np.errstate(invalid="ignore"):
        signs = np.where(np.isfinite(fl) & (fl < 0), -1.0, 1.0)
    sigma0 = psf.sigma_many(xs, ys)
    halves = np.array([max(psf.default_size(xs[i], ys[i]) // 2, 6) for i in range(n)], dtype=np.int64)
    for h in np.unique(halves):  # the sources of one stamp size together
        idx = np.flatnonzero(halves == h)
        moments = adaptive_moments_many(image, good, xs[idx], ys[idx], origin=origin, sigma0=sigma0[idx],
                                        sign=signs[idx], half=int(h))
        for name, values in zip(("ixx", "iyy", "ixy", "shape_flag"), moments):
            out[name][idx] = values
    out["snr"] = out["psf_flux"] / out["psf_flux_err"]
    xs, ys = out["x"], out["y"]
    out["ap12_flux"], out["ap12_flux_err"], out["ap12_flag"] = aperture_fluxes(
        image, variance, good, xs, ys, aperture_radius, origin=origin
    )
    out["ap2fwhm_flux"], out["ap2fwhm_flux_err"], out["ap2fwhm_flag"] = aperture_fluxes(
        image, variance, good, xs, ys, 2.0 * psf.fwhm_many(xs, ys), origin=origin
    )
    # pixel flags
    x0, y0 = origin
    for i in range(n):
        ix, iy = int(math.floor(xs[i] + 0.5)) - x0, int(math.floor(ys[i] + 0.5)) - y0
        centre = mask[max(iy - 1, 0) : min(iy + 2, ny), max(ix - 1, 0) : min(ix + 2, nx)]
        centre_bits = int(np.bitwise_or.reduce(centre.ravel())) if centre.size else 0
        if footprints is not None:
            fp = footprints[i]
            sub = _cut(mask, fp.bbox, origin)
            vals = sub[fp.spans]
        else:
            h = psf.default_size(xs[i], ys[i]) // 2
            bb = _stamp(mask.shape, origin, xs[i], ys[i], h)
            sub = _cut(mask, bb, origin)
            yy, xx = np.mgrid[bb[2] : bb[3], bb[0] : bb[1]]
            vals = sub[(xx - xs[i]) ** 2 + (yy - ys[i]) ** 2 <= h * h]
        any_bits = int(np.bitwise_or.reduce(vals.ravel())) if vals.size else 0
        for plane in flag_planes:
            if plane not in planes:
                continue
            bit = 1 << planes[plane]
            out[f"pixel_flags_{plane.lower()}"][i] = bool(any_bits & bit)
            out[f"pixel_flags_{plane.lower()}_center"][i] = bool(centre_bits & bit)
    # (arrays, not Series: a Series resolves its dtype's name through pandas' registry of extension types, which
    # was most of the table's cost, tile after tile)
    return pd.DataFrame({k: np.asarray(v, dtype=cols[k]) for k, v in out.items()})
