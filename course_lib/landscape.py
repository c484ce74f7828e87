"""Every chapter's attribution methods in one record per chapter, for chapter 07's landscape (course text: "Evaluating
the landscape": LDS against compute for every method on one ground truth).

A chapter *publishes* the methods it ran (``publish``): for each method and budget, the scores of every
hyperparameter candidate it tried (chapter 07 chooses among them on the tuning targets of each ground truth with
``lds.tune``, exactly as the chapters do), the attribution seconds of each candidate, and the training the method
needs (how many models, on what, and the seconds). A chapter's record replaces its previous one for the same setting
and data, atomically. Chapter 07 reads every chapter's record (``published``) and computes nothing twice. Since a
re-run with other budgets replaces the record, every record says what produced it (``Method.params``: the setting,
its fields changed from the preset, the chapter's own budget parameters and the time of publication), and chapter 07
shows it next to the numbers.

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

from dataclasses import asdict, dataclass, fields
import datetime
import json
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
    "K-FAC": ("influence", ["ekfac.fit_factors", "ekfac.influence_scores", "ekfac.cached_factors"], "04"),
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
    "TRAK": ("surrogate", ["trak.trak", "trak.trak_sweep", "trak.trak_dampings", "trak.trak_damping_sweep"], "06"),
    "datamodels (LASSO)": ("datamodels", ["datamodels.fit_lasso", "datamodels.fit"], "03"),
    "datamodels (ridge)": ("datamodels", ["datamodels.fit_ridge"], "03"),
    "datamodels (difference of means)": ("datamodels", ["datamodels.difference_of_means"], "03"),
}

# the public functions of course_lib.attribution that are not methods of their own, by what they are
BUILDING_BLOCKS = {
    "chapter 05's training-dynamics pieces (TracInCP's weighted sum over checkpoints, linearity outcomes)": [
        "tracin.combine_checkpoints", "unroll.shared_outcomes"],
    "chapter 05's least-squares example (TracIn's bias against the unrolled derivative)": [
        "least_squares.problem", "least_squares.gd_run", "least_squares.scores", "least_squares.at_optimum"],
    "the label sign of the similarity rules": ["similarity.label_signed"],
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
    "chapter 03's analysis": ["datamodels.keep_largest"],
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
    L, ...; None if it has none); params: what produced the record, set by ``publish`` (``record_params``); None
    in records written before parameters were recorded."""
    key: str
    label: str
    candidates: dict
    seconds: dict
    models: int
    attributes: str
    fraction: float
    chapter: str
    budget: float | None = None
    params: dict | None = None

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


