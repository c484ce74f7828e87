"""Chapter 05: weighted fixed-order training, exact unrolling, TracIn and SOURCE, on tiny float64 problems.

Each reference is independent of the code it checks: finite differences of real retraining (torch.optim.SGD) for the
unrolled derivative, the text's product formula with explicit Hessians (torch.func.hessian) for plain SGD, autograd
through an explicit gradient-descent loop for SOURCE on a quadratic loss, and per-example autograd loops for TracIn.
Every test also shows that a deliberately wrong variant is caught (a comment gives the measured numbers).
"""
import dataclasses

import pytest
import torch
from torch.func import functional_call

from course_lib import data as D, grads, measure, settings, train
from course_lib.attribution import ekfac, influence, source, tracin, unroll

DT = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def toy_cfg(**kw):
    base = dict(device="cpu", arch="cnn", width=2, epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=0.05)
    return settings.get("smoke", **{**base, **kw})


def margins(cfg, data, w, seed):
    m = train.train_weighted(cfg, data, w, seed, dtype=DT)
    return m.outputs(data.x_targets.to(DT), data.y_targets)[0]


# ------------------------------------------------------------------------------------------- weighted training


def test_dropping_nothing_reproduces_full_data_model(toy):
    cfg = toy_cfg()
    full = train.train_models(cfg, toy, train.full_mask(toy), [7])
    ones = train.train_weighted(cfg, toy, torch.ones(toy.n_train), 7)
    for k in full.params:  # the same batches, initialisation and arithmetic: bit for bit
        assert torch.equal(full.params[k], ones.params[k])
    # a different seed gives another model (the comparison can fail)
    other_seed = train.train_weighted(cfg, toy, torch.ones(24), 8)
    assert not torch.equal(full.params["head.bias"], other_seed.params["head.bias"])
    rec = train.record_training(cfg, toy, 7)
    assert torch.equal(rec.thetas[-1], grads.flatten(full.params_of(0)))
    assert rec.thetas.shape == (rec.steps + 1, grads.flatten(full.params_of(0)).numel())
    as_models = rec.as_models()  # the recorded run's trained model, for the methods that attribute a final model
    assert int(as_models.seeds[0]) == 7 and as_models.masks.all()
    for k in full.params:
        assert torch.equal(as_models.params[k], full.params[k])
    assert torch.equal(as_models.outputs(toy.x_targets, toy.y_targets), full.outputs(toy.x_targets, toy.y_targets))


def test_fixed_seed_subset_retraining_is_deterministic_and_keeps_batches(toy):
    cfg = toy_cfg()
    w = torch.ones(24)
    w[[1, 5, 9]] = 0
    a = train.train_weighted(cfg, toy, w, 3).outputs(toy.x_targets, toy.y_targets)
    b = train.train_weighted(cfg, toy, w, 3).outputs(toy.x_targets, toy.y_targets)
    assert torch.equal(a, b)
    # a dropped example's content is irrelevant (weight 0 removes it exactly) while the batches stay the same
    x2 = toy.x_train.clone()
    x2[[1, 5, 9]] = 100.0
    other = dataclasses.replace(toy, x_train=x2)
    c = train.train_weighted(cfg, other, w, 3).outputs(toy.x_targets, toy.y_targets)
    assert torch.allclose(a, c, rtol=0, atol=1e-6)
    # ... but with weight 1 it matters (the test can fail)
    d = train.train_weighted(cfg, other, torch.ones(24), 3).outputs(toy.x_targets, toy.y_targets)
    assert (d - c).abs().max() > 1e-2
    r1, r2 = train.record_training(cfg, toy, 3, w), train.record_training(cfg, toy, 3)
    assert all(torch.equal(p, q) for p, q in zip(r1.batches, r2.batches))
    assert r1.thetas[0].equal(r2.thetas[0]) and not r1.thetas[-1].equal(r2.thetas[-1])


