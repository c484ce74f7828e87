"""Chapter 06's exercise references that return scores (course_lib.references.ch06): each equals the computation
written out, and the LDS-returning reference is the LDS of those scores."""
import torch

from course_lib import lds, models
from course_lib.attribution import trak
from course_lib.references import ch06 as X
from course_lib.train import Models


def _planted_gt(scores, m=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, scores.shape[0], generator=g) < 0.5
    outputs = (masks.double() @ scores.double())[:, None, :].float()
    return lds.GroundTruth(masks, outputs, torch.ones(m, 1), torch.arange(scores.shape[1]), {}, 0.0)


def test_with_r_scores_are_the_gauss_newton_weighted_solve():
    g = torch.Generator().manual_seed(2)
    phi = torch.randn(25, 5, generator=g, dtype=torch.float64)
    phi_t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q = torch.rand(25, generator=g, dtype=torch.float64) * 0.9 + 0.05
    kernel = phi.T @ torch.diag(q * (1 - q)) @ phi
    lam = 0.2 * torch.trace(kernel) / 5
    expected = phi @ torch.linalg.inv(kernel + lam * torch.eye(5, dtype=torch.float64)) @ phi_t.T * q[:, None]
    got = X.with_r_scores(phi, phi_t, q, 0.2)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    gt = _planted_gt(expected)
    assert X.with_r(phi, phi_t, q, 0.2, gt).mean == lds.lds(got, gt, part="eval").mean
    # without R (TRAK's kernel) the scores differ: a reference that dropped R would fail the first assertion
    assert not torch.allclose(trak.glm_influence(phi, phi_t, q, 0.2), expected, rtol=1e-3)


def test_loss_feature_scores_solve_the_kernel_of_the_loss_gradients():
    """On a logistic regression with the identity projection, the loss gradient of each example is -Q times its
    margin gradient (the chain rule of exercise 2); the reference solves the kernel of exactly those features."""
    g = torch.Generator().manual_seed(0)
    d, c, n, t = 6, 3, 40, 5
    x = torch.randn(n + t, 1, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n + t,), generator=g)
    net = models.LogisticRegression((1, d), c).double()
    params = {"linear.weight": torch.randn(1, c, d, generator=g, dtype=torch.float64),
              "linear.bias": torch.randn(1, c, generator=g, dtype=torch.float64)}
    ms = Models(net, params, {}, torch.arange(1), torch.ones(1, n, dtype=torch.bool))
    state = ms.state_of(0)
    p = c * d + c
    proj = trak.RandomProjection(p, p, "identity", dtype=torch.float64)
    got = X.loss_feature_scores(net, state, x[:n], y[:n], x[n:], y[n:], proj, damping=0.5)
    margin_tr = trak.featurize(net, state, x[:n], y[:n], proj)
    margin_t = trak.featurize(net, state, x[n:], y[n:], proj)
    q_tr = trak.out_to_loss(net, state, x[:n], y[:n]).double()
    q_t = trak.out_to_loss(net, state, x[n:], y[n:]).double()
    expected = trak.kernel_solve(-q_tr[:, None] * margin_tr, -q_t[:, None] * margin_t, 0.5)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_with_r_scores_stay_finite_when_q_is_exactly_0_or_1():
    """Exercise 6's reference never divides by sqrt(Q (1 - Q)): images with Q = 0 or 1 (weight 0 in the kernel) give
    finite scores, where a solution that divides by that factor without a clamp would give NaN."""
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(25, 5, generator=g, dtype=torch.float64)
    phi_t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    q = torch.rand(25, generator=g, dtype=torch.float64)
    q[:3] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    got = X.with_r_scores(phi, phi_t, q, 0.2)
    assert torch.isfinite(got).all()
    assert (got[[0, 2]] == 0).all()  # Q = 0: no influence
