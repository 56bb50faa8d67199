"""Named mask planes (bit fields) with LSST's names and meanings.

A mask pixel is an ``int32`` bit field.  The mapping from plane name to bit
number travels with every exposure (``Exposure.mask_planes``) and is written to
FITS as ``MP_<NAME> = bit`` keywords, exactly as ``lsst.afw.image.Mask`` does.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .errors import InputError

__all__ = [
    "DEFAULT_MASK_PLANES",
    "MASK_PLANE_DOCS",
    "MASK_DTYPE",
    "MaskPlanes",
]

MASK_DTYPE = np.int32

#: LSST's default planes, in LSST's default bit order, then the diffim planes.
DEFAULT_MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "CROSSTALK": 9,
    "NOT_DEBLENDED": 10,
    "UNMASKEDNAN": 11,
    "SAT_TEMPLATE": 12,
    "INJECTED": 13,
    "INJECTED_TEMPLATE": 14,
    "HIGH_VARIANCE": 15,
    "STREAK": 16,
    "CLIPPED": 17,
    "SENSOR_EDGE": 18,
    "VIGNETTED": 19,
}

MASK_PLANE_DOCS: dict[str, str] = {
    "BAD": "bad pixel (defect, hot or dead)",
    "SAT": "saturated pixel",
    "INTRP": "value interpolated over",
    "CR": "cosmic ray",
    "EDGE": "too close to the edge to be processed (e.g. kernel half-width after convolution)",
    "DETECTED": "inside a positive detection footprint",
    "DETECTED_NEGATIVE": "inside a negative detection footprint",
    "SUSPECT": "value suspect (e.g. near saturation, non-linear)",
    "NO_DATA": "no data at this pixel (e.g. no template coverage)",
    "CROSSTALK": "crosstalk-corrected",
    "NOT_DEBLENDED": "footprint too large to deblend",
    "UNMASKEDNAN": "NaN not otherwise masked",
    "SAT_TEMPLATE": "saturated in the template",
    "INJECTED": "synthetic source injected here",
    "INJECTED_TEMPLATE": "synthetic source injected in the template",
    "HIGH_VARIANCE": "variance much higher than typical",
    "STREAK": "satellite or meteor streak",
    "CLIPPED": "clipped in coaddition",
    "SENSOR_EDGE": "near the edge of the sensor",
    "VIGNETTED": "vignetted",
}

_MAX_BITS = 31  # int32, sign bit kept clear


class MaskPlanes(Mapping[str, int]):
    """An immutable name → bit-number mapping for an ``int32`` mask.

    Parameters
    ----------
    planes : mapping of str to int, optional
        Plane names and their bit numbers.  Defaults to :data:`DEFAULT_MASK_PLANES`.
    """

    __slots__ = ("_planes",)

    def __init__(self, planes: Mapping[str, int] | None = None):
        planes = dict(DEFAULT_MASK_PLANES if planes is None else planes)
        seen: dict[int, str] = {}
        for name, bit in planes.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"mask plane name {name!r} is not a non-empty string")
            if int(bit) != bit or not 0 <= int(bit) < _MAX_BITS:
                raise InputError(f"mask plane {name!r} has bit {bit!r}; bits must be integers in [0, {_MAX_BITS})")
            if int(bit) in seen:
                raise InputError(f"mask planes {seen[int(bit)]!r} and {name!r} share bit {bit}")
            seen[int(bit)] = name
        self._planes = {k: int(v) for k, v in sorted(planes.items(), key=lambda kv: kv[1])}

    def __getitem__(self, name: str) -> int:
        return self._planes[name]

    def __iter__(self):
        return iter(self._planes)

    def __len__(self) -> int:
        return len(self._planes)

    def __repr__(self) -> str:
        return f"MaskPlanes({self._planes})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._planes) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._planes.items()))

    def bitmask(self, names: str | Iterable[str]) -> int:
        """Return the OR of the bit values of ``names``.

        Raises
        ------
        InputError
            If a name is not a known plane; the message names it and the closest known plane.
        """
        if isinstance(names, str):
            names = [names]
        value = 0
        for name in names:
            if name not in self._planes:
                raise InputError(unknown_plane_message(name, self._planes))
            value |= 1 << self._planes[name]
        return value

    def with_plane(self, name: str) -> MaskPlanes:
        """Return a mapping that also holds ``name`` (on the lowest free bit)."""
        if name in self._planes:
            return self
        used = set(self._planes.values())
        free = next(b for b in range(_MAX_BITS) if b not in used)
        return MaskPlanes({**self._planes, name: free})

    def merged(self, other: Mapping[str, int]) -> MaskPlanes:
        """Union of two mappings; raises if the same name has different bits."""
        planes = dict(self._planes)
        for name, bit in other.items():
            if name in planes and planes[name] != bit:
                raise InputError(f"mask plane {name!r} is bit {planes[name]} in one input and bit {bit} in the other")
            planes[name] = bit
        return MaskPlanes(planes)

    def as_dict(self) -> dict[str, int]:
        return dict(self._planes)

    def describe(self, mask: np.ndarray) -> dict[str, float]:
        """Fraction of pixels with each plane set.

        Counted in blocks of ~1 Mpix rows, each block's ``mask & bit`` in one reused buffer: a whole-frame test
        per plane made a 64 MB temporary of fresh pages for each plane present in a 4096² int32 mask."""
        mask = np.asarray(mask)
        n = max(mask.size, 1)
        present = int(np.bitwise_or.reduce(mask, axis=None)) if mask.size else 0  # one pass: the bits set at all
        counts = {name: 0 for name, bit in self._planes.items() if present & (1 << bit)}
        if counts:
            flat = mask.reshape(-1)
            step = 1 << 20
            buf = np.empty(min(step, flat.size), dtype=mask.dtype)
            for start in range(0, flat.size, step):
                block = flat[start:start + step]
                out = buf[:block.size]
                for name in counts:
                    np.bitwise_and(block, mask.dtype.type(1 << self._planes[name]), out=out)
                    counts[name] += int(np.count_nonzero(out))
        return {name: counts[name] / n if name in counts else 0.0 for name in self._planes}


def unknown_plane_message(name: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown mask plane {name!r}{hint} (known planes: {', '.join(known)})"
