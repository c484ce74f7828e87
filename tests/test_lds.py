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


def test_lds_difference_is_paired():
    """The paired difference has the two LDS means' difference as its mean and per-target values, is 0 for a method
    against itself, changes sign when the two are swapped, tells a better estimate from a worse one, and is narrower
    than the two intervals side by side (the shared sampling cancels)."""
    tau, gt = _planted(T=20, m=100, noise=6.0)
    g = torch.Generator().manual_seed(2)
    a = tau + 0.5 * torch.randn(tau.shape, generator=g)
    b = tau + 1.5 * torch.randn(tau.shape, generator=g)
    la, lb, d = lds.lds(a, gt), lds.lds(b, gt), lds.lds_difference(a, b, gt)
    assert d.mean == pytest.approx(la.mean - lb.mean, abs=1e-9)
    assert np.allclose(d.per_target, la.per_target - lb.per_target)
    assert d.ci[0] > 0  # a is the better estimate, beyond the sampling of subsets and targets
    assert d.ci[1] - d.ci[0] < (la.ci[1] - la.ci[0]) + (lb.ci[1] - lb.ci[0])
    assert lds.lds_difference(b, a, gt).mean == pytest.approx(-d.mean, abs=1e-9)
    same = lds.lds_difference(a, a, gt)
    assert abs(same.mean) < 1e-9 and max(abs(same.ci[0]), abs(same.ci[1])) < 1e-9
    with pytest.raises(ValueError, match="shape"):
        lds.lds_difference(a, b[:, :3], gt)


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


@pytest.mark.parametrize("level, z", [(0.95, 1.959964), (0.5, 0.674490)])
def test_bootstrap_interval_has_the_width_of_the_standard_error(level, z):
    """A planted normal sample (n = 400, sd 2): the percentile bootstrap interval of the mean is, to Monte-Carlo
    error, mean +- z * s / sqrt(n) with s the sample's (plug-in) sd. Measured with 20,000 resamples: widths 0.5%
    (95%) and 1.0% (50%) off 2 z s / sqrt(n), the centre 0.011 standard errors off the mean; over 20 samples the
    width's relative error has sd 0.6-0.8%. A 90% interval reported as 95% would be 16% narrow."""
    v = np.random.default_rng(0).normal(3.0, 2.0, 400)
    se = v.std() / np.sqrt(len(v))
    s = lds.bootstrap(v, n_boot=20000, level=level)
    assert s.mean == pytest.approx(v.mean(), abs=1e-12) and np.array_equal(s.per_target, v)
    assert s.ci[1] - s.ci[0] == pytest.approx(2 * z * se, rel=0.03)
    assert (s.ci[0] + s.ci[1]) / 2 == pytest.approx(v.mean(), abs=0.05 * se)
    assert lds.bootstrap(v, n_boot=20000, level=level, seed=0).ci == s.ci  # seeded


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


def test_ground_truth_rows_come_from_their_own_mask_and_seed(smoke, smoke_data, tmp_path):
    """Each recorded row (subset j, replicate r) against that one model retrained directly with
    ``train.train_models`` on mask j with seed model_seeds[j, r]: the same margins and accuracy (measured: at most
    4.8e-7 apart on margins of size ~2.4, vmapped chunk vs a single model); a row paired with another subset's
    mask or another seed differs by 0.1-0.4. The masks are the ``lds`` stream's draws."""
    cfg = smoke.replace(gt_subsets=2, gt_models=2, ensemble_size=4, epochs=2)
    gt = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path, progress=False)
    assert torch.equal(gt.masks, lds.subset_masks(smoke_data.n_train, 2, cfg.alpha, cfg.gt_seed))
    # stored under the key of its own spec (a constant key would hand one setting's ground truth to another)
    assert gt.spec == lds.ground_truth_spec(cfg)
    assert (tmp_path / f"gt_mnist5k_{lds.cache_key(gt.spec)}" / "ground_truth.pt").exists()
    seeds = lds.model_seeds(2, 2, cfg.gt_seed)
    assert len(set(seeds.flatten().tolist())) == 4
    for j in range(2):
        for r in range(2):
            one = train.train_models(cfg.replace(ensemble_size=1), smoke_data, gt.masks[j:j + 1], seeds[j, r:r + 1])
            out = one.outputs(smoke_data.x_test, smoke_data.y_test)[0]
            err = (out - gt.outputs[j, r]).abs().max().item()
            assert err < 5e-6, (j, r, err)
            assert one.accuracy(smoke_data.x_test, smoke_data.y_test)[0] == pytest.approx(gt.accuracy[j, r].item())


