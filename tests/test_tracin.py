"""course_lib.attribution.tracin and unroll helpers: TracInCP over checkpoints, grouping equal outcomes."""
import pytest
import torch

from course_lib import settings, train
from course_lib.attribution import tracin, unroll


def test_combine_checkpoints_equals_tracincp_at_those_checkpoints(toy):
    cfg = settings.get("smoke", device="cpu", arch="mlp", width=4, depth=1, epochs=2, batch_size=8, lr=0.1,
                       momentum=0.9, weight_decay=0.01)
    traj = train.record_training(cfg, toy, 3, dtype=torch.float64)
    args = (toy.x_train.double(), toy.y_train, toy.x_targets.double(), toy.y_targets)
    net = traj.net.eval()
    per = {s: tracin.tracin_scores(net, [traj.state_at(s)], [1.0], *args) for s in traj.checkpoint_steps(3)}
    steps = traj.checkpoint_steps(3)
    got = tracin.combine_checkpoints(per, traj.lrs, steps, toy.n_train, 0.9)
    w = tracin.lr_weights(traj.lrs, steps, toy.n_train, 0.9)
    want = tracin.tracin_scores(net, [traj.state_at(s) for s in steps], w, *args)
    assert torch.allclose(got.scores, want.scores, rtol=1e-10, atol=1e-14)
    assert got.checkpoints == 3 and got.seconds == pytest.approx(sum(p.seconds for p in per.values()))
    wrong = tracin.combine_checkpoints(per, traj.lrs, steps, toy.n_train, 0.0)  # momentum forgotten: 10x off
    assert not torch.allclose(wrong.scores, want.scores, rtol=1e-3)
    with pytest.raises(KeyError):
        tracin.combine_checkpoints({steps[0]: per[steps[0]]}, traj.lrs, steps, toy.n_train)


def test_shared_outcomes_groups_equal_rows_only():
    base = torch.tensor([[0.0, 1.0], [5.0, 5.0]])
    rows = torch.stack([base[0], base[1], base[0] + 1e-5, base[1] + 0.5, base[0]])
    assert unroll.shared_outcomes(rows, 1e-3) == [[0, 2, 4], [1], [3]]
    assert unroll.shared_outcomes(rows, 1e-9) == [[0, 4], [1], [2], [3]]
    with pytest.raises(ValueError):
        unroll.shared_outcomes(torch.zeros(3), 1e-3)
