"""The reference answers of the chapters' checked exercises (course_lib.references), on small planted inputs."""
import pytest
import torch

from course_lib import lds
from course_lib.references import ch02, ch03, ch07
from course_lib.references import ch06 as X
from course_lib.attribution import trak


def _planted_gt(scores, m=60, seed=0):
    """A ground truth whose outputs are exactly the additive predictions of ``scores`` (n, T): the LDS of those
    scores is 1, that of scores ranking the subsets differently is below 1."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(m, scores.shape[0], generator=g) < 0.5
    outputs = (masks.double() @ scores.double())[:, None, :].float()
    return lds.GroundTruth(masks, outputs, torch.ones(m, 1), torch.arange(scores.shape[1]), {}, 0.0)


def test_cheapest_reaching_counts_training_and_both_tables():
    pd = pytest.importorskip("pandas")
    by_M = pd.DataFrame({"M": [1, 2, 4], "LDS": [0.20, 0.30, 0.40], "with training (s)": [10.0, 20.0, 40.0]})
    by_k = pd.DataFrame({"k": [64, 256], "LDS": [0.37, 0.39], "seconds": [5.0, 12.0]})
    # goal 0.9 x 0.40 = 0.36: M = 4 (40 s) and the two sweep points (2 models: 5 + 6 s and 12 + 6 s) reach it
    got = X.cheapest_reaching(by_M, by_k, k_main=128, n_sweep=2, seconds_per_model=3.0)
    assert got == {"M": 2, "k": 64, "cost": 11.0, "LDS": 0.37, "best": 0.40}
    # at 30 s per trained model the sweep's points cost 65 and 72 s: the M table's 40 s point wins
    assert X.cheapest_reaching(by_M, by_k, 128, 2, 30.0)["M"] == 4
    # a lower share lets a cheaper point through
    assert X.cheapest_reaching(by_M, by_k, 128, 2, 30.0, share=0.5)["M"] == 1
    with pytest.raises(ValueError, match="empty"):
        X.cheapest_reaching(by_M.iloc[:0], by_k.iloc[:0], 128, 2, 3.0)


def test_with_r_puts_the_gauss_newton_weights_inside_the_kernel():
    """Planted: the outputs are the additive predictions of phi (Phi^T R Phi + lambda I)^{-1} phi_t Q written out,
    so the reference scores LDS 1; TRAK's kernel without R ranks the subsets differently (lower LDS)."""
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(30, 6, generator=g, dtype=torch.float64)
    phi_t = torch.randn(8, 6, generator=g, dtype=torch.float64)
    q = torch.where(torch.rand(30, generator=g) < 0.5, 0.01, 0.5).double()
    kernel = phi.T @ torch.diag(q * (1 - q)) @ phi
    lam = 0.05 * torch.trace(kernel) / 6
    expected = phi @ torch.linalg.inv(kernel + lam * torch.eye(6, dtype=torch.float64)) @ phi_t.T * q[:, None]
    gt = _planted_gt(expected)
    got = X.with_r(phi, phi_t, q, 0.05, gt)
    assert got.mean > 0.999
    assert lds.lds(trak.glm_influence(phi, phi_t, q, 0.05), gt, part="eval").mean < got.mean - 1e-3


def test_chapter_03_answers():
    budgets = [25, 50, 100, 200, 400]
    ref = ch03.answers(budgets, [0.0, 0.1, 0.2, 0.3, 0.4], [0, 1, 3, 8, 12], ceiling_mean=0.5)
    assert ref[3] == "denser"
    # the line through the last 4 points: 0.1 + 0.1 log2(m / 50), reaches 0.45 at log2(m / 50) = 3.5
    assert ref[5] == pytest.approx(50 * 2 ** 3.5, rel=1e-9)
    assert ch03.answers(budgets[:2], [0.1, 0.1], [5, 2], 0.5) == {3: "sparser", 5: float("inf")}
    assert ch03.answers([64], [0.1], [0], 0.5) == {3: "unchanged", 5: float("inf")}
    with pytest.raises(ValueError):
        ch03.answers([50, 25], [0.1, 0.2], [1, 2], 0.5)
    with pytest.raises(ValueError):
        ch03.answers([25, 50], [0.1], [1, 2], 0.5)


