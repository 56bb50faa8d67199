"""Sky sources: positions on blank sky, away from detections and bad pixels (:func:`place_sky_sources`), measured
like DiaSources and flagged ``sky_source``; and the catalogue's RA/Dec with errors through the local WCS
Jacobian."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..kernels import detection as det

log = logging.getLogger(__name__)

#: :func:`place_sky_sources` maps the centres a footprint or bad pixel rules out once its draws have read this many
#: times the frame's pixels in their windows (the map's distance transform costs a few such reads per pixel).
EXACT_MAP_READS = 8


def place_sky_sources(
    n: int,
    footprints_mask: np.ndarray,
    bad: np.ndarray,
    *,
    avoid_radius: int,
    origin: tuple[int, int] = (0, 0),
    seed: int = 0,
    source_xy: np.ndarray | None = None,
    max_tries: int = 200,
    warn: bool = True,
) -> np.ndarray:
    """``n`` parent positions ``(x, y)`` on blank sky.

    A position is accepted when no footprint or ``bad`` pixel lies within
    ``avoid_radius`` (a disc, :math:`dx^2 + dy^2 \\le r^2`), it is at least ``avoid_radius``
    from the image edge, farther than ``avoid_radius + 1`` from every ``source_xy`` (rounded
    to pixel centres) and farther than ``2·avoid_radius`` from the sky sources already placed.
    Positions are pixel centres, uniform over the allowed pixels and seeded.

    Two phases draw from the same distribution. Rejection sampling tests uniform draws
    against the ``(2r+1)²`` window around each one (cost independent of the image size:
    blank sky is most of a difference image), or, once the draws have read the frame's pixels
    :data:`EXACT_MAP_READS` times over, looks them up in the exact map of the centres a masked
    pixel rules out (the same answers). When fewer than ``n`` were accepted after
    ``max_tries·n`` draws, or the sampling acceptance is below 1 %, the exact map of allowed
    centres is built (distance transform) and draws continue from it only. Fewer than ``n``
    positions come back, with a warning (``warn``), when the image has no more room.
    """
    ny, nx = footprints_mask.shape
    r = int(avoid_radius)
    if n <= 0 or nx <= 2 * r or ny <= 2 * r:
        return np.empty((0, 2))
    # the two maps are tested where the draws fall; their union (a whole-frame plane, 0.13 s of fresh pages for a
    # 4096² frame) is made only for the exact map of phase 2
    maps = (np.asarray(footprints_mask, dtype=bool), np.asarray(bad, dtype=bool))
    src = np.empty((0, 2)) if source_xy is None else np.asarray(source_xy, dtype=np.float64).reshape(-1, 2)
    src_pix = np.rint(src - np.asarray(origin, dtype=np.float64)).astype(np.int64)
    tree = None
    if len(src_pix):
        from scipy.spatial import cKDTree

        tree = cKDTree(src_pix)
    disc_y, disc_x = np.nonzero(det.disc(r))
    disc_y, disc_x = disc_y - r, disc_x - r
    rng = np.random.default_rng(seed)
    placed: list[tuple[int, int]] = []
    min_sep2 = (2 * r) ** 2

    def free_of_sources(iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        if tree is None:
            return np.ones(iy.size, dtype=bool)
        d, _ = tree.query(np.column_stack([ix, iy]), k=1)
        return d * d > (r + 1) ** 2 + 1e-9

    def accept(iy: np.ndarray, ix: np.ndarray) -> None:
        """Take the candidates in their order, each one farther than ``2r`` from every one placed before it.  The
        candidates that a placement rules out are struck all at once: one pass over them per placement, instead of
        a distance per candidate and placed source in Python (phase 2 hands over up to ``max_tries·n`` at once)."""
        iy, ix = np.asarray(iy, dtype=np.int64), np.asarray(ix, dtype=np.int64)
        free = np.ones(iy.size, dtype=bool)
        for qy, qx in placed:
            free &= (iy - qy) ** 2 + (ix - qx) ** 2 > min_sep2
        while len(placed) < n and free.any():
            j = int(free.argmax())  # (the first still free: those before it are placed or struck)
            py, px = int(iy[j]), int(ix[j])
            placed.append((py, px))
            free &= (iy - py) ** 2 + (ix - px) ** 2 > min_sep2

    # phase 1: rejection sampling inside the margins [r, n - r)
    budget = max_tries * n
    drawn = accepted = 0
    batch = max(64, 4 * n)
    # once the draws' windows have read the masks' pixels EXACT_MAP_READS times over (a crowded frame, whose blank
    # sky takes many draws), the exact map of the centres with a masked pixel in their disc is cheaper: a lookup per
    # draw, the same answers; phase 2 starts from it
    blocked = None
    while len(placed) < n and drawn < budget:
        k = min(batch, budget - drawn)
        iy = rng.integers(r, ny - r, size=k)
        ix = rng.integers(r, nx - r, size=k)
        if blocked is None and drawn * disc_y.size >= EXACT_MAP_READS * ny * nx:
            blocked = det.dilate_disc(maps[0] | maps[1], r)
        drawn += k
        if blocked is None:
            wy, wx = iy[:, None] + disc_y, ix[:, None] + disc_x
            ok = ~(maps[0][wy, wx].any(axis=1) | maps[1][wy, wx].any(axis=1))
        else:
            ok = ~blocked[iy, ix]
        ok &= free_of_sources(iy, ix)
        accepted += int(ok.sum())
        accept(iy[ok], ix[ok])
        if drawn >= 20 * batch and accepted < 0.01 * drawn:
            break  # crowded: the exact map is cheaper than more blind draws
    if len(placed) < n:
        # phase 2: the exact map of allowed centres (no index array of every allowed pixel)
        allowed = ~(blocked if blocked is not None else det.dilate_disc(maps[0] | maps[1], r))
        allowed[:r] = allowed[ny - r :] = False
        allowed[:, :r] = allowed[:, nx - r :] = False
        if tree is not None:
            near = np.zeros_like(allowed)
            inside = (src_pix[:, 0] >= 0) & (src_pix[:, 0] < nx) & (src_pix[:, 1] >= 0) & (src_pix[:, 1] < ny)
            near[src_pix[inside, 1], src_pix[inside, 0]] = True
            allowed &= ~det.dilate_disc(near, r + 1)
        for qy, qx in placed:  # the already placed ones exclude their 2r disc
            y0, y1, x0, x1 = max(qy - 2 * r, 0), min(qy + 2 * r + 1, ny), max(qx - 2 * r, 0), min(qx + 2 * r + 1, nx)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            allowed[y0:y1, x0:x1] &= (yy - qy) ** 2 + (xx - qx) ** 2 > min_sep2
        row_start = np.concatenate([[0], np.cumsum(np.count_nonzero(allowed, axis=1))])
        n_candidates = int(row_start[-1])
        if n_candidates:
            order = rng.choice(n_candidates, size=min(n_candidates, max_tries * n), replace=False)
            # the k-th allowed centre (row-major) of each draw, row by row (no index array of every allowed pixel)
            iy = np.searchsorted(row_start, order, side="right") - 1
            ix = np.empty_like(order)
            by_row = np.argsort(iy, kind="stable")
            rows, starts = np.unique(iy[by_row], return_index=True)
            for row, sel in zip(rows.tolist(), np.split(by_row, starts[1:])):
                ix[sel] = np.flatnonzero(allowed[row])[order[sel] - row_start[row]]
            accept(iy, ix)
    if len(placed) < n and warn:
        log.warning("placed only %d of %d sky sources (no more blank sky)", len(placed), n)
    out = np.asarray([(px + origin[0], py + origin[1]) for py, px in placed], dtype=np.float64)
    return out.reshape(-1, 2)


def _sky_to_radec(cat: pd.DataFrame, wcs) -> None:
    n = len(cat)
    for c in ("ra", "dec", "ra_err", "dec_err"):
        cat[c] = np.full(n, np.nan)
    if wcs is None or n == 0:
        return
    import copy

    w = copy.deepcopy(wcs)  # astropy WCS is not thread-safe
    x = cat["x"].to_numpy()
    y = cat["y"].to_numpy()
    ra, dec = w.all_pix2world(x, y, 0)
    step = 0.5
    ra_x, dec_x = w.all_pix2world(x + step, y, 0)
    ra_y, dec_y = w.all_pix2world(x, y + step, 0)
    cosd = np.cos(np.radians(dec))
    dra_dx = ((ra_x - ra + 180.0) % 360.0 - 180.0) * cosd / step
    dra_dy = ((ra_y - ra + 180.0) % 360.0 - 180.0) * cosd / step
    ddec_dx = (dec_x - dec) / step
    ddec_dy = (dec_y - dec) / step
    sx, sy = cat["x_err"].to_numpy(), cat["y_err"].to_numpy()
    cat["ra"], cat["dec"] = ra, dec
    cat["ra_err"] = np.sqrt((dra_dx * sx) ** 2 + (dra_dy * sy) ** 2)
    cat["dec_err"] = np.sqrt((ddec_dx * sx) ** 2 + (ddec_dy * sy) ** 2)
