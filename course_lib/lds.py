"""The Linear Datamodeling Score: the ground truth and its cache, the tuning/evaluation split, and the score.

Ground truth ("train once, evaluate every method"): draw m random subsets S_j of the training pool of size
alpha * n, train k models (seeds) on each, and record every model's margin on the whole test split. The result is
cached on disk under a hash of everything that affects it, written atomically, and resumable: models are trained in
chunks by ``retrain.train_outputs`` and every finished chunk is kept, so an interrupted build continues where it
stopped. A model whose outputs are not finite stops the build with an error; nothing non-finite is stored.

LDS of a score matrix tau (n_train, T): for each target t, the Spearman correlation over the m subsets between the
prediction sum_{i in S_j} tau[i, t] and the recorded output (averaged over the k models); reported as the mean over
targets with a 95% two-way bootstrap interval.

The measurement: the ground truth records each model's margin; ``measure="loss"`` scores against each model's
cross-entropy on the target instead, log(1 + exp(-margin)) (``measure.loss_from_margin``: exact, so nothing is
retrained), averaged over the k models. Scores follow the course's sign convention for the measurement they are
scored on: tau[i, t] is the effect of including i on the target's margin, or on its loss (an example that raises
the margin lowers the loss).

The interval (``lds`` and ``noise_ceiling``) is a bootstrap that resamples both sources of sampling error at once:
each replicate draws the m subsets (rows of the ground truth: a subset's mask, hence its predictions, together with
its recorded outputs) with replacement and, independently, the T targets (columns) with replacement; it recomputes
every per-target Spearman correlation on the resampled subsets (a subset drawn several times is a tied row, ranked
by average ranks, exactly as ``spearman_columns`` on the resampled matrix would) and averages it over the resampled
targets. The interval is the central 95% of the replicates re-centred on the point estimate (their mean moved onto
it: rank correlations recomputed on resampled rows are biased low by O(1/m)). Resampling the targets alone
(``bootstrap`` of the per-target values, the interval used before) misses the subset noise that the targets share
and is far too narrow where it dominates; the two-way interval covers both. Where the per-target estimation noise
is independent across targets it is counted by both resamplings (and their product), so the two-way interval is
then conservative: up to about sqrt(3) too wide in the extreme case of no other source of spread (Owen 2007, "The
pigeonhole bootstrap"; measured 1.7x on a planted ground truth with independent, equally predictable targets,
1.0-1.4x on mixed ones). The point estimate is always the plain mean of the per-target correlations on all subsets
and targets; only the interval is resampled.

Honest tuning: the targets are split into a tuning part (even positions) and an evaluation part (odd positions);
the targets come sorted by class with the same number per class, so both parts are class-balanced. Choose any
hyperparameter by LDS on ``part="tune"``; report LDS on ``part="eval"``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from .cache import atomic_save, cache_dir, cache_key
from .data import Data
from .measure import MEASURES, loss_from_margin
from .retrain import model_seeds, subset_masks, train_outputs  # noqa: F401  (subset_masks: part of lds's API)
from .settings import Setting

FORMAT_VERSION = 1


@dataclass
class GroundTruth:
    """masks (m, n_train) bool; outputs (m, k, n_test) margins of every model on the whole test split;
    accuracy (m, k) test accuracy of every model; target_idx: the default LDS targets (indices into the test
    split); spec: everything that produced it; seconds: training time spent building it (all sessions)."""
    masks: torch.Tensor
    outputs: torch.Tensor
    accuracy: torch.Tensor
    target_idx: torch.Tensor
    spec: dict
    seconds: float

    @property
    def m(self) -> int:
        return self.outputs.shape[0]

    @property
    def k(self) -> int:
        return self.outputs.shape[1]

    def target_outputs(self, targets=None, models=None, measure: str = "margin") -> torch.Tensor:
        """(m, T) outputs on the targets averaged over the models (all k, or the given model indices); measure:
        "margin" (as recorded) or "loss" (each model's cross-entropy, ``loss_from_margin``, then averaged)."""
        targets = self.target_idx if targets is None else torch.as_tensor(targets)
        out = measured(self.outputs[:, :, targets], measure)
        if models is not None:
            out = out[:, torch.as_tensor(models)]
        return out.mean(1)


def measured(margins: torch.Tensor, measure: str) -> torch.Tensor:
    """Recorded margins as the given measurement: "margin" unchanged, "loss" = log(1 + exp(-margin)) computed in
    float64. Raises ValueError for any other name."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)}")
    return margins if measure == "margin" else loss_from_margin(margins.double())


def ground_truth_spec(cfg: Setting) -> dict:
    return {"version": FORMAT_VERSION, "recipe": cfg.recipe(), "alpha": cfg.alpha, "m": cfg.gt_subsets,
            "k": cfg.gt_models, "seed": cfg.gt_seed}


def build_ground_truth(cfg: Setting, data: Data, cache=None, progress: bool = True) -> GroundTruth:
    """Load the setting's ground truth from the cache, or build it (resuming any interrupted build)."""
    spec = ground_truth_spec(cfg)
    folder = cache_dir(cache) / f"gt_{cfg.recipe()['dataset']}_{cache_key(spec)}"

    def build():
        m, k = cfg.gt_subsets, cfg.gt_models
        masks = subset_masks(data.n_train, m, cfg.alpha, cfg.gt_seed)
        seeds = model_seeds(m, k, cfg.gt_seed)
        outputs, acc, seconds = train_outputs(cfg, data, masks.repeat_interleave(k, 0), seeds.flatten(), folder,
                                              f"ground truth: {m * k} models", progress,
                                              name=lambda i: f"ground-truth subset {i // k}, replicate {i % k}")
        return GroundTruth(masks, outputs.view(m, k, -1), acc.view(m, k), data.target_idx.clone(), spec, seconds)
    return _cached(folder, spec, build)


def _cached(folder, spec: dict, build) -> GroundTruth:
    """The ground truth stored in ``folder`` (refused when it was built for another spec), or ``build()`` it, store
    it atomically and drop the chunk files it was built from."""
    final = folder / "ground_truth.pt"
    if final.exists():
        stored = torch.load(final, weights_only=True)
        if stored.get("spec") != spec:
            raise ValueError(f"{final} was built for {stored.get('spec')}, not for {spec}: the folder has foreign "
                             f"content. Delete {folder} (or run `make clean-cache`).")
        return GroundTruth(**stored)
    gt = build()
    atomic_save(asdict(gt), final)
    for p in folder.glob("part_*.pt"):
        p.unlink()
    return gt


def fixed_seed_spec(cfg: Setting, drop: float, m: int, seed: int) -> dict:
    """Everything that determines a fixed-seed ground truth (its cache key)."""
    return {"kind": "fixed-seed", "format": FORMAT_VERSION, "recipe": cfg.recipe(), "m": m, "drop": drop,
            "seed": seed, "mask_seed": cfg.gt_seed}


def fixed_seed(cfg: Setting) -> int:
    """The training seed of the fixed-seed ground truth (the first of the stream "fixed-seed" for ``cfg.gt_seed``):
    record or train the attributed run with it (``train.record_training(cfg, data, lds.fixed_seed(cfg))``) so that
    dropping nothing reproduces it exactly."""
    return int(model_seeds(1, 1, cfg.gt_seed, stream="fixed-seed")[0, 0])


def build_fixed_seed_ground_truth(cfg: Setting, data: Data, drop: float, m: int | None = None,
                                  seed: int | None = None, cache=None, progress: bool = True) -> GroundTruth:
    """The single-model counterfactual ground truth (chapter 05): ONE training seed (initialisation and batch order
    over the whole pool), ``m`` random subsets (default ``cfg.gt_subsets``) that each drop a fraction ``drop`` of the
    training pool (weight 0 in ``train.train_weighted``: the same batches, the same initialisation), one model per
    subset (k = 1). Seed noise is absent by construction: retraining a subset exactly as it was built gives the same
    margins bit for bit. For the small CNN this holds whatever the chunk of models trained together: its ensembles
    run as one grouped convolution (``models.SmallCNN.forward_stacked``), in which each model's group is computed the
    same way whatever the number of groups (chapter 05 retrains two subsets in a chunk of 2 and prints the
    difference). Models without a stacked forward train their ensembles through ``vmap``, whose batched kernels may
    sum in another order for another chunk size; the course CNN's recipe amplifies such round-off, so for those
    bit-reproducibility needs the same chunks of ``cfg.ensemble_size`` models. What it measures is the effect of the
    data on THIS training run; ``fixed_seed_replicate`` measures how much of it survives a change of the run that no
    attribution method can see. seed: default ``fixed_seed(cfg)``. Cached and resumable like
    ``build_ground_truth``; score it with ``lds``.
    Raises ValueError for ``drop`` outside (0, 1) or one that leaves a subset empty or whole."""
    drop = float(drop)
    if not 0 < drop < 1:
        raise ValueError(f"drop must be a fraction in (0, 1), got {drop}")
    m = cfg.gt_subsets if m is None else int(m)
    seed = fixed_seed(cfg) if seed is None else int(seed)
    spec = fixed_seed_spec(cfg, drop, m, seed)
    folder = cache_dir(cache) / f"gt_fixed_{cfg.recipe()['dataset']}_{cache_key(spec)}"

    def build():
        masks = subset_masks(data.n_train, m, 1 - drop, cfg.gt_seed, stream=f"fixed-seed-{drop}")
        outputs, acc, seconds = train_outputs(cfg, data, masks, torch.full((m,), seed), folder,
                                              f"fixed-seed ground truth, drop {drop:g}: {m} models", progress,
                                              name=lambda i: f"fixed-seed subset {i}", fixed_order=True)
        return GroundTruth(masks, outputs.view(m, 1, -1), acc.view(m, 1), data.target_idx.clone(), spec, seconds)
    return _cached(folder, spec, build)


def fixed_seed_replicate(cfg: Setting, data: Data, gt: GroundTruth, m: int | None = None, rel_change: float = 1e-6,
                         cache=None) -> GroundTruth:
    """A second model for each of the first ``m`` subsets (default all) of a fixed-seed ground truth ``gt``: the
    same run retrained with EVERY weight of the subset multiplied by ``1 + rel_change`` (``train.train_weighted``;
    the same seed, batches and initialisation). An additive attribution's prediction for the subset moves by the
    same factor, ``1 + rel_change``, so it cannot tell the two models apart. Returns a GroundTruth with k = 2 (the
    stored model, then the replicate) for ``noise_ceiling``: its ``ceiling_1`` is the correlation that the best
    predictor insensitive to such a change would reach against the fixed-seed ground truth (treating the
    difference as independent noise, as for seeds). Cached (keyed by ``gt.spec``, m and rel_change); its
    ``seconds`` are the replicates' training only. Raises ValueError for a ground truth that is not fixed-seed."""
    from .train import train_weighted  # lds otherwise trains only through retrain

    if gt.spec.get("kind") != "fixed-seed" or gt.k != 1:
        raise ValueError("fixed_seed_replicate needs a fixed-seed ground truth (one model per subset)")
    m = gt.m if m is None else min(int(m), gt.m)
    spec = {**gt.spec, "replicate": {"m": m, "rel_change": float(rel_change)}}
    folder = cache_dir(cache) / f"gt_fixed_rep_{cfg.recipe()['dataset']}_{cache_key(spec)}"

    def build():
        t0 = time.perf_counter()
        models = train_weighted(cfg, data, gt.masks[:m].double() * (1 + rel_change), gt.spec["seed"])
        out = models.outputs(data.x_test, data.y_test)
        seconds = time.perf_counter() - t0
        acc = models.accuracy(data.x_test, data.y_test)
        return GroundTruth(gt.masks[:m].clone(), torch.stack([gt.outputs[:m, 0], out.to(gt.outputs.dtype)], 1),
                           torch.stack([gt.accuracy[:m, 0], acc.to(gt.accuracy.dtype)], 1), gt.target_idx.clone(),
                           spec, seconds)
    return _cached(folder, spec, build)


@dataclass
class Score:
    """A mean over targets with a bootstrap confidence interval; per_target holds the values averaged."""
    mean: float
    ci: tuple
    per_target: np.ndarray

    def __repr__(self):
        return f"{self.mean:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"

    def __format__(self, spec):
        return repr(self)


def bootstrap(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Score:
    """Mean of ``values`` with a percentile bootstrap interval (resampling the values)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Score(float(v.mean()), (float(lo), float(hi)), v)


def pearson_interval(x, y, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Score:
    """Pearson correlation of paired values (e.g. predicted and actual leave-one-out changes) with a percentile
    bootstrap interval that resamples the pairs; ``per_target`` holds the replicates. Raises ValueError for fewer than
    3 pairs, unequal lengths or non-finite values."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need at least 3 pairs of equal length, got {len(x)} and {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pearson_interval got non-finite values")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    xb, yb = x[idx] - x[idx].mean(1, keepdims=True), y[idx] - y[idx].mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (xb * yb).sum(1) / np.sqrt((xb ** 2).sum(1) * (yb ** 2).sum(1))
    reps = reps[np.isfinite(reps)]  # a resample of identical pairs has no correlation
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Score(float(np.corrcoef(x, y)[0, 1]), (float(lo), float(hi)), reps)


def pearson_ceiling(per_seed, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Score:
    """The noise ceiling of a Pearson R against a seed-averaged leave-one-out ground truth (``retrain.leave_one_out``
    with ``per_seed=True``): per_seed (K, S) holds K removals' effects measured with S >= 2 seeds. r is the Pearson
    correlation over the removals between two seeds' effects, averaged over the pairs of seeds; the ceiling is
    ``ceiling(r, S)``, the R that the exact expected effects would reach against the S-seed mean. The interval
    resamples the removals, as ``pearson_interval`` does for R itself."""
    e = np.asarray(per_seed, dtype=np.float64)
    if e.ndim != 2 or e.shape[1] < 2 or e.shape[0] < 3:
        raise ValueError(f"per_seed must be (K >= 3 removals, S >= 2 seeds), got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("pearson_ceiling got non-finite values")
    S = e.shape[1]
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]

    def value(rows):
        c = rows - rows.mean(-2, keepdims=True)  # (..., K, S)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.mean([(c[..., a] * c[..., b]).sum(-1) / np.sqrt((c[..., a] ** 2).sum(-1) * (c[..., b] ** 2).sum(-1))
                         for a, b in pairs], axis=0)
        return ceiling(r, S)

    reps = value(e[np.random.default_rng(seed).integers(0, len(e), size=(n_boot, len(e)))])
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Score(float(value(e)), (float(lo), float(hi)), reps)


