"""Datamodels: attribution by direct estimation (chapter 03).

Train many models on fresh random alpha-subsets S_j of the training pool, record each model's margin on every
target, and fit, per target t, a linear model of the output as a function of the subset indicator 1_S:

    f_t(S) ~ b_t + sum_i w[i, t] 1[i in S].

The weights w[:, t] are the attribution scores (course convention: effect of INCLUDING example i on target t's
margin, positive = raises it). All targets share one design matrix (the masks), so every solver here fits all
T targets at once with batched tensor algebra.

- ``training_data``: the models (a stream of subsets and seeds of its own, "datamodels", never the LDS
  evaluation subsets), cached and resumable like the ground truth; asking for more models later trains only the
  missing ones.
- ``fit_lasso``: L1-regularised least squares by batched proximal gradient (FISTA) over a penalty path, with
  the penalty chosen per target by K-fold cross-validation.
- ``fit_ridge``: L2-regularised least squares in closed form (one eigendecomposition for every penalty and
  target), penalty chosen per target by K-fold cross-validation.
- ``difference_of_means``: mean output over subsets containing i minus the mean over subsets without i.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import retrain
from ..cache import cache_dir, cache_key
from ..data import Data
from ..settings import Setting

STREAM = "datamodels"
FORMAT_VERSION = 2  # 2: parts hold any range of models, whatever the chunk size


# ----------------------------------------------------------------------------------------------- training data
@dataclass
class TrainingData:
    """masks (M, n_train) bool: the subsets; outputs (M, n_test): each model's margins on the whole test split;
    accuracy (M,); seeds (M,); target_idx: the default targets (indices into the test split); seconds: training
    time spent on these M models (summed over all sessions that trained them)."""
    masks: torch.Tensor
    outputs: torch.Tensor
    accuracy: torch.Tensor
    seeds: torch.Tensor
    target_idx: torch.Tensor
    seconds: float
    spec: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.masks)

    def target_outputs(self, targets=None) -> torch.Tensor:
        """(M, T) outputs on the targets (default: the setting's LDS targets)."""
        targets = self.target_idx if targets is None else torch.as_tensor(targets)
        return self.outputs[:, targets]

    def first(self, m: int) -> "TrainingData":
        """The first m models (a smaller budget: the models come in a fixed order, so this is what a run with
        only m models would have trained)."""
        if not 1 <= m <= len(self):
            raise ValueError(f"m must be between 1 and {len(self)}, got {m}")
        return TrainingData(self.masks[:m], self.outputs[:m], self.accuracy[:m], self.seeds[:m], self.target_idx,
                            self.seconds * m / len(self), self.spec)


def training_spec(cfg: Setting) -> dict:
    """Everything that decides the stream of datamodel models (not how many: the stream is a fixed sequence)."""
    return {"version": FORMAT_VERSION, "recipe": cfg.recipe(), "alpha": cfg.alpha, "seed": cfg.seed,
            "stream": STREAM}


def training_masks(cfg: Setting, n_train: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, n_train) masks and (m,) seeds of the first m datamodel models. Drawn from the "datamodels" stream:
    never the LDS evaluation stream, and a prefix of any longer draw (m models today, more later)."""
    masks = retrain.subset_masks(n_train, m, cfg.alpha, cfg.seed, stream=STREAM)
    seeds = retrain.model_seeds(m, 1, cfg.seed, stream=STREAM).flatten()
    return masks, seeds


def training_data(cfg: Setting, data: Data, m: int | None = None, cache=None,
                  progress: bool = True) -> TrainingData:
    """The first ``m`` (default ``cfg.dm_models``) datamodel models: train what is missing, load the rest.

    Models are trained ``cfg.ensemble_size`` at a time and every finished chunk is saved at once, so an
    interrupted run resumes, and a larger m later trains only the new chunks.
    """
    m = cfg.dm_models if m is None else m
    if m < 1:
        raise ValueError(f"m (number of datamodel models) must be at least 1, got {m}")
    masks, seeds = training_masks(cfg, data.n_train, m)
    spec = training_spec(cfg)
    outputs, acc, seconds = retrain.train_outputs(cfg, data, masks, seeds, _folder(cfg, cache),
                                                  f"datamodel models: {m}", progress,
                                                  name=lambda i: f"datamodel model {i}")
    return TrainingData(masks, outputs, acc, seeds, data.target_idx.clone(), seconds, spec)


def cached_models(cfg: Setting, cache=None) -> int:
    """How many datamodel models of this setting's stream are already trained and cached (0 if none): what
    ``training_data`` returns without training anything, for chapters that only reuse chapter 03's models."""
    return retrain.cached_prefix(_folder(cfg, cache))


def _folder(cfg: Setting, cache=None):
    """The cache folder of this setting's stream of datamodel models."""
    return cache_dir(cache) / f"datamodels_{cfg.dataset}_{cache_key(training_spec(cfg))}"


# ----------------------------------------------------------------------------------------------------- fitting
@dataclass
class Fit:
    """A fitted datamodel for T targets.

    weights (n_train, T): the scores (effect of including example i on target t's margin); bias (T,): the
    intercept, so that the predicted output for subset S is bias + sum_{i in S} weights[i]; penalty (T,): the
    penalty chosen per target (None for difference-of-means); penalties (T, L) the grid searched and cv_error
    (T, L) the cross-validated mean squared error on it (the mean over folds), cv_fold_error (folds, T, L) the
    same error on each fold; seconds: wall time of the fit (not of training).
    """
    method: str
    weights: torch.Tensor
    bias: torch.Tensor
    seconds: float
    penalty: torch.Tensor | None = None
    penalties: torch.Tensor | None = None
    cv_error: torch.Tensor | None = None
    iterations: int = 0
    cv_fold_error: torch.Tensor | None = None

    def predict(self, masks) -> torch.Tensor:
        """(m, T) predicted outputs for subsets given as (m, n_train) masks."""
        return torch.as_tensor(masks).to(self.weights) @ self.weights + self.bias

    def sparsity(self) -> torch.Tensor:
        """(T,) fraction of exactly-zero weights per target."""
        return (self.weights == 0).double().mean(0)


def _check_xy(masks, outputs):
    X = torch.as_tensor(masks)
    Y = torch.as_tensor(outputs)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"need masks (m, n_train) and outputs (m, T) with the same m, got {tuple(X.shape)} and "
                         f"{tuple(Y.shape)}")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 models to fit a datamodel, got {X.shape[0]}")
    if not torch.isfinite(Y).all():
        raise ValueError("outputs contain NaN or infinite values")
    return X, Y


