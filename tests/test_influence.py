"""Chapter 01: gradients, Hessian products, inverse-HVP solvers and influence scores against exact references."""
import pytest
import torch
from torch.func import functional_call

from course_lib import data as D, grads, measure, models
from course_lib.attribution import influence as inf


def _toy(arch="mlp", n=40, seed=0, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 6, 6) if arch == "cnn" else (1, 2, 2)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    if arch == "cnn":
        net = models.SmallCNN(shape, classes, width=2, hidden=4)
    elif arch == "mlp":
        net = models.MLP(shape, classes, width=5, depth=1)
    else:
        net = models.LogisticRegression(shape, classes)
    net = net.to(dtype)
    params = {k: v.detach() for k, v in net.named_parameters()}
    return net, params, x, y


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_hvp_matches_finite_differences(arch):
    net, params, x, y = _toy(arch)
    wd = 0.01
    v = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)

    def gradient(theta):
        p = {k: t.clone().requires_grad_() for k, t in theta.items()}
        obj = grads.objective(net, p, x, y, wd)
        return grads.flatten(dict(zip(p, torch.autograd.grad(obj, list(p.values())))))

    eps = 1e-5
    plus = grads.unflatten(grads.flatten(params) + eps * v, params)
    minus = grads.unflatten(grads.flatten(params) - eps * v, params)
    fd = (gradient(plus) - gradient(minus)) / (2 * eps)
    hv = grads.hvp(net, params, x, y, v, wd, batch_size=7)  # uneven batches exercise the accumulation
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-7)
    assert hv.norm() > 1e-3  # not trivially zero


def test_explicit_hessian_is_symmetric_and_matches_hvps():
    net, params, x, y = _toy("mlp")
    H = grads.hessian(net, params, x, y, weight_decay=0.01)
    assert torch.allclose(H, H.T, atol=1e-10)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    assert torch.allclose(grads.hvps(net, params, x, y, V, 0.01, batch_size=13, chunk=2), H @ V, atol=1e-10)
    # the MLP's Hessian is indefinite away from a minimum: one reason deep nets need damping
    ev = torch.linalg.eigvalsh(H)
    assert ev.max() > 0.01 and ev.min() < 0.01


@pytest.mark.parametrize("fn", ["loss", "margin"])
def test_per_example_grads_match_a_loop_of_backward_calls(fn):
    net, params, x, y = _toy("cnn", n=9, dtype=torch.float32)
    G = grads.per_example_grads(net, params, x, y, fn=fn, batch_size=4)
    module = net
    for i in range(len(y)):
        module.zero_grad()
        out = measure.get(fn)(module(x[i:i + 1]), y[i:i + 1]).sum()
        out.backward()
        ref = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        assert torch.allclose(G[i], ref, atol=1e-5), i
    assert G.std(0).abs().sum() > 0


def _spd(p=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, p, generator=g, dtype=torch.float64)
    return A @ A.T / p + 0.05 * torch.eye(p, dtype=torch.float64)


def test_cg_lanczos_and_lissa_agree_with_the_exact_solve():
    net, params, x, y = _toy("mlp")
    op = inf.HessianOperator(net, params, x, y, weight_decay=0.01)
    H = op.dense()
    lam = 1.0 - float(torch.linalg.eigvalsh(H).min())  # makes H + lam I positive definite (smallest eig = 1)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    exact = inf.solve_exact(H, V, lam)
    assert torch.allclose((H + lam * torch.eye(len(H), dtype=H.dtype)) @ exact, V, atol=1e-8)
    cg = inf.solve_cg(op, V, lam, iters=200, tol=1e-10)
    assert torch.allclose(cg, exact, rtol=1e-6, atol=1e-8)
    multi = inf.solve_lanczos(op, V, [lam, 2 * lam], iters=H.shape[0])
    assert torch.allclose(multi[lam], exact, rtol=1e-6, atol=1e-8)
    assert torch.allclose(multi[2 * lam], inf.solve_exact(H, V, 2 * lam), rtol=1e-6, atol=1e-8)
    # truncated: multi-shift CG after k steps equals plain CG after k steps
    k = 4
    assert torch.allclose(inf.solve_lanczos(op, V, [lam], iters=k)[lam], inf.solve_cg(op, V, lam, iters=k),
                          rtol=1e-6, atol=1e-8)
    scale = float(torch.linalg.eigvalsh(H).max()) + lam + 1
    lissa = inf.solve_lissa(op, V, lam, depth=600, scale=scale)
    assert torch.allclose(lissa, exact, rtol=1e-4, atol=1e-6)


