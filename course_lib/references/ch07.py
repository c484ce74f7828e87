"""The reference answers of chapter 07's checked exercises (the landscape).

Why they live here: see ``course_lib.references``.
"""
from __future__ import annotations

from .. import landscape

FAST_BUDGET = 10.0  # exercise 2's budget (total seconds, with training 10 times cheaper)


def answers(table) -> dict:
    """Chapter 07's checked exercises, answered from its landscape table (a pandas DataFrame with the columns
    "method", "seed-averaged" (LDS results with ``.mean``), "attribution s", "training s", "total s" and
    "identical class"). 1: the best method within the table's median total seconds; 2: the best within
    ``FAST_BUDGET`` seconds if training were 10 times cheaper; 3: how many rows pass the identical-class test at 90%
    or more with an LDS below 40% of the best one's."""
    lds_means = table["seed-averaged"].map(lambda s: s.mean).to_numpy(float)
    fast_total = table["attribution s"].to_numpy(float) + table["training s"].to_numpy(float) / 10
    return {1: landscape.best_within(table["method"], lds_means, table["total s"], float(table["total s"].median())),
            2: landscape.best_within(table["method"], lds_means, fast_total, FAST_BUDGET),
            3: int(((table["identical class"].to_numpy(float) >= 0.9) & (lds_means < 0.4 * lds_means.max())).sum())}
