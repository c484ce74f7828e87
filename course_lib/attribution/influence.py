"""Influence functions (Koh & Liang 2017) for small models, in the course's sign convention (chapter 01).

Setting. The model minimises the training objective of ``grads.objective``,
    R(theta) = (1/n) sum_i loss_i(theta) + (wd / 2) ||theta||^2,        with Hessian H = grad^2 R(theta*).
Up-weighting example i by eps, R_eps = R + eps * loss_i, moves the minimiser by
    d theta* / d eps = -H^{-1} grad loss_i                                  (implicit function theorem).
Including example i (versus leaving it out) is eps = +1/n, so, to first order, the parameters move by
    -(1/n) H^{-1} grad loss_i,
and a measured output f_t (the margin of target t, or its loss) moves by

    tau[i, t] = -(1/n) grad f_t(theta*)^T (H + lambda I)^{-1} grad loss_i(theta*).

This is the course convention: tau[i, t] > 0 means including i RAISES f_t. The damping lambda makes H + lambda I
invertible when H is not positive definite (deep nets). The leave-one-out prediction (Koh & Liang's quantity,
removing i) is the negative: f_t(without i) - f_t(with i) ~= -tau[i, t]. For the test loss this is
+(1/n) grad L_test^T H^{-1} grad loss_i. "Leaving out" here means giving example i weight 0 in the same
(1/n)-normalised sum; the convex reference ``fit_convex`` retrains exactly that objective.

The cost is dominated by inverse-Hessian-vector products (iHVPs). Everything solves for many right-hand sides at
once: the T target gradients form a (p, T) matrix V, and each solver returns X ~= (H + lambda I)^{-1} V. The
per-example training gradients are computed once (``grads.per_example_grads``) and reused for every target:
scores = -(1/n) G_train @ X.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from .. import grads
from ..checks import check_informative  # noqa: F401  (chapters 01, 03 and 06 call it from here)
from ..checks import same_source_rate  # noqa: F401  (the cross-dataset test, beside identical_class_rate)

# ----------------------------------------------------------------------------------------------- Hessian operators


class HessianOperator:
    """The Hessian of the training objective as a linear map on (p, T) matrices.

    ``op(V)`` multiplies by the Hessian over all of (x, y) (or a fixed random subsample of ``hessian_n``
    examples, when given: a cheaper, noisier Hessian); ``op(V, idx)`` uses only the examples ``idx`` (LiSSA's
    stochastic products). Weight decay is always included, damping never (the solvers add it).
    """

    def __init__(self, net, params: dict, x, y, weight_decay: float = 0.0, hessian_n: int | None = None,
                 seed: int = 0, batch_size: int = 1000, chunk: int = 64):
        self.net, self.weight_decay, self.batch_size, self.chunk = net, weight_decay, batch_size, chunk
        self.params = {k: v.detach() for k, v in params.items()}  # the full state: buffers are held fixed
        if hessian_n is not None and hessian_n < len(y):
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:hessian_n]
            x, y = x[keep], y[keep]
        self.x, self.y = x, y
        self.n = len(y)
        self.p = sum(v.numel() for v in grads.split_state(net, self.params)[0].values())
        self.calls = 0  # number of (example, vector) products, for cost accounting

    def __call__(self, V: torch.Tensor, idx=None) -> torch.Tensor:
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        self.calls += len(y) * V.shape[1]
        return grads.hvps(self.net, self.params, x, y, V, self.weight_decay, self.batch_size, self.chunk)

    def dense(self) -> torch.Tensor:
        """The explicit (p, p) Hessian (columns are HVPs); only for small p."""
        return self(torch.eye(self.p, dtype=next(iter(grads.split_state(self.net, self.params)[0].values())).dtype))


class MatrixOperator:
    """An explicit symmetric matrix H (p, p) behind the same interface (tests, logistic regression).

    ``op(V, idx)`` ignores idx unless per-example Hessians ``parts`` (n, p, p) were given, whose mean is H."""

    def __init__(self, H: torch.Tensor, parts: torch.Tensor | None = None):
        self.H, self.parts = H, parts
        self.p = H.shape[0]
        self.n = 1 if parts is None else len(parts)

    def __call__(self, V, idx=None):
        if idx is None or self.parts is None:
            return self.H @ V
        return self.parts[idx].mean(0) @ V

    def dense(self):
        return self.H


# ------------------------------------------------------------------------------------------------------- solvers


def _check_rhs(V, damping=0.0):
    if V.ndim != 2:
        raise ValueError(f"right-hand sides must be a (p, T) matrix, got shape {tuple(V.shape)}")
    if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    grads.check_finite(V, "right-hand sides (target gradients)")


def _solution(X: torch.Tensor, solver: str, damping) -> torch.Tensor:
    """X, or FloatingPointError when the solve blew up (an indefinite H + damping I: raise the damping)."""
    return grads.check_finite(X, f"{solver} solution at damping {damping} (H + damping I is probably not "
                                 "positive definite here: raise the damping)")


def solve_exact(H: torch.Tensor, V: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """X = (H + damping I)^{-1} V with the explicit symmetric (p, p) Hessian, in float64 (the reference solver).

    Through the eigendecomposition H = Q diag(e) Q^T: X = Q diag(1 / (e + damping)) Q^T V. In float64 the
    eigenvalues carry errors of about eps * max|e|, so the solve is accurate to about 1e-6 relative as long as
    every |e + damping| is at least ``EXACT_FLOOR`` * max|e| (1e6 * eps); below that floor (e.g. damping 1e-14 on a
    rank-deficient H, or a damping that cancels a negative eigenvalue) it raises ValueError naming the smallest
    usable damping instead of returning digits that are noise.
    """
    _check_rhs(V, damping)
    grads.check_finite(H, "Hessian")
    e, Q = torch.linalg.eigh(H.double())
    shifted = e + damping
    floor = EXACT_FLOOR * max(float(e.abs().max()), 1e-300)
    if (shifted.abs() < floor).any():
        worst = float(e[shifted.abs().argmin()])
        usable = max(0.0, -float(e.min())) + floor
        raise ValueError(f"H + {damping} I is too close to singular for an accurate solve: H has the eigenvalue "
                         f"{worst:.3g}, so |eigenvalue + damping| = {abs(worst + damping):.3g} is below the floor "
                         f"{floor:.3g} (1e6 * eps * max|eigenvalue|). The smallest usable damping that makes "
                         f"H + damping I positive definite is {usable:.3g}.")
    X = Q @ ((Q.T @ V.double().to(Q.device)) / shifted[:, None])
    return X.to(V.dtype)


EXACT_FLOOR = 1e6 * torch.finfo(torch.float64).eps


def solve_cg(hvp, V: torch.Tensor, damping: float = 0.0, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Conjugate gradient for (H + damping I) X = V, every column of V (p, T) at once.

    hvp: V (p, T) -> H V. Each iteration costs one (batched) Hessian product. A column stops changing once its
    relative residual is below ``tol``. CG assumes H + damping I is positive definite; where it is not (small
    damping on a non-convex model) a column can blow up: that is the fragility this chapter measures.
    """
    _check_rhs(V, damping)
    X = torch.zeros_like(V)
    R = V.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    target = tol ** 2 * rs.clamp_min(1e-30)
    for _ in range(iters):
        active = rs > target
        if not active.any():
            break
        AP = hvp(P) + damping * P
        pAp = (P * AP).sum(0)
        alpha = torch.where(active, rs / torch.where(pAp == 0, torch.ones_like(pAp), pAp), torch.zeros_like(rs))
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(0)
        beta = torch.where(active, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        P = R + beta * P
        rs = torch.where(active, rs_new, rs)
    grads.check_finite(rs, f"CG solution at damping {damping}: residual norms (the Hessian products are not finite)")
    return _solution(X, "CG", damping)


def solve_lanczos(hvp, V: torch.Tensor, dampings, iters: int = 30) -> dict:
    """Conjugate gradient for MANY dampings at once ("multi-shift CG"), every column of V at once.

    Runs ``iters`` Lanczos steps from each column v of V, building an orthonormal basis Q_k of the Krylov space
    span{v, Hv, ..., H^{k-1} v} and the tridiagonal T_k = Q_k^T H Q_k. Krylov spaces do not change when H is shifted
    by lambda I, so for every damping lambda the CG iterate after k steps is ||v|| Q_k (T_k + lambda I)^{-1} e_1:
    one set of Hessian products serves the whole damping sweep. Full re-orthogonalisation keeps Q_k orthonormal in
    floating point. Returns {damping: X (p, T)}.
    """
    _check_rhs(V)
    for d in dampings:
        _check_rhs(V, d)
    dampings = [float(d) for d in dampings]
    p, T = V.shape
    k = min(iters, p)
    beta0 = V.norm(dim=0)
    Q = torch.zeros(k, p, T, dtype=V.dtype, device=V.device)
    alphas = torch.zeros(k, T, dtype=V.dtype, device=V.device)
    betas = torch.zeros(k, T, dtype=V.dtype, device=V.device)
    q = V / beta0.clamp_min(1e-30)
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(T, dtype=V.dtype, device=V.device)
    steps = 0
    for j in range(k):
        Q[j] = q
        w = hvp(q)
        a = (q * w).sum(0)
        w = w - a * q - b_prev * q_prev
        w = w - torch.einsum("jpt,jt->pt", Q[:j + 1], torch.einsum("jpt,pt->jt", Q[:j + 1], w))  # re-orthogonalise
        b = w.norm(dim=0)
        alphas[j], betas[j] = a, b
        steps = j + 1
        alive = b > 1e-6 * beta0.clamp_min(1e-30) * max(1.0, float(a.abs().max()))
        q_prev, q = q, torch.where(alive, w / b.clamp_min(1e-30), torch.zeros_like(w))
        b = torch.where(alive, b, torch.zeros_like(b))
        betas[j] = b
        b_prev = b
        if not alive.any():
            break
    Tm = torch.diag_embed(alphas[:steps].T.double())
    off = betas[:steps - 1].T.double()
    Tm = Tm + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)  # (T, k, k)
    e1 = torch.zeros(T, steps, 1, dtype=torch.float64, device=V.device)
    e1[:, 0, 0] = beta0.double()
    eye = torch.eye(steps, dtype=torch.float64, device=V.device)
    out = {}
    for lam in dampings:
        y = torch.linalg.solve(Tm + lam * eye, e1)[..., 0].to(V.dtype)  # (T, k)
        out[lam] = _solution(torch.einsum("jpt,tj->pt", Q[:steps], y), "multi-shift CG", lam)
    return out


