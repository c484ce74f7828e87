"""The model outputs that attribution explains.

The default measurement is the margin ``f(x, y) = logit_y - logsumexp_{y' != y} logit_{y'}``, the log-odds of the
correct class: ``log(p_y / (1 - p_y))``. It is what TRAK and the LDS ground truth use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MEASURES = ("margin", "loss")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit_y - logsumexp of the other logits; logits (..., C), y broadcastable to (...) -> (...)."""
    y = y.expand(logits.shape[:-1])
    correct = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    # a comparison, not F.one_hot: one_hot inspects the values, which torch.func.vmap cannot trace
    is_y = torch.arange(logits.shape[-1], device=logits.device) == y.unsqueeze(-1)
    others = logits.masked_fill(is_y, float("-inf"))
    return correct - others.logsumexp(-1)


def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy; logits (..., C), y broadcastable to (...) -> (...)."""
    y = y.expand(logits.shape[:-1])
    return -logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def loss_from_margin(margin: torch.Tensor) -> torch.Tensor:
    """The cross-entropy -log p_y from the margin alone: log(1 + exp(-margin)) = softplus(-margin), exactly, for
    any number of classes. The margin is log(p_y / (1 - p_y)), so p_y = sigmoid(margin). Hence a ground truth that
    records every model's margin records its loss too, and for one model the two rank any set of training subsets
    in exactly opposite orders; they differ once several models are averaged (mean loss is not a function of mean
    margin). Any shape -> the same shape."""
    return F.softplus(-margin)


def get(name: str):
    if name == "margin":
        return margin
    if name == "loss":
        return loss
    raise ValueError(f"unknown measurement {name!r}; valid: {', '.join(MEASURES)}")
