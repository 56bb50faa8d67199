"""How a stage's tiles and cells run, handed to the stage by its caller (stages never import the execution layer).

A stage with tiled work (ZOGY's cells, the pre-convolution score's filters and convolution) takes a
``runner``: an object with

``map(function, tasks, *, prefix)``
    ``[function(t) for t in tasks]``, wherever it runs (the results in task order);
``threads``
    how many tasks run at once (ZOGY submits twice as many cells per batch);
``distributed``
    whether the tasks run on a cluster's workers (then a tile uses one FFT thread);
``filter(image, kernel, *, xy0)``
    ``image ⊗ kernel`` with a reflected border (float32);
``convolve_difference(science, template, solution, *, kernel_sum, xy0, skip_bits, **common)``
    ``science − template ⊗ K`` as :func:`~diffim_dag.stages.subtract.combine_tile` defines it, for
    ``(image, variance, mask)`` triples; returns ``(difference, variance, mask)``.

:class:`InTurn` (here) runs everything in this thread on the whole image; the execution layer's
:class:`diffim_dag.graph.TileRunner` runs the same functions as Dask tasks of one tile each (tiled equals
untiled is tested at the kernel level and for each method).
"""
from __future__ import annotations

import numpy as np

from . import subtract as st
from .inputs import eager_convolve

__all__ = ["InTurn", "IN_TURN"]


class InTurn:
    """Every task in this thread, in turn; filters and convolutions on the whole image at once."""

    distributed = False
    threads = 1

    def map(self, function, tasks, *, prefix: str = "task"):
        return [function(t) for t in tasks]

    def filter(self, image, kernel, *, xy0):
        return st.apply_small_kernel_padded(image, kernel).astype(np.float32, copy=False)

    def convolve_difference(self, science, template, solution, *, kernel_sum, xy0, skip_bits: int, **common):
        conv = eager_convolve(template, solution, xy0=xy0, skip_bits=skip_bits)
        return st.combine_tile(*science, *conv, solution, kernel_sum, origin=xy0, xy0=xy0, **common)


#: The runner of a stage called without one.
IN_TURN = InTurn()
