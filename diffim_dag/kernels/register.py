r"""Star detection, triangle matching and robust affine fits for registering two images.

Pure numerics on numpy arrays (no dask, no I/O, no Exposure).

Star lists
----------
:func:`detect_stars` runs ``sep.extract`` on the background-subtracted image and refines each position with
``sep.winpos`` (Gaussian-windowed centroid, σ-window = FWHM/2.355), which reaches a few 0.01 px for stars
with S/N ≳ 50.

Triangle matching
-----------------
Following Valdes et al. (1995, PASP 107, 1119) and astroalign (Beroiz et al. 2020), every star and its
``k`` nearest neighbours form :math:`\binom{k+1}{3}` triangles.  With sides sorted
:math:`L_0 \ge L_1 \ge L_2`, the invariants :math:`(L_1/L_0, L_2/L_1)` do not change under shift, rotation
and scale.  Triangles of the two lists with invariants closer than ``tolerance`` are candidate pairs; the
vertex order follows the sides (vertex opposite :math:`L_2`, … ).  Each candidate gives a similarity
transform; the one that brings most stars within ``match_radius`` of a partner wins (RANSAC over
candidates), and a least-squares affine fit with iterative σ-clipping over all matched stars refines it.

Fits
----
:func:`fit_transform` solves :math:`\min \sum_i \lVert A \mathbf s_i + \mathbf b - \mathbf d_i \rVert^2`
for an affine :math:`(A, \mathbf b)` (6 parameters) or a similarity
:math:`A = \begin{pmatrix} p & -q \\ q & p \end{pmatrix}` (4 parameters) by linear least squares, rejecting
matches whose residual exceeds ``clip`` × the RMS (and at least ``min_residual``) until nothing changes.
:func:`prefer_translation` keeps the affine fit only where its four linear terms reduce the residuals
significantly (an F test against a shift fitted to the same stars): two frames that differ by a shift are not
given a rotation and scale fitted to their centroids' noise, and are resampled as a pure translation.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .warp import AffineMapping

__all__ = [
    "detect_stars",
    "triangle_invariants",
    "fit_transform",
    "match_nearest",
    "match_star_lists",
    "prefer_translation",
    "StarMatch",
]


def detect_stars(
    image: np.ndarray,
    variance: np.ndarray | None = None,
    bad: np.ndarray | None = None,
    *,
    threshold: float = 10.0,
    max_stars: int = 300,
    fwhm: float | None = None,
    edge: int = 5,
) -> np.ndarray:
    r"""Bright, isolated, compact sources of an image, brightest first.

    Parameters
    ----------
    image : ndarray
        The image (a smooth background is removed with ``sep.Background``).
    variance : ndarray, optional
        Per-pixel variance; the error plane is :math:`\sqrt V` (else the background RMS).
    bad : ndarray of bool, optional
        Pixels to ignore (masked in the extraction; sources touching them are dropped).
    threshold : float
        Detection threshold in σ.
    max_stars : int
        Keep at most this many (the brightest).
    fwhm : float, optional
        PSF FWHM (px) for the windowed centroid; measured from the sources when absent.
    edge : int
        Drop sources closer than this to the array edge.

    Returns
    -------
    ndarray, shape (n, 3)
        ``x, y, flux`` in array (0-based) coordinates.
    """
    import sep

    data = np.ascontiguousarray(image, dtype=np.float64)
    ny, nx = data.shape
    bad_arr = np.zeros(data.shape, bool) if bad is None else np.asarray(bad, bool)
    bad_arr = bad_arr | ~np.isfinite(data)
    if variance is not None:
        var = np.asarray(variance, dtype=np.float64)
        bad_arr = bad_arr | ~np.isfinite(var) | (var <= 0)
    data = np.where(bad_arr, 0.0, data)
    bw = int(max(16, min(64, min(ny, nx) // 4)))
    bkg = sep.Background(data, mask=bad_arr, bw=bw, bh=bw)
    sub = data - bkg.back()
    if variance is not None:
        err = np.sqrt(np.where(bad_arr, np.inf, var))
        err = np.where(np.isfinite(err), err, 1e30)
    else:
        err = np.full(data.shape, float(bkg.globalrms) if bkg.globalrms > 0 else 1.0)
    old = sep.get_extract_pixstack()
    sep.set_extract_pixstack(max(old, 1_000_000))
    try:
        objs = sep.extract(sub, threshold, err=err, mask=bad_arr, minarea=5, deblend_cont=0.005)
    except Exception:  # pragma: no cover - sep buffer overflows on pathological images
        return np.empty((0, 3))
    if len(objs) == 0:
        return np.empty((0, 3))
    keep = (objs["flag"] == 0) & (objs["x"] >= edge) & (objs["x"] <= nx - 1 - edge) & \
        (objs["y"] >= edge) & (objs["y"] <= ny - 1 - edge) & (objs["b"] > 0)
    keep &= objs["b"] / np.maximum(objs["a"], 1e-9) > 0.5
    objs = objs[keep]
    if len(objs) == 0:
        return np.empty((0, 3))
    if fwhm is None:
        fwhm = float(np.median(2.0 * np.sqrt(np.log(2.0) * (objs["a"] ** 2 + objs["b"] ** 2))))
    sig = max(fwhm / 2.3548, 0.5)
    x, y, flag = sep.winpos(sub, objs["x"], objs["y"], np.full(len(objs), sig), mask=bad_arr)
    ok = (flag == 0) & np.isfinite(x) & np.isfinite(y) & (np.hypot(x - objs["x"], y - objs["y"]) < 2 * fwhm)
    out = np.column_stack([x, y, objs["flux"]])[ok]
    order = np.argsort(-out[:, 2])
    return out[order[:max_stars]]


def triangle_invariants(xy: np.ndarray, k: int = 5):
    """Triangles of each star with its ``k`` nearest neighbours.

    Returns
    -------
    invariants : ndarray, shape (m, 2)
        :math:`(L_1/L_0, L_2/L_1)` with sorted sides :math:`L_0 \\ge L_1 \\ge L_2`.
    vertices : ndarray of int, shape (m, 3)
        Star indices ordered as vertex opposite :math:`L_0`, :math:`L_1`, :math:`L_2`.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    n = len(xy)
    if n < 3:
        return np.empty((0, 2)), np.empty((0, 3), dtype=np.int64)
    k = min(k, n - 1)
    _, nbr = cKDTree(xy).query(xy, k + 1)
    tris = set()
    for i in range(n):
        for comb in itertools.combinations(nbr[i], 3):
            tris.add(tuple(sorted(int(c) for c in comb)))
    tri = np.array(sorted(tris), dtype=np.int64)
    p = xy[tri]  # (m, 3, 2)
    # side opposite vertex v joins the other two
    sides = np.stack([np.hypot(*(p[:, 1] - p[:, 2]).T), np.hypot(*(p[:, 0] - p[:, 2]).T),
                      np.hypot(*(p[:, 0] - p[:, 1]).T)], axis=1)
    order = np.argsort(-sides, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    good = s[:, 2] > 1e-6
    inv = np.column_stack([s[:, 1] / np.maximum(s[:, 0], 1e-12), s[:, 2] / np.maximum(s[:, 1], 1e-12)])
    verts = np.take_along_axis(tri, order, axis=1)
    return inv[good], verts[good]


def fit_transform(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    kind: str = "affine",
    clip: float = 3.0,
    min_residual: float = 0.05,
    max_iter: int = 10,
) -> tuple[AffineMapping, np.ndarray, float]:
    """Least-squares ``dst ≈ A src + b`` with iterative clipping.

    Returns
    -------
    mapping : AffineMapping
    inliers : ndarray of bool
    rms : float
        RMS of the inlier residual vectors' lengths (px).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    need = 3 if kind == "affine" else 2
    if kind not in ("affine", "similarity"):
        raise InputError(f"fit_transform: kind must be 'affine' or 'similarity', got {kind!r}")
    if len(src) < need:
        raise InputError(f"fit_transform: a {kind} fit needs at least {need} matches, got {len(src)}")
    inl = np.ones(len(src), bool)
    mapping = AffineMapping.identity()
    for _ in range(max_iter):
        s, d = src[inl], dst[inl]
        if kind == "affine":
            design = np.column_stack([s, np.ones(len(s))])
            coef, *_ = np.linalg.lstsq(design, d, rcond=None)
            mapping = AffineMapping(coef[:2].T, coef[2])
        else:
            x, y = s[:, 0], s[:, 1]
            one, zero = np.ones(len(s)), np.zeros(len(s))
            design = np.concatenate([np.column_stack([x, -y, one, zero]), np.column_stack([y, x, zero, one])])
            rhs = np.concatenate([d[:, 0], d[:, 1]])
            (pp, qq, bx, by), *_ = np.linalg.lstsq(design, rhs, rcond=None)
            mapping = AffineMapping([[pp, -qq], [qq, pp]], (bx, by))
        u, v = mapping(src[:, 0], src[:, 1])
        r = np.hypot(u - dst[:, 0], v - dst[:, 1])
        rms = float(np.sqrt(np.mean(r[inl] ** 2)))
        new = r <= max(clip * rms, min_residual)
        if new.sum() < need or np.array_equal(new, inl):
            break
        inl = new
    u, v = mapping(src[:, 0], src[:, 1])
    r = np.hypot(u - dst[:, 0], v - dst[:, 1])
    return mapping, inl, float(np.sqrt(np.mean(r[inl] ** 2)))


def match_nearest(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two (n, 2) position lists within ``radius``: index arrays."""
    from scipy.spatial import cKDTree

    if len(a) == 0 or len(b) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    d_ab, j = cKDTree(b).query(a, 1)
    _, i_back = cKDTree(a).query(b, 1)
    i = np.arange(len(a))
    ok = (d_ab <= radius) & (i_back[np.minimum(j, len(b) - 1)] == i)
    return i[ok], j[ok]


@dataclass(frozen=True)
class StarMatch:
    """Result of :func:`match_star_lists`: ``mapping(src) ≈ dst`` from ``n_matched`` stars."""

    mapping: AffineMapping
    src_index: np.ndarray
    dst_index: np.ndarray
    rms: float
    n_matched: int


def match_star_lists(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    kind: str = "affine",
    guess: AffineMapping | None = None,
    match_radius: float = 2.0,
    max_stars: int = 60,
    neighbours: int = 5,
    tolerance: float = 0.01,
    min_matches: int = 5,
    max_candidates: int = 3000,
) -> StarMatch:
    """Find the transform taking star list ``src`` (x, y[, flux]) onto ``dst``.

    With a ``guess`` (e.g. from a WCS), stars are first paired by proximity after the guess; if fewer
    than ``min_matches`` pair up or the fit is poor, triangle matching runs on the ``max_stars`` brightest
    stars of each list (lists must be sorted brightest first).

    Raises
    ------
    InputError
        If no transform brings ``min_matches`` stars together.
    """
    from scipy.spatial import cKDTree

    src = np.asarray(src, dtype=np.float64)[:, :2]
    dst = np.asarray(dst, dtype=np.float64)[:, :2]
    if len(src) < 3 or len(dst) < 3:
        raise InputError(f"star matching needs ≥ 3 stars in each list, got {len(src)} and {len(dst)}")
    dst_tree = cKDTree(dst)

    def score(mapping: AffineMapping):
        u, v = mapping(src[:, 0], src[:, 1])
        d, _ = dst_tree.query(np.column_stack([u, v]), 1)
        return int(np.count_nonzero(d <= match_radius))

    best = None
    if guess is not None and score(guess) >= min_matches:
        best = guess
    if best is None:
        s, d = src[:max_stars], dst[:max_stars]
        inv_s, ver_s = triangle_invariants(s, neighbours)
        inv_d, ver_d = triangle_invariants(d, neighbours)
        if len(inv_s) == 0 or len(inv_d) == 0:
            raise InputError("star matching: too few stars to form triangles")
        pairs = cKDTree(inv_d).query_ball_point(inv_s, tolerance)
        cand = [(i, j) for i, js in enumerate(pairs) for j in js]
        if not cand:
            raise InputError("star matching: no triangle of one list resembles one of the other")
        rng = np.random.default_rng(0)
        if len(cand) > max_candidates:
            cand = [cand[k] for k in rng.choice(len(cand), max_candidates, replace=False)]
        best_n = -1
        for i, j in cand:
            try:
                m, _, _ = fit_transform(s[ver_s[i]], d[ver_d[j]], kind="similarity", max_iter=1)
            except (InputError, np.linalg.LinAlgError):
                continue
            n = score(m)
            if n > best_n:
                best, best_n = m, n
        if best is None or best_n < min_matches:
            raise InputError(f"star matching: the best triangle match pairs only {max(best_n, 0)} stars "
                             f"(need {min_matches})")
    # refine: pair all stars under the current transform, fit, repeat with a tighter radius
    mapping = best
    radius = match_radius
    for _ in range(3):
        u, v = mapping(src[:, 0], src[:, 1])
        i, j = match_nearest(np.column_stack([u, v]), dst, radius)
        if len(i) < min_matches:
            raise InputError(f"star matching: only {len(i)} stars pair up (need {min_matches})")
        fit_kind = kind if len(i) >= 6 else "similarity"
        mapping, inl, rms = fit_transform(src[i], dst[j], kind=fit_kind)
        radius = max(min(radius, 5 * rms), 0.5)
    return StarMatch(mapping=mapping, src_index=i[inl], dst_index=j[inl], rms=rms, n_matched=int(inl.sum()))


def prefer_translation(src: np.ndarray, dst: np.ndarray, match: StarMatch, *,
                       p_value: float = 1e-3) -> tuple[StarMatch, float]:
    """``match`` (from :func:`match_star_lists` on ``src`` and ``dst``), or the translation fitted to its pairs when
    the mapping's linear part does not fit them significantly better than that translation, and the test's p-value.

    The test is Fisher's F for nested least squares: the residual sums of squares of the translation (2 parameters)
    and of ``match.mapping`` (6: the matrix's 4 terms more) over the ``n`` matched pairs' 2n coordinates,
    :math:`F = \\frac{(S_t - S_a)/4}{S_a/(2n - 6)}`; the translation is kept where ``P(F' ≥ F) > p_value``.
    Below 6 pairs, or with no residual left, ``match`` is returned as it is (p-value NaN).  The translation is the
    mean offset of the pairs (its least squares); its ``rms`` is that of their residual vectors' lengths.
    """
    from scipy.special import fdtrc

    s = np.asarray(src, dtype=np.float64)[match.src_index, :2]
    d = np.asarray(dst, dtype=np.float64)[match.dst_index, :2]
    n = len(s)
    if n < 6:
        return match, float("nan")
    u, v = match.mapping(s[:, 0], s[:, 1])
    fitted = float(np.sum((u - d[:, 0]) ** 2 + (v - d[:, 1]) ** 2))
    offset = np.mean(d - s, axis=0)
    r = s + offset - d
    shifted = float(np.sum(r * r))
    if not fitted > 0:
        return match, float("nan")
    f = max(shifted - fitted, 0.0) / 4.0 / (fitted / (2 * n - 6))
    p = float(fdtrc(4, 2 * n - 6, f))
    if p <= p_value:
        return match, p
    rms = float(np.sqrt(np.mean(np.sum(r * r, axis=1))))
    return StarMatch(mapping=AffineMapping.shift(float(offset[0]), float(offset[1])), src_index=match.src_index,
                     dst_index=match.dst_index, rms=rms, n_matched=match.n_matched), p
