"""Better influence-function approximations (chapter 04): the Gauss-Newton Hessian, K-FAC and EK-FAC.

Curvatures. For the training objective R(theta) = (1/n) sum_i loss(z_i(theta), y_i) (+ wd/2 ||theta||^2) with logits
z_i, the Hessian is (1/n) sum_i [J_i^T H_out,i J_i + sum_c (dloss/dz_ic) grad^2 z_ic] with J_i = dz_i/dtheta and
H_out,i = diag(p_i) - p_i p_i^T the Hessian of the softmax cross-entropy in the logits. Dropping the second term
(second derivatives of the network) leaves the Gauss-Newton Hessian (GNH)

    G = (1/n) sum_i J_i^T H_out,i J_i,                                               positive semi-definite.

For the softmax cross-entropy, H_out = E_{y ~ p}[(p - e_y)(p - e_y)^T] and dloss(y)/dz = p - e_y, so
G = (1/n) sum_i E_{y ~ p_i}[g_i(y) g_i(y)^T] with g_i(y) the loss gradient under label y: the GNH *is* the true
Fisher (``gnh`` and ``fisher_exact`` compute the two sides independently; the tests check they agree).

K-FAC (Martens & Grosse 2015). Keep only the diagonal blocks of G, one per layer (``nn.Linear``, ``nn.Conv2d``). For a
linear layer s = W a (a with a trailing 1 for the bias) the per-example gradient is g a^T with g = dloss/ds, so
the block is E[(g g^T) kron (a a^T)] (row-major vec of the (d_out, d_in) gradient matrix); K-FAC assumes
activations and pseudo-gradients independent and uses S kron A with A = E[a a^T], S = E[g g^T]. Labels for g are
drawn from the model's predictive distribution (true Fisher, seeded) by default; 'empirical' uses the training
labels, 'exact' weights every class by its probability (no sampling; for tests and small models).

Convolutions (KFC, Grosse & Martens 2016). A conv layer is a linear layer applied to every unfolded input patch
a_t at every output position t, and its gradient is sum_t g_t a_t^T. KFC assumes (1) spatial homogeneity: the
statistics of a_t and g_t do not depend on t; (2) spatially uncorrelated derivatives: g_t and g_t' are
uncorrelated for t != t'; (3) independence of activations and derivatives. Then the block is
E[sum_t a_t a_t^T] kron (1/T) E[sum_t g_t g_t^T]: we use A = (1/n) sum_i sum_t a a^T and S = (1/(nT)) sum_i sum_t
g g^T. Where they are wrong: zero padding makes border positions differ from the centre (1), neighbouring
positions share input pixels so their derivatives are correlated (2), and ReLU gates tie g to a (3).

EK-FAC (George et al. 2018). With A = Q_A diag(a) Q_A^T and S = Q_S diag(s) Q_S^T (float64), K-FAC's eigenvalues
in the Kronecker eigenbasis Q_S kron Q_A are s_o a_j. EK-FAC replaces them by the second moments of the
per-example gradients in that basis, Lambda = (1/n) sum_i (Q_S^T G_i Q_A)^2 (elementwise), i.e. the diagonal of
Q^T G_block Q: the best diagonal in that basis (Frobenius norm). Inverse products are then
(F + lambda I)^{-1} v = Q_S [(Q_S^T V Q_A) / (Lambda + lambda)] Q_A^T per layer.

Influence (course convention, ``influence.py``): tau[i, t] = -(1/n) grad f_t^T (F + lambda I)^{-1} grad loss_i,
the effect of INCLUDING training example i on target t's margin. Layers other than Linear/Conv2d (batch-norm
scales and shifts of ResNet-9) are not factored: their parameters are held fixed, i.e. they contribute nothing
to the scores (as in kronfluence). Models are evaluated through their full state (parameters and buffers) in
eval mode.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from .. import grads, measure

LABELS = ("sampled", "empirical", "exact")
KINDS = ("kfac", "ekfac")
COMBINE = ("mean", "standardized")


# ----------------------------------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """One factored layer: ``name`` (module path), ``weight``/``bias`` (parameter keys; bias may be None), the
    gradient-matrix shape (d_out, d_in) with d_in counting the bias column, and the module itself."""
    name: str
    module: nn.Module
    weight: str
    bias: str | None
    d_out: int
    d_in: int


def layers_of(net: nn.Module) -> list[Layer]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of ``net`` (in module order); other layers are not factored."""
    out = []
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                             or isinstance(m.padding, str)):
                raise ValueError(f"layer {name}: only ungrouped, zero-padded convolutions with numeric padding")
            prefix = f"{name}." if name else ""
            d_in = m.weight[0].numel() + (m.bias is not None)
            out.append(Layer(name, m, prefix + "weight", prefix + "bias" if m.bias is not None else None,
                             m.weight.shape[0], d_in))
    if not out:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to factor")
    return out


