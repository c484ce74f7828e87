import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


def test_the_loss_is_a_function_of_the_margin():
    """-log p_y = log(1 + exp(-margin)) exactly, for any number of classes and for confident or wrong predictions;
    a wrong formula (the loss of the other classes' best logit, or softplus(margin)) fails."""
    g = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(200, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=g)
    m = measure.margin(logits, y)
    assert m.min() < -5 and m.max() > 5  # both regimes are covered
    assert torch.allclose(measure.loss_from_margin(m), measure.loss(logits, y), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(F.softplus(m), measure.loss(logits, y), atol=1e-3)


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
    # the stacked forward batches the convolutions (other float summation order), so equal up to round-off growth.
    # Measured after 8 epochs: margins 1.7e-5 apart with two threads, 5.1e-5 with one (2.2e-6 of their largest,
    # 22.9); parameters 7.5e-7 with two threads, 5.8e-6 with one (the vmapped forward: the same); accuracies equal
    assert (out_t - out_a).abs().max() < 5e-6 * out_a.abs().max()
    assert torch.allclose(together.accuracy(smoke_data.x_test, smoke_data.y_test),
                          alone.accuracy(smoke_data.x_test, smoke_data.y_test), rtol=0, atol=1.1e-3)  # 1 image
    for k in together.params:
        assert torch.allclose(together.params[k], alone.params[k], rtol=0, atol=2e-5)


@pytest.mark.parametrize("depth", [0, 2])
def test_stacked_cnn_forward_equals_vmapped_modules(depth, smoke, smoke_data):
    """SmallCNN.forward_stacked (grouped convolutions, channels-last) against vmap over functional_call of the
    module itself: the same logits and the same parameter gradients, per-model and shared inputs."""
    from torch.func import functional_call, vmap
    cfg = smoke.replace(depth=depth, width=4)
    net, params, buffers = train.init_params(cfg, smoke_data, [1, 2, 3])
    x = smoke_data.x_train[torch.arange(3 * 16).view(3, 16)]
    reference = lambda p, xb, dims: vmap(lambda q, b, xi: functional_call(net, (q, b), (xi,)),
                                         in_dims=(0, 0, dims))(p, buffers, xb)
    for xb, shared in ((x, False), (x[0], True)):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = net.forward_stacked(p, xb, shared_input=shared)
        ref = reference(p, xb, None if shared else 0)
        assert out.shape == ref.shape == (3, 16, 10)
        assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
        g_out = torch.autograd.grad(out.square().sum(), list(p.values()))
        g_ref = torch.autograd.grad(ref.square().sum(), list(p.values()))
        for a, b in zip(g_out, g_ref):
            assert (a - b).abs().max() < 1e-5 * b.abs().max()
        # each model's logits depend on its own parameters only
        assert not torch.allclose(out[0], out[1])


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


# ---- independent references for the training recipe (issue 8): a schedule formula, SGD replayed by hand


@pytest.mark.parametrize("steps", [1, 3, 10, 37, 250])
def test_lr_schedules_equal_their_formulas_at_every_step(steps):
    """Every step's learning rate, against the schedules written out independently: 'linear' is lr times
    1, 1 - 1/T, ..., 1/T; 'triangle' climbs lr/P, 2 lr/P, ..., lr over the first P = max(1, T // 5) steps, then
    falls lr, ..., lr/(T - P) in equal steps (reaching 0 one step after the end)."""
    cfg = settings.get("smoke")
    lr = cfg.lr
    linear = lr * np.linspace(1, 0, steps + 1)[:-1]
    P = max(1, steps // 5)
    triangle = lr * np.concatenate([np.arange(1, P + 1) / P, np.linspace(1, 0, steps - P + 1)[:-1]])
    for schedule, expected in (("linear", linear), ("triangle", triangle), ("constant", np.full(steps, lr))):
        got = train.lr_schedule(cfg.replace(schedule=schedule), steps)
        assert got.shape == (steps,) and got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=0, err_msg=schedule)
    assert torch.equal(train.lr_schedule(cfg, steps, lr=0.2), train.lr_schedule(cfg.replace(lr=0.2), steps))


def _logreg_grads(net, w, x, y):
    """Gradient of the mean cross-entropy of multinomial logistic regression, in closed form (no autograd):
    d/dlogits = (softmax - onehot) / B; d/dW = that^T x, d/db = its column sums."""
    x = x.flatten(1)
    dz = ((x @ w["linear.weight"].T + w["linear.bias"]).softmax(-1)
          - F.one_hot(y, w["linear.bias"].shape[-1]).to(x.dtype)) / len(y)
    return {"linear.weight": dz.T @ x, "linear.bias": dz.sum(0)}


def _autograd_grads(net, w, x, y):
    return torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(net, p, (x,)), y))(w)


