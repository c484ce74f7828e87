"""SOURCE (Bae, Lin, Lorraine & Grosse 2024, "Training Data Attribution via Approximate Unrolling"), chapter 05.

Start from the unrolled derivative (``unroll``). A step t moves the parameter perturbation d_t = d theta_t / d w_i by

    d_{t+1} = (I - lr_t H_t) d_t - lr_t (1[i in b_t] / B_t) grad loss_i(theta_t),

and since a step contains example i with probability B / n, the forcing term is lr_t grad loss_i / n on average.
SOURCE splits training into L segments and, within segment l (K_l steps, learning rates summing to s_l), holds the
Hessian H_l and the example's gradient g_l,i fixed (averages over the segment's checkpoints). Then K_l steps give

    d_end = (I - lr H_l)^K d_start - [I - (I - lr H_l)^K] H_l^{-1} g_l,i / n
          ~ exp(-s_l H_l) d_start - (I - exp(-s_l H_l)) H_l^{-1} g_l,i / n      ((I - lr H)^K ~ exp(-K lr H)),

and chaining the segments, with the score in the course convention (the effect of up-weighting / including i):

    score[i, t] = -(1/n) sum_l grad f_t(theta_T)^T [prod_{l' > l} exp(-s_l' H_l')] (I - exp(-s_l H_l)) H_l^{-1} g_l,i.

Every matrix function is a function of H_l's eigenvalues lambda: phi(lambda) = (1 - exp(-s lambda)) / lambda (equal to
s at lambda = 0, bounded for lambda >= 0: no damping needed) and psi(lambda) = exp(-s lambda). With EK-FAC curvature
(``ekfac.Factors``: block diagonal, Kronecker eigenbasis Q_S kron Q_A per layer) they act elementwise on the rotated
gradient matrices. Momentum mu enters through the effective learning rate lr / (1 - mu): s_l = sum of the segment's
learning rates / (1 - mu). Coupled weight decay adds wd to every eigenvalue.

L = 1: score = -(1/n) grad f^T (I - exp(-s H)) H^{-1} g, and (1 - e^{-s lambda}) / lambda lies between
1 / (lambda + 1/s) and 1.2985 / (lambda + 1/s) (equal in both limits): SOURCE with one segment is damped influence
(``influence``) with damping 1 / s = 1 / (lr K), up to that factor per eigendirection (``damping_ratio``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .. import grads, measure
from . import ekfac

FORMS = ("exp", "power")


# --------------------------------------------------------------------------------------------- spectral functions


def filters(eigs: torch.Tensor, lr_sum: float, *, form: str = "exp", lr: float | None = None,
            steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi, psi) of one segment at the eigenvalues ``eigs`` (any shape; float64 recommended).

    form 'exp' (SOURCE): psi = exp(-s lambda), phi = (1 - psi) / lambda, with s = ``lr_sum`` (phi = s at lambda = 0).
    form 'power' (exact for a constant Hessian and constant learning rate): psi = (1 - lr lambda)^steps,
    phi = (1 - psi) / lambda = lr sum_{k < steps} (1 - lr lambda)^k; needs ``lr`` and ``steps`` (lr_sum = lr steps).
    Raises ValueError on an unknown form or missing lr/steps."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    eigs = torch.as_tensor(eigs)
    if form == "exp":
        x = lr_sum * eigs
        psi = torch.exp(-x)
        small = x.abs() < 1e-8
        safe = torch.where(small, torch.ones_like(eigs), eigs)
        phi = torch.where(small, lr_sum * (1 - x / 2), -torch.expm1(-x) / safe)
        return phi, psi
    if lr is None or steps is None or int(steps) < 1:
        raise ValueError("form 'power' needs lr and steps (a positive integer)")
    q = 1 - lr * eigs
    psi = q ** int(steps)
    phi = lr * sum(q ** k for k in range(int(steps)))  # the geometric sum: exact, also at lambda = 0
    return phi, psi


def damping_ratio(eigs, lr_sum: float) -> torch.Tensor:
    """SOURCE's one-segment filter over damped influence's: (1 - exp(-s lambda)) / lambda * (lambda + 1/s), for
    lambda >= 0. It lies in [1, 1.2985) and tends to 1 for s lambda -> 0 and
    s lambda -> infinity."""
    phi, _ = filters(torch.as_tensor(eigs, dtype=torch.float64), lr_sum)
    return phi * (torch.as_tensor(eigs, dtype=torch.float64) + 1 / lr_sum)


# --------------------------------------------------------------------------------------------- segments


@dataclass
class Segment:
    """Steps start..end-1 of training; checkpoints: indices (into the given checkpoint list) of the checkpoints
    taken inside it (after steps start+1..end); lr_sum: its effective learning-rate sum s (units: lr x steps)."""
    start: int
    end: int
    checkpoints: list
    lr_sum: float


def segments(lrs, checkpoint_steps, L: int, momentum: float = 0.0) -> list[Segment]:
    """Split training (``lrs``: (steps,) every step's learning rate) into L segments of equal numbers of steps and
    assign to each the checkpoints taken within it (``checkpoint_steps``: steps after which each was taken, e.g.
    ``[s for s, _ in models.checkpoints]``). lr_sum = sum of the segment's learning rates / (1 - momentum).
    Raises ValueError when L is not in 1..steps or a segment holds no checkpoint."""
    lrs = torch.as_tensor(lrs, dtype=torch.float64)
    steps = len(lrs)
    if not (isinstance(L, int) and 1 <= L <= steps):
        raise ValueError(f"L must be an integer in 1..{steps}, got {L!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    edges = torch.linspace(0, steps, L + 1).round().long().tolist()
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        cks = [j for j, s in enumerate(checkpoint_steps) if a < int(s) <= b]
        if not cks:
            raise ValueError(f"segment of steps {a}..{b - 1} holds no checkpoint (checkpoints after steps "
                             f"{list(map(int, checkpoint_steps))}): save more checkpoints or use fewer segments")
        out.append(Segment(a, b, cks, float(lrs[a:b].sum()) / (1 - momentum)))
    return out


# ------------------------------------------------------------------------------------------ explicit Hessians


def source_exact(hessians, lr_sums, train_grads, target_grads, n: int, *, form: str = "exp", lrs=None,
                 steps=None) -> torch.Tensor:
    """SOURCE with explicit curvature, for small models and tests: (n_train, T) scores, course convention.

    hessians: (L, p, p) symmetric, one per segment in training order (weight decay included); lr_sums: (L,)
    effective learning-rate sums s_l; train_grads: (L, n_train, p) the examples' loss gradients averaged over each
    segment; target_grads: (T, p) grad f_t at the trained parameters; n: the number of training examples in the
    1/n forcing term. form 'power' with per-segment ``lrs`` (L,) and ``steps`` (L,) uses (I - lr H)^K instead of
    exp(-s H): exact unrolling of full-batch gradient descent on a quadratic loss when every segment is one step.
    """
    H = torch.as_tensor(hessians, dtype=torch.float64)
    G = torch.as_tensor(train_grads, dtype=torch.float64)
    U = torch.as_tensor(target_grads, dtype=torch.float64).T.clone()  # (p, T) adjoints
    L = len(H)
    if H.ndim != 3 or G.ndim != 3 or len(G) != L or len(lr_sums) != L or G.shape[2] != H.shape[1]:
        raise ValueError(f"need hessians (L, p, p), lr_sums (L,), train_grads (L, n, p): got {tuple(H.shape)}, "
                         f"{len(lr_sums)}, {tuple(G.shape)}")
    scores = torch.zeros(G.shape[1], U.shape[1], dtype=torch.float64)
    for l in range(L - 1, -1, -1):
        e, Q = torch.linalg.eigh((H[l] + H[l].T) / 2)
        kw = {} if form == "exp" else {"lr": float(lrs[l]), "steps": int(steps[l])}
        phi, psi = filters(e, float(lr_sums[l]), form=form, **kw)
        R = Q.T @ U
        scores -= G[l] @ (Q @ (phi[:, None] * R)) / n
        U = Q @ (psi[:, None] * R)
    return grads.check_finite(scores, "SOURCE scores")


# ------------------------------------------------------------------------------------------------ EK-FAC


def segment_factors(net, states, x, y, *, labels: str = "sampled", seed: int = 0, batch_size: int = 256):
    """EK-FAC factors of one segment, averaged over its checkpoints ``states`` (full states).

    One checkpoint: exactly ``ekfac.fit_factors`` (chapter 04's factors). Several: the K-FAC covariances A and S are
    averaged over the checkpoints, eigendecomposed once, and the EK-FAC eigenvalues in that basis are the per-example
    gradient second moments averaged over the checkpoints. labels: 'sampled' (one draw per example and checkpoint from
    that checkpoint's predictive distribution, seeded) or 'empirical'; 'exact' only with one checkpoint.
    Returns ``ekfac.Factors``."""
    states = list(states)
    if not states:
        raise ValueError("a segment needs at least one checkpoint state")
    if len(states) == 1:
        return ekfac.fit_factors(net, states[0], x, y, labels, seed, batch_size=batch_size)
    if labels not in ("sampled", "empirical"):
        raise ValueError(f"labels {labels!r} with several checkpoints; valid: 'sampled', 'empirical'")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    ys = []
    for st in states:
        if labels == "empirical":
            ys.append(y)
            continue
        with torch.no_grad():
            prob = torch.cat([torch.func.functional_call(net.eval(), st, (xb,)).double().softmax(-1)
                              for xb in x.split(batch_size)])
        ys.append(torch.multinomial(prob.cpu(), 1, generator=gen)[:, 0].to(y.device))
    covs = [ekfac.fit_factors(net, st, x, yc, "empirical", correct=False, batch_size=batch_size)
            for st, yc in zip(states, ys)]
    first = covs[0]
    A = {k: sum(c.A[k] for c in covs) / len(covs) for k in first.layers}
    S = {k: sum(c.S[k] for c in covs) / len(covs) for k in first.layers}
    qa, ea, qs, es = {}, {}, {}, {}
    for k in first.layers:
        ea[k], qa[k] = torch.linalg.eigh((A[k] + A[k].T) / 2)
        es[k], qs[k] = torch.linalg.eigh((S[k] + S[k].T) / 2)
    layers = [l for l in ekfac.layers_of(net) if l.name in first.layers]
    rot = {k: (qa[k].to(x.dtype), qs[k].to(x.dtype)) for k in first.layers}
    lam = {k: torch.zeros(first.shapes[k][0], first.shapes[k][1], dtype=torch.float64) for k in first.layers}
    for st, yc in zip(states, ys):
        g = ekfac.per_example_layer_grads(net, st, x, yc, "loss", layers, batch_size, rot)
        for k in first.layers:
            lam[k] += (g[k].double() ** 2).sum(0) / (len(y) * len(states))
    spec = {"labels": labels, "seed": seed, "n": len(y), "correct": True, "checkpoints": len(states)}
    return ekfac.Factors(first.layers, first.shapes, A, S, qa, ea, qs, es, lam, len(y), spec,
                         {"total": time.perf_counter() - t0})


@dataclass
class Source:
    """scores: (n_train, T) course convention; seconds: wall time (factors, gradients, scores); factors: the
    segments' ``ekfac.Factors`` (reusable); lr_sums: the segments' effective learning-rate sums."""
    scores: torch.Tensor
    seconds: float
    factors: list
    lr_sums: list


def source_scores(net, segment_states, lr_sums, final_state, x_train, y_train, x_targets, y_targets, *,
                  weight_decay: float, target_fn: str = "margin", labels: str = "sampled", seed: int = 0,
                  factors=None, batch_size: int = 256, n: int | None = None) -> Source:
    """SOURCE scores with EK-FAC curvature per segment (module docstring), batched over all targets.

    segment_states: one list of checkpoint states per segment, in training order (``segments`` says which
    checkpoints fall in which segment); lr_sums: (L,) effective learning-rate sums s_l (``Segment.lr_sum``, with
    momentum folded in); final_state: the trained model's state, where grad f_t is taken. weight_decay: the recipe's
    coupled weight decay, added to every eigenvalue. factors: precomputed per-segment ``ekfac.Factors`` (else fitted
    with ``segment_factors`` on (x_train, y_train)). n: examples in the 1/n forcing term (default len(y_train)).
    Returns ``Source`` with (n_train, T) scores in x_train's dtype. Parameters outside Linear/Conv2d layers are held
    fixed. Raises ValueError on mismatched segment inputs, FloatingPointError on non-finite scores.
    """
    segment_states = [list(s) for s in segment_states]
    L = len(segment_states)
    if L == 0 or len(lr_sums) != L or any(len(s) == 0 for s in segment_states):
        raise ValueError(f"need one non-empty list of states per segment and one lr_sum each: {L} segments, "
                         f"{len(lr_sums)} lr_sums")
    if any(not (float(s) > 0 and math.isfinite(float(s))) for s in lr_sums):
        raise ValueError(f"lr_sums must be positive finite numbers, got {list(lr_sums)}")
    measure.get(target_fn)
    t0 = time.perf_counter()
    net.eval()
    if factors is None:
        factors = [segment_factors(net, st, x_train, y_train, labels=labels, seed=seed + 1000 * l,
                                   batch_size=batch_size) for l, st in enumerate(segment_states)]
    if len(factors) != L:
        raise ValueError(f"{len(factors)} factors for {L} segments")
    names = factors[0].layers
    layers = [l for l in ekfac.layers_of(net) if l.name in names]
    n = len(y_train) if n is None else n
    # adjoints U (T, d_out, d_in) per layer, walked backwards through the segments
    U = {k: v.double() for k, v in ekfac.per_example_layer_grads(net, final_state, x_targets, y_targets, target_fn,
                                                                layers, batch_size).items()}
    contrib = [None] * L  # per segment: {layer: (T, d_out, d_in)} in that segment's eigenbasis, phi applied
    for l in range(L - 1, -1, -1):
        F = factors[l]
        eig = F.eigenvalues("ekfac")
        R = F.rotate(U)
        filt = {k: filters(eig[k] + weight_decay, float(lr_sums[l])) for k in names}
        contrib[l] = {k: R[k] * filt[k][0] for k in names}
        U = F.unrotate({k: R[k] * filt[k][1] for k in names})
    T = len(y_targets)
    scores = torch.zeros(len(y_train), T, dtype=torch.float64, device=x_train.device)
    for l in range(L):
        F = factors[l]
        rot = {k: (F.qa[k].to(x_train.dtype), F.qs[k].to(x_train.dtype)) for k in names}
        W = torch.cat([contrib[l][k].reshape(T, -1) for k in names], 1)  # (T, P)
        start = 0
        for xb, yb in zip(x_train.split(batch_size), y_train.split(batch_size)):
            gbar = 0
            for st in segment_states[l]:
                g = ekfac.per_example_layer_grads(net, st, xb, yb, "loss", layers, len(yb), rot)
                gbar = gbar + torch.cat([g[k].double().reshape(len(yb), -1) for k in names], 1)
            gbar = gbar / len(segment_states[l])
            scores[start:start + len(yb)] -= gbar @ W.T / n
            start += len(yb)
    scores = grads.check_finite(scores.to(x_train.dtype), "SOURCE scores")
    return Source(scores, time.perf_counter() - t0, factors, [float(s) for s in lr_sums])