def solve_lissa(hvp, V: torch.Tensor, damping: float = 0.0, n: int | None = None, depth: int = 1000,
                scale: float = 10.0, batch_size: int = 32, repeats: int = 1, seed: int = 0,
                progress: bool = False) -> torch.Tensor:
    """LiSSA (Agarwal et al. 2017; Koh & Liang's stochastic estimator) for (H + damping I) X = V.

    The Neumann series (A / s)^{-1} = sum_j (I - A / s)^j, with A = H + damping I, run as the recursion
        h_0 = v,    h_j = v + (I - A_j / s) h_{j-1},    X ~= h_depth / s,
    where A_j uses the Hessian of a random minibatch of ``batch_size`` examples (``hvp(V, idx)``, indices below
    ``n``; with n=None the full Hessian is used every step). Converges when ``scale`` s exceeds the largest
    eigenvalue of A and A is positive definite; ``depth`` must be large compared with s / (smallest eigenvalue +
    damping). The result is averaged over ``repeats`` independent runs.
    """
    _check_rhs(V, damping)
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    g = torch.Generator().manual_seed(seed)
    total = torch.zeros_like(V)
    for _ in range(repeats):
        h = V.clone()
        for _ in tqdm(range(depth), disable=not progress, leave=False, desc="LiSSA"):
            idx = None if n is None else torch.randint(0, n, (batch_size,), generator=g)
            h = V + h - (hvp(h, idx) + damping * h) / scale
            if not torch.isfinite(h).all():
                raise FloatingPointError(f"LiSSA diverged: scale={scale} is below the largest eigenvalue of "
                                         f"H + {damping} I; raise the scale")
        total += h / scale
    return total / repeats


