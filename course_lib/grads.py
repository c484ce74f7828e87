"""Per-example gradients, Hessian-vector products and flattening helpers (torch.func).

Everything differentiates the parameters that the forward pass actually uses: ``functional_call(net, state, x)``
with ``state`` a dict of tensors, never a detached copy. ``state`` is a model's full state (``Models.state_of``):
its parameters, which are differentiated, and its buffers (batch-norm running statistics), which are held fixed;
the module is put in eval mode, so batch norm uses the trained statistics, as the model does at test time.
Gradients, Hessians and flat vectors cover the parameters only, in the order of ``net.named_parameters()``.
The training objective is the one SGD minimises: mean cross-entropy over the training set plus
(weight_decay / 2) * ||theta||^2.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, jvp, vmap

from . import measure


def _load_forward_ad_quietly() -> None:
    """The first forward-mode product (``jvp``, and so every Hessian here) makes PyTorch script its jvp
    decompositions with ``torch.jit.script``, which warns that ``torch.jit.script`` is deprecated: a notice about
    PyTorch's internals, nothing this code or a learner can act on. Load them once here with that one warning
    silenced (the later import is a no-op); every other warning still shows."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        from torch._decomp import decompositions_for_jvp  # noqa: F401


_load_forward_ad_quietly()


def flatten(tensors: dict) -> torch.Tensor:
    """Concatenate a dict of tensors into one vector (in the dict's order)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    """Split a vector (p,) back into tensors shaped like ``like``."""
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i:i + t.numel()].view_as(t)
        i += t.numel()
    if i != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, parameters have {i}")
    return out


def unflatten_rows(rows: torch.Tensor, like: dict) -> dict:
    """Split each row of (R, p) into tensors shaped like ``like``: {name: (R, *shape)} (stacked ``unflatten``)."""
    out, i = {}, 0
    for k, t in like.items():
        out[k] = rows[:, i:i + t.numel()].reshape(len(rows), *t.shape)
        i += t.numel()
    if i != rows.shape[1]:
        raise ValueError(f"rows have {rows.shape[1]} entries, parameters have {i}")
    return out


def split_state(net, state: dict) -> tuple[dict, dict]:
    """(parameters, buffers) of a full state: the entries named like ``net``'s parameters, in that order, and the
    rest. Puts ``net`` in eval mode (attribution evaluates the trained model as it is used at test time)."""
    net.eval()
    names = [k for k, _ in net.named_parameters() if k in state]
    if not names:
        raise ValueError(f"the state holds none of the module's parameters (got keys {list(state)[:5]}...)")
    params = {k: state[k] for k in names}
    return params, {k: v for k, v in state.items() if k not in params}


def _example_fn(net, fn: str):
    f = measure.get(fn)

    def one(params, x, y):
        return f(functional_call(net, params, (x.unsqueeze(0),)), y.unsqueeze(0)).squeeze(0)
    return one


def per_example_grads(net, params: dict, x, y, fn: str = "loss", batch_size: int = 512,
                      names=None) -> torch.Tensor:
    """(n, p) gradients of ``fn`` ('loss' or 'margin') of each example with respect to the parameters.

    params: the model's full state (``Models.state_of``; buffers are held fixed). names: restrict to these
    parameter names (the others are held fixed); default: all parameters, in the module's order.
    Raises FloatingPointError if a gradient is not finite.
    """
    theta, buffers = split_state(net, params)
    state = {k: v.detach() for k, v in {**theta, **buffers}.items()}
    names = list(theta) if names is None else list(names)
    one = _example_fn(net, fn)

    def g(sub, x1, y1):
        return flatten(grad(lambda p: one({**state, **p}, x1, y1))(sub))

    batched = vmap(g, in_dims=(None, 0, 0))
    sub = {k: state[k] for k in names}
    out = torch.cat([batched(sub, xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))])
    return check_finite(out, f"per-example gradients of the {fn}")


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Return t, or raise FloatingPointError saying how many entries of ``what`` are NaN or infinite."""
    bad = ~torch.isfinite(t)
    if bad.any():
        raise FloatingPointError(f"{what}: {int(bad.sum())} of {t.numel()} entries are NaN or infinite")
    return t


def objective(net, params: dict, x, y, weight_decay: float = 0.0, batch_size: int = 1000):
    """Mean cross-entropy over (x, y) plus (weight_decay / 2) ||theta||^2 (parameters only, not buffers).

    params: a full state or the parameters alone."""
    theta, _ = split_state(net, params)
    total = sum(measure.loss(functional_call(net, params, (xb,)), yb).sum()
                for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return total / len(y) + 0.5 * weight_decay * sum((p ** 2).sum() for p in theta.values())


def hvp(net, params: dict, x, y, v: torch.Tensor, weight_decay: float = 0.0, batch_size: int = 1000):
    """Hessian of ``objective`` times a flat vector v (p,), by forward-over-reverse (jvp of grad)."""
    return hvps(net, params, x, y, v[:, None], weight_decay, batch_size)[:, 0]


def hessian(net, params: dict, x, y, weight_decay: float = 0.0) -> torch.Tensor:
    """The explicit (p, p) Hessian of ``objective``, for models small enough.

    Computed by reverse-over-reverse differentiation (``torch.func.hessian``), independently of the
    forward-over-reverse products of ``hvp``/``hvps``, so each can check the other.
    """
    theta, buffers = split_state(net, params)
    theta = {k: p.detach() for k, p in theta.items()}
    flat = flatten(theta)
    return torch.func.hessian(lambda w: objective(net, {**unflatten(w, theta), **buffers}, x, y, weight_decay))(flat)


def hvps(net, params: dict, x, y, V: torch.Tensor, weight_decay: float = 0.0, batch_size: int = 1000,
         chunk: int = 64) -> torch.Tensor:
    """Hessian of ``objective`` times many vectors at once: V (p, T) -> (p, T).

    Forward-over-reverse products (jvp of grad), vmapped over the columns of V (``chunk`` columns at a time,
    which bounds the memory: activations are held for ``chunk`` tangents of a ``batch_size`` batch).
    """
    theta, buffers = split_state(net, params)
    theta = {k: p.detach() for k, p in theta.items()}
    if V.ndim != 2:
        raise ValueError(f"V must have shape (p, T), got {tuple(V.shape)}")
    out = torch.zeros_like(V)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        g = grad(lambda p: objective(net, {**p, **buffers}, xb, yb) * len(yb) / len(y))
        one = lambda t: flatten(jvp(g, (theta,), (unflatten(t, theta),))[1])
        for s in range(0, V.shape[1], chunk):
            out[:, s:s + chunk] += vmap(one, in_dims=1, out_dims=1)(V[:, s:s + chunk])
    return out + weight_decay * V
