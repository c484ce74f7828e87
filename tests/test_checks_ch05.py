"""checks.check_same_seed (chapter 05's fixed-seed ground truths) passes matching seeds and fails another seed."""
import pytest

from course_lib import checks


def test_check_same_seed_passes_matching_seeds_and_fails_another():
    assert checks.check_same_seed([7, 7, 7], 7, "ground truths") == 3
    with pytest.raises(AssertionError, match="not all 7"):
        checks.check_same_seed([7, 8, 7], 7, "ground truths")
    with pytest.raises(AssertionError):  # nothing checked is not a pass
        checks.check_same_seed([], 7, "ground truths")
