"""Exact unrolled differentiation through training (chapter 05).

Training (``train.record_training``) minimises, at step t on batch b_t of B_t examples, the weighted batch loss
(1/B_t) sum_{i in b_t} w_i loss_i with SGD, Nesterov momentum mu and coupled weight decay wd (torch.optim.SGD):

    g_t = grad[(1/B_t) sum_{b_t} w_i loss_i](theta_t) + wd theta_t,
    m_{t+1} = mu m_t + g_t   (m_0 = 0),        theta_{t+1} = theta_t - lr_t (g_t + mu m_{t+1}).

The trained parameters theta_T are a differentiable function of the data weights w. For plain gradient descent
(mu = 0) the chain rule gives the course text's product formula

    d theta_T / d w_j = - sum_{t: j in b_t} (I - lr_{T-1} H_{T-1}) ... (I - lr_{t+1} H_{t+1}) (lr_t / B_t)
                                            grad loss_j(theta_t),

with H_s the Hessian of step s's objective at theta_s (weight decay included). The minus sign is that of the update
(a step DOWN the gradient), and the product stops at step t+1: the step in which j's gradient enters does not
propagate it through its own Jacobian (a factor (I - lr_t H_t) there too would be an off-by-one). The text calls
this intractable; at the course's scale it is not: ``unrolled_scores`` computes, for every target t and every
training example i,

    score[i, t] = d f_t(theta_T) / d w_i         (f_t: the target's margin, or its loss),

exactly (up to float round-off), by reverse-mode differentiation through the whole recorded run: the adjoints
(a_theta, a_m) of (theta, m) start at (grad f_t(theta_T), 0) and walk backwards one step at a time,

    abar = a_m - lr_t mu a_theta      (the total cotangent of m_{t+1})
    c_t  = abar - lr_t a_theta        (the cotangent of g_t)
    a_theta <- a_theta + (H_t + wd I) c_t,        a_m <- mu abar,        score[i] += c_t . grad loss_i(theta_t) / B_t
                                                                                         for i in b_t,

where H_t c_t and the per-example dot products come out of ONE vector-Jacobian product of the gradient map
(theta, w_b) -> grad[(1/B) sum w_i loss_i](theta) at the stored theta_t (reverse-over-reverse, ``torch.func.vjp``),
vmapped over the targets' cotangents. Each step's forward pass is recomputed from the stored parameters, so memory
is the trajectory (steps x p) plus a few (T, p) adjoints; no autograd graph spans more than one step. The momentum
buffer enters every step linearly, so theta_t alone fixes the step's Jacobian.

Sign convention (the course's, DESIGN.md): score > 0 means up-weighting / including example i RAISES f_t.
Leaving example i out (w_i: 1 -> 0, the same batches and initialisation: the fixed-seed counterfactual) changes
f_t by about -score[i, t] to first order in the weight. The derivative is of ONE training run with its own
initialisation and batch order; it says nothing about other seeds. Where a step's factor (I - lr (H + wd I)) (with
momentum, effectively lr / (1 - mu)) has eigenvalues beyond -1 (large learning rates, early training at the edge of
stability), the adjoints grow as they are walked back through those steps: the derivative is still exact, but it
then measures a sensitivity that a finite change (dropping an example) need not follow. ``last`` truncates the
unrolling to the latest steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad, vjp, vmap
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .. import grads, measure
from ..models import has_batchnorm
from ..train import Trajectory


@dataclass
class Unrolled:
    """scores: (n_train, T) d f_t(theta_T) / d w_i (course convention); seconds: wall time; steps: the number of
    training steps differentiated through (the last ones); targets: T. truncated: {K: (n_train, T)} the scores of
    unrolling only the last K steps, for each K asked for in ``snapshots`` (free by-products of the backward walk);
    truncated_seconds: {K: the wall time the walk had taken when it reached K}."""
    scores: torch.Tensor
    seconds: float
    steps: int
    targets: int
    truncated: dict = field(default_factory=dict)
    truncated_seconds: dict = field(default_factory=dict)


def _check(traj: Trajectory, x_train, y_train, x_targets, y_targets, target_fn: str, last):
    if not isinstance(traj, Trajectory):
        raise ValueError(f"traj must be a train.Trajectory (from train.record_training), got {type(traj).__name__}")
    measure.get(target_fn)  # ValueError listing the valid measurements
    if len(x_train) != traj.n_train or len(y_train) != traj.n_train:
        raise ValueError(f"the trajectory was trained on {traj.n_train} examples; got x_train {len(x_train)}, "
                         f"y_train {len(y_train)}")
    if len(x_targets) != len(y_targets) or len(y_targets) == 0:
        raise ValueError(f"need as many target labels as target inputs (at least one): {len(x_targets)} inputs, "
                         f"{len(y_targets)} labels")
    if has_batchnorm(traj.net) or any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in traj.net.modules()):
        raise ValueError("unrolling replays training in eval mode: models with batch norm or dropout are not supported")
    if traj.nesterov != (traj.momentum > 0):
        raise ValueError(f"only the course recipe's update is supported: Nesterov momentum when momentum > 0 "
                         f"(got momentum {traj.momentum}, nesterov {traj.nesterov})")
    if last is not None and not (isinstance(last, int) and 1 <= last <= traj.steps):
        raise ValueError(f"last must be None (every step) or an integer in 1..{traj.steps}, got {last!r}")


def _dict_to_rows(d: dict) -> torch.Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for v in d.values()], 1)


def step_pullback(traj: Trajectory, t: int, x_train, y_train):
    """The vector-Jacobian product of step t's data gradient map at the stored theta_t.

    Returns pull: C (K, p) -> (H_t C (K, p), D (K, B_t)), with H_t the Hessian of (1/B_t) sum_{b_t} w_i loss_i at
    theta_t (weight decay NOT included) applied to every row of C, and D[k, j] = C[k] . grad loss_{b_t[j]}(theta_t)
    / B_t, the derivative of C[k] . g_t with respect to the weight of the batch's j-th example."""
    net, like, buffers = traj.net, traj.like, traj.buffers
    b = traj.batches[t].to(x_train.device)
    xb, yb, wb = x_train[b], y_train[b], traj.weights.to(x_train.device)[b]
    B = len(b)

    def batch_grad(theta, w):
        def batch_loss(th):
            return (w * measure.loss(functional_call(net, {**th, **buffers}, (xb,)), yb)).sum() / B
        return grad(batch_loss)(theta)

    _, pull = vjp(batch_grad, traj.params_at(t), wb)

    def apply(C: torch.Tensor):
        h, d = vmap(pull)(grads.unflatten_rows(C, like))
        return _dict_to_rows(h), d
    return apply


