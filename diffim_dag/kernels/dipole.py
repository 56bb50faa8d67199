r"""Dipole model and fit for merged footprints with positive and negative peaks.

Model (LSST ``DipoleFitAlgorithm``, Reiss & Lupton 2016): a source that moved, or
was mis-registered, between template and science leaves

.. math::

    D(\mathbf{p}) = F_+ P(\mathbf{p} - \mathbf{x}_+) - F_- P(\mathbf{p} - \mathbf{x}_-),

and, when the direct images are given, the science and (PSF-matched) template are
modelled as :math:`S = F_+ P(\mathbf{p} - \mathbf{x}_+)` and
:math:`T = F_- P(\mathbf{p} - \mathbf{x}_-)` after a linear background
:math:`b_0 + b_x x + b_y y` fitted to each direct image's stamp pixels *outside* the
footprint has been subtracted.  The six parameters minimise

.. math::

    \chi^2 = \sum \frac{(D - M_D)^2}{V_D}
           + w \Big[\sum \frac{(S - M_S)^2}{V_S} + \sum \frac{(T - M_T)^2}{V_T}\Big],
    \qquad w = 0.5,

(Levenberg–Marquardt with the lobes kept in the stamp and the fluxes ≥ 0, every footprint of a tile at once:
:func:`fit_dipoles`; it reaches the minimum a trust-region fit of each finds, tested).  Errors are
the square roots of the diagonal of :math:`(J^T J)^{-1}` at the minimum (the
residuals are already in σ units).  Derived quantities:

* centroid :math:`(F_+ \mathbf{x}_+ + F_- \mathbf{x}_-)/(F_+ + F_-)`;
* orientation :math:`\operatorname{atan2}(y_+ - y_-, x_+ - x_-)` in degrees (from the
  negative lobe to the positive one), separation :math:`|\mathbf{x}_+ - \mathbf{x}_-|`;
* :math:`\chi^2/\mathrm{dof}` with :math:`\mathrm{dof} = N_D + w(N_S + N_T) - 6`
  (the expectation of the weighted χ² for a correct model);
* :math:`\mathrm{S/N} = \sqrt{(F_+/\sigma_{F_+})^2 + (F_-/\sigma_{F_-})^2}`;
* classification as a dipole when :math:`\mathrm{S/N} > 5\sqrt2` and each lobe carries
  less than 0.65 of :math:`F_+ + F_-` (LSST ``ClassificationDipole``).

The negative lobe's flux is reported with its sign, ``neg_flux = -F_-`` (LSST
convention).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..psf import Psf
from .detection import Footprint
from .measure import _DERIV_STEP, _weights, render_psf, render_psfs  # one inverse-variance weighting for both fits

__all__ = ["DIPOLE_COLUMNS", "linear_background", "dipole_model", "fit_dipole", "fit_dipoles", "classify_dipole",
           "empty_dipole"]

#: Column → dtype of a dipole fit result.
DIPOLE_COLUMNS: dict[str, str] = {
    "dipole_fitted": "bool",
    "is_dipole": "bool",
    "dipole_pos_flux": "float64",
    "dipole_pos_flux_err": "float64",
    "dipole_neg_flux": "float64",
    "dipole_neg_flux_err": "float64",
    "dipole_pos_x": "float64",
    "dipole_pos_y": "float64",
    "dipole_pos_x_err": "float64",
    "dipole_pos_y_err": "float64",
    "dipole_neg_x": "float64",
    "dipole_neg_y": "float64",
    "dipole_neg_x_err": "float64",
    "dipole_neg_y_err": "float64",
    "dipole_x": "float64",
    "dipole_y": "float64",
    "dipole_x_err": "float64",
    "dipole_y_err": "float64",
    "dipole_orientation": "float64",
    "dipole_separation": "float64",
    "dipole_chi2dof": "float64",
    "dipole_snr": "float64",
    "dipole_flag": "bool",
}

SN_MIN = 5.0 * math.sqrt(2.0)
MAX_FLUX_RATIO = 0.65


def empty_dipole() -> dict:
    """A result row for a source that was not fitted."""
    return {k: (False if v == "bool" else np.nan) for k, v in DIPOLE_COLUMNS.items()}


def linear_background(image: np.ndarray, weight: np.ndarray, use: np.ndarray) -> np.ndarray:
    r"""Weighted least-squares plane :math:`b_0 + b_x x + b_y y` fitted to the ``use`` pixels, on the whole stamp."""
    ny, nx = image.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    sel = use & (weight > 0) & np.isfinite(image)
    if np.count_nonzero(sel) < 3:
        return np.zeros_like(image, dtype=np.float64)
    a = np.stack([np.ones(np.count_nonzero(sel)), xx[sel], yy[sel]], axis=1)
    sw = np.sqrt(weight[sel])
    coef, *_ = np.linalg.lstsq(a * sw[:, None], image[sel] * sw, rcond=None)
    return coef[0] + coef[1] * xx + coef[2] * yy


def dipole_model(
    psf: Psf, params: Sequence[float], bbox: tuple[int, int, int, int], *, shape_at: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""``(F_+ P(x_+), F_- P(x_-))`` on the parent box ``bbox``; params ``(x+, y+, x-, y-, F+, F-)``.

    ``shape_at``: where the PSF's shape is taken for both lobes (default: each lobe's position).
    """
    xp, yp, xn, yn, fp, fn = params
    if shape_at is None:
        return fp * render_psf(psf, xp, yp, bbox), fn * render_psf(psf, xn, yn, bbox)
    pos, neg = render_psfs(psf, [(xp, yp), (xn, yn)], bbox, size=psf.default_size(*shape_at), shape_at=shape_at)
    return fp * pos, fn * neg


