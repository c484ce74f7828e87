import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, LassoCV, Ridge

from course_lib import lds, train
from course_lib.attribution import datamodels as dm
from course_lib.lds import GroundTruth


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny products on a shared 2-core machine: threads only add contention
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _planted(n=80, m=400, T=5, nnz=6, noise=0.1, seed=0, stream="planted"):
    """Masks from a stream of their own, a sparse planted weight matrix, and noisy linear outputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(n, T, dtype=torch.float64)
    for t in range(T):
        w[torch.randperm(n, generator=g)[:nnz], t] = 2 * torch.randn(nnz, generator=g, dtype=torch.float64)
    masks = lds.subset_masks(n, m, 0.5, seed, stream=stream)
    bias = torch.randn(T, generator=g, dtype=torch.float64)
    y = masks.double() @ w + bias + noise * torch.randn(m, T, generator=g, dtype=torch.float64)
    return masks, y, w, bias


def _heldout_gt(w, bias, m=60, noise=0.1):
    n, T = w.shape
    masks = lds.subset_masks(n, m, 0.5, 0, stream="lds")
    g = torch.Generator().manual_seed(123)
    out = masks.double() @ w + bias + noise * torch.randn(m, T, generator=g, dtype=torch.float64)
    return GroundTruth(masks, out[:, None, :].float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)


def test_lasso_recovers_planted_sparse_model():
    masks, y, w, bias = _planted()
    fit = dm.fit_lasso(masks, y, dtype=torch.float64)
    assert fit.weights.shape == w.shape and fit.bias.shape == (w.shape[1],)
    assert (fit.weights.double() - w).abs().max() < 0.1
    assert (fit.bias.double() - bias).abs().max() < 0.25
    # the support is found: every planted weight is nonzero, and most absent ones are exactly zero
    assert (fit.weights[w != 0] != 0).all()
    assert (fit.weights[w == 0] == 0).double().mean() > 0.7
    assert fit.seconds > 0 and fit.penalty.shape == (w.shape[1],)
    score = lds.lds(fit.weights, _heldout_gt(w, bias))
    assert score.mean > 0.97 and score.ci[0] > 0.95
    # random scores do not: the LDS check can fail
    assert lds.lds(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)), _heldout_gt(w, bias)).mean < 0.5


def test_ridge_and_difference_of_means_on_planted_model():
    masks, y, w, bias = _planted(nnz=20)
    gt = _heldout_gt(w, bias)
    ridge = dm.fit_ridge(masks, y)
    assert (ridge.weights.double() - w).abs().max() < 0.2
    assert lds.lds(ridge.weights, gt).mean > 0.95
    dom = dm.difference_of_means(masks, y)
    assert lds.lds(dom.weights, gt).mean > 0.8
    # predictions of the fitted model match the held-out outputs
    pred = ridge.predict(gt.masks)
    assert torch.corrcoef(torch.stack([pred[:, 0], gt.outputs[:, 0, 0]]))[0, 1] > 0.95


def test_lasso_matches_sklearn_at_fixed_penalty():
    masks, y, _, _ = _planted(n=40, m=120, T=3, noise=0.5, seed=2)
    for lam in (0.02, 0.2):
        fit = dm.fit_lasso(masks, y, penalties=[lam], dtype=torch.float64, tol=1e-9, max_iter=20000)
        for t in range(3):
            ref = Lasso(alpha=lam, tol=1e-12, max_iter=200000).fit(masks.double().numpy(), y[:, t].numpy())
            assert np.abs(fit.weights[:, t].numpy() - ref.coef_).max() < 1e-5
            assert abs(float(fit.bias[t]) - ref.intercept_) < 1e-5


def test_lasso_cross_validation_matches_sklearn():
    masks, y, _, _ = _planted(n=40, m=150, T=3, noise=1.0, seed=3)
    grid = np.geomspace(0.5, 0.005, 6)
    fit = dm.fit_lasso(masks, y, penalties=grid, cv=3, seed=7, patience=None, dtype=torch.float64, tol=1e-9,
                       max_iter=20000)
    folds = dm._folds(len(masks), 3, 7)
    splits = [(np.setdiff1d(np.arange(len(masks)), f.numpy()), f.numpy()) for f in folds]
    for t in range(3):
        ref = LassoCV(alphas=grid, cv=splits, tol=1e-12, max_iter=200000).fit(masks.double().numpy(),
                                                                              y[:, t].numpy())
        # same validation errors on the grid (sklearn stores them largest penalty first, like fit.penalties)
        assert np.allclose(fit.cv_error[t].numpy(), ref.mse_path_.mean(1), rtol=1e-4)
        # ... and on every fold (cv_fold_error: folds x targets x penalties; sklearn: penalties x folds)
        assert np.allclose(fit.cv_fold_error[:, t].numpy().T, ref.mse_path_, rtol=1e-4)
        assert float(fit.penalty[t]) == pytest.approx(ref.alpha_)
        assert np.abs(fit.weights[:, t].numpy() - ref.coef_).max() < 1e-5
    # stopping each target's path early (after its validation error stops improving) keeps the same choice here
    early = dm.fit_lasso(masks, y, penalties=grid, cv=3, seed=7, dtype=torch.float64, tol=1e-9, max_iter=20000)
    assert torch.equal(early.penalty, fit.penalty)
    reached = ~torch.isnan(early.cv_error)
    assert torch.allclose(early.cv_error[reached], fit.cv_error[reached])


def test_ridge_matches_sklearn_and_brute_force_leave_one_out():
    masks, y, _, _ = _planted(n=30, m=25, T=2, noise=1.0, seed=4)  # fewer models than examples
    grid = [0.3, 3.0, 30.0]
    fit = dm.fit_ridge(masks, y, penalties=grid)
    X = masks.double().numpy()
    for t in range(2):
        for l, lam in enumerate(grid):
            errs = []
            for j in range(len(X)):
                keep = np.arange(len(X)) != j
                r = Ridge(alpha=lam).fit(X[keep], y[keep, t].numpy())
                errs.append((r.predict(X[j:j + 1])[0] - float(y[j, t])) ** 2)
            assert float(fit.cv_error[t, l]) == pytest.approx(np.mean(errs), rel=1e-6)
        ref = Ridge(alpha=float(fit.penalty[t])).fit(X, y[:, t].numpy())
        assert np.abs(fit.weights[:, t].numpy() - ref.coef_).max() < 1e-5
        assert abs(float(fit.bias[t]) - ref.intercept_) < 1e-5


def test_difference_of_means_matches_loop():
    masks, y, _, _ = _planted(n=12, m=30, T=2, seed=5)
    fit = dm.difference_of_means(masks, y)
    for i in range(12):
        for t in range(2):
            inside = y[masks[:, i], t].mean() - y[~masks[:, i], t].mean()
            assert float(fit.weights[i, t]) == pytest.approx(float(inside), abs=1e-5)


def test_datamodel_subsets_are_not_the_lds_subsets(smoke):
    n, m = 500, 64
    dm_masks, dm_seeds = dm.training_masks(smoke, n, m)
    gt_masks = lds.subset_masks(n, smoke.gt_subsets, smoke.alpha, smoke.gt_seed)
    gt_seeds = lds.model_seeds(smoke.gt_subsets, smoke.gt_models, smoke.gt_seed)
    assert torch.equal(dm_masks, lds.subset_masks(n, m, smoke.alpha, smoke.seed, stream="datamodels"))
    # separate streams: no shared subset, no shared training seed, and not merely a shifted copy
    assert not any(torch.equal(a, b) for a in dm_masks for b in gt_masks)
    assert not set(dm_seeds.tolist()) & set(gt_seeds.flatten().tolist())
    overlap = (dm_masks[:, None] & gt_masks[None]).sum(-1).double() / (smoke.alpha * n)
    assert overlap.max() < 0.7 and abs(overlap.mean() - smoke.alpha) < 0.02
    # even when the datamodel seed equals the ground-truth seed
    same_seed = lds.subset_masks(n, m, smoke.alpha, smoke.gt_seed, stream="datamodels")
    assert not any(torch.equal(a, b) for a in same_seed for b in gt_masks)
    # the first m models are a prefix of a longer draw (a larger budget reuses the cache)
    longer, longer_seeds = dm.training_masks(smoke, n, 2 * m)
    assert torch.equal(longer[:m], dm_masks) and torch.equal(longer_seeds[:m], dm_seeds)


def test_training_data_is_cached_and_resumes(smoke, smoke_data, tmp_path, monkeypatch):
    cfg = smoke.replace(epochs=1, ensemble_size=4)
    td = dm.training_data(cfg, smoke_data, m=6, cache=tmp_path, progress=False)
    assert td.outputs.shape == (6, len(smoke_data.y_test)) and td.masks.shape == (6, smoke_data.n_train)
    assert torch.equal(td.masks, dm.training_masks(cfg, smoke_data.n_train, 6)[0])
    assert td.target_outputs().shape == (6, len(smoke_data.target_idx)) and td.seconds > 0

    calls = []
    real = train.train_models
    monkeypatch.setattr(train, "train_models", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    fewer = dm.training_data(cfg, smoke_data, m=5, cache=tmp_path, progress=False)  # a prefix: nothing trained
    assert calls == [] and torch.equal(fewer.outputs, td.outputs[:5])
    again = dm.training_data(cfg, smoke_data, m=8, cache=tmp_path, progress=False)  # only models 6 and 7
    assert calls == [2] and torch.equal(again.outputs[:6], td.outputs)
    calls.clear()
    more = dm.training_data(cfg.replace(ensemble_size=3), smoke_data, m=10, cache=tmp_path, progress=False)
    assert calls == [2] and torch.equal(more.outputs[:8], again.outputs)  # another chunk size reuses every part
    # the recorded outputs are the margins of the model trained on that subset with that seed
    model = real(cfg, smoke_data, more.masks[9:10], more.seeds[9:10])
    assert torch.allclose(model.outputs(smoke_data.x_test, smoke_data.y_test)[0], more.outputs[9], atol=1e-4)


def test_bad_input_is_rejected():
    masks, y, _, _ = _planted(n=10, m=20, T=2)
    with pytest.raises(ValueError, match="same m"):
        dm.fit_lasso(masks[:5], y)
    with pytest.raises(ValueError, match="cv folds"):
        dm.fit_lasso(masks, y, cv=1)
    with pytest.raises(ValueError, match="positive"):
        dm.fit_ridge(masks, y, penalties=[0.0])
    with pytest.raises(ValueError, match="NaN"):
        dm.difference_of_means(masks, y * float("nan"))
    with pytest.raises(ValueError, match="valid: lasso, ridge, dom"):
        dm.fit("elastic", masks, y)


def test_fit_dispatch_predict_and_examples_always_in_or_out():
    """(gaps found by mutation testing) ``fit`` passes masks and outputs on to the method; ``predict`` is
    bias + the sum of the included weights; an example in every subset, or in none, gets weight 0 from the
    difference of means (its in- or out-mean does not exist)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 6, generator=g) < 0.5
    masks[:, 0] = True  # always in
    masks[:, 1] = False  # never in
    masks[:, 2], masks[:, 3] = False, True
    masks[0, 2], masks[0, 3] = True, False  # in exactly once, out exactly once: defined
    outputs = torch.randn(40, 3, generator=g, dtype=torch.float64)
    f = dm.fit("dom", masks, outputs)
    ref = dm.difference_of_means(masks, outputs)
    assert torch.equal(f.weights, ref.weights) and torch.equal(f.bias, ref.bias)
    # on TrainingData: its masks and its outputs on its targets (columns 5, 2, 0 of 6 test outputs)
    td = dm.TrainingData(masks, torch.cat([outputs, -outputs], 1)[:, [2, 4, 1, 3, 5, 0]], torch.ones(40),
                         torch.arange(40), torch.tensor([5, 2, 0]), 0.0)
    f_td = dm.fit("dom", td)
    assert torch.equal(f_td.weights, ref.weights) and torch.equal(f_td.bias, ref.bias)
    # keyword arguments reach the method
    strong, weak = dm.fit("ridge", masks, outputs, penalties=[1e3]), dm.fit("ridge", masks, outputs, penalties=[1e-3])
    assert torch.equal(strong.weights, dm.fit_ridge(masks, outputs, penalties=[1e3]).weights)
    assert strong.weights.abs().sum() < weak.weights.abs().sum()
    assert (f.weights[:2] == 0).all() and (f.weights[2:] != 0).all()
    m = masks[:5]
    assert torch.allclose(f.predict(m), torch.stack([f.bias + f.weights[row].sum(0) for row in m]))


def test_keep_largest_keeps_each_targets_k_largest_absolute_weights():
    W = torch.tensor([[3.0, 0.1], [-5.0, 0.2], [1.0, -0.3], [0.5, 0.0]])
    cut = dm.keep_largest(W, torch.tensor([2, 1]))
    assert torch.equal(cut, torch.tensor([[3.0, 0.0], [-5.0, 0.0], [0.0, -0.3], [0.0, 0.0]]))
    assert torch.equal(dm.keep_largest(W, 0), torch.zeros_like(W))
    assert torch.equal(dm.keep_largest(W, 4), W)
    # a broken cut that keeps the largest signed weights would drop -5 and keep 1: the test above sees it
    assert not torch.equal(cut, torch.where(W.argsort(0, descending=True).argsort(0) < 2, W, 0 * W))
    for bad in (5, -1, torch.tensor([1, 2, 3]), 1.5):
        with pytest.raises(ValueError):
            dm.keep_largest(W, bad)