def test_stochastic_lissa_approaches_the_exact_solve():
    H = _spd()
    g = torch.Generator().manual_seed(3)
    parts = torch.stack([H + 0.3 * (lambda B: B + B.T)(torch.randn(12, 12, generator=g, dtype=torch.float64))
                         for _ in range(50)])
    parts = parts - parts.mean(0) + H  # per-example Hessians whose mean is exactly H
    op = inf.MatrixOperator(H, parts)
    V = torch.randn(12, 3, dtype=torch.float64, generator=g)
    exact = inf.solve_exact(H, V, 0.1)
    est = inf.solve_lissa(op, V, 0.1, n=50, depth=400, scale=12.0, batch_size=10, repeats=8, seed=0)
    rel = (est - exact).norm() / exact.norm()
    assert rel < 0.15, rel
    with pytest.raises(FloatingPointError, match="raise the scale"):
        inf.solve_lissa(op, V, 0.1, depth=2000, scale=0.2)


def test_solvers_reject_bad_input():
    H = _spd()
    with pytest.raises(ValueError, match="damping must be"):
        inf.solve_exact(H, torch.ones(12, 1, dtype=torch.float64), -1.0)
    with pytest.raises(ValueError, match=r"\(p, T\)"):
        inf.solve_cg(lambda V: H @ V, torch.ones(12, dtype=torch.float64))
    net, params, x, y = _toy("logreg")
    with pytest.raises(ValueError, match="unknown solver"):
        inf.influence_scores(net, params, x, y, x[:2], y[:2], weight_decay=0.1, solver="newton")


def _logreg_problem(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, 3, (n + 6,), generator=g)
    x = (centers[y] + torch.randn(n + 6, 4, generator=g, dtype=torch.float64)).view(-1, 1, 2, 2)
    torch.manual_seed(seed)
    net = models.LogisticRegression((1, 2, 2), 3).double()
    p0 = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in net.named_parameters()}
    return net, p0, x[:n], y[:n], x[n:], y[n:]


@pytest.mark.parametrize("target_fn", ["margin", "loss"])
def test_influence_predicts_leave_one_out_retraining(target_fn):
    """Logistic regression: -tau[i, t] predicts f_t(without i) - f_t(with i) from actual retraining."""
    net, p0, x, y, xt, yt = _logreg_problem(n=120)
    wd = 0.05  # strong enough convexity that removing 1 of 120 points is in the first-order regime
    theta = inf.fit_convex(net, p0, x, y, wd)
    res = inf.influence_scores(net, theta, x, y, xt, yt, weight_decay=wd, damping=0.0, solver="exact",
                               target_fn=target_fn)
    tau = res.scores
    f = measure.get(target_fn)
    full = f(functional_call(net, theta, (xt,)), yt)
    actual = torch.zeros_like(tau)
    for i in range(len(y)):
        w = torch.ones(len(y), dtype=torch.float64)
        w[i] = 0
        loo = inf.fit_convex(net, theta, x, y, wd, weights=w)
        actual[i] = f(functional_call(net, loo, (xt,)), yt) - full  # removal effect
    pred = -tau  # the course's tau is the effect of INCLUDING i
    r = torch.corrcoef(torch.stack([pred.flatten(), actual.flatten()]))[0, 1]
    assert r > 0.99, r
    slope = (pred * actual).sum() / (pred * pred).sum()
    assert 0.85 < slope < 1.15, slope  # right sign AND right 1/n scale
    # the sign convention, per pair: including i raises f_t exactly where tau > 0 (up to tiny effects)
    big = actual.abs() > 0.1 * actual.abs().max()
    assert torch.equal(torch.sign(tau[big]), torch.sign(-actual[big]))
    inf.check_informative(tau)


