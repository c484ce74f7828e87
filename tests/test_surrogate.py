"""Chapter 06's surrogate models: last-layer influence against retraining the last layer, and the kNN proxy."""
import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from course_lib import grads, measure, models
from course_lib.attribution import influence as inf
from course_lib.attribution import surrogate as sur

HEAD = ["head.weight", "head.bias"]


class Points(nn.Module):
    """A 'network' whose penultimate features are its 2-D inputs: hand-checkable neighbours."""

    def __init__(self, classes=3, dim=2, bias=True):
        super().__init__()
        self.body = nn.Flatten()
        self.head = nn.Linear(dim, classes, bias=bias)

    def forward(self, x):
        return self.head(self.body(x))


class Tanh(nn.Module):
    """A one-hidden-layer net (smooth features) with an optional bias-free head, like ResNet-9's."""

    def __init__(self, d_in, classes, hidden=5, bias=True):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        return self.head(self.body(x))


def _cnn_problem(n=30, n_targets=4, classes=3, seed=0, hidden=6):
    g = torch.Generator().manual_seed(seed)
    x = 5 * torch.randn(n + n_targets, 1, 6, 6, generator=g, dtype=torch.float64)  # scaled: no dead features
    y = torch.randint(0, classes, (n + n_targets,), generator=g)
    torch.manual_seed(seed)
    net = models.SmallCNN((1, 6, 6), classes, width=3, hidden=hidden).double()
    state = {k: v.detach() for k, v in net.named_parameters()}
    return net, state, x[:n], y[:n], x[n:], y[n:]


def _head_model(state, d, classes):
    """The last layer as a LogisticRegression on the fixed features (an independent model for the references)."""
    lr = models.LogisticRegression((d,), classes).double()
    return lr, {"linear.weight": state["head.weight"], "linear.bias": state["head.bias"]}


def _with_head(state, theta):
    return {**state, "head.weight": theta["linear.weight"], "head.bias": theta["linear.bias"]}


# ------------------------------------------------------------------------------------------ last-layer influence