def difference_of_means(masks, outputs) -> Fit:
    """tau[i, t] = mean of outputs[:, t] over subsets containing i - mean over subsets without i.

    The empirical-influence estimator in the style of Feldman & Zhang (2020), from the same models as the
    regression. An example that is in every subset (or in none) gets 0.
    """
    t0 = time.perf_counter()
    X, Y = _check_xy(masks, outputs)
    X, Y = X.double(), Y.double()
    n_in = X.sum(0)[:, None]
    n_out = X.shape[0] - n_in
    s_in = X.T @ Y
    s_out = Y.sum(0) - s_in
    ok = (n_in > 0) & (n_out > 0)
    tau = torch.where(ok, s_in / n_in.clamp(min=1) - s_out / n_out.clamp(min=1), torch.zeros(()).double())
    bias = Y.mean(0) - X.mean(0) @ tau
    return Fit("difference of means", tau.float(), bias.float(), time.perf_counter() - t0)


def _folds(m: int, k: int, seed: int) -> list[torch.Tensor]:
    if not 2 <= k <= m:
        raise ValueError(f"cv folds must be between 2 and the number of models {m}, got {k}")
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    return list(perm.tensor_split(k))


class _Quadratic:
    """The smooth part of the centred least-squares problem, 1/(2m) ||Yc - Xc W||^2, for all targets at once.

    Uses the Gram form (G = Xc^T Xc / m, c = Xc^T Yc / m) when that is cheaper than two products with Xc.
    """

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, gram: torch.Tensor | None = None):
        self.m, self.n = X.shape
        self.x_mean, self.y_mean = X.mean(0), Y.mean(0)
        Xc, Yc = X - self.x_mean, Y - self.y_mean
        self.c = Xc.T @ Yc / self.m
        self.use_gram = gram is not None or 2 * self.m > self.n
        if self.use_gram:
            if gram is None:
                gram = X.T @ X
            # centred Gram from the raw one: X^T X - m xbar xbar^T
            self.G = (gram - self.m * torch.outer(self.x_mean, self.x_mean)) / self.m
        else:
            self.Xc = Xc
        self.lipschitz = self._top_eigenvalue() * 1.05

    def matvec(self, W):
        if self.use_gram:
            return self.G @ W
        return self.Xc.T @ (self.Xc @ W) / self.m

    def grad(self, W):
        return self.matvec(W) - self.c

    def _top_eigenvalue(self, iters: int = 40, block: int = 16) -> float:
        # subspace iteration + Rayleigh-Ritz: the top Ritz value approaches the largest eigenvalue from below, so
        # the caller adds a margin (proximal gradient with adaptive restart tolerates a slightly long step)
        g = torch.Generator().manual_seed(0)
        V = torch.randn(self.n, block, generator=g, dtype=self.c.dtype).to(self.c.device)
        for _ in range(iters):
            V = torch.linalg.qr(self.matvec(V)).Q
        lam = float(torch.linalg.eigvalsh(V.T @ self.matvec(V)).max())
        return max(lam, 1e-12)


