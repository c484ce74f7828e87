"""Chapter 04: the Gauss-Newton Hessian, K-FAC and EK-FAC against exact references on tiny networks."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from course_lib import checks, grads, measure, models
from course_lib.attribution import ekfac as E
from course_lib.attribution import influence as inf


def _toy(build, in_shape, n, classes=3, seed=0):
    """A float64 model from build(in_shape, classes) in eval mode, its state, and n random inputs with labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(seed)
    net = build(in_shape, classes).double().eval()
    return net, dict(net.state_dict()), x, y


def _mlp(n=30, classes=3, seed=0):
    return _toy(lambda s, c: models.MLP(s, c, width=4, depth=1), (1, 2, 3), n, classes, seed)


def _cnn(n=12, classes=3, seed=0):
    return _toy(lambda s, c: models.SmallCNN(s, c, width=2, hidden=4), (1, 6, 6), n, classes, seed)


def _jacobian_by_hand(net, state, x):
    """(n, C, p) Jacobian of the logits, one backward call per (example, class)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    rows = []
    for xi in x:
        logits = functional_call(net, params, (xi[None],))[0]
        rows.append(torch.stack([grads.flatten(dict(zip(params, torch.autograd.grad(logits[c], list(
            params.values()), retain_graph=True)))) for c in range(len(logits))]))
    return torch.stack(rows)


def test_gnh_is_jt_hout_j_and_the_exact_fisher():
    net, state, x, y = _mlp()
    G = E.gnh(net, state, x, batch_size=7)
    J = _jacobian_by_hand(net, state, x)
    p = functional_call(net, state, (x,)).softmax(-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    by_hand = sum(J[i].T @ H[i] @ J[i] for i in range(len(x))) / len(x)
    assert torch.allclose(G, by_hand, atol=1e-12)
    assert torch.allclose(E.fisher_exact(net, state, x, batch_size=8), G, atol=1e-12)  # GNH = true Fisher
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD ...
    Hess = grads.hessian(net, state, x, y)
    assert torch.linalg.eigvalsh(Hess).min() < -1e-6  # ... while the Hessian of this MLP is indefinite
    V = torch.randn(G.shape[0], 5, dtype=torch.float64)
    assert torch.allclose(E.gnh_products(net, state, x, V, weight_decay=0.1, batch_size=9, chunk=2),
                          G @ V + 0.1 * V, atol=1e-12)
    # a *sampled* Fisher is only an estimate: the exact expectation is what equals the GNH
    g = grads.per_example_grads(net, state, x, torch.multinomial(p, 1)[:, 0])
    assert not torch.allclose(g.T @ g / len(x), G, atol=1e-3)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_kfac_is_exact_for_one_example_at_one_position(arch):
    if arch == "mlp":
        net, state, x, y = _mlp(n=1)
    else:  # a kernel covering the whole input: one spatial position
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3, 4)).double().eval()
        state = dict(net.state_dict())
        x, y = torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.tensor([1])
    fac = E.fit_factors(net, state, x, y, labels="exact")
    layers = E.layers_of(net)
    order = E.layer_order(state, layers)
    G = fac.block_diagonal(E.gnh(net, state, x)[order][:, order])
    assert torch.allclose(fac.dense("kfac"), G, atol=1e-12)
    assert torch.allclose(fac.dense("ekfac"), G, atol=1e-12)
    # with two examples the Kronecker product is only an approximation
    fac2 = E.fit_factors(net, state, torch.cat([x, 2 * x.flip(-1) + 0.3]), torch.cat([y, y]), labels="exact")
    G2 = E.gnh(net, state, torch.cat([x, 2 * x.flip(-1) + 0.3]))[order][:, order]
    assert E.relative_error(fac2.dense("kfac"), fac2.block_diagonal(G2)) > 1e-4


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_ekfac_eigenvalues_are_the_gnh_diagonal_in_the_kronecker_eigenbasis(make):
    net, state, x, y = make()
    fac = E.fit_factors(net, state, x, y, labels="exact", batch_size=5)
    layers = E.layers_of(net)
    order = E.layer_order(state, layers)
    G = E.gnh(net, state, x)[order][:, order]
    start = 0
    for l in layers:
        size = l.d_out * l.d_in
        block = G[start:start + size, start:start + size]
        Q = torch.kron(fac.qs[l.name], fac.qa[l.name])
        assert torch.allclose(fac.lam[l.name].reshape(-1), (Q.T @ block @ Q).diagonal(), atol=1e-12)
        start += size
    # EK-FAC is at least as close to the block-diagonal GNH as K-FAC (Frobenius), and strictly closer here
    blockdiag = fac.block_diagonal(G)
    e_ek, e_k = E.relative_error(fac.dense("ekfac"), blockdiag), E.relative_error(fac.dense("kfac"), blockdiag)
    checks.check_ekfac_not_worse(e_ek, e_k)
    assert e_ek < e_k


def test_sampled_and_empirical_labels():
    net, state, x, y = _mlp(n=400)
    exact = E.fit_factors(net, state, x, y, labels="exact")
    a = E.fit_factors(net, state, x, y, labels="sampled", seed=1)
    b = E.fit_factors(net, state, x, y, labels="sampled", seed=1)
    c = E.fit_factors(net, state, x, y, labels="sampled", seed=2)
    emp = E.fit_factors(net, state, x, y, labels="empirical")
    for k in exact.layers:
        assert torch.equal(a.S[k], b.S[k]) and torch.equal(a.lam[k], b.lam[k])  # seeded
        assert not torch.equal(a.S[k], c.S[k])
        assert torch.equal(a.A[k], exact.A[k])  # activations do not depend on labels
        # a sample of 400 labels estimates the exact expectation to within a few per cent
        assert E.relative_error(a.S[k], exact.S[k]) < 0.2
        assert not torch.allclose(emp.S[k], exact.S[k])
    with pytest.raises(ValueError, match="valid"):
        E.fit_factors(net, state, x, y, labels="true")


def test_per_example_layer_grads_match_vmap_grads():
    net, state, x, y = _cnn()
    layers = E.layers_of(net)
    for fn in ("loss", "margin"):
        mats = E.per_example_layer_grads(net, state, x, y, fn, batch_size=5)
        flat = grads.per_example_grads(net, state, x, y, fn)
        assert torch.allclose(E.flat_from_layer_grads(mats, state, layers), flat, atol=1e-12)
        back = E.layer_grads_from_flat(flat, state, layers)
        assert all(torch.allclose(back[k], mats[k], atol=1e-12) for k in mats)


def test_conv_factors_equal_linear_on_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 9, 4))
    conv = conv.double().eval()

    class OnPatches(nn.Module):  # the same network with the convolution written as a Linear on patches
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(18, 3)
            self.head = nn.Linear(27, 4)

        def forward(self, x):
            p = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2)  # (b, 9, 18)
            return self.head(torch.relu(self.lin(p)).transpose(1, 2).flatten(1))

    lin = OnPatches().double().eval()
    s_conv = dict(conv.state_dict())
    s_lin = {"lin.weight": s_conv["0.weight"].flatten(1), "lin.bias": s_conv["0.bias"],
             "head.weight": s_conv["3.weight"], "head.bias": s_conv["3.bias"]}
    x = torch.randn(20, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    assert torch.allclose(functional_call(conv, s_conv, (x,)), functional_call(lin, s_lin, (x,)))
    fc = E.fit_factors(conv, s_conv, x, y, labels="sampled", seed=3)
    fl = E.fit_factors(lin, s_lin, x, y, labels="sampled", seed=3)
    for a, b in (("0", "lin"), ("3", "head")):
        for attr in ("A", "S", "lam"):
            assert torch.allclose(getattr(fc, attr)[a], getattr(fl, attr)[b], atol=1e-12), (a, attr)
    gc = E.per_example_layer_grads(conv, s_conv, x, y)
    gl = E.per_example_layer_grads(lin, s_lin, x, y)
    assert torch.allclose(gc["0"], gl["lin"], atol=1e-12)


def _explicit(fac, kind, lam):
    """The dense factored matrix plus per-layer damping on the diagonal."""
    D = torch.cat([torch.full((fac.shapes[k][0] * fac.shapes[k][1],), lam[k], dtype=torch.float64)
                   for k in fac.layers])
    return fac.dense(kind) + torch.diag(D)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("relative", [False, True])
def test_inverse_products_match_an_explicit_inverse(kind, relative):
    net, state, x, y = _cnn()
    fac = E.fit_factors(net, state, x, y, labels="sampled")
    layers = E.layers_of(net)
    V = {l.name: torch.randn(3, l.d_out, l.d_in, dtype=torch.float64) for l in layers}
    X = fac.inverse_products(V, kind, damping=0.05, relative=relative, weight_decay=0.01)
    lam = fac.damping_of(kind, 0.05, relative)
    M = _explicit(fac, kind, {k: v + 0.01 for k, v in lam.items()})
    vflat = torch.cat([V[l.name].reshape(3, -1) for l in layers], 1)
    xflat = torch.cat([X[l.name].reshape(3, -1) for l in layers], 1)
    assert torch.allclose(xflat, torch.linalg.solve(M, vflat.T).T, rtol=1e-8, atol=1e-10)
    # relative damping: a multiple of each layer's mean eigenvalue; absolute: the same number everywhere
    eig = fac.eigenvalues(kind)
    if relative:
        assert all(abs(lam[k] - 0.05 * float(eig[k].mean())) < 1e-15 for k in fac.layers)
        assert len({round(v, 12) for v in lam.values()}) > 1
    else:
        assert set(lam.values()) == {0.05}
    with pytest.raises(ValueError, match="positive"):
        fac.damping_of(kind, 0.0)


def test_top_eigenspace_truncation_is_the_inverse_on_each_blocks_top_eigenspace():
    """keep < 1 (the course text's spectral regularisation): per layer, the damped inverse restricted to the span
    of the largest ceil(keep x size) eigenvalues' eigenvectors, built here explicitly from each dense block."""
    net, state, x, y = _cnn()
    fac = E.fit_factors(net, state, x, y, labels="sampled")
    layers = E.layers_of(net)
    V = {l.name: torch.randn(2, l.d_out, l.d_in, dtype=torch.float64) for l in layers}
    X = fac.inverse_products(V, "ekfac", damping=0.05, keep=0.3)
    for l in layers:
        k = l.name
        Q = torch.kron(fac.qs[k], fac.qa[k])
        e = fac.lam[k].reshape(-1)
        top = e.argsort(descending=True)[:math.ceil(0.3 * e.numel())]
        U = Q[:, top]
        ref = (U @ torch.diag(1 / (e[top] + 0.05)) @ U.T @ V[k].reshape(2, -1).T).T
        assert torch.allclose(X[k].reshape(2, -1), ref, rtol=1e-8, atol=1e-12)
    full = fac.inverse_products(V, "ekfac", damping=0.05)
    assert all(torch.equal(full[k], fac.inverse_products(V, "ekfac", damping=0.05, keep=1.0)[k]) for k in V)
    assert not torch.allclose(full[layers[0].name], X[layers[0].name])  # truncation changes the product
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep"):
            fac.inverse_eigenvalues("ekfac", 0.05, keep=bad)


def test_eigh_solve_matches_a_solve_and_refuses_an_indefinite_system():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 4, generator=g, dtype=torch.float64)
    M = B @ B.T  # PSD, rank 4
    V = torch.randn(6, 3, generator=g, dtype=torch.float64)
    X = E.eigh_solve(torch.linalg.eigh(M), V, 0.1)
    assert torch.allclose(X, torch.linalg.solve(M + 0.1 * torch.eye(6, dtype=torch.float64), V), rtol=1e-10)
    with pytest.raises(ValueError, match="positive definite"):
        E.eigh_solve(torch.linalg.eigh(M - 2 * torch.eye(6, dtype=torch.float64)), V, 0.1)
    with pytest.raises(ValueError, match="positive definite"):
        E.eigh_solve(torch.linalg.eigh(M), V, 0.0)


