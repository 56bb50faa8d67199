"""Issue 16 acceptance: the convolveTemplate pair with the template's grid offset by 40 px and rotated by 1°
(its WCS says so), plain FITS, no PSF: warped onto the science grid, then the same criteria."""
from __future__ import annotations

import pytest

from acceptance import assert_user_criteria, make_pair, subtract

pytestmark = [pytest.mark.slow, pytest.mark.acceptance]


def test_rotated_offset_template_no_flags(tmp_path):
    pair = make_pair(tmp_path / "pair", "template", template_offset=(40.0, 0.0), template_rotation=1.0)
    run = subtract(pair, tmp_path / "out")
    assert run.metrics["template"]["warped"] and run.metrics["template"]["registration"] == "wcs"
    assert run.metrics["template"]["coverage"] > 0.9
    assert_user_criteria(run)
