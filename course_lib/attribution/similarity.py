"""Baselines that need no model: random scores, class match, and raw-pixel similarity (chapter 02).

They calibrate the LDS scale: random scores give about 0, and any method worth its compute must beat the
heuristics that only look at labels and pixels.
"""
from __future__ import annotations

import torch


def random_scores(n_train: int, n_targets: int, seed: int = 0) -> torch.Tensor:
    """(n_train, n_targets) standard Gaussian scores: an attribution that knows nothing."""
    return torch.randn(n_train, n_targets, generator=torch.Generator().manual_seed(seed))


def class_match(y_train: torch.Tensor, y_targets: torch.Tensor) -> torch.Tensor:
    """tau[i, t] = 1 if training example i has the target's label, else 0.

    The prediction for a subset is then the number of same-class examples in it: more of the target's class should
    raise its margin. (Any other pair of values gives the same LDS, since all subsets have the same size.)
    """
    return (y_train[:, None] == y_targets[None, :]).float()


def label_signed(similarity: torch.Tensor, y_train: torch.Tensor, y_targets: torch.Tensor) -> torch.Tensor:
    """A similarity (n_train, n_targets) turned into an attribution in the course's sign: kept where the training
    example's label equals the target's, negated where it differs (a look-alike with the target's label helps, one
    with another label hurts). Same shape and dtype as ``similarity``."""
    return similarity * (2 * class_match(y_train, y_targets) - 1).to(similarity.dtype)


def pixel_similarity(x_train: torch.Tensor, y_train: torch.Tensor, x_targets: torch.Tensor,
                     y_targets: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Cosine similarity of raw pixels between every training example and every target, (n_train, n_targets).

    signed: multiply by +1 where the labels agree and -1 where they differ, so that a look-alike of the target with
    its label helps and a look-alike with another label hurts; unsigned, it is the plain "most similar images" view.
    """
    a = torch.nn.functional.normalize(x_train.flatten(1).double(), dim=1)
    b = torch.nn.functional.normalize(x_targets.flatten(1).double(), dim=1)
    sim = a @ b.T
    return (label_signed(sim, y_train, y_targets) if signed else sim).float()
