"""Batch-norm models side by side (torch.func vmap, buffers batched) vs one at a time: ResNet-9 on CIFAR-shaped data.

The gpu setting's model family (ResNet-9 with batch norm, the gpu recipe: triangle schedule, lr 0.4) on random
3 x 32 x 32 images of 2 classes (no dataset needed), narrow (width 4 by default) so that a CPU runs it. Three ways
to train the same n models (same seeds, masks, initialisations and batches):
  one at a time       ensemble_size=1: n separate groups, each the plain functional_call path;
  loop in one group   ensemble_size=n, every step a Python loop over the n models (what train.py did for models
                      with buffers before they were vmapped);
  side by side        ensemble_size=n, one vmapped forward/backward per step (buffers stacked and mapped too).
Prints the time of each and the speed ratios, and how far the models are apart. Asserts nothing about time.
Usage: python benchmarks/bench_bn_ensemble.py [n_models] [width] [batch_size] [epochs] [device]
(the gpu setting's own size on a GPU: ... 4 64 512 1 cuda)
"""
import sys
import time

import torch

from course_lib import data as D, lds, settings, train


def fake_data(n_train=200, n_test=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.arange(n_train + n_test) % 2
    x += 0.5 * (2 * y.float() - 1)[:, None, None, None]  # learnable: class shifts the pixels
    return D.Data("fake-cifar2", x[:n_train], y[:n_train], x[n_train:], y[n_train:], torch.arange(0, n_test, 10),
                  ("cat", "dog"))


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return out, best


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(n_models=4, width=4, batch_size=50, epochs=4, device="cpu"):
    data = fake_data(n_train=max(200, 4 * batch_size))  # subsets of half of it: at least 2 batches
    cfg = settings.get("gpu", device=device, width=width, epochs=epochs, batch_size=batch_size)
    masks = lds.subset_masks(data.n_train, n_models, 0.5, seed=0, stream="benchmark")
    seeds = train.stream_seeds("benchmark", n_models)
    run = lambda e: train.train_models(cfg.replace(ensemble_size=e), data, masks, seeds)
    alone, t_alone = timed(lambda: run(1))
    together, t_together = timed(lambda: run(n_models))
    vmapped = train._forward
    train._forward = lambda *a, **k: vmapped(*a, **{**k, "together": False})
    try:
        looped, t_loop = timed(lambda: run(n_models))
    finally:
        train._forward = vmapped
    steps = len(alone.lrs)
    where = f"{torch.get_num_threads()} threads" if device == "cpu" else device
    print(f"{n_models} ResNet-9 (width {width}, batch norm), {steps} steps of batch {batch_size} on 3x32x32 images, "
          f"{where}")
    print(f"one at a time:      {t_alone:6.2f} s")
    print(f"loop in one group:  {t_loop:6.2f} s  ({t_alone / t_loop:.2f}x one at a time)")
    print(f"side by side: vmap  {t_together:6.2f} s  ({t_alone / t_together:.2f}x one at a time)")
    diff = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    print(f"largest difference to one at a time: parameters {diff(together.params, alone.params):.1e} (vmap), "
          f"{diff(looped.params, alone.params):.1e} (loop); running statistics "
          f"{diff(together.buffers, alone.buffers):.1e} (vmap)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:5]), *sys.argv[5:6])
