"""Sanity checks the chapters assert: each raises AssertionError (ValueError for malformed scores) with a message
that says what was wrong, and each has a test in ``tests/test_checks.py`` that shows it failing on a broken input
(a flipped sign, shuffled or constant scores, a wrong matrix).

A check returns the measured quantity when it passes, so a chapter can print what it asserted."""
from __future__ import annotations

import numpy as np
import torch


def check_informative(scores: torch.Tensor, rel: float = 1e-3):
    """Raise ValueError unless scores (n_train, T) vary across training examples for every target and differ
    between targets.

    Catches the failure of a published notebook that differentiated a detached copy of the parameters: every
    gradient came out zero, so every score was the same number."""
    s = torch.as_tensor(scores).double()
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if (s.std(0) <= rel * s.abs().amax(0).clamp_min(1e-300)).any():
        raise ValueError("scores are (nearly) constant across training examples for some target: are the "
                         "gradients taken with respect to the parameters the forward pass uses?")
    if s.shape[1] > 1 and (s - s[:, :1]).abs().max() <= rel * s.abs().max():
        raise ValueError("every target got the same scores")


def check_small(value: float, bound: float, what: str) -> float:
    """``value`` (an error, a difference) is finite and at most ``bound``; returns it."""
    value = float(value)
    if not value <= bound:  # also fails for NaN
        raise AssertionError(f"{what} = {value:.3g}, above the bound {bound:.3g}")
    return value


def check_lds_above(score, baseline, margin: float, what: str) -> float:
    """The LDS ``score`` (an ``lds.Score``) is above ``baseline`` (a Score or a number) by more than ``margin``,
    mean against mean. Fails for shuffled or sign-flipped scores, whose LDS sits at or below random.
    Returns score.mean - baseline."""
    base = float(getattr(baseline, "mean", baseline))
    if not score.mean > base + margin:
        raise AssertionError(f"{what}: LDS {score!r} does not clear {base:.3f} + {margin:g}")
    return score.mean - base


def check_not_below(score, baseline, what: str) -> float:
    """The LDS ``score``'s 95% interval reaches ``baseline``'s (both ``lds.Score``, e.g. random scores'):
    score.ci[1] >= baseline.ci[0]. A method may carry little information, but an interval wholly below random's
    says that its scores point the wrong way (a flipped sign in its record or its pipeline). Fails for the
    sign-flipped scores of a predictive method and for NaN. Returns score.ci[1] - baseline.ci[0]."""
    gap = float(score.ci[1]) - float(baseline.ci[0])
    if not gap >= 0:  # also fails for NaN
        raise AssertionError(f"{what}: LDS {score!r} lies wholly below the baseline's interval {baseline!r}: are "
                             "its scores' signs flipped?")
    return gap


def check_records_described(params_by_chapter: dict, strict: bool = True) -> list:
    """Every landscape record says what produced it. params_by_chapter: {chapter: a record's ``Method.params``}
    (``landscape.record_params``): None for a record written before records carried their parameters, a dict whose
    "chapter" entry is empty when the chapter passed none. Returns the chapters whose record lacks either (sorted;
    empty when every record is described). strict: raise AssertionError naming them; otherwise only warn
    (``warnings.warn``), for a cache whose records are old but still usable (re-running those chapters fixes it)."""
    stale = sorted(ch for ch, p in params_by_chapter.items() if not (isinstance(p, dict) and p.get("chapter")))
    if stale:
        message = (f"the landscape records of chapters {stale} do not say which parameters produced them (written "
                   "before records carried them, or published without params=): re-run those chapters")
        if strict:
            raise AssertionError(message)
        import warnings

        warnings.warn(message, stacklevel=2)
    return stale


