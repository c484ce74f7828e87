"""Ensemble trainer vs one model at a time: models per minute, same models, cpu setting, subsets of 2,000.

The baseline is the plain PyTorch loop a learner would write: an nn.Module, torch.optim.SGD, one model after the
other (same recipe, same initialisation and minibatches, so the two produce the same models).
Usage: python benchmarks/bench_ensemble.py [n_models]
"""
import sys
import time

import torch
import torch.nn.functional as F

from course_lib import data as D, lds, settings, train


def plain_loop(cfg, data, masks, seeds):
    accs = []
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
        with torch.no_grad():
            accs.append((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return torch.stack(accs)


def main(n_models=32):
    cfg = settings.get("cpu", device="cpu", ensemble_size=n_models)
    data = D.for_setting(cfg)
    masks = lds.subset_masks(data.n_train, n_models, 0.5, seed=0, stream="benchmark")
    seeds = train.stream_seeds("benchmark", n_models)
    t0 = time.perf_counter()
    acc_plain = plain_loop(cfg, data, masks, seeds)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc_ens = train.train_models(cfg, data, masks, seeds).accuracy(data.x_test, data.y_test)
    t_ens = time.perf_counter() - t0
    print(f"{n_models} small CNNs, {cfg.epochs} epochs on subsets of {int(masks[0].sum())} images, "
          f"{torch.get_num_threads()} threads")
    print(f"one at a time (plain loop): {60 * n_models / t_plain:6.1f} models/min ({t_plain:.1f} s)")
    print(f"ensemble trainer (vmap):    {60 * n_models / t_ens:6.1f} models/min ({t_ens:.1f} s)")
    print(f"speed-up: {t_plain / t_ens:.2f}x")
    print(f"test accuracy: plain {acc_plain.mean():.4f} +- {acc_plain.std():.4f}, "
          f"ensemble {acc_ens.mean():.4f} +- {acc_ens.std():.4f}, "
          f"max per-model difference {(acc_plain - acc_ens).abs().max():.4f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
