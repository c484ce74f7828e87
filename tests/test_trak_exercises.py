"""The reference answers of chapter 06's checked exercises (course_lib.trak_exercises), on small planted inputs."""
import pytest
import torch

from course_lib import lds
from course_lib import trak_exercises as X
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
