"""WCS ↔ FITS header helpers that round-trip bit-exactly and handle a parent-frame origin.

Exposures keep their WCS in the *parent* frame (0-based pixel ``(x, y)`` of the
parent image).  Files hold the standard local-frame WCS (CRPIX shifted by
``xy0``) so that any FITS viewer shows the right sky, plus a ``DDWCS`` card
with the exact parent-frame numbers (repr precision), because FITS header
formatting keeps only ~13–16 significant digits.
"""
from __future__ import annotations

import copy
import json
import re
import warnings

from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

if TYPE_CHECKING:
    from astropy.wcs import WCS  # (imported where a header has a WCS: astropy.wcs brings astropy.coordinates,
    #                               0.24 s of start-up that a frame without one does not need)

#: Keywords of the alternate WCS 'A' (FITS WCS papers I–III), e.g. CRPIX1A, CD1_2A, PV2_1A, WCSNAMEA.
_ALT_A_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|CRPIX\d+|CRVAL\d+|CTYPE\d+|CUNIT\d+|CDELT\d+|CROTA\d+|CRDER\d+|CSYER\d+|CNAME\d+"
    r"|PC\d+_\d+|CD\d+_\d+|PV\d+_\d+|PS\d+_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|RESTFRQ|RESTWAV|SPECSYS"
    r"|SSYSOBS|SSYSSRC|VELOSYS|ZSOURCE|VELANGL|MJDREF|DATEREF|TIMESYS)A$"
)
_PRIMARY_CTYPE = re.compile(r"^CTYPE\d+$")

__all__ = ["wcs_exact_state", "apply_exact_state", "wcs_to_header", "wcs_from_header", "wcs_equal"]


def wcs_exact_state(wcs: WCS) -> dict:
    """The numbers that define a celestial WCS, as JSON-able exact floats."""
    w = wcs.wcs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "cdelt will be ignored since cd is present"
        cdelt = [float(v) for v in w.cdelt]
    state = {
        "crpix": [float(v) for v in w.crpix],
        "crval": [float(v) for v in w.crval],
        "cdelt": cdelt,
        "ctype": list(w.ctype),
        "pv": [[int(i), int(m), float(v)] for i, m, v in w.get_pv()],
    }
    if w.has_cd():
        state["cd"] = [[float(v) for v in row] for row in w.cd]
    else:
        state["pc"] = [[float(v) for v in row] for row in w.get_pc()]
    if wcs.sip is not None:
        state["sip"] = {
            k: (None if getattr(wcs.sip, k) is None else np.asarray(getattr(wcs.sip, k)).tolist())
            for k in ("a", "b", "ap", "bp")
        }
    return state


def apply_exact_state(wcs: WCS, state: dict) -> WCS:
    """Overwrite a WCS's numbers with an exact state (from :func:`wcs_exact_state`)."""
    w = wcs.wcs
    w.crpix = state["crpix"]
    w.crval = state["crval"]
    if "cd" in state:
        w.cd = state["cd"]
        if w.has_pc():
            # A header-built WCS may also hold (rounded) PCi_j/CDELTi cards, and wcslib then
            # computes with PC × CDELT, not CD: make those the exact CD too (× 1.0 is exact).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "cdelt will be ignored since cd is present"
                w.pc = state["cd"]
                w.cdelt = [1.0] * len(state["cd"])
    else:
        w.pc = state["pc"]
        w.cdelt = state["cdelt"]
    if state.get("pv"):
        w.set_pv([tuple(p) for p in state["pv"]])
    if state.get("sip") and wcs.sip is not None:
        from astropy.wcs import Sip

        s = state["sip"]
        arr = lambda k: None if s.get(k) is None else np.asarray(s[k], dtype=np.float64)  # noqa: E731
        wcs.sip = Sip(arr("a"), arr("b"), arr("ap"), arr("bp"), wcs.wcs.crpix)
    w.set()
    return wcs


def shifted(wcs: WCS, dx: float, dy: float) -> WCS:
    """A copy whose pixel frame is shifted: new pixel = old pixel + (dx, dy)."""
    out = copy.deepcopy(wcs)
    out.wcs.crpix = out.wcs.crpix + np.array([dx, dy])
    if out.sip is not None:
        from astropy.wcs import Sip

        out.sip = Sip(out.sip.a, out.sip.b, out.sip.ap, out.sip.bp, out.wcs.crpix)
    out.wcs.set()
    return out


def wcs_to_header(wcs: WCS, xy0: tuple[int, int] = (0, 0)) -> fits.Header:
    """Local-frame FITS WCS cards (CRPIX shifted by -xy0) plus the exact parent-frame state in ``DDWCS``."""
    local = shifted(wcs, -xy0[0], -xy0[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = local.to_header(relax=True)
    for key in ("MJDREF", "DATE-OBS", "MJD-OBS", "DATEREF"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header["DDWCS"] = (json.dumps(wcs_exact_state(wcs), separators=(",", ":")), "diffim_dag exact parent-frame WCS")
    return header


def wcs_from_header(header: fits.Header, xy0: tuple[int, int] = (0, 0), *, source: str = "header") -> WCS | None:
    """Parent-frame WCS from a header (None when the header has no celestial WCS)."""
    h = header.copy()
    exact = h.get("DDWCS")
    h.remove("DDWCS", ignore_missing=True, remove_all=True)
    # the alternate 'A' (PHYSICAL) WCS carries the origin only: drop every alternate-A WCS card
    for key in list(h.keys()):
        if _ALT_A_KEY.match(key):
            h.remove(key, ignore_missing=True, remove_all=True)
    if not any(_PRIMARY_CTYPE.match(k) for k in h.keys()):
        return None
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            wcs = WCS(h, naxis=2, relax=True, fix=True)
        except Exception as exc:  # astropy raises several types for malformed WCS
            from ..errors import InputError

            raise InputError(f"{source}: cannot parse the WCS keywords ({exc})") from None
    if not wcs.has_celestial:
        return None
    wcs = shifted(wcs, xy0[0], xy0[1])
    if exact:
        try:
            state = json.loads(exact)
        except ValueError:
            state = None
        # the exact numbers only where the cards still say the same (an edited header wins)
        if (state is not None and np.allclose(state["crpix"], wcs.wcs.crpix, rtol=0, atol=1e-6)
                and np.allclose(state["crval"], wcs.wcs.crval, rtol=0, atol=1e-9)):
            apply_exact_state(wcs, state)
    return wcs


def wcs_equal(a: WCS | None, b: WCS | None) -> bool:
    """Exact equality of the defining numbers of two WCSs."""
    if a is None or b is None:
        return a is b
    return wcs_exact_state(a) == wcs_exact_state(b)
