"""Surrogate models (chapter 06, the course text's approach III before TRAK): attribute a simple proxy of the network.

For a few simple model classes predictive data attribution is easy. The surrogate approach replaces the trained
network by such a proxy built on its penultimate-layer representation phi(x) (``influence.features``, the input of
``net.head``), holds phi fixed, and attributes the proxy:

1. ``last_layer_influence``: the linear proxy. The last layer (``net.head``: weight W (C, d) and bias b) is a
   multinomial logistic regression on the fixed features, so its influence function is EXACT and cheap: the
   Hessian of the last-layer objective has a closed form (``last_layer_hessian``) and only C (d + 1) parameters.
   This is "influence functions on the last layer" (Koh & Liang 2017, Sec. 5.1, on Inception features).
2. ``knn_scores`` / ``knn_shapley``: the kNN proxy (Jia, Dao, Wang et al. 2019, "Efficient task-specific data
   valuation for nearest neighbor algorithms", the course's [JDW+19]): the target's prediction is the vote of its
   k nearest training examples in feature space.

Scores follow the course convention: ``scores[i, t]`` (n_train, n_targets) estimates the effect of INCLUDING
training example i on target t's output; positive = including i raises it. Both proxies ignore how removing
examples would change the features themselves (the body of the network is not retrained): that is what makes them
cheap, and why they can miss effects that flow through the representation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import grads, measure
from . import influence

METRICS = ("cosine", "euclidean")


@dataclass
class Surrogate:
    """Scores of a surrogate model and what they cost.

    scores: (n_train, T), course convention (for ``last_layer_influence``: the first damping); by_damping:
    {damping: scores} for every damping solved (``last_layer_influence`` only); seconds: wall time of the whole
    call (features, gradients, Hessian, solves / neighbour search), on the device the tensors live on."""
    scores: torch.Tensor
    seconds: float = 0.0
    by_damping: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- validation


def _check_labels(y, n: int, what: str, num_classes: int | None = None):
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D tensor of integer class labels, got "
                         f"{type(y).__name__} {getattr(y, 'dtype', '')} of shape {tuple(getattr(y, 'shape', ()))}")
    if len(y) != n:
        raise ValueError(f"{what} has {len(y)} labels for {n} examples: inputs and labels must have the same length")
    if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what} holds labels in [{int(y.min())}, {int(y.max())}]; valid labels are 0 .. "
                         f"{num_classes - 1} (the head has {num_classes} outputs)")


def _check_pairs(x_train, y_train, x_targets, y_targets, num_classes=None):
    if len(x_train) < 1:
        raise ValueError("the training set is empty: need at least one training example")
    _check_labels(y_train, len(x_train), "y_train", num_classes)
    _check_labels(y_targets, len(x_targets), "y_targets", num_classes)


def _head(net) -> nn.Linear:
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the network's last layer must be an nn.Linear called 'head' (the models of "
                         f"course_lib.models), got {type(head).__name__}")
    return head


def _head_params(net, state: dict):
    """(W (C, d), b (C,) or None) of ``net.head`` from the full state."""
    _head(net)
    if "head.weight" not in state:
        raise ValueError(f"the state has no 'head.weight' (keys: {list(state)[:6]}...): pass the model's full state")
    return state["head.weight"].detach(), (state["head.bias"].detach() if "head.bias" in state else None)


def _check_nonneg(value, what: str):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------------- 1. last-layer influence


def _augment(phi: torch.Tensor, bias: bool) -> torch.Tensor:
    if not bias:
        return phi
    return torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype, device=phi.device)], 1)


def _to_param_order(M: torch.Tensor, C: int, d: int, bias: bool) -> torch.Tensor:
    """Columns of M (..., C * d1) laid out [class, feature(+1)] -> the order of ``grads.flatten`` of the head's
    parameters: weight rows (C x d, row-major), then the bias (C)."""
    if not bias:
        return M
    M = M.reshape(*M.shape[:-1], C, d + 1)
    return torch.cat([M[..., :d].reshape(*M.shape[:-2], C * d), M[..., d]], -1)


def last_layer_grads(phi: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                     fn: str = "loss") -> torch.Tensor:
    """Per-example gradients (n, p) of ``fn`` ('loss' = cross-entropy, 'margin' = log-odds of class y) with respect
    to the head's parameters, p = C d (+ C with a bias), in the order of ``grads.flatten`` (weight rows, then bias).

    With logits z = W phi + b the gradient is r (x) phi~, phi~ = (phi, 1): r = softmax(z) - e_y for the loss, and
    r = e_y - softmax_{c != y}(z) (zero at y) for the margin z_y - logsumexp_{c != y} z_c. Closed form: one outer
    product per example, no autodiff. phi (n, d), W (C, d), b (C,) or None, y (n,) integer labels."""
    if fn not in measure.MEASURES:
        raise ValueError(f"unknown measurement {fn!r}; valid: {', '.join(measure.MEASURES)}")
    z = phi @ W.T + (0 if b is None else b)
    onehot = (torch.arange(W.shape[0], device=y.device) == y[:, None]).to(z.dtype)
    if fn == "loss":
        r = torch.softmax(z, 1) - onehot
    else:
        r = onehot - torch.softmax(z.masked_fill(onehot.bool(), float("-inf")), 1)
    xa = _augment(phi, b is not None)
    G = (r[:, :, None] * xa[:, None, :]).reshape(len(phi), -1)
    return _to_param_order(G, W.shape[0], W.shape[1], b is not None)


def last_layer_hessian(phi: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                       weight_decay: float = 0.0, chunk_bytes: int = 2 ** 27) -> torch.Tensor:
    """The exact (p, p) Hessian of the last-layer objective (1/n) sum_i loss_i + (wd/2) ||(W, b)||^2 at (W, b), with
    the features phi (n, d) held fixed, in the order of ``last_layer_grads``.

    Closed form (as ``influence.logreg_hessian``): with p_i = softmax(W phi_i + b) and A_i = diag(p_i) - p_i p_i^T,
    the (class c, class e) block is (1/n) sum_i A_i[c, e] phi~_i phi~_i^T. Cost O(n C^2 (d + 1)^2), in chunks of
    examples of about ``chunk_bytes``. Positive semi-definite; without weight decay it is singular (adding the
    same vector to every class's row does not change the softmax), so wd + damping must be > 0 to invert it."""
    C, d = W.shape
    bias = b is not None
    xa = _augment(phi, bias)
    d1 = xa.shape[1]
    H = torch.zeros(C * C, d1 * d1, dtype=phi.dtype, device=phi.device)
    rows = max(1, chunk_bytes // (8 * d1 * (d1 + C * C)))
    for s in range(0, len(phi), rows):
        x = xa[s:s + rows]
        prob = torch.softmax(x[:, :d] @ W.T + (b if bias else 0), 1)
        A = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]  # (m, C, C)
        H += A.reshape(len(x), C * C).T @ (x[:, :, None] * x[:, None, :]).reshape(len(x), d1 * d1)
    H = (H / len(phi)).reshape(C, C, d1, d1).permute(0, 2, 1, 3).reshape(C * d1, C * d1)
    H = _to_param_order(_to_param_order(H, C, d, bias).T, C, d, bias).T
    return H + weight_decay * torch.eye(len(H), dtype=H.dtype, device=H.device)


def last_layer_from_features(phi_train, y_train, phi_targets, y_targets, W, b, *, weight_decay: float,
                             damping=0.0, target_fn: str = "margin") -> dict:
    """{damping: scores (n_train, T)} of the last-layer influence on given features (``last_layer_influence``
    without the forward pass; everything in float64, scores returned in phi_train's dtype)."""
    _check_nonneg(weight_decay, "weight_decay")
    dampings = list(damping) if isinstance(damping, (list, tuple)) else [damping]
    if not dampings:
        raise ValueError("damping: give a number >= 0 or a non-empty list of them")
    for dmp in dampings:
        _check_nonneg(dmp, "damping")
    out_dtype = phi_train.dtype
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)
    phi_train, phi_targets, W, b = f64(phi_train), f64(phi_targets), f64(W), f64(b)
    grads.check_finite(phi_train, "penultimate features of the training examples")
    grads.check_finite(phi_targets, "penultimate features of the targets")
    grads.check_finite(W, "head weight")
    if b is not None:
        grads.check_finite(b, "head bias")
    G = last_layer_grads(phi_train, W, b, y_train, "loss")  # (n, p)
    V = last_layer_grads(phi_targets, W, b, y_targets, target_fn).T.contiguous()  # (p, T)
    H = last_layer_hessian(phi_train, W, b, weight_decay)
    out = {}
    for dmp in dampings:
        X = influence.solve_exact(H, V, float(dmp))  # raises ValueError, naming a usable damping, if singular
        out[dmp] = influence.influence_from_solution(G, X, len(phi_train)).to(out_dtype)
    return out


