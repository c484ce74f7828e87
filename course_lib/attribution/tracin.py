"""TracIn (Pruthi et al. 2020, "Estimating training data influence by tracing gradient descent"), chapter 05.

Derivation from one SGD step (the course's training, ``train.train_weighted``). A step on batch b of B examples
with learning rate lr moves the parameters by -(lr / B) sum_{i in b} w_i grad loss_i, so to first order it changes
a target's measured output f_t (its margin) by

    d f_t / d w_i = -(lr / B) grad f_t(theta) . grad loss_i(theta)          for i in b.

The sign: training on i lowers loss_i; when that also raises f_t (the gradients of loss_i and f_t point in
opposite directions, e.g. a same-class look-alike), the score is positive: the course convention (including i
raises f_t). Pruthi et al. write the positive dot product of two LOSS gradients ("proponents" lower the test
loss); with the margin as the target's output, f_t = -loss_t in spirit, hence the minus sign here.

TracIn (ideal, ``tracin_ideal``) sums this over the steps whose batch contains i, evaluated at each step's
parameters: it is the exact unrolled derivative (``unroll.unrolled_scores``) with every step's effect measured
at once, i.e. with the propagation factors (I - lr H) ... dropped and grad f_t(theta_T) replaced by grad
f_t(theta_t).

TracInCP (``tracin_scores``) replaces the steps by a few saved checkpoints theta_c:

    score[i, t] = -sum_c eta_c grad f_t(theta_c) . grad loss_i(theta_c),

with eta_c the learning-rate weight of checkpoint c. ``lr_weights`` gives the one that matches the unrolled
derivative in expectation over batch orders: a step contains example i with probability B / n and then weights
its gradient by lr / B, so each step contributes lr / n on average, and checkpoint c stands for the steps since
the previous checkpoint: eta_c = (sum of those steps' learning rates) / n. With every step as a checkpoint and no
momentum, TracInCP is the expectation of ideal TracIn over batch orders.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .. import grads, measure
from ..train import Trajectory


@dataclass
class TracIn:
    """scores: (n_train, T) in the course convention (units of f per unit of weight); seconds: wall time;
    checkpoints: how many parameter vectors were used."""
    scores: torch.Tensor
    seconds: float
    checkpoints: int


def lr_weights(lrs, checkpoint_steps, n_train: int, momentum: float = 0.0) -> torch.Tensor:
    """(C,) TracInCP's learning-rate weights: eta_c = sum_{s_{c-1} <= t < s_c} lrs[t] / (n_train (1 - momentum)).

    lrs: (steps,) every step's learning rate; checkpoint_steps: the increasing steps s_c after which the
    checkpoints were taken (``Models.checkpoints``' step numbers; s_0 = 0 precedes the first), so checkpoint c
    stands for the steps since the previous one. momentum: 0 for Pruthi et al.'s weights; mu > 0 scales them by
    the effective learning rate of momentum SGD, lr / (1 - mu) (the total displacement a gradient causes).
    Raises ValueError on steps that are not increasing within 1..len(lrs), or a momentum outside [0, 1).
    """
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    s = [int(v) for v in checkpoint_steps]
    if not s or any(b <= a for a, b in zip([0] + s, s)) or s[-1] > len(lrs):
        raise ValueError(f"checkpoint steps must increase strictly within 1..{len(lrs)}, got {s}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if n_train < 1:
        raise ValueError(f"n_train must be positive, got {n_train}")
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), lrs.cumsum(0)])
    edges = torch.tensor([0] + s)
    return (csum[edges[1:]] - csum[edges[:-1]]) / (n_train * (1 - momentum))


def tracin_scores(net, states, weights, x_train, y_train, x_targets, y_targets, *, target_fn: str = "margin",
                  batch_size: int = 256) -> TracIn:
    """TracInCP: score[i, t] = -sum_c weights[c] grad f_t(theta_c) . grad loss_i(theta_c) (course convention).

    states: the checkpoints' full states (``Models.state_of``-like dicts; buffers held fixed, eval mode);
    weights: (C,) their learning-rate weights (``lr_weights``; for one checkpoint with weight lr / B it is one
    SGD step's first-order effect). target_fn: 'margin' (default) or 'loss'. Returns (n_train, T) scores.
    Raises ValueError when the numbers of states and weights differ, FloatingPointError on non-finite scores.
    """
    states = list(states)
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if len(states) == 0 or len(states) != len(weights):
        raise ValueError(f"need one weight per checkpoint (at least one): {len(states)} states, {len(weights)} weights")
    measure.get(target_fn)
    t0 = time.perf_counter()
    out = torch.zeros(len(y_train), len(y_targets), dtype=torch.float64, device=x_train.device)
    for st, eta in zip(states, weights.tolist()):
        gt = grads.per_example_grads(net, st, x_targets, y_targets, target_fn, batch_size).double()  # (T, p)
        start = 0  # training gradients a batch at a time: (n, p) at once would not fit for large n
        for xb, yb in zip(x_train.split(batch_size), y_train.split(batch_size)):
            gb = grads.per_example_grads(net, st, xb, yb, "loss", batch_size).double()
            out[start:start + len(yb)] -= eta * (gb @ gt.T)
            start += len(yb)
    out = grads.check_finite(out.to(x_train.dtype), "TracIn scores")
    return TracIn(out, time.perf_counter() - t0, len(states))


def tracin_ideal(traj: Trajectory, x_train, y_train, x_targets, y_targets, *, target_fn: str = "margin",
                 momentum: float = 0.0, progress: bool = False) -> TracIn:
    """Ideal TracIn over a recorded run, every step with its exact batch (course convention):

        score[i, t] = -sum_{s: i in b_s} lr_s / (B_s (1 - momentum)) grad f_t(theta_s) . grad loss_i(theta_s).


    The first-order part of ``unroll.unrolled_scores``: each step's effect on f_t is measured at that step instead of
    being propagated to the end of training. momentum: 0 (Pruthi et al.) or the run's mu for the effective learning
    rate lr / (1 - mu). Cost: per-example gradients of every batch and of the T targets at every step."""
    from .unroll import _check

    _check(traj, x_train, y_train, x_targets, y_targets, target_fn, None)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    t0 = time.perf_counter()
    net = traj.net.eval()
    dtype = traj.thetas.dtype
    x_train, x_targets = x_train.to(dtype), x_targets.to(dtype)
    out = torch.zeros(traj.n_train, len(y_targets), dtype=dtype)
    for s in tqdm(range(traj.steps), disable=not progress, leave=False, desc="TracIn"):
        b = traj.batches[s]
        st = traj.state_at(s)
        gt = grads.per_example_grads(net, st, x_targets, y_targets, target_fn)
        gb = grads.per_example_grads(net, st, x_train[b], y_train[b], "loss")
        out.index_add_(0, b, -(float(traj.lrs[s]) / (len(b) * (1 - momentum))) * (gb @ gt.T))
    grads.check_finite(out, "TracIn scores")
    return TracIn(out, time.perf_counter() - t0, traj.steps)


def combine_checkpoints(per_checkpoint: dict, lrs, checkpoint_steps, n_train: int, momentum: float = 0.0) -> TracIn:
    """TracInCP over the checkpoints ``checkpoint_steps`` from terms computed once per checkpoint.

    per_checkpoint: {step s: the ``TracIn`` of the one checkpoint s with weight 1, ``tracin_scores(net, [state_s],
    [1.0], ...)``}, shared by every number of checkpoints whose steps include s. Returns the ``TracIn`` whose scores
    are sum_c lr_weights[c] per_checkpoint[s_c].scores (``lr_weights(lrs, checkpoint_steps, n_train, momentum)``),
    whose seconds are the sum of those checkpoints' seconds (its own checkpoints only) and whose checkpoints is C.
    Equal to ``tracin_scores`` at those states with those weights. Raises KeyError for a step with no term and the
    errors of ``lr_weights``."""
    steps = [int(s) for s in checkpoint_steps]
    missing = [s for s in steps if s not in per_checkpoint]
    if missing:
        raise KeyError(f"no per-checkpoint TracIn term for steps {missing}")
    w = lr_weights(lrs, steps, n_train, momentum)
    scores = sum(float(wi) * per_checkpoint[s].scores.double() for wi, s in zip(w, steps))
    return TracIn(scores.to(per_checkpoint[steps[0]].scores.dtype), sum(per_checkpoint[s].seconds for s in steps),
                  len(steps))
