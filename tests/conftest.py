"""Shared fixtures: the real-data folder beside the repository (skipped when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIFFIM_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--acceptance", action="store_true", default=False,
                     help="also run the acceptance tier (tests marked 'acceptance': 40-visit batches, killed "
                          "workers, notebooks, the no-flag CLI runs on simulated pairs; 'slow': images larger than "
                          "512²; 'realdata': ../shared/data); .ci/run and the README's test command do")


#: Markers of the tests outside the fast tier: the end-to-end runs, the larger (> 512²) simulated images, the
#: real images of ../shared/data.
OUTSIDE_FAST_TIER = ("acceptance", "slow", "realdata")


def pytest_collection_modifyitems(config, items):
    """The fast tier by default (analytic fixtures, ≤ 512²): tests marked ``acceptance``, ``slow`` or ``realdata``
    are deselected unless ``--acceptance`` is given."""
    if config.getoption("--acceptance"):
        return
    keep, drop = [], []
    for item in items:
        (drop if any(item.get_closest_marker(m) for m in OUTSIDE_FAST_TIER) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests that use it are skipped cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(12345)