def spearman_columns(a, b) -> np.ndarray:
    """Spearman correlation between matching columns of a and b (m, T) -> (T,). A constant column (no
    variation across subsets, so no ranking) gives 0."""
    ra = rankdata(np.asarray(a, dtype=np.float64), axis=0)
    rb = rankdata(np.asarray(b, dtype=np.float64), axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(0) / denom
    return np.where(denom > 0, rho, 0.0)


def _tie_groups(x: np.ndarray):
    """Precomputed for ``_resampled_ranks``: for x (m, T), each column's sorting order and, for each entry, the first
    and last position in its sorted column of the values equal to it, as flat indices into a (T, m) array of the
    columns sorted ascending."""
    m, T = x.shape
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    pos = np.arange(m)[:, None]
    first = np.ones(x.shape, bool)
    first[1:] = xs[1:] != xs[:-1]
    last = np.ones(x.shape, bool)
    last[:-1] = first[1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, pos, m - 1)[::-1], axis=0)[::-1]
    inv = np.argsort(order, axis=0)  # sorted position of each entry
    col = np.arange(T)[None, :] * m
    flat = lambda p: (np.take_along_axis(p, inv, 0) + col).T.ravel()  # entry (i, t) -> t * m + sorted position
    return order.T.copy(), flat(start), flat(end)