def _soft(x, thr):
    return torch.sign(x) * (x.abs() - thr).clamp(min=0)


def _fista(q: _Quadratic, lam: torch.Tensor, W0: torch.Tensor, max_iter: int, tol: float, cols=None):
    """min_W 1/(2m)||Yc - Xc W||^2 + sum_t lam[t] ||W[:, t]||_1 by FISTA with per-target adaptive restart,
    for the targets ``cols`` (default: all). A target that has converged leaves the batch, so the products
    shrink as targets finish. Returns W (n, len(cols)) and the iterations used."""
    c = q.c if cols is None else q.c[:, cols]
    step = 1.0 / q.lipschitz
    out = W0.clone()
    live = torch.arange(out.shape[1], device=out.device)  # targets still iterating
    thr = lam * step
    W, Z = out.clone(), out.clone()
    t = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    it = 0
    for it in range(1, max_iter + 1):
        W_new = _soft(Z - step * (q.matvec(Z) - c), thr)
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        D = W_new - W
        # restart the momentum of targets whose last step went uphill (O'Donoghue & Candes 2015)
        restart = ((Z - W_new) * D).sum(0) > 0
        beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        Z = W_new + beta * D
        W = W_new
        if it % 10 == 0:
            done = D.abs().amax(0) <= tol * W.abs().amax(0).clamp(min=1e-12)
            if bool(done.any()):
                out[:, live[done]] = W[:, done]
                keep = ~done
                live, W, Z, t, c, thr = live[keep], W[:, keep], Z[:, keep], t[keep], c[:, keep], thr[keep]
                if len(live) == 0:
                    break
    out[:, live] = W
    return out, it


def _lasso_grid(q: _Quadratic, n_penalties: int, eps: float) -> torch.Tensor:
    """(T, L) per-target penalties from lam_max (all weights zero) down to eps * lam_max, log-spaced."""
    lam_max = q.c.abs().amax(0).clamp(min=1e-12)
    ratios = torch.logspace(0, math.log10(eps), n_penalties, dtype=q.c.dtype, device=q.c.device)
    return lam_max[:, None] * ratios[None, :]


@contextmanager
def _few_threads_if_small(work: float):
    """Small products gain nothing from threads and lose much to them on a busy machine: use one thread."""
    before = torch.get_num_threads()
    if work < 5e7:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_lasso(masks, outputs, penalties=None, n_penalties: int = 10, eps: float = 1e-2, cv: int = 3,
              seed: int = 0, patience: int | None = 2, max_iter: int = 200, tol: float = 1e-3, device=None,
              dtype=torch.float32) -> Fit:
    """LASSO datamodels for all targets at once, the penalty chosen per target by ``cv``-fold cross-validation.

    Objective per target (the scikit-learn convention): 1/(2m) ||y - b - X w||^2 + lam ||w||_1, with an
    unpenalised intercept b. Solved by batched FISTA along a path of penalties (largest first, warm-started) on
    every training fold in lockstep; the penalty with the smallest mean validation error is refitted on all m
    models. ``patience``: a target leaves the path once its validation error has not improved for that many
    penalties (None: walk the whole path, as scikit-learn's LassoCV does); penalties it never reached get
    cv_error NaN. ``tol``: stop a solve when no weight moves by more than tol times the largest weight.

    masks (m, n_train) bool, outputs (m, T). penalties: (L,) or (T, L) grid, default ``n_penalties`` values per
    target from the penalty that zeros every weight down to ``eps`` times it.
    """
    X, Y = _check_xy(masks, outputs)
    with _few_threads_if_small(X.shape[1] * min(X.shape) * Y.shape[1]):
        return _fit_lasso(X, Y, penalties, n_penalties, eps, cv, seed, patience, max_iter, tol, device, dtype)