def test_weighted_rows_train_like_one_at_a_time(toy):
    cfg = toy_cfg()
    W = torch.ones(3, 24)
    W[1, :4] = 0
    W[2, 10] = 2.5
    together = train.train_weighted(cfg, toy, W, 3, dtype=DT)
    for e in range(3):
        alone = train.train_weighted(cfg, toy, W[e], 3, dtype=DT)
        for k in alone.params:
            assert torch.allclose(together.params[k][e], alone.params[k][0], rtol=0, atol=1e-10)
    assert together.masks.sum(1).tolist() == [24, 20, 24]


def test_weighted_training_rejects_bad_weights(toy):
    cfg = toy_cfg()
    with pytest.raises(ValueError, match="weights must have shape"):
        train.train_weighted(cfg, toy, torch.ones(23), 0)
    with pytest.raises(ValueError, match="finite"):
        train.train_weighted(cfg, toy, torch.full((24,), float("nan")), 0)
    with pytest.raises(ValueError, match="batch norm"):
        train.record_training(toy_cfg(arch="resnet9", width=2), D.Data("rgb", torch.randn(16, 3, 8, 8),
                              torch.randint(0, 2, (16,)), torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long),
                              torch.arange(2), ("a", "b")), 0)


# ------------------------------------------------------------------------------------------------- unrolling


@pytest.fixture(scope="module")
def momentum_run(toy):
    """CNN, 6 SGD steps with Nesterov momentum 0.9, weight decay 0.05 and a linearly decaying learning rate."""
    cfg = toy_cfg()
    traj = train.record_training(cfg, toy, 3, dtype=DT)
    res = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, chunk=3)
    return cfg, traj, res.scores


def finite_difference(cfg, data, j, seed=3, eps=1e-5):
    w = torch.ones(data.n_train, dtype=DT)
    w[j] += eps
    up = margins(cfg, data, w, seed)
    w[j] -= 2 * eps
    return (up - margins(cfg, data, w, seed)) / (2 * eps)


def test_unrolled_derivative_equals_finite_differences_of_retraining(toy, momentum_run):
    cfg, traj, scores = momentum_run
    assert scores.shape == (24, 4)
    wrong_momentum = unroll.unrolled_scores(dataclasses.replace(traj, momentum=0.0, nesterov=False), toy.x_train,
                                            toy.y_train, toy.x_targets, toy.y_targets).scores
    wrong_decay = unroll.unrolled_scores(dataclasses.replace(traj, weight_decay=0.0), toy.x_train, toy.y_train,
                                         toy.x_targets, toy.y_targets).scores
    for j in (0, 7, 19):
        fd = finite_difference(cfg, toy, j)
        # measured: 1e-10 relative (central differences, eps 1e-5, float64)
        assert rel(scores[j], fd) < 1e-4
        # a backward pass that forgets the momentum or the weight decay is caught (measured: 0.63-0.66 and 7e-3-1.5e-2)
        assert rel(wrong_momentum[j], fd) > 1e-2
        assert rel(wrong_decay[j], fd) > 1e-3


def test_including_an_example_is_the_positive_direction(toy, momentum_run):
    # leaving example j out (w_j: 1 -> 0, same batches) changes the margins by about -score[j]
    cfg, traj, scores = momentum_run
    w = torch.ones(24, dtype=DT)
    w[7] = 0
    change = margins(cfg, toy, w, 3) - margins(cfg, toy, torch.ones(24, dtype=DT), 3)
    assert rel(-scores[7], change) < 0.1  # measured 8e-3: first order in the weight
    assert rel(scores[7], change) > 1.5


def test_truncated_unrolling_and_chunks(toy, momentum_run):
    cfg, traj, scores = momentum_run
    one_chunk = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, chunk=64).scores
    assert torch.allclose(one_chunk, scores, rtol=0, atol=1e-12)
    part = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, last=3)
    assert part.steps == 3
    # only the last 3 steps' batches (one epoch of 3 batches: every example once) get a score
    assert (part.scores != 0).any(1).all() and rel(part.scores, scores) > 1e-2
    first = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, last=1).scores
    assert (first.abs().sum(1) > 0).sum() == len(traj.batches[-1])
    # one walk with snapshots gives every truncation: each equals a separate run with last=K
    walk = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, snapshots=[1, 3])
    assert torch.allclose(walk.scores, scores, rtol=0, atol=1e-12)
    assert torch.allclose(walk.truncated[3], part.scores, rtol=0, atol=1e-12)
    assert torch.allclose(walk.truncated[1], first, rtol=0, atol=1e-12)
    assert walk.truncated_seconds[1] <= walk.truncated_seconds[3] <= walk.seconds
    with pytest.raises(ValueError, match="snapshots"):
        unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, last=2, snapshots=[3])


