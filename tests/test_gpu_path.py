"""The ``gpu`` setting's code path, run on a CPU: ResNet-9 with batch norm on CIFAR-2, shrunk to seconds.

``make test`` runs every chapter in the ``smoke`` setting (the small CNN on MNIST), so nothing else exercises CIFAR
loading or a batch-norm model end to end. Here ``settings.get("gpu", device="cpu", ...)`` keeps the gpu setting's
dataset, architecture and recipe (cifar2, resnet9, triangle schedule, lr 0.4, ensemble_size 1) and shrinks the rest:
a fake CIFAR-10 in torchvision's on-disk format (conftest's ``fake_cifar_env``: 40 cat/dog training and 8 test
images, read through ``data.for_setting`` and $COURSE_DATA, downloads refused), ResNet-9 of width 4 (about 26k
parameters), 2 epochs. Every step a chapter takes with that setting runs: the reference models, the ground truth
and LDS, every attribution method of chapters 01-04 and 06 and the model-free baselines; each must give finite
(n_train, n_targets) scores. Where an exact reference is cheap it is asserted (per-example gradients and features
against autograd on the ordinary module, eval outputs independent of the batch, side-by-side training against one
model at a time). Batch norm: every method must evaluate the model in eval mode through its full state; the tests
fail if a method drops the buffers (running statistics) or runs the network in training mode.
"""
import dataclasses

import pytest
import torch
from torch.func import functional_call

from conftest import autograd_grads
from course_lib import data as D, grads, lds, models as M, settings, train
from course_lib.attribution import datamodels, ekfac, influence, similarity, surrogate, trak

N_TRAIN, N_TARGETS = 40, 8  # conftest's fake_cifar_env: CIFAR-2 has 40 training and 8 test images


@pytest.fixture(scope="module")
def cfg(fake_cifar_env):
    return settings.get("gpu", device="cpu", width=4, n_targets=N_TARGETS, epochs=2, batch_size=10, gt_subsets=8,
                        gt_models=2, dm_models=12, trak_models=2, trak_proj_dim=32)


@pytest.fixture(scope="module")
def data(cfg):
    return D.for_setting(cfg)  # $COURSE_DATA -> the fake folder; download=True must find the files present


@pytest.fixture(scope="module")
def ref(cfg, data):
    return train.reference_models(cfg, data, cfg.trak_models)  # cached in $COURSE_CACHE (a fresh folder)


@pytest.fixture(scope="module")
def gt(cfg, data):
    return lds.build_ground_truth(cfg, data, progress=False)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _args(data):
    return data.x_train, data.y_train, data.x_targets, data.y_targets


# ----------------------------------------------------------------------------------- setting, data, training


def test_setting_data_and_model_are_the_gpu_family(cfg, data, ref, fake_cifar_env):
    preset = settings.get("gpu")
    for k in ("dataset", "arch", "lr", "momentum", "weight_decay", "schedule", "ensemble_size"):
        assert getattr(cfg, k) == getattr(preset, k), k
    assert cfg.dataset == "cifar2" and cfg.arch == "resnet9" and cfg.torch_device == torch.device("cpu")
    # the data: torchvision's reader on the fake folder that $COURSE_DATA names, cats (0) vs dogs (1)
    assert D.data_dir() == fake_cifar_env["data"]
    assert data.name == "cifar2" and data.classes == ("cat", "dog")
    assert data.x_train.shape == (N_TRAIN, 3, 32, 32) and data.y_train.bincount().tolist() == [20, 20]
    assert len(data.target_idx) == N_TARGETS and data.x_targets.shape == (N_TARGETS, 3, 32, 32)
    # the model: ResNet-9 with batch norm, width 4 here; the preset itself builds the full width 64
    assert isinstance(ref.net, M.ResNet9) and M.has_batchnorm(ref.net) and ref.net.head.in_features == 8 * 4
    assert train.build_model(preset.replace(device="cpu"), data).head.in_features == 8 * 64


