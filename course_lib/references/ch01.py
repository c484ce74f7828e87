"""The reference answers of chapter 01's checked exercises (influence functions).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import torch

from .. import grads


def lissa_depth(scale: float, damping: float) -> float:
    """Exercise 1: the depth D at which the implicit damping ``scale / D`` of a LiSSA run truncated at depth D
    (the Neumann series of ``(A / s)^{-1}`` with scale s) equals ``damping``. Raises ValueError unless both are
    positive."""
    if not (scale > 0 and damping > 0):
        raise ValueError(f"scale and damping must be positive, got {scale} and {damping}")
    return float(scale) / float(damping)


def hessian_spectrum(net, state: dict, x, y) -> torch.Tensor:
    """Exercise 2: the eigenvalues, in ascending order, of the explicit Hessian of the mean training loss of
    ``net`` at ``state`` on (x, y), without weight decay (``grads.hessian``); the answer is the first."""
    return torch.linalg.eigvalsh(grads.hessian(net, state, x, y, weight_decay=0.0))


def look_alike_sign(scores, x_train, y_train, x_targets, y_targets) -> tuple[str, float]:
    """Exercise 5: for every target, its most pixel-similar training image (cosine of the flattened pixels) among
    those with the target's label, and the score ``scores[i, t]`` of that image (course convention: the effect of
    including it on the target's margin). Returns ("positive" or "negative": the sign of the majority, the share of
    targets whose look-alike has a positive score). scores: (n_train, n_targets)."""
    unit = lambda x: torch.nn.functional.normalize(x.flatten(1).double(), dim=1)
    same_label = torch.as_tensor(y_targets)[:, None] == torch.as_tensor(y_train)[None, :]
    if not same_label.any(1).all():
        raise ValueError("every target needs a training image of its own label")
    similarity = (unit(x_targets) @ unit(x_train).T).masked_fill(~same_label, -2.0)  # cosines lie in [-1, 1]
    look_alike = similarity.argmax(1)
    scores = torch.as_tensor(scores).cpu()
    share = float((scores[look_alike, torch.arange(len(look_alike))] > 0).double().mean())
    return ("positive" if share > 0.5 else "negative"), share
