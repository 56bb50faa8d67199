"""Gaussian-windowed centroids (SExtractor's XWIN/YWIN, ``sep.winpos``) of centred stamps: pure numerics."""
from __future__ import annotations

import numpy as np

__all__ = ["window_centroid"]


def window_centroid(image: np.ndarray, sigma: float, *, iterations: int = 20) -> tuple[float, float]:
    """Gaussian-windowed centroid (SExtractor's XWIN/YWIN, ``sep.winpos``) of a centred stamp,
    relative to its central pixel."""
    img = np.asarray(image, dtype=np.float64)
    n = img.shape[0]
    g = np.arange(n, dtype=np.float64) - n // 2
    xc = yc = 0.0
    for _ in range(iterations):
        w = np.exp(-0.5 * ((g[None, :] - xc) ** 2 + (g[:, None] - yc) ** 2) / sigma**2)
        w = np.where((g[None, :] - xc) ** 2 + (g[:, None] - yc) ** 2 <= (4 * sigma) ** 2, w, 0.0) * img
        tot = w.sum()
        if not tot > 0:
            break
        nx_, ny_ = (w * g[None, :]).sum() / tot, (w * g[:, None]).sum() / tot
        # SExtractor's windowed update: twice the offset of the weighted mean
        dx, dy = 2.0 * (nx_ - xc), 2.0 * (ny_ - yc)
        xc, yc = xc + dx, yc + dy
        if abs(dx) < 1e-5 and abs(dy) < 1e-5:
            break
    return float(xc), float(yc)