# ---- gaps found by mutation testing (README "Testing"): arguments that no test varied


def test_lds_uses_the_given_targets_models_part_and_seed():
    """targets=, models=, part= and seed= each change what is scored, checked against scipy on the columns and
    replicates picked by hand; the tune/eval parts are the even/odd positions and together are all targets."""
    tau, gt = _planted(T=8, k=3, noise=2.0)
    gt.target_idx = torch.arange(8).flip(0)  # the default targets are not simply 0..T-1
    pred = (gt.masks.double() @ tau.double()).numpy()

    def ref(cols, targets, models):
        actual = gt.outputs[:, models][:, :, targets].mean(1).numpy()
        return [spearmanr(pred[:, c], actual[:, j]).statistic for j, c in enumerate(cols)]

    default = lds.lds(tau.flip(1), gt)
    assert np.allclose(default.per_target, ref(range(8), torch.arange(8), [0, 1, 2])[::-1])
    sub = lds.lds(tau[:, [2, 5]], gt, targets=[2, 5], models=[0, 2])
    assert np.allclose(sub.per_target, ref([2, 5], torch.tensor([2, 5]), [0, 2]))
    assert lds.target_part(7, "tune").tolist() == [0, 2, 4, 6] and lds.target_part(7, "eval").tolist() == [1, 3, 5]
    assert lds.target_part(7, None).tolist() == list(range(7))
    with pytest.raises(ValueError, match=r"unknown part 'test'; valid: tune, eval \(or None for all targets\)"):
        lds.target_part(7, "test")
    full = lds.lds(tau, gt, targets=torch.arange(8))
    for part, cols in (("tune", [0, 2, 4, 6]), ("eval", [1, 3, 5, 7])):
        got = lds.lds(tau, gt, targets=torch.arange(8), part=part)
        assert np.allclose(got.per_target, full.per_target[cols])
    other = lds.lds(tau, gt, targets=torch.arange(8), seed=1)
    assert other.mean == full.mean and other.ci != full.ci  # the seed is the bootstrap's
    assert lds.lds(tau, gt, targets=torch.arange(8), seed=1).ci == other.ci  # and the same call, the same numbers
    assert torch.equal(gt.target_outputs(), gt.outputs[:, :, gt.target_idx].mean(1))


def test_bootstrap_resamples_every_value():
    """One extreme value among ten: resamples that include it (65% of them) put the upper end at 100 or more."""
    s = lds.bootstrap([1000.0] + [0.0] * 9)
    assert s.mean == 100.0 and s.ci[0] == 0.0 and s.ci[1] >= 100.0


def test_spearman_of_two_subsets():
    """With m = 2 subsets the rank deviations are +-0.5 (denominator 0.5): still a correlation of +-1."""
    a = np.array([[1.0, 1.0, 3.0], [2.0, 2.0, 3.0]])
    b = np.array([[5.0, 9.0, 1.0], [7.0, 8.0, 2.0]])
    assert lds.spearman_columns(a, b).tolist() == [1.0, -1.0, 0.0]