def test_tiny_damping_on_a_singular_factor():
    """Twelve examples but 4 x 37 parameters in the first layer: A is singular. The eigenbasis solve stays exact
    for a tiny damping (residual of the damped system), where a float32 explicit inverse would not."""
    net, state, x, y = _cnn(n=3)
    fac = E.fit_factors(net, state, x, y, labels="exact")
    assert min(float(fac.ea[k].min()) for k in fac.layers) < 1e-12 * max(float(fac.ea[k].max()) for k in fac.layers)
    layers = E.layers_of(net)
    V = {l.name: torch.randn(2, l.d_out, l.d_in, dtype=torch.float64) for l in layers}
    for damping in (1e-10, 1e-4, 1.0):
        X = fac.inverse_products(V, "ekfac", damping)
        M = _explicit(fac, "ekfac", {k: damping for k in fac.layers})
        xflat = torch.cat([X[l.name].reshape(2, -1) for l in layers], 1)
        vflat = torch.cat([V[l.name].reshape(2, -1) for l in layers], 1)
        res = (M @ xflat.T - vflat.T).norm() / vflat.norm()
        assert res < 1e-6, (damping, float(res))
        assert torch.isfinite(xflat).all()
    # damping behaves as documented: larger damping, smaller solution, tending to V / damping
    big = fac.inverse_products(V, "ekfac", 1e8)
    assert all(torch.allclose(big[k] * 1e8, V[k], rtol=1e-3) for k in V)


