"""The on-disk cache: one folder (``$COURSE_CACHE``, default ``~/.cache/pda_course``), keys that hash everything
that affects a result, and atomic writes (temp file + rename) so that an interrupted run never leaves half a file."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def cache_dir(path=None) -> Path:
    """Where cached results live: ``path``, else $COURSE_CACHE, else ``~/.cache/pda_course``."""
    return Path(path or os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "pda_course")


def cache_key(spec: dict) -> str:
    """A short stable hash of a JSON-able description of a result."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_or_compute(path, compute, spec: dict):
    """Load ``path`` if it exists, else ``compute()``, save the result atomically, and return it.

    The result must hold only tensors and plain containers (it is loaded with ``weights_only=True``). ``spec``
    (JSON-able: everything that shaped the result) is stored beside it; a file whose spec differs is foreign
    content and raises ValueError rather than being returned.
    """
    path = Path(path)
    spec = json.loads(json.dumps(spec, sort_keys=True, default=str))
    if path.exists():
        try:
            stored = torch.load(path, weights_only=True)
        except Exception as e:  # e.g. pickled objects from an older format
            raise ValueError(f"{path} cannot be read as a cached result ({type(e).__name__}): foreign content or an "
                             "older format. Delete it to recompute.") from e
        found = stored.get("spec") if isinstance(stored, dict) else None
        if found != spec:
            raise ValueError(f"{path} holds a result computed for {found}, not for {spec}: foreign content. "
                             "Delete it to recompute.")
        return stored["value"]
    value = compute()
    atomic_save({"spec": spec, "value": value}, path)
    return value
