"""TRAK (chapter 06): projections, features, the damped GLM influence step, and the reference implementation."""
import math
import zlib

import pytest
import torch
from torch.func import functional_call

from course_lib import measure, models, settings, train
from course_lib.attribution import trak as T
from course_lib.train import Models


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_preserves_inner_products(kind):
    """Johnson-Lindenstrauss: <P^T a, P^T b> = <a, b> +- eps |a||b| for all pairs, with eps ~ sqrt(log(pairs)/k);
    the error shrinks like 1/sqrt(k); the estimate is unbiased (averaged over seeds)."""
    p, n = 2000, 12
    a = torch.randn(n, p, dtype=torch.float64)
    a[1] = a[0] + 0.3 * a[1]  # some correlated pairs
    exact = a @ a.T
    norms = exact.diagonal().sqrt()
    errs = {}
    for k in (64, 1024):
        fa = T.RandomProjection(p, k, kind, seed=1, dtype=torch.float64).project(a)
        rel = ((fa @ fa.T) - exact) / (norms[:, None] * norms[None])
        errs[k] = rel.abs().max().item()
        # variance of each entry <= 2 |a|^2 |b|^2 / k; 6 sigma covers all 78 pairs with a wide margin
        assert errs[k] < 6 * math.sqrt(2 / k), (k, errs[k])
    assert errs[1024] < errs[64] / 2
    # unbiased: the mean over 100 seeds of <Pa, Pb> (k=16) is within 5 standard errors of <a, b>
    est = torch.stack([(lambda f: f[0] @ f[1])(T.RandomProjection(p, 16, kind, seed=s, dtype=torch.float64)
                                                 .project(a[:2])) for s in range(100)])
    se = math.sqrt(2 / 16 / 100) * (norms[0] * norms[1]).item()
    assert abs(est.mean().item() - exact[0, 1].item()) < 5 * se
    # a projection without the 1/sqrt(k) scale would be off by a factor k: this test would catch it
    assert abs((fa.norm(dim=1) / norms).mean().item() - 1) < 0.1


def test_projection_blocks_equal_one_shot():
    p, k = 2500, 40
    g = torch.randn(7, p)
    whole = T.RandomProjection(p, k, "rademacher", seed=3)  # fits in memory: made once and kept
    streamed = T.RandomProjection(p, k, "rademacher", seed=3, block_rows=1024, max_bytes=0)
    assert streamed._full is None and streamed.num_blocks == 3
    assert torch.equal(whole.matrix(), streamed.matrix())
    assert torch.allclose(streamed.project(g), g @ whole.matrix(), atol=1e-5)
    assert torch.allclose(streamed.project(g), whole.project(g), atol=1e-5)
    assert torch.allclose(whole.matrix().abs() * math.sqrt(k), torch.ones(p, k))
    assert abs(whole.matrix().sign().mean()) < 0.02
    # block b is rows [b * block_rows, ...) of the one-shot matrix
    assert torch.equal(streamed.block(1), whole.matrix()[1024:2048])
    # seeded: same seed same matrix, another seed another matrix; gaussian differs from rademacher
    assert torch.equal(T.RandomProjection(p, k, "gaussian", seed=3).matrix(),
                       T.RandomProjection(p, k, "gaussian", seed=3, max_bytes=0).matrix())
    assert not torch.equal(whole.matrix(), T.RandomProjection(p, k, "rademacher", seed=4).matrix())
    with pytest.raises(ValueError, match="valid"):
        T.RandomProjection(p, k, "sparse")
    with pytest.raises(ValueError, match="columns"):
        whole.project(torch.randn(3, p + 1))


