"""The reference answers of chapter 04's checked exercises (GNH, K-FAC, EK-FAC).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.func import functional_call

from ..attribution import ekfac


def fisher_eigenvalue_ratio(empirical: ekfac.Factors, sampled: ekfac.Factors) -> dict:
    """Exercise 1: {layer: mean EK-FAC eigenvalue of the empirical Fisher / that of the true Fisher}, for the factors
    of one model fitted with the training labels (``empirical``) and with sampled labels (``sampled``)."""
    if set(empirical.layers) != set(sampled.layers):
        raise ValueError(f"the two fits factor different layers: {empirical.layers} vs {sampled.layers}")
    return {k: float(empirical.lam[k].mean() / sampled.lam[k].mean()) for k in sampled.layers}


def kfac_error_by_layer(approx, block_diagonal, layers, edges) -> dict:
    """Exercise 2: {layer: relative Frobenius error of ``approx``'s diagonal block against ``block_diagonal``'s}.

    approx, block_diagonal: (p, p) matrices in layer order; layers: the layer names in that order; edges: the
    p-indices where the layers' blocks start, with p last (len(layers) + 1 values)."""
    if len(edges) != len(layers) + 1 or int(edges[-1]) != len(block_diagonal):
        raise ValueError(f"edges must hold {len(layers) + 1} block starts ending at p = {len(block_diagonal)}, "
                         f"got {list(edges)}")
    return {k: ekfac.relative_error(approx[a:b, a:b], block_diagonal[a:b, a:b])
            for k, a, b in zip(layers, edges[:-1], edges[1:])}


def worst_kfac_layer(approx, block_diagonal, layers, edges) -> str:
    """Exercise 2: the name of the layer whose block has the largest error in ``kfac_error_by_layer``."""
    errors = kfac_error_by_layer(approx, block_diagonal, layers, edges)
    return max(errors, key=errors.get)


def sampled_labels(net, state: dict, x, seed: int = 0) -> torch.Tensor:
    """Exercise 3: one label per image drawn from the model's own prediction (the true Fisher's labels),
    ``torch.multinomial(softmax(logits), 1, generator=torch.Generator().manual_seed(seed))``."""
    with torch.no_grad():
        prob = functional_call(net, state, (x,)).softmax(-1)
    return torch.multinomial(prob, 1, generator=torch.Generator().manual_seed(seed))[:, 0]


def empirical_fisher_blocks(factors: ekfac.Factors, net, state: dict, x, y) -> torch.Tensor:
    """The block-diagonal empirical Fisher (1/n) sum_i g_i g_i^T (g_i: example i's loss gradient under its training
    label), in the layer order of ``Factors.dense``, restricted to ``factors``' layer blocks."""
    per_example = ekfac.per_example_layer_grads(net, state, x, y, "loss")
    flat = torch.cat([per_example[k].reshape(len(y), -1) for k in factors.layers], 1).double()
    return factors.block_diagonal(flat.T @ flat / len(y))


def mixed_eigenvalue_errors(net, state: dict, x, y, seed: int = 0) -> dict:
    """Exercise 3: EK-FAC with eigenvalues from another matrix than its eigenbasis.

    The factors (hence K-FAC and the eigenbasis) are fitted with the training labels ``y``; the "mixed" eigenvalues
    are the mean squared per-example gradients in that basis under labels sampled from the model
    (``sampled_labels(..., seed)``). Returns the relative Frobenius errors {"K-FAC", "EK-FAC", "mixed"} against the
    block-diagonal empirical Fisher (``empirical_fisher_blocks``), the matrix the factors describe: EK-FAC's is
    never above K-FAC's, the mixture's carries no such guarantee."""
    factors = ekfac.fit_factors(net, state, x, y, labels="empirical")
    target = empirical_fisher_blocks(factors, net, state, x, y)
    rotated = factors.rotate(ekfac.per_example_layer_grads(net, state, x, sampled_labels(net, state, x, seed), "loss"))
    mixed = dataclasses.replace(factors, lam={k: (rotated[k] ** 2).mean(0) for k in factors.layers})
    return {"K-FAC": ekfac.relative_error(factors.dense("kfac"), target),
            "EK-FAC": ekfac.relative_error(factors.dense("ekfac"), target),
            "mixed": ekfac.relative_error(mixed.dense("ekfac"), target)}


def best_of_other_rule(damping_table, curvature: str, chosen: dict) -> dict:
    """Exercise 4: the best tuning setting of the damping rule that was NOT chosen for ``curvature``.

    damping_table: chapter 04's sweep (columns "curvature", "labels", "damping rule", "damping", "LDS tune");
    chosen: the chosen setting ({"labels", "relative": bool, ...}). Among the rows of ``curvature`` with the chosen
    labels and the other rule, the one with the highest tuning LDS. Returns {"rule", "damping", "LDS tune",
    "chosen LDS tune"} (the last: the chosen setting's tuning LDS, the highest of ``curvature``'s rows with those
    labels). Raises ValueError when the other rule has no row."""
    rule = "absolute" if chosen["relative"] else "relative"
    same = damping_table[(damping_table["curvature"] == curvature) & (damping_table["labels"] == chosen["labels"])]
    other = same[same["damping rule"] == rule]
    if other.empty:
        raise ValueError(f"no {rule} damping of {curvature!r} with labels {chosen['labels']!r} in the table")
    row = other.loc[other["LDS tune"].idxmax()]
    return {"rule": rule, "damping": float(row["damping"]), "LDS tune": float(row["LDS tune"]),
            "chosen LDS tune": float(same["LDS tune"].max())}
