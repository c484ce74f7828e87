"""Retraining on subsets: subset masks, model seeds per named stream, and chunked, resumable training that records
every model's outputs. The LDS ground truth (``lds``) and the datamodels' training data both go through
``train_outputs``, so no method imports the evaluation module.

The cache of ``train_outputs`` is a folder of part files, each holding a contiguous range of models
``part_<start>_<stop>.pt`` with the seeds and a hash of the masks it was trained on. A part is reused whenever its
rows match what is asked for, whatever chunk size wrote it: a build resumed with another ``ensemble_size`` (or a
longer stream of models) trains only the rows no part covers. A part whose seeds or masks differ from the ones asked
for is foreign content (another build's, or a corrupted folder) and is refused with a message that names it.
A chunk whose outputs are not finite (a diverged model) is never stored: the error names the model and the recipe.

Many machines. By default every chunk is trained here, one after another. When a Dask cluster is configured, every
chunk still to train becomes one task on it, and the workers write their parts into the same folder (which must be
on a filesystem they share with this process, e.g. the cache on NFS); the result is assembled as before, from the
same chunks, seeds and masks. Configure it in one of two ways (dask is the optional extra ``cluster``:
``pip install -e '.[cluster]'``; it is imported only when a cluster is configured):

- the environment variable ``COURSE_DASK_SCHEDULER=tcp://host:8786`` (a scheduler address): every build of the
  process, a papermill run of a chapter included, goes to that cluster;
- ``with retrain.use_cluster(x): ...`` for the builds inside the block, where x is a ``distributed.Client``, a Dask
  cluster object (``LocalCluster``, dask-jobqueue's ``SLURMCluster``, dask-cuda's ``LocalCUDACluster``) or a
  scheduler address; ``use_cluster(None)`` trains in-process even where the variable is set.

A worker that dies mid-chunk costs only that chunk: Dask runs it again on another worker, and the parts already
written are kept (an interrupted build resumes from them on the next call, as in-process).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import time
import uuid
import warnings
import zlib
from pathlib import Path

import torch
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from . import train
from .cache import atomic_save
from .data import Data
from .settings import Setting

_PART = re.compile(r"part_(\d+)_(\d+)\.pt")
SCHEDULER_ENV = "COURSE_DASK_SCHEDULER"
_IN_PROCESS = object()  # use_cluster(None): train here even where the environment variable is set
_cluster = contextvars.ContextVar("course_cluster", default=None)
_clients: dict = {}  # one connection per scheduler address, kept for the life of the process


def subset_masks(n: int, m: int, alpha: float, seed: int, stream: str = "lds") -> torch.Tensor:
    """(m, n) bool masks, each with exactly round(alpha * n) True entries, drawn uniformly at random.

    ``stream`` names an independent random stream: the LDS evaluation subsets use "lds", a method that trains on
    subsets of its own (datamodels) uses another name, so the two never share draws. The first m masks of a stream
    do not depend on m (a longer draw extends a shorter one).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    size = round(alpha * n)
    if not 0 < size < n:
        raise ValueError(f"alpha={alpha} gives subsets of size {size} out of {n}; need 0 < size < n")
    g = torch.Generator().manual_seed(zlib.crc32(f"{stream}:{seed}".encode()))
    masks = torch.zeros(m, n, dtype=torch.bool)
    for j in range(m):
        masks[j, torch.randperm(n, generator=g)[:size]] = True
    return masks


def model_seeds(m: int, k: int, seed: int, stream: str = "lds") -> torch.Tensor:
    """(m, k) training seeds: distinct per subset and replicate, and per stream."""
    base = zlib.crc32(f"{stream}-models:{seed}".encode()) % (2 ** 30)
    return base + torch.arange(m * k).view(m, k)


def row_hashes(masks: torch.Tensor) -> list[str]:
    """A short hash of each mask row, stored with each part to recognise the subsets its models trained on."""
    return [hashlib.sha256(m.to(torch.bool).numpy().tobytes()).hexdigest()[:16] for m in masks]