def _logreg_models(n_models=2, d=12, c=3, n=90, seed=0):
    """Tiny multinomial logistic regressions (p = c (d + 1) = 39 < n) with random weights, and their data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 20, 1, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n + 20,), generator=g)
    net = models.LogisticRegression((1, d), c).double()
    params = {"linear.weight": torch.randn(n_models, c, d, generator=g, dtype=torch.float64),
              "linear.bias": torch.randn(n_models, c, generator=g, dtype=torch.float64)}
    ms = Models(net, params, {}, torch.arange(n_models), torch.ones(n_models, n, dtype=torch.bool))
    return ms, x[:n], y[:n], x[n:], y[n:]


def _closed_form_features(w, b, x, y):
    """Margin gradient of logistic regression by hand: d margin / d logits = e_y - softmax over the other
    classes; d logits_c / d (W_c, b_c) = (x, 1). Returns (n, c * d + c) in the parameter order (W, b)."""
    x = x.flatten(1)
    logits = x @ w.T + b
    is_y = torch.nn.functional.one_hot(y, w.shape[0]).bool()
    s = logits.masked_fill(is_y, float("-inf")).softmax(-1)
    dz = is_y.double() - s
    return torch.cat([(dz[:, :, None] * x[:, None, :]).flatten(1), dz], 1), 1 - logits.softmax(-1)[is_y]


def test_identity_projection_on_logistic_regression_equals_closed_form():
    ms, x, y, xt, yt = _logreg_models()
    res = T.trak(ms, x, y, xt, yt, kind="identity", damping=1e-3, progress=False)
    kernels, qs = [], []
    for m in range(len(ms)):
        w, b = ms.params["linear.weight"][m], ms.params["linear.bias"][m]
        phi, q = _closed_form_features(w, b, x, y)
        phi_t, _ = _closed_form_features(w, b, xt, yt)
        k = phi.T @ phi
        lam = 1e-3 * k.trace() / len(k)
        kernels.append(phi @ torch.linalg.inv(k + lam * torch.eye(len(k), dtype=k.dtype)) @ phi_t.T)
        qs.append(q)
        assert torch.allclose(res.q[m], q, atol=1e-10)
    expected = torch.stack(kernels).mean(0) * torch.stack(qs).mean(0)[:, None]
    assert torch.allclose(res.scores(), expected, rtol=1e-6, atol=1e-9)
    assert torch.allclose(res.scores(q="per_model"), (torch.stack(kernels) * torch.stack(qs)[..., None]).mean(0),
                          rtol=1e-6, atol=1e-9)
    assert torch.allclose(res.scores(m=1), kernels[0] * qs[0][:, None], rtol=1e-6, atol=1e-9)
    # and the undamped limit is the exact GLM least-squares influence (the kernel is invertible here: n > p)
    tiny = T.trak(ms.select([0]), x, y, xt, yt, kind="identity", damping=1e-12, progress=False).scores()
    phi, q = _closed_form_features(ms.params["linear.weight"][0], ms.params["linear.bias"][0], x, y)
    phi_t, _ = _closed_form_features(ms.params["linear.weight"][0], ms.params["linear.bias"][0], xt, yt)
    assert torch.allclose(tiny, phi @ torch.linalg.solve(phi.T @ phi, phi_t.T) * q[:, None], rtol=1e-5,
                          atol=1e-8)


def test_damped_solve_never_inverts_a_singular_kernel():
    """A rank-10 512x512 kernel (the published bug: batch-summed gradients) is singular; the damped solve is
    finite, matches the ridge formula in its dual form, and refuses zero damping."""
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(64, 10, generator=g) @ torch.randn(10, 512, generator=g)
    phi_t = torch.randn(5, 512, generator=g)
    kernel = phi.double().T @ phi.double()
    assert torch.linalg.matrix_rank(kernel) == 10
    out = T.kernel_solve(phi, phi_t, damping=1e-2)
    assert torch.isfinite(out).all() and out.shape == (64, 5)
    lam = 1e-2 * kernel.trace() / 512
    a, b = phi.double(), phi_t.double()
    dual = torch.linalg.solve(a @ a.T + lam * torch.eye(64, dtype=torch.float64), a @ b.T)  # push-through identity
    assert torch.allclose(out.double(), dual, rtol=1e-3, atol=1e-6 * dual.abs().max())
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping"):
            T.kernel_solve(phi, phi_t, damping=bad)
    with pytest.raises(ValueError, match="all zero"):
        T.kernel_solve(torch.zeros(4, 3), torch.ones(2, 3))


def _exact_kernel_solve(a, b, lam, digits=60):
    """A (A^T A + lam I)^{-1} B^T = (A A^T + lam I)^{-1} A B^T (push-through identity), an n x n solve in
    ``digits``-digit arithmetic (mpmath): a reference independent of float64 round-off and of our SVD."""
    import mpmath

    mpmath.mp.dps = digits
    A, B = mpmath.matrix(a.double().tolist()), mpmath.matrix(b.double().tolist())
    lam = mpmath.mpf(lam)
    M = A * A.T + lam * mpmath.eye(A.rows)
    R = A * B.T
    cols = [mpmath.lu_solve(M, R[:, j]) for j in range(R.cols)]
    return torch.tensor([[float(c[i]) for c in cols] for i in range(A.rows)], dtype=torch.float64)


@pytest.mark.parametrize("damping", [1e-16, 1e-12, 1e-6, 1e-2, 1.0, 1e3])
@pytest.mark.parametrize("relative", [True, False])
def test_damped_solve_is_exact_for_every_positive_damping(damping, relative):
    """A 7 x 64 feature matrix of rank 5 (two duplicated rows): every positive damping gives finite scores equal
    to the exact answer to 1e-6 relative (a Cholesky solve failed at 1e-16 and was 0.4% off at 1e-12)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 64, generator=g, dtype=torch.float64)
    a = torch.cat([base, base[:2]])  # rows 5, 6 duplicate rows 0, 1
    b = torch.randn(3, 64, generator=g, dtype=torch.float64)
    assert torch.linalg.matrix_rank(a) == 5
    _check_against_exact(a, b, damping, relative)
    # duplicated examples get identical scores
    out = T.kernel_solve(a, b, damping=damping, relative=relative)
    assert torch.allclose(out[5], out[0], rtol=1e-9) and torch.allclose(out[6], out[1], rtol=1e-9)
    # more examples than features (the kernel path instead of the Gram path): 30 x 16 of rank 10 (6 duplicated
    # feature columns, so the rank deficiency is exact in float64, as in the mpmath reference)
    cols = torch.randn(30, 10, generator=g, dtype=torch.float64)
    tall = torch.cat([cols, cols[:, :6]], 1)
    _check_against_exact(tall, torch.randn(3, 16, generator=g, dtype=torch.float64), damping, relative)


