"""Training: one recipe per setting, and an ensemble trainer that trains many models at once.

Models are held functionally: a module skeleton plus a dict of parameters stacked along a leading model axis,
``params[name].shape == (E, *shape)``. SGD with momentum and weight decay acts elementwise, so one optimizer over
the stacked tensors is exactly E independent optimizers; ``torch.func.vmap`` over ``functional_call`` runs the E
forward passes as one batched computation, batch norm included (its running statistics are stacked buffers, updated
per model). A single model is the case E = 1 and takes the plain (un-vmapped) path.

Everything is seeded per model: model ``seed`` gets its initialisation from ``torch.manual_seed(seed)`` and its
batch order from ``batch_order(seed, ...)``, so a model comes out the same whether it is trained alone or with
others (up to the float arithmetic of batched convolutions).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from . import measure as measures
from . import models
from .cache import atomic_save, cache_dir, cache_key
from .data import Data
from .settings import Setting


def build_model(cfg: Setting, data: Data) -> torch.nn.Module:
    """A freshly initialised model of the setting's architecture (uses torch's global RNG)."""
    return models.build(cfg.arch, data.in_shape, data.num_classes, width=cfg.width, depth=cfg.depth)


def lr_schedule(cfg: Setting, total_steps: int, lr: float | None = None) -> torch.Tensor:
    """The learning rate of every step: 'linear' decays from lr to 0, 'triangle' warms up over the first
    fifth and then decays linearly, 'constant' stays at lr."""
    lr = cfg.lr if lr is None else lr
    t = torch.arange(total_steps, dtype=torch.float64)
    if cfg.schedule == "constant":
        return torch.full((total_steps,), lr, dtype=torch.float64)
    if cfg.schedule == "linear":
        return lr * (1 - t / total_steps)
    peak = max(1, total_steps // 5)
    return lr * torch.where(t < peak, (t + 1) / peak, (total_steps - t) / (total_steps - peak))


def batch_order(seed: int, subset: torch.Tensor, epochs: int, batch_size: int) -> list[torch.Tensor]:
    """The minibatches (indices into the training pool) that model ``seed`` sees, in order.

    Each epoch is a fresh permutation of ``subset``; the last batch of an epoch may be smaller.
    Replaying training step by step (the unrolling chapters) calls this to get the same batches.
    """
    g = torch.Generator().manual_seed(int(seed))
    batches = []
    for _ in range(epochs):
        perm = subset[torch.randperm(len(subset), generator=g)]
        batches += list(perm.split(batch_size))
    return batches


@dataclass
class Models:
    """E trained models of one architecture.

    params / buffers: dicts of tensors stacked on a leading axis of length E.
    seeds: (E,) the seed of each model; masks: (E, n_train) bool, the training subset of each model.
    checkpoints: list of (step, params) snapshots taken during training (stacked like ``params``);
    lrs: (steps,) the learning rate used at every step; steps_per_epoch, for replaying training.
    """
    net: torch.nn.Module
    params: dict
    buffers: dict
    seeds: torch.Tensor
    masks: torch.Tensor
    checkpoints: list = field(default_factory=list)
    lrs: torch.Tensor | None = None

    def __len__(self):
        return len(self.seeds)

    def params_of(self, i: int) -> dict:
        """Model i's trainable parameters only (for training; attribute through ``state_of``)."""
        return {k: v[i] for k, v in self.params.items()}

    def state_of(self, i: int) -> dict:
        """Model i's full state, parameters AND buffers (batch-norm running statistics), as one dict for
        ``functional_call(self.net, state, x)`` with ``self.net`` in eval mode. Every attribution path evaluates a
        model through this: the parameters alone would leave batch norm with the skeleton's initial statistics."""
        return {**self.params_of(i), **{k: v[i] for k, v in self.buffers.items()}}

    def module(self, i: int) -> torch.nn.Module:
        """Model i as an ordinary module (a copy), in eval mode."""
        import copy

        m = copy.deepcopy(self.net)
        m.load_state_dict(self.state_of(i))
        return m.eval()

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """(E, n, C) logits of every model on inputs x (n, ...), in eval mode."""
        self.net.eval()
        # models with buffers (ResNet-9) are evaluated one after the other: their activations are large, and E of
        # them at once (chapter 06 evaluates 100 reference models) would need E times the memory
        out = []
        for xb in x.split(batch_size):
            out.append(_forward(self.net, self.params, self.buffers, xb, shared_input=True,
                                together=not self.buffers))
        return torch.cat(out, 1)

    def outputs(self, x, y, measure: str = "margin") -> torch.Tensor:
        """(E, n) measured outputs (default: margins) of every model."""
        return measures.get(measure)(self.logits(x), y.to(x.device))

    def accuracy(self, x, y) -> torch.Tensor:
        """(E,) accuracy of every model."""
        return (self.logits(x).argmax(-1) == y.to(x.device)).float().mean(1)

    def select(self, idx) -> "Models":
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda d: {k: v[idx] for k, v in d.items()}
        return Models(self.net, pick(self.params), pick(self.buffers), self.seeds[idx], self.masks[idx],
                      [(s, pick(p)) for s, p in self.checkpoints], self.lrs)

    def state(self) -> dict:
        """Everything but the module skeleton, for saving."""
        return {"params": self.params, "buffers": self.buffers, "seeds": self.seeds, "masks": self.masks,
                "checkpoints": self.checkpoints, "lrs": self.lrs}

    @staticmethod
    def from_state(net: torch.nn.Module, state: dict) -> "Models":
        return Models(net, **state)

    @staticmethod
    def concat(parts: list["Models"]) -> "Models":
        cat = lambda ds: {k: torch.cat([d[k] for d in ds]) for k in ds[0]}
        return Models(parts[0].net, cat([p.params for p in parts]), cat([p.buffers for p in parts]),
                      torch.cat([p.seeds for p in parts]), torch.cat([p.masks for p in parts]),
                      [(s, cat([p.checkpoints[j][1] for p in parts])) for j, (s, _) in
                       enumerate(parts[0].checkpoints)], parts[0].lrs)


