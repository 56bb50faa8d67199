r"""Saturation found in the pixels themselves, for frames whose header has no ``SATURATE`` keyword.

Two rules, tried in this order (:func:`find_saturation`):

``integer limit``
    A frame stored as integers cannot hold more than its type's largest value (``BITPIX`` 16 with
    ``BZERO = 32768``: 65535).  When pixels reach it, that value is the saturation level: an ADC
    clips there, and a uint16 camera's saturated stars sit at exactly 65535.
``plateau``
    Otherwise (floating-point frames, or a full well below the type's limit) a saturated star has a
    flat top: several pixels around its maximum, over at least two rows and two columns (a hot
    column is not a star), within ``flat_tolerance`` of it, which no
    unsaturated star narrower than ~16 px FWHM shows (a Gaussian's neighbour pixel is below 99 % of
    the peak unless :math:`\sigma > 7` px).  When at least ``min_flat_pixels`` such pixels surround a
    bright local maximum (``min_amplitude`` σ above the sky at least; the tolerance is a fraction of
    the amplitude above the sky, so a faint top that noise makes flat does not count), its plateau
    is a saturation level; with several such stars the lowest plateau (flat fields scale each star's
    clip level) less ``flat_tolerance`` of its amplitude is the level.

Pixels at or above the level are saturated, grown by ``grow`` pixels (the pixels next to a clipped
one are non-linear).  Pure numerics: arrays in, level, mask and a description of the rule out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .detection import local_max_at
from .maskops import all_finite, grow_square

__all__ = ["SaturationResult", "integer_limit", "find_saturation"]


@dataclass(frozen=True)
class SaturationResult:
    """``level`` (None: no saturation found), the ``mask`` of saturated pixels and the ``rule`` that found them."""

    level: float | None
    mask: np.ndarray
    rule: str
    n_stars: int = 0


def integer_limit(bitpix: int, bzero: float = 0.0, bscale: float = 1.0) -> float | None:
    """Largest physical value an integer FITS image can hold (None for floating-point data)."""
    if bitpix == 8:
        raw = 255
    elif bitpix in (16, 32, 64):
        raw = 2 ** (bitpix - 1) - 1
    else:
        return None
    return float(bzero) + float(bscale) * raw


def _good_values(image: np.ndarray, good: np.ndarray | None) -> np.ndarray:
    """``image[good]``; the flat image itself (no copy) when every pixel is good (``good`` None: all are)."""
    return image.ravel() if good is None or good.all() else image[good]


def _where_good(condition: np.ndarray, good: np.ndarray | None) -> np.ndarray:
    """``condition & good`` (``good`` None: every pixel is good, and no plane of it is made)."""
    return condition if good is None else condition & good


def _bright_peaks(image: np.ndarray, good: np.ndarray | None, n_max: int) -> np.ndarray:
    """Flat indices of the ``n_max`` brightest local maxima (3×3) of ``image`` above its 99.9th percentile."""
    vals = _good_values(image, good)
    if vals.size == 0:
        return np.zeros(0, dtype=np.int64)
    step = max(1, vals.size // (1 << 20))
    threshold = float(np.percentile(vals[::step], 99.9))
    cand = np.flatnonzero(_where_good(image > threshold, good).ravel())
    if cand.size == 0:
        return cand
    if cand.size > 200_000:
        cand = cand[np.argsort(image.ravel()[cand])[-200_000:]]
    iy, ix = np.divmod(cand, image.shape[1])
    peaks = cand[local_max_at(image, iy, ix)]
    order = np.argsort(image.ravel()[peaks])[::-1]
    return peaks[order[:n_max]]


def find_saturation(image: np.ndarray, bad: np.ndarray | None = None, *, type_limit: float | None = None,
                    flat_tolerance: float = 0.01, min_flat_pixels: int = 3, min_amplitude: float = 100.0,
                    max_peaks: int = 200, grow: int = 1) -> SaturationResult:
    """Saturation level and mask of an image without a ``SATURATE`` keyword (see the module docstring).

    Parameters
    ----------
    image : ndarray
        Pixel values (physical counts).
    bad : ndarray of bool, optional
        Pixels to ignore (non-finite, no data).
    type_limit : float, optional
        The integer type's largest physical value (:func:`integer_limit`), when the file stored integers.
    flat_tolerance : float
        A plateau pixel is within this fraction of the star's amplitude (its maximum less the sky).
    min_amplitude : float
        Only stars whose maximum is this many σ of the sky above it can be saturated.
    min_flat_pixels : int
        Plateau pixels (besides the maximum) that make a flat top.
    grow : int
        Pixels the saturated mask grows by.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if all_finite(img):  # (None: every pixel good, without a plane saying so)
        good = None if bad is None else ~np.asarray(bad, bool)
    else:
        good = np.isfinite(img) if bad is None else (np.isfinite(img) & ~np.asarray(bad, bool))
    level = None
    rule = "none found (no pixel at the integer type's limit, no flat-topped star)"
    n_stars = 0
    if type_limit is not None and np.any(_where_good(img >= np.float32(type_limit) - 0.5, good)):
        level = float(type_limit) - 0.5
        hit = _where_good(img >= level, good)
        n_stars = int(ndimage.label(hit)[1])
        rule = f"integer limit: {int(np.count_nonzero(hit))} pixel(s) at {type_limit:g}, the largest value of the file's type"
    else:
        peaks = _bright_peaks(img, good, max_peaks)
        ny, nx = img.shape
        n_good = img.size if good is None else int(np.count_nonzero(good))
        sample = _good_values(img, good)[:: max(1, n_good // (1 << 20))]
        sky = float(np.median(sample)) if sample.size else 0.0
        noise = float(1.4826 * np.median(np.abs(sample - sky))) if sample.size else 0.0
        plateaus = []
        taken: list[tuple[int, int]] = []
        for p in peaks:
            y, x = divmod(int(p), nx)
            v = float(img[y, x])
            amplitude = v - sky
            if not amplitude > min_amplitude * max(noise, 1e-30):
                continue  # a clip level lies far above the sky; a faint flat-ish top is noise
            if any(abs(y - ty) <= 7 and abs(x - tx) <= 7 for ty, tx in taken):
                continue  # one star's plateau holds many equal maxima
            win = img[max(y - 3, 0): y + 4, max(x - 3, 0): x + 4]
            flat = win >= v - flat_tolerance * amplitude
            rows, cols = np.nonzero(flat)
            # a flat *top*: spread over two rows and two columns at least (a hot column or row is not one)
            if (int(flat.sum()) - 1 >= min_flat_pixels and rows.max() > rows.min() and cols.max() > cols.min()):
                plateaus.append(v)
                taken.append((y, x))
        if plateaus:
            n_stars = len(plateaus)
            lowest = min(plateaus)
            level = lowest - flat_tolerance * (lowest - sky)
            rule = (f"plateau: {n_stars} star(s) with flat tops ({min_flat_pixels}+ pixels within "
                    f"{100 * flat_tolerance:g}% of the maximum), the lowest at {lowest:.6g}")
    if level is None:
        return SaturationResult(level=None, mask=np.zeros(img.shape, bool), rule=rule)
    mask = _where_good(img >= np.float32(level), good)
    if grow > 0 and mask.any():
        mask = grow_square(mask, int(grow))
    if math.isfinite(level):
        rule += f"; saturated at >= {level:.6g}, grown by {grow} px"
    return SaturationResult(level=float(level), mask=mask, rule=rule, n_stars=n_stars)
