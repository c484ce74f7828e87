"""course_lib.exercises.check: right, not yet, unset, non-finite, tolerance edges, strings, sequences, predicates,
strict mode. Each test names the message or verdict it expects, so a changed rule fails it."""
import doctest
import math

import numpy as np
import pytest
import torch

from course_lib import exercises
from course_lib.exercises import STRICT_ENV, ExerciseError, Verdict, check


@pytest.fixture(autouse=True)
def _lenient(monkeypatch):
    """The tests below choose strict mode explicitly; tests/conftest.py turns it on for the chapters."""
    monkeypatch.delenv(STRICT_ENV, raising=False)


def run(capsys, *args, **kwargs):
    kwargs.setdefault("hint", "HINT")
    verdict = check(*args, **kwargs)
    return verdict, capsys.readouterr().out.strip()


def test_right_prints_explanation_and_is_true(capsys):
    v, out = run(capsys, "2", 0.26, 0.25, tol=0.02, explain="the mean of the four values")
    assert out == "Exercise 2: right — the mean of the four values"
    assert v and v.ok and v.status == "right" and isinstance(v, Verdict)
    _, out = run(capsys, 3, 1.0, 1.0)
    assert out == "Exercise 3: right"


def test_wrong_prints_hint_and_is_false(capsys):
    v, out = run(capsys, "2", 0.4, 0.25, tol=0.02, hint="write it with p_i")
    assert out == "Exercise 2: not yet — write it with p_i"
    assert not v and v.status == "not yet"
    assert "0.25" not in out, "the message must not give the answer away"


@pytest.mark.parametrize("unset", [None, ...])
def test_unset_answer_asks_to_set_it(capsys, unset):
    v, out = run(capsys, "2", unset, 0.25, tol=0.02)
    assert out == "Exercise 2: set answer_2 and rerun this cell"
    assert not v and v.status == "unset"


def test_unset_names_the_variable_and_never_raises(capsys):
    _, out = run(capsys, "4b", None, 1.0, strict=True)
    assert out == "Exercise 4b: set answer_4b and rerun this cell"
    _, out = run(capsys, "1", None, predicate=lambda a: a > 0, var="my_rate", strict=True)
    assert out == "Exercise 1: set my_rate and rerun this cell"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, np.float32("nan"), torch.tensor(math.inf)])
def test_non_finite_answer_is_not_yet(capsys, bad):
    v, out = run(capsys, "1", bad, 0.5, tol=10.0, hint="compute rel(...)")
    assert not v and v.status == "not yet"
    assert out.startswith("Exercise 1: not yet — your answer is not finite (")
    assert out.endswith("; compute rel(...)")


def test_non_finite_answer_with_predicate_never_calls_it(capsys):
    called = []
    v, out = run(capsys, "1", math.nan, predicate=lambda a: called.append(a) or True)
    assert not v and "not finite" in out and not called


def test_non_finite_reference_cannot_be_checked_and_does_not_raise(capsys):
    v, out = run(capsys, "5", 1000.0, math.inf, rel=0.1, strict=True)
    assert not v and v.status == "unchecked"
    assert out == "Exercise 5: cannot be checked in this run, the reference value is not finite (inf)"
    v, _ = run(capsys, "5", [1.0, 2.0], [1.0, math.nan])
    assert v.status == "unchecked"


@pytest.mark.parametrize("answer, ok", [(1.5, True), (0.5, True), (1.0, True),
                                        (math.nextafter(1.5, 2), False), (0.5 - 1e-12, False)])
def test_absolute_tolerance_is_inclusive(capsys, answer, ok):
    assert bool(run(capsys, "1", answer, 1.0, tol=0.5)[0]) is ok


@pytest.mark.parametrize("answer, ok", [(5.0, True), (3.0, True), (math.nextafter(5.0, 6), False),
                                        (math.nextafter(3.0, 0), False)])
def test_relative_tolerance_is_inclusive(capsys, answer, ok):
    assert bool(run(capsys, "1", answer, 4.0, rel=0.25)[0]) is ok


def test_tol_and_rel_together_take_the_larger_bound(capsys):
    assert run(capsys, "1", 4.9, 4.0, tol=1.0, rel=0.01)[0]  # tol wins
    assert run(capsys, "1", 4.9, 4.0, tol=0.01, rel=0.25)[0]  # rel wins
    assert not run(capsys, "1", 5.1, 4.0, tol=1.0, rel=0.25)[0]


def test_float_default_tolerance_is_tight(capsys):
    assert run(capsys, "1", 0.1 + 0.2, 0.3)[0]
    assert not run(capsys, "1", 0.3001, 0.3)[0]


def test_ints_exactly_unless_a_tolerance_is_given(capsys):
    assert run(capsys, "1", 3, 3)[0]
    assert run(capsys, "1", 3.0, 3)[0]
    assert not run(capsys, "1", 4, 3)[0]
    assert not run(capsys, "1", 3.001, 3)[0]
    assert run(capsys, "1", 4, 3, tol=1)[0]
    assert run(capsys, "1", np.int64(3), 3)[0]


def test_bools_exactly_and_only_bools(capsys):
    assert run(capsys, "1", True, True)[0]
    assert not run(capsys, "1", False, True)[0]
    v, out = run(capsys, "1", 1, True)
    assert not v and out == "Exercise 1: not yet — expected True or False, got 1; HINT"
    v, out = run(capsys, "1", True, 1)
    assert not v and "expected a number" in out