def _forward(net, params, buffers, x, shared_input=False, together=True):
    """Logits of E stacked models: x is (E, B, ...) per model, or (B, ...) shared when shared_input.

    E > 1 models run as one vmapped computation, buffers included: they are stacked like the parameters and mapped
    over the same axis, so in training mode each model's batch norm normalises its own batch by that batch's
    statistics and updates its own row of the running statistics in place, as E separate modules would (tested
    against one-at-a-time training in tests/test_gpu_path.py). A single model, or ``together=False``, takes the plain
    path, one model after the other. A module with a ``forward_stacked`` method (the small CNN) computes the E
    models its own way, the same function laid out for speed."""
    E = next(iter(params.values())).shape[0]
    if E == 1 or not together:
        outs = []
        for e in range(E):
            state = {**{k: v[e] for k, v in params.items()}, **{k: v[e] for k, v in buffers.items()}}
            outs.append(functional_call(net, state, (x if shared_input else x[e],)))
        return torch.stack(outs)
    if hasattr(net, "forward_stacked"):  # the small CNN's grouped-convolution layout (models.SmallCNN)
        return net.forward_stacked(params, x, shared_input=shared_input)
    fn = lambda p, b, xb: functional_call(net, (p, b), (xb,))
    return vmap(fn, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)


def init_params(cfg: Setting, data: Data, seeds) -> tuple[torch.nn.Module, dict, dict]:
    """Module skeleton and stacked initial parameters and buffers for the given seeds."""
    states = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            m = build_model(cfg, data)
        states.append(m)
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in states]) for k, _ in
              states[0].named_parameters()}
    buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in states]) for k, _ in states[0].named_buffers()}
    return states[0], params, buffers


