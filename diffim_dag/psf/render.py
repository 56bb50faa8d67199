"""Point sources rendered with a PSF model: the stamps that the simulator and fake injection add to images."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .models import Psf

__all__ = ["Stamp", "point_source_stamps"]


@dataclass(frozen=True)
class Stamp:
    """One source's ``flux × PSF`` on the part of its odd square stamp inside the image.

    ``window`` is ``(slice_y, slice_x)`` into the image array; ``model`` has the window's shape.
    ``neff`` (1/ΣP², the effective area in pixels) and ``peak`` (max P) describe the whole unit-sum stamp.
    """

    index: int
    window: tuple[slice, slice]
    model: np.ndarray
    neff: float
    peak: float


def point_source_stamps(x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: Psf, *, xy0: tuple[int, int],
                        shape: tuple[int, int], sizes: np.ndarray) -> Iterator[Stamp]:
    """Yield one :class:`Stamp` per source: ``psf.kernel_image(x, y, size=s, offset=(x - x0 - i, y - y0 - j))``
    (unit sum, centred on the nearest pixel ``(i, j)`` plus the sub-pixel offset) times the flux.

    A stamp wholly inside the image adds exactly ``flux``; stamps are clipped at the border, and a
    source whose stamp misses the image (or has zero flux) yields an empty window.
    """
    ny, nx = shape
    x0, y0 = xy0
    for i in range(len(x)):
        xl, yl = float(x[i]) - x0, float(y[i]) - y0
        ix, iy = int(math.floor(xl + 0.5)), int(math.floor(yl + 0.5))
        size = int(sizes[i])
        h = size // 2
        unit = psf.kernel_image(float(x[i]), float(y[i]), size=size, offset=(xl - ix, yl - iy))
        xa, ya = ix - h, iy - h
        cxa, cxb, cya, cyb = max(xa, 0), min(ix + h + 1, nx), max(ya, 0), min(iy + h + 1, ny)
        if cxa >= cxb or cya >= cyb or flux[i] == 0:
            cxb, cyb = cxa, cya  # nothing to add
        model = float(flux[i]) * unit[cya - ya:cyb - ya, cxa - xa:cxb - xa]
        yield Stamp(index=i, window=(slice(cya, cyb), slice(cxa, cxb)), model=model,
                    neff=1.0 / float(np.sum(unit * unit)), peak=float(unit.max()))