def test_cg_and_lissa_scores_match_exact_scores_on_logistic_regression():
    net, p0, x, y, xt, yt = _logreg_problem(seed=1)
    theta = inf.fit_convex(net, p0, x, y, 0.05)
    kw = dict(weight_decay=0.05, damping=0.01)
    exact = inf.influence_scores(net, theta, x, y, xt, yt, solver="exact", **kw).scores
    close = lambda a: (a - exact).abs().max() < 1e-4 * exact.abs().max()
    assert close(inf.influence_scores(net, theta, x, y, xt, yt, solver="cg", iters=100, **kw).scores)
    top = float(torch.linalg.eigvalsh(inf.HessianOperator(net, theta, x, y, 0.05).dense()).max())
    lissa = inf.influence_scores(net, theta, x, y, xt, yt, solver="lissa",
                                 lissa={"depth": 800, "scale": 1.2 * top + 0.01, "batch_size": 60}, **kw).scores
    assert torch.corrcoef(torch.stack([lissa.flatten(), exact.flatten()]))[0, 1] > 0.98  # stochastic minibatch Hessians
    sweep = inf.influence_scores(net, theta, x, y, xt, yt, weight_decay=0.05, damping=[0.01, 0.1],
                                 solver="cg", iters=15).by_damping
    assert close(sweep[0.01])


def test_constant_scores_cannot_pass():
    """The detached-parameters bug: gradients of a detached copy are zero, so every score is the same."""
    net, params, x, y = _toy("mlp")
    with pytest.raises(ValueError, match="constant"):
        inf.check_informative(torch.full((40, 5), 0.37))
    with pytest.raises(ValueError, match="same scores"):
        inf.check_informative(torch.randn(40, 1).repeat(1, 5))
    # reproduce the bug: differentiate a copy that the forward pass does not use
    copy = {k: v.clone().requires_grad_() for k, v in params.items()}
    used = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    rows = []
    for i in range(len(y)):
        out = measure.loss(functional_call(net, used, (x[i:i + 1],)), y[i:i + 1]).sum()
        g = torch.autograd.grad(out, list(copy.values()), allow_unused=True)
        rows.append(torch.cat([torch.zeros(c.numel(), dtype=c.dtype) if gi is None else gi.reshape(-1)
                               for gi, c in zip(g, copy.values())]))
    buggy = -torch.stack(rows) @ torch.randn(len(rows[0]), 5, dtype=torch.float64) / len(y)
    with pytest.raises(ValueError):
        inf.check_informative(buggy)
    # the real thing passes
    real = inf.influence_scores(net, params, x, y, x[:5], y[:5], weight_decay=0.01, damping=1.0,
                                solver="cg").scores
    inf.check_informative(real)


def test_identical_class_rate_and_similarities():
    y_train = torch.tensor([0, 1, 2, 1])
    scores = torch.tensor([[0.9, 0.0], [0.1, 0.5], [0.0, 0.1], [0.2, 0.9]])
    assert inf.identical_class_rate(scores, y_train, torch.tensor([0, 1])) == 1.0
    assert inf.identical_class_rate(scores, y_train, torch.tensor([1, 1])) == 0.5
    G = torch.randn(6, 4)
    assert torch.allclose(inf.grad_cos(G, G).diagonal(), -torch.ones(6), atol=1e-6)
    assert torch.allclose(inf.grad_dot(G, 3 * G), -3 * G @ G.T)
    net, params, x, y = _toy("mlp", dtype=torch.float32)
    sim = inf.representation_similarity(net, params, x, x[:3])
    assert sim.shape == (40, 3) and torch.allclose(sim[torch.arange(3), torch.arange(3)], torch.ones(3), atol=1e-5)


def test_closed_form_logreg_hessian_and_fixed_hessian_newton():
    net, p0, x, y, xt, yt = _logreg_problem(n=50, seed=2)
    theta = inf.fit_convex(net, p0, x, y, 0.05)
    H = inf.logreg_hessian(net, theta, x, y, 0.05)
    assert torch.allclose(H, grads.hessian(net, theta, x, y, 0.05), atol=1e-10)
    L = torch.linalg.cholesky(H)
    w = torch.ones(len(y), dtype=torch.float64)
    w[7] = 0
    newton = inf.fit_newton(net, theta, x, y, 0.05, L, weights=w)
    U = inf.logreg_example_factor(net, theta, x[7], len(y))
    w_all = torch.ones(len(y), dtype=torch.float64)
    w_all[7] = 0
    assert torch.allclose(H - U @ U.T, inf.logreg_hessian(net, theta, x, y, 0.05) - (
        grads.hessian(net, theta, x[7:8], y[7:8]) / len(y)), atol=1e-10)
    fast = inf.fit_newton(net, theta, x, y, 0.05, L, weights=w_all, downdate=U, max_iter=8)
    for k in newton:
        assert torch.allclose(fast[k], newton[k], atol=1e-8)
    lbfgs = inf.fit_convex(net, theta, x, y, 0.05, weights=w)
    for k in newton:
        assert torch.allclose(newton[k], lbfgs[k], atol=1e-7)
    assert not torch.allclose(newton["linear.weight"], theta["linear.weight"], atol=1e-4)  # it did move


