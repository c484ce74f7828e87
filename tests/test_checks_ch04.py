"""checks.check_paired_gain (chapter 04's ensemble check) passes a real gain and fails a flat or reversed one."""
import numpy as np
import pytest
import torch

from course_lib import checks, lds
from course_lib.lds import GroundTruth


def _planted(n=80, m=120, T=6, seed=0):
    """A planted ground truth whose true linear datamodel is w (with noise), and a noisy copy of w."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = (masks.double() @ w + 2.0 * torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
    gt = GroundTruth(masks, outputs.float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
    return gt, w, w + 3.0 * torch.randn(n, T, generator=g, dtype=torch.float64)


def test_check_paired_gain_passes_a_gain_and_fails_a_flat_or_reversed_one():
    gt, w, noisy = _planted()
    assert checks.check_paired_gain(lds.lds_difference(w, noisy, gt), "true minus noisy") > 0
    with pytest.raises(AssertionError, match="does not lie above 0"):  # flat: a method against itself
        checks.check_paired_gain(lds.lds_difference(noisy, noisy, gt), "flat")
    with pytest.raises(AssertionError):  # reversed
        checks.check_paired_gain(lds.lds_difference(noisy, w, gt), "reversed")
    with pytest.raises(AssertionError):  # a gain that does not clear a larger bound
        checks.check_paired_gain(lds.lds_difference(w, noisy, gt), "too small", bound=0.99)
    nan = lds.Score(float("nan"), (float("nan"), float("nan")), np.array([]))
    with pytest.raises(AssertionError):
        checks.check_paired_gain(nan, "NaN")