@pytest.mark.parametrize("fn", ["loss", "margin"])
def test_closed_form_gradients_and_hessian_match_autodiff(fn):
    net, state, x, y, _, _ = _cnn_problem()
    phi = inf.features(net, state, x)
    G = sur.last_layer_grads(phi, state["head.weight"], state["head.bias"], y, fn)
    ref = grads.per_example_grads(net, state, x, y, fn, names=HEAD)  # autodiff through the whole network
    assert G.shape == ref.shape == (30, 3 * 6 + 3)
    assert torch.allclose(G, ref, atol=1e-12) and G.abs().max() > 1e-3
    lr, head = _head_model(state, phi.shape[1], 3)
    H = sur.last_layer_hessian(phi, state["head.weight"], state["head.bias"], weight_decay=0.1, chunk_bytes=2000)
    assert torch.allclose(H, grads.hessian(lr, head, phi, y, weight_decay=0.1), atol=1e-12)  # reverse-over-reverse
    assert torch.allclose(H, inf.logreg_hessian(lr, head, phi, y, 0.1), atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_influence_equals_an_explicit_inverse(bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 1, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=g)
    torch.manual_seed(2)
    net = Tanh(6, 4, bias=bias).double()
    state = {k: v.detach() for k, v in net.named_parameters()}
    names = HEAD if bias else HEAD[:1]
    wd = 0.05
    res = sur.last_layer_influence(net, state, x[:32], y[:32], x[32:], y[32:], weight_decay=wd, damping=[0.0, 0.3])
    phi = inf.features(net, state, x[:32]).requires_grad_(False)
    G = grads.per_example_grads(net, state, x[:32], y[:32], "loss", names=names)
    V = grads.per_example_grads(net, state, x[32:], y[32:], "margin", names=names)

    def head_objective(flat):  # the last-layer objective, differentiated by autodiff
        W = flat[:4 * 5].view(4, 5)
        b = flat[4 * 5:] if bias else 0
        return measure.loss(phi @ W.T + b, y[:32]).mean() + 0.5 * wd * (flat ** 2).sum()

    H = torch.func.hessian(head_objective)(grads.flatten({k: state[k] for k in names}))
    for damping in (0.0, 0.3):
        ref = -G @ torch.linalg.inv(H + damping * torch.eye(len(H), dtype=H.dtype)) @ V.T / 32
        assert res.by_damping[damping].shape == (32, 8)
        assert torch.allclose(res.by_damping[damping], ref, rtol=1e-9, atol=1e-13)
    assert res.scores is res.by_damping[0.0] and res.seconds > 0
    assert not torch.allclose(res.by_damping[0.3], res.by_damping[0.0], rtol=1e-3)  # the damping is applied
    inf.check_informative(res.scores)


WD = 0.1


@pytest.fixture(scope="module")
def retrained():
    """A trained head over fixed CNN features, and the derivative of the target margins with respect to each of a
    few training examples' weights, by central differences of full last-layer retraining to convergence."""
    net, state, x, y, xt, yt = _cnn_problem()
    phi = inf.features(net, state, x)
    lr, head = _head_model(state, phi.shape[1], 3)
    theta = inf.fit_convex(lr, head, phi, y, WD)
    # L-BFGS stalls near 1e-8 in the gradient; Newton steps (autodiff gradients, a fixed Hessian as the
    # preconditioner) take every fit to 1e-12, so the central differences below carry ~1e-9 optimisation error
    L = torch.linalg.cholesky(inf.logreg_hessian(lr, theta, phi, y, WD))
    fit = lambda w=None: inf.fit_newton(lr, theta, phi, y, WD, L, weights=w, tol=1e-12)
    theta = fit()
    trained = _with_head(state, theta)
    margins = lambda th: measure.margin(functional_call(net, _with_head(state, th), (xt,)), yt)
    eps, rows = 1e-3, [0, 3, 11, 17, 29]
    fd = []
    for j in rows:
        w = torch.ones(len(y), dtype=torch.float64)
        w[j] = 1 + eps
        plus = fit(w.clone())
        w[j] = 1 - eps
        minus = fit(w)
        fd.append((margins(plus) - margins(minus)) / (2 * eps))
    return net, trained, x, y, xt, yt, rows, torch.stack(fd)


def _rel_err(scores, rows, fd):
    return float((scores[rows] - fd).abs().max() / fd.abs().max())


def test_last_layer_influence_equals_retraining_the_last_layer(retrained):
    """tau[j, t] = d margin_t / d w_j: the exact derivative of retraining the head with example j's weight moved."""
    net, state, x, y, xt, yt, rows, fd = retrained
    res = sur.last_layer_influence(net, state, x, y, xt, yt, weight_decay=WD)
    assert res.scores.shape == (30, 4) and res.scores.dtype == torch.float64
    assert fd.abs().max() > 1e-3  # a real effect, not two zeros agreeing
    assert _rel_err(res.scores, rows, fd) < 1e-6  # measured ~1e-9
    inf.check_informative(res.scores)
    # the same Hessian split differently between weight decay and damping gives the same scores
    split = sur.last_layer_influence(net, state, x, y, xt, yt, weight_decay=WD / 2, damping=WD / 2).scores
    assert torch.allclose(split, res.scores, rtol=1e-10, atol=1e-14)


def test_broken_inputs_miss_the_retraining_reference(retrained):
    net, state, x, y, xt, yt, rows, fd = retrained
    good = sur.last_layer_influence(net, state, x, y, xt, yt, weight_decay=WD).scores
    assert _rel_err(-good, rows, fd) > 1  # a flipped sign
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    shuffled_labels = sur.last_layer_influence(net, state, x, y[perm], xt, yt, weight_decay=WD).scores
    assert _rel_err(shuffled_labels, rows, fd) > 0.05
    shuffled_rows = sur.last_layer_influence(net, state, x[perm], y, xt, yt, weight_decay=WD).scores
    assert _rel_err(shuffled_rows, rows, fd) > 0.05
    wrong_wd = sur.last_layer_influence(net, state, x, y, xt, yt, weight_decay=WD / 10).scores
    assert _rel_err(wrong_wd, rows, fd) > 0.05  # the reference sees the Hessian, not only the gradients
    loss = sur.last_layer_influence(net, state, x, y, xt, yt, weight_decay=WD, target_fn="loss").scores
    assert _rel_err(loss, rows, fd) > 0.05  # the loss is not the margin
    untrained = _cnn_problem()[1]  # the head before training: not the minimiser the derivative refers to
    assert _rel_err(sur.last_layer_influence(net, untrained, x, y, xt, yt, weight_decay=WD).scores, rows, fd) > 0.05


def test_last_layer_influence_rejects_bad_input():
    net, state, x, y, xt, yt = _cnn_problem(n=12)
    call = lambda **kw: sur.last_layer_influence(net, state, *[kw.pop(k, v) for k, v in
                                                               zip(("x", "y", "xt", "yt"), (x, y, xt, yt))],
                                                 **{"weight_decay": 0.1, **kw})
    with pytest.raises(ValueError, match="smallest usable damping"):
        call(weight_decay=0.0)  # softmax is invariant to shifting every class: H alone is singular
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        call(damping=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        call(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="unknown target_fn"):
        call(target_fn="accuracy")
    with pytest.raises(ValueError, match="valid labels are 0 .. 2"):
        call(y=y + 3)
    with pytest.raises(ValueError, match="integer class labels"):
        call(yt=yt.double())
    with pytest.raises(ValueError, match="same length"):
        call(y=y[:-1])
    with pytest.raises(ValueError, match="training set is empty"):
        call(x=x[:0], y=y[:0])
    with pytest.raises(ValueError, match="nn.Linear called 'head'"):
        sur.last_layer_influence(models.LogisticRegression((1, 6, 6), 3).double(), state, x, y, xt, yt,
                                 weight_decay=0.1)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="features"):
        call(x=bad)


# ------------------------------------------------------------------------------------------------------- kNN

# seven training points in 2-D (the features of ``Points``) and two targets, nearest neighbours by hand:
TRAIN = torch.tensor([[1, 0], [2, .1], [0, 1], [.1, 2], [-1, 0], [1, .3], [6, .6]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1, 1, 2, 1, 2])
TARGETS = torch.tensor([[1.2, 0], [.3, 3]], dtype=torch.float64)
TARGET_LABELS = torch.tensor([0, 1])


@pytest.mark.parametrize("metric, expected", [
    # target 0 (label 0): euclidean 3-NN are #0 (0.20, label 0), #5 (0.36, label 1), #1 (0.81, label 0);
    #                     cosine 3-NN are #0 (cos 1), #1 (0.999), #6 (0.995, label 2): the far look-alike in direction
    # target 1 (label 1): both metrics pick #3, #2, #5, all label 1
    ("euclidean", [[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [-1, 1], [0, 0]]),
    ("cosine", [[1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 1], [-1, 0]]),
])
def test_knn_scores_by_hand(metric, expected):
    torch.manual_seed(0)
    net = Points().double()
    state = {k: v.detach() for k, v in net.named_parameters()}
    res = sur.knn_scores(net, state, TRAIN, LABELS, TARGETS, TARGET_LABELS, k=3, metric=metric)
    assert res.scores.shape == (7, 2) and res.seconds > 0
    assert torch.equal(res.scores, torch.tensor(expected, dtype=torch.float64) / 3)
    # the scores decompose the kNN vote margin (#same - #other) / k
    assert torch.allclose(res.scores.sum(0), torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    # a broken input: shuffled training rows (labels kept) move the votes
    perm = torch.tensor([6, 5, 4, 3, 2, 1, 0])
    assert not torch.equal(sur.knn_scores(net, state, TRAIN[perm], LABELS, TARGETS, TARGET_LABELS, k=3,
                                          metric=metric).scores, res.scores)


def test_knn_scores_on_a_cnn_follow_the_sign_convention():
    net, state, x, y, xt, yt = _cnn_problem(n=40, n_targets=5, hidden=16)
    other = (yt[1] + 1) % 3
    x_train = torch.cat([x, xt[:1], xt[1:2]])  # a same-label copy of target 0, an other-label copy of target 1
    y_train = torch.cat([y, yt[:1], other[None]])
    assert (inf.features(net, state, xt[:2]).norm(dim=1) > 0).all()  # cosine is defined for the copies
    for metric in sur.METRICS:
        s = sur.knn_scores(net, state, x_train, y_train, xt, yt, k=5, metric=metric).scores
        assert s.shape == (42, 5)
        assert ((s != 0).sum(0) == 5).all() and set(s.unique().tolist()) <= {-0.2, 0.0, 0.2}
        assert s[40, 0] == 0.2 and s[41, 1] == -0.2  # look-alikes: same label helps, another label hurts
        feats = sur.knn_from_features(inf.features(net, state, x_train), y_train, inf.features(net, state, xt), yt,
                                      k=5, metric=metric)
        assert torch.equal(s, feats)
        shap = sur.knn_shapley(net, state, x_train, y_train, xt, yt, k=5, metric=metric).scores
        # the same-label copy has the largest Shapley value, the other-label copy the smallest (ties allowed)
        assert shap[40, 0] > 0 and shap[40, 0] >= shap[:, 0].max() - 1e-12
        assert shap[41, 1] < 0 and shap[41, 1] <= shap[:, 1].min() + 1e-12


def _utility(dist_col, labels, label, S, k):
    """U(S) = (1/k) #{the min(k, |S|) nearest members of S with the target's label}."""
    near = sorted(S, key=lambda i: float(dist_col[i]))[:k]
    return sum(int(labels[i] == label) for i in near) / k


@pytest.mark.parametrize("metric", sur.METRICS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_shapley_equals_brute_force_shapley(metric, k):
    g = torch.Generator().manual_seed(5)
    f = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    ft = torch.randn(4, 3, generator=g, dtype=torch.float64)
    yt = torch.tensor([0, 1, 2, 0])
    if metric == "cosine":
        dist = 1 - torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(ft, dim=1).T
    else:
        dist = torch.cdist(f, ft)
    N = len(f)
    brute = torch.zeros(N, len(ft), dtype=torch.float64)
    for t in range(len(ft)):
        for i in range(N):
            rest = [j for j in range(N) if j != i]
            for size in range(N):
                weight = math.factorial(size) * math.factorial(N - size - 1) / math.factorial(N)
                for S in itertools.combinations(rest, size):
                    gain = _utility(dist[:, t], y, yt[t], list(S) + [i], k) - _utility(dist[:, t], y, yt[t], S, k)
                    brute[i, t] += weight * gain
    shap = sur.knn_shapley_from_features(f, y, ft, yt, k=k, metric=metric)
    assert torch.allclose(shap, brute, atol=1e-12)
    full = torch.tensor([_utility(dist[:, t], y, yt[t], range(N), k) for t in range(len(ft))], dtype=torch.float64)
    assert torch.allclose(shap.sum(0), full)  # efficiency: the values share out U(whole training set)
    assert brute.abs().max() > 0.05
    assert not torch.allclose(sur.knn_shapley_from_features(f, y.flip(0), ft, yt, k=k, metric=metric), brute)


def test_knn_rejects_bad_input():
    net = Points().double()
    state = {k: v.detach() for k, v in net.named_parameters()}
    args = (TRAIN, LABELS, TARGETS, TARGET_LABELS)
    for fn in (sur.knn_scores, sur.knn_shapley):
        with pytest.raises(ValueError, match=r"k=8 exceeds the number of training examples n_train=7"):
            fn(net, state, *args, k=8)
        for k in (0, 2.5, True):
            with pytest.raises(ValueError, match="k must be an integer >= 1"):
                fn(net, state, *args, k=k)
        with pytest.raises(ValueError, match="unknown metric 'manhattan'; valid: cosine, euclidean"):
            fn(net, state, *args, k=2, metric="manhattan")
        with pytest.raises(ValueError, match="same length"):
            fn(net, state, TRAIN, LABELS[:-1], TARGETS, TARGET_LABELS, k=2)
        with pytest.raises(ValueError, match="integer class labels"):
            fn(net, state, TRAIN, LABELS.double(), TARGETS, TARGET_LABELS, k=2)
    with pytest.raises(ValueError, match="2-D"):
        sur.knn_from_features(TRAIN[:, :, None], LABELS, TARGETS, TARGET_LABELS, k=2)
    with pytest.raises(ValueError, match="same representation"):
        sur.knn_from_features(TRAIN, LABELS, TARGETS[:, :1], TARGET_LABELS, k=2)
    bad = TRAIN.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="training features"):
        sur.knn_scores(net, state, bad, LABELS, TARGETS, TARGET_LABELS, k=2)
