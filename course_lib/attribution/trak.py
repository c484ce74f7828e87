"""TRAK (Park et al. 2023): attribute a network through a random projection of its linearization.

The three steps of the course text, one function each:

1. ``featurize``: the features of an example are the gradient of the model output at the trained parameters,
   ``phi(z) = grad_theta f(z; theta*)``, with f the margin (the log-odds of the correct class, ``log p / (1 - p)``).
   Near theta* the network behaves like the linear model ``f(z; theta) ~ f(z; theta*) + phi(z) . (theta - theta*)``
   (the empirical NTK view). Gradients are per example, computed with ``torch.func`` in batches.
2. ``RandomProjection``: phi is p-dimensional (p = number of parameters); a random matrix P (p, k) with i.i.d.
   Gaussian or Rademacher entries scaled by 1/sqrt(k) keeps inner products in expectation (Johnson-Lindenstrauss).
   P is generated in row blocks from a seed, so the whole (p, k) matrix never has to be in memory.
3. ``glm_influence``: the influence function of the resulting logistic-regression-like GLM, one Newton step with
   the Gauss-Newton Hessian replaced by the plain kernel:
   ``tau[i, t] = phi_t (Phi^T Phi + lambda I)^{-1} phi_i * Q_i`` with ``Q_i = 1 - p_i(correct class)``
   (``-dloss/dmargin`` of training example i).

``trak`` runs the three steps for each of M models and ensembles them as the paper does: the kernel scores are
averaged over models, then multiplied by the model-averaged Q. Scores follow the course convention:
``scores[i, t]`` (n_train, n_targets) is the effect of INCLUDING train example i on target t's margin.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .. import grads as G
from .. import measure
from ..train import Models

PROJECTIONS = ("rademacher", "gaussian", "identity")
Q_MODES = ("mean", "per_model", "none")


class RandomProjection:
    """A seeded random matrix P (p, k) with i.i.d. entries N(0, 1/k) ('gaussian') or +-1/sqrt(k) ('rademacher'),
    or the identity (k = p, for tests and small models). ``E[P P^T] = I``, so ``<P^T a, P^T b>`` estimates
    ``<a, b>`` without bias.

    P is made of tiles of ``TILE`` rows; tile j comes from its own generator seeded by (seed, j), so P does not
    depend on how it is generated: ``project`` streams it in blocks of ``block_rows`` rows (a multiple of TILE)
    and never needs the whole matrix at once. When the whole matrix fits in ``max_bytes`` it is made once and kept.
    """

    TILE = 1024

    def __init__(self, p: int, k: int, kind: str = "rademacher", seed: int = 0, block_rows: int = 8192,
                 dtype=torch.float32, device="cpu", max_bytes: int = 2 ** 28):
        if kind not in PROJECTIONS:
            raise ValueError(f"unknown projection {kind!r}; valid: {', '.join(PROJECTIONS)}")
        if kind == "identity" and k != p:
            raise ValueError(f"the identity projection needs k == p, got k={k}, p={p}")
        if p < 1 or k < 1 or block_rows < 1:
            raise ValueError(f"need p, k, block_rows >= 1, got p={p}, k={k}, block_rows={block_rows}")
        self.p, self.k, self.kind, self.seed = int(p), int(k), kind, int(seed)
        self.block_rows = -(-int(block_rows) // self.TILE) * self.TILE
        self.dtype, self.device = dtype, torch.device(device)
        self._full = None
        if kind != "identity" and p * k * torch.finfo(dtype).bits // 8 <= max_bytes:
            self._full = self.matrix()

    @property
    def num_blocks(self) -> int:
        return -(-self.p // self.block_rows)

    def _tile(self, j: int) -> torch.Tensor:
        rows = min(self.TILE, self.p - j * self.TILE)
        g = torch.Generator().manual_seed(zlib.crc32(f"trak-projection:{self.seed}:{j}".encode()))
        z = torch.randn(rows, self.k, generator=g, dtype=self.dtype)
        if self.kind == "rademacher":  # the sign of a Gaussian is a fair +-1 (>= 0 so that no entry is 0)
            z = torch.where(z >= 0, 1.0, -1.0).to(self.dtype)
        return z.div_(self.k ** 0.5)

    def block(self, b: int) -> torch.Tensor:
        """Rows [b * block_rows, (b + 1) * block_rows) of P, shape (rows, k), regenerated from the seed."""
        lo, hi = b * self.block_rows, min(self.p, (b + 1) * self.block_rows)
        if self.kind == "identity":
            return torch.eye(self.p, dtype=self.dtype, device=self.device)[lo:hi]
        tiles = range(lo // self.TILE, -(-hi // self.TILE))
        return torch.cat([self._tile(j) for j in tiles]).to(self.device)

    def matrix(self) -> torch.Tensor:
        """The whole (p, k) matrix (only for matrices that fit in memory)."""
        if self._full is not None:
            return self._full
        return torch.cat([self.block(b) for b in range(self.num_blocks)])

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """(n, p) -> (n, k): ``g @ P``, accumulated block by block unless P is kept whole."""
        if g.shape[-1] != self.p:
            raise ValueError(f"features have {g.shape[-1]} columns, the projection expects p={self.p}")
        G.check_finite(g, "features to project")
        g = g.to(self.dtype)
        if self.kind == "identity":
            out = g.clone()
        elif self._full is not None:
            out = g @ self._full
        else:
            out = torch.zeros(g.shape[0], self.k, dtype=self.dtype, device=g.device)
            for b in range(self.num_blocks):
                out.addmm_(g[:, b * self.block_rows:(b + 1) * self.block_rows], self.block(b))
        # e.g. float16 overflows to inf past 65504: an error here, not a silent inf in every later score
        return G.check_finite(out, f"projected features ({self.dtype})")


def featurize(net, params: dict, x, y, projection: RandomProjection | None = None, fn: str = "margin",
              batch_size: int = 256, chunk: int = 2048) -> torch.Tensor:
    """(n, k) projected per-example gradients of ``fn`` (default: the margin) at ``params``.

    Gradients are computed ``chunk`` examples at a time (``batch_size`` per vmap call) and projected at once, so
    only a (chunk, p) block of raw gradients is ever in memory. ``projection=None`` keeps the raw (n, p) gradients.
    """
    out = []
    for xc, yc in zip(x.split(chunk), y.split(chunk)):
        g = G.per_example_grads(net, params, xc, yc, fn=fn, batch_size=batch_size)
        out.append(g if projection is None else projection.project(g))
    return torch.cat(out)


@torch.no_grad()
def out_to_loss(net, params: dict, x, y, batch_size: int = 1000) -> torch.Tensor:
    """(n,) Q = 1 - p(correct class) = sigmoid(-margin): minus the derivative of the cross-entropy with respect to
    the margin, for the model with full state ``params`` (``Models.state_of``) in eval mode. Computed from the margin, because 1 - p rounds to exactly 0 in float32 once p > 1 - 6e-8."""
    from torch.func import functional_call

    net.eval()
    return torch.cat([torch.sigmoid(-measure.margin(functional_call(net, params, (xb,)), yb))
                      for xb, yb in zip(x.split(batch_size), y.split(batch_size))])


def kernel_solve(phi_train: torch.Tensor, phi_targets: torch.Tensor, damping: float = 1.0,
                 relative: bool = True) -> torch.Tensor:
    """(n, T) ``Phi_train (Phi_train^T Phi_train + lambda I)^{-1} Phi_targets^T``, solved in float64.

    lambda = damping * trace(K) / k when ``relative`` (scale-free: a fraction of the mean eigenvalue of the
    kernel K = Phi^T Phi), else damping itself. lambda must be positive: the kernel is singular whenever k > n or
    the features are rank deficient (e.g. batch-summed gradients or duplicated examples). The default 1.0
    (lambda = the mean eigenvalue) is far from "tiny": on the cpu setting (n = 4,000) LDS is best around 1-10 and
    several times lower at 1e-3, because the few large eigenvalues dominate the mean while the many small ones
    amplify noise; chapter 06 shows the sweep. Large damping tends to gradient similarity (K -> lambda I).

    Exact and finite for EVERY positive lambda, in float64. When lambda >= ``CHOLESKY_FLOOR`` * trace(K) the
    damped kernel is well conditioned and a Cholesky solve is accurate to about 1e-7 relative (its round-off
    grows like (lambda_max / lambda)^1.5 * eps); below that floor (where Cholesky loses digits, then fails
    outright near 1e-16) the thin SVD Phi_train = U diag(s) V^T gives U diag(s / (s^2 + lambda)) V^T Phi_targets^T,
    with singular values below the numerical-rank tolerance max(n, k) * eps * s_max treated as the exact zeros
    they are (the null space that the damping exists for), as ``numpy.linalg.pinv`` does. The SVD costs about
    20-30x the Cholesky path on the cpu setting's (4,000 x 2,048) features.
    Raises ValueError on a non-positive or non-finite damping and on all-zero features, FloatingPointError on
    non-finite features.
    """
    return kernel_solve_dampings(phi_train, phi_targets, [damping], relative)[damping]


def kernel_solve_dampings(phi_train: torch.Tensor, phi_targets: torch.Tensor, dampings, relative: bool = True) -> dict:
    """``kernel_solve`` for several dampings from one SVD: {damping: (n, T) scores}."""
    dampings = list(dampings)
    for d in dampings:
        if not (isinstance(d, (int, float)) and d > 0 and math.isfinite(d)):
            raise ValueError(f"damping must be a finite positive number (got {d!r}): the undamped kernel "
                             "Phi^T Phi can be singular, and inverting it gives meaningless scores")
    if phi_train.ndim != 2 or phi_targets.ndim != 2 or phi_train.shape[1] != phi_targets.shape[1]:
        raise ValueError(f"need features (n, k) and (T, k), got {tuple(phi_train.shape)} and "
                         f"{tuple(phi_targets.shape)}")
    G.check_finite(phi_train, "training features")
    G.check_finite(phi_targets, "target features")
    a, b = phi_train.double(), phi_targets.double()
    trace = (a ** 2).sum()
    if not trace > 0:
        raise ValueError("the training features are all zero: nothing to attribute")
    k = a.shape[1]
    n = a.shape[0]
    # the smaller of the kernel A^T A (k x k) and the Gram matrix A A^T (n x n): A (A^T A + lam I)^{-1} B^T equals
    # (A A^T + lam I)^{-1} A B^T (push-through identity), and the two have the same nonzero eigenvalues
    gram = None
    out, svd = {}, None
    for d in dampings:
        lam = d * trace / k if relative else torch.tensor(float(d), dtype=torch.float64)
        if lam >= CHOLESKY_FLOOR * trace:
            if gram is None:
                gram = a.T @ a if k <= n else a @ a.T
            chol = torch.linalg.cholesky(gram + lam * torch.eye(len(gram), dtype=torch.float64, device=a.device))
            out[d] = a @ torch.cholesky_solve(b.T, chol) if k <= n else torch.cholesky_solve(a @ b.T, chol)
        else:
            if svd is None:
                U, sv, Vh = torch.linalg.svd(a, full_matrices=False)
                keep = sv > max(a.shape) * torch.finfo(torch.float64).eps * sv[0]
                svd = U[:, keep], sv[keep], Vh[keep] @ b.T  # (n, r), (r,), (r, T)
            U, sv, proj = svd
            out[d] = U @ ((sv / (sv ** 2 + lam))[:, None] * proj)
        out[d] = out[d].to(phi_train.dtype)
    return out


CHOLESKY_FLOOR = 1e-6  # lambda / trace(K) above which the Cholesky solve is accurate to about 1e-7


def glm_influence(phi_train, phi_targets, q, damping: float = 1.0, relative: bool = True) -> torch.Tensor:
    """(n, T) TRAK scores of one model: ``phi_t (Phi^T Phi + lambda I)^{-1} phi_i * Q_i``."""
    return kernel_solve(phi_train, phi_targets, damping, relative) * q[:, None].to(phi_train.dtype)


def soft_threshold(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Shrink each target's scores toward zero: ``sign(s) max(|s| - c_t, 0)`` with c_t the ``sparsity``
    quantile of that target's |scores|, so about that fraction of the scores of each target become zero."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    c = scores.abs().quantile(sparsity, dim=0, keepdim=True)
    return scores.sign() * (scores.abs() - c).clamp_min(0)


@dataclass
class TrakResult:
    """kernel_scores (M, n, T): ``phi_t K^{-1} phi_i`` of each model; q (M, n): 1 - p(correct) of each model;
    seconds (M,): featurize + solve time of each model; grad_seconds, project_seconds (M,) its parts."""
    kernel_scores: torch.Tensor
    q: torch.Tensor
    seconds: torch.Tensor
    grad_seconds: torch.Tensor
    project_seconds: torch.Tensor

    def scores(self, m: int | None = None, q: str = "mean", sparsity: float | None = None) -> torch.Tensor:
        """(n, T) scores ensembled over the first m models (all by default).

        q='mean' (the paper): mean over models of the kernel scores, times the mean over models of Q;
        'per_model': mean over models of (kernel scores * that model's Q); 'none': drop Q (an ablation).
        """
        m = len(self.q) if m is None else m
        if not 1 <= m <= len(self.q):
            raise ValueError(f"m must lie in 1..{len(self.q)}, got {m}")
        ks, qs = self.kernel_scores[:m], self.q[:m]
        if q == "mean":
            out = ks.mean(0) * qs.mean(0)[:, None]
        elif q == "per_model":
            out = (ks * qs[:, :, None]).mean(0)
        elif q == "none":
            out = ks.mean(0)
        else:
            raise ValueError(f"unknown q mode {q!r}; valid: {', '.join(Q_MODES)}")
        return out if sparsity is None else soft_threshold(out, sparsity)

    def time(self, m: int | None = None) -> float:
        """Seconds spent on the first m models."""
        return float(self.seconds[: len(self.q) if m is None else m].sum())

    def to_dict(self) -> dict:
        """The fields as a dict of tensors (what the cache stores; loads with ``weights_only=True``)."""
        return dict(vars(self))

    @staticmethod
    def from_dict(d: dict) -> "TrakResult":
        return TrakResult(**d)

    @staticmethod
    def concat(parts: list["TrakResult"]) -> "TrakResult":
        """The models of several results, in order (e.g. a sweep's first models and the rest)."""
        return TrakResult(**{f: torch.cat([getattr(r, f) for r in parts]) for f in vars(parts[0])})


def trak(models: Models, x_train, y_train, x_targets, y_targets, proj_dim: int = 2048, kind: str = "rademacher",
         seed: int = 0, damping: float = 1.0, fn: str = "margin", batch_size: int = 256, chunk: int = 2048,
         progress: bool = True) -> TrakResult:
    """TRAK over every model in ``models`` (trained on the whole pool: ``train.reference_models``).

    Model m gets its own projection (seed + m), shared by its training and target features. Returns a
    ``TrakResult``; ``.scores()`` gives the (n_train, n_targets) ensembled scores in the course convention.
    ``kind='identity'`` skips the projection (k = p).
    """
    swept = trak_sweep(models, x_train, y_train, x_targets, y_targets, [proj_dim], kind, seed, damping, fn,
                       batch_size, chunk, progress)
    return next(iter(swept.values()))


def trak_sweep(models: Models, x_train, y_train, x_targets, y_targets, proj_dims=(2048,), kind: str = "rademacher",
               seed: int = 0, damping: float = 1.0, fn: str = "margin", batch_size: int = 256, chunk: int = 2048,
               progress: bool = True) -> dict:
    """``trak`` for several projection dimensions at once: {k: TrakResult}. The per-example gradients of each
    model are computed once and projected to every k; each k's seconds count the gradients, its own projection
    and its solve, i.e. what running ``trak`` with that k alone costs."""
    swept = _sweep(models, x_train, y_train, x_targets, y_targets, proj_dims, [damping], kind, seed, fn, batch_size,
                   chunk, progress)
    return {k: by_damping[damping] for k, by_damping in swept.items()}


def trak_dampings(models: Models, x_train, y_train, x_targets, y_targets, dampings, proj_dim: int = 2048,
                  kind: str = "rademacher", seed: int = 0, fn: str = "margin", batch_size: int = 256,
                  chunk: int = 2048, progress: bool = True) -> dict:
    """``trak`` for several dampings at once, for choosing the damping per number of models M: {damping:
    TrakResult}, where ``result.scores(m=M)`` is the ensemble of the first M models at that damping. Each model's
    per-example gradients are computed and projected once; only the kernel is re-solved per damping
    (``kernel_solve_dampings``), and every model's kernel scores are kept for every damping (M x n x T each:
    mind the memory). A model's seconds count its gradients, its projection and the solves of EVERY damping (what
    choosing among them costs), so they are the same in every result."""
    swept = _sweep(models, x_train, y_train, x_targets, y_targets, [proj_dim], dampings, kind, seed, fn, batch_size,
                   chunk, progress)
    return next(iter(swept.values()))


def _sweep(models: Models, x_train, y_train, x_targets, y_targets, proj_dims, dampings, kind, seed, fn, batch_size,
           chunk, progress) -> dict:
    """{k: {damping: TrakResult}}: each model's gradients computed once, projected to every k, each k's kernel solved
    for every damping. A (k, damping) result's seconds count the gradients, that k's projection and its solves."""
    p = sum(v[0].numel() for v in models.params.values())
    if kind == "identity":
        proj_dims = [p]
    proj_dims, dampings = [int(k) for k in proj_dims], list(dampings)
    n = len(y_train)
    x_all, y_all = torch.cat([x_train, x_targets]), torch.cat([y_train, y_targets])
    out = {k: {"ks": {d: [] for d in dampings}, "qs": [], "secs": [], "gsecs": [], "psecs": []} for k in proj_dims}
    for m in tqdm(range(len(models)), desc=f"TRAK k={proj_dims}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        params = models.state_of(m)  # parameters and buffers: the trained model as it is evaluated
        dtype = next(iter(params.values())).dtype
        q = out_to_loss(models.net, params, x_train, y_train)
        t_q = time.perf_counter() - t0
        projs = {}
        t_proj = dict.fromkeys(proj_dims, 0.0)
        for k in proj_dims:
            t1 = time.perf_counter()
            projs[k] = RandomProjection(p, k, kind, seed=seed + m, dtype=dtype, device=x_train.device)
            t_proj[k] += time.perf_counter() - t1
        feats, t_grad = {k: [] for k in proj_dims}, 0.0
        for xc, yc in zip(x_all.split(chunk), y_all.split(chunk)):
            t1 = time.perf_counter()
            g = G.per_example_grads(models.net, params, xc, yc, fn=fn, batch_size=batch_size)
            t_grad += time.perf_counter() - t1
            for k in proj_dims:
                t1 = time.perf_counter()
                feats[k].append(projs[k].project(g))
                t_proj[k] += time.perf_counter() - t1
            del g
        for k in proj_dims:
            t1 = time.perf_counter()
            phi = torch.cat(feats[k])
            solved = kernel_solve_dampings(phi[:n], phi[n:], dampings)
            r = out[k]
            for d in dampings:
                r["ks"][d].append(solved[d])
            r["qs"].append(q)
            r["secs"].append(t_q + t_grad + t_proj[k] + time.perf_counter() - t1)
            r["gsecs"].append(t_grad)
            r["psecs"].append(t_proj[k])
        del feats, projs
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return {k: {d: TrakResult(torch.stack(r["ks"][d]), torch.stack(r["qs"]), t(r["secs"]), t(r["gsecs"]),
                              t(r["psecs"])) for d in dampings} for k, r in out.items()}


def trak_damping_sweep(models: Models, x_train, y_train, x_targets, y_targets, proj_dims, dampings,
                       kind: str = "rademacher", seed: int = 0, fn: str = "margin", batch_size: int = 256,
                       chunk: int = 2048, progress: bool = True) -> dict:
    """TRAK ensembled over ``models`` for every pair of a projection dimension k and a damping, for choosing the
    damping per k. Each model's per-example gradients are computed once (unprojected: (n + T, p) in memory), then
    projected to every k with the matrix ``trak`` uses for that model (seed + m), and each damping only re-solves
    that k's kernel (``kernel_solve_dampings``). Unlike ``trak_sweep``, which keeps every model's (n, T) kernel
    scores, this keeps only their mean over models, so that many (k, damping) pairs fit in memory.

    Returns {"kernel": {k: {damping: (n, T) model-averaged kernel scores}}, "q": (n,) model-averaged Q,
    "seconds": {k: seconds of the gradients, that k's projections and its solves for every damping, summed over
    models}}. ``kernel[k][d] * q[:, None]`` equals ``trak(models, ..., proj_dim=k, damping=d).scores()``."""
    p = sum(v[0].numel() for v in models.params.values())
    proj_dims, dampings = [int(k) for k in proj_dims], list(dampings)
    n, n_models = len(y_train), len(models)
    x_all, y_all = torch.cat([x_train, x_targets]), torch.cat([y_train, y_targets])
    kernel = {k: dict.fromkeys(dampings, 0.0) for k in proj_dims}
    seconds, q = dict.fromkeys(proj_dims, 0.0), 0.0
    for m in tqdm(range(n_models), desc=f"TRAK k={proj_dims}, {len(dampings)} dampings", disable=not progress,
                  leave=False):
        params = models.state_of(m)
        dtype = next(iter(params.values())).dtype
        t0 = time.perf_counter()
        g = featurize(models.net, params, x_all, y_all, fn=fn, batch_size=batch_size, chunk=chunk)  # (n + T, p)
        q = q + out_to_loss(models.net, params, x_train, y_train) / n_models
        t_grad = time.perf_counter() - t0
        for k in proj_dims:
            t0 = time.perf_counter()
            phi = RandomProjection(p, k, kind, seed=seed + m, dtype=dtype, device=x_train.device).project(g)
            for d, s in kernel_solve_dampings(phi[:n], phi[n:], dampings).items():
                kernel[k][d] = kernel[k][d] + s / n_models
            seconds[k] += t_grad + time.perf_counter() - t0
        del g
    return {"kernel": kernel, "q": q, "seconds": seconds}


def traker_scores(models: Models, x_train, y_train, x_targets, y_targets, proj_dim: int = 2048,
                  projection: str = "traker", kind: str = "rademacher", seed: int = 0, lambda_reg: float = 0.0,
                  batch_size: int = 256, save_dir=None, progress: bool = False) -> tuple[torch.Tensor, float]:
    """Scores of the reference implementation ``traker`` (MadryLab, pip package ``traker``) on the same models,
    for comparison; returns ((n_train, n_targets) scores, seconds). Needs ``traker`` installed.

    projection='traker': its own CPU path (BasicProjector, Gaussian, regenerated block by block for every batch);
    'ours': our ``RandomProjection`` (kind, seed + model index) plugged into traker, so that the two differ only in
    the rest of the pipeline. Runs in float32 (traker's default half precision is off). Conventions that differ
    from ``trak``: traker divides each model's (Phi^T Phi + lambda_reg I)^{-1} by the mean of its absolute entries
    (a per-model weight in the ensemble average; with one model only a global scale), lambda_reg is absolute on
    features divided by sqrt(p), and the undamped default lambda_reg=0 inverts the kernel as it is.
    progress: show traker's own progress bars (off by default: they would fill a notebook cell).
    """
    import contextlib
    import copy
    import tempfile
    from unittest import mock

    import trak.traker as traker_module
    from trak import TRAKer
    from trak.projectors import AbstractProjector

    net = copy.deepcopy(models.net).cpu().eval()
    p = sum(v[0].numel() for v in models.params.values())

    class _Ours(AbstractProjector):
        def __init__(self):
            super().__init__(p, proj_dim, seed, kind, "cpu")
            self._cache = {}

        def project(self, grads, model_id):
            if isinstance(grads, dict):
                grads = torch.cat([g.flatten(1) for g in grads.values()], 1)
            if model_id not in self._cache:
                self._cache = {model_id: RandomProjection(p, proj_dim, kind, seed=seed + model_id)}
            return self._cache[model_id].project(grads)

        def free_memory(self):
            pass

    if projection not in ("traker", "ours"):
        raise ValueError(f"unknown projection {projection!r}; valid: traker, ours")
    t0 = time.perf_counter()
    quiet = contextlib.nullcontext() if progress else mock.patch.object(traker_module, "tqdm", lambda it, **kw: it)
    with tempfile.TemporaryDirectory() as tmp, quiet:  # a fresh folder: traker's saver only works when it may 'load'
        tk = TRAKer(model=net, task="image_classification", train_set_size=len(y_train), save_dir=save_dir or tmp,
                    load_from_save_dir=True, device="cpu", proj_dim=proj_dim, use_half_precision=False,
                    projector=_Ours() if projection == "ours" else None, projector_seed=seed,
                    lambda_reg=lambda_reg, logging_level=40)
        states = [models.module(m).state_dict() for m in range(len(models))]
        for m, state in enumerate(states):
            tk.load_checkpoint(state, model_id=m)
            for xb, yb in zip(x_train.split(batch_size), y_train.split(batch_size)):
                tk.featurize(batch=(xb, yb), num_samples=len(yb))
        tk.finalize_features()
        for m, state in enumerate(states):
            tk.start_scoring_checkpoint(exp_name="targets", checkpoint=state, model_id=m, num_targets=len(y_targets))
            for xb, yb in zip(x_targets.split(batch_size), y_targets.split(batch_size)):
                tk.score(batch=(xb, yb), num_samples=len(yb))
        scores = torch.as_tensor(tk.finalize_scores(exp_name="targets")).clone()
    return scores, time.perf_counter() - t0