def test_noise_ceiling_extrapolates_and_measures_split_halves():
    """ceiling_by_k holds the formula at other numbers of models (its k entry equals ceiling_k); split_half (k >= 4)
    is the square root of the Spearman correlation of two disjoint half-averages, and with independent seed noise
    it agrees with the formula's ceiling for k / 2 models; with noise shared by the first two replicates it does
    not; k < 4 has no split_half."""
    _, gt = _planted(k=4, noise=4.0, m=200, T=20)
    nc = lds.noise_ceiling(gt, ks=(1, 2, 4, 32))
    assert set(nc["ceiling_by_k"]) == {1, 2, 4, 32}
    assert nc["ceiling_by_k"][4].mean == nc["ceiling_k"].mean and nc["ceiling_by_k"][1].mean == nc["ceiling_1"].mean
    assert nc["ceiling_by_k"][1].mean < nc["ceiling_by_k"][2].mean < nc["ceiling_by_k"][32].mean <= 1
    out = gt.outputs.numpy()
    split = lds.spearman_columns(out[:, :2].mean(1), out[:, 2:4].mean(1))
    assert np.allclose(nc["split_half"].per_target, np.sqrt(np.clip(split, 0, 1)))
    assert nc["split_half"].ci[0] < nc["split_half"].mean < nc["split_half"].ci[1]
    assert abs(nc["split_half"].mean - nc["ceiling_by_k"][2].mean) < 0.05
    # noise shared by replicates 0 and 1 (not independent): the split halves disagree with the formula
    shared = torch.randn(gt.m, 1, gt.outputs.shape[2], generator=torch.Generator().manual_seed(3)) * 8.0
    corr = GroundTruth(gt.masks, gt.outputs + torch.cat([shared, shared, 0 * shared, 0 * shared], 1),
                       gt.accuracy, gt.target_idx, {}, 0.0)
    nc_corr = lds.noise_ceiling(corr, ks=(2,))
    assert nc_corr["split_half"].mean < nc_corr["ceiling_by_k"][2].ci[0]
    three = GroundTruth(gt.masks, gt.outputs[:, :3], gt.accuracy[:, :3], gt.target_idx, {}, 0.0)
    assert "split_half" not in lds.noise_ceiling(three)
    # the k-model ceiling from the halves: sqrt(2 rho / (1 + rho)) per target, close to the formula's ceiling_k here
    assert np.allclose(nc["split_half_k"].per_target, lds.ceiling(split, 2))
    assert abs(nc["split_half_k"].mean - nc["ceiling_k"].mean) < 0.05
    five = GroundTruth(gt.masks, torch.cat([gt.outputs, gt.outputs[:, :1]], 1), torch.ones(gt.m, 5), gt.target_idx,
                       {}, 0.0)
    assert "split_half" in lds.noise_ceiling(five) and "split_half_k" not in lds.noise_ceiling(five)


def test_split_half_difference_is_paired():
    """margin minus margin is exactly 0 with a zero-width interval; margin minus loss equals, per target, the
    difference of the two split-half Spearman correlations; k < 4 is refused."""
    _, gt = _planted(k=4, noise=2.0, m=120, T=12)
    same = lds.split_half_difference(gt, "margin", "margin")
    assert abs(same.mean) < 1e-12 and max(abs(same.ci[0]), abs(same.ci[1])) < 1e-12
    out = gt.outputs.numpy()
    rho = lambda o: lds.spearman_columns(o[:, :2].mean(1), o[:, 2:4].mean(1))  # noqa: E731
    loss = torch.nn.functional.softplus(-gt.outputs.double()).numpy()
    d = lds.split_half_difference(gt, "margin", "loss")
    assert np.allclose(d.per_target, rho(out) - rho(loss))
    with pytest.raises(ValueError, match="at least 4 models"):
        lds.split_half_difference(GroundTruth(gt.masks, gt.outputs[:, :3], gt.accuracy[:, :3], gt.target_idx, {},
                                              0.0))