def test_scores_match_the_explicit_formula_and_several_dampings_at_once():
    net, state, x, y = _cnn(n=15)
    xt, yt = x[:4] + 0.1, y[:4]
    fac = E.fit_factors(net, state, x, y, labels="empirical")
    res = E.influence_scores(fac, net, state, x, y, xt, yt, dampings=[1e-3, 1e-1], kinds=["kfac", "ekfac"],
                             weight_decay=0.01, batch_size=4, dtype=torch.float64)
    layers = E.layers_of(net)
    order = E.layer_order(state, layers)
    g_tr = grads.per_example_grads(net, state, x, y, "loss")[:, order]
    g_t = grads.per_example_grads(net, state, xt, yt, "margin")[:, order]
    for kind in ("kfac", "ekfac"):
        for d in (1e-3, 1e-1):
            M = _explicit(fac, kind, {k: d + 0.01 for k in fac.layers})
            ref = -(g_tr @ torch.linalg.solve(M, g_t.T)) / len(y)
            assert torch.allclose(res.scores[(kind, d)], ref, rtol=1e-8, atol=1e-12)
            assert res.seconds[(kind, d)] > 0
    checks.check_informative(res.scores[("ekfac", 1e-3)])


def test_sign_convention_leave_one_out_on_logistic_regression():
    """Logistic regression: one layer, K-FAC close to exact; tau[i, t] predicts the change of target t's margin
    when example i is included, i.e. -(retrain without i) + (trained with all)."""
    g = torch.Generator().manual_seed(0)
    d, C, n, wd = 5, 3, 60, 0.05
    x = torch.randn(n + 3, 1, d, generator=g, dtype=torch.float64)
    w_true = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=(x.flatten(1) @ w_true.T)).sample()
    torch.manual_seed(0)
    net = models.LogisticRegression((1, d), C).double().eval()
    x, y, xt, yt = x[:n], y[:n], x[n:], y[n:]
    full = inf.fit_convex(net, dict(net.named_parameters()), x, y, wd)
    fac = E.fit_factors(net, full, x, y, labels="exact")
    tau = E.influence_scores(fac, net, full, x, y, xt, yt, dampings=[1e-12], weight_decay=wd,
                             dtype=torch.float64).scores[("ekfac", 1e-12)]
    base = measure.margin(functional_call(net, full, (xt,)), yt)
    actual = []
    for i in range(12):
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0
        loo = inf.fit_convex(net, full, x, y, wd, weights=w)
        actual.append((base - measure.margin(functional_call(net, loo, (xt,)), yt)).detach())
    actual = torch.stack(actual)  # effect of including i
    pred = tau[:12]
    r = checks.check_predicts_retraining(pred.flatten(), actual.flatten(), 0.9)
    assert r > 0.9
    with pytest.raises(AssertionError, match="Pearson"):
        checks.check_predicts_retraining(-pred.flatten(), actual.flatten(), 0.9)  # a flipped sign fails


