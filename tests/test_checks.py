"""Every sanity check in course_lib.checks passes on a right result and fails on a broken one."""
import numpy as np
import pytest
import torch

from course_lib import checks, lds
from course_lib.lds import GroundTruth

def _planted_lds(flip=False, shuffle=False, n=80, m=120, T=6, seed=0):
    """LDS of the true linear datamodel of a planted ground truth (with noise), or of a broken copy of it."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = (masks.double() @ w + 2.0 * torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
    gt = GroundTruth(masks, outputs.float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
    scores = -w if flip else w[torch.randperm(n, generator=g)] if shuffle else w
    return lds.lds(scores, gt)

def test_check_lds_above_passes_the_true_scores_and_fails_broken_ones():
    good = _planted_lds()
    assert checks.check_lds_above(good, 0.0, 0.2, "planted") == pytest.approx(good.mean)
    assert good.mean > 0.5
    for broken in (_planted_lds(flip=True), _planted_lds(shuffle=True)):
        with pytest.raises(AssertionError, match="does not clear"):
            checks.check_lds_above(broken, 0.0, 0.05, "broken")
    with pytest.raises(AssertionError):  # a Score as the baseline: the same scores do not beat themselves
        checks.check_lds_above(good, good, 0.0, "itself")


def test_check_not_below_fails_sign_flipped_scores():
    good, flipped, shuffled = _planted_lds(), _planted_lds(flip=True), _planted_lds(shuffle=True)
    assert checks.check_not_below(good, shuffled, "planted") > 0
    assert checks.check_not_below(shuffled, shuffled, "itself") >= 0  # no information is allowed
    with pytest.raises(AssertionError, match="wholly below"):
        checks.check_not_below(flipped, shuffled, "flipped")
    nan = lds.Score(float("nan"), (float("nan"), float("nan")), np.array([]))
    with pytest.raises(AssertionError):
        checks.check_not_below(nan, shuffled, "NaN")


def test_check_records_described_names_the_records_without_parameters():
    described = {"chapter": {"budget": 3}, "setting": "cpu"}
    assert checks.check_records_described({"02": described, "03": described}) == []
    old = {"02": None, "03": described, "05": {"chapter": {}, "setting": "cpu"}}
    with pytest.raises(AssertionError, match=r"chapters \['02', '05'\]"):
        checks.check_records_described(old)
    with pytest.warns(UserWarning, match="re-run those chapters"):
        assert checks.check_records_described(old, strict=False) == ["02", "05"]

def test_check_no_information_passes_random_scores_and_fails_predictive_or_vague_ones():
    g = torch.Generator().manual_seed(1)
    n, m, T = 80, 120, 6
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = (masks.double() @ w + 2.0 * torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
    gt = GroundTruth(masks, outputs.float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
    random = lds.lds(torch.randn(n, T, generator=g), gt)
    assert checks.check_no_information(random, 0.3, "random") == pytest.approx(random.mean)
    with pytest.raises(AssertionError, match="excludes 0"):
        checks.check_no_information(lds.lds(w, gt), 0.3, "the true datamodel")
    with pytest.raises(AssertionError, match="wider"):
        checks.check_no_information(random, 0.01, "random")


def test_no_information_half_width_bounds_random_intervals_tightly():
    """Random scores' two-way half-widths stay under the bound on fresh planted ground truths (m subsets, T targets)
    and are not far below it: the bound is neither broken nor vacuous."""
    for seed, (m, T) in enumerate([(100, 100), (24, 10), (60, 30)]):
        g = torch.Generator().manual_seed(seed)
        n = 80
        masks = torch.rand(m, n, generator=g) < 0.5
        w = torch.randn(n, T, generator=g, dtype=torch.float64)
        outputs = (masks.double() @ w + 2.0 * torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
        gt = GroundTruth(masks, outputs.float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
        bound = checks.no_information_half_width(m, T)
        for s in range(3):
            r = lds.lds(torch.randn(n, T, generator=g), gt, n_boot=500, seed=s)
            assert 0.4 * bound < (r.ci[1] - r.ci[0]) / 2 <= bound  # measured 0.54-0.87 of the bound
            checks.check_no_information(r, bound, "random")
    with pytest.raises(ValueError, match="at least 3 subsets"):
        checks.no_information_half_width(2, 10)


def test_check_small_and_not_decreasing():
    assert checks.check_small(1e-12, 1e-8, "difference") == 1e-12
    for bad in (1e-3, float("nan"), float("inf")):
        with pytest.raises(AssertionError, match="difference"):
            checks.check_small(bad, 1e-8, "difference")
    checks.check_not_decreasing([0.2, 0.25, 0.24, 0.3], 0.02, "LDS vs M")
    with pytest.raises(AssertionError, match="falls by 0.100"):
        checks.check_not_decreasing([0.2, 0.3, 0.2], 0.02, "LDS vs M")
    with pytest.raises(AssertionError):
        checks.check_not_decreasing([0.2, float("nan")], 0.02, "LDS vs M")
    scores = [lds.bootstrap(np.array([v, v + 0.01])) for v in (0.3, 0.1)]  # Scores are read by their mean
    with pytest.raises(AssertionError):
        checks.check_not_decreasing(scores, 0.05, "LDS vs M")


def test_curvature_and_agreement_checks_fail_on_broken_inputs():
    a = torch.randn(50, 4, dtype=torch.float64)
    checks.check_psd_vs_indefinite([0.0, 1.0, 5.0], [-0.5, 1.0, 5.0])
    with pytest.raises(AssertionError, match="negative eigenvalue"):
        checks.check_psd_vs_indefinite([-0.5, 1.0, 5.0], [-0.5, 1.0, 5.0])  # a 'GNH' that is the Hessian
    with pytest.raises(AssertionError, match="not negative"):
        checks.check_psd_vs_indefinite([0.0, 1.0], [0.0, 1.0])  # a Hessian that is PSD
    checks.check_ekfac_not_worse(0.1, 0.2)
    with pytest.raises(AssertionError):
        checks.check_ekfac_not_worse(0.3, 0.2)
    assert checks.check_agreement(a, 2 * a) > 0.999
    with pytest.raises(AssertionError, match="agreement"):
        checks.check_agreement(a, a[torch.randperm(50)])  # shuffled scores
    with pytest.raises(AssertionError, match="agreement"):
        checks.check_agreement(a, -a)  # flipped sign
    r = checks.check_predicts_retraining(a[:, 0], 2 * a[:, 0] + 0.1 * a[:, 1], 0.9)
    assert r > 0.9
    with pytest.raises(AssertionError, match="Pearson"):
        checks.check_predicts_retraining(-a[:, 0], a[:, 0], 0.5)  # a flipped sign fails


def _planted_gt(n=60, m=100, T=8, k=4, noise=2.0, seed=2):
    """A small planted ground truth: (true scores w, GroundTruth with k noisy replicates of masks @ w)."""
    g = torch.Generator().manual_seed(seed)
    masks = lds.subset_masks(n, m, 0.5, seed)
    w = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = (masks.double() @ w)[:, None, :] + noise * torch.randn(m, k, T, generator=g, dtype=torch.float64)
    return w, GroundTruth(masks, outputs.float(), torch.full((m, k), 0.95), torch.arange(T), {}, 0.0)


def test_check_lds_invariances_passes_the_rank_based_lds_and_fails_broken_ones():
    w, gt = _planted_gt()
    good = lambda s: lds.lds(s, gt, n_boot=50)
    assert checks.check_lds_invariances(good, w) == pytest.approx(good(w).mean)
    checks.check_lds_invariances(good, w, scale=0.5, offset=torch.linspace(-3, 3, w.shape[1]))  # per-target offsets
    assert checks.check_lds_invariances(good, -w) < 0  # a negative LDS passes too: it is still rank based

    def columns(s):
        return lds.predictions(torch.as_tensor(s), gt.masks).numpy(), gt.target_outputs().double().numpy()

    def covariance(s):  # not a correlation: grows with the scale of the scores
        p, a = columns(s)
        return float(((p - p.mean(0)) * (a - a.mean(0))).mean())

    def neg_mse(s):  # an error, not a rank statistic: moved by the offset and the scale
        p, a = columns(s)
        return float(-((p - a) ** 2).mean())

    def squared_spearman(s):  # blind to the sign
        p, a = columns(s)
        return float((lds.spearman_columns(p, a) ** 2).mean())

    for broken in (covariance, neg_mse):
        with pytest.raises(AssertionError, match="rescaling"):
            checks.check_lds_invariances(broken, w)
    with pytest.raises(AssertionError, match="-scores"):
        checks.check_lds_invariances(squared_spearman, w)
    with pytest.raises(AssertionError, match="not 0"):  # an 'LDS' that never looks at the scores
        checks.check_lds_invariances(lambda s: 0.0, w)
    with pytest.raises(ValueError, match="positive"):
        checks.check_lds_invariances(good, w, scale=-1.0)


def test_check_models_learned_fails_an_untrained_or_diverged_ground_truth():
    _, gt = _planted_gt()
    assert checks.check_models_learned(gt.accuracy, 0.75) == pytest.approx(0.95)
    with pytest.raises(AssertionError, match="were they trained"):
        checks.check_models_learned(torch.full((100, 4), 0.1), 0.75)  # chance level on 10 classes
    diverged = gt.accuracy.clone()
    diverged[3, 1] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        checks.check_models_learned(diverged, 0.75)


def test_check_noise_ceiling_fails_noise_outputs_identical_seeds_and_swapped_ceilings():
    _, gt = _planted_gt()
    nc = lds.noise_ceiling(gt, n_boot=200)
    assert checks.check_noise_ceiling(nc) == pytest.approx(nc["ceiling_k"].mean)
    assert 0 < nc["one_vs_one"].mean < 1
    g = torch.Generator().manual_seed(5)  # untrained: outputs that do not depend on the subsets
    untrained = GroundTruth(gt.masks, torch.randn(gt.outputs.shape, generator=g), gt.accuracy, gt.target_idx, {}, 0.0)
    with pytest.raises(AssertionError, match="does not exclude 0"):
        checks.check_noise_ceiling(lds.noise_ceiling(untrained, n_boot=200))
    one_model = GroundTruth(gt.masks, gt.outputs[:, :1].expand(-1, gt.k, -1).clone(), gt.accuracy, gt.target_idx, {},
                            0.0)  # k copies of one model
    with pytest.raises(AssertionError, match="agree perfectly"):
        checks.check_noise_ceiling(lds.noise_ceiling(one_model, n_boot=200))
    swapped = {**nc, "ceiling_1": nc["ceiling_k"], "ceiling_k": nc["ceiling_1"]}
    with pytest.raises(AssertionError, match="out of order"):
        checks.check_noise_ceiling(swapped)


def test_check_cv_gain_passes_a_real_lasso_and_fails_shuffled_outputs_or_nan():
    from course_lib.attribution import datamodels as dm

    g = torch.Generator().manual_seed(3)
    n, m, T = 40, 300, 4
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.zeros(n, T)
    w[:4] = 2.0 * torch.randn(4, T, generator=g)  # a sparse datamodel, as the LASSO assumes
    outputs = masks.float() @ w + torch.randn(m, T, generator=g)

    def relative(fit):
        best = torch.nan_to_num(fit.cv_error, nan=float("inf")).argmin(1, keepdim=True)
        return fit.cv_error.gather(1, best).squeeze(1) / fit.cv_error[:, 0]

    good = relative(dm.fit_lasso(masks, outputs, cv=3))
    assert checks.check_cv_gain(good, 0.9, "planted") < 0.5
    shuffled = relative(dm.fit_lasso(masks, outputs[torch.randperm(m, generator=g)], cv=3))
    for q in (0.25, 0.5):
        with pytest.raises(AssertionError, match="not below"):
            checks.check_cv_gain(shuffled, 0.9, "shuffled", quantile=q)
    assert checks.check_cv_gain(good, 0.9, "planted", quantile=0.25) <= checks.check_cv_gain(good, 0.9, "planted")
    with pytest.raises(AssertionError, match="not finite"):
        checks.check_cv_gain(torch.tensor([0.5, float("nan")]), 0.9, "diverged")


def test_check_independent_subsets_passes_two_streams_and_fails_reused_or_dependent_ones():
    from course_lib.retrain import subset_masks

    n, alpha = 200, 0.5
    ours, theirs = subset_masks(n, 60, alpha, 0, stream="datamodels"), subset_masks(n, 40, alpha, 0, stream="lds")
    assert abs(checks.check_independent_subsets(ours, theirs, alpha) - alpha) <= 0.02
    reused = torch.cat([theirs[:39], ours[5:6]])  # one datamodel subset among the LDS subsets
    with pytest.raises(AssertionError, match="1 subset"):
        checks.check_independent_subsets(ours, reused, alpha)
    with pytest.raises(AssertionError, match="reappear"):  # the same stream twice
        checks.check_independent_subsets(theirs, theirs, alpha)
    def from_part(m, seed):  # alpha-subsets drawn from the first three quarters of the pool only
        g, part = torch.Generator().manual_seed(seed), torch.zeros(m, n, dtype=torch.bool)
        for j in range(m):
            part[j, torch.randperm(3 * n // 4, generator=g)[:int(alpha * n)]] = True
        return part

    with pytest.raises(AssertionError, match="share alpha"):  # both crowd into one part: they share 2/3
        checks.check_independent_subsets(from_part(60, 0), from_part(40, 1), alpha)
    with pytest.raises(ValueError, match="same n"):
        checks.check_independent_subsets(ours, theirs[:, :-1], alpha)


def test_same_source_rate_on_a_hand_made_example():
    # 5 training examples from sources [0, 0, 1, 1, 0]; target 0 (source 0) ranks 2, 0, 3, ...; target 1
    # (source 1) ranks 3, 2, 0, ...: top-1 hits 0 of target 0's and 1 of target 1's; top-2 hits 1 + 2 of 4
    source_train = torch.tensor([0, 0, 1, 1, 0])
    source_targets = torch.tensor([0, 1])
    scores = torch.tensor([[4.0, 1.0], [0.0, -1.0], [5.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])
    assert checks.same_source_rate(scores, source_train, source_targets) == 0.5
    assert checks.same_source_rate(scores, source_train, source_targets, k=2) == 0.75
    assert checks.same_source_rate(scores, source_train, source_targets, k=5) == pytest.approx((3 + 2) / 10)
    from course_lib.attribution import influence  # found beside identical_class_rate too
    assert influence.same_source_rate(scores, source_train, source_targets, k=2) == 0.75
    for bad, match in (((scores.T, source_train, source_targets), "n_train"),
                       ((scores, source_train[:4], source_targets), "source_train"),
                       ((scores, source_train, torch.tensor([0, 1, 1])), "source_targets"),
                       ((scores, source_train.float(), source_targets), "integer"),
                       ((scores[:, 0], source_train, source_targets), "shape"),
                       ((scores * float("nan"), source_train, source_targets), "NaN")):
        with pytest.raises(ValueError, match=match):
            checks.same_source_rate(*bad)
    for k in (0, 6, 1.0):
        with pytest.raises(ValueError, match="k must be"):
            checks.same_source_rate(scores, source_train, source_targets, k=k)


def test_check_same_source_passes_same_source_scores_and_fails_shuffled_or_cross_source_ones():
    g = torch.Generator().manual_seed(4)
    n, T = 600, 40
    source_train = (torch.arange(n) >= 450).long()  # 75% source 0, as MNIST in the union
    source_targets = torch.arange(T) % 2
    same = (source_train[:, None] == source_targets[None, :]).float()
    good = same + torch.randn(n, T, generator=g)  # favours the own source, with noise
    rate = checks.check_same_source(good, source_train, source_targets, k=10)
    assert rate == checks.same_source_rate(good, source_train, source_targets, k=10) and rate > 0.8
    shuffled = good[torch.randperm(n, generator=g)]  # permuted across training examples: chance (0.5 here)
    with pytest.raises(AssertionError, match="random ranking gives 50.0%"):
        checks.check_same_source(shuffled, source_train, source_targets, k=10)
    other = (1 - same) + torch.randn(n, T, generator=g)  # favours the other source
    with pytest.raises(AssertionError, match="cross-dataset"):
        checks.check_same_source(other, source_train, source_targets, k=10)
    with pytest.raises(AssertionError):  # a margin that even the good scores cannot clear
        checks.check_same_source(good, source_train, source_targets, k=10, margin=0.5)
    with pytest.raises(ValueError, match="transposed"):
        checks.check_same_source(good.T, source_train, source_targets)


def test_check_covers_fails_when_an_item_is_missing():
    assert checks.check_covers(["a", "b", "c"], ["a", "b"], "table") == 2
    with pytest.raises(AssertionError, match="missing \\['c'\\]"):
        checks.check_covers(["a", "b"], ["a", "b", "c"], "table")


def _planted(n=80, m=120, T=6, seed=0):
    """A planted ground truth whose true linear datamodel is w (with noise), and a noisy copy of w."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, n, generator=g) < 0.5
    w = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = (masks.double() @ w + 2.0 * torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
    gt = GroundTruth(masks, outputs.float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
    return gt, w, w + 3.0 * torch.randn(n, T, generator=g, dtype=torch.float64)


def test_check_paired_gain_passes_a_gain_and_fails_a_flat_or_reversed_one():
    gt, w, noisy = _planted()
    assert checks.check_paired_gain(lds.lds_difference(w, noisy, gt), "true minus noisy") > 0
    with pytest.raises(AssertionError, match="does not lie above 0"):  # flat: a method against itself
        checks.check_paired_gain(lds.lds_difference(noisy, noisy, gt), "flat")
    with pytest.raises(AssertionError):  # reversed
        checks.check_paired_gain(lds.lds_difference(noisy, w, gt), "reversed")
    with pytest.raises(AssertionError):  # a gain that does not clear a larger bound
        checks.check_paired_gain(lds.lds_difference(w, noisy, gt), "too small", bound=0.99)
    nan = lds.Score(float("nan"), (float("nan"), float("nan")), np.array([]))
    with pytest.raises(AssertionError):
        checks.check_paired_gain(nan, "NaN")


def test_check_same_seed_passes_matching_seeds_and_fails_another():
    assert checks.check_same_seed([7, 7, 7], 7, "ground truths") == 3
    with pytest.raises(AssertionError, match="not all 7"):
        checks.check_same_seed([7, 8, 7], 7, "ground truths")
    with pytest.raises(AssertionError):  # nothing checked is not a pass
        checks.check_same_seed([], 7, "ground truths")
