"""Exact unrolling: all targets at once (``unroll.unrolled_scores``) vs a naive per-target loop, as a ratio.

Both compute the same thing, score[i, t] = d margin_t(theta_T) / d w_i through the last ``steps`` steps of the ``cpu``
setting's recorded training run (the course CNN, 4,000 images), for ``targets`` targets:
- batched: every step's gradient-map vector-Jacobian product is built once (torch.func.vjp) and applied to all the
  targets' cotangents at once (vmap, 20 at a time);
- naive: for each target separately, every step rebuilds the batch gradient with autograd (create_graph) and
  differentiates it once more (double backward) with that target's cotangent.
The scores are compared (largest difference relative to the largest score) so the ratio is at equal results. The
full cost (every step, every target of the setting) is extrapolated from the batched time per step and target
chunk; ``--full`` measures it instead (minutes).

Usage: python benchmarks/bench_unroll.py [steps] [targets] [--full]    (defaults: 10 steps, 20 targets)
"""
import sys
import time

import torch
from torch.func import functional_call

from course_lib import data as D, grads, measure, settings, train
from course_lib.attribution import unroll


def naive(traj, x, y, xt, yt, last):
    """One target at a time, the same recursion with autograd double backward."""
    net, like, buffers = traj.net.eval(), traj.like, traj.buffers
    mu, wd = traj.momentum, traj.weight_decay
    gf = grads.per_example_grads(net, traj.state_at(traj.steps), xt, yt, "margin")
    out = torch.zeros(traj.n_train, len(yt), dtype=gf.dtype)
    for k in range(len(yt)):
        a_th, a_m = gf[k].clone(), torch.zeros_like(gf[k])
        for t in range(traj.steps - 1, traj.steps - 1 - last, -1):
            b = traj.batches[t]
            lr = float(traj.lrs[t])
            theta = traj.thetas[t].clone().requires_grad_()
            w = traj.weights[b].clone().requires_grad_()
            logits = functional_call(net, {**grads.unflatten(theta, like), **buffers}, (x[b],))
            loss = (w * measure.loss(logits, y[b])).sum() / len(b)
            g = torch.autograd.grad(loss, theta, create_graph=True)[0]
            a_bar = a_m - lr * mu * a_th
            c = a_bar - lr * a_th
            hc, dw = torch.autograd.grad(g, (theta, w), grad_outputs=c)
            a_th = a_th + hc + wd * c
            a_m = mu * a_bar
            out[b, k] += dw
    return out


def main(steps=10, targets=20, full=False):
    cfg = settings.get("cpu", device="cpu")
    data = D.for_setting(cfg)
    t0 = time.perf_counter()
    traj = train.record_training(cfg, data, seed=0)
    t_train = time.perf_counter() - t0
    p = traj.thetas.shape[1]
    print(f"exact unrolling, course CNN ({p:,} parameters), {data.n_train} training images, {traj.steps} SGD steps "
          f"(Nesterov momentum {cfg.momentum}, weight decay {cfg.weight_decay}); recorded training {t_train:.0f} s, "
          f"trajectory {traj.thetas.numel() * traj.thetas.element_size() / 2 ** 20:.0f} MiB; "
          f"{torch.get_num_threads()} threads")
    x, y = data.x_train, data.y_train
    xt, yt = data.x_targets[:targets], data.y_targets[:targets]
    unroll.unrolled_scores(traj, x, y, xt[:2], yt[:2], last=1)  # warm-up
    t0 = time.perf_counter()
    fast = unroll.unrolled_scores(traj, x, y, xt, yt, last=steps).scores
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = naive(traj, x, y, xt, yt, steps)
    t_slow = time.perf_counter() - t0
    diff = float((fast - slow).abs().max() / slow.abs().max())
    print(f"  last {steps} steps, {targets} targets: batched {t_fast:.1f} s, naive per-target loop {t_slow:.1f} s, "
          f"ratio {t_slow / t_fast:.1f}x; largest difference {diff:.1e} of the largest score")
    T = cfg.n_targets
    est = t_fast / steps / targets * traj.steps * T
    print(f"  all {traj.steps} steps and {T} targets, extrapolated: batched {est / 60:.1f} min, naive "
          f"{est * t_slow / t_fast / 60:.1f} min")
    if full:
        res = unroll.unrolled_scores(traj, x, y, data.x_targets, data.y_targets, progress=True)
        print(f"  measured, every step and all {T} targets: {res.seconds:.0f} s ({res.seconds / 60:.1f} min)")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(*(int(a) for a in args), full="--full" in sys.argv)
