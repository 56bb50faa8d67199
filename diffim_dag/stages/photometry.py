r"""The photometric ratio of two exposures measured on their stars (aperture photometry).

:math:`\kappa = F_S / F_T`, science counts per template count of a constant source: the clipped mean
of the aperture-flux ratios of stars with S/N ≥ ``min_snr`` in both exposures, in circular apertures
of radius :math:`2\,\max(\mathrm{FWHM}_S, \mathrm{FWHM}_T)` with a local sky annulus
(``r + 2`` … ``r + 7`` px).  Each exposure's fluxes are divided by the fraction of a star its PSF
model puts into that measurement — the flux inside the aperture less the annulus's mean times the
aperture area — so the ratio does not depend on the two PSFs: for a Moffat profile (β = 3.5) the
broader image loses ~2 % more of its stars' flux to the wings and the annulus than the sharper one,
which without the correction biases κ by as much.  ZOGY uses the ratio as its flux ratio when no
zero points are given; the AL verdict compares it with the kernel sum.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..exposure import Exposure
from ..noise import clipped_stats
from ..kernels.maskops import has_bits

__all__ = ["aperture_flux_ratio", "captured_fraction"]


def captured_fraction(psf_image: np.ndarray, radius: float) -> float:
    """Fraction of a unit-flux star (centred PSF image) that an aperture of ``radius`` with the sky annulus
    ``radius + 2`` … ``radius + 7`` measures: flux inside less the annulus mean times the aperture area."""
    import sep

    img = np.ascontiguousarray(psf_image, dtype=np.float64) / float(np.sum(psf_image))
    c = img.shape[0] // 2
    f, _, _ = sep.sum_circle(img, np.array([float(c)]), np.array([float(c)]), radius,
                             bkgann=(radius + 2.0, radius + 7.0))
    return float(f[0]) if f[0] > 0 else 1.0


def aperture_flux_ratio(science: Exposure, template: Exposure, x: np.ndarray, y: np.ndarray, *,
                        radius: float | None = None, min_snr: float = 30.0,
                        bad_mask_planes=("NO_DATA", "BAD", "SAT", "EDGE")) -> tuple[float | None, pd.DataFrame]:
    """Clipped-mean ratio of aperture fluxes at parent positions ``(x, y)`` (None when no star qualifies).

    Returns
    -------
    ratio : float or None
    stars : DataFrame
        ``x, y, flux_science, flux_template, ratio, used``.
    """
    import sep

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    cx, cy = science.center
    if radius is None:
        radius = 2.0 * max(science.psf.fwhm(cx, cy), template.psf.fwhm(cx, cy))
    fluxes, errors = [], []
    for exp in (science, template):
        captured = captured_fraction(exp.psf.kernel_image(cx, cy, size=2 * int(np.ceil(radius + 8.0)) + 1), radius)
        img, var, msk = exp.arrays()
        bad = has_bits(msk, exp.bitmask([p for p in bad_mask_planes if p in exp.mask_planes]))
        x0, y0 = exp.xy0
        if x.size:
            f, e, flag = sep.sum_circle(np.ascontiguousarray(img, dtype=np.float32), x - x0, y - y0, radius,
                                        var=np.ascontiguousarray(var, dtype=np.float32), mask=bad,
                                        bkgann=(radius + 2.0, radius + 7.0))
            f = np.where(flag != 0, np.nan, f) / captured
            e = e / captured
        else:
            f = e = np.zeros(0)
        fluxes.append(f)
        errors.append(e)
    fs, ft = fluxes
    with np.errstate(divide="ignore", invalid="ignore"):
        good = (fs / errors[0] >= min_snr) & (ft / errors[1] >= min_snr) & (fs > 0) & (ft > 0)
        ratio = fs / ft
    stars = pd.DataFrame({"x": x, "y": y, "flux_science": fs, "flux_template": ft, "ratio": ratio, "used": good})
    if not good.any():
        return None, stars
    mean, _, _ = clipped_stats(ratio[good], nsigma=3.0)
    kept = np.abs(ratio - mean) <= 3.0 * max(np.std(ratio[good]), 1e-12)
    stars["used"] = good & kept
    return float(mean), stars