def last_layer_influence(net, state: dict, x_train, y_train, x_targets, y_targets, *, weight_decay: float,
                         damping=0.0, target_fn: str = "margin", batch_size: int = 1000) -> Surrogate:
    """Influence functions on the last layer only: the exact influence of a linear (logistic-regression) proxy.

    The network's penultimate features phi(x) (``influence.features``, eval mode, the full ``state``) are held
    fixed; the head (W, b) is a multinomial logistic regression on them, trained on the objective
        R(W, b) = (1/n) sum_i loss_i + (weight_decay / 2) ||(W, b)||^2,
    the last-layer part of the network's own training objective (``grads.objective``). With H its exact Hessian
    (``last_layer_hessian``, closed form) and all gradients taken with respect to (W, b) only,

        scores[i, t] = -(1/n) grad f_t^T (H + damping I)^{-1} grad loss_i,        (n_train, T),

    Koh & Liang's (2017, Eq. 2 and Sec. 5.1) influence in the course sign: the first-order change of target t's
    ``target_fn`` ("margin": log-odds of its label, the default; "loss": cross-entropy, in nats) when example i's
    weight in R goes from 0 to 1 (``d f_t / d w_i`` at w = 1), i.e. positive = including i raises the margin.
    It is exact for the proxy when the head minimises R (a trained head is close to it); it ignores every effect
    of example i on the features.

    damping: a number >= 0, or a list of them (each solved against the same Hessian; ``by_damping``), added to H
    (which already holds weight_decay). Cost: one forward pass over train and targets, O(n C^2 (d+1)^2) for H and an
    O(p^3) eigendecomposition per damping with p = C (d + 1) (330 for the course CNN), O(n T p) for the scores.
    Returns a ``Surrogate`` (scores for the first damping, by_damping, seconds).

    Raises ValueError for a head that is not ``nn.Linear`` named ``net.head``, labels that are not 1-D integers in
    [0, C) or do not match the inputs, a negative or non-finite weight_decay/damping, an unknown target_fn, or an
    H + damping I too close to singular (weight_decay = damping = 0: H is always singular; the message names the
    smallest usable damping); FloatingPointError for non-finite features, parameters or scores.
    """
    t0 = time.perf_counter()
    W, b = _head_params(net, state)
    _check_nonneg(weight_decay, "weight_decay")
    for dmp in (damping if isinstance(damping, (list, tuple)) else [damping]):
        _check_nonneg(dmp, "damping")
    if target_fn not in measure.MEASURES:
        raise ValueError(f"unknown target_fn {target_fn!r}; valid: {', '.join(measure.MEASURES)}")
    _check_pairs(x_train, y_train, x_targets, y_targets, W.shape[0])
    phi_train = influence.features(net, state, x_train, batch_size)
    phi_targets = influence.features(net, state, x_targets, batch_size)
    by = last_layer_from_features(phi_train, y_train, phi_targets, y_targets, W, b, weight_decay=weight_decay,
                                  damping=damping, target_fn=target_fn)
    first = next(iter(by.values()))
    return Surrogate(first, time.perf_counter() - t0, by)