def _check_against_exact(a, b, damping, relative):
    lam = damping * float((a ** 2).sum()) / a.shape[1] if relative else damping
    ref = _exact_kernel_solve(a, b, lam)
    out = T.kernel_solve(a, b, damping=damping, relative=relative)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 1e-6
    # several dampings from one SVD give the same as one at a time
    both = T.kernel_solve_dampings(a, b, [damping, 2 * damping], relative)
    assert torch.equal(both[damping], out)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1"])
def test_damped_solve_refuses_bad_damping_and_features(bad):
    a, b = torch.randn(6, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="damping must be a finite positive number"):
        T.kernel_solve(a, b, damping=bad)
    a[2, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="training features: 1 of 24 entries are NaN or infinite"):
        T.kernel_solve(a, b)


def test_features_are_per_example_gradients(smoke, smoke_data):
    """Each row is that example's own margin gradient at the trained parameters: equal to the gradient of the
    example alone, summing to the gradient of the batch sum, full rank, and matching finite differences."""
    torch.manual_seed(1)
    net = train.build_model(smoke, smoke_data).double()
    params = {k: v.detach().double() for k, v in net.named_parameters()}
    x, y = smoke_data.x_train[:12].double(), smoke_data.y_train[:12]
    phi = T.featurize(net, params, x, y, batch_size=5, chunk=8)
    p = sum(v.numel() for v in params.values())
    assert phi.shape == (12, p)
    assert torch.linalg.matrix_rank(phi) == 12  # batch-summed gradients would give rank 1
    for i in (0, 7):
        alone = T.featurize(net, params, x[i:i + 1], y[i:i + 1])[0]
        assert torch.allclose(phi[i], alone, atol=1e-10)
    live = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = measure.margin(functional_call(net, live, (x,)), y).sum()
    summed = torch.cat([t.reshape(-1) for t in torch.autograd.grad(total, list(live.values()))])
    assert torch.allclose(phi.sum(0), summed, atol=1e-8)
    v = torch.randn(p, dtype=torch.float64)
    eps = 1e-6

    def f(shift):
        shifted = {k: t + shift * dv for (k, t), dv in zip(params.items(), T.G.unflatten(v, params).values())}
        return measure.margin(functional_call(net, shifted, (x[3:4],)), y[3:4])[0]
    assert torch.allclose((f(eps) - f(-eps)) / (2 * eps), phi[3] @ v, rtol=1e-5, atol=1e-7)
    # fn='loss' gives the loss gradient, a different feature
    loss_phi = T.featurize(net, params, x[:3], y[:3], fn="loss")
    assert not torch.allclose(loss_phi, phi[:3])