def _replay_sgd(cfg, data, mask, seed, epochs, grads_of):
    """The recipe replayed step by step, independently of ``train``: initialisation from torch.manual_seed(seed),
    a fresh permutation of the subset per epoch from a generator seeded by ``seed``, the linear schedule, and SGD
    with Nesterov momentum and coupled weight decay as PyTorch defines it (buffer b = g at the first step):
        g = grad + wd * w;   b = mu * b + g;   w = w - lr_t * (g + mu * b).
    Returns the parameters after every step (a list of dicts)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.build(cfg.arch, data.in_shape, data.num_classes, width=cfg.width, depth=cfg.depth)
    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    subset = torch.nonzero(mask).flatten()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        batches += list(subset[torch.randperm(len(subset), generator=gen)].split(cfg.batch_size))
    buf, after = {}, []
    for t, b in enumerate(batches):
        lr = cfg.lr * (1 - t / len(batches))
        g = grads_of(net, w, data.x_train[b], data.y_train[b])
        for k in w:
            d = g[k] + cfg.weight_decay * w[k]
            buf[k] = d if t == 0 else cfg.momentum * buf[k] + d
            w[k] = w[k] - lr * (d + cfg.momentum * buf[k])
        after.append({k: v.clone() for k, v in w.items()})
    return after


@pytest.mark.parametrize("arch, ensemble", [("logreg", 1), ("logreg", 2), ("cnn", 2)])
def test_training_equals_sgd_replayed_by_hand(arch, ensemble, smoke, smoke_data):
    """train_models against the recipe replayed by hand (closed-form gradients for logistic regression, autograd
    on a plain module for the CNN), alone and as a vmapped ensemble of two: the final parameters AND every
    checkpoint equal the replay after that many steps, and the recorded learning rates are the schedule's.
    Measured: at most 7.5e-8 apart (parameters of size ~0.3) in float32; dropping the weight decay (5e-4) moves
    them by 7e-6 after two steps and 4e-5 after eight, aliasing the checkpoints moves the early ones by more."""
    cfg = smoke.replace(arch=arch, ensemble_size=ensemble)
    masks = torch.zeros(2, smoke_data.n_train, dtype=torch.bool)
    masks[0, :100] = masks[1, 200:300] = True  # 100 examples, batches of 32: 4 steps per epoch
    seeds = [3, 4]
    m = train.train_models(cfg, smoke_data, masks, seeds, epochs=2, checkpoints=4)
    assert [s for s, _ in m.checkpoints] == [2, 4, 6, 8]
    assert torch.allclose(m.lrs, cfg.lr * (1 - torch.arange(8, dtype=torch.float64) / 8), rtol=1e-12, atol=0)
    grads_of = _logreg_grads if arch == "logreg" else _autograd_grads
    for e, seed in enumerate(seeds):
        after = _replay_sgd(cfg, smoke_data, masks[e], seed, 2, grads_of)
        assert len(after) == 8
        for step, snapshot in m.checkpoints + [(8, m.params)]:
            for k, v in snapshot.items():
                err = (v[e] - after[step - 1][k]).abs().max().item()
                assert err < 5e-7, (arch, ensemble, e, step, k, err)


def test_reference_models_are_keyed_by_recipe_stream_and_checkpoints(smoke, smoke_data, tmp_path, monkeypatch):
    """The cache folder is the one given, the default is one model of the "reference" stream without checkpoints,
    and another recipe, stream or number of checkpoints never loads these models (gaps found by mutation testing:
    a constant cache key, another default stream or default checkpoints all passed)."""
    cfg = smoke.replace(epochs=1)
    one = train.reference_models(cfg, smoke_data, cache=tmp_path)
    assert len(one) == 1 and one.checkpoints == []
    assert one.seeds.tolist() == train.stream_seeds("reference", 1).tolist()
    assert len(list(tmp_path.glob("models_mnist5k_*/model_0000.pt"))) == 1
    calls = []
    real = train.train_models
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: (calls.append(len(a[2])), real(*a, **kw))[1])
    train.reference_models(cfg.replace(lr=0.01), smoke_data, cache=tmp_path)
    train.reference_models(cfg, smoke_data, cache=tmp_path, stream="other")
    with_ckpt = train.reference_models(cfg, smoke_data, cache=tmp_path, checkpoints=2)
    assert calls == [1, 1, 1] and len(with_ckpt.checkpoints) == 2
    assert len(list(tmp_path.glob("models_mnist5k_*"))) == 4
