"""Chapter 05's worked exercise of the course text: TracIn is biased even for least squares.

Weighted least squares L(theta) = (1/2n) sum_i w_i (x_i . theta - y_i)^2, trained by full-batch gradient descent
from theta_0 = 0 with a constant step eta. The Hessian H = X^T X / n is the same at every step, so the unrolled
derivative of a target's prediction x_t . theta_T with respect to w_j has a closed product form, and TracIn is the
same sum with every product dropped. Everything is float64 and small (n of a few hundred, d of ten).
"""
from __future__ import annotations

import torch

DT = torch.float64


def problem(scales, n: int = 200, seed: int = 0) -> dict:
    """A least-squares problem whose d = len(scales) features have the given scales (badly conditioned when they
    spread): X (n, d), y = X beta + noise (n,), one target input x_t (d,), H = X^T X / n and the stable step
    eta = 1 / lambda_max(H)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.as_tensor(scales, dtype=DT)
    X = torch.randn(n, len(scales), generator=g, dtype=DT) * scales
    y = X @ torch.randn(len(scales), generator=g, dtype=DT) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    x_t = torch.randn(len(scales), generator=g, dtype=DT) * scales
    H = X.T @ X / n
    return {"X": X, "y": y, "x_t": x_t, "H": H, "eta": 1.0 / float(torch.linalg.eigvalsh(H).max())}


def gd_run(prob: dict, w: torch.Tensor, steps: int) -> list:
    """Full-batch gradient descent on the w-weighted loss from theta_0 = 0: [theta_0, ..., theta_steps].
    Differentiable in w (``torch.autograd.functional.jacobian`` through it is the independent reference)."""
    X, y = prob["X"], prob["y"]
    th = [torch.zeros(X.shape[1], dtype=DT)]
    for _ in range(steps):
        th.append(th[-1] - prob["eta"] * X.T @ (w * (X @ th[-1] - y)) / len(y))
    return th


def scores(prob: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, tracin), each (n,): d (x_t . theta_T) / d w_j at w = 1 for every j, exact (the product formula
    -eta/n sum_t x_t^T (I - eta H)^(T-1-t) g_j(theta_t), built backwards as an adjoint) and TracIn's version with
    every product replaced by I. g_j(theta) = x_j (x_j . theta - y_j)."""
    X, y, x_t, H, eta = prob["X"], prob["y"], prob["x_t"], prob["H"], prob["eta"]
    n = len(y)
    th = gd_run(prob, torch.ones(n, dtype=DT), steps)
    exact, tracin = torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT)
    a = x_t.clone()  # adjoint x_t^T (I - eta H)^(T-1-t)
    for t in range(steps - 1, -1, -1):
        G = X * (X @ th[t] - y)[:, None]  # (n, d) per-example gradients g_j(theta_t)
        exact -= eta / n * G @ a
        tracin -= eta / n * G @ x_t
        a = a - eta * H @ a
    return exact, tracin


def at_optimum(prob: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(influence, gradient dot product), each (n,), at the least-squares solution theta*: the limits of the exact
    derivative (-x_t^T H^{-1} g_j(theta*) / n) and of TracIn's direction (-x_t^T g_j(theta*) / n) as T grows."""
    X, y, x_t, H = prob["X"], prob["y"], prob["x_t"], prob["H"]
    G = X * (X @ torch.linalg.solve(H, X.T @ y / len(y)) - y)[:, None]
    return -G @ torch.linalg.solve(H, x_t) / len(y), -G @ x_t / len(y)