def _valid_parts(folder: Path, masks: torch.Tensor, seeds: torch.Tensor) -> list[tuple[int, int, dict]]:
    """The part files of ``folder`` that hold models for rows of (masks, seeds): (start, stop, part), clipped to
    the rows asked for. Raises ValueError on a part whose seeds or masks contradict the rows it claims."""
    found = []
    for path in sorted(folder.glob("part_*_*.pt")):
        match = _PART.fullmatch(path.name)
        if not match:
            continue
        start, stop = int(match.group(1)), int(match.group(2))
        if start >= len(masks):
            continue  # a longer stream built earlier: rows beyond what is asked for now
        part = torch.load(path, weights_only=True)
        end = min(stop, len(masks))
        rows = slice(0, end - start)
        ok = (part.get("start") == start and part.get("stop") == stop and
              torch.equal(part["seeds"][rows], seeds[start:end]) and
              part["mask_rows"][rows] == row_hashes(masks[start:end]))
        if not ok:
            raise ValueError(f"{path} holds models trained on other subsets or seeds than this build expects "
                             f"(rows {start}-{stop}): the folder has foreign or stale content. Delete {folder} "
                             "(or run `make clean-cache`) to rebuild it.")
        found.append((start, end, {k: part[k][rows] for k in ("outputs", "accuracy")} |
                      {"seconds": part["seconds"] * (end - start) / (stop - start)}))
    return found


def cached_prefix(folder: Path) -> int:
    """How many leading models (rows 0, 1, ...) the part files in ``folder`` cover, from their names alone (their
    content is checked when ``train_outputs`` loads them). 0 when the folder does not exist."""
    ranges = sorted(tuple(map(int, m.groups())) for p in Path(folder).glob("part_*_*.pt")
                    if (m := _PART.fullmatch(p.name)))
    covered = 0
    for start, stop in ranges:
        if start <= covered:
            covered = max(covered, stop)
    return covered