def classify_dipole(pos_flux: float, neg_flux: float, snr: float) -> bool:
    """S/N > 5√2 and each lobe below 0.65 of the total (``neg_flux`` of either sign)."""
    fp, fn = abs(pos_flux), abs(neg_flux)
    total = fp + fn
    if not (np.isfinite(total) and total > 0 and np.isfinite(snr)):
        return False
    return bool(snr > SN_MIN and fp / total < MAX_FLUX_RATIO and fn / total < MAX_FLUX_RATIO)


def fit_dipole(
    difference: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    psf: Psf,
    footprint: Footprint,
    *,
    origin: tuple[int, int] = (0, 0),
    science: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    template: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    direct_weight: float = 0.5,
    margin: int = 6,
) -> dict:
    r"""Fit the dipole model to one merged footprint (see module notes): :func:`fit_dipoles` of one.

    Parameters
    ----------
    difference, variance, good : ndarray
        Difference tile planes (``good``: usable pixels).
    psf : Psf
        PSF of the difference (parent frame).
    footprint : Footprint
        Must carry at least one positive and one negative peak.
    science, template : (image, variance, good), optional
        Direct images on the same tile grid; used jointly (weight ``direct_weight``)
        when both are given.
    margin : int
        Pixels added around the footprint's bbox (the ring where backgrounds are fitted).

    Returns
    -------
    dict
        Keys :data:`DIPOLE_COLUMNS`; ``dipole_flag`` is set when the fit failed.
    """
    return fit_dipoles(difference, variance, good, psf, [footprint], origin=origin, science=science,
                       template=template, direct_weight=direct_weight, margin=margin)[0]


#: Sources whose stamps are fitted together (stamps padded to the largest of the batch, sorted by size).
DIPOLE_BATCH = 32
#: Convergence of the fits: relative χ² decrease (``ftol``), step relative to the parameters (``xtol``), as
#: the trust-region fit these replace was asked for; and the most iterations before a fit is flagged.
FTOL, XTOL, MAX_ITER = 1e-10, 1e-10, 200