def test_strings_case_insensitive_after_strip(capsys):
    assert run(capsys, "3", " Denser\n", "denser")[0]
    assert run(capsys, "3", "DENSER", "denser")[0]
    assert not run(capsys, "3", "sparser", "denser")[0]
    assert not run(capsys, "3", "dense", "denser")[0]
    v, out = run(capsys, "3", 2, "denser")
    assert not v and out == "Exercise 3: not yet — expected a string, got 2; HINT"


def test_wrong_type_for_a_number(capsys):
    v, out = run(capsys, "2", "0.25", 0.25, tol=0.1)
    assert not v and out == "Exercise 2: not yet — expected a number, got '0.25'; HINT"


def test_sequences_elementwise(capsys):
    assert run(capsys, "4", ("Relative ", 1.05e-5), ("relative", 1e-5), rel=0.1)[0]
    assert run(capsys, "4", ["relative", 1e-5], ("relative", 1e-5))[0]  # a list counts for a tuple
    v, out = run(capsys, "4", ("absolute", 1e-5), ("relative", 1e-5))
    assert not v and out == "Exercise 4: not yet — wrong value (value 1 of 2); HINT"
    v, out = run(capsys, "4", ("relative", 2e-5), ("relative", 1e-5), rel=0.1)
    assert not v and "value 2 of 2" in out
    v, out = run(capsys, "4", ("relative",), ("relative", 1e-5))
    assert not v and "expected 2 values, got 1" in out
    v, out = run(capsys, "4", ("relative", math.nan), ("relative", 1e-5))
    assert not v and "not finite" in out


def test_arrays_and_tensors(capsys):
    assert run(capsys, "1", np.array([1.0, 2.0]), [1.0, 2.0])[0]
    assert run(capsys, "1", torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]), tol=1e-6)[0]
    assert not run(capsys, "1", torch.tensor([1.0, 2.5]), [1.0, 2.0], tol=0.1)[0]
    assert run(capsys, "1", np.float32(0.25), 0.25, tol=1e-6)[0]
    assert run(capsys, "1", torch.tensor(0.25), 0.25, tol=1e-6)[0]


def test_dicts_by_key(capsys):
    assert run(capsys, "2", {"head": 0.5, "conv": 0.1}, {"conv": 0.1, "head": 0.5})[0]
    v, out = run(capsys, "2", {"head": 0.5}, {"conv": 0.1, "head": 0.5})
    assert not v and "keys" in out
    assert not run(capsys, "2", {"head": 0.6, "conv": 0.1}, {"conv": 0.1, "head": 0.5}, tol=0.05)[0]


def test_predicate_for_a_range(capsys):
    in_range = lambda a: 0.05 <= a <= 0.2  # noqa: E731
    v, out = run(capsys, "3", 0.12, predicate=in_range, explain="between the ceilings")
    assert v and out == "Exercise 3: right — between the ceilings"
    v, out = run(capsys, "3", 0.3, predicate=in_range, hint="between the two noise ceilings")
    assert not v and out == "Exercise 3: not yet — between the two noise ceilings"


def test_predicate_that_raises_is_not_yet(capsys):
    v, out = run(capsys, "3", "abc", predicate=lambda a: 0 <= a <= 1)
    assert not v and out.startswith("Exercise 3: not yet — the check could not use your answer (TypeError")
    assert out.endswith("; HINT")


def test_bad_calls_raise():
    with pytest.raises(TypeError):
        check("1", 1.0, hint="h")  # neither expected nor predicate
    with pytest.raises(TypeError):
        check("1", 1.0, 1.0, predicate=bool, hint="h")  # both
    with pytest.raises(TypeError):
        check("1", 1.0, predicate=bool, tol=0.1, hint="h")
    with pytest.raises(ValueError):
        check("1", 1.0, 1.0, tol=-0.1, hint="h")
    with pytest.raises(TypeError):
        check("1", 1.0, 1.0)  # the hint is required


def test_strict_mode_raises_on_a_set_wrong_answer(capsys, monkeypatch):
    with pytest.raises(ExerciseError, match="Exercise 2: not yet — HINT"):
        check("2", 0.4, 0.25, tol=0.02, hint="HINT", strict=True)
    assert isinstance(ExerciseError("x"), AssertionError)
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(ExerciseError):
        check("2", 0.4, 0.25, tol=0.02, hint="HINT")
    assert check("2", 0.25, 0.25, tol=0.02, hint="HINT")  # right answers pass under strict mode
    assert not check("2", 0.4, 0.25, tol=0.02, hint="HINT", strict=False)  # the keyword wins over the variable
    monkeypatch.setenv(STRICT_ENV, "0")
    assert not check("2", 0.4, 0.25, tol=0.02, hint="HINT")


def test_quiet_and_verdict_display(capsys):
    v = check("1", 2.0, 1.0, hint="HINT", quiet=True)
    assert capsys.readouterr().out == ""
    assert v.message == "Exercise 1: not yet — HINT" and repr(v) == v.message
    assert v._ipython_display_() is None  # a cell ending in check(...) shows only the printed line


def test_docstring_examples():
    result = doctest.testmod(exercises, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0
