"""Automatic checks for the chapters' exercises: one call in an exercise's cell says right or not yet, with a hint.

A chapter passes the student's answer and the reference value to :func:`check`; the reference is computed from the
chapter's own run (in ``course_lib.references``, so that it holds in every setting and shows no solution)::

    >>> bool(check("2", 0.26, 0.25, tol=0.02, hint="add the four values and divide by four",
    ...       explain="the mean of the four values"))
    Exercise 2: right — the mean of the four values
    True
    >>> bool(check("2", 0.4, 0.25, tol=0.02, hint="add the four values and divide by four"))
    Exercise 2: not yet — add the four values and divide by four
    False

An answer that is still unset (``None`` or ``...``) is not an error, so that a student copy, whose solutions
``tools/make_student.py`` replaced by ``answer_N = None``, runs top to bottom::

    >>> bool(check("2", None, 0.25, tol=0.02, hint="..."))
    Exercise 2: set answer_2 and rerun this cell
    False

How answers are compared with the reference (``expected``):

* a float: ``|answer - expected| <= max(tol, rel * |expected|)`` (each of ``tol``, ``rel`` defaults to 0; with
  neither given, ``rel=1e-6``); the bound is inclusive. An answer that is NaN or infinite is "not yet", with a
  message that says it is not finite;
* an int: exactly (``3.0`` counts for ``3``), unless ``tol`` or ``rel`` is given;
* a bool: exactly, and only a bool counts (not ``1``);
* a string: case-insensitively after stripping white space (``" Denser"`` counts for ``"denser"``);
* a list or tuple (and arrays or tensors, through ``.tolist()``): the same length, element by element with the
  same rules and tolerances (so ``("absolute", 1e-5)`` mixes a string and a number); a dict: the same keys, value
  by value;
* anything else: ``==``.

Exercises whose answer is a range, or a property rather than one value, pass a ``predicate`` instead of
``expected``::

    >>> bool(check("3", 0.12, predicate=lambda a: 0.05 <= a <= 0.2, hint="between the two noise ceilings"))
    Exercise 3: right
    True

A reference value that is not finite (a fit that diverged in a tiny setting) cannot be checked: the call says so
and returns a false verdict, without raising.

With the environment variable ``COURSE_EXERCISES_STRICT=1`` (set by ``tests/conftest.py``, so in the smoke runs of
the instructor chapters) an answer that is set but wrong raises :class:`ExerciseError` instead of printing, so
that a solution that no longer matches its check fails the tests; unset answers never raise.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check", "Verdict", "ExerciseError", "STRICT_ENV"]

STRICT_ENV = "COURSE_EXERCISES_STRICT"
_MISSING = object()


class ExerciseError(AssertionError):
    """A set but wrong answer under strict mode (``strict=True`` or ``COURSE_EXERCISES_STRICT=1``)."""


class Verdict:
    """What :func:`check` returns: true only for a right answer.

    ``status`` is ``"right"``, ``"not yet"``, ``"unset"`` or ``"unchecked"`` (the reference value was not finite);
    ``message`` is the line that was printed. It behaves as a bool (``if check(...)``, ``assert check(...)``);
    it is not displayed as a cell's result, since its message has been printed already.

    >>> v = check("1", "Denser ", "denser", hint="look at rows", quiet=True)
    >>> bool(v), v.status
    (True, 'right')
    """

    __slots__ = ("status", "message")

    def __init__(self, status: str, message: str):
        self.status = status
        self.message = message

    @property
    def ok(self) -> bool:
        return self.status == "right"

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.message

    def _ipython_display_(self):  # the message was printed by check(); show nothing as the cell's result
        pass


def _plain(x):
    """numpy scalars and arrays, torch tensors (anything with .tolist(), but not strings) as Python objects."""
    if not isinstance(x, (str, bytes)) and callable(getattr(x, "tolist", None)):
        try:
            return x.tolist()
        except Exception:  # noqa: BLE001 - an object whose tolist needs arguments: compare it as it is
            return x
    return x


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _non_finite(x) -> bool:
    """Whether x (a number, or a list/tuple/dict of them) holds a NaN or an infinity."""
    x = _plain(x)
    if _is_number(x):
        return not math.isfinite(x)
    if isinstance(x, (list, tuple)):
        return any(_non_finite(v) for v in x)
    if isinstance(x, Mapping):
        return any(_non_finite(v) for v in x.values())
    return False


def _kind(x) -> str:
    return "a number" if _is_number(x) else "a string" if isinstance(x, str) else "True or False" if \
        isinstance(x, bool) else "a list or tuple" if isinstance(x, (list, tuple)) else type(x).__name__


def _compare(answer, expected, tol: float | None, rel: float | None, where: str = "") -> tuple[bool, str]:
    """(right, reason): reason says what is structurally wrong (type, length, not finite, which element);
    it is empty for a plain wrong value, so that the message does not give the answer away."""
    answer, expected = _plain(answer), _plain(expected)
    at = f" ({where})" if where else ""
    if isinstance(expected, bool):
        if not isinstance(answer, bool):
            return False, f"expected True or False{at}, got {answer!r}"
        return answer == expected, ""
    if isinstance(expected, str):
        if not isinstance(answer, str):
            return False, f"expected a string{at}, got {answer!r}"
        return answer.strip().casefold() == expected.strip().casefold(), (f"wrong value{at}" if where else "")
    if _is_number(expected):
        if not _is_number(answer):
            return False, f"expected a number{at}, got {answer!r}"
        if not math.isfinite(answer):
            return False, f"your answer{at} is not finite ({answer})"
        if isinstance(expected, numbers.Integral) and tol is None and rel is None:
            return answer == expected, (f"wrong value{at}" if where else "")
        if tol is None and rel is None:
            rel = 1e-6
        bound = max(tol or 0.0, (rel or 0.0) * abs(expected))
        return abs(answer - expected) <= bound, (f"wrong value{at}" if where else "")
    if isinstance(expected, (list, tuple)):
        if not isinstance(answer, (list, tuple)):
            return False, f"expected {len(expected)} values{at}, got {answer!r}"
        if len(answer) != len(expected):
            return False, f"expected {len(expected)} values{at}, got {len(answer)}"
        for i, (a, e) in enumerate(zip(answer, expected)):
            ok, reason = _compare(a, e, tol, rel, (f"{where}, " if where else "") + f"value {i + 1} of {len(expected)}")
            if not ok:
                return False, reason
        return True, ""
    if isinstance(expected, Mapping):
        if not isinstance(answer, Mapping):
            return False, f"expected a dict{at}, got {_kind(answer)}"
        if set(answer) != set(expected):
            return False, f"expected the keys {sorted(map(str, expected))}{at}, got {sorted(map(str, answer))}"
        for k in expected:
            ok, reason = _compare(answer[k], expected[k], tol, rel, (f"{where}, " if where else "") + f"key {k!r}")
            if not ok:
                return False, reason
        return True, ""
    try:
        return bool(answer == expected), ""
    except Exception as e:  # noqa: BLE001 - e.g. comparing arrays of different shapes
        return False, f"cannot compare your answer with the reference ({type(e).__name__}: {e})"


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def check(name: str | int, answer: Any, expected: Any = _MISSING, *, hint: str, tol: float | None = None,
          rel: float | None = None, explain: str = "", predicate: Callable[[Any], Any] | None = None,
          var: str | None = None, strict: bool | None = None, quiet: bool = False) -> Verdict:
    """Check an exercise's answer against ``expected`` (or with ``predicate``), print one line, return a
    :class:`Verdict` (true only for a right answer).

    name: the exercise's label, ``"2"`` or ``2`` (printed as "Exercise 2").
    answer: the student's answer; ``None`` or ``...`` means unset.
    expected: the reference value (see the module docstring for how answers are compared). Give either
        ``expected`` or ``predicate``, not both.
    hint: printed when the answer is not yet right.
    tol, rel: absolute and relative tolerance for numbers (inclusive; the bound is the larger of the two).
    explain: printed after "right —", e.g. the measured value and what it means.
    predicate: a function of the answer, true when it is right (a range, a property). It is not called for an
        unset or non-finite answer; if it raises, the answer is "not yet" and the message names the error.
    var: the variable the student sets, named in the "set ... and rerun" message; default ``answer_<name>``.
    strict: raise :class:`ExerciseError` for a set but wrong answer; default: the environment variable
        ``COURSE_EXERCISES_STRICT``.
    quiet: do not print (the message is still in the verdict).

    >>> bool(check(5, 1100.0, 1000.0, rel=0.1, hint="solve a + b log m = 0.9 x ceiling for m",
    ...       explain="about 1,000 models"))
    Exercise 5: right — about 1,000 models
    True
    >>> bool(check("4", ("Relative", 1e-5), ("relative", 1e-5), hint="read the sweep table again"))
    Exercise 4: right
    True
    >>> bool(check("4", ("absolute", 1e-5), ("relative", 1e-5), hint="read the sweep table again"))
    Exercise 4: not yet — wrong value (value 1 of 2); read the sweep table again
    False
    >>> bool(check("1", float("nan"), 0.5, tol=0.05, hint="compute rel(scores[js], fd)"))
    Exercise 1: not yet — your answer is not finite (nan); compute rel(scores[js], fd)
    False
    """
    if (expected is _MISSING) == (predicate is None):
        raise TypeError("check() needs either expected or predicate=, not both and not neither")
    if predicate is not None and (tol is not None or rel is not None):
        raise TypeError("tol and rel apply to expected, not to predicate=")
    for t, what in ((tol, "tol"), (rel, "rel")):
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise ValueError(f"{what} must be a finite number >= 0, got {t!r}")
    label = f"Exercise {name}"
    var = var or "answer_" + re.sub(r"\W+", "_", str(name)).strip("_")

    if answer is None or answer is Ellipsis:
        status, message = "unset", f"{label}: set {var} and rerun this cell"
    elif predicate is None and _non_finite(expected):
        status = "unchecked"
        message = f"{label}: cannot be checked in this run, the reference value is not finite ({expected!r})"
    else:
        if predicate is not None:
            plain = _plain(answer)
            if _is_number(plain) and not math.isfinite(plain):
                ok, reason = False, f"your answer is not finite ({plain})"
            else:
                try:
                    ok, reason = bool(predicate(answer)), ""
                except Exception as e:  # noqa: BLE001 - a wrong type of answer is the student's, not ours
                    ok, reason = False, f"the check could not use your answer ({type(e).__name__}: {e})"
        else:
            ok, reason = _compare(answer, expected, tol, rel)
        if ok:
            status, message = "right", f"{label}: right" + (f" — {explain}" if explain else "")
        else:
            status, message = "not yet", f"{label}: not yet — " + (f"{reason}; {hint}" if reason else hint)
            if _strict(strict):
                raise ExerciseError(f"{message} (your answer: {answer!r})")
    if not quiet:
        print(message)
    return Verdict(status, message)
