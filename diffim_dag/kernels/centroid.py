"""Gaussian-windowed centroids (SExtractor's XWIN/YWIN, ``sep.winpos``) of centred stamps: pure numerics."""
from __future__ import annotations

import numpy as np

__all__ = ["window_centroid", "window_centroids"]


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


def window_centroids(stamps: np.ndarray, sigma: float, *, iterations: int = 20) -> np.ndarray:
    """:func:`window_centroid` of each of ``stamps`` (``(n, m, m)``, each centred), all at once: ``(n, 2)`` of
    ``x, y`` offsets from the central pixel.  Each stamp iterates until its own step is below 10⁻⁵ px (or its
    window holds no positive sum), as it would alone."""
    st = np.asarray(stamps, dtype=np.float64)
    n, m = st.shape[0], st.shape[1]
    g = np.arange(m, dtype=np.float64) - m // 2
    xc, yc = np.zeros(n), np.zeros(n)
    live = np.arange(n)
    for _ in range(iterations):
        if not live.size:
            break
        ux = g[None, None, :] - xc[live, None, None]
        uy = g[None, :, None] - yc[live, None, None]
        r2 = ux * ux + uy * uy
        w = np.where(r2 <= (4 * sigma) ** 2, np.exp(-0.5 * r2 / sigma**2), 0.0) * st[live]
        tot = w.sum((1, 2))
        ok = tot > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            dx = 2.0 * ((w * g[None, None, :]).sum((1, 2)) / tot - xc[live])
            dy = 2.0 * ((w * g[None, :, None]).sum((1, 2)) / tot - yc[live])
        step = live[ok]
        xc[step] += dx[ok]
        yc[step] += dy[ok]
        live = step[(np.abs(dx[ok]) >= 1e-5) | (np.abs(dy[ok]) >= 1e-5)]
    return np.column_stack([xc, yc])
