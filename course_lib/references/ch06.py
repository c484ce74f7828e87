"""The reference answers of chapter 06's checked exercises (TRAK and the surrogate models).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import torch

from .. import lds
from ..attribution import surrogate, trak


def no_q_scores(result: trak.TrakResult) -> torch.Tensor:
    """Exercise 1's scores: the first model's TRAK scores without Q (``scores(m=1, q="none")``)."""
    return result.scores(m=1, q="none")


def no_q_one_model(result: trak.TrakResult, gt: lds.GroundTruth) -> lds.Score:
    """Exercise 1: the LDS (evaluation targets) of ``no_q_scores(result)``."""
    return lds.lds(no_q_scores(result), gt, part="eval")


def loss_feature_scores(net, state: dict, x_train, y_train, x_targets, y_targets, projection,
                        damping: float = 1.0) -> torch.Tensor:
    """Exercise 2's scores: ``trak.kernel_solve`` on the projected gradients of the LOSS (training images and
    targets, the same ``projection``), without Q, at the relative ``damping``; (n_train, n_targets)."""
    phi_train = trak.featurize(net, state, x_train, y_train, projection, fn="loss")
    phi_targets = trak.featurize(net, state, x_targets, y_targets, projection, fn="loss")
    return trak.kernel_solve(phi_train, phi_targets, damping)


def loss_features(net, state: dict, x_train, y_train, x_targets, y_targets, projection, gt: lds.GroundTruth,
                  damping: float = 1.0) -> lds.Score:
    """Exercise 2: the LDS (evaluation targets) of ``loss_feature_scores``."""
    return lds.lds(loss_feature_scores(net, state, x_train, y_train, x_targets, y_targets, projection, damping), gt,
                   part="eval")


def eval_lds_by_damping(candidates: dict, gt: lds.GroundTruth) -> dict:
    """Exercise 3: {damping: LDS mean on the EVALUATION targets} of every candidate ({damping: (n, T) scores}),
    what a tuner who peeks would look at."""
    return {d: lds.lds(s, gt, part="eval").mean for d, s in candidates.items()}


def cheapest_reaching(by_M, by_k, k_main: int, n_sweep: int, seconds_per_model: float, share: float = 0.9) -> dict:
    """Exercise 5: the cheapest (M, k) whose LDS mean reaches ``share`` of the highest mean of both tables.

    by_M: chapter 06's LDS-against-M table (columns "M", "LDS", "with training (s)"), points (M, k_main);
    by_k: its LDS-against-k table (columns "k", "LDS", "seconds"), points (n_sweep, k) costing "seconds" plus the
    training of n_sweep models at ``seconds_per_model``. Returns {"M", "k", "cost", "LDS", "best"} (best: the
    highest mean). Raises ValueError when both tables are empty."""
    points = [(int(r["M"]), int(k_main), float(r["with training (s)"]), float(r["LDS"])) for _, r in by_M.iterrows()]
    points += [(int(n_sweep), int(r["k"]), float(r["seconds"]) + n_sweep * seconds_per_model, float(r["LDS"]))
               for _, r in by_k.iterrows()]
    if not points:
        raise ValueError("both tables are empty: no point to choose")
    best = max(point[3] for point in points)
    m, k, cost, value = min((point for point in points if point[3] >= share * best), key=lambda point: point[2])
    return {"M": m, "k": k, "cost": cost, "LDS": value, "best": best}


def with_r_scores(phi_train, phi_targets, q, damping: float) -> torch.Tensor:
    """Exercise 6's scores: one model's TRAK scores with the surrogate's Gauss-Newton weights R = diag(p (1 - p)) =
    diag(Q (1 - Q)) inside the kernel, ``phi_t (Phi^T R Phi + lambda I)^{-1} phi_i Q_i`` with lambda = ``damping``
    x the mean eigenvalue of Phi^T R Phi (float64); (n_train, n_targets)."""
    a, b, qd = phi_train.double(), phi_targets.double(), q.double()
    kernel = a.T @ ((qd * (1 - qd))[:, None] * a)
    lam = damping * kernel.trace() / len(kernel)
    solved = torch.linalg.solve(kernel + lam * torch.eye(len(kernel), dtype=torch.float64), b.T)
    return (a @ solved) * qd[:, None]


def with_r(phi_train, phi_targets, q, damping: float, gt: lds.GroundTruth) -> lds.Score:
    """Exercise 6: the LDS (evaluation targets) of ``with_r_scores``."""
    return lds.lds(with_r_scores(phi_train, phi_targets, q, damping), gt, part="eval")


def last_layer_ensemble_scores(models, x_train, y_train, x_targets, y_targets, *, weight_decay: float,
                               damping: float, n_models: int = 5) -> torch.Tensor:
    """Exercise 7's scores: ``surrogate.last_layer_influence`` (one damping) averaged over the first
    ``min(n_models, len(models))`` models; (n_train, n_targets)."""
    n = min(n_models, len(models))
    scores = [surrogate.last_layer_influence(models.net, models.state_of(m), x_train, y_train, x_targets, y_targets,
                                             weight_decay=weight_decay, damping=damping).scores for m in range(n)]
    return torch.stack(scores).mean(0)


def last_layer_ensemble(models, x_train, y_train, x_targets, y_targets, gt: lds.GroundTruth, *,
                        weight_decay: float, damping: float, n_models: int = 5) -> lds.Score:
    """Exercise 7: the LDS (evaluation targets) of ``last_layer_ensemble_scores``."""
    return lds.lds(last_layer_ensemble_scores(models, x_train, y_train, x_targets, y_targets,
                                              weight_decay=weight_decay, damping=damping, n_models=n_models),
                   gt, part="eval")