def unrolled_scores(traj: Trajectory, x_train, y_train, x_targets, y_targets, *, target_fn: str = "margin",
                    last: int | None = None, snapshots=(), chunk: int = 20, progress: bool = False) -> Unrolled:
    """score[i, t] = d f_t(theta_T) / d w_i for every training example i and target t, exactly, by reverse-mode
    differentiation through the recorded run ``traj`` (see the module docstring for the recursion).

    x_train, y_train: the pool the run was trained on (traj.batches index into it); x_targets (T, ...),
    y_targets (T,): the targets; f_t is their ``target_fn`` ('margin' (log-odds) or 'loss' (nats)) at the trained
    parameters theta_T, in eval mode. Units: f's units per unit of weight (a weight of 1 is one example).
    last: differentiate through the last ``last`` steps only (truncated unrolling: theta_{T-last} held fixed);
    None: every step, the exact derivative. snapshots: step counts K (each in 1..steps, at most ``last``) at which
    to keep a copy of the scores accumulated so far: the walk goes backwards from the end, so after K steps it holds
    exactly the scores of ``last=K`` (``Unrolled.truncated[K]``); one walk gives the whole truncation curve.
    chunk: targets per vmapped Hessian product (memory ~ chunk x batch activations; 20 was fastest for the course
    CNN on an idle 2-core CPU). All targets are carried together through
    each step. Cost: per step, one forward and backward pass of the batch plus T Hessian-vector products on it (about
    0.6 s for T = 200 on an idle 2-core CPU; on a CPU shared with other jobs, torch.set_num_threads(1) can be faster).

    Returns ``Unrolled`` with scores (n_train, T) in the trajectory's dtype. Raises ValueError on mismatched
    inputs or an unsupported model, FloatingPointError if a score is not finite.
    """
    _check(traj, x_train, y_train, x_targets, y_targets, target_fn, last)
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    depth = traj.steps if last is None else last
    snapshots = sorted({int(k) for k in snapshots})
    if snapshots and not (1 <= snapshots[0] and snapshots[-1] <= depth):
        raise ValueError(f"snapshots must be step counts in 1..{depth} (the steps unrolled), got {snapshots}")
    t_start = time.perf_counter()
    net = traj.net.eval()
    dtype = traj.thetas.dtype
    x_train, x_targets = x_train.to(dtype), x_targets.to(dtype)
    steps = traj.steps
    first = 0 if last is None else steps - last
    mu, wd = traj.momentum, traj.weight_decay
    # adjoint of theta_T: the target gradients, in the flat order of traj.like (= the module's parameter order)
    a_th = grads.per_example_grads(net, traj.state_at(steps), x_targets, y_targets, target_fn).to(dtype)
    a_m = torch.zeros_like(a_th)
    T = a_th.shape[0]
    scores = torch.zeros(traj.n_train, T, dtype=dtype, device=a_th.device)
    truncated, truncated_seconds = {}, {}
    for t in tqdm(range(steps - 1, first - 1, -1), disable=not progress, leave=False, desc="unrolling"):
        lr = float(traj.lrs[t])
        a_bar = a_m - (lr * mu) * a_th   # total cotangent of m_{t+1} (it also enters theta_{t+1} = ... - lr mu m_{t+1})
        c = a_bar - lr * a_th            # cotangent of g_t
        pull = step_pullback(traj, t, x_train, y_train)
        hc, dw = [], []
        for s in range(0, T, chunk):
            h, d = pull(c[s:s + chunk])
            hc.append(h)
            dw.append(d)
        a_th = a_th + torch.cat(hc) + wd * c
        a_m = mu * a_bar
        scores.index_add_(0, traj.batches[t].to(scores.device), torch.cat(dw).T)
        if steps - t in snapshots:
            truncated[steps - t] = grads.check_finite(scores.clone(), f"unrolled scores (last {steps - t} steps)")
            truncated_seconds[steps - t] = time.perf_counter() - t_start
    grads.check_finite(scores, "unrolled scores")
    return Unrolled(scores, time.perf_counter() - t_start, steps - first, T, truncated, truncated_seconds)