def test_plain_sgd_equals_the_product_formula(toy):
    # the text's formula: sum_t (I - lr H_{T-1}) ... (I - lr H_{t+1}) (lr_t / B) grad l_j(theta_t), explicit Hessians
    cfg = toy_cfg(arch="mlp", width=6, momentum=0.0, lr=0.3, weight_decay=0.01)
    traj = train.record_training(cfg, toy, 5, dtype=DT)
    ours = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets).scores
    ref = unroll.product_formula(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets)
    assert rel(ours, ref) < 1e-10  # measured 4e-16
    # a backward pass that forgets the weight decay in (I - lr (H + wd I)) is caught
    no_decay = unroll.unrolled_scores(dataclasses.replace(traj, weight_decay=0.0), toy.x_train, toy.y_train,
                                      toy.x_targets, toy.y_targets).scores
    assert rel(no_decay, ref) > 1e-3  # measured 5e-3
    with pytest.raises(ValueError, match="plain gradient descent"):
        unroll.product_formula(train.record_training(toy_cfg(arch="mlp", width=6), toy, 5, dtype=DT), toy.x_train,
                               toy.y_train, toy.x_targets, toy.y_targets)


def test_unroll_rejects_bad_input(toy, momentum_run):
    cfg, traj, _ = momentum_run
    with pytest.raises(ValueError, match="trained on 24"):
        unroll.unrolled_scores(traj, toy.x_train[:20], toy.y_train[:20], toy.x_targets, toy.y_targets)
    with pytest.raises(ValueError, match="valid: margin, loss"):
        unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, target_fn="acc")
    with pytest.raises(ValueError, match="last must be"):
        unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets, last=99)
    bad = dataclasses.replace(traj, thetas=traj.thetas.clone())
    bad.thetas[3, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        unroll.unrolled_scores(bad, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets)


# ---------------------------------------------------------------------------------------------------- TracIn


def test_tracin_one_checkpoint_is_the_scaled_gradient_dot_product(toy, momentum_run):
    _, traj, _ = momentum_run
    net, st = traj.net.eval(), traj.state_at(traj.steps)
    x, xt = toy.x_train.to(DT), toy.x_targets.to(DT)
    res = tracin.tracin_scores(net, [st], [0.05], x, toy.y_train, xt, toy.y_targets)

    def autograd_grad(xi, yi, fn):
        th = {k: v.clone().requires_grad_() for k, v in traj.params_at(traj.steps).items()}
        out = measure.get(fn)(functional_call(net, th, (xi[None],)), yi[None]).sum()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, list(th.values()))])

    gl = torch.stack([autograd_grad(x[i], toy.y_train[i], "loss") for i in range(24)])
    gf = torch.stack([autograd_grad(xt[t], toy.y_targets[t], "margin") for t in range(4)])
    assert rel(res.scores, -0.05 * gl @ gf.T) < 1e-12
    assert rel(res.scores, 0.05 * gl @ gf.T) > 1.9  # the sign is checked
    # a training copy of a target raises that target's margin (course convention)
    dup = tracin.tracin_scores(net, [st], [0.05], xt, toy.y_targets, xt, toy.y_targets).scores
    assert (dup.diagonal() > 0).all()
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        tracin.tracin_scores(net, [st, st], [0.1], x, toy.y_train, xt, toy.y_targets)


def test_lr_weights():
    w = tracin.lr_weights([1.0, 2.0, 3.0, 4.0], [2, 4], n_train=2)
    assert w.tolist() == [1.5, 3.5]
    assert tracin.lr_weights([1.0, 2.0, 3.0, 4.0], [4], 2, momentum=0.5).tolist() == [10.0]
    with pytest.raises(ValueError, match="increase strictly"):
        tracin.lr_weights([1.0, 2.0], [2, 2], 2)
    with pytest.raises(ValueError, match="momentum"):
        tracin.lr_weights([1.0, 2.0], [2], 2, momentum=1.0)


