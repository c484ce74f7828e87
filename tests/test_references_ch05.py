"""Chapter 05's exercise references (course_lib.references.ch05), on small planted inputs."""
import pytest
import torch

from course_lib import settings, train
from course_lib.attribution import least_squares, source, unroll
from course_lib.references import ch05 as X

DT = torch.float64


def _walk(toy, momentum):
    cfg = settings.get("smoke", device="cpu", arch="mlp", width=4, depth=1, epochs=2, batch_size=8, lr=0.1,
                       momentum=momentum, weight_decay=0.01)
    traj = train.record_training(cfg, toy, 3, dtype=DT)
    args = (toy.x_train.to(DT), toy.y_train, toy.x_targets.to(DT), toy.y_targets)
    return traj, args, unroll.unrolled_scores(traj, *args).scores


def test_walk_without_momentum_is_exact_only_without_momentum(toy):
    js = torch.tensor([0, 5, 11])
    traj, args, exact = _walk(toy, 0.0)  # planted: the exact scores stand in for the finite differences
    assert X.walk_without_momentum(traj, *args, js, exact[js]) < 1e-12
    traj, args, exact = _walk(toy, 0.9)  # with momentum, forgetting it in the walk is a large error
    assert X.walk_without_momentum(traj, *args, js, exact[js]) > 0.1


def test_filter_peak_is_the_maximum_of_the_closed_form():
    x = X.filter_peak()
    f = lambda v: (1 - torch.exp(-v)) * (1 + v) / v  # the ratio written out, independent of source.py
    grid = torch.linspace(0.5, 5, 90_001, dtype=DT)
    assert abs(x - float(grid[f(grid).argmax()])) < 1e-3
    assert 1.79 < x < 1.80 and abs(float(source.damping_ratio(torch.tensor([x]), 1.0)) - 1.2985) < 1e-3
    # a grid that misses the peak gives its edge: the reference follows its grid
    assert X.filter_peak(lo=3.0, hi=4.0, n=101) == pytest.approx(3.0)


def test_isotropic_tracin_compares_with_the_given_value():
    got = X.isotropic_tracin(0.0, 300)
    exact, tracin = least_squares.scores(least_squares.problem(torch.ones(10)), 300)
    assert got["isotropic"] > 0.9  # H close to c I: TracIn ranks nearly as the exact derivative
    assert got["answer"] == "higher"
    assert X.isotropic_tracin(1.0, 300)["answer"] == "lower"  # a perfect table value cannot be beaten


def test_rank_agreement_is_the_mean_per_target_spearman():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g, dtype=DT)
    assert X.rank_agreement(a, 3 * a + 1) == pytest.approx(1.0)  # monotone copies rank alike
    assert X.rank_agreement(a, -a) == pytest.approx(-1.0)
    b = a.clone()
    b[:, 0] = -b[:, 0]  # one target reversed out of four: (1 + 1 + 1 - 1) / 4
    assert X.rank_agreement(a, b) == pytest.approx(0.5)
