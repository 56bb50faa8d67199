"""Writing a simulated pair as FITS files (LSST layout or plain images) with its truth table."""
from __future__ import annotations

import os
from pathlib import Path


from ..errors import InputError
from ..io.atomic import atomic_path
from .pair import SimulatedPair

LAYOUTS = ("lsst", "plain")


def write_pair(pair: SimulatedPair, out_dir: str | os.PathLike, *, overwrite: bool = True, layout: str = "lsst",
               psf: bool = True, keywords: bool = True) -> dict[str, Path]:
    """Write ``science.fits``, ``template.fits`` and ``truth.csv`` atomically.

    Parameters
    ----------
    layout : {"lsst", "plain"}
        ``"lsst"``: LSST-layout MEF (IMAGE, MASK, VARIANCE and, with ``psf``, PSF).  ``"plain"``: what a
        telescope archive serves — one float32 image in the primary HDU with its WCS, nothing else (no
        variance, mask or PSF; masked pixels keep their values, saturated ones their clipped level).
    psf : bool
        ``"lsst"``: write the PSF extension.  ``"plain"``: write the true PSF models beside the images
        as ``science_psf.fits`` / ``template_psf.fits`` (for ``--science-psf`` / ``--template-psf``).
    keywords : bool
        Write GAIN, RDNOISE, SATURATE and MAGZERO (and the other metadata).  Off: the header holds the
        WCS, the exposure time and the date only, as for an uncalibrated frame.

    Returns
    -------
    dict
        ``{"science": path, "template": path, "truth": path}``.  Same pair and options → identical bytes.
    """
    from ..io.fits import write_exposure, write_plain_image, write_psf

    if layout not in LAYOUTS:
        raise InputError(f"write_pair: layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"science": out / "science.fits", "template": out / "template.fits", "truth": out / "truth.csv"}
    if not overwrite:
        for p in paths.values():
            if p.exists():
                raise InputError(f"{p}: exists (overwrite=False)")
    for role in ("science", "template"):
        exposure = getattr(pair, role)
        if not keywords:
            info = exposure.info
            exposure = exposure.with_attrs(info=type(info)(exposure_time=info.exposure_time, date_obs=info.date_obs,
                                                           mjd_obs=info.mjd_obs))
        if layout == "plain":
            write_plain_image(exposure, paths[role], overwrite=overwrite)
            if psf and exposure.psf is not None:
                paths[f"{role}_psf"] = write_psf(exposure.psf, out / f"{role}_psf.fits", overwrite=overwrite)
        else:
            if not psf:
                exposure = exposure.with_attrs(psf=None)
            write_exposure(exposure, paths[role], overwrite=overwrite)
    with atomic_path(paths["truth"]) as tmp:
        pair.truth.to_csv(tmp, index=False, lineterminator="\n")
    return paths