# ------------------------------------------------------------------------------------------------------- scores


def influence_from_solution(train_grads: torch.Tensor, X: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """tau = -(1/n) G_train X: (n_train, p) gradients of the training losses, X (p, T) = (H + lambda I)^{-1} grad f.

    The effect of INCLUDING each training example on each target's measured output (see the module docstring).
    n: the number of examples in the training objective (default: the rows of train_grads)."""
    n = len(train_grads) if n is None else n
    return grads.check_finite(-(train_grads @ X) / n, "influence scores")


@dataclass
class Influence:
    """Influence scores and what it took to get them.

    scores: (n_train, T) tau for the first damping (course convention); by_damping: {damping: scores} when a
    sweep was solved at once; seconds: wall time of gradients + solve; hvp_products: (example, vector) Hessian
    products used."""
    scores: torch.Tensor
    by_damping: dict = field(default_factory=dict)
    seconds: float = 0.0
    hvp_products: int = 0


def influence_scores(net, params: dict, x_train, y_train, x_targets, y_targets, *, weight_decay: float,
                     damping=0.01, solver: str = "cg", target_fn: str = "margin", iters: int = 30,
                     hessian_n: int | None = None, train_grads: torch.Tensor | None = None,
                     lissa: dict | None = None, seed: int = 0, batch_size: int = 256) -> Influence:
    """Influence of every training example on every target: tau (n_train, T), course convention.

    tau[i, t] = -(1/n) grad f_t^T (H + damping I)^{-1} grad loss_i, with f_t the target's margin (target_fn=
    "margin") or loss ("loss", Koh & Liang's quantity), and H the Hessian of the training objective (mean loss +
    weight_decay/2 ||theta||^2) at ``params``, over all training examples or a random ``hessian_n`` of them.

    solver: "exact" (explicit Hessian; small models), "cg" (batched conjugate gradient, ``iters`` steps; a list of
    dampings is solved at once by multi-shift CG and returned in ``by_damping``), "lissa" (``lissa`` holds depth,
    scale, batch_size, repeats). train_grads: precomputed (n_train, p) per-example loss gradients, to reuse.
    """
    solvers = ("exact", "cg", "lissa")
    if solver not in solvers:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(solvers)}")
    dampings = list(damping) if isinstance(damping, (list, tuple)) else [damping]
    if solver != "cg" and len(dampings) > 1:
        raise ValueError("several dampings at once need solver='cg' (multi-shift CG)")
    t0 = time.perf_counter()
    params = {k: v.detach() for k, v in params.items()}
    if train_grads is None:
        train_grads = grads.per_example_grads(net, params, x_train, y_train, "loss", batch_size)
    V = grads.per_example_grads(net, params, x_targets, y_targets, target_fn, batch_size).T.contiguous()  # (p, T)
    op = HessianOperator(net, params, x_train, y_train, weight_decay, hessian_n, seed)
    if solver == "exact":
        sols = {dampings[0]: solve_exact(op.dense(), V, dampings[0])}
    elif solver == "lissa":
        kw = {"depth": 1000, "scale": 10.0, "batch_size": 32, "repeats": 1, **(lissa or {})}
        sols = {dampings[0]: solve_lissa(op, V, dampings[0], n=op.n, seed=seed, **kw)}
    elif len(dampings) == 1:
        sols = {dampings[0]: solve_cg(op, V, dampings[0], iters=iters)}
    else:
        sols = solve_lanczos(op, V, dampings, iters=iters)
    by = {d: influence_from_solution(train_grads, X, len(y_train)) for d, X in sols.items()}
    return Influence(by[dampings[0]], by, time.perf_counter() - t0, op.calls)