def test_chapter_07_answers():
    pd = pytest.importorskip("pandas")
    labels, lds_means = ["a", "b", "c"], [0.1, 0.3, 0.5]

    class R:  # an LDS result: only .mean is read
        def __init__(self, mean):
            self.mean = mean

    table = pd.DataFrame({"method": labels, "seed-averaged": [R(v) for v in lds_means],
                          "attribution s": [1.0, 5.0, 50.0], "training s": [0.0, 50.0, 5000.0],
                          "identical class": [0.95, 0.2, 0.99]})
    table["total s"] = table["attribution s"] + table["training s"]
    ref = ch07.answers(table)
    assert ch07.FAST_BUDGET == 10.0
    # median total 55 s; 5 + 50 / 10 s <= 10 (55 s as it is); only "a" is >= 0.9 and < 40% of 0.5
    assert ref == {1: "b", 2: "b", 3: 1}
    table.loc[1, "training s"] = 60.0  # 5 + 6 s: over the budget even with training 10 times cheaper
    assert ch07.answers(table)[2] == "a"


def test_chapter_02_answers():
    """On a planted ground truth: the quarter-subsets interval is wider (about sqrt(4) = 2 times), a single model's
    LDS is below the k-model average's when seed noise is large, and the restriction keeps the first m rows."""
    g = torch.Generator().manual_seed(0)
    n, m, T, k = 60, 80, 16, 4
    masks = torch.rand(m, n, generator=g) < 0.5
    tau = torch.randn(n, T, generator=g, dtype=torch.float64)
    outputs = masks.double() @ tau
    outputs = outputs[:, None, :] + 6.0 * torch.randn(m, k, T, generator=g, dtype=torch.float64)
    gt = lds.GroundTruth(masks, outputs.float(), torch.ones(m, k), torch.arange(T), {}, 0.0)
    few = ch02.first_subsets(gt, 20)
    assert torch.equal(few.masks, masks[:20]) and torch.equal(few.outputs, gt.outputs[:20])
    with pytest.raises(ValueError, match="m must lie"):
        ch02.first_subsets(gt, 2)
    assert 1.4 < ch02.width_ratio_quarter(tau, gt) < 3.0
    assert 0.3 < ch02.one_seed_ratio(tau, gt) < 0.95


def test_chapter_02_other_targets_are_class_balanced_non_targets(smoke_data):
    idx = ch02.non_target_images(smoke_data, 5)
    targets = set(smoke_data.target_idx.tolist())
    labels = smoke_data.y_test[idx]
    assert len(idx) == 50 and not targets & set(idx.tolist()) and (idx.diff() > 0).all()
    assert torch.equal(labels.bincount(minlength=10), torch.full((10,), 5))
    first_zero = min(i for i in range(len(smoke_data.y_test)) if i not in targets and int(smoke_data.y_test[i]) == 0)
    assert int(idx[0]) == first_zero
    with pytest.raises(ValueError, match="fewer than"):
        ch02.non_target_images(smoke_data, 10_000)


def test_chapter_02_shifted_lds_equals_the_unshifted():
    g = torch.Generator().manual_seed(1)
    n, m, T = 40, 30, 6
    masks = lds.subset_masks(n, m, 0.5, 0)
    tau = torch.randn(n, T, generator=g, dtype=torch.float64)
    gt = lds.GroundTruth(masks, (masks.double() @ tau + torch.randn(m, T, generator=g, dtype=torch.float64))[:, None]
                         .float(), torch.ones(m, 1), torch.arange(T), {}, 0.0)
    assert ch02.shifted_lds(tau, gt, 5.0) == pytest.approx(lds.lds(tau, gt, part="eval").mean, abs=1e-12)
