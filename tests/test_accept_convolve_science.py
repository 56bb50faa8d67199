"""Issue 16 acceptance, the template broader than the science (convolveScience): the tests of :mod:`acceptance_direction`."""
from __future__ import annotations

import pytest

from acceptance_direction import *  # noqa: F401,F403 - the tests, run here for this direction

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]


@pytest.fixture(scope="module")
def direction():
    return "science"
