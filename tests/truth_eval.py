"""Scoring a DiaSource catalogue against a simulation's truth table (shared by the acceptance tests).

Everything works from what the CLI writes (``truth.csv``, ``dia_sources.parquet``), so the same numbers
come out of a subprocess run and of an in-process one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MATCH_RADIUS = 2.0


def nearest(cat: pd.DataFrame, x, y):
    """Distance to and row position of the nearest catalogue entry of each (x, y)."""
    from scipy.spatial import cKDTree

    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    if len(cat) == 0:
        return np.full(len(x), np.inf), np.zeros(len(x), int)
    d, i = cKDTree(cat[["x", "y"]].to_numpy()).query(np.column_stack([x, y]))
    return d, i


def real(cat: pd.DataFrame) -> pd.DataFrame:
    return cat[~cat["sky_source"]].reset_index(drop=True)


@dataclass
class Score:
    n_bright: int  # transients with truth S/N ≥ 7
    completeness: float
    flux_ratio: float  # median psf_flux / truth difference_flux of the found ones
    n_false: int  # unexplained DiaSources away from bright stars
    false_rows: pd.DataFrame

    def __str__(self) -> str:
        return (f"{self.completeness:.3f} of {self.n_bright} transients (S/N ≥ 7), flux ratio {self.flux_ratio:.4f}, "
                f"{self.n_false} false positives")


def score(truth: pd.DataFrame, dia_sources: pd.DataFrame, *, sky_sigma: float, fwhm_max: float,
          psf_half: int = 12, min_snr: float = 7.0, bright_nsigma: float = 50.0) -> Score:
    """Completeness and flux of the transients, and the false positives, as the issues define them.

    * Found: a DiaSource within 2 px of a transient whose truth S/N in the difference is ≥ ``min_snr``.
    * Flux: median of ``psf_flux`` / the truth difference flux over the found ones.
    * False positives: DiaSources that are no injected truth (transients, negative transients and
      variables within 2 px; movers within 3 FWHM + 2 px of either epoch's position), farther than
      3 FWHM + the PSF stamp half-width from every star whose noiseless peak exceeds ``bright_nsigma``
      σ of the sky (saturated ones included), and not on a BAD column.
    """
    cat = real(dia_sources)
    tr = truth[truth["kind"] == "transient"]
    bright = tr[tr["snr_difference"].to_numpy() >= min_snr]
    d, i = nearest(cat, bright["x"], bright["y"])
    found = d <= MATCH_RADIUS
    ratio = (cat["psf_flux"].to_numpy()[i[found]] / bright["difference_flux"].to_numpy()[found]
             if found.any() else np.array([np.nan]))
    x, y = cat["x"].to_numpy(), cat["y"].to_numpy()
    explained = np.zeros(len(cat), bool)
    for _, t in truth[truth["kind"].isin(["transient", "negative_transient", "variable"])].iterrows():
        explained |= np.hypot(x - t["x"], y - t["y"]) <= MATCH_RADIUS
    for _, t in truth[truth["kind"] == "mover"].iterrows():
        r = 3 * fwhm_max + 2
        explained |= np.hypot(x - t["x"], y - t["y"]) <= r
        explained |= np.hypot(x - t["x_at_template_epoch"], y - t["y_at_template_epoch"]) <= r
    stars = truth[truth["kind"].isin(["star", "saturated_star"])]
    peak = stars["science_flux"].to_numpy() / (2 * np.pi * (stars["science_fwhm"].to_numpy() / 2.3548) ** 2)
    near = np.zeros(len(cat), bool)
    hot = stars[(peak > bright_nsigma * sky_sigma) | (stars["kind"] == "saturated_star").to_numpy()]
    for _, s in hot.iterrows():
        near |= np.hypot(x - s["x"], y - s["y"]) <= 3 * fwhm_max + psf_half
    on_bad = cat["pixel_flags_bad"].to_numpy() if "pixel_flags_bad" in cat else np.zeros(len(cat), bool)
    false = ~explained & ~near & ~on_bad
    return Score(n_bright=len(bright), completeness=float(found.mean()) if len(bright) else float("nan"),
                 flux_ratio=float(np.median(ratio)), n_false=int(false.sum()),
                 false_rows=cat.loc[false, ["x", "y", "peak_significance", "psf_flux", "footprint_area"]])
