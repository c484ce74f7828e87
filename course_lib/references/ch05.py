"""The reference answers of chapter 05's checked exercises (training dynamics: unrolling, SOURCE, TracIn's bias).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import lds
from ..attribution import least_squares, source, unroll


def walk_without_momentum(traj, x_train, y_train, x_targets, y_targets, js, fd) -> float:
    """Exercise 1: the relative error ``||s - fd|| / ||fd||`` of the scores of the backward walk that ignores
    momentum (the trajectory with ``momentum=0, nesterov=False``; the recorded run is unchanged) on the examples
    ``js`` against the finite differences ``fd`` (len(js), targets)."""
    walk = unroll.unrolled_scores(dataclasses.replace(traj, momentum=0.0, nesterov=False), x_train, y_train,
                                  x_targets, y_targets)
    s = walk.scores[js].to(fd.dtype)
    return float((s - fd).norm() / fd.norm())


def filter_peak(lo: float = 1e-3, hi: float = 20.0, n: int = 200_000) -> float:
    """Exercise 2: the x = s lambda at which SOURCE's one-segment filter exceeds the damped inverse the most (the
    maximiser of ``source.damping_ratio(x, 1)`` on a grid of n points in [lo, hi])."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    return float(x[source.damping_ratio(x, 1.0).argmax()])


def isotropic_tracin(rho_badly_conditioned: float, steps: int, d: int = 10) -> dict:
    """Exercise 3: TracIn's Spearman correlation with the exact derivative after ``steps`` steps on the
    least-squares problem with every one of its d feature scales 1 (``least_squares.problem(torch.ones(d))``),
    and whether it is "higher" or "lower" than ``rho_badly_conditioned`` (the chapter's table). Returns
    {"answer": "higher" | "lower", "isotropic": that correlation}."""
    exact, tracin = least_squares.scores(least_squares.problem(torch.ones(d)), steps)
    rho = float(lds.spearman_columns(exact[:, None], tracin[:, None])[0])
    return {"answer": "higher" if rho > rho_badly_conditioned else "lower", "isotropic": rho}


def rank_agreement(scores_a, scores_b) -> float:
    """Exercise 4: the mean over targets (columns) of the Spearman correlation between two (n_train, T) score
    matrices, e.g. truncated unrolling at its tuned K and TracIn over every step."""
    return float(lds.spearman_columns(scores_a, scores_b).mean())