def _fit_lasso(X, Y, penalties, n_penalties, eps, cv, seed, patience, max_iter, tol, device, dtype):
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    X, Y = X.to(dev, dtype), Y.to(dev, dtype)
    m, n = X.shape
    T = Y.shape[1]
    full = _Quadratic(X, Y)
    if penalties is None:
        lams = _lasso_grid(full, n_penalties, eps)
    else:
        lams = torch.as_tensor(penalties, dtype=dtype, device=dev)
        lams = lams.expand(T, -1) if lams.ndim == 1 else lams
        if lams.shape[0] != T or not (lams >= 0).all() or not torch.isfinite(lams).all():
            raise ValueError(f"penalties must be finite and non-negative, shape (L,) or ({T}, L), got "
                             f"{tuple(lams.shape)}: {lams.flatten()[:5].tolist()}...")
        lams = lams.sort(1, descending=True).values
    L = lams.shape[1]
    iters = 0
    errors = torch.full((T, L), float("inf"), dtype=dtype, device=dev)
    fold_errors = torch.full((cv, T, L), float("inf"), dtype=dtype, device=dev)
    if L > 1:
        raw_gram = X.T @ X if full.use_gram else None
        folds = []
        for fold in _folds(m, cv, seed):
            held = torch.zeros(m, dtype=torch.bool, device=dev)
            held[fold.to(dev)] = True
            gram = raw_gram - X[held].T @ X[held] if full.use_gram else None
            folds.append((_Quadratic(X[~held], Y[~held], gram), held, torch.zeros(n, T, dtype=dtype, device=dev)))
        active = torch.ones(T, dtype=torch.bool, device=dev)
        for l in range(L):
            cols = active.nonzero().flatten()
            if len(cols) == 0:
                break
            for j, (q, held, W) in enumerate(folds):
                Wc, it = _fista(q, lams[cols, l], W[:, cols], max_iter, tol, cols)
                W[:, cols] = Wc
                iters += it
                b = q.y_mean[cols] - q.x_mean @ Wc
                fold_errors[j, cols, l] = ((X[held] @ Wc + b - Y[held][:, cols]) ** 2).mean(0)
            errors[cols, l] = sum(fold_errors[j, cols, l] / cv for j in range(cv))  # the mean, summed as before
            if patience is not None:
                active &= (l - errors[:, :l + 1].argmin(1)) < patience
        best = errors.argmin(1)
    else:
        best = torch.zeros(T, dtype=torch.long, device=dev)
    chosen = lams.gather(1, best[:, None]).squeeze(1)
    # refit on everything: walk the path down to each target's chosen penalty (warm starts)
    W = torch.zeros(n, T, dtype=dtype, device=dev)
    for l in range(int(best.max()) + 1):
        cols = (best >= l).nonzero().flatten()
        W[:, cols], it = _fista(full, lams[cols, l], W[:, cols], max_iter, tol, cols)
        iters += it
    bias = full.y_mean - full.x_mean @ W
    cv_error = torch.where(torch.isinf(errors), torch.nan, errors).cpu() if L > 1 else None
    cv_fold_error = torch.where(torch.isinf(fold_errors), torch.nan, fold_errors).cpu() if L > 1 else None
    return Fit("lasso", W.cpu().float(), bias.cpu().float(), time.perf_counter() - t0, chosen.cpu(), lams.cpu(),
               cv_error, iters, cv_fold_error)


def _thin_svd(A: torch.Tensor):
    """Thin SVD of A (m, n) through the eigendecomposition of the smaller Gram matrix (faster than a full SVD
    on a CPU); singular values below 1e-10 of the largest are dropped (the centred masks are rank-deficient)."""
    m, n = A.shape
    if m <= n:
        e, U = torch.linalg.eigh(A @ A.T)
        keep = e > e.max() * 1e-10
        s = e[keep].sqrt()
        U = U[:, keep]
        Vh = (A.T @ U / s).T
    else:
        e, V = torch.linalg.eigh(A.T @ A)
        keep = e > e.max() * 1e-10
        s = e[keep].sqrt()
        V = V[:, keep]
        U = A @ V / s
        Vh = V.T
    return U, s, Vh


