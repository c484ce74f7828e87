"""What influence functions estimate in deep nets: the proximal Bregman response function (chapter 01).

Source. Bae, Ng, Lo, Ghassemi & Grosse (2022), "If Influence Functions are the Answer, Then What is the Question?"
(NeurIPS) introduced the PBRF. The equation numbers below are those of its restatement by two of the same authors,
Grosse, Bae, Anil et al. (2023), "Studying Large Language Model Generalization with Influence Functions"
(arXiv:2308.03296), Section 2.1.1: the proximal Bregman objective (PBO) is their Eq. 7, the Bregman divergence
their Eq. 8, and its implicit-function derivative their Eq. 9. With theta_s the trained (not necessarily converged) parameters, h(theta, x) the
network's outputs (logits), lambda > 0 the damping and eps the weight of example z_m,

    theta_s(eps) = argmin_theta (1/n) sum_i D_L(h(theta, x_i), h(theta_s, x_i), y_i) + eps L(h(theta, x_m), y_m)
                                + (lambda / 2) ||theta - theta_s||^2,                                   (Eq. 7)
    D_L(h, h_s, y) = L(h, y) - L(h_s, y) - grad_h L(h_s, y)^T (h - h_s),                               (Eq. 8)
    d theta_s / d eps at 0 = -(G + lambda I)^{-1} grad_theta L(z_m, theta_s),                            (Eq. 9)

with G the Gauss-Newton Hessian of the mean loss, (1/n) sum_i J_i^T H_i J_i (J_i = dh_i/dtheta, H_i the Hessian of
the loss in the outputs). Removing z_m is eps = -1/n. For the softmax cross-entropy D_L does not depend on the label:
it is KL(softmax(h_s) || softmax(h)), so the first term keeps the network's predictive distributions on the
training set where they were (function-space proximity) and the last keeps the weights near theta_s.

Weight decay. The course's training objective (``grads.objective``) is the mean loss plus R(theta) = (wd/2)||theta||^2.
Taking the Bregman divergence of the whole objective, the regulariser (a quadratic) contributes its own Bregman
divergence D_R(theta, theta_s) = (wd/2)||theta - theta_s||^2, so the proximity weight is wd + lambda. Here, with w the
REMOVED weight (w = -eps; w = 1/n removes z_m),

    F_w(theta) = (1/n) sum_i D_L(h_i(theta), h_i(theta_s), y_i) - w L(h_m(theta), y_m)
                 + ((wd + lambda) / 2) ||theta - theta_s||^2,          theta_pbrf(w) = argmin F_w, started at theta_s.

Its Gauss-Newton matrix at theta_s is G - w J_m^T H_m J_m + (wd + lambda) I, and Eq. 9 reads
theta_pbrf(w) - theta_s = w (G + (wd + lambda) I)^{-1} grad L_m + O(w^2): exactly the damped Gauss-Newton influence
``influence.influence_scores(..., weight_decay=wd, damping=lambda)`` computes with G in place of the Hessian. In the
course convention (DESIGN.md: tau[m, t] is the effect of INCLUDING m on f_t), removing m moves a measured output by

    f_t(theta_pbrf(1/n)) - f_t(theta_s) ~= (1/n) grad f_t^T (G + (wd + lambda) I)^{-1} grad L_m = -tau_GNH[m, t].

Why a separate module: the PBRF is not a score method but the counterfactual that (damped, Gauss-Newton) influence
functions estimate, the way leave-one-out retraining is the counterfactual of the classical influence function; it
needs its own optimiser, while ``influence`` only solves linear systems.

Solver. A deterministic, full-batch, Hessian-free Newton method (Martens 2010's Newton-CG) started at theta_s: at
theta, the step d solves C(theta) d = -grad F(theta) by conjugate gradient, with C the Gauss-Newton matrix of F
(``curvature="gauss-newton"``, the default: G(theta) - w J_m^T H_m J_m + (wd + lambda) I, positive definite for
0 < w <= 1/n and wd + lambda > 0) or its exact Hessian (``"hessian"``: forward-over-reverse products; CG stops at
non-positive curvature). CG is truncated once its residual is below eta ||grad F||, eta = min(forcing,
sqrt(||grad F|| / ||grad F(theta_s)||)) (Eisenstat-Walker), then an Armijo backtracking line search on F (where
F's decrease is below its round-off, a step that lowers ||grad F|| is accepted). STOPPING RULE: ||grad F(theta)||_2
<= tol * ||grad F(theta_s)||_2, with grad F(theta_s) = -w grad L_m(theta_s) (the Bregman and proximity terms are
stationary at theta_s); otherwise ``PBRFNotConverged`` after ``max_iter`` steps, naming the gradient norm reached.

Costs and limits (measured once on the course's 28,874-parameter CNN, 4,000 training images, one CPU thread,
float32): a gradient of F takes 0.22 s, a Gauss-Newton product 0.42 s, an exact Hessian product 1.1 s (float64:
about 7x slower, the CPU convolutions have no fast float64 path). Exact-Hessian steps converged no faster there:
ReLU makes F only piecewise smooth, and the iterates stall at a kink with ||grad F|| about 1e-2 of its start (the
iterate of smallest gradient is returned); at that point the two curvatures' answers for the same removal's effect
on a test loss differed by 0.7%. With tol=1e-2, max_iter=12, cg_iters=50 a removal took 10-80 s; the removals of
high-loss training examples did not reach the tolerance (see ``pbrf_response``'s caveat). On smooth models (tanh,
the tests) exact-Hessian steps converge quadratically, Gauss-Newton steps linearly. ``group`` optimises several
removals side by side by vmapping every product over stacked parameter copies: 3x faster for a tiny model (Python
overhead), no faster for the CNN (a vmapped convolution costs the same FLOPs per copy). Float64 is needed for
tolerances below about 1e-6 (F is a sum of small differences); float32 gradients of F on the CNN carried round-off
of about 1e-8, far below the kink floor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from .. import grads, measure


class PBRFNotConverged(RuntimeError):
    """The Newton iterations did not reach the requested gradient norm (the message says where they got)."""


@dataclass
class PBRFResponse:
    """The PBRF parameters of K removals and what it took to get them.

    removed: (K,) the removed training indices; weight: the removed weight w (1/n: the whole example).
    params: {name: (K, *shape)} the PBRF parameters theta_pbrf for each removal (parameters only, module order);
    buffers: the model's buffers, held fixed; ``state(k)`` is removal k's full state for ``functional_call``.
    grad_norm: (K,) the final ||grad F||_2; grad_norm0: (K,) ||grad F(theta_s)||_2 = w ||grad L_m(theta_s)||_2 (the
    stopping rule is grad_norm <= tol * grad_norm0); converged: (K,) bool; steps: (K,) Newton steps taken;
    products: the number of (example, vector) curvature products in CG over all removals (cost accounting);
    seconds: wall time of the whole call; tol: the tolerance asked for.
    """
    removed: torch.Tensor
    weight: float
    params: dict
    buffers: dict
    grad_norm: torch.Tensor
    grad_norm0: torch.Tensor
    converged: torch.Tensor
    steps: torch.Tensor
    products: int
    seconds: float
    tol: float

    def state(self, k: int) -> dict:
        return {**{n: v[k] for n, v in self.params.items()}, **self.buffers}

    @property
    def relative_grad_norm(self) -> torch.Tensor:
        return self.grad_norm / self.grad_norm0.clamp_min(torch.finfo(self.grad_norm0.dtype).tiny)


def _check_number(value, name: str, *, minimum=None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        need = "a finite number" + ("" if minimum is None else f" >= {minimum}")
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return float(value)


def _check_inputs(net, params, x_train, y_train, removed, weight_decay, damping, weight, tol, max_iter):
    n = len(y_train)
    if len(x_train) != n:
        raise ValueError(f"x_train has {len(x_train)} rows but y_train has {n}")
    wd = _check_number(weight_decay, "weight_decay", minimum=0.0)
    lam = _check_number(damping, "damping", minimum=0.0)
    w = 1.0 / n if weight is None else _check_number(weight, "weight")
    if w == 0 or w > 1.0 / n * (1 + 1e-12):
        raise ValueError(f"weight (the removed weight of example m) must be nonzero and at most 1/n = {1 / n:.3g} "
                         f"(1/n removes the whole example; a negative weight adds a copy), got {w!r}")
    _check_number(tol, "tol", minimum=0.0)
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    removed = torch.as_tensor(removed, dtype=torch.long).reshape(-1).cpu()
    if removed.numel() == 0:
        raise ValueError("removed is empty: give at least one training index")
    bad = removed[(removed < 0) | (removed >= n)]
    if len(bad):
        raise ValueError(f"removed indices {bad[:5].tolist()} are out of range for {n} training examples "
                         f"(valid: 0..{n - 1})")
    theta, buffers = grads.split_state(net, params)
    for k, v in theta.items():
        if not v.is_floating_point():
            raise ValueError(f"parameter {k} has dtype {v.dtype}; the PBRF needs floating-point parameters")
        if not torch.isfinite(v).all():
            raise ValueError(f"parameter {k} holds {int((~torch.isfinite(v)).sum())} non-finite entries: theta_s must "
                             "be a finite trained model")
    if x_train.is_floating_point() and not torch.isfinite(x_train).all():
        raise ValueError("x_train holds non-finite entries")
    return removed, wd, lam, w, theta, buffers


class _Problem:
    """The PBO of one trained model, as functions of ONE flat parameter vector (p,), ready for vmap over removals.

    Data terms are evaluated chunk by chunk (``batch_size`` examples) so memory stays bounded for any n."""

    def __init__(self, net, theta: dict, buffers: dict, x, y, loss_fn, rho: float, w: float, batch_size: int):
        self.net, self.loss_fn, self.rho, self.w = net, loss_fn, rho, w
        self.like = {k: v.detach() for k, v in theta.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        self.theta_s = grads.flatten(self.like)
        self.n = len(y)
        self.chunks = []
        with torch.no_grad():
            for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
                hs = self.logits(self.theta_s, xb)
                self.chunks.append((xb, yb, hs, loss_fn(hs, yb).detach(), self._out_grad(hs, yb)))
        self.loss_scale = sum(float(c[3].abs().sum()) for c in self.chunks) / self.n  # for F's round-off

    def logits(self, flat, x):
        return functional_call(self.net, {**self.buffers, **grads.unflatten(flat, self.like)}, (x,))

    def _out_grad(self, h, y):
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            return torch.autograd.grad(self.loss_fn(h, y).sum(), h)[0].detach()  # per example: the loss is a sum

    # -- one chunk of the Bregman term, (1/n) sum_b D_L; and the removal term -w L_m
    def bregman(self, flat, xb, yb, hs, ls, gs):
        h = self.logits(flat, xb)
        return (self.loss_fn(h, yb) - ls - ((h - hs) * gs).sum(-1)).sum() / self.n

    def removal(self, flat, xm, ym):
        return -self.w * self.loss_fn(self.logits(flat, xm), ym).sum()

    def prox(self, flat):
        return 0.5 * self.rho * ((flat - self.theta_s) ** 2).sum()

    def ggn(self, flat, v, xb, yb, coef):
        """J^T (coef * H_out) J v over one chunk: forward-mode J v, the output-space Hessian product, reverse J^T."""
        f = lambda t: self.logits(t, xb)
        h, jv = jvp(f, (flat,), (v,))
        out_grad = grad(lambda z: coef * self.loss_fn(z, yb).sum())
        hjv = jvp(out_grad, (h,), (jv,))[1]
        return vjp(f, flat)[1](hjv)[0]

    # -- batched over K removals: thetas (K, p), xm (K, 1, ...), ym (K, 1)
    def objective(self, thetas, xm, ym):
        total = vmap(self.prox)(thetas) + vmap(self.removal)(thetas, xm, ym)
        for xb, yb, hs, ls, gs in self.chunks:
            total = total + vmap(self.bregman, in_dims=(0, None, None, None, None, None))(thetas, xb, yb, hs, ls, gs)
        return total

    def gradient(self, thetas, xm, ym):
        g = self.rho * (thetas - self.theta_s) + vmap(grad(self.removal))(thetas, xm, ym)
        gb = vmap(grad(self.bregman), in_dims=(0, None, None, None, None, None))
        for xb, yb, hs, ls, gs in self.chunks:
            g = g + gb(thetas, xb, yb, hs, ls, gs)
        return g

    def hvp(self, flat, v, *args):
        """The exact Hessian of one data term (``bregman`` or ``removal``) times v: forward-over-reverse."""
        term = self.bregman if len(args) == 5 else self.removal
        return jvp(lambda t: grad(term)(t, *args), (flat,), (v,))[1]

    def hessian_product(self, thetas, V, xm, ym):
        out = self.rho * V + vmap(self.hvp)(thetas, V, xm, ym)
        prod = vmap(self.hvp, in_dims=(0, 0, None, None, None, None, None))
        for chunk in self.chunks:
            out = out + prod(thetas, V, *chunk)
        return out

    def ggn_product(self, thetas, V, xm, ym):
        out = self.rho * V + vmap(self.ggn, in_dims=(0, 0, 0, 0, None))(thetas, V, xm, ym, -self.w)
        prod = vmap(self.ggn, in_dims=(0, 0, None, None, None))
        for xb, yb, *_ in self.chunks:
            out = out + prod(thetas, V, xb, yb, 1.0 / self.n)
        return out


def _cg(apply, B, targets, iters):
    """Batched CG for A_k d_k = b_k (rows of B (K, p), one operator per row), stopping row k once its residual norm
    is below targets[k]; a row that meets non-positive curvature keeps its last iterate (steepest descent if first)."""
    D = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(1)
    active = rs.sqrt() > targets
    done_iters = 0
    for _ in range(iters):
        if not active.any():
            break
        AP = apply(P)
        done_iters += 1
        pAp = (P * AP).sum(1)
        bad = active & (pAp <= 0)
        if bad.any():  # indefinite (exact-Hessian steps, or damping 0 on a singular G): stop those rows
            first = bad & (D.abs().sum(1) == 0)
            D[first] = B[first]
            active = active & ~bad
        alpha = torch.where(active, rs / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        D = D + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        rs_new = (R * R).sum(1)
        beta = torch.where(active, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
        P = torch.where(active[:, None], R + beta[:, None] * P, P)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs.sqrt() > targets)
    return D, done_iters


CURVATURES = ("gauss-newton", "hessian")


def pbrf_response(net, params: dict, x_train, y_train, removed, *, weight_decay: float, damping: float,
                  weight: float | None = None, tol: float = 1e-6, max_iter: int = 30, cg_iters: int = 200,
                  forcing: float = 0.1, curvature: str = "gauss-newton", group: int = 1, batch_size: int = 1000,
                  loss_fn=None, strict: bool = True, progress: bool = False) -> PBRFResponse:
    """The proximal Bregman response theta_pbrf for removing each training example in ``removed`` (see the module
    docstring: Grosse et al. 2023, Eqs. 7-8, restating Bae et al. 2022; weight decay enters as proximity wd + damping).

    net, params: the trained model theta_s through its full state (buffers held fixed, eval mode), any float dtype
    (float64 for tolerances below ~1e-6). x_train (n, ...), y_train (n,): the training set of the objective.
    removed: an index or a sequence of K indices. weight: the removed weight w of example m (default 1/n: the whole
    example; eps/n for a fraction eps; a negative weight adds a copy). weight_decay, damping >= 0: proximity weight
    wd + damping (units of the mean loss per squared parameter). loss_fn(logits (b, C), y (b,)) -> (b,): default the
    course's cross-entropy ``measure.loss``; it must be convex in the outputs (the Bregman divergence needs it).

    Caveat (measured on the course CNN): for a removed example of high training loss, whose removal term is large,
    the iterates can move far from theta_s and crawl (ReLU kinks; with w = 1/n the example's own terms reduce to
    -(1/n) grad_h L(h_s)^T h_m(theta) + const, linear in its outputs, held back only by the other examples' Bregman
    terms and the quadratic proximity); read ``relative_grad_norm`` before trusting such an effect.

    Solver (module docstring): Newton steps with ``curvature`` "gauss-newton" or "hessian" products, CG of at most
    ``cg_iters`` products to a relative residual min(forcing, sqrt(||grad F|| / ||grad F(theta_s)||)), Armijo line
    search, from theta_s; stops when ||grad F||_2 <= tol * ||grad F(theta_s)||_2 or raises PBRFNotConverged after
    ``max_iter`` steps (strict=False returns the iterate of smallest gradient and marks ``converged``). group:
    removals optimised side by side (vmapped over stacked parameter copies); batch_size: examples per chunk of the
    full-batch sums (bounds memory). Returns a PBRFResponse (parameters (K, *shape) per name, gradient norms, cost).
    """
    t0 = time.perf_counter()
    removed, wd, lam, w, theta, buffers = _check_inputs(net, params, x_train, y_train, removed, weight_decay,
                                                        damping, weight, tol, max_iter)
    if not (isinstance(group, int) and group >= 1):
        raise ValueError(f"group must be an integer >= 1, got {group!r}")
    if not (isinstance(forcing, (int, float)) and 0 < forcing < 1):
        raise ValueError(f"forcing (the CG relative residual of a Newton step) must be in (0, 1), got {forcing!r}")
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise ValueError(f"cg_iters must be an integer >= 1, got {cg_iters!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {', '.join(CURVATURES)}")
    loss_fn = measure.loss if loss_fn is None else loss_fn
    prob = _Problem(net, theta, buffers, x_train, y_train, loss_fn, wd + lam, w, batch_size)
    K = len(removed)
    out = torch.empty(K, prob.theta_s.numel(), dtype=prob.theta_s.dtype, device=prob.theta_s.device)
    gnorm, gnorm0 = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    steps = torch.zeros(K, dtype=torch.long)
    products = 0
    dev = x_train.device
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    for s in tqdm(range(0, K, group), disable=not progress, desc="PBRF", leave=False):
        idx = removed[s:s + group]
        xm, ym = x_train[idx.to(dev)][:, None], y_train[idx.to(dev)][:, None]
        thetas = prob.theta_s.expand(len(idx), -1).clone()
        g = prob.gradient(thetas, xm, ym)
        g0 = g.norm(dim=1)
        gn = g0.clone()
        nsteps = torch.zeros(len(idx), dtype=torch.long)
        stalled = torch.zeros(len(idx), dtype=torch.bool, device=g.device)
        best, best_gn = thetas.clone(), gn.clone()
        for _ in range(max_iter):
            act = ((gn > tol * g0) & ~stalled).nonzero()[:, 0]
            if len(act) == 0:
                break
            th, ga, xa, ya = thetas[act], g[act], xm[act], ym[act]
            eta = torch.clamp((gn[act] / g0[act]).sqrt(), max=forcing)
            product = prob.hessian_product if curvature == "hessian" else prob.ggn_product
            apply = lambda V: product(th, V, xa, ya)
            d, it = _cg(apply, -ga, eta * gn[act], cg_iters)
            products += it * len(act) * (prob.n + 1)
            th, g_new, accepted = _line_search(prob, th, ga, d, xa, ya)
            stalled[act[~accepted]] = True  # no step decreases F or the gradient norm: report where it got
            thetas[act], g[act] = th, g_new
            gn = g.norm(dim=1)
            nsteps[act.cpu()] += accepted.long().cpu()
            better = gn < best_gn  # ReLU kinks make F piecewise smooth: keep the iterate of smallest gradient
            best[better], best_gn[better] = thetas[better], gn[better]
        out[s:s + len(idx)] = best
        gnorm[s:s + len(idx)] = best_gn.double().cpu()
        gnorm0[s:s + len(idx)] = g0.double().cpu()
        steps[s:s + len(idx)] = nsteps
    converged = gnorm <= tol * gnorm0
    res = PBRFResponse(removed, w, {k: v.clone() for k, v in grads.unflatten_rows(out, prob.like).items()},
                       prob.buffers, gnorm, gnorm0, converged, steps, products, time.perf_counter() - t0, tol)
    if strict and not converged.all():
        bad = (~converged).nonzero()[:, 0]
        worst = int(bad[res.relative_grad_norm[bad].argmax()])
        raise PBRFNotConverged(
            f"PBRF did not converge for {len(bad)} of {K} removals (e.g. index {int(removed[worst])}: "
            f"||grad F|| = {float(gnorm[worst]):.3g} = {float(res.relative_grad_norm[worst]):.3g} x its start "
            f"{float(gnorm0[worst]):.3g}, tolerance {tol:g}, after {int(steps[worst])} of max_iter={max_iter} "
            f"{curvature} Newton steps with cg_iters={cg_iters}). Raise max_iter or cg_iters, loosen tol (ReLU "
            "networks stall at a kink near 1e-2), use float64 parameters for tolerances below ~1e-6, or pass "
            "strict=False to get the iterate of smallest gradient.")
    return res


def _line_search(prob: _Problem, th, g, d, xm, ym, c: float = 1e-4, halvings: int = 40):
    """Backtracking from the full step along d, every removal at once: accept where F decreases by the Armijo rule
    F(th + t d) <= F(th) + c t g.d, or, where the change of F is below its round-off (near the solution, when the
    decrease g.d is ~1e-16 of F's terms), where the gradient norm decreases. Returns (theta, gradient, accepted)."""
    f0 = prob.objective(th, xm, ym)
    noise = 1e3 * torch.finfo(th.dtype).eps * (f0.abs() + prob.loss_scale)
    slope = (g * d).sum(1)
    gn = g.norm(dim=1)
    step = torch.ones(len(th), dtype=th.dtype, device=th.device)
    accepted = torch.zeros(len(th), dtype=torch.bool, device=th.device)
    th_new, g_new = th.clone(), g.clone()
    for _ in range(halvings):
        todo = (~accepted).nonzero()[:, 0]
        trial = th[todo] + step[todo, None] * d[todo]
        ft = prob.objective(trial, xm[todo], ym[todo])
        gt = prob.gradient(trial, xm[todo], ym[todo])  # needed anyway at an accepted point
        armijo = ft <= f0[todo] + c * step[todo] * slope[todo]
        unmeasurable = ft <= f0[todo] + noise[todo]
        ok = armijo | (unmeasurable & (gt.norm(dim=1) < gn[todo]))
        th_new[todo[ok]], g_new[todo[ok]] = trial[ok], gt[ok]
        accepted[todo[ok]] = True
        if accepted.all():
            break
        step = torch.where(accepted, step, step / 2)
    return th_new, g_new, accepted


def pbrf_effect(net, params: dict, x_train, y_train, x_targets, y_targets, removed=None, *, weight_decay: float,
                damping: float, target_fn="margin", response: PBRFResponse | None = None,
                **solver) -> torch.Tensor:
    """(K, T) the change of each target's measured output when each example of ``removed`` is removed in the PBRF
    sense: f_t(theta_pbrf_k) - f_t(theta_s).

    f_t: ``target_fn`` of target t, "margin" (log-odds, the course default) or "loss" (nats, Koh & Liang's test loss),
    or a callable(logits, y) -> (b,). Sign: this is a REMOVAL's effect; to first order it equals -tau[k, t] of the
    damped Gauss-Newton influence (tau: the effect of including k, course convention), i.e.
    (1/n) grad f_t^T (G + (wd + damping) I)^{-1} grad L_k, times n * weight when a fraction of k is removed.
    response: a precomputed ``pbrf_response`` for the same model (then ``removed`` and the solver options are not
    needed); otherwise it is computed here with ``solver`` passed on (tol, max_iter, group, ...).
    """
    if response is None:
        if removed is None:
            raise ValueError("give the removed indices or a precomputed response")
        response = pbrf_response(net, params, x_train, y_train, removed, weight_decay=weight_decay, damping=damping,
                                 **solver)
    f = measure.get(target_fn) if isinstance(target_fn, str) else target_fn
    theta, buffers = grads.split_state(net, params)
    with torch.no_grad():
        base = f(functional_call(net, {**buffers, **theta}, (x_targets,)), y_targets)
        rows = [f(functional_call(net, response.state(k), (x_targets,)), y_targets) - base
                for k in range(len(response.removed))]
    return torch.stack(rows)