class _Stamps:
    """The fit data of one footprint: its parent box, the blocks ``(data, √weight)`` (difference, then the
    background-subtracted science and template when fitted jointly), first guesses and bounds."""

    def __init__(self, difference, variance, good, psf, footprint, origin, science, template, direct_weight,
                 margin):
        ny, nx = difference.shape
        x0, y0 = origin
        bx0, bx1, by0, by1 = footprint.bbox
        bbox = (max(bx0 - margin, x0), min(bx1 + margin, x0 + nx), max(by0 - margin, y0), min(by1 + margin, y0 + ny))
        sl = (slice(bbox[2] - y0, bbox[3] - y0), slice(bbox[0] - x0, bbox[1] - x0))
        inside = np.zeros((bbox[3] - bbox[2], bbox[1] - bbox[0]), dtype=bool)
        inside[by0 - bbox[2] : by1 - bbox[2], bx0 - bbox[0] : bx1 - bbox[0]] = footprint.spans
        d = np.asarray(difference[sl], dtype=np.float64)
        wd = _weights(np.asarray(variance[sl], dtype=np.float64), np.asarray(good[sl]))
        self.blocks = [(d, np.sqrt(wd))]
        self.joint = science is not None and template is not None
        self.n_data = float(np.count_nonzero(wd))
        if self.joint:
            for img, var, gd in (science, template):
                im = np.asarray(img[sl], dtype=np.float64)
                w = _weights(np.asarray(var[sl], dtype=np.float64), np.asarray(gd[sl]))
                im = im - linear_background(im, w, ~inside)
                self.blocks.append((im, np.sqrt(direct_weight * w)))
                self.n_data += direct_weight * np.count_nonzero(w)
        sig = footprint.peak_significance
        ipos, ineg = int(np.argmax(sig > 0)), int(np.argmax(sig < 0))
        self.peaks = (float(footprint.peak_x[ipos]), float(footprint.peak_y[ipos]),
                      float(footprint.peak_x[ineg]), float(footprint.peak_y[ineg]))
        self.bbox = bbox
        # one PSF shape for the fit, the model's at the footprint's centre (lobes are pixels apart; the PSF
        # varies over hundreds), so the fit's derivatives are those of the positions
        self.shape_at = (0.5 * (bx0 + bx1 - 1), 0.5 * (by0 + by1 - 1))
        self.size = psf.default_size(*self.shape_at)
        self.lo = np.array([bbox[0] - 0.5, bbox[2] - 0.5, bbox[0] - 0.5, bbox[2] - 0.5, 0.0, 0.0])
        self.hi = np.array([bbox[1] - 0.5, bbox[3] - 0.5, bbox[1] - 0.5, bbox[3] - 0.5, np.inf, np.inf])


def _lobe_renders(psf, group, params, boxes, shape, size, shifts):
    """``(m, k, H, W)``: the unit-sum PSF of each footprint's shape, centred at each lobe position shifted by
    ``shifts`` (``(k, 2)``: the first ``k/2`` move the positive lobe, the rest the negative one), rendered at
    its nearest pixel with the sub-pixel offset and cut to the footprint's box (:func:`render_psfs`), in the
    footprint's stamp padded to ``shape``."""
    m, k = len(group), len(shifts)
    half_k = k // 2
    lobes = np.concatenate([np.repeat(params[:, None, 0:2], half_k, axis=1),
                            np.repeat(params[:, None, 2:4], k - half_k, axis=1)], axis=1) + shifts  # (m, k, 2)
    centre = np.floor(lobes + 0.5)
    kern = psf.kernel_images_many([g.shape_at[0] for g in group], [g.shape_at[1] for g in group], size=size,
                                  offsets=lobes - centre)
    h = size // 2
    big_h, big_w = shape
    # stamp pixel (a, b) is parent pixel (x0 + b, y0 + a), kernel pixel (x0 + b − cx + h, y0 + a − cy + h)
    u = (boxes[:, 0, None, None] - centre[..., 0, None] + h).astype(np.int64) + np.arange(big_w)  # (m, k, W)
    v = (boxes[:, 2, None, None] - centre[..., 1, None] + h).astype(np.int64) + np.arange(big_h)  # (m, k, H)
    on = ((u >= 0) & (u < size))[:, :, None, :] & ((v >= 0) & (v < size))[:, :, :, None]
    out = kern[np.arange(m)[:, None, None, None], np.arange(k)[None, :, None, None],
               np.clip(v, 0, size - 1)[:, :, :, None], np.clip(u, 0, size - 1)[:, :, None, :]]
    out[~on] = 0.0
    return out


_CENTRE = np.zeros((2, 2))
_SHIFTS = np.array([(0.0, 0.0), (_DERIV_STEP, 0.0), (-_DERIV_STEP, 0.0), (0.0, _DERIV_STEP), (0.0, -_DERIV_STEP)] * 2)


