"""The Linear Datamodeling Score: the ground truth and its cache, the tuning/evaluation split, and the score.

Ground truth ("train once, evaluate every method"): draw m random subsets S_j of the training pool of size
alpha * n, train k models (seeds) on each, and record every model's margin on the whole test split. The result is
cached on disk under a hash of everything that affects it, written atomically, and resumable: models are trained in
chunks by ``retrain.train_outputs`` and every finished chunk is kept, so an interrupted build continues where it
stopped. A model whose outputs are not finite stops the build with an error; nothing non-finite is stored.

LDS of a score matrix tau (n_train, T): for each target t, the Spearman correlation over the m subsets between the
prediction sum_{i in S_j} tau[i, t] and the recorded output (averaged over the k models); reported as the mean over
targets with a bootstrap confidence interval over targets.

Honest tuning: the targets are split into a tuning part (even positions) and an evaluation part (odd positions);
the targets come sorted by class with the same number per class, so both parts are class-balanced. Choose any
hyperparameter by LDS on ``part="tune"``; report LDS on ``part="eval"``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from .cache import atomic_save, cache_dir, cache_key
from .data import Data
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

    def target_outputs(self, targets=None, models=None) -> torch.Tensor:
        """(m, T) outputs on the targets averaged over the models (all k, or the given model indices)."""
        targets = self.target_idx if targets is None else torch.as_tensor(targets)
        out = self.outputs[:, :, targets]
        if models is not None:
            out = out[:, torch.as_tensor(models)]
        return out.mean(1)


def ground_truth_spec(cfg: Setting) -> dict:
    return {"version": FORMAT_VERSION, "recipe": cfg.recipe(), "alpha": cfg.alpha, "m": cfg.gt_subsets,
            "k": cfg.gt_models, "seed": cfg.gt_seed}


def build_ground_truth(cfg: Setting, data: Data, cache=None, progress: bool = True) -> GroundTruth:
    """Load the setting's ground truth from the cache, or build it (resuming any interrupted build)."""
    spec = ground_truth_spec(cfg)
    folder = cache_dir(cache) / f"gt_{cfg.recipe()['dataset']}_{cache_key(spec)}"
    final = folder / "ground_truth.pt"
    if final.exists():
        stored = torch.load(final, weights_only=True)
        if stored.get("spec") != spec:
            raise ValueError(f"{final} was built for {stored.get('spec')}, not for this setting's {spec}: the "
                             f"folder has foreign content. Delete {folder} (or run `make clean-cache`).")
        return GroundTruth(**stored)
    m, k = cfg.gt_subsets, cfg.gt_models
    masks = subset_masks(data.n_train, m, cfg.alpha, cfg.gt_seed)
    seeds = model_seeds(m, k, cfg.gt_seed)
    outputs, acc, seconds = train_outputs(cfg, data, masks.repeat_interleave(k, 0), seeds.flatten(), folder,
                                          f"ground truth: {m * k} models", progress,
                                          name=lambda i: f"ground-truth subset {i // k}, replicate {i % k}")
    gt = GroundTruth(masks, outputs.view(m, k, -1), acc.view(m, k), data.target_idx.clone(), spec, seconds)
    atomic_save(asdict(gt), final)
    for p in folder.glob("part_*.pt"):
        p.unlink()
    return gt


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


def lds(scores, gt: GroundTruth, targets=None, models=None, seed: int = 0, part: str | None = None) -> Score:
    """LDS of ``scores`` (n_train, T) against the ground truth, with a 95% bootstrap interval over targets.

    targets: indices into the test split for the T columns (default: the ground truth's targets).
    models: which of the k replicate models to average (default: all).
    part: "tune" or "eval" scores only that part of the T columns (``target_part``); None: all of them.
    Raises ValueError on a wrong shape, non-finite scores or non-finite ground-truth outputs.
    """
    scores = torch.as_tensor(scores)
    targets = gt.target_idx if targets is None else torch.as_tensor(targets)
    n = gt.masks.shape[1]
    if scores.ndim != 2 or scores.shape != (n, len(targets)):
        raise ValueError(f"scores must have shape (n_train, n_targets) = ({n}, {len(targets)}), "
                         f"got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    cols = target_part(len(targets), part)
    actual = gt.target_outputs(targets[cols], models)
    _check_outputs(actual)
    rho = spearman_columns(predictions(scores[:, cols], gt.masks), actual)
    return bootstrap(rho, seed=seed)


def noise_ceiling(gt: GroundTruth, targets=None, seed: int = 0, part: str | None = None) -> dict:
    """How much of the ground truth any attribution could predict, given seed noise.

    ``one_vs_one``: mean per-target Spearman correlation, over the subsets, between two models trained with
    different seeds on the same subsets (averaged over all pairs of the k replicates). Call it r.
    ``ceiling_1`` and ``ceiling_k``: the correlation that the best possible predictor (the seed-averaged output
    E[f(S)]) would reach against one model's outputs, and against the k-model average that LDS uses:
    sqrt(r) and sqrt(k r / (1 + (k - 1) r)) (Spearman-Brown, treating seed noise as independent across models).
    Each is a Score (mean over targets with a bootstrap interval). part: as in ``lds``.
    """
    targets = gt.target_idx if targets is None else torch.as_tensor(targets)
    targets = targets[target_part(len(targets), part)]
    _check_outputs(gt.outputs[:, :, targets])
    out = gt.outputs[:, :, targets].numpy()
    k = gt.k
    if k < 2:
        raise ValueError("the noise ceiling needs at least two models per subset (gt_models >= 2)")
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    r = np.mean([spearman_columns(out[:, a], out[:, b]) for a, b in pairs], axis=0)
    rc = np.clip(r, 0, 1)
    return {"one_vs_one": bootstrap(r, seed=seed), "ceiling_1": bootstrap(np.sqrt(rc), seed=seed),
            "ceiling_k": bootstrap(np.sqrt(k * rc / (1 + (k - 1) * rc)), seed=seed)}