#: chapter 01's LDS computation of the damped-Hessian influence: its damping grid, and per setting the Krylov steps
#: and the Hessian subsample (chapter 01's `dampings` and `BUDGETS`); chapters 02 and 04 reuse its cached scores
CHAPTER01_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
CHAPTER01_SOLVE = {"smoke": {"iters": 4, "hessian_n": 100}, "cpu": {"iters": 10, "hessian_n": 250}}


def cached_scores(cfg, data, models, *, dampings=None, iters: int | None = None, hessian_n: int | None = None,
                  model: int = 0, cache=None, train_grads: torch.Tensor | None = None,
                  only_cached: bool = False) -> Influence | None:
    """``influence_scores`` of reference model ``model`` for every target and every damping (multi-shift CG over
    the Hessian of a random ``hessian_n`` training examples, ``iters`` Krylov steps), cached on disk.

    The one place chapters 01, 02 and 04 get chapter 01's damped-Hessian scores from: the cache key holds the
    recipe, the model's seed, the data, the dampings and the budget, so a chapter asking for the same computation
    reads it instead of repeating it. Unset arguments take chapter 01's defaults (``CHAPTER01_DAMPINGS``,
    ``CHAPTER01_SOLVE`` of the setting, the ``cpu`` budget for any other setting). ``seconds`` is the time the
    computation took when it ran (without the per-example training gradients when ``train_grads`` is given).
    models: a ``train.Models`` (e.g. ``train.reference_models(cfg, data, n)``). only_cached: return None instead of
    computing when the scores are not on disk (for a chapter that shows them only as a reference)."""
    from .. import cache as cache_mod

    budget = CHAPTER01_SOLVE.get(cfg.name, CHAPTER01_SOLVE["cpu"])
    dampings = [float(d) for d in (CHAPTER01_DAMPINGS if dampings is None else dampings)]
    iters = budget["iters"] if iters is None else iters
    hessian_n = budget["hessian_n"] if hessian_n is None else hessian_n
    spec = {"recipe": cfg.recipe(), "model_seed": int(models.seeds[model]), "n_train": data.n_train,
            "targets": [int(t) for t in data.target_idx], "dampings": dampings, "iters": iters,
            "hessian_n": hessian_n, "seed": cfg.seed, "target_fn": "margin", "v": 1}
    path = cache_mod.cache_dir(cache) / f"influence_{cfg.dataset}_{cache_mod.cache_key(spec)}.pt"
    dev = cfg.torch_device

    def compute():
        res = influence_scores(models.net, models.state_of(model), data.x_train.to(dev), data.y_train.to(dev),
                               data.x_targets.to(dev), data.y_targets.to(dev), weight_decay=cfg.weight_decay,
                               damping=dampings, solver="cg", iters=iters, hessian_n=hessian_n, seed=cfg.seed,
                               train_grads=train_grads)
        return {"scores": [res.by_damping[d].cpu() for d in dampings], "seconds": res.seconds,
                "hvp_products": res.hvp_products}

    if only_cached and not path.exists():
        return None
    out = cache_mod.load_or_compute(path, compute, spec)
    by = dict(zip(dampings, out["scores"]))
    return Influence(by[dampings[0]], by, out["seconds"], out["hvp_products"])


