"""The reference answers of chapter 02's checked exercises (the LDS).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import lds
from ..attribution import similarity
from ..data import Data


def first_subsets(gt: lds.GroundTruth, m: int) -> lds.GroundTruth:
    """The ground truth restricted to its first ``m`` subsets (masks, outputs and accuracies together)."""
    if not 3 <= m <= gt.m:
        raise ValueError(f"m must lie in [3, {gt.m}], got {m}")
    return dataclasses.replace(gt, masks=gt.masks[:m], outputs=gt.outputs[:m], accuracy=gt.accuracy[:m])


def width_ratio_quarter(scores, gt: lds.GroundTruth) -> float:
    """Exercise 2: the width of the LDS interval of ``scores`` (evaluation targets) on the first quarter of the
    subsets (``gt.m // 4``) divided by its width on all of them."""
    width = lambda s: s.ci[1] - s.ci[0]  # noqa: E731
    return width(lds.lds(scores, first_subsets(gt, gt.m // 4), part="eval")) / width(lds.lds(scores, gt, part="eval"))


def one_seed_ratio(scores, gt: lds.GroundTruth) -> float:
    """Exercise 3: the LDS mean of ``scores`` (evaluation targets) against model 0's outputs alone divided by the LDS
    mean against the average of all k models."""
    return lds.lds(scores, gt, models=[0], part="eval").mean / lds.lds(scores, gt, part="eval").mean


def non_target_images(data: Data, per_class: int = 5) -> torch.Tensor:
    """Test-split indices that are not LDS targets, the first ``per_class`` of each class in the split's order
    (class-balanced like the LDS targets; the test split is stored sorted by class, so its first non-targets would
    all be one digit), in increasing order. Raises ValueError if a class has too few."""
    is_target = set(data.target_idx.tolist())
    chosen = []
    for c in sorted(set(data.y_test.tolist())):
        pool = [i for i in range(len(data.y_test)) if int(data.y_test[i]) == c and i not in is_target]
        if len(pool) < per_class:
            raise ValueError(f"class {c} has {len(pool)} test images outside the LDS targets, fewer than {per_class}")
        chosen += pool[:per_class]
    return torch.tensor(sorted(chosen))


def shifted_lds(scores, gt: lds.GroundTruth, shift: float) -> float:
    """Exercise 1: the LDS mean (evaluation targets) of ``scores + shift``."""
    return lds.lds(scores + shift, gt, part="eval").mean


def pixel_lds_on_other_targets(data: Data, gt: lds.GroundTruth, per_class: int = 5) -> lds.Score:
    """Exercise 4: the LDS of signed pixel similarity on ``non_target_images(data, per_class)``, all of them (no
    part), against the existing ground truth."""
    idx = non_target_images(data, per_class)
    scores = similarity.pixel_similarity(data.x_train, data.y_train, data.x_test[idx], data.y_test[idx], signed=True)
    return lds.lds(scores, gt, targets=idx)
