"""Every attribution path evaluates the trained model through its full state (parameters and buffers) in eval
mode: on a batch-norm ResNet-9, margins, per-example gradients, Hessian-vector products and features of each path
equal autograd on the ordinary module ``Models.module(i)`` (issue: batch norm attributed with initial statistics)."""
import pytest
import torch

from conftest import autograd_grads
from course_lib import data as D, grads, measure, settings, train
from course_lib.attribution import influence, trak

N_CHECK = 6


@pytest.fixture(scope="module")
def resnet():
    cfg = settings.get("smoke", arch="resnet9", width=4, n_train=200, n_targets=10, epochs=4, batch_size=25,
                       lr=0.4, ensemble_size=1, device="cpu")
    data = D.for_setting(cfg)
    torch.manual_seed(0)
    models = train.train_models(cfg, data, train.full_mask(data), [0])
    module = models.module(0)
    x, y = data.x_test[:N_CHECK], data.y_test[:N_CHECK]
    return models, module, x, y


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_running_statistics_were_trained(resnet):
    models, _, _, _ = resnet
    assert models.buffers, "the ResNet-9 has batch-norm buffers"
    fresh = train.build_model(settings.get("smoke", arch="resnet9", width=4), D.for_setting(settings.get("smoke")))
    mean = next(k for k in models.buffers if k.endswith("running_mean"))
    assert not torch.allclose(models.buffers[mean][0], dict(fresh.named_buffers())[mean])


def test_margins_of_every_path_match_the_module(resnet):
    models, module, x, y = resnet
    with torch.no_grad():
        ref = measure.margin(module(x), y)
    assert _rel(models.outputs(x, y)[0], ref) < 1e-5
    q = trak.out_to_loss(models.net, models.state_of(0), x, y)
    assert _rel(q, torch.sigmoid(-ref)) < 1e-5


@pytest.mark.parametrize("fn", ["loss", "margin"])
def test_per_example_gradients_match_autograd(resnet, fn):
    models, module, x, y = resnet
    ref = autograd_grads(module, x, y, fn)
    assert _rel(grads.per_example_grads(models.net, models.state_of(0), x, y, fn), ref) < 1e-5
    # TRAK's features (identity projection: the raw gradients) go through the same state
    p = ref.shape[1]
    feats = trak.featurize(models.net, models.state_of(0), x, y, trak.RandomProjection(p, p, "identity"), fn=fn)
    assert _rel(feats, ref) < 1e-5


def test_trak_scores_use_the_trained_state(resnet):
    models, module, x, y = resnet
    res = trak.trak(models, x[:4], y[:4], x[4:], y[4:], kind="identity", progress=False)
    phi = autograd_grads(module, x, y, "margin")
    with torch.no_grad():
        q = torch.sigmoid(-measure.margin(module(x[:4]), y[:4]))
    ref = trak.kernel_solve(phi[:4], phi[4:]) * q[:, None]
    assert _rel(res.scores(), ref) < 1e-5


def test_hessian_vector_products_match_autograd(resnet):
    models, module, x, y = resnet
    wd = 5e-4
    params = list(module.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    obj = measure.loss(module(x), y).mean() + 0.5 * wd * sum((p ** 2).sum() for p in params)
    g = torch.cat([t.flatten() for t in torch.autograd.grad(obj, params, create_graph=True)])
    ref = torch.cat([t.flatten() for t in torch.autograd.grad(g @ v, params)])
    assert _rel(grads.hvp(models.net, models.state_of(0), x, y, v, wd), ref) < 1e-5
    op = influence.HessianOperator(models.net, models.state_of(0), x, y, wd)
    assert op.p == len(v)
    assert _rel(op(v[:, None])[:, 0], ref) < 1e-5


def test_representation_features_match_the_module(resnet):
    models, module, x, _ = resnet
    with torch.no_grad():
        ref = module.body(x)
    assert _rel(influence.features(models.net, models.state_of(0), x), ref) < 1e-5
