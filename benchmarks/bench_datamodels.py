"""Benchmark: fitting LASSO datamodels for all targets at once (batched FISTA in torch) against fitting the
targets one by one with scikit-learn's LassoCV (coordinate descent), on the same penalty grid and folds.

The problem has the shape of the cpu setting: 4,000 training examples, 200 targets, 400 trained models (the
budget the cpu chapter reached on the shared build machine; pass another number as the argument), with
synthetic outputs (a sparse planted datamodel plus strong noise, like single-model margins). scikit-learn is timed
on a few targets and its per-target time is scaled to all of them. Prints the speed-up as a ratio; asserts
nothing about time. Usage: python benchmarks/bench_datamodels.py [n_models]
"""
import sys
import time

import numpy as np
import torch
from sklearn.linear_model import LassoCV

from course_lib import lds
from course_lib.attribution import datamodels as dm

N_TRAIN, N_TARGETS, SK_TARGETS, CV, N_PEN, EPS = 4000, 200, 3, 3, 10, 1e-2


def problem(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = lds.subset_masks(N_TRAIN, m, 0.5, seed, stream="bench")
    w = torch.zeros(N_TRAIN, N_TARGETS)
    for t in range(N_TARGETS):
        w[torch.randperm(N_TRAIN, generator=g)[:40], t] = 0.3 * torch.randn(40, generator=g)
    y = masks.float() @ w + 1.5 * torch.randn(m, N_TARGETS, generator=g)
    return masks, y


def main(m=400):
    masks, y = problem(m)
    print(f"LASSO datamodels, {N_TRAIN} training examples x {N_TARGETS} targets, {m} models, "
          f"{CV}-fold CV over {N_PEN} penalties; torch threads: {torch.get_num_threads()}")
    t0 = time.perf_counter()
    fit = dm.fit_lasso(masks, y, cv=CV, n_penalties=N_PEN, eps=EPS)
    batched = time.perf_counter() - t0
    print(f"batched (all {N_TARGETS} targets at once): {batched:.1f} s ({fit.iterations} FISTA steps)")

    X = masks.double().numpy()
    folds = dm._folds(m, CV, 0)
    splits = [(np.setdiff1d(np.arange(m), f.numpy()), f.numpy()) for f in folds]
    t0 = time.perf_counter()
    diffs, same = [], 0
    for t in range(SK_TARGETS):
        ref = LassoCV(alphas=fit.penalties[t].numpy(), cv=splits, tol=1e-4).fit(X, y[:, t].double().numpy())
        diffs.append(np.abs(ref.coef_ - fit.weights[:, t].numpy()).max() / max(np.abs(ref.coef_).max(), 1e-12))
        same += bool(np.isclose(ref.alpha_, float(fit.penalty[t])))
    per_target = (time.perf_counter() - t0) / SK_TARGETS
    sk_all = per_target * N_TARGETS
    print(f"scikit-learn LassoCV one target at a time: {per_target:.2f} s per target, "
          f"{sk_all:.0f} s for all {N_TARGETS} (timed on {SK_TARGETS}, scaled)")
    print(f"agreement on the timed targets: same penalty chosen for {same}/{SK_TARGETS}, "
          f"max relative weight difference {max(diffs):.1e}")
    print(f"speed-up of the batched fit: {sk_all / batched:.1f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