# --------------------------------------------------------------------------------------------- 2. kNN surrogate


def _check_k(k, n_train: int):
    if not (isinstance(k, int) and not isinstance(k, bool)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n_train:
        raise ValueError(f"k={k} exceeds the number of training examples n_train={n_train}; valid: 1 <= k <= "
                         f"{n_train}")


def neighbour_order(f_train: torch.Tensor, f_targets: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """(n_train, T) indices of the training examples, nearest first, for every target (column).

    metric: "cosine" (distance 1 - cosine similarity; a zero feature vector has similarity 0 to everything) or
    "euclidean". Ties are broken by the lower training index (a stable sort), so the order is deterministic."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    a, c = f_train.detach().to(torch.float64), f_targets.detach().to(torch.float64)
    grads.check_finite(a, "training features")
    grads.check_finite(c, "target features")
    if metric == "cosine":
        dist = 1 - torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(c, dim=1).T
    else:
        dist = torch.cdist(a, c)
    return torch.sort(dist, dim=0, stable=True).indices


def _check_features(f_train, y_train, f_targets, y_targets):
    for f, what in ((f_train, "f_train"), (f_targets, "f_targets")):
        if not isinstance(f, torch.Tensor) or f.ndim != 2:
            raise ValueError(f"{what} must be a 2-D (n, d) feature matrix, got shape {tuple(getattr(f, 'shape', ()))}")
    if f_train.shape[1] != f_targets.shape[1]:
        raise ValueError(f"training features have {f_train.shape[1]} dimensions, target features "
                         f"{f_targets.shape[1]}: they must come from the same representation")
    _check_pairs(f_train, y_train, f_targets, y_targets)


def knn_from_features(f_train, y_train, f_targets, y_targets, *, k: int = 10, metric: str = "cosine"):
    """The kNN vote scores of ``knn_scores`` on given features f_train (n_train, d), f_targets (T, d); float64."""
    _check_features(f_train, y_train, f_targets, y_targets)
    _check_k(k, len(f_train))
    nearest = neighbour_order(f_train, f_targets, metric)[:k]  # (k, T)
    same = y_train[nearest] == y_targets[None, :]
    scores = torch.zeros(len(f_train), len(f_targets), dtype=torch.float64)
    scores.scatter_(0, nearest, torch.where(same, 1.0, -1.0).double() / k)
    return scores


def knn_shapley_from_features(f_train, y_train, f_targets, y_targets, *, k: int = 10, metric: str = "cosine"):
    """The exact kNN-Shapley values of ``knn_shapley`` on given features; (n_train, T), float64."""
    _check_features(f_train, y_train, f_targets, y_targets)
    _check_k(k, len(f_train))
    N = len(f_train)
    order = neighbour_order(f_train, f_targets, metric)  # (N, T), alpha_1 first
    match = (y_train[order] == y_targets[None, :]).double()  # 1[y_{alpha_j} = y_t]
    j = torch.arange(1, N, dtype=torch.float64)[:, None]  # ranks 1 .. N-1
    step = (match[:-1] - match[1:]) / k * torch.clamp(j, max=k) / j  # s_{alpha_j} - s_{alpha_{j+1}}
    ranked = match[-1:] / N + torch.cat([step.flip(0).cumsum(0).flip(0), torch.zeros_like(match[-1:])])
    scores = torch.empty_like(ranked)
    scores.scatter_(0, order, ranked)
    return scores


def _knn_features(net, state, x_train, y_train, x_targets, y_targets, k, batch_size):
    """The checked inputs of the kNN surrogates: (penultimate features of the training set, of the targets)."""
    _head(net)
    _check_pairs(x_train, y_train, x_targets, y_targets)
    _check_k(k, len(x_train))
    return (influence.features(net, state, x_train, batch_size),
            influence.features(net, state, x_targets, batch_size))


def knn_scores(net, state: dict, x_train, y_train, x_targets, y_targets, *, k: int = 10, metric: str = "cosine",
               batch_size: int = 1000) -> Surrogate:
    """The kNN surrogate's attribution: each target is predicted by the vote of its k nearest training examples
    in the network's penultimate-feature space, and each neighbour's vote is its score.

        scores[i, t] = +1/k  if i is one of t's k nearest neighbours and y_i = y_t,
                       -1/k  if i is one of them and y_i != y_t,
                        0    otherwise;                                     (n_train, T), float64.

    Sign (course convention): the kNN proxy's output for t is its vote margin
    (#neighbours with t's label - #neighbours with another label) / k, and the scores decompose it additively
    (they sum to it over the training set): including a same-label neighbour adds +1/k to it, a neighbour with
    another label -1/k; an example outside the k nearest casts no vote. This is the first-order reading of the
    kNN classifier view of Jia, Dao, Wang et al. (2019); their exact Shapley values are ``knn_shapley``.

    metric: "cosine" by default, because the head is linear in the features and the direction of phi decides the
    logits' ranking more than its length (which mostly scales the confidence), and because it keeps the surrogate
    comparable with ``influence.representation_similarity`` (cosine of the same features): kNN then differs from it
    only by the neighbour cut-off and the label sign. "euclidean" (Jia et al.'s choice) is available. Ties in
    distance go to the lower training index. Cost: one forward pass and an (n_train, T) distance sort.

    Raises ValueError if k is not an integer in [1, n_train] (k larger than the training set), the metric is unknown,
    or labels are not 1-D integer tensors matching the inputs; FloatingPointError for non-finite features.
    """
    t0 = time.perf_counter()
    f_train, f_targets = _knn_features(net, state, x_train, y_train, x_targets, y_targets, k, batch_size)
    scores = knn_from_features(f_train, y_train, f_targets, y_targets, k=k, metric=metric)
    return Surrogate(scores, time.perf_counter() - t0)


def knn_shapley(net, state: dict, x_train, y_train, x_targets, y_targets, *, k: int = 10, metric: str = "cosine",
                batch_size: int = 1000) -> Surrogate:
    """Exact Shapley values of the kNN classifier's utility (Jia, Dao, Wang et al. 2019, "Efficient task-specific
    data valuation for nearest neighbor algorithms", PVLDB 12(11), Theorem 1), per target, (n_train, T), float64.

    The utility of a training subset S for target t is the kNN likelihood of t's label,
        U_t(S) = (1/k) sum_{j=1}^{min(k, |S|)} 1[y_{alpha_j(S)} = y_t]        (alpha_j(S): j-th nearest in S),
    and scores[i, t] is example i's Shapley value for U_t: its marginal contribution U_t(S + i) - U_t(S) averaged over
    all orders of adding the training set. With alpha_1 .. alpha_N the whole training set sorted nearest first,
    the closed form is the recursion, O(N log N) per target instead of 2^N utilities:
        s_{alpha_N} = 1[y_{alpha_N} = y_t] / N,
        s_{alpha_j} = s_{alpha_{j+1}} + (1[y_{alpha_j} = y_t] - 1[y_{alpha_{j+1}} = y_t]) / k * min(k, j) / j.
    Positive = including i raises the likelihood of the target's label (course convention); the values sum to
    U_t(whole training set). The vote-margin utility 2 U_t(S) - min(k, |S|)/k of ``knn_scores`` has Shapley values
    2 s - min(k, N)/(k N): the same ranking, and the same LDS, since every LDS subset has the same size.
    metric and errors: as ``knn_scores``."""
    t0 = time.perf_counter()
    f_train, f_targets = _knn_features(net, state, x_train, y_train, x_targets, y_targets, k, batch_size)
    scores = knn_shapley_from_features(f_train, y_train, f_targets, y_targets, k=k, metric=metric)
    return Surrogate(scores, time.perf_counter() - t0)
