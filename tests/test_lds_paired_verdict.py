"""lds.paired_verdict: a paired difference's interval in words (chapter 04's ensemble verdicts)."""
import numpy as np

from course_lib import lds


def _diff(lo, hi):
    return lds.Score((lo + hi) / 2, (lo, hi), np.zeros(3))


def test_interval_above_zero_is_a_ahead():
    assert lds.paired_verdict(_diff(0.02, 0.10), "EK-FAC", "TRAK") == "EK-FAC ahead"


def test_interval_below_zero_is_b_ahead():
    assert lds.paired_verdict(_diff(-0.10, -0.01), "EK-FAC", "TRAK") == "TRAK ahead"


def test_interval_covering_zero_tells_nothing_apart():
    assert lds.paired_verdict(_diff(-0.01, 0.05), "EK-FAC", "TRAK") == "not told apart"
    assert lds.paired_verdict(_diff(0.0, 0.05)) == "not told apart"  # a bound at 0 includes 0
    assert lds.paired_verdict(_diff(-0.05, 0.0)) == "not told apart"


def test_a_flipped_difference_flips_the_verdict():
    """Swapping the two methods negates the difference: a verdict that ignored the sign would not change."""
    d = _diff(0.01, 0.04)
    flipped = _diff(-0.04, -0.01)
    assert lds.paired_verdict(d, "x", "y") == "x ahead"
    assert lds.paired_verdict(flipped, "y", "x") == "x ahead"
