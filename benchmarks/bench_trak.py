"""TRAK: featurize-and-score throughput against the reference implementation's CPU path, and LDS per minute.

1. Throughput: ``trak.trak`` vs ``traker`` (MadryLab's package, its CPU path: BasicProjector with a Gaussian
   matrix, float32) on the same trained model, the same training and target images and the same k; examples
   featurized and scored per second, as a ratio. Skipped with a message when traker is not installed.
2. LDS per minute of compute for M = 1, 5, 10 models (cpu setting, cached reference models and ground truth):
   TRAK's own featurize-and-solve time, and with the (estimated) training time of the M models added.

Usage: python benchmarks/bench_trak.py [n_train_for_throughput] [k_throughput] [k_lds]
"""
import sys
import time

import torch

from course_lib import data as D, lds, settings, train
from course_lib.attribution import trak as T


def throughput(cfg, data, models, n, k):
    one = models.select([0])
    x, y = data.x_train[:n], data.y_train[:n]
    xt, yt = data.x_targets, data.y_targets
    T.trak(one, x[:64], y[:64], xt[:8], yt[:8], proj_dim=k, progress=False)  # warm-up (first vmap call)
    t0 = time.perf_counter()
    ours = T.trak(one, x, y, xt, yt, proj_dim=k, kind="gaussian", progress=False)
    t_ours = time.perf_counter() - t0
    print(f"throughput, 1 model, {n} training + {len(yt)} target images, k = {k}, {torch.get_num_threads()} threads:")
    print(f"  ours (course_lib.attribution.trak): {(n + len(yt)) / t_ours:7.1f} images/s ({t_ours:.1f} s)")
    try:
        import trak  # noqa: F401
    except ImportError:
        print("  traker is not installed (pip install traker==0.3.2): no reference to compare with")
        return
    # traker's damping in its units: its features are ours * sqrt(k / p) (no 1/sqrt(k) in P, then / sqrt(p))
    p = sum(v[0].numel() for v in one.params.values())
    feats = T.featurize(one.net, one.state_of(0), x, y, T.RandomProjection(p, k, "gaussian", seed=0))
    lam = 1.0 * float((feats.double() ** 2).sum()) / p
    theirs, t_theirs = T.traker_scores(one, x, y, xt, yt, proj_dim=k, projection="traker", lambda_reg=lam)
    print(f"  traker 0.3.2 CPU path:              {(n + len(yt)) / t_theirs:7.1f} images/s ({t_theirs:.1f} s)")
    print(f"  speed ratio ours / traker: {t_theirs / t_ours:.2f}x")
    rho = lds.spearman_columns(ours.scores().double().numpy(), theirs.double().numpy()).mean()
    print(f"  (same damping, different random projections: mean per-target Spearman {rho:.3f})")


def lds_per_minute(cfg, data, models, k):
    gt = lds.build_ground_truth(cfg, data)
    train_sec = 2 * gt.seconds / (gt.m * gt.k)  # ground-truth models see half the data
    res = T.trak(models, data.x_train, data.y_train, data.x_targets, data.y_targets, proj_dim=k, progress=False)
    print(f"LDS per minute, {data.n_train} training images, {len(data.target_idx)} targets, k = {k}:")
    for m in (1, 5, 10):
        if m > len(models):
            break
        s = lds.lds(res.scores(m=m), gt)
        minutes = res.time(m) / 60
        with_training = minutes + m * train_sec / 60
        print(f"  M = {m:2d}: LDS {s}  TRAK {minutes:5.2f} min -> {s.mean / minutes:6.3f} LDS/min; "
              f"with training {with_training:5.2f} min -> {s.mean / with_training:6.3f} LDS/min")


def main(n=2000, k=2048, k_lds=1024):
    cfg = settings.get("cpu", device="cpu")
    data = D.for_setting(cfg)
    models = train.reference_models(cfg, data, 10)
    throughput(cfg, data, models, n, k)
    lds_per_minute(cfg, data, models, k_lds)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
