"""The reference EK-FAC implementation, kronfluence (an optional extra: ``pip install kronfluence==1.0.1``), behind
one function, so that chapter 04, its tests and ``benchmarks/bench_ekfac.py`` call it the same way.

Conventions that differ from ``ekfac`` (each accounted for where the scores are compared):
* kronfluence's pairwise score is grad f_t^T (F + lambda I)^{-1} grad loss_i; the course's tau is -(1/n) times that.
* Its covariances of a convolution are averaged over examples AND positions, so its K-FAC block of a conv layer
  is 1/T of the KFC block that ``ekfac`` uses (T output positions); EK-FAC is unaffected (the corrected
  eigenvalues come from per-example gradients in both).
* ``damping_factor=None`` selects its heuristic: 0.1 x the mean eigenvalue of each layer (our ``relative=True``
  with damping 0.1); its default is an absolute 1e-8.
* With ``use_empirical_fisher=False`` it samples labels with torch's global generator (not seeded here), so only
  the empirical-Fisher option is deterministic.
"""
from __future__ import annotations

import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from .. import measure


def available() -> bool:
    try:
        import kronfluence  # noqa: F401
        return True
    except ImportError:
        return False


def kronfluence_scores(net, state: dict, x_train, y_train, x_targets, y_targets, *, damping: float | None = 1e-8,
                       **kw) -> tuple[torch.Tensor, dict]:
    """kronfluence's pairwise scores (n_train, T) in ITS convention (grad f_t^T (F + lambda I)^{-1} grad loss_i)
    for the margin of each target, and {'factors': s, 'scores': s} wall times. damping=None: its heuristic.
    Keyword arguments as in ``kronfluence_sweep``."""
    scores, secs = kronfluence_sweep(net, state, x_train, y_train, x_targets, y_targets, dampings=[damping], **kw)
    return scores[0], {"factors": secs["factors"], "scores": secs["scores"][0]}


def kronfluence_sweep(net, state: dict, x_train, y_train, x_targets, y_targets, *, dampings=(1e-8,),
                      strategy: str = "ekfac", empirical: bool = True, batch_size: int = 256,
                      query_batch_size: int = 200) -> tuple[list, dict]:
    """``kronfluence_scores`` for several dampings from one factor fit: a list of (n_train, T) score matrices (in
    the order of ``dampings``; None: its heuristic) and {'factors': s, 'scores': [s per damping]}.
    empirical=False samples labels with torch's global generator: seed it (``torch.manual_seed``) before the call
    for reproducible scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class MarginTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return measure.margin(model(x), y).sum()

    model = copy.deepcopy(net)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    model.eval()
    task = MarginTask()
    model = prepare_model(model, task)
    train = torch.utils.data.TensorDataset(x_train, y_train)
    query = torch.utils.data.TensorDataset(x_targets, y_targets)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("course", model, task, cpu=x_train.device.type == "cpu", disable_tqdm=True,
                            output_dir=folder)
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("factors", train, per_device_batch_size=batch_size, factor_args=fargs,
                                 overwrite_output_dir=True)
        t_factors = time.perf_counter() - t0
        out, secs = [], []
        for j, d in enumerate(dampings):
            t1 = time.perf_counter()
            analyzer.compute_pairwise_scores(f"scores{j}", "factors", query, train, per_device_query_batch_size=
                                             query_batch_size, per_device_train_batch_size=batch_size,
                                             score_args=ScoreArguments(damping_factor=d),
                                             overwrite_output_dir=True)
            secs.append(time.perf_counter() - t1)
            out.append(analyzer.load_pairwise_scores(f"scores{j}")["all_modules"].T.contiguous())
    return out, {"factors": t_factors, "scores": secs}