def fit_ridge(masks, outputs, penalties=None, device=None, dtype=torch.float64) -> Fit:
    """Ridge datamodels for all targets at once, the penalty chosen per target by exact leave-one-out CV.

    Objective per target (scikit-learn's Ridge): ||y - b - X w||^2 + lam ||w||^2, unpenalised intercept b.
    One thin SVD of the centred masks, Xc = U diag(s) V^T, gives every penalty's solution
    w = V diag(s / (s^2 + lam)) U^T yc and hat matrix H = 11^T/m + U diag(s^2 / (s^2 + lam)) U^T, so the
    leave-one-out residuals are e_j / (1 - H_jj) without refitting. penalties: (L,) grid, default log-spaced
    around the spectrum of Xc^T Xc.
    """
    t0 = time.perf_counter()
    X, Y = _check_xy(masks, outputs)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    X, Y = X.to(dev, dtype), Y.to(dev, dtype)
    m = X.shape[0]
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    U, s, Vh = _thin_svd(Xc)
    if penalties is None:
        mid = float((s ** 2).median())
        lams = mid * torch.logspace(-2, 3, 16, dtype=dtype, device=dev)
    else:
        lams = torch.as_tensor(penalties, dtype=dtype, device=dev).flatten()
        if not (lams > 0).all() or not torch.isfinite(lams).all():
            raise ValueError(f"ridge penalties must be finite and positive, got {lams.tolist()}")
    UtY = U.T @ Yc  # (r, T)
    s2 = s ** 2
    errors = torch.empty(len(lams), Y.shape[1], dtype=dtype, device=dev)
    for l, lam in enumerate(lams):
        shrink = s2 / (s2 + lam)  # (r,)
        fitted = U @ (shrink[:, None] * UtY)  # centred fitted values
        h = 1.0 / m + (U ** 2) @ shrink  # (m,) diagonal of the hat matrix
        errors[l] = (((Yc - fitted) / (1 - h)[:, None]) ** 2).mean(0)
    best = errors.argmin(0)
    chosen = lams[best]
    coef = s[:, None] / (s2[:, None] + chosen[None, :])  # (r, T)
    W = Vh.T @ (coef * UtY)
    bias = y_mean - x_mean @ W
    return Fit("ridge", W.cpu().float(), bias.cpu().float(), time.perf_counter() - t0, chosen.cpu(),
               lams.cpu().expand(Y.shape[1], -1), errors.T.cpu())


def fit(method: str, td_or_masks, outputs=None, **kw) -> Fit:
    """Fit ``method`` ("lasso", "ridge" or "dom") on TrainingData (its LDS targets) or on masks and outputs."""
    if isinstance(td_or_masks, TrainingData):
        masks, outputs = td_or_masks.masks, td_or_masks.target_outputs()
    else:
        masks = td_or_masks
    fns = {"lasso": fit_lasso, "ridge": fit_ridge, "dom": difference_of_means}
    if method not in fns:
        raise ValueError(f"unknown datamodel method {method!r}; valid: {', '.join(fns)}")
    return fns[method](masks, outputs, **kw)


# ------------------------------------------------------------------------------------------------ chapter 03 helpers
def keep_largest(weights, k) -> torch.Tensor:
    """weights (n_train, T) with all but the ``k`` largest absolute weights of each target set to 0.

    k: an int for every target, or a (T,) integer tensor, one count per target (e.g. how many weights the LASSO
    kept for it), each between 0 and n_train. Chapter 03 cuts the dense estimators to the LASSO's count this way,
    to ask whether their many small weights carry signal or noise. Ties at the cut are kept in ``torch.sort``'s
    order."""
    W = torch.as_tensor(weights)
    if W.ndim != 2:
        raise ValueError(f"weights must have shape (n_train, T), got {tuple(W.shape)}")
    n, T = W.shape
    k = torch.as_tensor(k)
    if k.is_floating_point() or k.dtype == torch.bool or k.ndim > 1 or (k.ndim == 1 and len(k) != T):
        raise ValueError(f"k must be an int or a ({T},) integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
    k = torch.broadcast_to(k.long(), (T,)).to(W.device)
    if not bool(((k >= 0) & (k <= n)).all()):
        raise ValueError(f"every k must lie between 0 and n_train = {n}, got {k.min().item()}..{k.max().item()}")
    rank = W.abs().argsort(dim=0, descending=True, stable=True).argsort(dim=0)  # (n, T): 0 = the target's largest |weight|
    return torch.where(rank < k[None, :], W, torch.zeros_like(W))