def test_the_loss_measurement():
    """measure="loss" scores against each model's log(1 + exp(-margin)) averaged over the models: with one model it
    ranks the subsets in the opposite order of the margin, so negated scores get exactly the margin's LDS; with
    several models the averages differ; the paired difference across measurements is their LDS difference; the
    seed correlation r is the same under both; an unknown measure is refused with the valid names."""
    tau, gt = _planted(T=8, m=60, k=3, noise=2.0)
    one = GroundTruth(gt.masks, gt.outputs[:, :1], gt.accuracy[:, :1], gt.target_idx, {}, 0.0)
    s = tau + torch.randn(tau.shape, generator=torch.Generator().manual_seed(4))
    assert np.allclose(lds.lds(-s, one, measure="loss").per_target, lds.lds(s, one).per_target)
    losses = torch.nn.functional.softplus(-gt.outputs.double()).mean(1)
    assert torch.allclose(gt.target_outputs(measure="loss"), losses)
    ref = lds.spearman_columns(lds.predictions(-s, gt.masks), losses.numpy())
    assert np.allclose(lds.lds(-s, gt, measure="loss").per_target, ref)
    assert not np.allclose(ref, lds.lds(s, gt).per_target)
    d = lds.lds_difference(s, -s, gt, measure="margin", measure_b="loss")
    assert d.mean == pytest.approx(lds.lds(s, gt).mean - lds.lds(-s, gt, measure="loss").mean, abs=1e-9)
    assert np.allclose(lds.noise_ceiling(gt, measure="loss")["one_vs_one"].per_target,
                       lds.noise_ceiling(gt)["one_vs_one"].per_target)
    with pytest.raises(ValueError, match="unknown measure 'accuracy'; valid: margin, loss"):
        lds.lds(s, gt, measure="accuracy")


def test_noise_ceiling_equals_its_formula_on_every_target():
    """r_t = mean over the k(k-1)/2 pairs of replicates of their Spearman correlation (scipy), ceiling_1 =
    sqrt(max(r, 0)), ceiling_k = sqrt(k r / (1 + (k - 1) r)); a target whose replicates disagree (r < 0) gets
    ceiling 0; targets=, part= and seed= are honoured; k = 2 works and k = 1 is refused."""
    _, gt = _planted(T=6, k=3, noise=3.0, m=50)
    gt.outputs[:, 1, 0] = -gt.outputs[:, 0, 0]  # target 0: replicate 1 mirrors replicate 0
    out = gt.outputs.numpy()
    r = np.array([np.mean([spearmanr(out[:, a, t], out[:, b, t]).statistic for a, b in ((0, 1), (0, 2), (1, 2))])
                  for t in range(6)])
    assert r[0] < 0 < r[1:].min()
    rc = np.clip(r, 0, None)
    nc = lds.noise_ceiling(gt)
    assert np.allclose(nc["one_vs_one"].per_target, r)
    assert np.allclose(nc["ceiling_1"].per_target, np.sqrt(rc))
    assert np.allclose(nc["ceiling_k"].per_target, np.sqrt(3 * rc / (1 + 2 * rc)))
    assert np.allclose(lds.noise_ceiling(gt, targets=[4, 1])["one_vs_one"].per_target, r[[4, 1]])
    assert np.allclose(lds.noise_ceiling(gt, part="eval")["one_vs_one"].per_target, r[[1, 3, 5]])
    again = lds.noise_ceiling(gt, seed=1)
    for key in ("one_vs_one", "ceiling_1", "ceiling_k"):
        assert lds.noise_ceiling(gt, seed=1)[key].ci == again[key].ci != nc[key].ci  # seeded by seed
    two = GroundTruth(gt.masks, gt.outputs[:, :2], gt.accuracy[:, :2], gt.target_idx, {}, 0.0)
    assert np.allclose(lds.noise_ceiling(two)["one_vs_one"].per_target,
                       [spearmanr(out[:, 0, t], out[:, 1, t]).statistic for t in range(6)])
    one = GroundTruth(gt.masks, gt.outputs[:, :1], gt.accuracy[:, :1], gt.target_idx, {}, 0.0)
    with pytest.raises(ValueError, match=r"^the noise ceiling needs at least two models per subset \(gt_models >= 2\)$"):
        lds.noise_ceiling(one)


# ---- the two-way (subsets x targets) bootstrap interval