def test_combine():
    a = torch.randn(50, 4, dtype=torch.float64)
    b = 1000 * (a + 0.1 * torch.randn(50, 4, dtype=torch.float64))
    assert torch.allclose(E.combine([a, b]), (a + b) / 2)
    st = E.combine([a, b], "standardized")
    assert torch.allclose(st, (a / a.std(0) + b / b.std(0)) / 2)
    with pytest.raises(ValueError, match="valid"):
        E.combine([a], "median")


def test_lanczos_finds_the_extreme_eigenvalues():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([-3.0, -1.0]), torch.linspace(0, 1, 196, dtype=torch.float64),
                    torch.tensor([5.0, 9.0])])
    M = Q @ torch.diag(ev) @ Q.T
    ritz = E.lanczos_extremes(lambda v: M @ v, 200, steps=60, dtype=torch.float64)
    assert abs(ritz[0] + 3) < 1e-6 and abs(ritz[-1] - 9) < 1e-6 and abs(ritz[-2] - 5) < 1e-6


def test_kronfluence_agrees_with_the_empirical_fisher():
    kf = pytest.importorskip("kronfluence", reason="kronfluence is an optional extra (pip install kronfluence)")
    from course_lib.attribution import ekfac_reference as R

    net, state, x, y = _cnn(n=40)
    net, state = net.float(), {k: v.float() for k, v in state.items()}
    x = x.float()
    xt, yt = x[:5] + 0.05, y[:5]
    for kind in ("ekfac", "kfac"):
        theirs, _ = R.kronfluence_scores(net, state, x, y, xt, yt, strategy=kind, damping=1e-3)
        fac = E.fit_factors(net, state, x, y, labels="empirical")
        ours = E.influence_scores(fac, net, state, x, y, xt, yt, dampings=[1e-3], kinds=[kind])
        ours = ours.scores[(kind, 1e-3)]
        if kind == "ekfac":  # same matrix: same numbers up to the factor -1/n of the course convention
            assert torch.allclose(ours, -theirs / len(y), rtol=1e-3, atol=1e-4 * ours.abs().max())
        assert checks.check_agreement(ours, -theirs, 0.9) > 0.9