def _normal_equations(psf, group, params, boxes, shape, size, data, roots, joint):
    """χ², ``JᵀJ`` and ``Jᵀr`` of each footprint's fit at ``params`` (``(m, 6)``: ``x+, y+, x-, y-, F+, F-``).

    Residuals ``(data − model) √w``; the Jacobian is exact in the fluxes, and the lobes' position derivatives are
    central differences of the PSF (the step of :func:`~diffim_dag.kernels.measure.psf_fit`), all ten renders in
    one batch."""
    st = _DERIV_STEP
    r = _lobe_renders(psf, group, params, boxes, shape, size, _SHIFTS)
    m = len(group)
    pos, neg = r[:, 0], r[:, 5]
    dpx, dpy = (r[:, 1] - r[:, 2]) / (2 * st), (r[:, 3] - r[:, 4]) / (2 * st)
    dnx, dny = (r[:, 6] - r[:, 7]) / (2 * st), (r[:, 8] - r[:, 9]) / (2 * st)
    f1, f2 = params[:, 4, None, None], params[:, 5, None, None]
    zero = np.zeros_like(pos)
    # ∂residual/∂θ = −∂model/∂θ √w; model_D = F+ P+ − F− P−, model_S = F+ P+, model_T = F− P−
    models = [(f1 * pos - f2 * neg, [-f1 * dpx, -f1 * dpy, f2 * dnx, f2 * dny, -pos, neg])]
    if joint:
        models.append((f1 * pos, [-f1 * dpx, -f1 * dpy, zero, zero, -pos, zero]))
        models.append((f2 * neg, [zero, zero, -f2 * dnx, -f2 * dny, zero, -neg]))
    chi2, ata, atr = np.zeros(m), np.zeros((m, 6, 6)), np.zeros((m, 6))
    for (model, cols), d, root in zip(models, data, roots):
        res = ((d - model) * root).reshape(m, -1)
        jac = (np.stack(cols, axis=1) * root[:, None]).reshape(m, 6, -1)
        chi2 += np.einsum("mp,mp->m", res, res)
        ata += np.einsum("mip,mjp->mij", jac, jac)
        atr += np.einsum("mip,mp->mi", jac, res)
    return chi2, ata, atr


def _chi2(psf, group, params, boxes, shape, size, data, roots, joint):
    """χ² of each footprint's fit at ``params``, as :func:`_normal_equations` gives it (the same renders of the two
    lobes and the same sums, bitwise), from those two renders alone: a trial step is judged by its χ², and only
    an accepted one needs the Jacobian's eight other renders."""
    r = _lobe_renders(psf, group, params, boxes, shape, size, _CENTRE)
    m = len(group)
    pos, neg = r[:, 0], r[:, 1]
    f1, f2 = params[:, 4, None, None], params[:, 5, None, None]
    models = [f1 * pos - f2 * neg] + ([f1 * pos, f2 * neg] if joint else [])
    chi2 = np.zeros(m)
    for model, d, root in zip(models, data, roots):
        res = ((d - model) * root).reshape(m, -1)
        chi2 += np.einsum("mp,mp->m", res, res)
    return chi2


def _solve_damped(ata, atr, lam):
    """Levenberg–Marquardt steps ``−(JᵀJ + λ diag JᵀJ)⁻¹ Jᵀr`` (NaN where the system is singular)."""
    diag = np.einsum("mii->mi", ata)
    a = ata + lam[:, None, None] * np.einsum("mi,ij->mij", np.maximum(diag, 1e-300), np.eye(6))
    out = np.full(atr.shape, np.nan)
    try:
        return -np.linalg.solve(a, atr[..., None])[..., 0]
    except np.linalg.LinAlgError:
        for i in range(len(a)):
            try:
                out[i] = -np.linalg.solve(a[i], atr[i])
            except np.linalg.LinAlgError:
                pass
        return out