def train_outputs(cfg: Setting, data: Data, masks: torch.Tensor, seeds: torch.Tensor, folder: Path,
                  desc: str, progress: bool = True, name=None,
                  fixed_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Train a model for every (mask, seed) pair and record its test-split margins, resumably.

    masks (M, n_train) bool, seeds (M,). Models are trained in chunks of ``cfg.ensemble_size``; each chunk is saved
    to ``folder`` as soon as it finishes and is never trained again (see the module docstring). ``name(i)`` says
    which model row i is, for error messages (default "model i"). Returns outputs (M, n_test), accuracy (M,), and
    the training seconds spent on all rows (this run and earlier ones, summed over workers on a cluster). Raises
    FloatingPointError when a model's outputs are not finite (nothing of that chunk is stored), ValueError on
    foreign content in ``folder``. The chunks go to a Dask cluster when one is configured (module docstring).
    fixed_order: train with ``train.train_weighted`` instead (the seed's batch order over the whole pool, examples
    outside the mask weighted 0: the fixed-seed counterfactual of chapter 05); a chunk never mixes seeds.
    """
    masks = torch.as_tensor(masks, dtype=torch.bool)
    seeds = torch.as_tensor(seeds, dtype=torch.long).flatten()
    if len(masks) != len(seeds):
        raise ValueError(f"need one seed per mask: {len(seeds)} seeds for {len(masks)} masks")
    name = name or (lambda i: f"model {i}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = {start: (stop, part) for start, stop, part in _valid_parts(folder, masks, seeds)}
    M, chunk = len(masks), cfg.ensemble_size
    plan, s = [], 0  # (start, stop, the stored piece or None: to train), in row order
    while s < M:
        covering = [(a, b) for a, (b, _) in have.items() if a <= s < b]
        if covering:
            a, b = covering[0]
            part = have[a][1]
            off = s - a
            plan.append((s, b, {"outputs": part["outputs"][off:], "accuracy": part["accuracy"][off:],
                                "seconds": part["seconds"] * (b - s) / (b - a)}))
            s = b
            continue
        e = min([s + chunk, M] + [a for a in have if a > s])
        if fixed_order:  # one seed per chunk: train_weighted trains every row from the same seed
            e = s + int((seeds[s:e] == seeds[s]).cumprod(0).sum())
        plan.append((s, e, None))
        s = e
    todo = [(s, e) for s, e, piece in plan if piece is None]
    bar = tqdm(total=M, desc=desc, unit="model", disable=not progress)
    bar.update(M - sum(e - s for s, e in todo))
    client = _client() if todo else None
    if client is None:  # in-process: one chunk after another
        trained = {}
        for s, e in todo:
            trained[s] = _train_part(cfg, data, masks[s:e], seeds[s:e], s, folder, name, fixed_order)
            bar.update(e - s)
    else:
        trained = _train_on_cluster(client, cfg, data, masks, seeds, todo, folder, name, fixed_order, bar)
    bar.close()
    pieces = [trained[s] if piece is None else piece for s, e, piece in plan]
    return (torch.cat([p["outputs"] for p in pieces]), torch.cat([p["accuracy"] for p in pieces]),
            float(sum(p["seconds"] for p in pieces)))


def _part_path(folder: Path, start: int, stop: int) -> Path:
    return folder / f"part_{start:06d}_{stop:06d}.pt"


def _train_part(cfg, data, masks, seeds, start, folder, name, fixed_order=False) -> dict:
    """Train the models of rows start, start + 1, ... (masks and seeds hold those rows only), store them as one
    part in ``folder`` and return it. On a cluster a worker runs it (through ``_stored_or_train``)."""
    t0 = time.perf_counter()
    stop = start + len(masks)
    if fixed_order:
        models = train.train_weighted(cfg, data, masks.float(), int(seeds[0]))
    else:
        models = train.train_models(cfg, data, masks, seeds)
    x = data.x_test.to(cfg.torch_device)
    outputs = models.outputs(x, data.y_test).cpu()
    bad = (~torch.isfinite(outputs)).any(1).nonzero().flatten().tolist()
    if bad:
        which = "; ".join(f"{name(start + i)} (seed {int(seeds[i])})" for i in bad)
        raise FloatingPointError(f"training diverged: non-finite outputs for {which} under the recipe "
                                 f"{cfg.recipe()}; nothing of this chunk was stored. Lower lr or check the data.")
    part = {"start": start, "stop": stop, "seeds": seeds.clone(), "mask_rows": row_hashes(masks),
            "outputs": outputs, "accuracy": models.accuracy(x, data.y_test).cpu(),
            "seconds": time.perf_counter() - t0}
    atomic_save(part, _part_path(folder, start, stop))
    return part


@contextlib.contextmanager
def use_cluster(cluster):
    """Within the block, ``train_outputs`` (every ground truth, the datamodels' training data) trains its chunks
    on ``cluster``: a ``distributed.Client``, a Dask cluster object or a scheduler address ("tcp://host:8786");
    None trains in-process even where $COURSE_DASK_SCHEDULER is set. Yields the client (or None); a client it
    opened itself (for a cluster object or an address) is closed at the end of the block."""
    client = None if cluster is None else _connect(cluster)
    token = _cluster.set(_IN_PROCESS if client is None else client)
    try:
        yield client
    finally:
        _cluster.reset(token)
        if client is not None and client is not cluster:
            client.close()


def _client():
    """The Dask client that chunks go to: use_cluster's, else one for $COURSE_DASK_SCHEDULER (opened once per
    address and process), else None."""
    current = _cluster.get()
    if current is not None:
        return None if current is _IN_PROCESS else current
    address = os.environ.get(SCHEDULER_ENV, "").strip()
    if not address:
        return None
    if address not in _clients or _clients[address].status != "running":
        _clients[address] = _connect(address)
    return _clients[address]


def _connect(cluster):
    """A client for a Client (itself), a cluster object or an address; imports dask here, and only here."""
    try:
        import distributed
    except ImportError as e:
        raise ImportError(f"training on a Dask cluster ({SCHEDULER_ENV}={os.environ.get(SCHEDULER_ENV)!r} or "
                          f"retrain.use_cluster) needs dask: pip install -e '.[cluster]'; unset {SCHEDULER_ENV} "
                          "to train in-process") from e
    if isinstance(cluster, distributed.Client):
        return cluster
    return distributed.Client(cluster, set_as_default=False)


def _stored_or_train(cfg, data, masks, seeds, start, folder, name, fixed_order) -> dict:
    """The task of one chunk on a worker: its part when one is on disk already (Dask runs a finished task again
    when the worker that held its result dies before the driver fetched it), else ``_train_part``."""
    path = _part_path(folder, start, start + len(masks))
    if path.exists():
        part = torch.load(path, weights_only=True)
        if not (torch.equal(part["seeds"], seeds) and part["mask_rows"] == row_hashes(masks)):
            raise ValueError(f"{path} appeared during the build with models of other subsets or seeds: the folder "
                             f"has foreign content. Delete {folder} (or run `make clean-cache`) to rebuild it.")
        return part
    return _train_part(cfg, data, masks, seeds, start, folder, name, fixed_order)


def _train_on_cluster(client, cfg, data, masks, seeds, todo, folder, name, fixed_order, bar) -> dict:
    """Every (start, stop) of ``todo`` as one task on the cluster (``_stored_or_train``); {start: part}.
    A worker lost mid-chunk makes the scheduler run that chunk again elsewhere; on an error the chunks not yet
    started are cancelled and every finished part stays on disk."""
    from distributed import KilledWorker, as_completed

    folder = folder.absolute()  # the workers' working directory is not ours
    data_future = client.scatter(data, broadcast=True, hash=False)  # sent once, not once per chunk; own key
    run = uuid.uuid4().hex[:8]
    futures = {}
    for s, e in todo:
        labels = {i: name(i) for i in range(s, e)}  # names, not the caller's function, travel to the worker
        rows = masks[s:e].clone(), seeds[s:e].clone()  # clone: a pickled slice carries its whole storage
        futures[client.submit(_stored_or_train, cfg, data_future, *rows, s, folder, labels.__getitem__, fixed_order,
                              key=f"train_part-{s:06d}-{e:06d}-{run}")] = (s, e)
    trained, missing, pending = {}, [], set(futures)
    try:
        for future in as_completed(futures):
            s, e = futures[future]
            try:
                trained[s] = future.result()
            except KilledWorker as err:
                raise RuntimeError(f"the chunk of {name(s)} to {name(e - 1)} killed every worker that ran it (out of "
                                   f"memory?); the parts finished so far are kept in {folder}, and the next call "
                                   "trains only what is missing") from err
            pending.discard(future)
            future.release()  # else a worker lost later makes the scheduler recompute what we already hold
            if not _part_path(folder, s, e).exists():
                missing.append(_part_path(folder, s, e).name)
            bar.update(e - s)
    finally:
        client.cancel([*pending, data_future])
    if missing:
        warnings.warn(f"{len(missing)} of the workers' parts ({missing[0]}, ...) are not in {folder} as this process "
                      "sees it: the cache folder is not shared with the workers, so an interrupted build cannot resume "
                      "from them. Put $COURSE_CACHE on a filesystem that every worker mounts at the same path.")
    return trained


# ------------------------------------------------------------------ leave-one-out retraining (chapter 01, Koh & Liang)


def leave_one_out(cfg: Setting, data: Data, models: train.Models, removed, x_targets, y_targets, *, seeds,
                  epochs: int, lr: float, measure: str = "loss", model: int = 0, per_seed: bool = False) -> torch.Tensor:
    """(K, T) the change of each target's measured output when each training example in ``removed`` (K indices) is
    left out, by retraining from the trained parameters (Koh & Liang 2017, Section 5.1's protocol for non-convex
    models): model ``model`` of ``models`` is trained on for ``epochs`` epochs of the setting's recipe with initial
    learning rate ``lr`` (decaying by its schedule), once with all examples and once without each removed one, with
    the same ``seeds``; the change is the mean over seeds of (without - with), so the retraining itself is not
    counted as an effect and seed noise averages down as 1/len(seeds).

    Sign: a REMOVAL's effect, to be compared with -tau[removed] of a score in the course convention (the effect of
    including). measure: "loss" (nats, Koh & Liang's test loss) or "margin". Raises ValueError for an empty or
    out-of-range ``removed`` or no seeds. per_seed: return (K, S, T), each seed's change before the mean (for the
    seed noise: ``lds.pearson_ceiling``).
    """
    removed = torch.as_tensor(removed, dtype=torch.long).flatten()
    seeds = torch.as_tensor(seeds, dtype=torch.long).flatten()
    if len(removed) == 0 or removed.min() < 0 or removed.max() >= data.n_train:
        raise ValueError(f"removed must hold 1 or more indices in [0, {data.n_train}), got {removed.tolist()}")
    if len(seeds) == 0:
        raise ValueError("leave_one_out needs at least one seed")
    K, S = len(removed), len(seeds)
    masks = train.full_mask(data, (K + 1) * S)  # row block 0: nothing removed; block j + 1: removed[j] left out
    for j, i in enumerate(removed.tolist()):
        masks[(j + 1) * S:(j + 2) * S, i] = False
    init = {k: v[model:model + 1].expand(len(masks), *v.shape[1:]) for k, v in models.params.items()}
    retrained = train.train_models(cfg, data, masks, seeds.repeat(K + 1), init=init, epochs=epochs, lr=lr)
    out = retrained.outputs(x_targets, y_targets, measure).view(K + 1, S, -1)
    return out[1:] - out[:1] if per_seed else (out[1:] - out[:1]).mean(1)