def test_factors_survive_the_cache(tmp_path):
    """Factors go through cache.load_or_compute (weights_only loading) as plain containers and come back equal."""
    from course_lib import cache

    net, state, x, y = _cnn()
    fac = E.fit_factors(net, state, x, y, labels="sampled", seed=4)
    spec = {"what": "test"}
    stored = cache.load_or_compute(tmp_path / "f.pt", fac.state, spec)
    back = E.Factors(**cache.load_or_compute(tmp_path / "f.pt", lambda: 1 / 0, spec))
    assert back.layers == fac.layers and back.spec == fac.spec
    assert all(torch.equal(back.lam[k], fac.lam[k]) and torch.equal(back.qa[k], fac.qa[k]) for k in fac.layers)
    assert isinstance(stored, dict)


def test_resnet9_scores_use_the_factored_layers_only():
    """The `gpu` setting's ResNet-9 on CPU (narrow, a few CIFAR-shaped images): convolutions and the head are
    factored, the batch-norm scales and shifts are not (they get no curvature and contribute nothing), and the
    scores equal -(1/n) sum over the factored layers of grad loss_i . (F + lambda)^-1 grad f_t, built from the full
    per-example gradients (batch norm included, then dropped), with the model evaluated through its full state
    (running statistics) in eval mode."""
    from course_lib import data as D, settings, train

    cfg = settings.get("smoke", arch="resnet9", width=2, n_train=24, n_targets=3, epochs=1, batch_size=12,
                       ensemble_size=1, device="cpu")
    data = D.for_setting(cfg)
    trained = train.train_models(cfg, data, train.full_mask(data), [0])
    net, state = trained.net.eval(), trained.state_of(0)
    x, y, xt, yt = data.x_train, data.y_train, data.x_targets, data.y_targets
    layers = E.layers_of(net)
    assert {type(l.module) for l in layers} <= {nn.Conv2d, nn.Linear} and len(layers) >= 8
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    fac = E.fit_factors(net, state, x, y, labels="empirical")
    res = E.influence_scores(fac, net, state, x, y, xt, yt, dampings=[1e-3], kinds=["ekfac"], dtype=torch.float64)
    params = {k: state[k] for k, _ in net.named_parameters()}
    assert sum(l.d_out * l.d_in for l in layers) < sum(v.numel() for v in params.values())  # batch norm left out
    g_tr = E.layer_grads_from_flat(grads.per_example_grads(net, state, x, y, "loss"), params, layers)
    g_t = E.layer_grads_from_flat(grads.per_example_grads(net, state, xt, yt, "margin"), params, layers)
    X = fac.inverse_products(g_t, "ekfac", 1e-3)
    ref = -sum(torch.einsum("noi,toi->nt", g_tr[k].double(), X[k]) for k in fac.layers) / len(y)
    assert torch.allclose(res.scores[("ekfac", 1e-3)], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    checks.check_informative(res.scores[("ekfac", 1e-3)])


def test_kfac_seconds_leave_out_the_eigenvalue_pass():
    """K-FAC is charged its covariances and eigenvectors, not EK-FAC's eigenvalue pass (published to chapter 07)."""
    net, state, x, y = _cnn(n=10)
    fac = E.fit_factors(net, state, x, y, labels="empirical")
    fac.seconds = {"covariance": 1.0, "eigen": 2.0, "lambda": 100.0}  # a slow eigenvalue pass shows in the seconds
    res = E.influence_scores(fac, net, state, x, y, x[:3], y[:3], dampings=[1e-2], kinds=["kfac", "ekfac"],
                             batch_size=5)
    assert 3.0 < res.seconds[("kfac", 1e-2)] < 100.0
    assert res.seconds[("ekfac", 1e-2)] > 103.0
