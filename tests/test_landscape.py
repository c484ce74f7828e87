import importlib
import inspect
import pkgutil

import pytest
import torch

import course_lib.attribution as attribution
from course_lib import landscape, settings
from course_lib.data import Data


def _data(n_train=6, n_targets=4):
    x = torch.zeros(n_train, 1, 2, 2)
    return Data("tiny", x, torch.zeros(n_train, dtype=torch.long), x[:n_targets], torch.zeros(n_targets,
                dtype=torch.long), torch.arange(n_targets), tuple(range(10)))


def _method(key="TRAK", scores=None, **kw):
    scores = torch.randn(6, 4) if scores is None else scores
    args = dict(key=key, label=f"{key}, M = 2", candidates={"-": scores}, seconds={"-": 1.5}, models=2,
                attributes="reference models 0-1", fraction=1.0, chapter="06", budget=2)
    return landscape.Method(**{**args, **kw})


def test_publish_round_trip_and_replace(tmp_path):
    cfg, data = settings.get("smoke"), _data()
    m = _method()
    landscape.publish(cfg, data, "06", [m, _method("kNN", chapter="06", budget=None)], cache=tmp_path)
    got = landscape.published(cfg, data, cache=tmp_path)
    assert list(got) == ["06"] and [g.key for g in got["06"]] == ["TRAK", "kNN"]
    assert torch.equal(got["06"][0].candidates["-"], m.candidates["-"]) and got["06"][0].seconds == {"-": 1.5}
    assert got["06"][0].family == "surrogate" and got["06"][0].budget == 2
    assert got["06"][0].training_seconds(3.0) == 6.0
    assert _method(models=400, fraction=0.5).training_seconds(3.0) == 600.0
    landscape.publish(cfg, data, "06", [m], cache=tmp_path)  # a chapter's new record replaces its old one
    assert [g.key for g in landscape.published(cfg, data, cache=tmp_path)["06"]] == ["TRAK"]
    other = settings.get("smoke", epochs=cfg.epochs + 1)  # another recipe: another record
    assert landscape.published(other, data, cache=tmp_path) == {}