def test_scores_are_in_the_course_convention(smoke, smoke_data):
    """An example's score on itself (as a target) is positive (including it raises its own margin), shapes are
    (n_train, n_targets), soft-thresholding zeroes the requested share of each column."""
    ms = train.reference_models(smoke, smoke_data, 1)
    x, y = smoke_data.x_train[:200], smoke_data.y_train[:200]
    res = T.trak(ms, x, y, x[:30], y[:30], proj_dim=128, progress=False)
    s = res.scores()
    assert s.shape == (200, 30) and res.seconds.shape == (1,) and res.time() > 0
    assert (s[torch.arange(30), torch.arange(30)] > 0).all()  # phi K^-1 phi > 0 and Q > 0 even when p ~ 1
    assert (res.q > 0).all() and (res.q < 1).all()
    thr = res.scores(sparsity=0.8)
    assert ((thr == 0).float().mean(0) - 0.8).abs().max() < 0.02
    assert torch.equal(thr.sign()[thr != 0], s.sign()[thr != 0])
    # the sweep over k computes gradients once and gives each k exactly what a run with that k alone gives
    swept = T.trak_sweep(ms, x, y, x[:30], y[:30], proj_dims=[32, 128], chunk=150, progress=False)
    assert torch.allclose(swept[128].kernel_scores, res.kernel_scores, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(swept[32].kernel_scores, res.kernel_scores, rtol=1e-2)
    with pytest.raises(ValueError, match="m must"):
        res.scores(m=2)
    with pytest.raises(ValueError, match="q mode"):
        res.scores(q="median")


def test_agrees_with_reference_traker(smoke, smoke_data):
    """Same checkpoints, same projection matrices (ours plugged into traker), float32: the scores agree with the
    reference library. The one convention that differs: traker divides each model's inverse kernel by the mean of
    its absolute entries before averaging over models, which reweights the models (with one model it is only a
    global scale). Reweighting ours the same way must reproduce traker's scores; unweighted they correlate > 0.98."""
    pytest.importorskip("trak", reason="traker (the outside reference for TRAK) is not installed, so it was NOT "
                        "compared: pip install -e '.[traker]' (make setup and environment.yml install it)")
    ms = train.reference_models(smoke, smoke_data, 2)
    x, y = smoke_data.x_train[:300], smoke_data.y_train[:300]
    xt, yt = smoke_data.x_targets[:20], smoke_data.y_targets[:20]
    k = 128
    res = T.trak(ms, x, y, xt, yt, proj_dim=k, damping=1e-6, progress=False)
    theirs, _ = T.traker_scores(ms, x, y, xt, yt, proj_dim=k, projection="ours")
    weights = []
    for m in range(2):
        params = ms.params_of(m)
        proj = T.RandomProjection(sum(v.numel() for v in params.values()), k, seed=m)
        phi = T.featurize(ms.net, params, x, y, proj).double()
        weights.append(1 / torch.linalg.inv(phi.T @ phi).abs().mean())
    w = torch.stack(weights)[:, None, None].float()
    reweighted = (res.kernel_scores * w).sum(0) * res.q.mean(0)[:, None]
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1]
    assert corr(reweighted, theirs) > 0.9999, corr(reweighted, theirs)
    assert corr(res.scores(), theirs) > 0.98, corr(res.scores(), theirs)