def record_params(cfg: Setting, params: dict | None = None) -> dict:
    """What produced a record: {"setting": its name, "changed": {field: value} of the setting's fields that differ
    from the named preset (empty for the preset itself), "chapter": the chapter's own parameters (``params``, e.g.
    its budget dict and ensemble sizes; {} if none given), "published": UTC time, ISO format}. Values are reduced to
    JSON types (lists, numbers, strings), so the record loads with ``torch.load(weights_only=True)``."""
    from . import settings  # the preset, to tell what a run changed

    try:
        preset = settings.get(cfg.name)
        changed = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                   if getattr(cfg, f.name) != getattr(preset, f.name)}
    except ValueError:  # a setting with no preset of its name: every field is what produced it
        changed = asdict(cfg)
    out = {"setting": cfg.name, "changed": changed, "chapter": dict(params or {}),
           "published": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return json.loads(json.dumps(out, default=str))


def describe_params(params: dict | None) -> dict:
    """A record's ``params`` as table columns: {"published (UTC)", "setting", "changed fields", "chapter
    parameters"}, each a short string ("not recorded" throughout for a record written before records carried their
    parameters)."""
    if params is None:
        return dict.fromkeys(("published (UTC)", "setting", "changed fields", "chapter parameters"), "not recorded")
    return {"published (UTC)": params["published"], "setting": params["setting"],
            "changed fields": ", ".join(f"{k}={v}" for k, v in params["changed"].items()) or "none",
            "chapter parameters": ", ".join(f"{k}={v}" for k, v in params["chapter"].items()) or "none given"}


def publish(cfg: Setting, data: Data, chapter: str, methods: list[Method], cache=None,
            params: dict | None = None) -> Path:
    """Write ``methods`` as chapter ``chapter``'s record for this setting and data (replacing its earlier record,
    atomically) and return the file. ``params``: the chapter's own parameters that shaped the methods (budget dicts,
    ensemble sizes, ...); stored with the setting's changed fields in every method's ``params``
    (``record_params``), so that a record made with other budgets says so. Scores must have shape
    (n_train, n_targets) of ``data``; raises ValueError if not, or if a method claims another chapter."""
    want = (data.n_train, len(data.target_idx))
    for m in methods:
        if m.chapter != chapter:
            raise ValueError(f"{m.label} says chapter {m.chapter}, published by chapter {chapter}")
        shape = tuple(next(iter(m.candidates.values())).shape)
        if shape != want:
            raise ValueError(f"{m.label}: scores of shape {shape}, expected (n_train, n_targets) = {want}")
    path = _path(cfg, data, chapter, cache)
    produced_by = record_params(cfg, params)
    atomic_save([{**asdict(m), "candidates": {str(k): v.detach().float().cpu().contiguous()
                                              for k, v in m.candidates.items()},
                  "seconds": {str(k): float(v) for k, v in m.seconds.items()},
                  "fraction": float(m.fraction), "params": produced_by} for m in methods], path)
    return path


def published(cfg: Setting, data: Data, cache=None) -> dict:
    """{chapter: [Method, ...]} for every chapter that has published for this setting and data (possibly none)."""
    folder = _path(cfg, data, "00", cache).parent
    return {p.stem.removeprefix("chapter_"): [Method(**d) for d in torch.load(p, weights_only=True)]
            for p in sorted(folder.glob("chapter_*.pt"))}


def tuned_budgets(records: dict, key: str, gt, per_model: float) -> list[dict]:
    """Every published budget of method ``key`` (``records``: what ``published`` returns), scored the way chapter 07
    scores it: the hyperparameter chosen among the record's candidates on the tuning targets of ``gt`` (``lds.tune``),
    the LDS reported on its evaluation targets. One dict per budget, in the order published: "method" (label and
    chapter), "key", "family", "budget", "choice" (the chosen candidate's label), "LDS" (an ``lds.Score``), "scores"
    (the chosen candidate's (n_train, n_targets) scores, for paired comparisons with ``lds.lds_difference``),
    "candidates" (how many the record offered), "seconds" (the choice's attribution seconds) and "with training (s)"
    (plus the training of the models it needs at ``per_model`` seconds per whole-pool model). [] when no chapter
    published ``key``."""
    from . import lds

    rows = []
    for m in (m for chapter in records.values() for m in chapter if m.key == key):
        tuned = lds.tune(m.candidates, gt)
        rows.append({"method": f"{m.label} (ch. {m.chapter})", "key": m.key, "family": m.family, "budget": m.budget,
                     "choice": tuned.choice, "LDS": tuned.reported, "scores": m.candidates[tuned.choice],
                     "candidates": len(m.candidates), "seconds": m.seconds[tuned.choice],
                     "with training (s)": m.seconds[tuned.choice] + m.training_seconds(per_model)})
    return rows


def family_best(records: dict, family: str, gt, per_model: float, exclude=()) -> list[dict]:
    """The ``tuned_budgets`` rows of the published method of ``family`` (a ``FAMILIES`` entry) whose best budget has
    the highest LDS mean on the evaluation targets, every budget of it; methods whose key is in ``exclude`` are
    skipped; [] when no chapter published a method of that family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    keys = [k for k, (fam, _, _) in COURSE_METHODS.items() if fam == family and k not in exclude]
    by_key = [rows for rows in (tuned_budgets(records, k, gt, per_model) for k in keys) if rows]
    return max(by_key, key=lambda rows: max(r["LDS"].mean for r in rows), default=[])


def bracket(rows: list[dict], value: float) -> tuple:
    """Where a method's LDS crosses ``value`` along its budgets (``rows``: dicts with "LDS", an ``lds.Score``, and
    "with training (s)", e.g. ``tuned_budgets``'s): (below, reach), with reach the cheapest row whose LDS mean reaches
    ``value`` and below the costliest row that stays under it while costing less than reach. Either is None where no
    row qualifies (reach None: no budget reaches it; below None: the cheapest budget already does). Read the
    compute the method needs for ``value`` as lying between the two rows' (only these budgets were run)."""
    cost = lambda r: r["with training (s)"]
    reach = min((r for r in rows if r["LDS"].mean >= value), key=cost, default=None)
    below = [r for r in rows if r["LDS"].mean < value and (reach is None or cost(r) < cost(reach))]
    return max(below, key=cost, default=None), reach


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


def best_within(labels, lds_means, seconds, budget: float):
    """The label of the highest LDS among the methods that cost at most ``budget`` seconds (None if none does).
    labels, lds_means, seconds: sequences of one length (a table's method column, its LDS means, its total
    seconds); of equal LDS the first is kept. Raises ValueError on unequal lengths."""
    labels, lds_means, seconds = list(labels), np.asarray(lds_means, float), np.asarray(seconds, float)
    if not len(labels) == len(lds_means) == len(seconds):
        raise ValueError(f"labels, lds_means and seconds must have one length, got {len(labels)}, "
                         f"{len(lds_means)}, {len(seconds)}")
    ok = np.flatnonzero(seconds <= budget)
    return labels[ok[np.argmax(lds_means[ok])]] if len(ok) else None


# the methods that need one model and its gradients only: the cross-dataset check runs them on a model trained on the
# union (ensembles, trajectories and datamodels would need their models retrained on the union)
CROSS_DATASET_METHODS = ("random", "pixel similarity", "representation similarity", "gradient dot product",
                         "gradient cosine", "influence function (CG)", "last-layer influence", "kNN", "kNN-Shapley")
CROSS_DATASET_TUNED = ("influence function (CG)", "last-layer influence", "kNN", "kNN-Shapley")


@dataclass
class CrossDataset:
    """``cross_dataset``'s result. union: the ``data.DigitsUnion``; scores: {method: (n_train, n_targets) scores on
    the union model}; accuracy: test accuracy on [MNIST, 8x8 digits]; seconds: the model and all scores, when
    computed; chance: a random ranking's same-source rate (the share of each target's source in the training pool,
    averaged over targets; ``checks.check_same_source``'s baseline); train_grad_norm: (n_train,) the norm of each
    training example's loss gradient on the union model (what the raw dot product and influence scale with and the
    cosine divides out)."""
    union: object
    scores: dict
    accuracy: list
    seconds: float
    chance: float
    train_grad_norm: torch.Tensor

    def rates(self, ks=(1, 10)) -> dict:
        """{method: {k: same-source rate of its top k}} (``checks.same_source_rate``)."""
        from .checks import same_source_rate

        return {name: {k: same_source_rate(s, self.union.source_train, self.union.source_targets, k=k) for k in ks}
                for name, s in self.scores.items()}

    def rate_intervals(self, ks=(1, 10), n_boot: int = 2000, seed: int = 0) -> dict:
        """{method: {k: lds.Score}}: the same-source rate of its top k (the mean equals ``rates``) with a 95%
        percentile bootstrap interval over the targets (``lds.bootstrap`` of the per-target rates, so the interval
        says how much the rate could move with other targets of the same two datasets)."""
        from .checks import same_source_rate
        from .lds import bootstrap

        src_train, src_targets = self.union.source_train, self.union.source_targets
        return {name: {k: bootstrap([same_source_rate(s[:, t:t + 1], src_train, src_targets[t:t + 1], k=k)
                                     for t in range(s.shape[1])], n_boot=n_boot, seed=seed) for k in ks}
                for name, s in self.scores.items()}

    def rates_by_target_source(self, k: int = 10) -> dict:
        """{method: [same-source rate of its top k over the MNIST targets, over the 8x8 digits' targets]}: which
        dataset's targets a method gets wrong."""
        from .checks import same_source_rate

        src_train, src_targets = self.union.source_train, self.union.source_targets
        return {name: [same_source_rate(s[:, src_targets == src], src_train, src_targets[src_targets == src], k=k)
                       for src in (0, 1)] for name, s in self.scores.items()}


def cross_dataset(cfg: Setting, chosen: dict, n_targets: int = 20, cache=None) -> CrossDataset:
    """The course text's cross-dataset sanity check (Hammoudeh & Lowd 2022): one model of the setting's recipe trained
    on ``data.digits_union`` (MNIST and scikit-learn's upsampled 8x8 digits), and every method of
    ``CROSS_DATASET_METHODS`` run on it through the course_lib call its chapter uses, with the hyperparameter it was
    given on the tuning targets: ``chosen`` = {method of ``CROSS_DATASET_TUNED``: damping (influence, last layer) or
    k (kNN, kNN-Shapley)}. Influence uses chapter 01's CG budget of the setting. n_targets: a multiple of 20, half
    from each dataset. Cached by everything that affects it (recipe, pool, targets, choices, budget)."""
    from . import cache as cache_mod, grads, train
    from .attribution import influence, similarity, surrogate
    from .data import digits_union

    missing = set(CROSS_DATASET_TUNED) - set(chosen)
    if missing:
        raise ValueError(f"chosen lacks {sorted(missing)}: give the damping or k chosen for each")
    union = digits_union(n_mnist=cfg.n_train, n_targets=n_targets)
    ud = union.data
    chosen = {k: float(chosen[k]) for k in CROSS_DATASET_TUNED}
    budget = influence.CHAPTER01_SOLVE.get(cfg.name, influence.CHAPTER01_SOLVE["cpu"])

    def compute():
        t0 = time.perf_counter()
        model = train.train_models(cfg, ud, train.full_mask(ud), train.stream_seeds("reference", 1))
        net, st = model.net, model.state_of(0)
        args = (ud.x_train, ud.y_train, ud.x_targets, ud.y_targets)
        g_train = grads.per_example_grads(net, st, ud.x_train, ud.y_train, "loss")
        g_targets = grads.per_example_grads(net, st, ud.x_targets, ud.y_targets, "margin")
        scores = {
            "random": similarity.random_scores(ud.n_train, len(ud.target_idx), seed=cfg.seed),
            "pixel similarity": similarity.pixel_similarity(*args, signed=True),
            "representation similarity": similarity.label_signed(
                influence.representation_similarity(net, st, ud.x_train, ud.x_targets), ud.y_train, ud.y_targets),
            "gradient dot product": influence.grad_dot(g_train, g_targets),
            "gradient cosine": influence.grad_cos(g_train, g_targets),
            "influence function (CG)": influence.influence_scores(
                net, st, *args, weight_decay=cfg.weight_decay, damping=chosen["influence function (CG)"],
                iters=budget["iters"], hessian_n=budget["hessian_n"], seed=cfg.seed, train_grads=g_train).scores,
            "last-layer influence": surrogate.last_layer_influence(
                net, st, *args, weight_decay=cfg.weight_decay, damping=chosen["last-layer influence"]).scores,
            "kNN": surrogate.knn_scores(net, st, *args, k=int(chosen["kNN"])).scores,
            "kNN-Shapley": surrogate.knn_shapley(net, st, *args, k=int(chosen["kNN-Shapley"])).scores,
        }
        acc = [float(model.accuracy(ud.x_test[union.source_test == s], ud.y_test[union.source_test == s])[0])
               for s in (0, 1)]
        return {"scores": {k: v.float() for k, v in scores.items()}, "accuracy": acc,
                "seconds": time.perf_counter() - t0, "train_grad_norm": g_train.norm(dim=1).float()}

    spec = {"recipe": cfg.recipe(), "n_mnist": cfg.n_train, "targets": ud.target_idx.tolist(), "chosen": chosen,
            "budget": budget, "v": 2}  # v2: the training gradients' norms are kept
    out = cache_mod.load_or_compute(cache_dir(cache) / f"ch07_cross_{cache_key(spec)}.pt", compute, spec)
    src_train, src_targets = union.source_train, union.source_targets
    chance = float((src_train[:, None] == src_targets[None, :]).double().mean())
    return CrossDataset(union, out["scores"], out["accuracy"], float(out["seconds"]), chance, out["train_grad_norm"])
