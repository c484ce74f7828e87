"""Training throughput of the `cpu` recipe's small CNN: models per minute, GFLOP/s, and that as a share of what the
machine does on a dense matrix product, measured in the same run.

Three ways to train the same models (same seeds, subsets of 2,000 images, initialisations and minibatches):
  plain loop          the loop a learner would write: an nn.Module and torch.optim.SGD, one model after the other;
  ensemble, vmap      E models at a time, one ``torch.func.vmap`` over ``functional_call`` per step (the trainer's
                      generic path, what every architecture without a stacked forward uses);
  ensemble, stacked   E models at a time through ``SmallCNN.forward_stacked``: grouped convolutions over
                      channels-last activations, batched matrix products for the linear layers (the default path).
The ensemble rows run for several ensemble sizes E, interleaved over ``rounds`` (the median is reported), so that
a noisy shared machine hits every row alike. FLOPs per training image (forward and backward) are counted by
``torch.utils.flop_counter.FlopCounterMode`` on one step of one model; the reference rate is a 2048 x 2048 float32
matrix product. Asserts nothing about time; prints how far the models trained each way are apart.
Usage: python benchmarks/bench_ensemble.py [n_models] [rounds] [epochs]
"""
import statistics
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from course_lib import data as D, lds, models, settings, train

SIZES = (8, 16, 32)


def plain_loop(cfg, data, masks, seeds):
    nets = []
    for mask, seed in zip(masks, seeds):
        torch.manual_seed(int(seed))
        model = train.build_model(cfg, data)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
        batches = train.batch_order(int(seed), torch.nonzero(mask).flatten(), cfg.epochs, cfg.batch_size)
        lrs = train.lr_schedule(cfg, len(batches))
        for lr, idx in zip(lrs, batches):
            for g in opt.param_groups:
                g["lr"] = float(lr)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        nets.append(model.eval())
    return nets


@contextmanager
def vmap_layout():
    """Train through the generic vmapped forward instead of SmallCNN.forward_stacked."""
    stacked = models.SmallCNN.forward_stacked
    del models.SmallCNN.forward_stacked
    try:
        yield
    finally:
        models.SmallCNN.forward_stacked = stacked


def flops_per_image(cfg, data):
    model = train.build_model(cfg, data)
    x, y = data.x_train[:cfg.batch_size], data.y_train[:cfg.batch_size]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / cfg.batch_size


def matmul_rate(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def main(n_models=32, rounds=1, epochs=None):
    cfg = settings.get("cpu", device="cpu", **({"epochs": epochs} if epochs else {}))
    data = D.for_setting(cfg)
    masks = lds.subset_masks(data.n_train, n_models, 0.5, seed=0, stream="benchmark")
    seeds = train.stream_seeds("benchmark", n_models)
    flops = flops_per_image(cfg, data) * int(masks.sum()) * cfg.epochs  # all models' training
    peak = matmul_rate()
    times = {}

    def timed(label, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(label, []).append(time.perf_counter() - t0)
        return out

    nets = timed("plain loop (one model at a time)", lambda: plain_loop(cfg, data, masks, seeds))
    trained = {}
    for _ in range(rounds):
        for E in SIZES:
            c = cfg.replace(ensemble_size=E)
            with vmap_layout():
                trained["vmap", E] = timed(f"ensemble, vmap, E = {E}", lambda: train.train_models(c, data, masks, seeds))
            trained["stacked", E] = timed(f"ensemble, stacked, E = {E}",
                                          lambda: train.train_models(c, data, masks, seeds))
    peak = (peak + matmul_rate()) / 2
    print(f"{n_models} small CNNs ({flops / n_models / 1e9:.1f} GFLOP each: {cfg.epochs} epochs on subsets of "
          f"{int(masks[0].sum())} images), {torch.get_num_threads()} threads; dense float32 matmul "
          f"{peak / 1e9:.0f} GFLOP/s; median of {rounds} interleaved round(s)")
    base = statistics.median(times["plain loop (one model at a time)"])
    for label, ts in times.items():
        t = statistics.median(ts)
        print(f"  {label:34s} {60 * n_models / t:7.1f} models/min  {flops / t / 1e9:6.1f} GFLOP/s "
              f"({flops / t / peak:5.1%} of matmul)  {base / t:4.2f}x the plain loop")
    acc = lambda ms: ms.accuracy(data.x_test, data.y_test)
    with torch.no_grad():
        plain = torch.stack([(m(data.x_test).argmax(1) == data.y_test).float().mean() for m in nets])
    for key, ms in sorted(trained.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        a = acc(ms)
        print(f"  test accuracy {key[0]:7s} E = {key[1]:2d}: {a.mean():.4f} (plain loop {plain.mean():.4f}), "
              f"largest per-model difference {(a - plain).abs().max():.4f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
