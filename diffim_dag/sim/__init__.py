r"""Simulated science/template pairs with a truth table of everything injected.

:func:`simulate_pair` renders two exposures of the same patch of sky:

* **Field stars** at uniform random positions with a truncated power-law flux
  distribution :math:`dN/dF \propto F^{-a}` on :math:`[F_\mathrm{min}, F_\mathrm{max}]`,
  drawn by inverting the cumulative distribution,

  .. math::  F = \left[F_\mathrm{min}^{1-a} + u\,(F_\mathrm{max}^{1-a} - F_\mathrm{min}^{1-a})\right]^{1/(1-a)},
             \qquad u \sim U(0, 1)

  (log-uniform when :math:`a = 1`).
* **PSFs** that vary across the image (:class:`~diffim_dag.psf.VaryingPsf`,
  Gaussian or Moffat): with :math:`u, v \in [-1, 1]` spanning the image edges,
  :math:`\mathrm{FWHM}(u, v) = c_0\,[1 + \tfrac{g}{4}(u + v)]`, so the FWHM changes
  by the fraction :math:`g` from one corner to the opposite one.
* **Sky** with a linear gradient,
  :math:`B(u, v) = B_0\,[1 + \tfrac12 (g_x u + g_y v)]`, optionally subtracted
  from the written image (the noise keeps the sky's Poisson term).
* **Noise**: the expected counts :math:`E = B + S` (sky plus sources) are drawn
  as Poisson electrons with gain :math:`g` (e⁻/count) plus Gaussian read noise
  :math:`R` (e⁻), :math:`I = [\mathrm{Poisson}(gE) + \mathcal N(0, R^2)] / g`;
  the variance plane is the *truth* variance :math:`V = E/g + (R/g)^2` counts².
* **Template**: the same sources, their counts divided by the photometric ratio
  ``flux_scale`` :math:`\kappa` (:math:`F_\mathrm{sci} = \kappa F_\mathrm{tmp}`), on a
  pixel grid shifted by ``template_offset`` :math:`(\delta_x, \delta_y)` — a source
  at science pixel :math:`(x, y)` lies at template pixel :math:`(x + \delta_x, y + \delta_y)`
  and the template WCS says so (:math:`\mathrm{CRPIX}_t = \mathrm{CRPIX}_s + \delta`).
  A deeper template (noise factor :math:`f < 1`) is modelled as an image with
  effective gain :math:`g_t = g / f^2` and read noise :math:`R_t = R / f`, so
  every noise term scales by :math:`f` while Poisson statistics stay exact.
* **Injected truths**: transients (science only), negative transients (template
  only, negative in the difference), variable stars (flux × r between epochs),
  moving objects (1–3 px between epochs: dipoles in the difference), cosmic rays
  (science only, 1–4 sharp pixels), saturated stars (clipped at ``saturation``
  and flagged ``SAT``) and bad columns (junk values flagged ``BAD``).

Transients, variables and movers are kept farther than :math:`3\,\mathrm{FWHM}_\max + 10`
px (plus the largest motion) from each other and from the image edges, and
farther than that plus the 5σ radius of every saturated star and of every field
star whose peak is above 5σ of the sky, so later detection tests have clean
truths.  Field stars can be anywhere.

Every random stream is a child of ``numpy.random.SeedSequence(seed)`` (one per
component), so the same seed gives identical bytes and changing one count does
not move the field stars.

Sources are rendered as small flux-normalized stamps
(:meth:`~diffim_dag.psf.Psf.kernel_image`), never as full-image evaluations,
and the noise is drawn in fixed blocks of rows, so 8192² images need only a few
float32 planes of memory.
"""
from .config import TRUTH_COLUMNS, TRUTH_KINDS, SimConfig
from .pair import SimulatedPair, simulate_pair
from .render import add_sources, from_template, power_law_fluxes, sky_model, template_mapping, to_template
from .write import LAYOUTS, write_pair

__all__ = [
    "SimConfig",
    "SimulatedPair",
    "TRUTH_COLUMNS",
    "TRUTH_KINDS",
    "LAYOUTS",
    "simulate_pair",
    "write_pair",
    "template_mapping",
    "to_template",
    "from_template",
    "add_sources",
    "sky_model",
    "power_law_fluxes",
]
