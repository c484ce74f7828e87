"""Every chapter's attribution methods in one record per chapter, for chapter 07's landscape (course text: "Evaluating
the landscape": LDS against compute for every method on one ground truth).

A chapter *publishes* the methods it ran (``publish``): for each method and budget, the scores of every
hyperparameter candidate it tried (chapter 07 chooses among them on the tuning targets of each ground truth with
``lds.tune``, exactly as the chapters do), the attribution seconds of each candidate, and the training the method
needs (how many models, on what, and the seconds). A chapter's record replaces its previous one for the same setting
and data, atomically. Chapter 07 reads every chapter's record (``published``) and computes nothing twice.

Compute is counted the same way for every method: attribution seconds (measured when the chapter computed the
scores, on the machine that computed them) plus the training of every model the method needs, charged by one
measured rate: ``seconds_per_model`` trains a few models on the whole pool with the setting's recipe once, times
them, and caches the rate; a model on a fraction of the pool is charged that fraction of it (training time is
proportional to the examples seen). The ground truths are evaluation, charged to no method.

``COURSE_METHODS`` lists every method the course implements with the course_lib call that computes it; chapter 07
checks that each appears in its table, and a unit test checks that every public function of ``course_lib.attribution``
is either such a call or a listed helper, so a new method cannot be forgotten.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import time
from pathlib import Path

import numpy as np
import torch

from .cache import atomic_save, cache_dir, cache_key
from .data import Data
from .settings import Setting

FAMILIES = ("baseline", "influence", "training dynamics", "surrogate", "datamodels")
FORMAT_VERSION = 2

# key: (family, the course_lib calls that compute it, the chapter that publishes it)
COURSE_METHODS = {
    "random": ("baseline", ["similarity.random_scores"], "02"),
    "class match": ("baseline", ["similarity.class_match"], "02"),
    "pixel similarity": ("baseline", ["similarity.pixel_similarity"], "02"),
    "representation similarity": ("baseline", ["influence.representation_similarity", "influence.features"], "02"),
    "gradient dot product": ("influence", ["influence.grad_dot"], "02"),
    "gradient cosine": ("influence", ["influence.grad_cos"], "02"),
    "influence function (CG)": ("influence", ["influence.influence_scores", "influence.cached_scores"], "02"),
    "EK-FAC": ("influence", ["ekfac.fit_factors", "ekfac.influence_scores", "ekfac.ekfac_scores",
                             "ekfac.cached_factors", "ekfac.combine"], "04"),
    "TracIn": ("training dynamics", ["tracin.tracin_scores", "tracin.tracin_ideal", "tracin.lr_weights"], "05"),
    "exact unrolling": ("training dynamics", ["unroll.unrolled_scores"], "05"),
    "truncated unrolling": ("training dynamics", ["unroll.unrolled_scores"], "05"),
    "SOURCE": ("training dynamics", ["source.source_scores", "source.segments"], "05"),
    "last-layer influence": ("surrogate", ["surrogate.last_layer_influence", "surrogate.last_layer_from_features"],
                             "06"),
    "kNN": ("surrogate", ["surrogate.knn_scores", "surrogate.knn_from_features"], "06"),
    "kNN-Shapley": ("surrogate", ["surrogate.knn_shapley", "surrogate.knn_shapley_from_features"], "06"),
    "TRAK": ("surrogate", ["trak.trak", "trak.trak_sweep"], "06"),
    "datamodels (LASSO)": ("datamodels", ["datamodels.fit_lasso", "datamodels.fit"], "03"),
    "datamodels (ridge)": ("datamodels", ["datamodels.fit_ridge"], "03"),
    "datamodels (difference of means)": ("datamodels", ["datamodels.difference_of_means"], "03"),
}

# the public functions of course_lib.attribution that are not methods of their own, by what they are
BUILDING_BLOCKS = {
    "linear solvers and operators of the influence function": [
        "influence.solve_exact", "influence.solve_cg", "influence.solve_lanczos", "influence.solve_lissa",
        "influence.influence_from_solution"],
    "convex reference retraining (chapter 01's leave-one-out checks)": [
        "influence.fit_convex", "influence.logreg_hessian", "influence.logreg_example_factor", "influence.fit_newton"],
    "evaluation helpers": ["influence.identical_class_rate", "ekfac.relative_error"],
    "curvature pieces (chapter 04's exact references and K-FAC machinery)": [
        "ekfac.layers_of", "ekfac.patches", "ekfac.capture", "ekfac.per_example_layer_grads",
        "ekfac.layer_grads_from_flat", "ekfac.flat_from_layer_grads", "ekfac.layer_order", "ekfac.gnh",
        "ekfac.gnh_products", "ekfac.fisher_exact", "ekfac.lanczos_extremes", "ekfac.eigh_solve"],
    "reference implementations (optional extras, compared against in chapters 04 and 06)": [
        "ekfac_reference.available", "ekfac_reference.kronfluence_scores", "ekfac_reference.kronfluence_sweep",
        "trak.traker_scores"],
    "TRAK's pieces": ["trak.featurize", "trak.out_to_loss", "trak.kernel_solve", "trak.kernel_solve_dampings",
                      "trak.glm_influence", "trak.soft_threshold"],
    "SOURCE's pieces and its exact small-problem form": ["source.filters", "source.damping_ratio",
                                                         "source.source_exact", "source.segment_factors"],
    "the surrogates' pieces": ["surrogate.last_layer_grads", "surrogate.last_layer_hessian",
                               "surrogate.neighbour_order"],
    "unrolling's pieces and its explicit-matrix reference": ["unroll.step_pullback", "unroll.product_formula"],
    "what influence functions estimate (Bae et al. 2022's PBRF; chapter 01)": ["pbrf.pbrf_response", "pbrf.pbrf_effect"],
    "the datamodels' training data": ["datamodels.training_spec", "datamodels.training_masks",
                                      "datamodels.training_data", "datamodels.cached_models"],
}


@dataclass
class Method:
    """One method at one budget, as a chapter ran it.

    key: a ``COURSE_METHODS`` key; label: what the landscape prints (method and budget, e.g. "EK-FAC, M = 4");
    candidates: {hyperparameter label (str): scores (n_train, n_targets), the course's sign: positive = including the
    example raises the target's margin}, every candidate the chapter tuned over (one entry when nothing is tuned);
    seconds: {same labels: attribution seconds of that candidate}; models: how many trained models it needs (0 for
    model-free rules); attributes: which models ("reference model 0", "reference models 0-3", "the fixed-seed run",
    "subset models", "none"); fraction: the share of the training pool each of those models trains on (1 for the
    whole pool); chapter: "01".."06"; budget: the method's budget knob as a number (models M, checkpoints C, segments
    L, ...; None if it has none)."""
    key: str
    label: str
    candidates: dict
    seconds: dict
    models: int
    attributes: str
    fraction: float
    chapter: str
    budget: float | None = None

    def __post_init__(self):
        if self.key not in COURSE_METHODS:
            raise ValueError(f"unknown method key {self.key!r}; valid: {sorted(COURSE_METHODS)}")
        if not self.candidates:
            raise ValueError(f"{self.label}: no candidates; give at least one {{label: scores}}")
        if set(self.seconds) != set(self.candidates):
            raise ValueError(f"{self.label}: seconds has labels {sorted(self.seconds)}, candidates "
                             f"{sorted(self.candidates)}; give the seconds of every candidate")
        shapes = {tuple(s.shape) for s in self.candidates.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{self.label}: candidates must share one (n_train, n_targets) shape, got {shapes}")
        for lab, s in self.candidates.items():
            if not torch.isfinite(s).all():
                raise ValueError(f"{self.label}: candidate {lab!r} has non-finite scores; not published")
        for v in self.seconds.values():
            if not (0 <= float(v) < float("inf")):
                raise ValueError(f"{self.label}: seconds must be finite and >= 0, got {v!r}")
        if not (isinstance(self.models, int) and self.models >= 0 and 0 < self.fraction <= 1):
            raise ValueError(f"{self.label}: models must be an int >= 0 and fraction in (0, 1], got "
                             f"{self.models!r}, {self.fraction!r}")

    @property
    def family(self) -> str:
        return COURSE_METHODS[self.key][0]

    def training_seconds(self, per_model: float) -> float:
        """Seconds to train the models this method needs, at ``per_model`` seconds per model on the whole pool."""
        return self.models * self.fraction * per_model


def seconds_per_model(cfg: Setting, data: Data, n: int = 4, cache=None) -> float:
    """Seconds to train one model on the whole pool with the setting's recipe on this machine: ``n`` models trained
    side by side with the ensemble trainer (as the reference models and the ground truths are), timed once and cached
    per recipe and data, so every chapter charges training at the same rate. The rate is measured under whatever else
    ran on the machine at that moment; delete ``seconds_per_model_<n>.pt`` in the cache's landscape folder to measure
    again."""
    from .train import full_mask, stream_seeds, train_models  # training is needed only to measure

    path = _path(cfg, data, "rate", cache).with_name(f"seconds_per_model_{n}.pt")
    if not path.exists():
        t0 = time.perf_counter()
        train_models(cfg, data, full_mask(data, n), stream_seeds("landscape-timing", n))
        atomic_save({"seconds": (time.perf_counter() - t0) / n, "models": n}, path)
    return float(torch.load(path, weights_only=True)["seconds"])


def _path(cfg: Setting, data: Data, chapter: str, cache=None) -> Path:
    spec = {"recipe": cfg.recipe(), "n_train": data.n_train, "targets": data.target_idx.tolist(),
            "format": FORMAT_VERSION}
    return cache_dir(cache) / f"landscape_{cfg.dataset}_{cache_key(spec)}" / f"chapter_{chapter}.pt"


def publish(cfg: Setting, data: Data, chapter: str, methods: list[Method], cache=None) -> Path:
    """Write ``methods`` as chapter ``chapter``'s record for this setting and data (replacing its earlier record,
    atomically) and return the file. Scores must have shape (n_train, n_targets) of ``data``; raises ValueError if
    not, or if a method claims another chapter."""
    want = (data.n_train, len(data.target_idx))
    for m in methods:
        if m.chapter != chapter:
            raise ValueError(f"{m.label} says chapter {m.chapter}, published by chapter {chapter}")
        shape = tuple(next(iter(m.candidates.values())).shape)
        if shape != want:
            raise ValueError(f"{m.label}: scores of shape {shape}, expected (n_train, n_targets) = {want}")
    path = _path(cfg, data, chapter, cache)
    atomic_save([{**asdict(m), "candidates": {str(k): v.detach().float().cpu().contiguous()
                                              for k, v in m.candidates.items()},
                  "seconds": {str(k): float(v) for k, v in m.seconds.items()},
                  "fraction": float(m.fraction)} for m in methods], path)
    return path


def published(cfg: Setting, data: Data, cache=None) -> dict:
    """{chapter: [Method, ...]} for every chapter that has published for this setting and data (possibly none)."""
    folder = _path(cfg, data, "00", cache).parent
    return {p.stem.removeprefix("chapter_"): [Method(**d) for d in torch.load(p, weights_only=True)]
            for p in sorted(folder.glob("chapter_*.pt"))}


def pareto_front(cost, value) -> list[int]:
    """Indices of the points on the LDS-against-compute frontier, cheapest first: a point is on it when every
    cheaper point (strictly lower ``cost``) has a strictly lower ``value``; of equal costs the best value is kept.
    cost, value: 1-D sequences of the same length (seconds, LDS means); raises ValueError on NaN or unequal lengths."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    if cost.shape != value.shape or cost.ndim != 1:
        raise ValueError(f"cost and value must be 1-D of one length, got {cost.shape} and {value.shape}")
    if not (np.isfinite(cost).all() and np.isfinite(value).all()):
        raise ValueError("cost and value must be finite")
    front, best = [], -np.inf
    for i in np.lexsort((-value, cost)):  # by cost, then best value first
        if value[i] > best:
            front.append(int(i))
            best = value[i]
    return front