def _tile_by_tile(p, k, kind, seed, dtype=torch.float32, tile=1024):
    """The projection matrix built independently of RandomProjection, as its docstring specifies: tile j (rows
    j * 1024 ...) drawn from its own generator seeded by crc32('trak-projection:{seed}:{j}'), N(0, 1) entries
    in the features' dtype (their signs for 'rademacher', zero counted as +), scaled by 1/sqrt(k)."""
    tiles = []
    for j in range(-(-p // tile)):
        g = torch.Generator().manual_seed(zlib.crc32(f"trak-projection:{seed}:{j}".encode()))
        z = torch.randn(min(tile, p - j * tile), k, generator=g, dtype=dtype)
        tiles.append((torch.where(z >= 0, 1.0, -1.0).to(dtype) if kind == "rademacher" else z) / math.sqrt(k))
    return torch.cat(tiles)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_equals_a_matrix_built_tile_by_tile(kind):
    """Kept whole, streamed in blocks of one tile, or in blocks of 1,500 rows (rounded up to 2,048): the matrix,
    every block and the projections equal the independently built one (p = 2,500: the last tile is partial).
    Measured: projections within 7.2e-6 of g @ P (entries up to 27) in float32, by summation order alone."""
    p, k, seed = 2500, 40, 7
    expected = _tile_by_tile(p, k, kind, seed)
    g = torch.randn(7, p, generator=torch.Generator().manual_seed(0))
    ref = (g.double() @ expected.double()).float()
    for rp in (T.RandomProjection(p, k, kind, seed=seed),
               T.RandomProjection(p, k, kind, seed=seed, block_rows=1024, max_bytes=0),
               T.RandomProjection(p, k, kind, seed=seed, block_rows=1500, max_bytes=0)):
        assert torch.equal(rp.matrix(), expected)
        for b in range(rp.num_blocks):
            assert torch.equal(rp.block(b), expected[b * rp.block_rows:(b + 1) * rp.block_rows])
        err = (rp.project(g) - ref).abs().max().item()
        assert err < 2e-6 * ref.abs().max().item(), err
    assert T.RandomProjection(p, k, kind, seed=seed, block_rows=1500, max_bytes=0).num_blocks == 2


def test_trak_sweep_equals_an_explicit_computation():
    """trak_sweep for two projection dimensions on two logistic regressions, against the computation written out:
    closed-form margin gradients, projected by the tile-built matrix of model m (seed + m), kernel
    K = Phi^T Phi, lambda = damping * trace(K) / k, scores Phi (K + lambda I)^{-1} Phi_t^T, Q = 1 - p(correct).
    Chunks of 40 cut the 90 training and 20 target examples mid-way. Measured (float64): scores at most 1.6e-15 of
    their largest apart, Q 1.7e-16; with every model on one projection (seed, not seed + m) model 1 is 0.7-1.0 off."""
    ms, x, y, xt, yt = _logreg_models()
    seed, damping = 5, 0.3
    swept = T.trak_sweep(ms, x, y, xt, yt, proj_dims=[8, 20], seed=seed, damping=damping, chunk=40, progress=False)
    assert sorted(swept) == [8, 20]
    for k, res in swept.items():
        assert res.kernel_scores.shape == (2, 90, 20) and res.q.shape == (2, 90) and (res.seconds > 0).all()
        for m in range(2):
            w, b = ms.params["linear.weight"][m], ms.params["linear.bias"][m]
            phi, q = _closed_form_features(w, b, x, y)
            phi_t, _ = _closed_form_features(w, b, xt, yt)
            P = _tile_by_tile(phi.shape[1], k, "rademacher", seed + m, torch.float64)
            a, c = phi @ P, phi_t @ P
            kern = a.T @ a
            lam = damping * kern.trace() / k
            expected = a @ torch.linalg.solve(kern + lam * torch.eye(k, dtype=kern.dtype), c.T)
            err = (res.kernel_scores[m] - expected).abs().max().item()
            assert err < 1e-11 * expected.abs().max().item(), (k, m, err)  # measured 1.6e-15 (float64)
            assert torch.allclose(res.q[m], q, rtol=0, atol=1e-12)


def test_trak_damping_sweep_equals_trak_for_every_damping():
    """trak_damping_sweep (gradients once per model, every (k, damping) pair re-solved, only the mean over models
    kept) against trak_sweep run once per damping on two logistic regressions: the same model-averaged kernel
    scores, Q and scores for every pair. Giving every model one projection, mixing up the dampings or averaging
    with the wrong weight would fail (the dampings' scores differ by far more than the tolerance)."""
    ms, x, y, xt, yt = _logreg_models()
    seed, dampings, ks = 5, [0.01, 0.3, 10.0], [8, 20]
    swept = T.trak_damping_sweep(ms, x, y, xt, yt, proj_dims=ks, dampings=dampings, seed=seed, chunk=40,
                                 progress=False)
    assert sorted(swept["kernel"]) == ks and all(sorted(v) == dampings for v in swept["kernel"].values())
    assert all(s > 0 for s in swept["seconds"].values())
    for d in dampings:
        ref = T.trak_sweep(ms, x, y, xt, yt, proj_dims=ks, seed=seed, damping=d, chunk=40, progress=False)
        for k, res in ref.items():
            scale = res.kernel_scores.abs().max().item()
            assert (swept["kernel"][k][d] - res.kernel_scores.mean(0)).abs().max().item() < 1e-10 * scale, (k, d)
            assert torch.allclose(swept["kernel"][k][d] * swept["q"][:, None], res.scores(), rtol=1e-8, atol=1e-12)
        assert torch.allclose(swept["q"], ref[ks[0]].q.mean(0), rtol=0, atol=1e-12)
    far = (swept["kernel"][20][0.01] - swept["kernel"][20][10.0]).abs().max().item()
    assert far > 1e-3 * swept["kernel"][20][0.01].abs().max().item()


def test_trak_dampings_equals_trak_for_every_damping():
    """trak_dampings (features once per model, every damping re-solved, every model's scores kept) against trak run
    once per damping on two logistic regressions: the same per-model kernel scores and Q, so ``scores(m=M)`` is the
    ensemble of the first M models at that damping; every result carries the same seconds (gradients, projection
    and all the solves). Mixing up the dampings or the models' projections would fail: the dampings' scores differ
    by far more than the tolerance."""
    ms, x, y, xt, yt = _logreg_models()
    seed, dampings = 5, [0.01, 0.3, 10.0]
    got = T.trak_dampings(ms, x, y, xt, yt, dampings, proj_dim=8, seed=seed, chunk=40, progress=False)
    assert sorted(got) == dampings
    for d in dampings:
        ref = T.trak(ms, x, y, xt, yt, proj_dim=8, seed=seed, damping=d, chunk=40, progress=False)
        scale = ref.kernel_scores.abs().max().item()
        assert (got[d].kernel_scores - ref.kernel_scores).abs().max().item() < 1e-10 * scale, d
        assert torch.allclose(got[d].q, ref.q, rtol=0, atol=1e-12)
        for m in (1, 2):
            assert torch.allclose(got[d].scores(m=m), ref.scores(m=m), rtol=1e-8, atol=1e-12)
        assert torch.equal(got[d].seconds, got[dampings[0]].seconds) and (got[d].seconds > 0).all()
    far = (got[0.01].kernel_scores - got[10.0].kernel_scores).abs().max().item()
    assert far > 1e-3 * got[0.01].kernel_scores.abs().max().item()


def test_projection_overflow_is_an_error_not_inf():
    """float16 holds at most 65504: projecting large gradients in half precision overflows. That must stop with an
    error where it happens, not turn every later score into inf or NaN."""
    proj = T.RandomProjection(64, 16, "gaussian", seed=0, dtype=torch.float16)
    fine = proj.project(torch.randn(3, 64))
    assert torch.isfinite(fine).all()
    with pytest.raises(FloatingPointError, match=r"projected features \(torch.float16\)"):
        proj.project(torch.full((3, 64), 1e5))
    with pytest.raises(FloatingPointError, match="features to project"):
        proj.project(torch.full((3, 64), float("nan")))


def test_soft_threshold_accepts_zero_and_refuses_one():
    """(gaps found by mutation testing: the bounds of ``sparsity`` were never tried) sparsity 0 shrinks each column
    by its smallest |score|; 1 and beyond, or below 0, are refused."""
    s = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(T.soft_threshold(s, 0.0), s.sign() * (s.abs() - s.abs().min(0).values), rtol=0, atol=1e-7)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^sparsity must lie in \[0, 1\), got {bad}$"):
            T.soft_threshold(s, bad)