def test_bad_records_are_refused(tmp_path):
    cfg, data = settings.get("smoke"), _data()
    with pytest.raises(ValueError, match="unknown method key"):
        _method("TRAK-ish")
    with pytest.raises(ValueError, match="seconds of every candidate"):
        _method(seconds={"other": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        _method(scores=torch.full((6, 4), float("nan")))
    with pytest.raises(ValueError, match="seconds must be finite"):
        _method(seconds={"-": float("inf")})
    with pytest.raises(ValueError, match="fraction in \\(0, 1\\]"):
        _method(fraction=0.0)
    with pytest.raises(ValueError, match="expected \\(n_train, n_targets\\)"):
        landscape.publish(cfg, data, "06", [_method(scores=torch.randn(5, 4))], cache=tmp_path)
    with pytest.raises(ValueError, match="published by chapter 04"):
        landscape.publish(cfg, data, "04", [_method()], cache=tmp_path)


def test_every_attribution_function_is_a_method_or_a_named_building_block():
    """A new public function in course_lib.attribution fails this test until it is either listed as the call of a
    method in COURSE_METHODS (and so must appear in chapter 07's landscape) or named as a building block."""
    methods = {c for _, calls, _ in landscape.COURSE_METHODS.values() for c in calls}
    blocks = {c for calls in landscape.BUILDING_BLOCKS.values() for c in calls}
    assert not methods & blocks
    found = set()
    for info in pkgutil.iter_modules(attribution.__path__):
        mod = importlib.import_module(f"course_lib.attribution.{info.name}")
        found |= {f"{info.name}.{n}" for n, o in vars(mod).items()
                  if inspect.isfunction(o) and o.__module__ == mod.__name__ and not n.startswith("_")}
    assert found - methods - blocks == set(), "classify these in course_lib.landscape"
    assert (methods | blocks) - found == set(), "listed but no longer in course_lib.attribution"


def test_pareto_front():
    cost = [10, 1, 5, 5, 100, 50]
    value = [0.5, 0.1, 0.3, 0.2, 0.45, 0.6]
    assert landscape.pareto_front(cost, value) == [1, 2, 0, 5]  # 100 s at 0.45 is dominated by 10 s at 0.5
    assert landscape.pareto_front([1, 2, 3], [0.3, 0.2, 0.1]) == [0]
    with pytest.raises(ValueError, match="finite"):
        landscape.pareto_front([1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="one length"):
        landscape.pareto_front([1, 2], [0.1])


def test_seconds_per_model_is_measured_once_and_cached(tmp_path, smoke, smoke_data):
    cfg = settings.get("smoke", epochs=1)
    first = landscape.seconds_per_model(cfg, smoke_data, n=2, cache=tmp_path)
    assert 0 < first < 60
    assert landscape.seconds_per_model(cfg, smoke_data, n=2, cache=tmp_path) == first  # read back, not re-measured


def test_records_say_which_parameters_produced_them(tmp_path):
    """A re-run with other budgets replaces the record; the record says so (setting, changed fields, budgets)."""
    data = _data()
    cfg = settings.get("smoke")
    landscape.publish(cfg, data, "06", [_method()], cache=tmp_path, params={"budget": {"max_models": 2}})
    got = landscape.published(cfg, data, cache=tmp_path)["06"][0].params
    assert got["setting"] == "smoke" and got["changed"] == {} and got["chapter"] == {"budget": {"max_models": 2}}
    assert got["published"][:2] == "20"  # an ISO time
    more = settings.get("smoke", trak_models=cfg.trak_models + 3)  # not in the recipe: the same record's file
    landscape.publish(more, data, "06", [_method()], cache=tmp_path, params={"budget": {"max_models": 5}})
    got = landscape.published(cfg, data, cache=tmp_path)["06"][0].params
    assert got["changed"] == {"trak_models": cfg.trak_models + 3} and got["chapter"]["budget"]["max_models"] == 5
    row = landscape.describe_params(got)
    assert "max_models" in row["chapter parameters"] and row["changed fields"] == f"trak_models={cfg.trak_models + 3}"
    assert set(landscape.describe_params(None).values()) == {"not recorded"}
    landscape.publish(cfg, data, "06", [_method()], cache=tmp_path)  # no chapter parameters given: said so
    row = landscape.describe_params(landscape.published(cfg, data, cache=tmp_path)["06"][0].params)
    assert row["chapter parameters"] == "none given" and row["changed fields"] == "none"


def test_best_within():
    labels, lds_means, secs = ["a", "b", "c"], [0.1, 0.3, 0.5], [1.0, 10.0, 100.0]
    assert landscape.best_within(labels, lds_means, secs, 10.0) == "b"
    assert landscape.best_within(labels, lds_means, secs, 1000.0) == "c"
    assert landscape.best_within(labels, lds_means, secs, 0.5) is None
    with pytest.raises(ValueError, match="one length"):
        landscape.best_within(labels, lds_means, secs[:2], 1.0)


def _planted_gt(truth, m=60, seed=0):
    """A ground truth whose outputs are the additive predictions of ``truth`` (n, T): scores equal to it have LDS 1."""
    from course_lib import lds

    masks = torch.rand(m, truth.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.5
    outputs = (masks.double() @ truth.double())[:, None, :].float()
    return lds.GroundTruth(masks, outputs, torch.ones(m, 1), torch.arange(truth.shape[1]), {}, 0.0)


def test_tuned_budgets_choose_on_the_tuning_targets_and_family_best_takes_the_best_method(tmp_path):
    """Planted: the candidate "good" equals the ground truth's additive model, "bad" is noise. tuned_budgets chooses
    "good" at every budget (on the tuning targets), reports its LDS on the evaluation targets, returns its scores
    and seconds, and charges the training of the models at the given rate; family_best returns every budget of the
    family's best method; a method nobody published gives []."""
    from course_lib import lds

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(40, 8, generator=g)
    gt = _planted_gt(truth)
    data = _data(40, 8)
    cfg = settings.get("smoke")
    noise = lambda: torch.randn(40, 8, generator=g)
    methods = [landscape.Method("EK-FAC", f"EK-FAC, M = {b}", {"bad": noise(), "good": truth + 0.1 * b * noise()},
                                {"bad": 1.0, "good": 2.0 * b}, b, "reference models", 1.0, "04", budget=b)
               for b in (1, 2)]
    landscape.publish(cfg, data, "04", methods, cache=tmp_path)
    landscape.publish(cfg, data, "03", [landscape.Method("datamodels (LASSO)", "LASSO, 10 models", {"-": noise()},
                                                         {"-": 0.5}, 10, "subset models", 0.5, "03", budget=10)],
                      cache=tmp_path)
    records = landscape.published(cfg, data, cache=tmp_path)
    rows = landscape.tuned_budgets(records, "EK-FAC", gt, per_model=3.0)
    assert [r["budget"] for r in rows] == [1, 2] and all(r["choice"] == "good" for r in rows)
    assert rows[0]["method"] == "EK-FAC, M = 1 (ch. 04)" and rows[0]["candidates"] == 2
    assert rows[1]["seconds"] == 4.0 and rows[1]["with training (s)"] == 4.0 + 2 * 3.0
    assert rows[0]["LDS"].mean == pytest.approx(lds.lds(methods[0].candidates["good"], gt, part="eval").mean)
    assert torch.equal(rows[1]["scores"], methods[1].candidates["good"])
    lasso = landscape.tuned_budgets(records, "datamodels (LASSO)", gt, per_model=3.0)
    assert lasso[0]["with training (s)"] == 0.5 + 10 * 0.5 * 3.0
    assert landscape.tuned_budgets(records, "TRAK", gt, 3.0) == []
    assert [r["method"] for r in landscape.family_best(records, "influence", gt, 3.0)] == [r["method"] for r in rows]
    assert landscape.family_best(records, "influence", gt, 3.0, exclude=("EK-FAC",)) == []
    with pytest.raises(ValueError, match="unknown family"):
        landscape.family_best(records, "influences", gt, 3.0)


def test_bracket_finds_the_budgets_around_a_value():
    from course_lib.lds import Score

    row = lambda mean, cost: {"LDS": Score(mean, (mean - 0.05, mean + 0.05), None), "with training (s)": cost}
    rows = [row(0.1, 10.0), row(0.2, 20.0), row(0.35, 40.0), row(0.3, 80.0)]
    assert landscape.bracket(rows, 0.25) == (rows[1], rows[2])
    assert landscape.bracket(rows, 0.05) == (None, rows[0])
    assert landscape.bracket(rows, 0.5) == (rows[3], None)  # none reaches it: the costliest below
    assert landscape.bracket(rows, 0.32) == (rows[1], rows[2])  # the 80 s row stays below but costs more than reach


def test_cross_dataset_needs_every_choice():
    with pytest.raises(ValueError, match="chosen lacks"):
        landscape.cross_dataset(settings.get("smoke"), {"kNN": 5})


def test_landscape_figure_has_a_panel_per_ground_truth_and_a_legend():
    pd = pytest.importorskip("pandas")
    import matplotlib
    matplotlib.use("Agg")
    from course_lib import plots

    class R:
        def __init__(self, mean):
            self.mean, self.ci = mean, (mean - 0.05, mean + 0.05)

    rows = [("random", None, 0, 0.0, 0.0, 0.0), ("TRAK", 1, 1, 2.0, 5.0, 0.2), ("TRAK", 4, 4, 8.0, 20.0, 0.3),
            ("EK-FAC", 1, 1, 3.0, 6.0, 0.25), ("TRAK", 100, 1, 30.0, 32.0, 0.1)]
    table = pd.DataFrame([{"key": k, "method": f"{k}, every step" if b == 100 else f"{k}, {b}",
                           "family": landscape.COURSE_METHODS[k][0], "budget": b, "models": m,
                           "attributes": "none" if m == 0 else "reference models", "attribution s": a,
                           "total s": t, "seed-averaged": R(v), "fixed": R(v - 0.05)} for k, b, m, a, t, v in rows])
    fig = plots.landscape(table, ["seed-averaged", "fixed"], ceiling=R(0.7), title="t", alone=["TRAK, every step"])
    axes = fig.axes
    assert len(axes) == 3 and axes[0].get_xscale() == "log"
    labels = [t.get_text() for t in axes[2].get_legend().get_texts()]
    assert {"random", "TRAK (1-4)", "EK-FAC"} <= set(labels) and "surrogate:" in labels  # budgets: a range
    # the lone point is not part of TRAK's curve (its range stays 1-4) and is named beside it, in both panels
    assert sum(t.get_text() == "every step" for ax in axes[:2] for t in ax.texts) == 2
    assert axes[0].get_ylim()[1] > 0.75  # the ceiling's interval is inside the axes
    matplotlib.pyplot.close(fig)


def test_landscape_colours_tell_methods_apart():
    """Every method has a colour and no two methods share one (within a family they share a marker; across families
    two near-identical colours were hard to tell apart)."""
    from course_lib import plots

    assert set(plots.LANDSCAPE_COLOURS) == set(landscape.COURSE_METHODS)
    for fam in landscape.FAMILIES:
        colours = [plots.LANDSCAPE_COLOURS[k] for k, v in landscape.COURSE_METHODS.items() if v[0] == fam]
        assert len(set(colours)) == len(colours), fam
    colours = [c.lower() for c in plots.LANDSCAPE_COLOURS.values()]
    assert len(set(colours)) == len(colours)


def test_dodge_moves_a_method_only_where_it_would_hide_another():
    """Two datamodels at the same cost and LDS (chapter 07's ridge and difference of means) are drawn apart; a method
    with room of its own stays where it is."""
    pd = pytest.importorskip("pandas")
    import math

    from course_lib import plots

    class R:
        def __init__(self, mean):
            self.mean = mean

    table = pd.DataFrame([{"key": k, "total s": t, "seed-averaged": R(v)} for k, t, v in
                          (("datamodels (ridge)", 1770.0, 0.167), ("datamodels (difference of means)", 1768.0, 0.165),
                           ("random", 0.0, 0.0), ("TRAK", 1768.0, 0.4))])
    nudge = plots._dodge(table, list(table["key"]), "seed-averaged", floor=0.01)
    assert nudge["datamodels (ridge)"] == nudge["random"] == nudge["TRAK"] == 1.0
    assert abs(math.log10(nudge["datamodels (difference of means)"])) >= 0.07


def test_cross_dataset_rate_intervals_bootstrap_the_targets():
    """Planted: 6 training images (3 per source), 4 targets; a method that ranks its own source first scores 1 with
    no spread; one that is right for half the targets scores 0.5 with an interval that covers it."""
    from types import SimpleNamespace

    src_train, src_targets = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])
    right = (src_train[:, None] == src_targets[None, :]).float()
    half = right.clone()
    half[:, 2:] = 1 - half[:, 2:]  # targets 2 and 3 rank the other source first
    union = SimpleNamespace(source_train=src_train, source_targets=src_targets)
    cross = landscape.CrossDataset(union, {"right": right, "half": half}, [1.0, 1.0], 0.0, 0.5, torch.ones(6))
    got = cross.rate_intervals(ks=(1, 3), n_boot=500)
    for k in (1, 3):
        assert got["right"][k].mean == pytest.approx(1.0) and got["right"][k].ci == pytest.approx((1.0, 1.0))
        assert got["half"][k].mean == pytest.approx(cross.rates(ks=(k,))["half"][k]) == pytest.approx(0.5)
        lo, hi = got["half"][k].ci
        assert lo < 0.5 < hi and 0.0 <= lo and hi <= 1.0