def test_resampled_ranks_equal_ranking_the_resampled_rows():
    """The fast path (ranks of a resample from the counts of each row, without building it) against
    spearman_columns on the explicitly resampled rows: many ties (integer predictions, as class-match scores give),
    a constant column (0) and repeated rows; exact (ranks are half-integers, every sum is exact in float64)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, (15, 7)).astype(float)
    b = a + rng.normal(0, 2, (15, 7))
    b[:, 2] = 3.0
    rows = rng.integers(0, 15, (40, 15))
    counts = np.zeros((40, 15), np.float32)
    np.add.at(counts, (np.arange(40)[:, None], rows), 1.0)
    fast = lds._weighted_spearman(lds._resampled_ranks(lds._tie_groups(a), counts),
                                  lds._resampled_ranks(lds._tie_groups(b), counts), counts)
    slow = np.array([lds.spearman_columns(a[r], b[r]) for r in rows])
    assert np.abs(fast - slow).max() < 1e-12 and (fast[:, 2] == 0).all() and np.ptp(fast[:, 0]) > 0.1


def _two_way_reference(mats, pairs, transforms, n_boot, seed, level=0.95):
    """two_way_bootstrap written as a loop over explicitly resampled matrices (same random draws)."""
    m, T = mats[0].shape
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, m, (n_boot, m)), rng.integers(0, T, (n_boot, T))
    r = np.mean([lds.spearman_columns(mats[a], mats[b]) for a, b in pairs], 0)
    out = []
    for f in transforms:
        reps = np.array([f(np.mean([lds.spearman_columns(mats[a][i], mats[b][i]) for a, b in pairs], 0))[j].mean()
                         for i, j in zip(rows, cols)])
        mean = f(r).mean()
        out.append((mean, tuple(np.clip(np.quantile(reps - reps.mean() + mean, [(1 - level) / 2, (1 + level) / 2]),
                                        -1, 1))))
    return out


def test_lds_and_noise_ceiling_intervals_equal_explicit_two_way_resampling():
    """lds and noise_ceiling against a loop that resamples the subsets (rows of predictions and outputs, of all k
    replicates together) and the targets (columns) and recomputes every correlation, replicate by replicate; the
    chunking of the replicates changes nothing."""
    tau, gt = _planted(n=40, m=12, T=5, k=3, noise=3.0)
    pred = (gt.masks.double() @ tau.double()).numpy()
    s = lds.lds(tau, gt, n_boot=300, seed=4)
    (mean, ci), = _two_way_reference([pred, gt.target_outputs().double().numpy()], [(0, 1)], [lambda r: r], 300, 4)
    assert s.mean == pytest.approx(mean, abs=1e-12) and s.ci == pytest.approx(ci, abs=1e-12)
    out = gt.outputs.double().numpy()
    ceil = [lambda r: r, lambda r: np.sqrt(np.clip(r, 0, 1)),
            lambda r: np.sqrt(3 * np.clip(r, 0, 1) / (1 + 2 * np.clip(r, 0, 1)))]
    ref = _two_way_reference([out[:, i] for i in range(3)], [(0, 1), (0, 2), (1, 2)], ceil, 300, 5)
    nc = lds.noise_ceiling(gt, n_boot=300, seed=5)
    for key, (mean, ci) in zip(("one_vs_one", "ceiling_1", "ceiling_k"), ref):
        assert nc[key].mean == pytest.approx(mean, abs=1e-12) and nc[key].ci == pytest.approx(ci, abs=1e-12), key
    mats = [pred, gt.target_outputs().double().numpy()]
    assert (lds.two_way_bootstrap(mats, [(0, 1)], n_boot=50, chunk=7)[0].ci
            == lds.two_way_bootstrap(mats, [(0, 1)], n_boot=50)[0].ci)


def test_lds_and_ceiling_means_are_the_plain_per_target_means():
    """Only the interval is resampled: the reported means are exactly the per-target means on all subsets and
    targets (the numbers the targets-only bootstrap reported), and lie inside their intervals."""
    tau, gt = _planted(m=50, T=9, k=3, noise=3.0)
    s = lds.lds(tau, gt)
    rho = lds.spearman_columns(lds.predictions(tau, gt.masks), gt.target_outputs())
    assert np.array_equal(s.per_target, rho) and s.mean == lds.bootstrap(rho).mean == float(rho.mean())
    assert s.ci[0] < s.mean < s.ci[1]
    out = gt.outputs.numpy()
    r = np.mean([lds.spearman_columns(out[:, a], out[:, b]) for a, b in ((0, 1), (0, 2), (1, 2))], 0)
    nc = lds.noise_ceiling(gt)
    assert nc["one_vs_one"].mean == lds.bootstrap(r).mean and np.array_equal(nc["one_vs_one"].per_target, r)
    assert nc["ceiling_1"].mean == lds.bootstrap(np.sqrt(np.clip(r, 0, 1))).mean
    for key in ("one_vs_one", "ceiling_1", "ceiling_k"):
        assert nc[key].ci[0] < nc[key].mean < nc[key].ci[1]


def _fresh_ground_truth(rng, shared, n, m, T, c, spread, noise=3.0, k=2):
    """One draw of a planted ground truth: T fresh targets whose true effects tau_t and score errors mix a part
    shared by all targets (``shared``, fixed across draws, weight c) with a part of their own, a score quality that
    varies by target (error scale uniform in 1 +- spread), m fresh subsets, and outputs = masks @ tau + noise whose
    per-subset part is shared by the targets (weight c) and drawn afresh for each of k replicates."""
    u, e = shared
    mix = lambda common, own: np.sqrt(c) * common + np.sqrt(1 - c) * own
    tau = mix(u[:, None], rng.normal(size=(n, T)))
    score = tau + rng.uniform(1 - spread, 1 + spread, T) * mix(e[:, None], rng.normal(size=(n, T)))
    masks = lds.subset_masks(n, m, 0.5, int(rng.integers(2 ** 31)))
    clean = masks.double().numpy() @ tau
    outputs = clean[:, None, :] + noise * mix(rng.normal(size=(m, k, 1)), rng.normal(size=(m, k, T)))
    gt = GroundTruth(masks, torch.as_tensor(outputs), torch.ones(m, k), torch.arange(T), {}, 0.0)
    return torch.as_tensor(score), gt


@pytest.mark.parametrize("m, T, c, spread", [(60, 30, 0.5, 0.6), (30, 8, 0.98, 0.0)])
def test_two_way_interval_has_the_spread_of_fresh_ground_truths(m, T, c, spread):
    """Planted ground truths drawn afresh (new targets, subsets and noise, from one generative model): the standard
    deviation of the LDS mean (and of the noise ceiling's one-vs-one r) across 300 draws is the truth; the two-way
    interval's width / (2 x 1.96), averaged over 12 draws, must match it within 0.7-1.4. Measured over 5 seeds of
    this test: 0.98-1.20 (LDS) and 0.87-1.19 (r). The targets-only interval (``bootstrap`` of the per-target values,
    the interval before) is too narrow: 0.53-0.60 of the truth in the mixed case, 0.08-0.10 where the subset noise
    is shared by the targets (8 targets with nearly equal per-target correlations, 30 subsets)."""
    rng = np.random.default_rng(0)
    shared = (rng.normal(size=100), rng.normal(size=100))
    lds_means, r_means = [], []
    for _ in range(300):
        tau, gt = _fresh_ground_truth(rng, shared, 100, m, T, c, spread)
        pred = gt.masks.double().numpy() @ tau.numpy()  # as lds.predictions, faster for these small matrices
        lds_means.append(lds.spearman_columns(pred, gt.outputs.numpy().mean(1)).mean())
        out = gt.outputs.numpy()
        r_means.append(lds.spearman_columns(out[:, 0], out[:, 1]).mean())
    half = lambda s: (s.ci[1] - s.ci[0]) / (2 * 1.959964)
    two_way, targets_only, ceiling = [], [], []
    for d in range(12):
        tau, gt = _fresh_ground_truth(rng, shared, 100, m, T, c, spread)
        s = lds.lds(tau, gt, n_boot=500, seed=d)
        two_way.append(half(s))
        targets_only.append(half(lds.bootstrap(s.per_target, n_boot=500, seed=d)))
        ceiling.append(half(lds.noise_ceiling(gt, n_boot=500, seed=d)["one_vs_one"]))
    ratio = np.mean(two_way) / np.std(lds_means, ddof=1)
    ceiling_ratio = np.mean(ceiling) / np.std(r_means, ddof=1)
    narrow = np.mean(targets_only) / np.std(lds_means, ddof=1)
    assert 0.7 < ratio < 1.4 and 0.7 < ceiling_ratio < 1.4, (ratio, ceiling_ratio)
    assert narrow < (0.7 if c < 0.9 else 0.2), narrow


def test_fixed_seed_ground_truth_is_one_run_with_examples_weighted_out(smoke, tmp_path):
    """Chapter 05's single-model counterfactual: every subset is the same training run (one seed: initialisation and
    batch order) with the dropped examples weighted 0; the outputs are exactly those of train.train_weighted, the
    build is cached and resumable, and a bad drop fraction is refused."""
    from course_lib import data as D, train

    cfg = smoke.replace(n_train=60, ensemble_size=3)
    data = D.mnist5k(n_train=60, n_targets=4)
    gt = lds.build_fixed_seed_ground_truth(cfg, data, drop=0.1, m=5, cache=tmp_path, progress=False)
    assert gt.outputs.shape == (5, 1, len(data.y_test)) and gt.k == 1
    assert (gt.masks.sum(1) == 54).all()  # 10% of 60 dropped from every subset
    seed = gt.spec["seed"]
    direct = train.train_weighted(cfg, data, gt.masks[3].float(), seed).outputs(data.x_test, data.y_test)[0]
    # trained alone here, three side by side in the build: equal up to float arithmetic (as test_train's ensemble)
    assert torch.allclose(direct, gt.outputs[3, 0], rtol=0, atol=5e-6 * float(direct.abs().max()))
    shuffled = train.train_weighted(cfg, data, gt.masks[2].float(), seed).outputs(data.x_test, data.y_test)[0]
    assert not torch.allclose(shuffled, gt.outputs[3, 0], rtol=0, atol=5e-6 * float(direct.abs().max()))
    again = lds.build_fixed_seed_ground_truth(cfg, data, drop=0.1, m=5, cache=tmp_path, progress=False)
    assert torch.equal(again.outputs, gt.outputs) and again.spec == gt.spec
    other = lds.build_fixed_seed_ground_truth(cfg, data, drop=0.5, m=2, cache=tmp_path, progress=False)
    assert (other.masks.sum(1) == 30).all() and other.spec["seed"] == seed  # same run, other counterfactuals
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="drop"):
            lds.build_fixed_seed_ground_truth(cfg, data, drop=bad, m=2, cache=tmp_path, progress=False)


def test_tune_chooses_on_the_tuning_targets_and_reports_the_evaluation_targets():
    tau, gt = _planted(T=6)
    tune_cols, eval_cols = lds.target_part(6, "tune"), lds.target_part(6, "eval")
    # "leaky" is perfect on the tuning targets and reversed on the evaluation targets; "honest" is a noisy truth
    leaky = tau.clone()
    leaky[:, eval_cols] *= -1
    honest = tau + 0.5 * torch.randn(tau.shape, generator=torch.Generator().manual_seed(1))
    out = lds.tune({"honest": honest, "leaky": leaky}, gt)
    assert out.choice == "leaky"  # the evaluation targets never enter the choice
    assert out.tuning["leaky"] == pytest.approx(1.0, abs=1e-9) and out.tuning["honest"] < 1
    assert out.reported.mean == pytest.approx(-1.0, abs=1e-9)  # ... and the report shows what it is worth there
    assert out.reported.mean == pytest.approx(lds.lds(leaky, gt, part="eval").mean)
    assert out.tuning["honest"] == pytest.approx(lds.lds(honest, gt, part="tune").mean)
    # ties go to the first key; bad input is refused
    assert lds.tune({"a": tau, "b": 2 * tau}, gt).choice == "a"
    with pytest.raises(ValueError, match="at least one"):
        lds.tune({}, gt)
    with pytest.raises(ValueError, match="shape"):
        lds.tune({"x": tau[:, :3]}, gt)


def test_pearson_interval_has_the_width_fisher_predicts():
    rng = np.random.default_rng(0)
    n, rho = 200, 0.6
    x = rng.standard_normal(n)
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal(n)
    sc = lds.pearson_interval(x, y)
    assert sc.ci[0] < sc.mean < sc.ci[1] and abs(sc.mean - np.corrcoef(x, y)[0, 1]) < 1e-12
    # Fisher's z: the 95% interval of r is about 2 * 1.96 (1 - rho^2) / sqrt(n) wide
    want = 2 * 1.96 * (1 - rho ** 2) / np.sqrt(n)
    assert 0.8 * want < sc.ci[1] - sc.ci[0] < 1.25 * want
    assert lds.pearson_interval(x, -y).mean < 0
    with pytest.raises(ValueError, match="at least 3 pairs"):
        lds.pearson_interval([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        lds.pearson_interval([1.0, 2.0, np.nan], [1.0, 2.0, 3.0])


def test_pearson_ceiling_measures_the_seed_noise_of_leave_one_out_effects():
    g = np.random.default_rng(0)
    true = g.normal(size=40)
    exact = np.stack([true, true, true], 1)  # three seeds that agree: nothing to lose, ceiling 1
    got = lds.pearson_ceiling(exact, n_boot=300)
    assert got.mean == pytest.approx(1.0) and got.ci[0] == pytest.approx(1.0)
    noisy = true[:, None] + g.normal(size=(40, 3))  # seed noise as large as the effects: r ~ 1/2
    got = lds.pearson_ceiling(noisy, n_boot=300)
    assert 0.7 < got.mean < 0.95 and got.ci[0] < got.mean < got.ci[1]  # sqrt(3 r / (1 + 2 r)) ~ 0.87
    pure = g.normal(size=(40, 3))  # no effect, only noise: nothing any estimate could predict
    assert lds.pearson_ceiling(pure, n_boot=300).mean < 0.5
    with pytest.raises(ValueError, match="seeds"):
        lds.pearson_ceiling(true[:, None])


def test_choose_takes_the_highest_and_the_first_on_a_tie():
    assert lds.choose({0.1: 0.2, 1.0: 0.5, 10.0: 0.3}) == 1.0
    assert lds.choose({"a": 0.4, "b": 0.4}) == "a"


def test_choose_refuses_an_empty_dict():
    with pytest.raises(ValueError):
        lds.choose({})


def _diff(lo, hi):
    return lds.Score((lo + hi) / 2, (lo, hi), np.zeros(3))


def test_interval_above_zero_is_a_ahead():
    assert lds.paired_verdict(_diff(0.02, 0.10), "EK-FAC", "TRAK") == "EK-FAC ahead"


def test_interval_below_zero_is_b_ahead():
    assert lds.paired_verdict(_diff(-0.10, -0.01), "EK-FAC", "TRAK") == "TRAK ahead"


def test_interval_covering_zero_tells_nothing_apart():
    assert lds.paired_verdict(_diff(-0.01, 0.05), "EK-FAC", "TRAK") == "not told apart"
    assert lds.paired_verdict(_diff(0.0, 0.05)) == "not told apart"  # a bound at 0 includes 0
    assert lds.paired_verdict(_diff(-0.05, 0.0)) == "not told apart"


def test_a_flipped_difference_flips_the_verdict():
    """Swapping the two methods negates the difference: a verdict that ignored the sign would not change."""
    d = _diff(0.01, 0.04)
    flipped = _diff(-0.04, -0.01)
    assert lds.paired_verdict(d, "x", "y") == "x ahead"
    assert lds.paired_verdict(flipped, "y", "x") == "x ahead"