def _resampled_ranks(groups, counts: np.ndarray) -> np.ndarray:
    """Average ranks within each column of a resample of the rows of x, without building it: ``groups`` is
    ``_tie_groups(x)`` and counts (B, m) how many times each row was drawn in each of B resamples (of m rows).
    Returns (B, T, m): 2 rank - (m + 1), with rank the average rank that row i's value gets among the resample's
    values of column t (ties, including the copies of a row drawn several times, share it); centred and doubled, it
    is an integer, exact in float32 (the dtype of counts). A row drawn 0 times gets a value that has weight 0."""
    order, start, end = groups
    B, m = counts.shape
    c = counts[:, order].reshape(B, -1)  # (B, T * m): each column's counts in its sorted order
    upto = np.cumsum(c.reshape(B, -1, m), axis=2).reshape(B, -1)
    below = np.take(upto - c, start, axis=1)  # how many values lie strictly below the tie group
    # rank = below + (size of the tie group + 1) / 2, and the tie group ends at upto[end]
    return (below + np.take(upto, end, axis=1) - m).reshape(B, -1, m)


def _weighted_spearman(ra, rb, counts) -> np.ndarray:
    """(B, T) Spearman correlations of the resamples given by counts (B, m), from their ``_resampled_ranks``
    (centred: the ranks of a resample of m rows have mean (m + 1) / 2). A column constant in the resample gives 0,
    as in spearman_columns. The sums are exact in float32 up to m = 256 (integers below 2^24) and float32-rounded
    beyond."""
    w = counts[:, None, :]
    wa = w * ra
    va = np.einsum("btm,btm->bt", wa, ra).astype(np.float64)
    vb = np.einsum("btm,btm->bt", w * rb, rb).astype(np.float64)
    denom = np.sqrt(va * vb)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.einsum("btm,btm->bt", wa, rb).astype(np.float64) / denom
    return np.where(denom > 0, rho, 0.0)