def train_models(cfg: Setting, data: Data, masks: torch.Tensor, seeds, *, init: dict | None = None,
                 epochs: int | None = None, lr: float | None = None, checkpoints: int = 0,
                 progress: bool = False) -> Models:
    """Train one model per row of ``masks`` (E, n_train) bool with the setting's recipe.

    seeds: one per model (initialisation and batch order). init: stacked parameters to start from instead of a
    fresh initialisation (warm start). epochs / lr override the recipe. checkpoints: number of evenly spaced
    parameter snapshots to keep (the last is the final model). Models are trained ``cfg.ensemble_size`` at a time.
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if masks.ndim != 2 or masks.shape[1] != data.n_train:
        raise ValueError(f"masks must have shape (models, {data.n_train}), got {tuple(masks.shape)}")
    seeds = torch.as_tensor(seeds, dtype=torch.long).flatten()
    if len(seeds) != len(masks):
        raise ValueError(f"need one seed per mask: {len(seeds)} seeds for {len(masks)} masks")
    sizes = masks.sum(1)
    if (sizes == 0).any():
        raise ValueError("every training subset needs at least one example")
    chunk = cfg.ensemble_size
    parts, order = [], []
    # models train together only when their subsets have the same size (same number of steps)
    for size in sizes.unique().tolist():
        same = torch.nonzero(sizes == size).flatten()
        for start in range(0, len(same), chunk):
            idx = same[start:start + chunk]
            sub_init = None if init is None else {k: v[idx] for k, v in init.items()}
            parts.append(_train_group(cfg, data, masks[idx], seeds[idx], sub_init, epochs, lr, checkpoints,
                                      progress))
            order.append(idx)
    out = Models.concat(parts)
    return out.select(torch.cat(order).argsort())


def _train_group(cfg, data, masks, seeds, init, epochs, lr, n_checkpoints, progress, weights=None, dtype=None,
                 record=None):
    """Train one group of models. Default: model e sees the examples of masks[e] in its own batch order and
    minimises each batch's mean loss. With ``weights`` (E, n_train): every model runs through the whole pool in the
    batch order of its seed and minimises (1/B) sum_{i in batch} weights[e, i] loss_i. ``dtype``: train in that
    float type. ``record``: a list that receives the flat parameters before every step (one model only)."""
    device = cfg.torch_device
    net, params, buffers = init_params(cfg, data, seeds.tolist())
    if init is not None:
        params = {k: init[k].detach().clone() for k in params}
    net = net.to(device).train()
    if dtype is not None:
        net = net.to(dtype)
        params = {k: v.to(dtype) for k, v in params.items()}
        buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in buffers.items()}
    params = {k: v.to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    x, y = data.x_train.to(device), data.y_train.to(device)
    if dtype is not None:
        x = x.to(dtype)
    epochs = cfg.epochs if epochs is None else epochs
    if weights is None:
        orders = [batch_order(s, torch.nonzero(m).flatten(), epochs, cfg.batch_size) for s, m in zip(seeds, masks)]
    else:
        pool = torch.arange(data.n_train)
        orders = [batch_order(s, pool, epochs, cfg.batch_size) for s in seeds]
        weights = weights.to(device=device, dtype=x.dtype)
        rows = torch.arange(len(seeds), device=device)[:, None]
    steps = len(orders[0])
    lrs = lr_schedule(cfg, steps, lr)
    keep = set(torch.linspace(0, steps, n_checkpoints + 1).round().long().tolist()[1:]) if n_checkpoints else set()
    opt = torch.optim.SGD(params.values(), lr=float(lrs[0]), momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    checkpoints = []
    for t in tqdm(range(steps), disable=not progress, leave=False, desc=f"training {len(seeds)} models"):
        idx = torch.stack([o[t] for o in orders]).to(device)  # (E, B)
        for g in opt.param_groups:
            g["lr"] = float(lrs[t])
        if record is not None:
            record.append(torch.cat([v.detach()[0].reshape(-1) for v in params.values()]))
        logits = _forward(net, params, buffers, x[idx])
        # sum over models of each model's mean loss: the gradient for model e is its own mean-loss gradient
        if weights is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / idx.shape[1]
        else:
            per = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none").view(idx.shape)
            loss = (weights[rows, idx] * per).sum() / idx.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if t + 1 in keep:
            checkpoints.append((t + 1, {k: v.detach().clone() for k, v in params.items()}))
    params = {k: v.detach() for k, v in params.items()}
    if record is not None:
        record.append(torch.cat([v[0].reshape(-1) for v in params.values()]))
    return Models(net.eval(), params, buffers, seeds, masks.cpu(), checkpoints, lrs)


# ------------------------------------------------------------------- weighted training in a fixed batch order (ch. 05)


def _check_weights(weights, n_train: int) -> torch.Tensor:
    w = torch.as_tensor(weights)
    if not w.is_floating_point():
        w = w.double()
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != n_train:
        raise ValueError(f"weights must have shape ({n_train},) or (models, {n_train}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite numbers")
    return w


def train_weighted(cfg: Setting, data: Data, weights, seed: int, *, epochs: int | None = None,
                   lr: float | None = None, checkpoints: int = 0, dtype: torch.dtype | None = None,
                   progress: bool = False) -> Models:
    """Train one model per row of ``weights`` (E, n_train) (or one row (n_train,)), all from the SAME seed: the same
    initialisation and the same batch order over the whole training pool, ``batch_order(seed, arange(n_train))``.

    The loss of a step on batch b (|b| = B examples, B = batch_size except maybe in an epoch's last batch) is
        (1/B) sum_{i in b} w_i loss_i(theta)        (+ the recipe's coupled weight decay, (wd/2) ||theta||^2),
    normalised by the batch size B, NOT by the sum of the weights, so that d(loss)/d(w_i) = loss_i / B is a clean
    derivative and weight 1 everywhere is exactly the ordinary mean loss. Dropping example i means w_i = 0: the
    batches, the initialisation and every other example's weight stay the same (the fixed-seed counterfactual of
    chapter 05). All ones reproduces ``train_models(cfg, data, full_mask(data), [seed])``. Weights may be any
    finite numbers (1 +- eps for finite differences). Models train ``cfg.ensemble_size`` at a time.

    dtype: train in that float type (torch.float64 for derivative checks); default: the model's (float32).
    Returns ``Models`` with seeds all ``seed`` and masks ``weights != 0``. Raises ValueError on badly shaped or
    non-finite weights.
    """
    w = _check_weights(weights, data.n_train)
    E = len(w)
    seeds = torch.full((E,), int(seed), dtype=torch.long)
    parts = []
    for start in range(0, E, cfg.ensemble_size):
        rows = slice(start, start + cfg.ensemble_size)
        parts.append(_train_group(cfg, data, w[rows] != 0, seeds[rows], None, epochs, lr, checkpoints, progress,
                                  weights=w[rows], dtype=dtype))
    return Models.concat(parts)


@dataclass
class Trajectory:
    """One recorded training run that can be replayed and differentiated (chapter 05, ``attribution.unroll``).

    thetas: (steps + 1, p) the flat parameters (order of ``like``) before every step, and after the last one.
    lrs: (steps,) the learning rate of every step. batches: the steps' index tensors into the training pool.
    weights: (n_train,) the data weights. like: {name: tensor} the final parameters (names, shapes, flat order).
    buffers: the model's buffers (held fixed). The update is torch.optim.SGD's, with momentum mu, Nesterov when
    ``nesterov``, and coupled weight decay wd: g_t = grad[(1/B) sum_b w_i loss_i](theta_t) + wd theta_t,
    m_{t+1} = mu m_t + g_t (m_0 = 0), theta_{t+1} = theta_t - lr_t (g_t + mu m_{t+1}) (Nesterov) or
    theta_t - lr_t m_{t+1}. The momentum enters linearly, so theta_t alone fixes each step's Jacobian.
    """
    net: torch.nn.Module
    like: dict
    buffers: dict
    thetas: torch.Tensor
    lrs: torch.Tensor
    batches: list
    weights: torch.Tensor
    momentum: float
    nesterov: bool
    weight_decay: float
    seed: int

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def n_train(self) -> int:
        return len(self.weights)

    def params_at(self, t: int) -> dict:
        """{name: tensor} the parameters before step t (t = steps: the trained model)."""
        if not -len(self.thetas) <= t < len(self.thetas):
            raise ValueError(f"step {t} is outside 0..{self.steps}")
        vec, out, i = self.thetas[t], {}, 0
        for k, v in self.like.items():
            out[k] = vec[i:i + v.numel()].view_as(v)
            i += v.numel()
        return out

    def state_at(self, t: int) -> dict:
        """The full state (parameters and buffers) before step t, for ``functional_call(net, state, x)``."""
        return {**self.params_at(t), **self.buffers}

    def as_models(self) -> Models:
        """The trained model (after the last step) as a one-model ``Models`` (seed ``seed``, mask: the examples with
        nonzero weight), for the methods that attribute a final model (influence functions, EK-FAC, TRAK)."""
        final = self.params_at(self.steps)
        return Models(self.net, {k: v.clone()[None] for k, v in final.items()},
                      {k: v.clone()[None] for k, v in self.buffers.items()}, torch.tensor([self.seed]),
                      (self.weights != 0)[None].cpu(), [], self.lrs)

    def checkpoint_steps(self, k: int) -> list[int]:
        """k evenly spaced steps 1..steps (the last is the trained model), spaced as ``train_models``' checkpoints:
        ``[traj.state_at(s) for s in traj.checkpoint_steps(k)]`` are the states TracIn and SOURCE use."""
        if not (isinstance(k, int) and 1 <= k <= self.steps):
            raise ValueError(f"k must be an integer in 1..{self.steps}, got {k!r}")
        return torch.linspace(0, self.steps, k + 1).round().long().tolist()[1:]


def record_training(cfg: Setting, data: Data, seed: int, weights=None, *, epochs: int | None = None,
                    lr: float | None = None, dtype: torch.dtype | None = None,
                    progress: bool = False) -> Trajectory:
    """Train ONE model as ``train_weighted`` does (weights (n_train,), default all ones; the batch order of ``seed``
    over the whole pool) and record every step: the parameters before each step, its learning rate and its batch.

    Memory: (steps + 1) x p numbers (the ``cpu`` setting: 631 x 28,874 floats, 73 MB). Models with batch norm are
    refused (ValueError): their training-mode statistics depend on the batch, which replaying does not model.
    """
    w = _check_weights(torch.ones(data.n_train) if weights is None else weights, data.n_train)
    if len(w) != 1:
        raise ValueError(f"record_training trains one model: weights must have shape ({data.n_train},)")
    with torch.random.fork_rng(devices=[]):  # building a skeleton draws from the global RNG: leave it untouched
        skeleton = build_model(cfg, data)
    if models.has_batchnorm(skeleton):
        raise ValueError(f"architecture {cfg.arch!r} has batch norm, which unrolling does not support; use "
                         "'logreg', 'mlp' or 'cnn'")
    thetas = []
    m = _train_group(cfg, data, w != 0, torch.tensor([int(seed)]), None, epochs, lr, 0, progress, weights=w,
                     dtype=dtype, record=thetas)
    epochs = cfg.epochs if epochs is None else epochs
    batches = batch_order(int(seed), torch.arange(data.n_train), epochs, cfg.batch_size)
    return Trajectory(m.net, m.params_of(0), {k: v[0] for k, v in m.buffers.items()}, torch.stack(thetas),
                      m.lrs, batches, w[0].to(thetas[0].dtype), float(cfg.momentum), cfg.momentum > 0,
                      float(cfg.weight_decay), int(seed))


def full_mask(data: Data, n: int = 1) -> torch.Tensor:
    """(n, n_train) all-True masks: models trained on the whole training pool."""
    return torch.ones(n, data.n_train, dtype=torch.bool)


def stream_seeds(stream: str, n: int, start: int = 0) -> torch.Tensor:
    """Seeds start..start+n-1 of a named stream; different streams never share seeds in practice."""
    return zlib.crc32(stream.encode()) % (2 ** 30) + torch.arange(start, start + n)


def reference_models(cfg: Setting, data: Data, n: int = 1, checkpoints: int = 0, stream: str = "reference",
                     cache=None, progress: bool = False) -> Models:
    """``n`` models trained on the whole training pool with the setting's recipe: the models a method attributes.

    Cached on disk one model per file, keyed by the recipe, so every chapter that asks for the same models gets the
    same ones, and asking for more later trains only the missing ones (all at once, with the ensemble trainer).
    ``checkpoints`` keeps that many evenly spaced snapshots along training (for TracIn and unrolling).
    """
    spec = {"recipe": cfg.recipe(), "stream": stream, "checkpoints": checkpoints}
    folder = cache_dir(cache) / f"models_{cfg.dataset}_{cache_key(spec)}"
    seeds = stream_seeds(stream, n)
    paths = [folder / f"model_{i:04d}.pt" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        trained = train_models(cfg, data, full_mask(data, len(missing)), seeds[missing], checkpoints=checkpoints,
                               progress=progress)
        for j, i in enumerate(missing):
            one = trained.select([j])
            bad = [k for k, v in one.params.items() if not torch.isfinite(v).all()]
            if bad:
                raise FloatingPointError(f"reference model {i} (seed {int(seeds[i])}) diverged: non-finite "
                                         f"parameters {bad[:3]} under the recipe {cfg.recipe()}; not stored")
            atomic_save(one.state(), paths[i])
    net = build_model(cfg, data).to(cfg.torch_device).eval()
    states = [torch.load(p, weights_only=True, map_location=cfg.torch_device) for p in paths]
    for i, (p, st) in enumerate(zip(paths, states)):
        if int(st["seeds"][0]) != int(seeds[i]) or st["masks"].shape != (1, data.n_train) or not st["masks"].all():
            raise ValueError(f"{p} holds another model than reference model {i} of stream {stream!r} (seed "
                             f"{int(seeds[i])}, trained on all {data.n_train} examples): foreign content. "
                             f"Delete {folder} (or run `make clean-cache`).")
    return Models.concat([Models.from_state(net, st) for st in states])