def test_reference_models_are_finite_with_trained_statistics(cfg, data, ref):
    steps = cfg.epochs * (N_TRAIN // cfg.batch_size)
    assert len(ref) == cfg.trak_models and not ref.net.training
    assert ref.buffers, "batch norm's running statistics travel with the models"
    for k, v in {**ref.params, **ref.buffers}.items():
        assert torch.isfinite(v.float()).all(), k
    # the skeleton keeps a fresh ResNet-9's statistics (mean 0, variance 1): what a path that drops the trained
    # ones falls back on (``functional_call`` takes every entry missing from the state from the skeleton)
    defaults = dict(ref.net.named_buffers())
    assert all((v == 0).all() for k, v in defaults.items() if k.endswith("running_mean"))
    assert all((v == 1).all() for k, v in defaults.items() if k.endswith("running_var"))
    for k, v in ref.buffers.items():
        if k.endswith("num_batches_tracked"):
            assert v.tolist() == [steps] * len(ref), k  # one update per training step, per model
        else:
            assert not torch.allclose(v[0], defaults[k]), f"{k} kept its initial value"
    assert torch.isfinite(ref.outputs(data.x_test, data.y_test)).all()
    # asking again loads the same models from the cache (one file per model)
    again = train.reference_models(cfg, data, cfg.trak_models)
    for k in {**ref.params, **ref.buffers}:
        src = ref.params if k in ref.params else ref.buffers
        dst = again.params if k in again.params else again.buffers
        assert torch.equal(src[k], dst[k]), k


def test_eval_outputs_do_not_depend_on_the_batch(ref, data):
    """In eval mode batch norm uses the running statistics, so an image's logits are the same alone, in any batch
    and in any order, and equal the ordinary module's. (In training mode they would not be: checked as a control.)"""
    x = torch.cat([data.x_test, data.x_train[:8]])
    full = ref.logits(x)
    alone = torch.cat([ref.logits(x[i:i + 1]) for i in range(len(x))], 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = ref.logits(x[perm])[:, perm.argsort()]
    assert torch.allclose(alone, full, rtol=0, atol=1e-5) and torch.allclose(shuffled, full, rtol=0, atol=1e-5)
    with torch.no_grad():
        module_out = torch.stack([ref.module(i)(x) for i in range(len(ref))])
    assert torch.allclose(module_out, full, rtol=0, atol=1e-5)
    state = {k: v.clone() for k, v in ref.state_of(0).items()}  # training mode updates the statistics in place
    net = ref.module(0).train()
    with torch.no_grad():
        in_batch = functional_call(net, state, (x,))[:4]
        small_batch = functional_call(net, state, (x[:4],))
    assert (in_batch - small_batch).abs().max() > 1e-3  # the control: batch statistics do depend on the batch


def _largest_difference(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _relative_differences(a, b) -> torch.Tensor:
    """(E,) per model: || state_a - state_b || / || state_a || over the float tensors of the dicts a and b."""
    flat = lambda d: torch.cat([v.double().flatten(1) for v in d.values() if v.is_floating_point()], 1)
    return (flat(a) - flat(b)).norm(dim=1) / flat(a).norm(dim=1)


def test_side_by_side_training_matches_one_at_a_time(cfg, data, monkeypatch):
    """Batch-norm models train side by side (one vmapped step for all of them; the running statistics are stacked
    buffers, each model's updated from its own batch) and come out as when trained one at a time.

    float64: the two agree to round-off (measured after 2 epochs: parameters 1e-15, running statistics 1e-14 apart),
    so the batched computation is the same computation. float32 (the default): the batched convolutions sum in
    another order, and max pooling turns round-off into a discrete change where a pooling window holds two nearly
    equal values (measured: one of the 4 models meets one 1e-7 apart at its first step, and its parameters end 1.7%
    apart after 1 epoch, while the other three stay within 4e-7). One-at-a-time training is exactly as sensitive to
    its own round-off (moving the pixels by one float32 ulp moves that same model by the same amount), so each
    model must agree to 1e-5, or at most twice as well as one-at-a-time training agrees with itself under such a
    1-ulp change of the pixels."""
    masks = lds.subset_masks(N_TRAIN, 4, 0.5, seed=3, stream="test-side-by-side")
    seeds = train.stream_seeds("test-side-by-side", 4)
    # float64, 2 epochs, every model its own subset, seed and batch order (the ensemble trainer's inner function)
    group = lambda c, rows: train._train_group(c, data, masks[rows], seeds[rows], None, None, None, 0, False,
                                               dtype=torch.float64)
    alone = train.Models.concat([group(cfg, [e]) for e in range(4)])
    together = group(cfg.replace(ensemble_size=4), list(range(4)))
    assert _largest_difference(together.params, alone.params) < 1e-12
    assert _largest_difference(together.buffers, alone.buffers) < 1e-12
    for k, v in together.buffers.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(v, alone.buffers[k]), k
    # float32 through the public trainer: ensemble_size 4 (side by side) vs 1 (one at a time), 1 epoch
    short = cfg.replace(epochs=1)
    alone = train.train_models(short.replace(ensemble_size=1), data, masks, seeds)
    vmapped = []
    real_vmap = train.vmap
    monkeypatch.setattr(train, "vmap", lambda *a, **k: vmapped.append(1) or real_vmap(*a, **k))
    together = train.train_models(short.replace(ensemble_size=4), data, masks, seeds)
    assert len(vmapped) == len(together.lrs), "one vmapped forward per training step for the 4 models"
    monkeypatch.undo()
    for part in ("params", "buffers"):
        for k, v in getattr(together, part).items():
            assert torch.isfinite(v.float()).all(), k
    ulp = 2.0 ** -23
    controls = [train.train_models(short.replace(ensemble_size=1), dataclasses.replace(
        data, x_train=data.x_train * (1 + f * ulp)), masks, seeds) for f in (2, -2)]
    for part in ("params", "buffers"):
        diff = _relative_differences(getattr(alone, part), getattr(together, part))
        own = torch.stack([_relative_differences(getattr(alone, part), getattr(c, part)) for c in controls]).amax(0)
        assert (diff <= torch.clamp(2 * own, min=1e-5)).all(), (part, diff.tolist(), own.tolist())
    # the models differ from each other (different seeds and subsets): the comparison is not trivially true
    assert _relative_differences(alone.params, alone.select([1, 0, 3, 2]).params).min() > 1e-2


# ------------------------------------------------------------------------------------------- ground truth and LDS


def test_ground_truth_and_lds(cfg, data, gt):
    assert gt.masks.shape == (cfg.gt_subsets, N_TRAIN) and (gt.masks.sum(1) == N_TRAIN // 2).all()
    assert gt.outputs.shape == (cfg.gt_subsets, cfg.gt_models, len(data.y_test))
    assert torch.isfinite(gt.outputs).all() and ((gt.accuracy >= 0) & (gt.accuracy <= 1)).all()
    assert torch.equal(gt.target_idx, data.target_idx)
    again = lds.build_ground_truth(cfg, data, progress=False)  # from the cache
    assert torch.equal(again.outputs, gt.outputs) and torch.equal(again.masks, gt.masks)
    # the LDS of the ground truth's own per-example contributions (difference of means) is positive; of class
    # match a finite correlation
    dom = datamodels.difference_of_means(gt.masks, gt.target_outputs()).weights
    for scores in (dom, similarity.class_match(data.y_train, data.y_targets)):
        s = lds.lds(scores, gt, n_boot=200)
        assert -1 <= s.mean <= 1 and s.ci[0] <= s.mean <= s.ci[1] and len(s.per_target) == N_TARGETS
    assert lds.lds(dom, gt, n_boot=200).mean > 0.5
    ceil = lds.noise_ceiling(gt, n_boot=200)
    assert all(0 <= c.mean <= 1 for c in (ceil["ceiling_1"], ceil["ceiling_k"]))


# ---------------------------------------------------------------------------------- every method, finite scores


@pytest.fixture(scope="module")
def train_grads(ref, data):
    return grads.per_example_grads(ref.net, ref.state_of(0), data.x_train, data.y_train, "loss")


@pytest.fixture(scope="module")
def target_grads(ref, data):
    return grads.per_example_grads(ref.net, ref.state_of(0), data.x_targets, data.y_targets, "margin")


def _influence_cg(cfg, data, ref, tg, gg):
    return influence.influence_scores(ref.net, ref.state_of(0), *_args(data), weight_decay=cfg.weight_decay,
                                      damping=0.1, solver="cg", iters=4, train_grads=tg).scores


def _ekfac(cfg, data, ref, kind):
    factors = ekfac.cached_factors(cfg, data, ref, 0, "sampled")
    res = ekfac.influence_scores(factors, ref.net, ref.state_of(0), *_args(data), dampings=[1e-3, 0.1],
                                 kinds=[kind], weight_decay=cfg.weight_decay)
    assert len(res.scores) == 2
    return res.scores[(kind, 0.1)]


def _datamodels(cfg, data, method):
    td = datamodels.training_data(cfg, data, progress=False)  # cfg.dm_models fresh subsets, never the LDS ones
    assert len(td) == cfg.dm_models and torch.isfinite(td.outputs).all()
    return datamodels.fit(method, td).weights


METHODS = {
    # chapter 01 (and 02/04, which reuse its cached scores): CG influence, multi-shift over the damping grid
    "influence.cached_scores": lambda cfg, data, ref, tg, gg: influence.cached_scores(
        cfg, data, ref, dampings=[0.01, 1.0], iters=4, hessian_n=20, train_grads=tg).by_damping[0.01],
    "influence_scores (CG)": _influence_cg,
    "grad_dot": lambda cfg, data, ref, tg, gg: influence.grad_dot(tg, gg),
    "grad_cos": lambda cfg, data, ref, tg, gg: influence.grad_cos(tg, gg),
    "representation_similarity": lambda cfg, data, ref, tg, gg: influence.representation_similarity(
        ref.net, ref.state_of(0), data.x_train, data.x_targets),
    # chapter 04
    "EK-FAC": lambda cfg, data, ref, tg, gg: _ekfac(cfg, data, ref, "ekfac"),
    "K-FAC": lambda cfg, data, ref, tg, gg: _ekfac(cfg, data, ref, "kfac"),
    # chapter 06
    "last_layer_influence": lambda cfg, data, ref, tg, gg: surrogate.last_layer_influence(
        ref.net, ref.state_of(0), *_args(data), weight_decay=cfg.weight_decay, damping=0.01).scores,
    "knn_scores": lambda cfg, data, ref, tg, gg: surrogate.knn_scores(ref.net, ref.state_of(0), *_args(data),
                                                                      k=3).scores,
    "knn_shapley": lambda cfg, data, ref, tg, gg: surrogate.knn_shapley(ref.net, ref.state_of(0), *_args(data),
                                                                        k=3).scores,
    "TRAK": lambda cfg, data, ref, tg, gg: trak.trak(ref, *_args(data), proj_dim=cfg.trak_proj_dim,
                                                     progress=False).scores(),
    # chapter 03 (datamodels trained through retrain on the gpu recipe)
    "datamodels (lasso)": lambda cfg, data, ref, tg, gg: _datamodels(cfg, data, "lasso"),
    "datamodels (ridge)": lambda cfg, data, ref, tg, gg: _datamodels(cfg, data, "ridge"),
    # chapter 02's model-free baselines
    "random": lambda cfg, data, ref, tg, gg: similarity.random_scores(N_TRAIN, N_TARGETS, seed=cfg.seed),
    "class_match": lambda cfg, data, ref, tg, gg: similarity.class_match(data.y_train, data.y_targets),
    "pixel_similarity": lambda cfg, data, ref, tg, gg: similarity.pixel_similarity(*_args(data), signed=True),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_gives_finite_scores_and_an_lds(method, cfg, data, ref, gt, train_grads, target_grads):
    scores = METHODS[method](cfg, data, ref, train_grads, target_grads)
    assert scores.shape == (N_TRAIN, N_TARGETS)
    assert torch.isfinite(scores).all()
    if method != "datamodels (lasso)":  # lasso may shrink every weight of a target to 0 on 12 models
        assert scores.std() > 0, "constant scores carry no information"
    s = lds.lds(scores, gt, n_boot=100)
    assert -1 <= s.mean <= 1 and len(s.per_target) == N_TARGETS


# ---------------------------------------------------------------- batch norm: eval mode and the full state


def test_per_example_gradients_and_features_match_the_module(ref, data, train_grads, target_grads):
    """Exact references on the ordinary module (``Models.module``: parameters and buffers loaded, eval mode)."""
    module = ref.module(0)
    x, y = data.x_train[:3], data.y_train[:3]
    assert _rel(train_grads[:3], autograd_grads(module, x, y, "loss")) < 1e-5
    # the margin's gradient is a difference of two logits' gradients, so float32 round-off is amplified by the
    # cancellation and depends on the summation order (thread count): 2.5e-4 measured on 2 threads; a wrong gradient
    # (another example's, training-mode batch statistics, dropped buffers) is off by O(1)
    assert _rel(target_grads[:3], autograd_grads(module, data.x_targets[:3], data.y_targets[:3], "margin")) < 2e-3
    with torch.no_grad():
        ref_feats = module.body(data.x_train)
    assert _rel(influence.features(ref.net, ref.state_of(0), data.x_train), ref_feats) < 1e-5
    # EK-FAC's layer-matrix gradients (from layer inputs and output gradients) agree with the flat ones
    layers = ekfac.layers_of(ref.net)
    mats = ekfac.per_example_layer_grads(ref.net, ref.state_of(0), x, y, "loss", layers)
    flat = ekfac.flat_from_layer_grads(mats, ref.params_of(0), layers)
    factored = flat.abs().sum(0) > 0  # batch-norm scales and shifts are not factored (zeros there)
    assert _rel(flat[:, factored], train_grads[:3, factored]) < 1e-5


BUFFER_PATHS = {
    "per_example_grads": lambda ref, st, d: grads.per_example_grads(ref.net, st, d.x_train[:6], d.y_train[:6]),
    "hvps": lambda ref, st, d: grads.hvps(ref.net, st, d.x_train, d.y_train,
                                          torch.ones(M.num_params(ref.net), 2), 5e-4),
    "features": lambda ref, st, d: influence.features(ref.net, st, d.x_train),
    "out_to_loss (TRAK's Q)": lambda ref, st, d: trak.out_to_loss(ref.net, st, d.x_train, d.y_train),
    "influence_scores (CG)": lambda ref, st, d: influence.influence_scores(
        ref.net, st, *_args(d), weight_decay=5e-4, damping=0.1, iters=3).scores,
    "EK-FAC": lambda ref, st, d: ekfac.ekfac_scores(ref.net, st, *_args(d), damping=0.1, weight_decay=5e-4),
    "ekfac.gnh_products": lambda ref, st, d: ekfac.gnh_products(ref.net, st, d.x_train,
                                                                torch.ones(M.num_params(ref.net), 1)),
    "ekfac.per_example_layer_grads": lambda ref, st, d: torch.cat([g.flatten(1) for g in ekfac.per_example_layer_grads(
        ref.net, st, d.x_train[:6], d.y_train[:6], "margin").values()], 1),
    "ekfac.capture": lambda ref, st, d: ekfac.capture(ref.net, st, d.x_train, ekfac.layers_of(ref.net))[0].detach(),
    "last_layer_influence": lambda ref, st, d: surrogate.last_layer_influence(
        ref.net, st, *_args(d), weight_decay=5e-4, damping=0.01).scores,
    "knn_shapley": lambda ref, st, d: surrogate.knn_shapley(ref.net, st, *_args(d), k=3).scores,
}


def _state_copy(ref):
    return {k: v.clone() for k, v in ref.state_of(0).items()}


@pytest.mark.parametrize("path", list(BUFFER_PATHS))
def test_path_uses_the_trained_statistics_in_eval_mode(path, ref, data):
    """Each path through the full state gives another result than through the parameters alone (which leaves the
    skeleton's initial running statistics in place): so a path that dropped the buffers would fail here, as
    would one that ran batch norm in training mode: with the skeleton left in training mode by mistake, every path
    must still evaluate in eval mode, give the same result and leave the running statistics untouched."""
    fn = BUFFER_PATHS[path]
    right = fn(ref, _state_copy(ref), data)
    assert torch.isfinite(right).all()
    dropped = fn(ref, ref.params_of(0), data)  # the parameters alone
    assert _rel(dropped, right) > 1e-3, "the trained running statistics make no difference: dropped somewhere?"
    state = _state_copy(ref)
    ref.net.train()
    try:
        again = fn(ref, state, data)
    finally:
        ref.net.eval()
    assert torch.allclose(again, right, rtol=1e-5, atol=1e-6 * float(right.abs().max())), "not in eval mode"
    for k, v in ref.state_of(0).items():
        assert torch.equal(state[k], v), f"{k} changed: batch norm ran in training mode"


def test_trak_and_cached_influence_use_the_buffers(cfg, data, ref, tmp_path):
    """The entry points that take ``Models`` (TRAK, chapter 01's cached influence) read each model's buffers:
    the same models with their buffers dropped give other scores."""
    no_buffers = dataclasses.replace(ref, buffers={})
    assert not no_buffers.state_of(0).keys() - ref.params.keys()
    run = lambda m: trak.trak(m, *_args(data), proj_dim=cfg.trak_proj_dim, progress=False).scores()
    assert _rel(run(no_buffers), run(ref)) > 1e-3
    inf = lambda m, c: influence.cached_scores(cfg, data, m, dampings=[0.1], iters=3, hessian_n=20,
                                               cache=c).scores
    assert _rel(inf(no_buffers, tmp_path / "a"), inf(ref, tmp_path / "b")) > 1e-3
