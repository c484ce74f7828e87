import pytest
import torch

from course_lib import measure, models, settings, train
from course_lib.lds import subset_masks


def test_margin_formula():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    expected = torch.stack([2 - torch.logsumexp(torch.tensor([1.0, 0.0]), 0),
                            -1 - torch.logsumexp(torch.tensor([0.0, 3.0]), 0)])
    assert torch.allclose(measure.margin(logits, y), expected)
    # the margin is the log-odds of the correct class
    p = logits.softmax(-1)[torch.arange(2), y]
    assert torch.allclose(measure.margin(logits, y), torch.log(p / (1 - p)), atol=1e-6)
    # and the loss is the cross-entropy
    assert torch.allclose(measure.loss(logits, y), torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_margin_broadcasts_over_models():
    logits = torch.randn(3, 5, 10)
    y = torch.randint(0, 10, (5,))
    assert torch.allclose(measure.margin(logits, y)[1], measure.margin(logits[1], y))


def test_lr_schedules():
    cfg = settings.get("smoke")
    assert torch.allclose(train.lr_schedule(cfg, 4), torch.tensor([1, 0.75, 0.5, 0.25], dtype=torch.float64) * cfg.lr)
    tri = train.lr_schedule(cfg.replace(schedule="triangle"), 10)
    assert tri.argmax() == 1 and tri.max() == cfg.lr and tri[-1] > 0


def test_batch_order_is_a_permutation_per_epoch():
    subset = torch.arange(10, 30)
    batches = train.batch_order(3, subset, epochs=2, batch_size=8)
    assert [len(b) for b in batches] == [8, 8, 4, 8, 8, 4]
    assert sorted(torch.cat(batches[:3]).tolist()) == subset.tolist()
    assert all(torch.equal(a, b) for a, b in zip(batches, train.batch_order(3, subset, 2, 8)))


def test_training_is_deterministic(smoke, smoke_data):
    masks = subset_masks(smoke_data.n_train, 2, 0.5, seed=1)
    a = train.train_models(smoke, smoke_data, masks, [5, 6])
    b = train.train_models(smoke, smoke_data, masks, [5, 6])
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    c = train.train_models(smoke, smoke_data, masks, [5, 7])
    assert torch.equal(a.params["head.weight"][0], c.params["head.weight"][0])
    assert not torch.equal(a.params["head.weight"][1], c.params["head.weight"][1])


def test_ensemble_matches_one_at_a_time(smoke, smoke_data):
    masks = subset_masks(smoke_data.n_train, 3, 0.5, seed=2)
    seeds = [11, 12, 13]
    together = train.train_models(smoke.replace(ensemble_size=3), smoke_data, masks, seeds)
    alone = train.train_models(smoke.replace(ensemble_size=1), smoke_data, masks, seeds)
    out_t = together.outputs(smoke_data.x_test, smoke_data.y_test)
    out_a = alone.outputs(smoke_data.x_test, smoke_data.y_test)
    # vmap batches the convolutions (other float summation order), so equal up to round-off growth
    assert (out_t - out_a).abs().max() < 1e-2 * out_a.abs().max()
    assert torch.allclose(together.accuracy(smoke_data.x_test, smoke_data.y_test),
                          alone.accuracy(smoke_data.x_test, smoke_data.y_test), atol=0.005)
    for k in together.params:
        assert torch.allclose(together.params[k], alone.params[k], atol=1e-3, rtol=1e-2)


def test_models_keep_mask_and_seed_order(smoke, smoke_data):
    # subsets of different sizes train in separate groups; the result keeps the caller's order
    masks = torch.zeros(3, smoke_data.n_train, dtype=torch.bool)
    masks[0, :300] = masks[1, :200] = masks[2, 100:400] = True
    out = train.train_models(smoke.replace(epochs=1), smoke_data, masks, [1, 2, 3])
    assert torch.equal(out.masks, masks) and out.seeds.tolist() == [1, 2, 3]
    ref = train.train_models(smoke.replace(epochs=1), smoke_data, masks[1:2], [2])
    assert torch.allclose(out.params["head.bias"][1], ref.params["head.bias"][0])


def test_checkpoints_and_warm_start(smoke, smoke_data):
    mask = train.full_mask(smoke_data)
    m = train.train_models(smoke.replace(epochs=2), smoke_data, mask, [0], checkpoints=2)
    steps = len(m.lrs)
    assert [s for s, _ in m.checkpoints] == [steps // 2, steps]
    assert torch.equal(m.checkpoints[-1][1]["head.weight"], m.params["head.weight"])
    # a warm start with a zero learning rate moves nothing (only weight decay at lr 0: nothing)
    w = train.train_models(smoke.replace(epochs=1, schedule="constant"), smoke_data, mask, [0], init=m.params,
                           lr=1e-12)
    assert torch.allclose(w.params["head.weight"], m.params["head.weight"], atol=1e-8)


def test_trained_cnn_learns(smoke, smoke_data):
    m = train.train_models(smoke, smoke_data, train.full_mask(smoke_data), [0])
    assert m.accuracy(smoke_data.x_test, smoke_data.y_test).item() > 0.8
    assert models.num_params(m.module(0)) <= 50_000


def test_bad_masks_fail_clearly(smoke, smoke_data):
    with pytest.raises(ValueError, match="masks must have shape"):
        train.train_models(smoke, smoke_data, torch.ones(2, 7, dtype=torch.bool), [0, 1])
    with pytest.raises(ValueError, match="one seed per mask"):
        train.train_models(smoke, smoke_data, train.full_mask(smoke_data, 2), [0])


@pytest.mark.parametrize("arch", ["logreg", "mlp", "cnn"])
def test_every_mnist_architecture_trains_in_an_ensemble(arch, smoke, smoke_data):
    cfg = smoke.replace(arch=arch, epochs=3)
    m = train.train_models(cfg, smoke_data, train.full_mask(smoke_data, 2), [0, 1])
    assert m.accuracy(smoke_data.x_test, smoke_data.y_test).min() > 0.5


def test_batchnorm_model_trains_one_at_a_time():
    from course_lib.data import Data
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 2, (64,), generator=g)
    d = Data("toy", x, y, x[:16], y[:16], torch.arange(4), ("a", "b"))
    cfg = settings.get("gpu", device="cpu", width=4, epochs=1, batch_size=32, ensemble_size=2)
    m = train.train_models(cfg, d, train.full_mask(d, 2), [0, 1])
    assert m.buffers and m.logits(d.x_test).shape == (2, 16, 2)
    assert not torch.equal(m.buffers["body.0.1.running_mean"][0], torch.zeros(4))  # running stats were updated


def test_reference_models_are_cached_and_extended(smoke, smoke_data, tmp_path, monkeypatch):
    cfg = smoke.replace(epochs=1)
    one = train.reference_models(cfg, smoke_data, 1, cache=tmp_path)
    calls = []
    real = train.train_models
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: (calls.append(len(a[2])), real(*a, **kw))[1])
    three = train.reference_models(cfg, smoke_data, 3, cache=tmp_path)
    assert calls == [2]  # only the two missing models were trained
    assert len(three) == 3 and torch.equal(three.params["head.weight"][0], one.params["head.weight"][0])
    assert three.masks.all() and len(set(three.seeds.tolist())) == 3