def test_ideal_tracin_is_first_order_unrolling(toy):
    # small learning rate, no momentum: the propagation factors (I - lr H) are nearly I and theta barely moves,
    # so ideal TracIn approaches the exact unrolled derivative; the gap grows with the learning rate
    gaps = []
    for lr in (1e-3, 1e-1):
        cfg = toy_cfg(momentum=0.0, lr=lr, weight_decay=0.0, epochs=1)
        traj = train.record_training(cfg, toy, 2, dtype=DT)
        exact = unroll.unrolled_scores(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets).scores
        ideal = tracin.tracin_ideal(traj, toy.x_train, toy.y_train, toy.x_targets, toy.y_targets).scores
        gaps.append(rel(ideal, exact))
    assert gaps[0] < 1e-2 and gaps[1] > 10 * gaps[0]  # measured: 5e-4 and 5e-2


# ---------------------------------------------------------------------------------------------------- SOURCE


def quadratic_problem(p=5, n=6, T=3, seed=0):
    """Per-example losses l_i = 1/2 (theta - c_i)^T A_i (theta - c_i); targets f_t = a_t . theta + 1/2 theta^T M_t
    theta."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, p, p, generator=g, dtype=DT)
    A = A @ A.transpose(1, 2) / p + 0.1 * torch.eye(p, dtype=DT)
    c = torch.randn(n, p, generator=g, dtype=DT)
    a = torch.randn(T, p, generator=g, dtype=DT)
    M = torch.randn(T, p, p, generator=g, dtype=DT)
    M = (M + M.transpose(1, 2)) / 10
    theta0 = torch.randn(p, generator=g, dtype=DT)
    return A, c, a, M, theta0


def gd_quadratic(prob, w, lrs, wd):
    """Full-batch gradient descent on (1/n) sum w_i l_i + wd/2 ||theta||^2; returns every theta and f(theta_T)."""
    A, c, a, M, theta = prob
    thetas = [theta]
    for lr in lrs:
        g = torch.einsum("i,ipq,iq->p", w, A, theta - c) / len(w) + wd * theta
        theta = theta - lr * g
        thetas.append(theta)
    return thetas, a @ theta + 0.5 * torch.einsum("p,tpq,q->t", theta, M, theta)


def test_source_one_step_segments_equal_exact_unrolling_on_a_quadratic():
    prob = quadratic_problem()
    A, c, a, M, _ = prob
    n, p = len(A), A.shape[1]
    lrs, wd = [0.5, 0.4, 0.3, 0.2], 0.1
    w = torch.ones(n, dtype=DT)
    exact = torch.autograd.functional.jacobian(lambda v: gd_quadratic(prob, v, lrs, wd)[1], w).T  # (n, T)
    thetas, _ = gd_quadratic(prob, w, lrs, wd)
    H = A.mean(0) + wd * torch.eye(p, dtype=DT)
    G = torch.stack([torch.einsum("ipq,iq->ip", A, th - c) for th in thetas[:-1]])  # (L, n, p)
    gf = a + torch.einsum("tpq,q->tp", M, thetas[-1])
    hs = H.expand(len(lrs), p, p)
    power = source.source_exact(hs, lrs, G, gf, n, form="power", lrs=lrs, steps=[1] * len(lrs))
    assert rel(power, exact) < 1e-12  # measured 1e-15
    # SOURCE's exp(-lr H) in place of (I - lr H): second order in lr lambda (here lr lambda_max = 0.8)
    lam_max = float(torch.linalg.eigvalsh(H).max())
    approx = source.source_exact(hs, lrs, G, gf, n)
    err = rel(approx, exact)
    assert 1e-6 < err < (max(lrs) * lam_max) ** 2  # measured 0.08 < 0.69


def test_source_one_segment_is_damped_influence():
    prob = quadratic_problem(p=6, n=8)
    A, c, a, M, theta = prob
    n, p = len(A), A.shape[1]
    H = A.mean(0) + 0.05 * torch.eye(p, dtype=DT)
    G = torch.einsum("ipq,iq->ip", A, theta - c)
    gf = a + torch.einsum("tpq,q->tp", M, theta)
    lam = torch.linalg.eigvalsh(H)
    for s, tol in ((1e-6 / float(lam.max()), 1e-5), (1e6 / float(lam.min()), 1e-5), (1.0, 0.35)):
        src = source.source_exact(H[None], [s], G[None], gf, n)
        damped = influence.influence_from_solution(G, influence.solve_exact(H, gf.T, damping=1 / s), n)
        # equal in both limits (s lambda -> 0: TracIn-like s G gf^T; s lambda -> inf: undamped influence), close in
        # between, where the filters differ by a factor in [1, 1.2985) per eigendirection (measured 0.29 at s = 1)
        assert rel(src, damped) < tol
        # the damping is 1 / s, not s (at s = 1 both are 1: skip)
        if s != 1.0:
            wrong = influence.influence_from_solution(G, influence.solve_exact(H, gf.T, damping=s), n)
            assert rel(src, wrong) > 0.5
    # the per-eigenvalue ratio of the two filters lies in [1, 1.2985)
    x = torch.logspace(-6, 6, 400, dtype=DT)
    r = source.damping_ratio(x, 1.0)
    assert r.min() >= 1 - 1e-12 and r.max() < 1.2985 and r[0] < 1 + 1e-5 and r[-1] < 1 + 1e-5 and r.max() > 1.298


def test_source_ekfac_matches_explicit_matrices(toy):
    # two segments of two checkpoints each: the elementwise eigenbasis computation vs dense EK-FAC matrices
    cfg = toy_cfg(arch="mlp", width=5, epochs=4, momentum=0.9, weight_decay=0.01)
    traj = train.record_training(cfg, toy, 1, dtype=DT)
    net = traj.net.eval()
    x, y, xt, yt = toy.x_train.to(DT), toy.y_train, toy.x_targets.to(DT), toy.y_targets
    assert traj.checkpoint_steps(4) == [3, 6, 9, 12]
    segs = source.segments(traj.lrs, traj.checkpoint_steps(4), L=2, momentum=cfg.momentum)
    assert [s.checkpoints for s in segs] == [[0, 1], [2, 3]]
    assert segs[0].lr_sum == pytest.approx(float(traj.lrs[:6].sum()) / 0.1)
    states = [[traj.state_at(3), traj.state_at(6)], [traj.state_at(9), traj.state_at(12)]]
    lr_sums = [s.lr_sum for s in segs]
    res = source.source_scores(net, states, lr_sums, traj.state_at(12), x, y, xt, yt, weight_decay=0.01,
                               labels="empirical")
    layers = ekfac.layers_of(net)
    order = ekfac.layer_order(traj.like, layers)
    p = len(order)
    hs = torch.stack([F.dense("ekfac") + 0.01 * torch.eye(p, dtype=DT) for F in res.factors])
    G = torch.stack([sum(grads.per_example_grads(net, st, x, y)[:, order] for st in seg) / len(seg) for seg in states])
    gf = grads.per_example_grads(net, traj.state_at(12), xt, yt, "margin")[:, order]
    ref = source.source_exact(hs, lr_sums, G, gf, len(y))
    assert rel(res.scores, ref) < 1e-10
    # chaining matters: without the later segment's exp(-s H) propagation the first segment's term differs
    first_only = source.source_exact(hs[:1], lr_sums[:1], G[:1], gf, len(y))
    last_only = source.source_exact(hs[1:], lr_sums[1:], G[1:], gf, len(y))
    assert rel(first_only + last_only, ref) > 1e-3
    # averaged factors of one checkpoint given twice are that checkpoint's factors
    twice = source.segment_factors(net, [traj.state_at(6)] * 2, x, y, labels="empirical")
    once = ekfac.fit_factors(net, traj.state_at(6), x, y, "empirical")
    for k in once.layers:
        assert torch.allclose(twice.lam[k], once.lam[k], rtol=1e-10, atol=1e-14)
        assert torch.allclose(twice.A[k], once.A[k], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        source.segments(traj.lrs, [12], L=2)
    with pytest.raises(ValueError, match="unknown form"):
        source.filters(torch.ones(2), 1.0, form="cubic")
