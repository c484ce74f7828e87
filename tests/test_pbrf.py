"""Chapter 01: the proximal Bregman response function (PBRF) that damped Gauss-Newton influence functions estimate.

Tiny smooth (tanh) MLP, 103 parameters, 60 examples, float64: the exact Gauss-Newton matrix is explicit, so every
first-order statement about the PBRF is checked against a closed form. (ReLU networks make the PBO only piecewise
smooth, so their Newton iterations can stall at a kink; the tests use tanh to check the mathematics, not the kinks.)
"""
import pytest
import torch
from torch import nn

from course_lib import grads
from course_lib.attribution import ekfac, influence as inf, pbrf

N, WD, LAM = 60, 0.01, 0.01


class _Tiny(nn.Module):
    def __init__(self, d=6, width=10, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, width), nn.Tanh())
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    net = _Tiny().double()
    init = {k: v.detach() for k, v in net.named_parameters()}
    # theta_s: trained, but only roughly (the PBRF does not need a minimum)
    theta = inf.fit_convex(net, init, x, y, WD, max_iter=60, tol=1e-6)
    G = ekfac.gnh(net, theta, x).double()  # exact (1/n) sum J^T H_out J, no weight decay
    return net, theta, x, y, G


def _delta(res, theta, k=0):
    return grads.flatten({n: v[k] for n, v in res.params.items()}) - grads.flatten(theta)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_pbrf_linearises_to_the_damped_gauss_newton_influence(tiny):
    """(theta_pbrf(w) - theta_s) / eps -> (1/n) (G + (wd + lambda) I)^{-1} grad L_m for a removed weight w = eps/n.

    First-order condition of F_w at its minimiser: (G + (wd + lambda) I) delta - w grad L_m + O(w^2) = 0, so delta =
    w (G + (wd + lambda) I)^{-1} grad L_m + O(w^2): removing an example moves theta along +A^{-1} grad L_m (Grosse et
    al. 2023, Eq. 9 with eps_paper = -w). The relative error must shrink linearly with eps."""
    net, theta, x, y, G = tiny
    m = 7
    g_m = grads.per_example_grads(net, theta, x[m:m + 1], y[m:m + 1], "loss")[0]
    A = G + (WD + LAM) * torch.eye(len(G), dtype=torch.float64)
    predicted = torch.linalg.solve(A, g_m) / N
    errs = {}
    for eps in (1e-1, 1e-2, 1e-3):
        res = pbrf.pbrf_response(net, theta, x, y, [m], weight_decay=WD, damping=LAM, weight=eps / N, tol=1e-10)
        assert bool(res.converged.all()) and res.relative_grad_norm.max() <= 1e-10
        errs[eps] = _rel(_delta(res, theta) / eps, predicted)
    assert errs[1e-3] < 1e-3, errs
    assert errs[1e-1] > 5 * errs[1e-2] > 25 * errs[1e-3], errs  # O(eps): the error is the second-order term
    # the weight decay is part of the proximity: without it in A the prediction is off by far more than O(eps)
    off = torch.linalg.solve(G + LAM * torch.eye(len(G), dtype=torch.float64), g_m) / N
    assert _rel(_delta(res, theta) / 1e-3, off) > 100 * errs[1e-3]


def test_gauss_newton_influence_predicts_the_pbrf_effect_on_margins(tiny):
    """The influence function with the EXACT damped GNH predicts the PBRF's change of every target margin to first
    order: f_t(theta_pbrf(eps/n)) - f_t(theta_s) ~= -eps tau_GNH[m, t] (tau: the effect of INCLUDING m). The relative
    error is small for small eps and grows with eps; the Hessian-based influence misses the PBRF at any eps."""
    net, theta, x, y, G = tiny
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    y_t = torch.randint(0, 3, (5,), generator=g)
    V = grads.per_example_grads(net, theta, x_t, y_t, "margin").T.contiguous()
    G_train = grads.per_example_grads(net, theta, x, y, "loss")
    tau = inf.influence_from_solution(G_train, inf.solve_exact(G, V, WD + LAM), N)  # (n, T), course convention
    removed = [3, 20, 41]
    errs = {}
    for eps in (1.0, 1e-1, 1e-2):
        # exact-Hessian Newton: at eps = 1 (a whole example of 60) Gauss-Newton steps converge only linearly
        eff = pbrf.pbrf_effect(net, theta, x, y, x_t, y_t, removed, weight_decay=WD, damping=LAM,
                               target_fn="margin", weight=eps / N, tol=1e-10, group=3, curvature="hessian")
        assert eff.shape == (3, 5)
        errs[eps] = _rel(eff / eps, -tau[removed])
    assert errs[1e-2] < 0.01, errs
    assert errs[1.0] > errs[1e-1] > errs[1e-2], errs
    # the Hessian influence (same damping) answers another question: far off the PBRF even as eps -> 0
    H = grads.hessian(net, theta, x, y, weight_decay=0.0)
    tau_h = inf.influence_from_solution(G_train, inf.solve_exact(H, V, WD + LAM), N)
    assert _rel(eff / 1e-2, -tau_h[removed]) > 5 * errs[1e-2]