def product_formula(traj: Trajectory, x_train, y_train, x_targets, y_targets,
                    target_fn: str = "margin") -> torch.Tensor:
    """The course text's product formula with explicit (p, p) Hessians, for plain gradient descent (momentum 0):

        score[j, t] = -grad f_t(theta_T)^T sum_{s: j in b_s} [prod_{r > s} (I - lr_r (H_r + wd I))] (lr_s / B_s)
                      grad loss_j(theta_s).

    An independent reference for ``unrolled_scores`` on tiny models: it forms every Hessian explicitly with
    ``grads.hessian`` (O(p^2) memory, O(steps p^3) time) and multiplies forwards in theta-space instead of
    propagating adjoints. Raises ValueError for a run with momentum."""
    _check(traj, x_train, y_train, x_targets, y_targets, target_fn, None)
    if traj.momentum != 0:
        raise ValueError(f"the product formula is for plain gradient descent; this run has momentum {traj.momentum}")
    net = traj.net.eval()
    dtype = traj.thetas.dtype
    x_train, x_targets = x_train.to(dtype), x_targets.to(dtype)
    p = traj.thetas.shape[1]
    eye = torch.eye(p, dtype=dtype)
    # P_s = prod_{r > s} (I - lr_r H_r), built from the last step backwards; dtheta_T/dw_j accumulates P_s v_s
    P = eye.clone()
    D = torch.zeros(p, traj.n_train, dtype=dtype)
    for s in range(traj.steps - 1, -1, -1):
        b = traj.batches[s]
        st = traj.state_at(s)
        G = grads.per_example_grads(net, st, x_train[b], y_train[b], "loss").to(dtype)  # (B, p)
        D[:, b] += -(float(traj.lrs[s]) / len(b)) * (P @ G.T)
        H = _batch_hessian(traj, s, x_train[b], y_train[b]) + traj.weight_decay * eye
        P = P @ (eye - float(traj.lrs[s]) * H)
    gf = grads.per_example_grads(net, traj.state_at(traj.steps), x_targets, y_targets, target_fn).to(dtype)
    return (gf @ D).T


def _batch_hessian(traj: Trajectory, s: int, xb, yb) -> torch.Tensor:
    """(p, p) Hessian of (1/B) sum_b w_i loss_i at theta_s, by torch.func.hessian (forward-over-reverse Jacobian of
    the gradient), explicitly."""
    net, like, buffers = traj.net, traj.like, traj.buffers
    wb = traj.weights[traj.batches[s]]

    def obj(v):
        logits = functional_call(net, {**grads.unflatten(v, like), **buffers}, (xb,))
        return (wb * measure.loss(logits, yb)).sum() / len(yb)
    return torch.func.hessian(obj)(traj.thetas[s].clone())


def shared_outcomes(changes, tol: float) -> list[list[int]]:
    """Group the rows of ``changes`` (rows, targets) that land on the same outcome: a row joins the first group whose
    first row it matches to within ``tol`` on every target (largest absolute difference below tol), else it starts a
    new group. Returns the groups as lists of row indices, in the order of their first rows (chapter 05: the retrained
    runs past the jump of the linearity experiment, rows of one example's margin changes)."""
    changes = torch.as_tensor(changes)
    if changes.ndim != 2:
        raise ValueError(f"changes must be (rows, targets), got shape {tuple(changes.shape)}")
    groups: list[list[int]] = []
    for r in range(len(changes)):
        home = next((g for g in groups if float((changes[r] - changes[g[0]]).abs().max()) < tol), None)
        if home is None:
            groups.append([r])
        else:
            home.append(r)
    return groups