def _fit_batch(psf, group: list, size: int) -> list[dict]:
    """Levenberg–Marquardt fits of the footprints of ``group`` (one kernel ``size``), all at once; bounds (the
    lobes in the box, fluxes ≥ 0) by projection.  Each fit stops where its own χ² stops decreasing (relative
    change below ``FTOL``) or its step is below ``XTOL`` of its parameters."""
    m = len(group)
    joint = group[0].joint
    shape = (max(g.bbox[3] - g.bbox[2] for g in group), max(g.bbox[1] - g.bbox[0] for g in group))

    def padded(arrays):
        out = np.zeros((m,) + shape)
        for o, a in zip(out, arrays):
            o[: a.shape[0], : a.shape[1]] = a
        return out

    n_blocks = len(group[0].blocks)
    data = [padded([g.blocks[b][0] for g in group]) for b in range(n_blocks)]
    roots = [padded([g.blocks[b][1] for g in group]) for b in range(n_blocks)]
    boxes = np.array([g.bbox for g in group], dtype=np.float64)
    lo, hi = np.array([g.lo for g in group]), np.array([g.hi for g in group])
    peaks = np.array([g.peaks for g in group])
    # first guesses: the lobes at the peaks, their fluxes from the direct images (jointly) or the difference
    first = _lobe_renders(psf, group, np.column_stack([peaks, np.ones((m, 2))]), boxes, shape, size, _CENTRE)
    p_pos, p_neg = first[:, 0], first[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        norm_p = np.maximum(np.einsum("mij,mij->m", p_pos, p_pos), 1e-300)
        norm_n = np.maximum(np.einsum("mij,mij->m", p_neg, p_neg), 1e-300)
        if joint:
            fp0 = np.einsum("mij,mij->m", p_pos, data[1]) / norm_p
            fn0 = np.einsum("mij,mij->m", p_neg, data[2]) / norm_n
        else:
            fp0 = np.einsum("mij,mij->m", p_pos, data[0]) / norm_p
            fn0 = -np.einsum("mij,mij->m", p_neg, data[0]) / norm_n
    fp0, fn0 = np.maximum(np.nan_to_num(fp0, nan=1e-3), 1e-3), np.maximum(np.nan_to_num(fn0, nan=1e-3), 1e-3)
    p = np.clip(np.column_stack([peaks, fp0, fn0]), lo + 1e-6, hi - 1e-6)
    chi2, ata, atr = _normal_equations(psf, group, p, boxes, shape, size, data, roots, joint)
    lam = np.full(m, 1e-3)
    active = np.isfinite(chi2)
    converged = np.zeros(m, dtype=bool)
    failed = ~active
    for _ in range(MAX_ITER):
        ia = np.flatnonzero(active)
        if not ia.size:
            break
        step = _solve_damped(ata[ia], atr[ia], lam[ia])
        bad = ~np.all(np.isfinite(step), axis=1)
        if bad.any():
            failed[ia[bad]] = True
            active[ia[bad]] = False
            ia, step = ia[~bad], step[~bad]
            if not ia.size:
                break
        trial = np.clip(p[ia] + step, lo[ia] + 1e-6, hi[ia] - 1e-6)
        c2 = _chi2(psf, [group[i] for i in ia], trial, boxes[ia], shape, size, [x[ia] for x in data],
                   [x[ia] for x in roots], joint)
        better = np.isfinite(c2) & (c2 <= chi2[ia])
        # converged: a step (taken or not) below XTOL of the parameters, or χ² that no longer changes beyond
        # FTOL (at the minimum a step can be refused for a rounding-level increase: no use damping further)
        moved = np.linalg.norm(trial - p[ia], axis=1)
        small_step = moved <= XTOL * (XTOL + np.linalg.norm(p[ia], axis=1))
        small_gain = np.isfinite(c2) & (np.abs(chi2[ia] - c2) <= FTOL * chi2[ia])
        acc = ia[better]
        if acc.size:  # the accepted steps' normal equations (a refused step needs none: its λ grows, p stays)
            _, ata[acc], atr[acc] = _normal_equations(psf, [group[i] for i in acc], trial[better], boxes[acc], shape,
                                                      size, [x[acc] for x in data], [x[acc] for x in roots], joint)
        p[acc], chi2[acc] = trial[better], c2[better]
        lam[acc] = np.maximum(lam[acc] / 10.0, 1e-12)
        rej = ia[~better]
        lam[rej] *= 10.0
        done = small_step | small_gain | (~better & (lam[ia] > 1e12))
        converged[ia[done]] = True
        active[ia[done]] = False
    return [_result(g, p[i], chi2[i], ata[i], bool(converged[i] and not failed[i])) for i, g in enumerate(group)]


def _result(stamps: _Stamps, p, chi2: float, ata, success: bool) -> dict:
    """The result row of one fit: the parameters, their errors (``(JᵀJ)⁻¹`` at the minimum) and what derives."""
    out = empty_dipole()
    try:
        cov = np.linalg.inv(ata)
        err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        err = np.full(6, np.nan)
    xp, yp, xn, yn, fpos, fneg = (float(v) for v in p)
    tot = fpos + fneg
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = math.sqrt((fpos / err[4]) ** 2 + (fneg / err[5]) ** 2) if err[4] > 0 and err[5] > 0 else np.nan
    if tot > 0:
        cx = (fpos * xp + fneg * xn) / tot
        cy = (fpos * yp + fneg * yn) / tot
        a, b = fpos / tot, fneg / tot
        cx_err = math.sqrt(max((a * err[0]) ** 2 + (b * err[2]) ** 2, 0.0))
        cy_err = math.sqrt(max((a * err[1]) ** 2 + (b * err[3]) ** 2, 0.0))
    else:
        cx = cy = cx_err = cy_err = np.nan
    out.update(
        dipole_fitted=True,
        dipole_pos_flux=fpos,
        dipole_pos_flux_err=float(err[4]),
        dipole_neg_flux=-fneg,
        dipole_neg_flux_err=float(err[5]),
        dipole_pos_x=xp,
        dipole_pos_y=yp,
        dipole_pos_x_err=float(err[0]),
        dipole_pos_y_err=float(err[1]),
        dipole_neg_x=xn,
        dipole_neg_y=yn,
        dipole_neg_x_err=float(err[2]),
        dipole_neg_y_err=float(err[3]),
        dipole_x=cx,
        dipole_y=cy,
        dipole_x_err=cx_err,
        dipole_y_err=cy_err,
        dipole_orientation=math.degrees(math.atan2(yp - yn, xp - xn)),
        dipole_separation=math.hypot(xp - xn, yp - yn),
        # each direct-image pixel counts with its weight w, so that E[χ²] = N_D + w (N_S + N_T) - 6
        dipole_chi2dof=float(chi2) / max(stamps.n_data - 6, 1),
        dipole_snr=snr,
        dipole_flag=bool(not success or not np.all(np.isfinite(p))),
    )
    out["is_dipole"] = (not out["dipole_flag"]) and classify_dipole(fpos, fneg, snr)
    return out


def fit_dipoles(
    difference: np.ndarray,
    variance: np.ndarray,
    good: np.ndarray,
    psf: Psf,
    footprints: Sequence[Footprint],
    *,
    origin: tuple[int, int] = (0, 0),
    science: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    template: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    direct_weight: float = 0.5,
    margin: int = 6,
) -> list[dict]:
    r""":func:`fit_dipole` of each footprint (parameters as there): the fits of footprints with one kernel size
    run together, ``DIPOLE_BATCH`` at a time (Levenberg–Marquardt on every footprint's normal equations at once;
    the renders of all lobes and their shifted copies in one call of :meth:`~diffim_dag.psf.Psf.kernel_images_many`).
    Footprints without both a positive and a negative peak get :func:`empty_dipole`."""
    out: list[dict | None] = [None] * len(footprints)
    prepared = []
    for i, fp in enumerate(footprints):
        sig = fp.peak_significance
        if not (np.any(sig > 0) and np.any(sig < 0)):
            out[i] = empty_dipole()
            continue
        prepared.append((i, _Stamps(difference, variance, good, psf, fp, origin, science, template, direct_weight,
                                    margin)))
    by_size: dict[int, list] = {}
    for i, st in prepared:
        by_size.setdefault(st.size, []).append((i, st))
    for size, members in by_size.items():
        members.sort(key=lambda m: (m[1].bbox[3] - m[1].bbox[2]) * (m[1].bbox[1] - m[1].bbox[0]))
        for k in range(0, len(members), DIPOLE_BATCH):
            chunk = members[k : k + DIPOLE_BATCH]
            try:
                rows = _fit_batch(psf, [st for _, st in chunk], size)
            except (ValueError, np.linalg.LinAlgError):
                rows = [dict(empty_dipole(), dipole_flag=True) for _ in chunk]
            for (i, _), row in zip(chunk, rows):
                out[i] = row
    return out


def dipole_table(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows of :func:`fit_dipole` results as a typed DataFrame."""
    return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=v) for k, v in DIPOLE_COLUMNS.items()})
