"""Mask planes: LSST bit mapping, merging, description, unknown-plane messages."""
from __future__ import annotations

import numpy as np
import pytest

from diffim_dag.errors import InputError
from diffim_dag.masks import DEFAULT_MASK_PLANES, MASK_PLANE_DOCS, MaskPlanes


def test_default_bits_follow_lsst():
    mp = MaskPlanes()
    assert [mp[n] for n in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA")] == list(range(9))
    assert mp.bitmask("SAT") == 2 and mp.bitmask(["BAD", "NO_DATA"]) == 1 | 256
    assert set(MASK_PLANE_DOCS) == set(DEFAULT_MASK_PLANES)
    assert list(mp) == sorted(mp, key=mp.get)
    assert hash(mp) == hash(MaskPlanes(dict(reversed(list(DEFAULT_MASK_PLANES.items())))))


def test_with_plane_and_merged():
    mp = MaskPlanes({"BAD": 0, "SAT": 2})
    mp2 = mp.with_plane("NEW")
    assert mp2["NEW"] == 1 and mp.with_plane("BAD") is mp
    merged = mp.merged({"CR": 5, "SAT": 2})
    assert merged.as_dict() == {"BAD": 0, "SAT": 2, "CR": 5}
    with pytest.raises(InputError, match="'SAT' is bit 2 in one input and bit 3") as exc:
        mp.merged({"SAT": 3})
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="share bit"):
        mp.merged({"OTHER": 0})


def test_invalid_planes():
    for planes in ({"A": 31}, {"A": -1}, {"": 1}, {"A": 1, "B": 1}, {"A": 1.5}):
        with pytest.raises(InputError) as exc:
            MaskPlanes(planes)
        assert "\n" not in str(exc.value)


def test_describe_fractions():
    mp = MaskPlanes()
    m = np.zeros((10, 10), np.int32)
    m[:2] |= mp.bitmask("SAT")
    m[:5, 0] |= mp.bitmask(["SAT", "CR"])
    d = mp.describe(m)
    assert d["SAT"] == pytest.approx(23 / 100) and d["CR"] == pytest.approx(5 / 100) and d["BAD"] == 0
    assert set(d) == set(mp)


def test_unknown_plane_message():
    with pytest.raises(InputError) as exc:
        MaskPlanes().bitmask("BADD")
    msg = str(exc.value)
    assert "unknown mask plane 'BADD'" in msg and "did you mean 'BAD'" in msg and "\n" not in msg
    with pytest.raises(InputError, match="'ZZZZZZ'"):
        MaskPlanes().bitmask(["SAT", "ZZZZZZ"])


def test_describe_counts_each_plane_in_blocks():
    """The fractions are those of the whole-frame expression, across block boundaries (more than 2²⁰ pixels)."""
    rng = np.random.default_rng(3)
    mask = rng.integers(0, 1 << 12, size=(1100, 1000)).astype(np.int32)
    planes = MaskPlanes(DEFAULT_MASK_PLANES)
    expected = {name: float(np.count_nonzero(mask & (1 << bit))) / mask.size for name, bit in planes.as_dict().items()}
    assert planes.describe(mask) == expected
    assert set(planes.describe(np.zeros((0, 4), np.int32)).values()) == {0.0}