def check_no_information(score, max_half_width: float, what: str) -> float:
    """An LDS ``score`` (an ``lds.Score``) that should carry no information (random scores): its 95% interval
    contains 0 and is narrower than 2 x ``max_half_width`` (so that 'contains 0' is not won by a useless, wide
    interval). Fails for scores that do predict (interval above 0) and for a ground truth too small to tell.
    Returns the mean."""
    lo, hi = score.ci
    if not lo <= 0 <= hi:
        raise AssertionError(f"{what}: LDS {score!r} excludes 0: these scores were expected to carry no information")
    if not (hi - lo) / 2 <= max_half_width:
        raise AssertionError(f"{what}: LDS interval {score!r} is wider than +-{max_half_width:g}: too few subsets "
                             "or targets to tell")
    return score.mean


def no_information_half_width(m: int, n_targets: int, slack: float = 1.5) -> float:
    """The half-width that ``check_no_information`` should allow an LDS interval of scores without information,
    from m subsets and n_targets targets: such a target's Spearman over m subsets has a standard deviation of
    about 1 / sqrt(m - 1), independently across targets, so their mean has 1 / sqrt((m - 1) T); the two-way
    bootstrap (``lds``) counts that spread up to sqrt(3) times (see ``course_lib.lds``), so the 95% half-width is at
    most 1.96 sqrt(3) / sqrt((m - 1) T); ``slack`` (default 1.5) allows for the bootstrap's own noise.
    Raises ValueError for m < 3 or n_targets < 1."""
    if m < 3 or n_targets < 1:
        raise ValueError(f"need at least 3 subsets and 1 target, got m={m}, n_targets={n_targets}")
    return slack * 1.96 * np.sqrt(3) / np.sqrt((m - 1) * n_targets)


def check_not_decreasing(values, slack: float, what: str):
    """A curve that should not fall (e.g. LDS against the number of ensembled models): no value is below an
    earlier one by more than ``slack``."""
    v = np.asarray([float(getattr(x, "mean", x)) for x in values])
    drops = np.maximum.accumulate(v) - v
    if not (np.isfinite(v).all() and drops.max() <= slack):
        raise AssertionError(f"{what} falls by {drops.max():.3f} (> {slack:g}): {np.round(v, 4).tolist()}")


def check_paired_gain(diff, what: str, bound: float = 0.0) -> float:
    """A paired difference (an ``lds.Score`` from ``lds.lds_difference``, e.g. an ensemble of M models minus one
    model) whose 95% interval lies wholly above ``bound``: the first is better beyond the resampling of subsets and
    targets. Fails for a flat curve (an ensemble that does not help: a difference near 0), a reversed one and NaN.
    Returns diff.ci[0] - bound."""
    gain = float(diff.ci[0]) - bound
    if not gain > 0:  # also fails for NaN
        raise AssertionError(f"{what}: paired difference {diff!r} does not lie above {bound:g}")
    return gain


def check_same_seed(seeds, expected: int, what: str) -> int:
    """Every seed in ``seeds`` equals ``expected`` (e.g. the seeds the fixed-seed ground truths were trained with
    against the attributed run's): a ground truth of another run would score a derivative of this run against the
    wrong counterfactual. Returns the number of seeds checked."""
    seeds = [int(s) for s in seeds]
    wrong = [s for s in seeds if s != int(expected)]
    if not seeds or wrong:
        raise AssertionError(f"{what}: trained with seeds {seeds or 'none'}, not all {int(expected)}")
    return len(seeds)


def check_psd_vs_indefinite(gnh_eigs, hessian_eigs, rel: float = 1e-6):
    """The GNH spectrum has no eigenvalue below -rel x its largest; the Hessian's smallest is below that bound.
    Fails for a 'GNH' that is really the Hessian, or a Hessian that came out PSD (e.g. the GNH by mistake)."""
    g, h = torch.as_tensor(gnh_eigs).double(), torch.as_tensor(hessian_eigs).double()
    if not g.min() >= -rel * g.abs().max():
        raise AssertionError(f"GNH has a negative eigenvalue {float(g.min()):.3g} (largest {float(g.max()):.3g})")
    if not h.min() < -rel * h.abs().max():
        raise AssertionError(f"the Hessian's smallest eigenvalue {float(h.min()):.3g} is not negative")


