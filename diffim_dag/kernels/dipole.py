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

(``scipy.optimize.least_squares``, trust-region reflective, fluxes ≥ 0).  Errors are
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
from scipy.optimize import least_squares

from ..psf import Psf
from .detection import Footprint
from .measure import _DERIV_STEP, _weights, render_psf, render_psfs  # one inverse-variance weighting for both fits

__all__ = ["DIPOLE_COLUMNS", "linear_background", "dipole_model", "fit_dipole", "classify_dipole", "empty_dipole"]

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
    r"""Fit the dipole model to one merged footprint (see module notes).

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
    out = empty_dipole()
    sig = footprint.peak_significance
    if not (np.any(sig > 0) and np.any(sig < 0)):
        return out
    ny, nx = difference.shape
    x0, y0 = origin
    bx0, bx1, by0, by1 = footprint.bbox
    bbox = (max(bx0 - margin, x0), min(bx1 + margin, x0 + nx), max(by0 - margin, y0), min(by1 + margin, y0 + ny))
    sl = (slice(bbox[2] - y0, bbox[3] - y0), slice(bbox[0] - x0, bbox[1] - x0))
    inside = np.zeros((bbox[3] - bbox[2], bbox[1] - bbox[0]), dtype=bool)
    inside[by0 - bbox[2] : by1 - bbox[2], bx0 - bbox[0] : bx1 - bbox[0]] = footprint.spans
    d = np.asarray(difference[sl], dtype=np.float64)
    wd = _weights(np.asarray(variance[sl], dtype=np.float64), np.asarray(good[sl]))
    blocks = [(d, np.sqrt(wd), "D")]
    joint = science is not None and template is not None
    if joint:
        for name, (img, var, gd) in (("S", science), ("T", template)):
            im = np.asarray(img[sl], dtype=np.float64)
            w = _weights(np.asarray(var[sl], dtype=np.float64), np.asarray(gd[sl]))
            im = im - linear_background(im, w, ~inside)
            blocks.append((im, np.sqrt(direct_weight * w), name))

    ipos = int(np.argmax(sig > 0))
    ineg = int(np.argmax(sig < 0))
    xp, yp = float(footprint.peak_x[ipos]), float(footprint.peak_y[ipos])
    xn, yn = float(footprint.peak_x[ineg]), float(footprint.peak_y[ineg])
    # one PSF shape for the fit, the model's at the footprint's centre (lobes are pixels apart;
    # the PSF varies over hundreds), so the fit's derivatives are those of the positions
    shape_at = (0.5 * (bx0 + bx1 - 1), 0.5 * (by0 + by1 - 1))
    p_pos, p_neg = render_psfs(psf, [(xp, yp), (xn, yn)], bbox, size=psf.default_size(*shape_at), shape_at=shape_at)
    if joint:
        s_img, t_img = blocks[1][0], blocks[2][0]
        fp0 = float(np.sum(p_pos * s_img) / max(np.sum(p_pos * p_pos), 1e-300))
        fn0 = float(np.sum(p_neg * t_img) / max(np.sum(p_neg * p_neg), 1e-300))
    else:
        fp0 = float(np.sum(p_pos * d) / max(np.sum(p_pos * p_pos), 1e-300))
        fn0 = float(-np.sum(p_neg * d) / max(np.sum(p_neg * p_neg), 1e-300))
    fp0, fn0 = max(fp0, 1e-3), max(fn0, 1e-3)

    def residuals(p):
        mp, mn = dipole_model(psf, p, bbox, shape_at=shape_at)
        parts = [((d - (mp - mn)) * blocks[0][1]).ravel()]
        if joint:
            parts.append(((blocks[1][0] - mp) * blocks[1][1]).ravel())
            parts.append(((blocks[2][0] - mn) * blocks[2][1]).ravel())
        return np.concatenate(parts)

    size = psf.default_size(*shape_at)

    def jacobian(p):
        """Exact in the fluxes; the lobes' position derivatives by central differences of the PSF (the step of
        :func:`~diffim_dag.kernels.measure.psf_fit`), all ten renders in one call."""
        x1, y1, x2, y2, f1, f2 = p
        st = _DERIV_STEP
        r = render_psfs(psf, [(x1, y1), (x1 + st, y1), (x1 - st, y1), (x1, y1 + st), (x1, y1 - st),
                              (x2, y2), (x2 + st, y2), (x2 - st, y2), (x2, y2 + st), (x2, y2 - st)],
                        bbox, size=size, shape_at=shape_at).reshape(10, -1)
        pos, neg = r[0], r[5]
        dpos = [(r[1] - r[2]) / (2 * st), (r[3] - r[4]) / (2 * st)]
        dneg = [(r[6] - r[7]) / (2 * st), (r[8] - r[9]) / (2 * st)]
        zero = np.zeros_like(pos)
        # residual = (data − model) × √w: ∂/∂θ = −∂model/∂θ × √w, model_D = F+ P+ − F− P−, model_S = F+ P+, model_T = F− P−
        cols_d = [-f1 * dpos[0], -f1 * dpos[1], f2 * dneg[0], f2 * dneg[1], -pos, neg]
        parts = [np.stack(cols_d, axis=1) * blocks[0][1].ravel()[:, None]]
        if joint:
            cols_s = [-f1 * dpos[0], -f1 * dpos[1], zero, zero, -pos, zero]
            cols_t = [zero, zero, -f2 * dneg[0], -f2 * dneg[1], zero, -neg]
            parts.append(np.stack(cols_s, axis=1) * blocks[1][1].ravel()[:, None])
            parts.append(np.stack(cols_t, axis=1) * blocks[2][1].ravel()[:, None])
        return np.concatenate(parts)

    lo = [bbox[0] - 0.5, bbox[2] - 0.5, bbox[0] - 0.5, bbox[2] - 0.5, 0.0, 0.0]
    hi = [bbox[1] - 0.5, bbox[3] - 0.5, bbox[1] - 0.5, bbox[3] - 0.5, np.inf, np.inf]
    p0 = np.clip([xp, yp, xn, yn, fp0, fn0], np.array(lo) + 1e-6, np.array(hi) - 1e-6)
    scale = [1.0, 1.0, 1.0, 1.0, max(fp0, fn0), max(fp0, fn0)]
    try:
        res = least_squares(residuals, p0, jac=jacobian, bounds=(lo, hi), x_scale=scale, method="trf", xtol=1e-10,
                            ftol=1e-10, max_nfev=400)
    except (ValueError, np.linalg.LinAlgError):
        out["dipole_flag"] = True
        return out
    p = res.x
    jac = res.jac
    try:
        cov = np.linalg.inv(jac.T @ jac)
        err = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        cov = np.full((6, 6), np.nan)
        err = np.full(6, np.nan)
    # each direct-image pixel counts with its weight w, so that E[χ²] = N_D + w (N_S + N_T) - 6
    n_data = float(np.count_nonzero(blocks[0][1])) + sum(
        direct_weight * np.count_nonzero(b[1]) for b in blocks[1:])
    chi2 = float(np.sum(res.fun**2))
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
        dipole_chi2dof=chi2 / max(n_data - 6, 1),
        dipole_snr=snr,
        dipole_flag=bool(not res.success or not np.all(np.isfinite(p))),
    )
    out["is_dipole"] = (not out["dipole_flag"]) and classify_dipole(fpos, fneg, snr)
    return out


def dipole_table(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows of :func:`fit_dipole` results as a typed DataFrame."""
    return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=v) for k, v in DIPOLE_COLUMNS.items()})
