"""The reference answers of chapter 03's checked exercises (datamodels).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import numpy as np
import torch


def answers(budgets, lasso_lds, lasso_nonzero, ceiling_mean: float, last: int = 4) -> dict:
    """Chapter 03's checked exercise 5 (key 5), and the direction of the LASSO's median non-zero count (key 3).

    budgets: the budgets (numbers of models), increasing; lasso_lds: the LASSO's LDS means at them; lasso_nonzero:
    the LASSO's median number of non-zero weights per target at them; ceiling_mean: the noise ceiling's mean.
    3: "denser", "sparser" or "unchanged": the median non-zero count at the largest budget against the smallest
    (what section 4's table shows; exercise 3 itself is checked by ``kept_share``);
    5: the number of models m at which the line a + b log m, fitted by least squares to the ``last`` largest
    budgets (all of them if there are fewer), reaches 0.9 x ceiling_mean (inf when the fitted slope is not
    positive or fewer than two budgets are given)."""
    budgets = np.asarray(budgets, float)
    lasso_lds, lasso_nonzero = np.asarray(lasso_lds, float), np.asarray(lasso_nonzero, float)
    if not len(budgets) == len(lasso_lds) == len(lasso_nonzero) or len(budgets) == 0:
        raise ValueError(f"budgets, lasso_lds and lasso_nonzero must have one length > 0, got {len(budgets)}, "
                         f"{len(lasso_lds)}, {len(lasso_nonzero)}")
    if not (np.diff(budgets) > 0).all():
        raise ValueError(f"budgets must increase, got {budgets.tolist()}")
    first, final = lasso_nonzero[0], lasso_nonzero[-1]
    word = "denser" if final > first else "sparser" if final < first else "unchanged"
    m_90 = float("inf")
    if len(budgets) >= 2:
        slope, intercept = np.polyfit(np.log(budgets[-last:]), lasso_lds[-last:], 1)
        if slope > 0:
            with np.errstate(over="ignore"):  # a nearly flat line: inf, not a warning
                m_90 = float(np.exp((0.9 * ceiling_mean - intercept) / slope))
    return {3: word, 5: m_90}


def gradient_factor_ok(c_of_p, alphas=(0.3, 0.7), n: int = 40, m: int = 200, seed: int = 0,
                       rtol: float = 1e-5) -> bool:
    """Exercise 2, checked without showing its answer: True when ``c_of_p`` (a function of one float p, the share
    of subsets that hold an example) gives, for every example, the factor c_i in

        (X_c^T y_c / m)_i = c_i (ybar_in - ybar_out)_i

    (minus the first gradient of least squares at tau = 0, against the difference of means), on random subsets
    of size about alpha * n for each alpha in ``alphas`` and random outputs; p_i = m_i / m differs from example to
    example, so a constant that happens to fit one alpha does not pass. Raises whatever ``c_of_p`` raises (the
    exercise check reports it)."""
    g = torch.Generator().manual_seed(seed)
    for alpha in alphas:
        X = (torch.rand(m, n, generator=g) < alpha).double()
        y = torch.randn(m, generator=g, dtype=torch.float64)
        p = X.mean(0)
        if not bool(((p > 0) & (p < 1)).all()):
            raise RuntimeError("an example in every subset or in none: draw more subsets")
        grad0 = (X - p).T @ (y - y.mean()) / m
        y_in = X.T @ y / X.sum(0)
        y_out = (1 - X).T @ y / (1 - X).sum(0)
        factor = grad0 / (y_in - y_out)
        answer = torch.tensor([float(c_of_p(float(pi))) for pi in p], dtype=torch.float64)
        if not torch.allclose(answer, factor, rtol=rtol, atol=1e-12):
            return False
    return True


def kept_share(before, after) -> float:
    """Exercise 3: the share of the non-zero weights of ``before`` (n_train, T), pooled over targets, that are
    non-zero with the same sign in ``after`` (same shape), e.g. the LASSO datamodels at two budgets. NaN when
    ``before`` has no non-zero weight. Raises ValueError for shapes that differ."""
    before, after = torch.as_tensor(before), torch.as_tensor(after)
    if before.shape != after.shape:
        raise ValueError(f"weights of different shapes: {tuple(before.shape)} and {tuple(after.shape)}")
    found = before != 0
    if not bool(found.any()):
        return float("nan")
    return float((torch.sign(after)[found] == torch.sign(before)[found]).double().mean())