def check_ekfac_not_worse(err_ekfac: float, err_kfac: float, slack: float = 1e-9):
    """EK-FAC's eigenvalues are the best diagonal in K-FAC's eigenbasis, so its Frobenius error (against the
    block-diagonal GNH, exact per-example gradients) cannot exceed K-FAC's."""
    if not err_ekfac <= err_kfac + slack:
        raise AssertionError(f"EK-FAC error {err_ekfac:.4g} exceeds K-FAC error {err_kfac:.4g}")


def check_predicts_retraining(predicted, actual, min_r: float = 0.5) -> float:
    """Pearson correlation of predicted and actual leave-one-out changes above ``min_r`` (sign included: a
    flipped sign gives a negative correlation); returns it."""
    r = float(np.corrcoef(np.asarray(predicted, float), np.asarray(actual, float))[0, 1])
    if not r > min_r:
        raise AssertionError(f"predicted vs actual leave-one-out change: Pearson r = {r:.3f} <= {min_r}")
    return r


def check_agreement(ours, theirs, min_rho: float = 0.99) -> float:
    """Mean per-target Spearman correlation of two (n, T) score matrices above ``min_rho``; returns it."""
    from .lds import spearman_columns

    rho = float(np.mean(spearman_columns(np.asarray(ours, float), np.asarray(theirs, float))))
    if not rho > min_rho:
        raise AssertionError(f"score agreement (mean per-target Spearman) {rho:.4f} <= {min_rho}")
    return rho


