"""Chapter 03's exercise references (course_lib.references.ch03), on small planted inputs."""
import math

import pytest
import torch

from course_lib.references import ch03


def test_gradient_factor_ok_accepts_the_right_factor_only():
    assert ch03.gradient_factor_ok(lambda p: p * (1 - p))
    assert ch03.gradient_factor_ok(lambda p: p - p ** 2)
    for wrong in (lambda p: 0.25, lambda p: p, lambda p: 1 - p, lambda p: p ** 2, lambda p: 0.21,
                  lambda p: 2 * p * (1 - p)):
        assert not ch03.gradient_factor_ok(wrong)
    with pytest.raises(TypeError):
        ch03.gradient_factor_ok(0.25)  # a number, not a function: exercises.check reports the error


def test_kept_share_counts_weights_kept_with_their_sign():
    before = torch.tensor([[1.0, 0.0], [-2.0, 3.0], [0.0, -1.0], [0.5, 0.0]])  # 5 non-zero weights
    after = torch.tensor([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0], [0.1, 0.0]])     # kept with sign: (0,0), (1,1), (3,0)
    assert ch03.kept_share(before, after) == pytest.approx(3 / 5)
    assert ch03.kept_share(before, before) == 1.0
    assert ch03.kept_share(before, -before) == 0.0           # a flipped sign does not count as kept
    assert ch03.kept_share(before, torch.zeros(4, 2)) == 0.0
    assert math.isnan(ch03.kept_share(torch.zeros(4, 2), after))  # nothing found before: no share
    with pytest.raises(ValueError):
        ch03.kept_share(before, after[:, :1])