def test_pbrf_is_leave_one_out_for_a_linear_model_with_squared_loss():
    """Linear model h = X~ theta, loss (h - y)^2 / 2, objective J = (1/n) sum L_i + (wd/2)||theta||^2 at its exact
    minimiser theta_s. The loss is quadratic and h linear, so D_L(h_i(theta), h_i(theta_s)) = L_i(theta) - L_i(theta_s)
    - grad L_i(theta_s)^T (theta - theta_s) exactly; with damping 0 the PBO is
        (1/n) sum_i L_i - (1/n) L_m + (wd/2)||theta||^2 - [(1/n) sum_i grad L_i(theta_s) + wd theta_s]^T theta + const
      = (1/n) sum_{i != m} L_i + (wd/2)||theta||^2 - grad J(theta_s)^T theta + const,
    and grad J(theta_s) = 0: the leave-one-out objective (same 1/n normalisation) up to a constant."""
    g = torch.Generator().manual_seed(3)
    n, d = 60, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    net = nn.Linear(d, 1).double()
    sq = lambda h, t: 0.5 * (h[..., 0] - t) ** 2
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)

    def ridge(weights, wd):  # argmin (1/n) sum_i w_i L_i + (wd/2)||theta||^2, theta = (weight, bias)
        return torch.linalg.solve(xa.T @ (weights[:, None] * xa) / n + wd * torch.eye(d + 1, dtype=torch.float64),
                                  xa.T @ (weights * y) / n)

    for wd in (0.0, 0.1):
        sol = ridge(torch.ones(n, dtype=torch.float64), wd)
        theta_s = {"weight": sol[:d][None].clone(), "bias": sol[d:].clone()}
        removed = [0, 17, 59]
        res = pbrf.pbrf_response(net, theta_s, x, y, removed, weight_decay=wd, damping=0.0, loss_fn=sq, tol=1e-12,
                                 group=3)
        for k, m in enumerate(removed):
            keep = torch.ones(n, dtype=torch.float64)
            keep[m] = 0
            loo = ridge(keep, wd)
            got = torch.cat([res.params["weight"][k].reshape(-1), res.params["bias"][k]])
            assert (loo - sol).norm() > 1e-3  # the removal moves the model: the comparison is not trivial
            assert torch.allclose(got, loo, atol=1e-10, rtol=0), (wd, m, (got - loo).abs().max())


def test_removals_side_by_side_equal_one_at_a_time(tiny):
    """vmapped removals (group=3) = one at a time; Gauss-Newton and exact-Hessian Newton steps reach one minimiser."""
    net, theta, x, y, _ = tiny
    kw = dict(weight_decay=WD, damping=LAM)
    a = pbrf.pbrf_response(net, theta, x, y, [5, 9, 5], group=3, tol=1e-10, curvature="hessian", **kw)
    b = pbrf.pbrf_response(net, theta, x, y, [5, 9, 5], group=1, tol=1e-10, curvature="hessian", **kw)
    for k in a.params:
        assert torch.allclose(a.params[k], b.params[k], atol=1e-10)
    assert torch.allclose(a.params["head.bias"][0], a.params["head.bias"][2])
    assert (a.grad_norm <= a.tol * a.grad_norm0).all()
    # the start: grad F(theta_s) = -w grad L_m(theta_s)
    g_m = grads.per_example_grads(net, theta, x[[5, 9]], y[[5, 9]], "loss").norm(dim=1) / N
    assert torch.allclose(a.grad_norm0[:2], g_m.double(), rtol=1e-10)
    # Gauss-Newton steps (the default) converge only linearly at a whole removal out of 60, to the same point
    c = pbrf.pbrf_response(net, theta, x, y, [9], tol=1e-6, max_iter=40, **kw)
    assert _rel(_delta(c, theta), _delta(a, theta, 1)) < 1e-4


def test_too_few_iterations_raise_and_strict_false_returns_the_iterate(tiny):
    net, theta, x, y, _ = tiny
    with pytest.raises(pbrf.PBRFNotConverged, match="did not converge"):
        pbrf.pbrf_response(net, theta, x, y, [4], weight_decay=WD, damping=LAM, max_iter=1, tol=1e-12)
    res = pbrf.pbrf_response(net, theta, x, y, [4], weight_decay=WD, damping=LAM, max_iter=1, tol=1e-12,
                             strict=False)
    assert not res.converged[0] and 0 < res.relative_grad_norm[0] < 1  # one step, but downhill


@pytest.mark.parametrize("kwargs, match", [
    ({"removed": [60]}, "out of range"),
    ({"removed": [-1]}, "out of range"),
    ({"removed": []}, "empty"),
    ({"damping": -0.1}, "damping must be a finite number >= 0"),
    ({"damping": float("nan")}, "damping must be a finite number"),
    ({"weight_decay": -1.0}, "weight_decay must be"),
    ({"weight": 2 / N}, "at most 1/n"),
    ({"weight": 0.0}, "nonzero"),
    ({"tol": -1.0}, "tol must be"),
    ({"group": 0}, "group must be"),
    ({"forcing": 1.5}, "forcing"),
    ({"curvature": "fisher"}, "unknown curvature"),
])
def test_bad_input_raises_a_clear_value_error(tiny, kwargs, match):
    net, theta, x, y, _ = tiny
    args = {"removed": [1], "weight_decay": WD, "damping": LAM, **kwargs}
    removed = args.pop("removed")
    with pytest.raises(ValueError, match=match):
        pbrf.pbrf_response(net, theta, x, y, removed, **args)


def test_non_finite_parameters_raise_a_value_error(tiny):
    net, theta, x, y, _ = tiny
    broken = dict(theta)
    broken["head.weight"] = theta["head.weight"].clone()
    broken["head.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="head.weight holds 1 non-finite"):
        pbrf.pbrf_response(net, broken, x, y, [1], weight_decay=WD, damping=LAM)
    with pytest.raises(ValueError, match="removed indices or a precomputed response"):
        pbrf.pbrf_effect(net, theta, x, y, x[:2], y[:2], weight_decay=WD, damping=LAM)