def two_way_bootstrap(columns, pairs, transforms=(lambda r: r,), n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0, chunk: int | None = None) -> list:
    """Scores of per-target correlations with a two-way (subsets x targets) bootstrap interval.

    columns: matrices (m, T) with the same m subsets (rows) and T targets (columns). The per-target statistic is
    r[t] = the mean over ``pairs`` (a, b) of the Spearman correlation of columns[a][:, t] and columns[b][:, t]; each
    transform f gives one Score: the mean over targets of f(r) (computed on all rows and columns, exactly as
    ``bootstrap(f(r))`` reports it), with an interval from n_boot replicates that each draw the m rows and,
    independently, the T columns with replacement, recompute r on the drawn rows (repeated rows tie and get average
    ranks) and average f(r) over the drawn columns. The interval is the replicates' central ``level`` range after
    shifting them so that their mean is the point estimate (a Spearman correlation recomputed on rows drawn with
    replacement is biased low by O(1/m): their mean lay 0.3-0.6 standard errors below it in planted tests with
    8-100 targets and 30-100 subsets), clipped to [-1, 1] (every statistic here is a correlation). Seeded by ``seed``.
    """
    mats = [np.asarray(x, dtype=np.float64) for x in columns]
    m, T = mats[0].shape
    r = np.mean([spearman_columns(mats[a], mats[b]) for a, b in pairs], axis=0)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, m, size=(n_boot, m))
    cols = rng.integers(0, T, size=(n_boot, T))
    used = sorted({i for pair in pairs for i in pair})
    groups = {i: _tie_groups(mats[i]) for i in used}
    reps = np.empty((len(transforms), n_boot))
    chunk = chunk or max(1, 2_000_000 // (m * T))
    for b0 in range(0, n_boot, chunk):
        b1 = min(b0 + chunk, n_boot)
        counts = np.zeros((b1 - b0, m), np.float32)
        np.add.at(counts, (np.arange(b1 - b0)[:, None], rows[b0:b1]), 1)
        ranks = {i: _resampled_ranks(groups[i], counts) for i in used}
        rb = np.mean([_weighted_spearman(ranks[a], ranks[b], counts) for a, b in pairs], axis=0)
        for j, f in enumerate(transforms):
            reps[j, b0:b1] = np.take_along_axis(f(rb), cols[b0:b1], 1).mean(1)
    out = []
    for j, f in enumerate(transforms):
        v = np.asarray(f(r), dtype=np.float64)
        mean = float(v.mean())
        lo, hi = np.clip(np.quantile(reps[j] - reps[j].mean() + mean, [(1 - level) / 2, (1 + level) / 2]), -1, 1)
        out.append(Score(mean, (float(lo), float(hi)), v))
    return out


def predictions(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(m, T) predicted outputs: sum of the scores of the examples in each subset."""
    return masks.to(torch.float64) @ scores.to(torch.float64).cpu()


PARTS = ("tune", "eval")


def target_part(n_targets: int, part: str | None) -> torch.Tensor:
    """Column positions of one part of ``n_targets`` targets: "tune" = even positions, "eval" = odd positions,
    None = all. Raises ValueError for any other part."""
    if part is None:
        return torch.arange(n_targets)
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; valid: {', '.join(PARTS)} (or None for all targets)")
    return torch.arange(PARTS.index(part), n_targets, 2)


def _check_outputs(outputs: torch.Tensor):
    bad = ~torch.isfinite(outputs)
    if bad.any():
        raise ValueError(f"the ground truth holds {int(bad.sum())} non-finite outputs: a diverged model would "
                         "turn the LDS into a confident wrong number; rebuild it")


def lds(scores, gt: GroundTruth, targets=None, models=None, seed: int = 0, part: str | None = None,
        n_boot: int = 2000, measure: str = "margin") -> Score:
    """LDS of ``scores`` (n_train, T) against the ground truth, with a 95% two-way bootstrap interval.

    The mean is over the targets of the per-target Spearman correlations on all m subsets. The interval resamples
    both the m subsets (mask, predictions and recorded outputs together) and the T targets, with replacement,
    recomputing each correlation on the resampled subsets (``two_way_bootstrap``, n_boot replicates seeded by seed).
    ``bootstrap(score.per_target)`` gives the narrower interval that resamples the targets alone.

    targets: indices into the test split for the T columns (default: the ground truth's targets).
    models: which of the k replicate models to average (default: all).
    part: "tune" or "eval" scores only that part of the T columns (``target_part``); None: all of them.
    measure: "margin" (default) or "loss": what the scores predict (see the module docstring for the sign).
    Raises ValueError on a wrong shape, non-finite scores, non-finite ground-truth outputs or an unknown measure.
    """
    pred, actual = _predicted_and_actual(scores, gt, targets, models, part, measure)
    return two_way_bootstrap([pred, actual], [(0, 1)], n_boot=n_boot, seed=seed)[0]


def lds_difference(scores_a, scores_b, gt: GroundTruth, targets=None, models=None, seed: int = 0,
                   part: str | None = None, n_boot: int = 2000, measure: str = "margin",
                   measure_b: str | None = None) -> Score:
    """The paired difference LDS(scores_a) - LDS(scores_b) on one ground truth, with a 95% two-way bootstrap interval
    that draws the same subsets and targets for both methods in every replicate (``two_way_bootstrap``). What the two
    share (which subsets and targets happen to be easy) cancels, so the interval is narrower than the two LDS
    intervals side by side suggest. An interval that excludes 0 says the two differ beyond the sampling of subsets
    and targets; it covers no other source of spread (another attributed model, another training seed).
    The mean equals ``lds(scores_a).mean - lds(scores_b).mean``; per_target holds the per-target differences; the
    interval is clipped to [-1, 1] as in ``two_way_bootstrap``. scores_a is scored on ``measure``, scores_b on
    ``measure_b`` (default: the same), so one method can be compared with itself under the margin and the loss.
    Other arguments and errors as in ``lds``."""
    pred_a, actual_a = _predicted_and_actual(scores_a, gt, targets, models, part, measure)
    pred_b, actual_b = _predicted_and_actual(scores_b, gt, targets, models, part,
                                             measure if measure_b is None else measure_b)
    # Spearman(-b, y) = -Spearman(b, y) (ties included): the mean over the pairs (a, y_a) and (-b, y_b) is half of
    # Spearman(a, y_a) - Spearman(b, y_b), so twice it is the difference, resampled on the same rows and columns
    return two_way_bootstrap([pred_a, actual_a, -pred_b, actual_b], [(0, 1), (2, 3)], transforms=(lambda r: 2 * r,),
                             n_boot=n_boot, seed=seed)[0]


def paired_verdict(diff: Score, a: str = "A", b: str = "B") -> str:
    """The verdict of a paired difference LDS(a) - LDS(b) (``lds_difference``) in words: ``"<a> ahead"`` when its
    95% interval lies above 0, ``"<b> ahead"`` when it lies below 0, else ``"not told apart"`` (the interval
    includes 0; a bound exactly at 0 counts as including it)."""
    lo, hi = diff.ci
    if lo > 0:
        return f"{a} ahead"
    if hi < 0:
        return f"{b} ahead"
    return "not told apart"

def _predicted_and_actual(scores, gt: GroundTruth, targets, models, part, measure="margin"):
    scores = torch.as_tensor(scores)
    targets = gt.target_idx if targets is None else torch.as_tensor(targets)
    n = gt.masks.shape[1]
    if scores.ndim != 2 or scores.shape != (n, len(targets)):
        raise ValueError(f"scores must have shape (n_train, n_targets) = ({n}, {len(targets)}), "
                         f"got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    cols = target_part(len(targets), part)
    actual = gt.target_outputs(targets[cols], models, measure)
    _check_outputs(actual)
    return predictions(scores[:, cols], gt.masks), actual


@dataclass
class Tuned:
    """The outcome of ``tune``: choice (the chosen key), tuning ({key: LDS point estimate on the tuning targets},
    every candidate) and reported (the chosen candidate's ``Score`` on the evaluation targets)."""
    choice: object
    tuning: dict
    reported: Score


def tune(candidates: dict, gt: GroundTruth, seed: int = 0, n_boot: int = 2000) -> Tuned:
    """Honest tuning in one call: choose among ``candidates`` ({key: (n_train, T) scores}, e.g. one per damping)
    the one with the highest LDS on the tuning targets (point estimates; the first key wins a tie), and report its
    LDS on the evaluation targets with the two-way interval (``lds(..., part="eval")``). The evaluation targets never
    influence the choice. Raises ValueError on an empty dict and as ``lds`` on malformed scores."""
    if not candidates:
        raise ValueError("tune needs at least one candidate: {key: scores}")
    tuning = {}
    for key, sc in candidates.items():
        pred, actual = _predicted_and_actual(sc, gt, None, None, "tune")
        tuning[key] = float(spearman_columns(pred.numpy(), actual.numpy()).mean())
    choice = choose(tuning)
    return Tuned(choice, tuning, lds(candidates[choice], gt, seed=seed, part="eval", n_boot=n_boot))


def choose(tuning: dict):
    """``tune``'s choice rule on its own, for tuning LDS values kept without their scores (e.g. in a cache): the key
    with the highest value, the first such key on a tie. Raises ValueError on an empty dict."""
    if not tuning:
        raise ValueError("choose needs at least one candidate: {key: tuning LDS}")
    return max(tuning, key=tuning.get)  # max returns the first maximal key


def ceiling(r, k: int):
    """The noise ceiling against a k-model average, given the one-vs-one seed correlation r (per target, array):
    sqrt(k r / (1 + (k - 1) r)), r clipped to [0, 1] (the Spearman-Brown formula; k = 1 gives sqrt(r))."""
    rc = np.clip(np.asarray(r, dtype=float), 0, 1)
    return np.sqrt(k * rc / (1 + (k - 1) * rc))


def noise_ceiling(gt: GroundTruth, targets=None, seed: int = 0, part: str | None = None, n_boot: int = 2000,
                  measure: str = "margin", ks=()) -> dict:
    """How much of the ground truth any attribution could predict, given seed noise.

    ``one_vs_one``: mean per-target Spearman correlation, over the subsets, between two models trained with
    different seeds on the same subsets (averaged over all pairs of the k replicates). Call it r.
    ``ceiling_1`` and ``ceiling_k``: the correlation that the best possible predictor (the seed-averaged output
    E[f(S)]) would reach against one model's outputs, and against the k-model average that LDS uses:
    sqrt(r) and sqrt(k r / (1 + (k - 1) r)) (Spearman-Brown, treating seed noise as independent across models).
    ``ceiling_by_k``: {j: the same formula's ceiling against a j-model average} for every j in ``ks`` (an
    extrapolation from r to ground truths with other numbers of models).
    ``split_half`` (only when k >= 4): the ceiling of an h-model average, h = k // 2, measured without the formula:
    the square root of the Spearman correlation between the averages of two disjoint halves of the replicates
    (models 0..h-1 and h..2h-1), clipped at 0 per target. With independent seed noise that correlation is
    ceiling_h^2, so it should agree with the formula's ceiling for h models; a gap says the formula's assumption
    fails (it is exact for neither measurement in general; it is a check). ``split_half_k`` (only when k is even and
    at least 4): the ceiling against the k-model average estimated from the same two halves, sqrt(2 rho / (1 + rho))
    with rho their Spearman correlation: the k-model average is the mean of the two halves, so this needs no
    assumption about single models, only that the two halves are alike (they are: the seeds are exchangeable).
    It is the ceiling to use for a measurement whose single-model noise the formula from r describes badly.
    Each is a Score: the mean over targets with a two-way bootstrap interval made as in ``lds`` (each replicate
    resamples the subsets, the rows of all k replicates' outputs together, and the targets; recomputes r per target
    on the resampled subsets, then each quantity, and averages over the resampled targets), so that the ceiling's
    interval and an LDS interval measure the same sampling error. part and measure: as in ``lds`` (r is the same
    for both measurements, since the loss of one model is a decreasing function of its margin; the averages are not).
    Raises ValueError for k < 2.
    """
    targets = gt.target_idx if targets is None else torch.as_tensor(targets)
    targets = targets[target_part(len(targets), part)]
    out = measured(gt.outputs[:, :, targets], measure)
    _check_outputs(out)
    out = out.numpy()
    k = gt.k
    if k < 2:
        raise ValueError("the noise ceiling needs at least two models per subset (gt_models >= 2)")
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    ks = [int(j) for j in ks]
    transforms = [lambda r: r, lambda r: ceiling(r, 1), lambda r: ceiling(r, k)]
    transforms += [lambda r, j=j: ceiling(r, j) for j in ks]
    one, c1, ck, *by_k = two_way_bootstrap([out[:, a] for a in range(k)], pairs, transforms, n_boot=n_boot, seed=seed)
    result = {"one_vs_one": one, "ceiling_1": c1, "ceiling_k": ck, "ceiling_by_k": dict(zip(ks, by_k))}
    if k >= 4:
        h = k // 2
        transforms = [lambda r: np.sqrt(np.clip(r, 0, 1))] + ([lambda r: ceiling(r, 2)] if k == 2 * h else [])
        split = two_way_bootstrap(_halves(out, h), [(0, 1)], transforms, n_boot=n_boot, seed=seed)
        result["split_half"] = split[0]
        if k == 2 * h:
            result["split_half_k"] = split[1]
    return result


def _halves(out: np.ndarray, h: int) -> list:
    """The averages of models 0..h-1 and h..2h-1 of outputs (m, k, T)."""
    return [out[:, :h].mean(1), out[:, h:2 * h].mean(1)]


def split_half_difference(gt: GroundTruth, measure_a: str = "margin", measure_b: str = "loss", targets=None,
                          part: str | None = None, seed: int = 0, n_boot: int = 2000) -> Score:
    """How much more the two halves of the seeds agree under ``measure_a`` than under ``measure_b``: the per-target
    Spearman correlation between the averages of models 0..h-1 and h..2h-1 (h = k // 2) under measure_a, minus the
    same under measure_b, averaged over targets, with a paired two-way interval (the same resampled subsets and
    targets for both, as in ``lds_difference``). Positive: measure_a's seed average is the more reproducible, so any
    attribution can predict it better. Raises ValueError for k < 4 and as ``measured`` for unknown measures."""
    if gt.k < 4:
        raise ValueError(f"the split-half comparison needs at least 4 models per subset, got k = {gt.k}")
    targets = gt.target_idx if targets is None else torch.as_tensor(targets)
    targets = targets[target_part(len(targets), part)]
    h = gt.k // 2
    a = _halves(measured(gt.outputs[:, :, targets], measure_a).numpy(), h)
    b = _halves(measured(gt.outputs[:, :, targets], measure_b).numpy(), h)
    # Spearman(-b0, b1) = -Spearman(b0, b1): twice the mean over the two pairs is the difference (see lds_difference)
    return two_way_bootstrap([a[0], a[1], -b[0], b[1]], [(0, 1), (2, 3)], transforms=(lambda r: 2 * r,),
                             n_boot=n_boot, seed=seed)[0]