def patches(layer: Layer, inp: torch.Tensor) -> torch.Tensor:
    """(b, T, d_in) layer inputs, one row per output position (T = 1 for a linear layer on (b, d) inputs), with a
    column of ones for the bias. Convolutions are unfolded (``F.unfold``: channel-major, like weight.flatten(1))."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
    else:
        a = inp.reshape(inp.shape[0], -1, inp.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], -1)
    return a


def _out_rows(layer: Layer, g: torch.Tensor) -> torch.Tensor:
    """(b, T, d_out) output gradients, one row per output position."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def capture(net, state, x, layers):
    """One forward pass of ``net`` through its full ``state`` (parameters and buffers) on x, recording each layer.

    Returns (logits, acts, probes): acts[layer.name] is the layer's input as (b, T, d_in) patches (``patches``);
    probes[layer.name] is a zero tensor added to the layer's output, so that the gradient of anything computed from
    the logits with respect to the probe is the gradient with respect to that layer's output (K-FAC's g)."""
    # eval mode: a skeleton left in training mode would make batch norm normalise by the batch's statistics and
    # overwrite the running statistics in ``state`` (the model's own buffers) in place
    net.eval()
    acts, probes = {}, {}

    def hook_for(layer):
        def hook(module, inp, out):
            acts[layer.name] = patches(layer, inp[0].detach())
            probes[layer.name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[layer.name]
        return hook

    handles = [l.module.register_forward_hook(hook_for(l)) for l in layers]
    try:
        with torch.enable_grad():
            logits = functional_call(net, state, (x,))
    finally:
        for h in handles:
            h.remove()
    return logits, acts, probes


def _output_grads(logits, probes, layers, y, labels, gen):
    """List of 'draws': per draw a dict layer -> (b, T, d_out) gradient of each example's loss with respect to the
    layer output, already scaled so that the sum over draws of g g^T is the wanted second moment."""
    prob = logits.detach().double().softmax(-1)
    if labels == "exact":
        ys = [torch.full_like(y, c) for c in range(logits.shape[-1])]
        w = [prob[:, c].sqrt().to(logits.dtype) for c in range(logits.shape[-1])]
    elif labels == "sampled":
        ys = [torch.multinomial(prob.cpu(), 1, generator=gen)[:, 0].to(logits.device)]
        w = [None]
    else:
        ys, w = [y], [None]
    draws = []
    for j, (yj, wj) in enumerate(zip(ys, w)):
        loss = measure.loss(logits, yj).sum()
        gs = torch.autograd.grad(loss, [probes[l.name] for l in layers], retain_graph=j < len(ys) - 1)
        d = {}
        for l, g in zip(layers, gs):
            g = _out_rows(l, g.detach())
            d[l.name] = g if wj is None else g * wj[:, None, None]
        draws.append(d)
    return draws


# --------------------------------------------------------------------------------- gradients as layer matrices


def _example_grads(layer: Layer, a: torch.Tensor, g: torch.Tensor, rot=None) -> torch.Tensor:
    """(b, d_out, d_in) per-example gradient matrices sum_t g_t a_t^T from inputs a (b, T, d_in) and output
    gradients g (b, T, d_out); with rot = (Q_A, Q_S), in the eigenbasis: Q_S^T (sum_t g_t a_t^T) Q_A, rotating
    whichever side is cheaper (the rows before the product when there are few positions T)."""
    if rot is None:
        return torch.einsum("bto,bti->boi", g, a) if a.shape[1] > 1 else g[:, 0, :, None] * a[:, 0, None, :]
    QA, QS = rot
    T = a.shape[1]
    if T * (layer.d_in ** 2 + layer.d_out ** 2) < layer.d_in * layer.d_out * (layer.d_in + layer.d_out):
        return _example_grads(layer, a @ QA, g @ QS)
    return QS.T @ _example_grads(layer, a, g) @ QA


def per_example_layer_grads(net, state: dict, x, y, fn: str = "loss", layers=None, batch_size: int = 256,
                            rot: dict | None = None):
    """Per-example gradients of ``fn`` ('loss' or 'margin') as layer matrices: {layer: (n, d_out, d_in)}, the last
    column being the bias. Computed from layer inputs and output gradients (sum_t g_t a_t^T), one pass per batch.
    rot: {layer: (Q_A, Q_S)} to get them in the Kronecker eigenbasis instead."""
    layers = layers_of(net) if layers is None else layers
    f = measure.get(fn)
    out = {l.name: [] for l in layers}
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits, acts, probes = capture(net, state, xb, layers)
        gs = torch.autograd.grad(f(logits, yb).sum(), [probes[l.name] for l in layers])
        for l, g in zip(layers, gs):
            out[l.name].append(_example_grads(l, acts[l.name], _out_rows(l, g), None if rot is None else rot[l.name]))
    return {k: torch.cat(v) for k, v in out.items()}


def layer_grads_from_flat(flat: torch.Tensor, like: dict, layers) -> dict:
    """(N, p) flat gradients (order of ``grads.flatten(like)``) -> {layer: (N, d_out, d_in)}."""
    parts = _unflatten_rows(flat, like)
    out = {}
    for l in layers:
        w = parts[l.weight].reshape(len(flat), l.d_out, -1)
        out[l.name] = w if l.bias is None else torch.cat([w, parts[l.bias][:, :, None]], 2)
    return out


def flat_from_layer_grads(mats: dict, like: dict, layers) -> torch.Tensor:
    """Inverse of ``layer_grads_from_flat``; parameters of layers that are not factored get zeros."""
    n = len(next(iter(mats.values())))
    ref = next(iter(like.values()))
    parts = {k: torch.zeros(n, *v.shape, dtype=mats[layers[0].name].dtype, device=ref.device)
             for k, v in like.items()}
    for l in layers:
        m = mats[l.name]
        cols = m.shape[2] - (l.bias is not None)
        parts[l.weight] = m[:, :, :cols].reshape(n, *like[l.weight].shape)
        if l.bias is not None:
            parts[l.bias] = m[:, :, -1]
    return torch.cat([v.reshape(n, -1) for v in parts.values()], 1)


def _unflatten_rows(flat, like):
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[:, i:i + t.numel()].reshape(len(flat), *t.shape)
        i += t.numel()
    return out


def layer_order(like: dict, layers) -> torch.Tensor:
    """Indices into ``grads.flatten(like)`` of the layer-matrix order (layer by layer, each (d_out, d_in) row
    major): ``M = G[idx][:, idx]`` reorders a (p, p) matrix into the block layout of ``Factors.dense``."""
    p = sum(v.numel() for v in like.values())
    mats = layer_grads_from_flat(torch.arange(p, dtype=torch.float64)[None], like, layers)
    return torch.cat([mats[l.name].reshape(-1) for l in layers]).long()


# ------------------------------------------------------------------------------------------ the Gauss-Newton Hessian


def _logits_fn(net, state, names, x):
    net.eval()  # batch norm with the trained running statistics (never the batch's: see ``capture``)
    fixed = {k: v.detach() for k, v in state.items() if k not in names}
    return lambda p: functional_call(net, {**fixed, **p}, (x,))


def _softmax_hessian(logits: torch.Tensor) -> torch.Tensor:
    """(b, C, C) H_out = diag(p) - p p^T, the Hessian of the cross-entropy in the logits (any label)."""
    p = logits.softmax(-1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def gnh(net, state: dict, x, names=None, weight_decay: float = 0.0, batch_size: int = 200) -> torch.Tensor:
    """The explicit (p, p) GNH (1/n) sum_i J_i^T H_out,i J_i (+ wd I) over the parameters ``names`` (default: every
    parameter of the module, in ``state``'s order; buffers are held fixed), for small models."""
    names = [k for k, _ in net.named_parameters()] if names is None else list(names)
    params = {k: state[k].detach() for k in names}
    p = sum(v.numel() for v in params.values())
    G = torch.zeros(p, p, dtype=torch.float64, device=x.device)
    for xb in x.split(batch_size):
        f = _logits_fn(net, state, names, xb)
        J = jacrev(f)(params)
        J = torch.cat([J[k].reshape(len(xb), -1, params[k].numel()) for k in names], 2).double()  # (b, C, p)
        H = _softmax_hessian(f(params).detach().double())
        G += torch.einsum("bcp,bcd,bdq->pq", J, H, J)
    return (G / len(x) + weight_decay * torch.eye(p, dtype=torch.float64, device=x.device)).to(x.dtype)


def gnh_products(net, state: dict, x, V: torch.Tensor, names=None, weight_decay: float = 0.0,
                 batch_size: int = 500, chunk: int = 32) -> torch.Tensor:
    """Matrix-free GNH products G V for V (p, T), any model: J v by forward mode (jvp), H_out J v in closed form,
    J^T (.) by reverse mode (vjp), vmapped over ``chunk`` columns at a time."""
    names = [k for k, _ in net.named_parameters()] if names is None else list(names)
    params = {k: state[k].detach() for k in names}
    out = torch.zeros_like(V)
    for xb in x.split(batch_size):
        f = _logits_fn(net, state, names, xb)
        logits, pull = vjp(f, params)
        prob = logits.detach().softmax(-1)

        def one(v):
            jv = jvp(f, (params,), (grads.unflatten(v, params),))[1]
            hjv = prob * jv - prob * (prob * jv).sum(-1, keepdim=True)
            return grads.flatten(pull(hjv)[0])

        for s in range(0, V.shape[1], chunk):
            out[:, s:s + chunk] += vmap(one, in_dims=1, out_dims=1)(V[:, s:s + chunk])
    return out / len(x) + weight_decay * V


def fisher_exact(net, state: dict, x, names=None, batch_size: int = 200) -> torch.Tensor:
    """The true Fisher (1/n) sum_i sum_c p_ic g_i(c) g_i(c)^T with g_i(c) the loss gradient under label c, computed
    from per-example gradients (an independent route to the GNH for the softmax cross-entropy; small models)."""
    names = [k for k, _ in net.named_parameters()] if names is None else list(names)
    net.eval()
    with torch.no_grad():
        prob = torch.cat([functional_call(net, state, (xb,)).softmax(-1) for xb in x.split(batch_size)])
    Fm = 0
    for c in range(prob.shape[1]):
        g = grads.per_example_grads(net, state, x, torch.full((len(x),), c, device=x.device), "loss",
                                    batch_size, names=names).double()
        Fm = Fm + (g * prob[:, c:c + 1].double()).T @ g
    return (Fm / len(x)).to(x.dtype)


def lanczos_extremes(matvec, p: int, steps: int = 60, seed: int = 0, dtype=torch.float32, device="cpu"):
    """Ritz values (ascending) of a symmetric operator after ``steps`` Lanczos steps with full
    re-orthogonalisation, from a seeded random start. The largest and smallest Ritz values converge first
    (to the extreme eigenvalues); interior ones are not eigenvalues. matvec: (p, 1) -> (p, 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(p, 1, generator=g, dtype=torch.float64).to(device)
    q /= q.norm()
    Q, alphas, betas = [q], [], []
    for j in range(min(steps, p)):
        w = matvec(Q[-1].to(dtype)).double()
        a = float((Q[-1] * w).sum())
        alphas.append(a)
        Qm = torch.cat(Q, 1)
        w = w - Qm @ (Qm.T @ w)
        w = w - Qm @ (Qm.T @ w)
        b = float(w.norm())
        if b < 1e-10 * max(1.0, abs(a)):
            break
        betas.append(b)
        Q.append(w / b)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:k - 1], dtype=torch.float64)
    T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)


# ----------------------------------------------------------------------------------------------------- factors


@dataclass
class Factors:
    """Fitted K-FAC / EK-FAC factors of one model, per layer name (all float64):
    A (d_in, d_in), S (d_out, d_out), their eigenvectors qa, qs and eigenvalues ea, es, and the EK-FAC corrected
    eigenvalues lam (d_out, d_in) (None when not fitted). n: examples used; spec: what shaped them;
    seconds: {'covariance', 'eigen', 'lambda'} wall time."""
    layers: list
    shapes: dict
    A: dict
    S: dict
    qa: dict
    ea: dict
    qs: dict
    es: dict
    lam: dict | None
    n: int
    spec: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def state(self) -> dict:
        """Plain tensors and containers only (for ``cache.load_or_compute``); ``Factors(**state)`` restores it."""
        import dataclasses

        return dataclasses.asdict(self)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def eigenvalues(self, kind: str = "ekfac") -> dict:
        """{layer: (d_out, d_in)} the diagonal of the factored matrix in the Kronecker eigenbasis Q_S kron Q_A."""
        _check_kind(kind)
        if kind == "kfac":
            return {k: torch.outer(self.es[k], self.ea[k]) for k in self.layers}
        if self.lam is None:
            raise ValueError("these factors have no EK-FAC eigenvalue correction (fit with correct=True)")
        return self.lam

    def damping_of(self, kind: str, damping: float, relative: bool = False) -> dict:
        """{layer: lambda}: ``damping`` itself, or (relative) damping x the layer's mean (corrected) eigenvalue."""
        if not damping > 0:
            raise ValueError(f"damping must be positive, got {damping}: the factored GNH can be singular")
        if not relative:
            return {k: float(damping) for k in self.layers}
        return {k: float(damping) * float(v.mean()) for k, v in self.eigenvalues(kind).items()}

    def rotate(self, mats: dict) -> dict:
        """{layer: (N, d_out, d_in)} -> the same in the eigenbasis: Q_S^T G Q_A (float64)."""
        return {k: self.qs[k].T @ mats[k].double() @ self.qa[k] for k in self.layers}

    def unrotate(self, mats: dict) -> dict:
        return {k: self.qs[k] @ mats[k] @ self.qa[k].T for k in self.layers}

    def inverse_eigenvalues(self, kind: str = "ekfac", damping: float = 1e-3, relative: bool = False,
                            weight_decay: float = 0.0, keep: float = 1.0) -> dict:
        """{layer: (d_out, d_in)} 1 / (eigenvalue + lambda + wd): the damped inverse in the Kronecker eigenbasis.

        keep < 1 is the spectral regularisation of the course text ("approximating each block by its top
        eigenspace"): per layer only the ceil(keep x d_out d_in) largest eigenvalues are inverted, every other
        direction gets 0 (the inverse restricted to the block's top eigenspace). Raises ValueError for keep outside
        (0, 1]."""
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
        lam = self.damping_of(kind, damping, relative)
        out = {}
        for k, e in self.eigenvalues(kind).items():
            inv = 1.0 / (e + lam[k] + weight_decay)
            if keep < 1:
                r = math.ceil(keep * e.numel())
                top = e.flatten().argsort(descending=True)[:r]
                inv = torch.zeros_like(inv).flatten().index_copy_(0, top, inv.flatten()[top]).view_as(e)
            out[k] = inv
        return out

    def inverse_products(self, mats: dict, kind: str = "ekfac", damping: float = 1e-3, relative: bool = False,
                         weight_decay: float = 0.0, keep: float = 1.0) -> dict:
        """(F + (lambda + wd) I)^{-1} applied to every gradient matrix: {layer: (N, d_out, d_in)} -> same.
        keep: as in ``inverse_eigenvalues``."""
        inv = self.inverse_eigenvalues(kind, damping, relative, weight_decay, keep)
        rot = self.rotate(mats)
        return self.unrotate({k: rot[k] * inv[k] for k in self.layers})

    def block_diagonal(self, M: torch.Tensor) -> torch.Tensor:
        """The layer blocks of a (P, P) matrix in ``layer_order`` (everything between layers set to 0)."""
        sizes = [self.shapes[k][0] * self.shapes[k][1] for k in self.layers]
        return torch.block_diag(*[blk for blk in _diag_blocks(M, sizes)])

    def dense(self, kind: str = "ekfac") -> torch.Tensor:
        """The explicit block-diagonal factored matrix (sum of d_out d_in over layers, squared), in the layer order
        of ``layer_order``; only for small models."""
        blocks = []
        for k in self.layers:
            Q = torch.kron(self.qs[k], self.qa[k])
            blocks.append(Q @ torch.diag(self.eigenvalues(kind)[k].reshape(-1)) @ Q.T)
        return torch.block_diag(*blocks)


def _diag_blocks(M, sizes):
    start = 0
    for s in sizes:
        yield M[start:start + s, start:start + s]
        start += s


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown curvature {kind!r}; valid: {', '.join(KINDS)}")


def _sym_eig(M: torch.Tensor):
    ev, Q = torch.linalg.eigh((M + M.T) / 2)
    return Q, ev


def fit_factors(net, state: dict, x, y, labels: str = "sampled", seed: int = 0, correct: bool = True,
                batch_size: int = 256, progress: bool = False) -> Factors:
    """Fit K-FAC factors (and, with ``correct``, the EK-FAC eigenvalue correction) of every Linear/Conv2d layer.

    Two passes over (x, y): covariances A and S (then float64 eigendecompositions), and the corrected eigenvalues
    Lambda = mean_i (Q_S^T G_i Q_A)^2 from per-example gradients G_i. labels: 'sampled' (y ~ the model's
    predictive distribution, seeded: the true Fisher), 'empirical' (the given y), 'exact' (every class, weighted
    by its probability). The same sampled labels serve both passes.
    """
    if labels not in LABELS:
        raise ValueError(f"unknown labels {labels!r}; valid: {', '.join(LABELS)}")
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    net.eval()
    layers = layers_of(net)
    state = {k: v.detach() for k, v in state.items()}
    n = len(y)
    dev = x.device
    A = {l.name: torch.zeros(l.d_in, l.d_in, dtype=torch.float64, device=dev) for l in layers}
    S = {l.name: torch.zeros(l.d_out, l.d_out, dtype=torch.float64, device=dev) for l in layers}
    positions = {}

    def passes(gen_seed):
        gen = torch.Generator().manual_seed(gen_seed)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            logits, acts, probes = capture(net, state, xb, layers)
            yield acts, _output_grads(logits, probes, layers, yb, labels, gen)

    t0 = time.perf_counter()
    for acts, draws in tqdm(passes(seed), total=math.ceil(n / batch_size), disable=not progress, leave=False,
                            desc="K-FAC covariances"):
        for l in layers:
            a = acts[l.name].reshape(-1, l.d_in)
            A[l.name] += (a.T @ a).double()
            positions[l.name] = acts[l.name].shape[1]
            for d in draws:
                g = d[l.name].reshape(-1, l.d_out)
                S[l.name] += (g.T @ g).double()
    A = {k: v / n for k, v in A.items()}
    S = {k: v / (n * positions[k]) for k, v in S.items()}
    t1 = time.perf_counter()
    qa, ea, qs, es = {}, {}, {}, {}
    for l in layers:
        qa[l.name], ea[l.name] = _sym_eig(A[l.name])
        qs[l.name], es[l.name] = _sym_eig(S[l.name])
    t2 = time.perf_counter()
    lam = None
    if correct:
        lam = {l.name: torch.zeros(l.d_out, l.d_in, dtype=torch.float64, device=dev) for l in layers}
        rot = {l.name: (qa[l.name].to(x.dtype), qs[l.name].to(x.dtype)) for l in layers}
        for acts, draws in tqdm(passes(seed), total=math.ceil(n / batch_size), disable=not progress, leave=False,
                                desc="EK-FAC eigenvalues"):
            for l in layers:
                for d in draws:
                    G = _example_grads(l, acts[l.name], d[l.name], rot[l.name])
                    lam[l.name] += (G.double() ** 2).sum(0)
        lam = {k: v / n for k, v in lam.items()}
    t3 = time.perf_counter()
    names = [l.name for l in layers]
    shapes = {l.name: (l.d_out, l.d_in, l.bias is not None) for l in layers}
    spec = {"labels": labels, "seed": seed, "n": n, "correct": correct}
    return Factors(names, shapes, A, S, qa, ea, qs, es, lam, n, spec,
                   {"covariance": t1 - t0, "eigen": t2 - t1, "lambda": t3 - t2})


def cached_factors(cfg, data, models, model: int = 0, labels: str = "sampled", seed: int = 0,
                   cache=None) -> Factors:
    """``fit_factors`` of reference model ``model`` on the whole training pool, cached on disk by everything that
    shapes them (the recipe, the model's seed, the data, the labels and their seed), so that every target, damping
    and chapter reuses one fit. models: a ``train.Models``."""
    from .. import cache as cache_mod

    spec = {"recipe": cfg.recipe(), "model": int(models.seeds[model]), "n_train": data.n_train, "labels": labels,
            "seed": seed, "v": 1}
    path = cache_mod.cache_dir(cache) / f"ekfac_factors_{cfg.dataset}_{cache_mod.cache_key(spec)}.pt"
    dev = cfg.torch_device
    fit = lambda: fit_factors(models.net, models.state_of(model), data.x_train.to(dev), data.y_train.to(dev),
                              labels, seed).state()
    return Factors(**cache_mod.load_or_compute(path, fit, spec))


def eigh_solve(eigh, V: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + damping I)^{-1} V from the eigendecomposition ``eigh = (eigenvalues, Q)`` of a symmetric PSD M
    (``torch.linalg.eigh``): Q diag(1 / (e + damping)) Q^T V. For the explicit matrices of small models."""
    ev, Q = eigh
    if not (damping > 0 and (ev + damping).min() > 0):
        raise ValueError(f"M + damping I must be positive definite: damping {damping}, smallest eigenvalue "
                         f"{float(ev.min()):.3g}")
    return Q @ ((Q.T @ V) / (ev + damping)[:, None])


# ------------------------------------------------------------------------------------------------------ scores


@dataclass
class EkfacScores:
    """scores: {(kind, damping): (n_train, T) tau} in the course convention; seconds: {(kind, damping): wall
    time of factors + gradients + solve for that one setting, the factors counting only what that curvature needs
    (K-FAC: covariances and eigendecompositions; EK-FAC: also the eigenvalue pass)}; grad_seconds: the shared
    per-example gradients."""
    scores: dict
    seconds: dict
    grad_seconds: float


def influence_scores(factors: Factors, net, state: dict, x_train, y_train, x_targets, y_targets, *,
                     dampings=(1e-3,), kinds=("ekfac",), relative: bool = False, weight_decay: float = 0.0,
                     keep: float = 1.0, target_fn: str = "margin", batch_size: int = 256,
                     dtype=torch.float32) -> EkfacScores:
    """tau[i, t] = -(1/n) grad f_t^T (F + (lambda + wd) I)^{-1} grad loss_i for every curvature in ``kinds``
    ('kfac', 'ekfac') and every damping, batched over all targets. keep < 1: only each layer's top eigenspace
    (``Factors.inverse_eigenvalues``).

    The target gradients are rotated into each layer's eigenbasis once and divided by (eigenvalues + damping) per
    setting; the training gradients are rotated batch by batch and multiplied with all of them, so extra dampings
    cost one matrix product each. Gradients are per-example layer matrices (``per_example_layer_grads``)."""
    for k in kinds:
        _check_kind(k)
    net.eval()
    layers = [l for l in layers_of(net) if l.name in factors.layers]
    state = {k: v.detach() for k, v in state.items()}
    n = len(y_train)
    t0 = time.perf_counter()
    tg = factors.rotate(per_example_layer_grads(net, state, x_targets, y_targets, target_fn, layers, batch_size))
    t_tg = time.perf_counter() - t0
    settings_ = [(k, float(d)) for k in kinds for d in dampings]
    W, t_solve = {}, {}
    for kind, d in settings_:
        t1 = time.perf_counter()
        inv = factors.inverse_eigenvalues(kind, d, relative, weight_decay, keep)
        W[(kind, d)] = torch.cat([(tg[l] * inv[l]).reshape(len(y_targets), -1) for l in factors.layers],
                                 1).to(dtype)  # (T, P)
        t_solve[(kind, d)] = time.perf_counter() - t1
    out = {s: torch.empty(n, len(y_targets), dtype=dtype, device=x_train.device) for s in settings_}
    t_grad = 0.0
    rot = {l: (factors.qa[l].to(x_train.dtype), factors.qs[l].to(x_train.dtype)) for l in factors.layers}
    start = 0
    for xb, yb in zip(x_train.split(batch_size), y_train.split(batch_size)):
        t1 = time.perf_counter()
        g = per_example_layer_grads(net, state, xb, yb, "loss", layers, len(yb), rot)
        rot_g = torch.cat([g[l].reshape(len(yb), -1) for l in factors.layers], 1).to(dtype)
        t_grad += time.perf_counter() - t1
        for s in settings_:
            t1 = time.perf_counter()
            out[s][start:start + len(yb)] = -(rot_g @ W[s].T) / n
            t_solve[s] += time.perf_counter() - t1
        start += len(yb)
    # K-FAC needs only the covariances and their eigenvectors: the eigenvalue-correction pass is EK-FAC's alone
    own = {k: factors.total_seconds - (factors.seconds.get("lambda", 0.0) if k == "kfac" else 0.0) for k in kinds}
    secs = {s: own[s[0]] + t_tg + t_grad + t_solve[s] for s in settings_}
    return EkfacScores(out, secs, t_tg + t_grad)


def ekfac_scores(net, state: dict, x_train, y_train, x_targets, y_targets, *, damping: float = 1e-3,
                 kind: str = "ekfac", labels: str = "sampled", seed: int = 0, relative: bool = False,
                 weight_decay: float = 0.0, batch_size: int = 256) -> torch.Tensor:
    """One call: fit factors on the training set and return the (n_train, T) scores for one curvature and damping."""
    fac = fit_factors(net, state, x_train, y_train, labels, seed, correct=kind == "ekfac", batch_size=batch_size)
    res = influence_scores(fac, net, state, x_train, y_train, x_targets, y_targets, dampings=[damping],
                           kinds=[kind], relative=relative, weight_decay=weight_decay, batch_size=batch_size)
    return res.scores[(kind, float(damping))]


# ---------------------------------------------------------------------------------------------------- ensembles


def combine(score_list, how: str = "mean") -> torch.Tensor:
    """Ensemble (n, T) score matrices of independently trained models: 'mean' averages them as they are;
    'standardized' first divides each model's scores by their standard deviation over training examples (per
    target), so that no model dominates by scale (a model with a flat loss landscape has large influence)."""
    if how not in COMBINE:
        raise ValueError(f"unknown combination {how!r}; valid: {', '.join(COMBINE)}")
    s = torch.stack([t.double() for t in score_list])
    if how == "standardized":
        s = s / s.std(1, keepdim=True).clamp_min(1e-30)
    return s.mean(0).to(score_list[0].dtype)


# ------------------------------------------------------------------------------------------------------- checks


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm())