# ------------------------------------------------------------------------- simple alternatives (identity Hessian)


def grad_dot(train_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """-grad loss_i . grad f_t, (n_train, T): the influence with H replaced by the identity (and 1/n dropped).

    Course sign: one SGD step on example i moves f_t by -lr * grad f_t . grad loss_i, so positive = raises f_t."""
    return -(train_grads @ target_grads.T)


def grad_cos(train_grads: torch.Tensor, target_grads: torch.Tensor) -> torch.Tensor:
    """grad_dot with both gradients normalised to unit length (Barshan et al. 2020's fix for large-norm outliers)."""
    a = torch.nn.functional.normalize(train_grads, dim=1)
    b = torch.nn.functional.normalize(target_grads, dim=1)
    return -(a @ b.T)


@torch.no_grad()
def features(net, params: dict, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate-layer representation (the input of ``net.head``), (n, d), via a forward hook, in eval mode.
    params: the model's full state (``Models.state_of``)."""
    net.eval()
    store = []
    hook = net.head.register_forward_hook(lambda m, inp, out: store.append(inp[0].detach()))
    try:
        for xb in x.split(batch_size):
            functional_call(net, params, (xb,))
    finally:
        hook.remove()
    return torch.cat(store)


def representation_similarity(net, params: dict, x_train, x_targets) -> torch.Tensor:
    """Cosine similarity of penultimate-layer features, (n_train, T) (Hanawa et al. 2021's 'representation')."""
    a = torch.nn.functional.normalize(features(net, params, x_train), dim=1)
    b = torch.nn.functional.normalize(features(net, params, x_targets), dim=1)
    return a @ b.T


def identical_class_rate(scores: torch.Tensor, y_train: torch.Tensor, y_pred_targets: torch.Tensor) -> float:
    """Hanawa et al.'s identical-class test: the fraction of targets whose top-1 training example (highest score)
    has the target's PREDICTED class."""
    top = scores.argmax(0)
    return float((y_train[top] == y_pred_targets).float().mean())


# ---------------------------------------------------------------------------------- convex reference retraining


def fit_convex(net, params: dict, x, y, weight_decay: float, weights: torch.Tensor | None = None,
               max_iter: int = 500, tol: float = 1e-10) -> dict:
    """Minimise (1/n) sum_i w_i loss_i + (wd/2) ||theta||^2 with full-batch L-BFGS, starting from ``params``.

    weights: (n,) per-example weights (default 1); weight 0 leaves an example out while keeping the 1/n
    normalisation of the influence derivation. For convex models (logistic regression) this reaches the unique
    minimiser, which is what the influence function's leave-one-out prediction refers to. Returns new params.
    """
    n = len(y)
    w = torch.ones(n, dtype=x.dtype) if weights is None else weights.to(x.dtype)
    names = list(params)
    theta = [params[k].detach().clone().requires_grad_() for k in names]
    opt = torch.optim.LBFGS(theta, lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        p = dict(zip(names, theta))
        from ..measure import loss
        obj = (w * loss(functional_call(net, p, (x,)), y)).sum() / n
        obj = obj + 0.5 * weight_decay * sum((t ** 2).sum() for t in theta)
        obj.backward()
        return obj

    for _ in range(20):  # L-BFGS may stop early on a line search; restart until the gradient is tiny
        opt.step(closure)
        if max(float(t.grad.abs().max()) for t in theta) < tol:
            break
    return {k: t.detach() for k, t in zip(names, theta)}


def logreg_hessian(net, params: dict, x, y, weight_decay: float = 0.0) -> torch.Tensor:
    """Closed-form (p, p) Hessian of ``grads.objective`` for ``models.LogisticRegression``, in the order of
    ``grads.flatten(params)`` (weight rows, then bias).

    With p_i = softmax(W x_i + b) and A_i = diag(p_i) - p_i p_i^T (the Hessian of cross-entropy in the logits), the
    block of classes (c, d) is (1/n) sum_i A_i[c, d] x~_i x~_i^T with x~_i = (x_i, 1). Much cheaper than p HVPs.
    It is the last-layer Hessian of ``surrogate.last_layer_hessian`` with the flattened pixels as features.
    """
    from .surrogate import last_layer_hessian

    return last_layer_hessian(x.flatten(1), params["linear.weight"], params["linear.bias"], weight_decay)


def logreg_example_factor(net, params: dict, x_i: torch.Tensor, n: int) -> torch.Tensor:
    """U (p, C) with U U^T = (1/n) x (the Hessian of example i's loss) for ``models.LogisticRegression``: the term that
    leaving example i out removes from ``logreg_hessian`` (same parameter order)."""
    W, b = params["linear.weight"], params["linear.bias"]
    xa = torch.cat([x_i.flatten(), torch.ones(1, dtype=W.dtype, device=W.device)])
    prob = torch.softmax(W @ xa[:-1] + b, 0)
    A = torch.diag(prob) - torch.outer(prob, prob)
    ev, Q = torch.linalg.eigh(A)
    S = Q @ torch.diag(ev.clamp_min(0).sqrt()) @ Q.T  # A^{1/2}
    C, d = W.shape
    U = torch.zeros(C, d + 1, C, dtype=W.dtype, device=W.device)  # [class, feature, column]
    U[:, :, :] = S[:, None, :] * xa[None, :, None]
    U = torch.cat([U[:, :d].reshape(C * d, C), U[:, d]], 0)  # weight rows then bias, as grads.flatten
    return U / math.sqrt(n)


def fit_newton(net, params: dict, x, y, weight_decay: float, hessian_factor: torch.Tensor,
               weights: torch.Tensor | None = None, downdate: torch.Tensor | None = None, tol: float = 1e-10,
               max_iter: int = 100, strict: bool = True) -> dict:
    """Minimise the same objective as ``fit_convex`` by Newton steps with a FIXED Hessian M, from ``params``.

    M = L L^T - U U^T with L = ``hessian_factor`` (a Cholesky factor of the Hessian near the solution) and U =
    ``downdate`` (p, r) an optional low-rank term removed by the Woodbury identity: for a leave-one-out retrain,
    U = ``logreg_example_factor`` of the removed example makes M the leave-one-out Hessian at the full-data solution,
    so the iteration converges fast. Stops when every gradient entry is below ``tol``; raises if it does not get
    there in ``max_iter`` steps (unless not strict: then it returns where it got to).
    """
    from torch.func import grad as fgrad

    from ..measure import loss

    n = len(y)
    w = torch.ones(n, dtype=x.dtype) if weights is None else weights.to(x.dtype)
    like = {k: v.detach() for k, v in params.items()}

    def objective(flat):
        p = grads.unflatten(flat, like)
        return (w * loss(functional_call(net, p, (x,)), y)).sum() / n + 0.5 * weight_decay * (flat ** 2).sum()

    solve = lambda r: torch.cholesky_solve(r, hessian_factor)
    if downdate is not None:
        HU = solve(downdate)  # (p, r)
        small = torch.linalg.inv(torch.eye(downdate.shape[1], dtype=x.dtype) - downdate.T @ HU)
        base = solve
        solve = lambda r: base(r) + HU @ (small @ (HU.T @ r))  # Woodbury: (LL^T - UU^T)^{-1} r
    g_fn = fgrad(objective)
    theta = grads.flatten(like).clone()
    gmax = float("inf")
    for _ in range(max_iter):
        g = g_fn(theta)
        gmax = float(g.abs().max())
        if gmax < tol:
            return grads.unflatten(theta, like)
        theta = theta - solve(g[:, None])[:, 0]
    if not strict:
        return grads.unflatten(theta, like)
    raise RuntimeError(f"fit_newton did not reach gradient {tol} in {max_iter} steps (last {gmax:.2e})")