def check_lds_invariances(lds_of, scores, scale: float = 3.0, offset=2.0, tol: float = 1e-9) -> float:
    """The LDS scores by rank: ``lds_of`` (a function of scores (n_train, T) that returns an ``lds.Score`` or a
    number, e.g. ``lambda s: lds.lds(s, gt, part="eval")``) gives ``scale * scores + offset`` (scale > 0; offset a
    number or one per target, shape (T,)) the same LDS as ``scores``, and ``-scores`` the opposite LDS, both within
    ``tol``. (Every subset has the same size, so an offset moves every subset's prediction by the same amount.)
    The LDS of ``scores`` must not be 0 (within 10 x tol), or the sign test would pass for any implementation.
    Fails for a score that is not a correlation (a covariance or an error grows with the scale), one that ignores
    the sign (a squared correlation) and one that does not look at the scores. A Pearson correlation passes: it
    has the same invariances. Returns the LDS of ``scores``."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    s = torch.as_tensor(scores).double()
    value = lambda x: float(getattr(x, "mean", x))
    base = value(lds_of(s))
    if not abs(base) > 10 * tol:  # also fails for NaN
        raise AssertionError(f"the LDS of the scores is {base:.3g}: the invariance checks need scores whose LDS is "
                             "not 0")
    moved = value(lds_of(scale * s + torch.as_tensor(offset, dtype=torch.float64)))
    if not abs(moved - base) <= tol:
        raise AssertionError(f"LDS changed under rescaling by {scale:g} and an offset: {base:.6f} -> {moved:.6f}; "
                             "the LDS must depend on the ranks of the predictions only")
    flipped = value(lds_of(-s))
    if not abs(flipped + base) <= tol:
        raise AssertionError(f"LDS of -scores is {flipped:.6f}, not -{base:.6f}: a flipped sign must flip the LDS")
    return base


def check_models_learned(accuracy, min_mean: float, what: str = "ground-truth models") -> float:
    """The models behind a ground truth learned: their test accuracies (any shape, e.g. ``gt.accuracy`` (m, k))
    are finite and their mean is above ``min_mean``. Fails for an untrained (chance-level) or diverged ground
    truth. Returns the mean accuracy."""
    acc = torch.as_tensor(accuracy).double()
    if not torch.isfinite(acc).all():
        raise AssertionError(f"{what}: test accuracies contain NaN or infinite values")
    mean = float(acc.mean())
    if not mean > min_mean:
        raise AssertionError(f"{what}: mean test accuracy {mean:.3f} <= {min_mean:g}: were they trained?")
    return mean


def check_noise_ceiling(ceilings: dict, tol: float = 1e-6) -> float:
    """Seed noise in a ground truth is real but partial, and the ceilings are in order. ``ceilings`` is the dict
    of ``lds.noise_ceiling``: models trained with different seeds on the same subsets agree (the 95% interval of
    ``one_vs_one``, r, lies above 0) but not completely (r < 1 - tol), and 0 <= ceiling_1 <= ceiling_k <= 1
    (means: averaging k seeds can only raise the ceiling). Fails for an untrained or misaligned ground truth
    (r about 0), replicates that are one model (r = 1) and swapped or wrongly computed ceilings.
    Returns the mean of ceiling_k."""
    r = ceilings["one_vs_one"]
    c1, ck = (float(getattr(ceilings[key], "mean", ceilings[key])) for key in ("ceiling_1", "ceiling_k"))
    if not r.ci[0] > 0:
        raise AssertionError(f"seeds do not agree: one-vs-one r = {r!r} does not exclude 0; the ground truth's "
                             "outputs do not depend on the subsets (untrained models, misaligned outputs?)")
    if not r.mean < 1 - tol:
        raise AssertionError(f"one-vs-one r = {r.mean:.6f}: the replicate models agree perfectly; are they trained "
                             "with different seeds?")
    if not 0 <= c1 <= ck <= 1:  # also fails for NaN
        raise AssertionError(f"noise ceilings out of order: need 0 <= ceiling_1 ({c1:.3f}) <= ceiling_k ({ck:.3f}) "
                             "<= 1")
    return ck


def check_cv_gain(relative_cv_error, max_value: float, what: str, quantile: float = 0.5) -> float:
    """A fitted regression (e.g. a datamodel) predicts held-out data better than its intercept alone:
    ``relative_cv_error`` (one value per target: the cross-validated error at the chosen penalty divided by the
    cross-validated error of predicting the mean) is finite and its ``quantile`` over targets (default the median;
    a lower one where only some targets can be predicted, e.g. with few models) is below ``max_value`` (< 1).
    Fails for a fit on outputs shuffled against the inputs (cross-validation then keeps no weight: ratio 1) and
    for a diverged fit (NaN). Returns that quantile."""
    r = torch.as_tensor(relative_cv_error).double().flatten()
    if len(r) == 0 or not torch.isfinite(r).all():
        raise AssertionError(f"{what}: relative cross-validated errors are empty or not finite")
    value = float(r.quantile(quantile))
    if not value < max_value:
        raise AssertionError(f"{what}: the {quantile:g} quantile over targets of cross-validated error / error of "
                             f"the mean = {value:.4f}, not below {max_value:g}: the fit does not predict held-out "
                             "models better than their mean")
    return value


def check_independent_subsets(masks, reference, alpha: float, tol: float = 0.02,
                              what: str = "datamodel subsets vs LDS subsets") -> float:
    """Two streams of random alpha-subsets are independent draws (e.g. the datamodels' training subsets and the LDS
    evaluation subsets, which a method must never be fitted on): no subset of ``masks`` (m, n) equals one of
    ``reference`` (m', n), and the mean share of a ``masks`` subset that lies in a ``reference`` subset is
    ``alpha`` (chance) within ``tol``. Fails for a reused subset, for the same stream twice (every subset reused),
    and for streams that are not independent draws from the whole pool (e.g. both crowded into one part of it).
    Returns the mean share."""
    a, b = torch.as_tensor(masks).double(), torch.as_tensor(reference).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"masks must be (m, n) and (m', n) with the same n, got {tuple(a.shape)} and {tuple(b.shape)}")
    common = a @ b.T  # (m, m') examples the two subsets share
    size_a, size_b = a.sum(1, keepdim=True), b.sum(1)[None, :]
    same = int(((common == size_a) & (common == size_b)).sum())
    if same:
        raise AssertionError(f"{what}: {same} subset(s) of the first stream reappear in the second; the streams "
                             "must be independent draws")
    share = float((common / size_a.clamp(min=1)).mean())
    if not abs(share - alpha) <= tol:  # also fails for NaN
        raise AssertionError(f"{what}: a subset shares on average {share:.3f} of its examples with a subset of the "
                             f"other stream; independent draws share alpha = {alpha:g} (+-{tol:g})")
    return share


def _top_k_sources(scores, source_train, source_targets, k):
    """Validated inputs of the same-source measures: (n_train, T) scores, (n_train,) and (T,) integer sources."""
    s = torch.as_tensor(scores)
    src_train, src_targets = torch.as_tensor(source_train), torch.as_tensor(source_targets)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (n_train, n_targets), got {tuple(s.shape)}")
    n, T = s.shape
    if src_train.shape != (n,):
        raise ValueError(f"source_train must have shape (n_train,) = ({n},) to match the scores' rows, got "
                         f"{tuple(src_train.shape)}; are the scores transposed?")
    if src_targets.shape != (T,):
        raise ValueError(f"source_targets must have shape (n_targets,) = ({T},) to match the scores' columns, got "
                         f"{tuple(src_targets.shape)}; are the scores transposed?")
    for name, src in (("source_train", src_train), ("source_targets", src_targets)):
        if src.is_floating_point() or src.is_complex() or src.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer source (dataset) ids, got {src.dtype}")
    if not (isinstance(k, int) and not isinstance(k, bool)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer between 1 and n_train = {n}, got {k!r}")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s, src_train.to(s.device), src_targets.to(s.device)


def same_source_rate(scores, source_train, source_targets, k: int = 1) -> float:
    """The cross-dataset sanity check's measure (Hammoudeh & Lowd 2022, the course text's [HL'22]): the fraction,
    over targets and each target's top-k training examples (highest score = most raises its margin), of examples
    from the target's own source (dataset).

    scores: (n_train, n_targets), course convention; source_train: (n_train,) and source_targets: (n_targets,)
    integer source ids (``data.digits_union``: 0 = MNIST, 1 = scikit-learn's 8x8 digits). Ties are broken by
    ``torch.topk``. A ranking that ignores the sources scores, in expectation, the share of each target's source in
    the training pool averaged over targets (``check_same_source``'s baseline). Raises ValueError for shapes that
    do not match, non-integer sources, k outside 1..n_train or non-finite scores."""
    s, src_train, src_targets = _top_k_sources(scores, source_train, source_targets, k)
    top = s.topk(k, dim=0).indices  # (k, T)
    return float((src_train[top] == src_targets[None, :]).double().mean())


def check_same_source(scores, source_train, source_targets, k: int = 10, margin: float = 0.1) -> float:
    """Hammoudeh & Lowd's (2022) cross-dataset check: trained on the union of two visibly different datasets, a
    target's top-k training examples by score should come from the target's own dataset more often than a random
    ranking's would. Passes when ``same_source_rate(scores, ..., k)`` exceeds the chance rate (the share of each
    target's source in the training pool, averaged over targets) by more than ``margin``; returns the rate.
    Fails for shuffled scores (at chance) and scores that favour the other source (below chance). Shapes as in
    ``same_source_rate`` (ValueError when malformed)."""
    s, src_train, src_targets = _top_k_sources(scores, source_train, source_targets, k)
    rate = same_source_rate(s, src_train, src_targets, k)
    chance = float((src_train[:, None] == src_targets[None, :]).double().mean())
    if not rate > chance + margin:
        raise AssertionError(f"cross-dataset check: {rate:.1%} of the targets' top-{k} training examples come from "
                             f"the target's own dataset; a random ranking gives {chance:.1%}, and the check needs "
                             f"more than {chance:.1%} + {margin:g}: the scores do not tell the datasets apart")
    return rate


def check_covers(found, required, what: str) -> int:
    """Every item of ``required`` is in ``found`` (e.g. every method the course implements appears in chapter 07's
    table). Returns the number of required items."""
    missing = sorted(set(required) - set(found))
    if missing:
        raise AssertionError(f"{what}: missing {missing}")
    return len(set(required))