@pytest.mark.parametrize("damping", [1e-8, 1e-5, 1e-2, 1.0])
def test_exact_solve_is_exact_or_refuses_below_its_floor(damping):
    """A rank-5 PSD Hessian of size 8 (a singular H, as in deep nets' flat directions): every damping above the
    documented floor gives X equal to the 60-digit answer to 1e-6 relative; below it, a ValueError that names the
    smallest usable damping (never a silently wrong solve)."""
    import mpmath

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 8, generator=g, dtype=torch.float64)
    H, V = A.T @ A, torch.randn(8, 2, generator=g, dtype=torch.float64)
    X = inf.solve_exact(H, V, damping)
    mpmath.mp.dps = 60
    M = mpmath.matrix(H.tolist()) + mpmath.mpf(damping) * mpmath.eye(8)
    ref = torch.tensor([[float(v) for v in mpmath.lu_solve(M, mpmath.matrix(V[:, j].tolist()))] for j in range(2)],
                       dtype=torch.float64).T
    assert float((X - ref).norm() / ref.norm()) < 1e-6
    with pytest.raises(ValueError, match="smallest usable damping .* is"):
        inf.solve_exact(H, V, 1e-14)
    with pytest.raises(ValueError, match="too close to singular"):
        inf.solve_exact(H - torch.eye(8, dtype=torch.float64), V, 1.0)  # the damping cancels an eigenvalue -1


def test_iterative_solvers_refuse_non_finite_results():
    H = -_spd()  # negative definite: damping 0 makes CG divide by a vanishing curvature on some inputs
    V = torch.ones(12, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="damping must be a finite number"):
        inf.solve_cg(lambda W: H @ W, V, float("nan"))
    with pytest.raises(FloatingPointError, match="right-hand sides"):
        inf.solve_cg(lambda W: H @ W, V * float("inf"), 1.0)
    with pytest.raises(FloatingPointError, match="CG solution at damping"):
        inf.solve_cg(lambda W: W * float("inf"), V, 1.0)


def test_logreg_hessian_defaults_to_no_weight_decay():
    """(a gap found by mutation testing: every call passed weight_decay) Measured: 2.2e-16 apart."""
    net, p0, x, y, _, _ = _logreg_problem(n=20, seed=3)
    assert torch.allclose(inf.logreg_hessian(net, p0, x, y), grads.hessian(net, p0, x, y), rtol=0, atol=1e-15)


def test_cached_scores_equal_a_direct_computation_and_are_read_back(smoke, smoke_data, tmp_path, monkeypatch):
    """Chapters 01, 02 and 04 share chapter 01's damped-Hessian scores through this cache."""
    from course_lib import train

    cfg = smoke.replace(n_train=120)
    data = D.mnist5k(n_train=120, n_targets=10)
    models = train.reference_models(cfg, data, 1, cache=tmp_path)
    kw = dict(dampings=[0.1, 1.0], iters=4, hessian_n=50, cache=tmp_path)
    assert inf.cached_scores(cfg, data, models, only_cached=True, **kw) is None  # not on disk yet: nothing computed
    first = inf.cached_scores(cfg, data, models, **kw)
    assert torch.equal(inf.cached_scores(cfg, data, models, only_cached=True, **kw).scores, first.scores)
    direct = inf.influence_scores(models.net, models.state_of(0), data.x_train, data.y_train, data.x_targets,
                                  data.y_targets, weight_decay=cfg.weight_decay, damping=[0.1, 1.0], solver="cg",
                                  iters=4, hessian_n=50, seed=cfg.seed)
    for d in (0.1, 1.0):
        assert torch.allclose(first.by_damping[d], direct.by_damping[d], rtol=1e-5, atol=1e-9)
    assert torch.equal(first.scores, first.by_damping[0.1])
    monkeypatch.setattr(inf, "influence_scores", lambda *a, **k: pytest.fail("recomputed instead of read"))
    again = inf.cached_scores(cfg, data, models, **kw)
    assert torch.equal(again.by_damping[1.0], first.by_damping[1.0]) and again.seconds == first.seconds
    other = dict(kw, iters=5)  # another budget is another result
    with pytest.raises(pytest.fail.Exception):
        inf.cached_scores(cfg, data, models, **other)
