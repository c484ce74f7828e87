"""Retraining on subsets: subset masks, model seeds per named stream, and chunked, resumable training that records
every model's outputs. The LDS ground truth (``lds``) and the datamodels' training data both go through
``train_outputs``, so no method imports the evaluation module.

The cache of ``train_outputs`` is a folder of part files, each holding a contiguous range of models
``part_<start>_<stop>.pt`` with the seeds and a hash of the masks it was trained on. A part is reused whenever its
rows match what is asked for, whatever chunk size wrote it: a build resumed with another ``ensemble_size`` (or a
longer stream of models) trains only the rows no part covers. A part whose seeds or masks differ from the ones asked
for is foreign content (another build's, or a corrupted folder) and is refused with a message that names it.
A chunk whose outputs are not finite (a diverged model) is never stored: the error names the model and the recipe.
"""
from __future__ import annotations

import hashlib
import re
import time
import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import train
from .cache import atomic_save
from .data import Data
from .settings import Setting

_PART = re.compile(r"part_(\d+)_(\d+)\.pt")


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
    the training seconds spent on all rows (this run and earlier ones). Raises FloatingPointError when a model's
    outputs are not finite (nothing of that chunk is stored), ValueError on foreign content in ``folder``.
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
    pieces, s = [], 0
    bar = tqdm(total=M, desc=desc, unit="model", disable=not progress)
    while s < M:
        covering = [(a, b) for a, (b, _) in have.items() if a <= s < b]
        if covering:
            a, b = covering[0]
            part = have[a][1]
            off = s - a
            pieces.append({"outputs": part["outputs"][off:], "accuracy": part["accuracy"][off:],
                           "seconds": part["seconds"] * (b - s) / (b - a)})
            bar.update(b - s)
            s = b
            continue
        e = min([s + chunk, M] + [a for a in have if a > s])
        if fixed_order:  # one seed per chunk: train_weighted trains every row from the same seed
            e = s + int((seeds[s:e] == seeds[s]).cumprod(0).sum())
        pieces.append(_train_part(cfg, data, masks, seeds, s, e, folder, name, fixed_order))
        bar.update(e - s)
        s = e
    bar.close()
    return (torch.cat([p["outputs"] for p in pieces]), torch.cat([p["accuracy"] for p in pieces]),
            float(sum(p["seconds"] for p in pieces)))


def _train_part(cfg, data, masks, seeds, s, e, folder, name, fixed_order=False) -> dict:
    t0 = time.perf_counter()
    if fixed_order:
        models = train.train_weighted(cfg, data, masks[s:e].float(), int(seeds[s]))
    else:
        models = train.train_models(cfg, data, masks[s:e], seeds[s:e])
    x = data.x_test.to(cfg.torch_device)
    outputs = models.outputs(x, data.y_test).cpu()
    bad = (~torch.isfinite(outputs)).any(1).nonzero().flatten().tolist()
    if bad:
        which = "; ".join(f"{name(s + i)} (seed {int(seeds[s + i])})" for i in bad)
        raise FloatingPointError(f"training diverged: non-finite outputs for {which} under the recipe "
                                 f"{cfg.recipe()}; nothing of this chunk was stored. Lower lr or check the data.")
    part = {"start": s, "stop": e, "seeds": seeds[s:e].clone(), "mask_rows": row_hashes(masks[s:e]),
            "outputs": outputs, "accuracy": models.accuracy(x, data.y_test).cpu(),
            "seconds": time.perf_counter() - t0}
    atomic_save(part, folder / f"part_{s:06d}_{e:06d}.pt")
    return part
