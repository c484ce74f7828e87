"""The reference answers of chapter 03's checked exercises (datamodels).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

import numpy as np


def answers(budgets, lasso_lds, lasso_nonzero, ceiling_mean: float, last: int = 4) -> dict:
    """Chapter 03's checked exercises 3 and 5, answered from the chapter's run.

    budgets: the budgets (numbers of models), increasing; lasso_lds: the LASSO's LDS means at them; lasso_nonzero:
    the LASSO's median number of non-zero weights per target at them; ceiling_mean: the noise ceiling's mean.
    3: "denser", "sparser" or "unchanged": the median non-zero count at the largest budget against the smallest;
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
