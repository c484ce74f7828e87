"""Named settings: everything a chapter needs to size its work, in one frozen dataclass.

``get("cpu", epochs=5)`` returns the ``cpu`` preset with an override; a wrong name or value fails at once with a
message that lists what is valid. Overrides may also come as one mapping or as a JSON string, the form in which
papermill's ``-p overrides '{"epochs": 5}'`` delivers them: ``get("cpu", '{"epochs": 5}')``. ``literal`` does the
same for any other notebook parameter. ``smoke`` is for tests (every chapter in about a minute), ``cpu`` is the default
(mnist5k and the small CNN on a laptop), ``gpu`` is ResNet-9 on CIFAR-2 as in the TRAK benchmark.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, fields

import torch

from .data import DATASETS
from .models import ARCHITECTURES

SCHEDULES = ("linear", "triangle", "constant")


@dataclass(frozen=True)
class Setting:
    name: str
    # data
    dataset: str = "mnist5k"
    n_train: int | None = None  # None: the whole training pool
    n_targets: int = 200
    # model
    arch: str = "cnn"
    width: int | None = None  # None: the architecture's default
    depth: int = 0
    # training recipe (SGD with Nesterov momentum; the learning rate follows `schedule`, per step)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "linear"
    # LDS ground truth: gt_subsets random alpha-subsets, gt_models models (seeds) trained on each
    alpha: float = 0.5
    gt_subsets: int = 100
    gt_models: int = 4
    gt_seed: int = 0
    # how many models the ensemble trainer trains at once
    ensemble_size: int = 16  # fastest of 8, 16, 32 on 2 cores (benchmarks/bench_ensemble.py)
    device: str = "auto"
    seed: int = 0
    # chapter budgets
    dm_models: int = 1600  # 03: datamodel training models (fresh subsets, never the LDS ones); 100 chunks of 16
    trak_models: int = 20  # 06: independently trained models to ensemble over
    trak_proj_dim: int = 2048  # 06: random projection dimension

    def __post_init__(self):
        _validate(self)

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def replace(self, **overrides) -> "Setting":
        _check_names(overrides)
        return dataclasses.replace(self, **overrides)

    def recipe(self) -> dict:
        """Everything that decides how one model is trained (hashed into cache keys)."""
        keys = ("dataset", "n_train", "arch", "width", "depth", "epochs", "batch_size", "lr", "momentum",
                "weight_decay", "schedule")
        return {k: getattr(self, k) for k in keys}


def _check_names(overrides: dict):
    valid = [f.name for f in fields(Setting) if f.name != "name"]
    bad = [k for k in overrides if k not in valid]
    if bad:
        raise ValueError(f"unknown override(s) {', '.join(map(repr, bad))}; valid overrides: {', '.join(valid)}")


def _validate(s: Setting):
    def fail(field, why):
        raise ValueError(f"setting {s.name!r}: {field}={getattr(s, field)!r} is invalid: {why}")

    for f in fields(Setting):
        v = getattr(s, f.name)
        kind = f.type.replace(" | None", "")
        if v is None and "None" in f.type:
            continue
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            fail(f.name, "must be an integer")
        if kind == "float" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            fail(f.name, "must be a number")
        if kind in ("int", "float") and not math.isfinite(v):
            fail(f.name, "must be a finite number (not NaN or infinity)")
        if kind == "str" and not isinstance(v, str):
            fail(f.name, "must be a string")
    choices = {"dataset": DATASETS, "arch": ARCHITECTURES, "schedule": SCHEDULES}
    for field, valid in choices.items():
        if getattr(s, field) not in valid:
            fail(field, f"valid values: {', '.join(valid)}")
    positive = ("n_targets", "epochs", "batch_size", "gt_subsets", "gt_models", "ensemble_size", "dm_models",
                "trak_models", "trak_proj_dim")
    for field in positive:
        if getattr(s, field) < 1:
            fail(field, "must be at least 1")
    if s.n_train is not None and s.n_train < 10:
        fail("n_train", "must be at least 10 (or None for the whole pool)")
    if not 0 < s.alpha < 1:
        fail("alpha", "must lie strictly between 0 and 1")
    if not s.lr > 0:
        fail("lr", "must be positive")
    if not s.weight_decay >= 0:
        fail("weight_decay", "must be 0 or more")
    if not 0 <= s.momentum < 1:
        fail("momentum", "must lie in [0, 1)")
    if s.depth < 0:
        fail("depth", "must be 0 or more")
    if not (s.device in ("auto", "cpu") or s.device.startswith("cuda")):
        fail("device", "valid values: auto, cpu, cuda, cuda:N")


PRESETS = {
    "smoke": Setting("smoke", n_train=500, n_targets=40, epochs=8, batch_size=32, gt_subsets=24, gt_models=2,
                     dm_models=64, trak_models=2, trak_proj_dim=256),
    "cpu": Setting("cpu"),
    "gpu": Setting("gpu", dataset="cifar2", arch="resnet9", epochs=24, batch_size=512, lr=0.4,
                   weight_decay=5e-4, schedule="triangle", gt_subsets=100, gt_models=4, ensemble_size=1,
                   dm_models=20000, trak_models=100, trak_proj_dim=4096, device="cuda"),
}


def get(name: str = "cpu", overrides=None, **kw) -> Setting:
    """The preset called ``name`` with overrides applied; raises ValueError on anything invalid.

    overrides: a mapping of Setting fields, or the same as a JSON (or Python literal) string, as papermill's
    ``-p overrides '{"gt_models": 8}'`` passes it; keyword arguments are overrides too (they win).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown setting {name!r}; valid settings: {', '.join(PRESETS)}")
    merged = {**literal(overrides or {}, "overrides", dict), **kw}
    return PRESETS[name].replace(**merged)


def literal(value, name: str, kind: type):
    """A notebook parameter checked against the type it must have, parsing it first when it arrives as a string.

    papermill's ``-p`` passes numbers as numbers but lists and dicts as strings: a string is parsed as JSON, else
    as a Python literal (``ast.literal_eval``), unless ``kind`` is ``str``. ``kind=float`` accepts integers;
    numbers must be finite. Raises ValueError naming the parameter, what arrived and what is valid.
    """
    if isinstance(value, str) and kind is not str:
        text = value
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"parameter {name}={text!r} is not a valid {kind.__name__}: write it as JSON, "
                                 f"e.g. {name}={_EXAMPLES.get(kind, 'a literal')}") from None
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
    if not ok or (kind in (int, float) and isinstance(value, bool)):
        raise ValueError(f"parameter {name} must be a {kind.__name__} (e.g. {_EXAMPLES.get(kind, '...')}), got "
                         f"{value!r} of type {type(value).__name__}")
    if kind in (int, float) and not math.isfinite(value):
        raise ValueError(f"parameter {name}={value!r} must be a finite number (not NaN or infinity)")
    return value


_EXAMPLES = {dict: '\'{"epochs": 5}\'', list: "'[0.01, 0.1]'", float: "0.1", int: "3"}
