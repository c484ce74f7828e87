import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from course_lib import lds, train
from course_lib.lds import GroundTruth


def test_subset_masks():
    m = lds.subset_masks(100, 20, 0.5, seed=3)
    assert m.shape == (20, 100) and (m.sum(1) == 50).all()
    assert torch.equal(m, lds.subset_masks(100, 20, 0.5, seed=3))
    assert not torch.equal(m, lds.subset_masks(100, 20, 0.5, seed=4))
    # a method's own subsets come from another stream: never the evaluation draws
    other = lds.subset_masks(100, 20, 0.5, seed=3, stream="datamodels")
    assert not any(torch.equal(a, b) for a in m for b in other)
    with pytest.raises(ValueError, match="alpha"):
        lds.subset_masks(10, 2, 0.01, seed=0)


def _planted(n=60, m=80, T=5, k=2, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, T, generator=g)
    masks = lds.subset_masks(n, m, 0.5, seed)
    clean = masks.double() @ tau.double()
    outputs = clean[:, None, :] + noise * torch.randn(m, k, T, generator=g, dtype=torch.float64)
    gt = GroundTruth(masks, outputs.float(), torch.ones(m, k), torch.arange(T), {}, 0.0)
    return tau, gt


def test_lds_is_one_on_planted_linear_ground_truth():
    tau, gt = _planted()
    s = lds.lds(tau, gt)
    assert s.mean == pytest.approx(1.0, abs=1e-9) and s.ci[0] == pytest.approx(1.0, abs=1e-9)
    # positive monotone rescaling keeps the ranks; the opposite sign gives -1
    assert lds.lds(3 * tau + 0.1, gt).mean == pytest.approx(1.0, abs=1e-9)
    assert lds.lds(-tau, gt).mean == pytest.approx(-1.0, abs=1e-9)


def test_lds_near_zero_for_random_scores():
    tau, gt = _planted(T=40, m=100)
    rnd = torch.randn(tau.shape, generator=torch.Generator().manual_seed(9))
    s = lds.lds(rnd, gt)
    assert abs(s.mean) < 0.1 and s.ci[0] < 0 < s.ci[1]


def test_lds_per_target_matches_scipy():
    tau, gt = _planted(noise=3.0)
    rnd = tau + torch.randn(tau.shape, generator=torch.Generator().manual_seed(1))
    s = lds.lds(rnd, gt)
    pred = (gt.masks.double() @ rnd.double()).numpy()
    actual = gt.outputs.mean(1).numpy()
    ref = [spearmanr(pred[:, t], actual[:, t]).statistic for t in range(tau.shape[1])]
    assert np.allclose(s.per_target, ref)


def test_lds_rejects_bad_scores():
    tau, gt = _planted()
    with pytest.raises(ValueError, match=r"shape \(n_train, n_targets\) = \(60, 5\)"):
        lds.lds(tau.T, gt)
    bad = tau.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lds.lds(bad, gt)


def test_constant_scores_give_zero_not_nan():
    tau, gt = _planted()
    assert lds.lds(torch.ones_like(tau), gt).mean == 0.0


def test_noise_ceiling():
    _, clean = _planted(k=4, noise=0.0)
    assert lds.noise_ceiling(clean)["one_vs_one"].mean == pytest.approx(1.0)
    _, noisy = _planted(k=4, noise=4.0, m=200, T=20)
    nc = lds.noise_ceiling(noisy)
    r = nc["one_vs_one"].mean
    assert 0 < r < 0.9
    assert nc["ceiling_1"].mean < nc["ceiling_k"].mean <= 1
    # the oracle predictor (the noiseless linear model) scores about the k-model ceiling
    tau, _ = _planted(k=4, noise=4.0, m=200, T=20)
    assert lds.lds(tau, noisy).mean == pytest.approx(nc["ceiling_k"].mean, abs=0.08)


def test_bootstrap_interval_contains_mean():
    s = lds.bootstrap(np.arange(100.0))
    assert s.ci[0] < s.mean < s.ci[1] and s.mean == 49.5


def test_ground_truth_builds_caches_and_resumes(smoke, smoke_data, tmp_path, monkeypatch):
    cfg = smoke.replace(gt_subsets=4, gt_models=2, ensemble_size=2, epochs=1)
    calls = []
    real = train.train_models

    def counting(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the third chunk is interrupted
        return real(*args, **kw)

    monkeypatch.setattr(train, "train_models", counting)
    with pytest.raises(KeyboardInterrupt):
        lds.build_ground_truth(cfg, smoke_data, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("gt_*/part_*.pt"))) == 2
    calls.clear()
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    gt = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path, progress=False)
    assert len(calls) == 2  # only the two unfinished chunks were trained
    assert gt.outputs.shape == (4, 2, len(smoke_data.y_test)) and gt.masks.shape == (4, smoke_data.n_train)
    assert (gt.masks.sum(1) == smoke_data.n_train // 2).all()
    # resumed result equals an uninterrupted build
    fresh = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path / "fresh", progress=False)
    assert torch.allclose(fresh.outputs, gt.outputs)
    # cached: a second call trains nothing
    calls.clear()
    again = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path, progress=False)
    assert not calls and torch.equal(again.outputs, gt.outputs)
    # anything that changes the recipe changes the cache key
    assert lds.cache_key(lds.ground_truth_spec(cfg)) != lds.cache_key(lds.ground_truth_spec(cfg.replace(lr=0.01)))
