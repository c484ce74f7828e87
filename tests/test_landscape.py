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
