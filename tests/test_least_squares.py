"""course_lib.attribution.least_squares (chapter 05's worked exercise) and lds.fixed_seed_replicate."""
import pytest
import torch

from course_lib import data as D, lds, settings
from course_lib.attribution import least_squares as LS

DT = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_exact_scores_equal_autodiff_through_the_run():
    prob = LS.problem(torch.logspace(0, -1, 4), n=30)
    jac = torch.autograd.functional.jacobian(lambda w: prob["x_t"] @ LS.gd_run(prob, w, 12)[-1],
                                             torch.ones(30, dtype=DT))
    exact, tracin = LS.scores(prob, 12)
    assert _rel(exact, jac) < 1e-10
    assert _rel(tracin, jac) > 0.01  # TracIn (products dropped) is not the derivative: the check can fail


def test_one_step_tracin_is_exact_and_long_runs_reach_their_limits():
    prob = LS.problem(torch.logspace(0, -0.5, 5), n=40)
    exact, tracin = LS.scores(prob, 1)
    assert torch.allclose(exact, tracin)  # no product to drop at T = 1
    influence, grad_dot = LS.at_optimum(prob)
    exact, tracin = LS.scores(prob, 5000)
    assert _rel(exact, influence) < 1e-3  # the geometric series sums to H^{-1}
    steps_eta = 5000 * prob["eta"]
    assert _rel(tracin / steps_eta, grad_dot) < 0.05  # TracIn grows like T eta times the gradient dot product


def test_fixed_seed_replicate_pairs_each_subset_with_its_perturbed_rerun(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    data = D.Data("toy", x[:30], y[:30], x[30:], y[30:], torch.arange(10), ("a", "b", "c"))
    cfg = settings.get("smoke", device="cpu", arch="mlp", width=4, depth=1, epochs=2, batch_size=10, gt_subsets=6,
                       ensemble_size=4)
    gt = lds.build_fixed_seed_ground_truth(cfg, data, 0.2, cache=tmp_path, progress=False)
    rep = lds.fixed_seed_replicate(cfg, data, gt, m=4, rel_change=1e-6, cache=tmp_path)
    assert rep.k == 2 and rep.m == 4 and torch.equal(rep.masks, gt.masks[:4])
    assert torch.equal(rep.outputs[:, 0], gt.outputs[:4, 0])
    # an MLP this small is smooth: a relative change of 1e-6 of every weight moves the margins by about 1e-6
    assert float((rep.outputs[:, 1] - rep.outputs[:, 0]).abs().max()) < 1e-3
    again = lds.fixed_seed_replicate(cfg, data, gt, m=4, rel_change=1e-6, cache=tmp_path)  # from the cache
    assert torch.equal(again.outputs, rep.outputs)
    with pytest.raises(ValueError, match="fixed-seed"):
        seed_avg = lds.GroundTruth(gt.masks, gt.outputs.repeat(1, 2, 1), gt.accuracy.repeat(1, 2), gt.target_idx,
                                   {"kind": "seed-averaged"}, 0.0)
        lds.fixed_seed_replicate(cfg, data, seed_avg, cache=tmp_path)
