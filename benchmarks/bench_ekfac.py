"""EK-FAC: factor fitting and scoring against kronfluence on the same model and CPU, as a ratio at equal scores.

Both fit EK-FAC factors of the course CNN (reference model 0 of the ``cpu`` setting) on the same training images with
the empirical Fisher (deterministic in both) and score the same targets with the same damping; the scores are
compared (mean per-target Spearman and largest difference) so that the time ratio is one at equal scores. Runs are
interleaved (ours, kronfluence, ours, ...) ``repeats`` times and the median of each is reported, because the machine
may be shared. Skipped with a message when kronfluence is not installed.

Usage: python benchmarks/bench_ekfac.py [n_train] [repeats] [threads]   (threads: torch threads for both, default all)
"""
import statistics
import sys
import time

import numpy as np
import torch

from course_lib import data as D, lds, settings, train
from course_lib.attribution import ekfac, ekfac_reference


def ours(net, state, x, y, xt, yt, damping):
    t0 = time.perf_counter()
    fac = ekfac.fit_factors(net, state, x, y, labels="empirical")
    t1 = time.perf_counter()
    res = ekfac.influence_scores(fac, net, state, x, y, xt, yt, dampings=[damping], kinds=["ekfac"])
    t2 = time.perf_counter()
    return res.scores[("ekfac", damping)], {"factors": t1 - t0, "scores": t2 - t1}


def main(n=4000, repeats=3, threads=0):
    if threads:
        torch.set_num_threads(threads)
    cfg = settings.get("cpu", device="cpu")
    data = D.for_setting(cfg)
    models = train.reference_models(cfg, data, 1)
    net, state = models.net.eval(), models.state_of(0)
    x, y, xt, yt = data.x_train[:n], data.y_train[:n], data.x_targets, data.y_targets
    damping = 1e-3
    print(f"EK-FAC, course CNN ({sum(v.numel() for v in state.values()):,} parameters), {len(y)} training images, "
          f"{len(yt)} targets, empirical Fisher, damping {damping:g}, {torch.get_num_threads()} threads")
    if not ekfac_reference.available():
        print("  kronfluence is not installed (pip install kronfluence==1.0.1): no reference to compare with")
        return
    ours(net, state, x[:64], y[:64], xt[:4], yt[:4], damping)  # warm-up
    times = {"ours": [], "kronfluence": []}
    for _ in range(repeats):
        s_ours, t = ours(net, state, x, y, xt, yt, damping)
        times["ours"].append(t)
        s_kf, t = ekfac_reference.kronfluence_scores(net, state, x, y, xt, yt, damping=damping)
        times["kronfluence"].append(t)
    s_kf = -s_kf / len(y)  # the course convention
    rho = float(np.mean(lds.spearman_columns(s_ours.double().numpy(), s_kf.double().numpy())))
    diff = float((s_ours - s_kf).abs().max() / s_ours.abs().max())
    print(f"  scores: mean per-target Spearman {rho:.6f}, largest difference {diff:.1e} of the largest score")
    med = {k: {part: statistics.median(t[part] for t in v) for part in ("factors", "scores")}
           for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:12s} factors {v['factors']:6.1f} s, scores {v['scores']:6.1f} s, total "
              f"{v['factors'] + v['scores']:6.1f} s (median of {repeats})")
    for part in ("factors", "scores"):
        print(f"  speed ratio kronfluence / ours, {part}: {med['kronfluence'][part] / med['ours'][part]:.2f}x")
    total = {k: v["factors"] + v["scores"] for k, v in med.items()}
    print(f"  speed ratio kronfluence / ours, total: {total['kronfluence'] / total['ours']:.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
