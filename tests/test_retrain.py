"""retrain.leave_one_out: Koh & Liang's retraining from the trained parameters, checked against the exact
influence of a convex model and against the self-effect every removal must show."""
import numpy as np
import pytest
import torch

from course_lib import data as D, grads, retrain, train
from course_lib.attribution import influence as inf


@pytest.fixture(scope="module")
def convex(smoke, smoke_data):
    """Logistic regression on 7x7-pooled smoke digits, trained long enough to sit near its unique minimum."""
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 4)
    d = smoke_data
    small = D.Data("smoke-7x7", pool(d.x_train), d.y_train, pool(d.x_test), d.y_test, d.target_idx, d.classes)
    cfg = smoke.replace(arch="logreg", epochs=40, weight_decay=1e-2, lr=0.1, device="cpu")
    return cfg, small, train.train_models(cfg, small, train.full_mask(small), [0])


def test_leave_one_out_matches_the_exact_influence_of_a_convex_model(convex):
    cfg, small, ref = convex
    net, state = ref.net, ref.state_of(0)
    x_t, y_t = small.x_targets[:1], small.y_targets[:1]
    H = grads.hessian(net, state, small.x_train, small.y_train, weight_decay=cfg.weight_decay)
    v = grads.per_example_grads(net, state, x_t, y_t, "loss").T
    tau = inf.influence_from_solution(grads.per_example_grads(net, state, small.x_train, small.y_train, "loss"),
                                      inf.solve_exact(H, v, 0.0))[:, 0]
    removed = tau.abs().argsort(descending=True)[:12]
    actual = retrain.leave_one_out(cfg, small, ref, removed, x_t, y_t, seeds=[1, 2], epochs=20, lr=0.05)
    assert actual.shape == (12, 1)
    r = np.corrcoef(-tau[removed].numpy(), actual[:, 0].numpy())[0, 1]
    assert r > 0.9, r  # measured 0.99; removals matched to the wrong rows would not correlate
    # misaligned removals (each effect paired with another example's prediction) do not
    assert np.corrcoef(-tau[removed].roll(3).numpy(), actual[:, 0].numpy())[0, 1] < r - 0.3


def test_leaving_an_example_out_raises_its_own_loss(convex):
    cfg, small, ref = convex
    removed = torch.tensor([3, 50, 120, 400])
    own = retrain.leave_one_out(cfg, small, ref, removed, small.x_train[removed], small.y_train[removed],
                                seeds=[5, 6], epochs=20, lr=0.05)
    assert (own.diagonal() > 0).all(), own.diagonal()


@pytest.mark.parametrize("kwargs, match", [({"removed": []}, "removed"), ({"removed": [10 ** 6]}, "removed"),
                                           ({"seeds": []}, "seed")])
def test_bad_input_fails_clearly(convex, kwargs, match):
    cfg, small, ref = convex
    args = {"removed": [1], "seeds": [0], **kwargs}
    with pytest.raises(ValueError, match=match):
        retrain.leave_one_out(cfg, small, ref, args["removed"], small.x_targets[:1], small.y_targets[:1],
                              seeds=args["seeds"], epochs=1, lr=0.01)


def test_leave_one_out_per_seed_keeps_each_seeds_change(convex):
    cfg, small, ref = convex
    removed, x_t, y_t = torch.tensor([3, 50, 120]), small.x_targets[:2], small.y_targets[:2]
    each = retrain.leave_one_out(cfg, small, ref, removed, x_t, y_t, seeds=[1, 2], epochs=2, lr=0.05, per_seed=True)
    mean = retrain.leave_one_out(cfg, small, ref, removed, x_t, y_t, seeds=[1, 2], epochs=2, lr=0.05)
    assert each.shape == (3, 2, 2)
    assert torch.allclose(each.mean(1), mean, atol=1e-6)
