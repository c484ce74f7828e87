"""Chapter 01 speed: per-example gradients with torch.func (vmap of grad) against a plain loop of backward() calls,
and batched Hessian-vector products (vmapped over the vectors) against one product at a time. Prints throughput and
ratios; asserts nothing about time (the numbers depend on the machine and its load)."""
import time

import torch

from course_lib import data as datasets, grads, measure, settings, train

cfg = settings.get("cpu", device="cpu")
data = datasets.for_setting(cfg)
torch.manual_seed(0)
net = train.build_model(cfg, data)
params = {k: v.detach() for k, v in net.named_parameters()}
x, y = data.x_train[:1024], data.y_train[:1024]


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def loop_backward(n):
    rows = []
    for i in range(n):
        net.zero_grad()
        measure.loss(net(x[i:i + 1]), y[i:i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    return torch.stack(rows)


n_loop = 256
check = grads.per_example_grads(net, params, x[:8], y[:8], batch_size=8)
assert torch.allclose(check, loop_backward(8), atol=1e-5)  # same numbers, then compare speed

print(f"small CNN, {sum(v.numel() for v in params.values()):,} parameters, {torch.get_num_threads()} threads")
t_loop = best_of(lambda: loop_backward(n_loop)) / n_loop
print(f"{'loop of backward() calls':>36}: {1 / t_loop:8.0f} examples/s  (ratio 1.0)")
for bs in (64, 256):
    t_vmap = best_of(lambda: grads.per_example_grads(net, params, x, y, batch_size=bs)) / len(y)
    print(f"{f'vmap(grad), batches of {bs}':>36}: {1 / t_vmap:8.0f} examples/s  (ratio {t_loop / t_vmap:.1f}x)")

xs, ys = data.x_train[:500], data.y_train[:500]
V = torch.randn(sum(v.numel() for v in params.values()), 16)
t_one = best_of(lambda: [grads.hvp(net, params, xs, ys, V[:, j], cfg.weight_decay) for j in range(16)], 2)
t_many = best_of(lambda: grads.hvps(net, params, xs, ys, V, cfg.weight_decay, chunk=16), 2)
print(f"Hessian-vector products, 16 vectors x {len(ys)} examples: one at a time {t_one:.2f} s, "
      f"vmapped {t_many:.2f} s (ratio {t_one / t_many:.1f}x)")
