"""Write student copies of the instructor chapters: solutions removed, everything else kept, still runnable.

Usage: python tools/make_student.py IN_DIR OUT_DIR   (``make student`` writes student/ from notebooks/)

The convention (nbgrader's markers, so the instructor notebooks stay usable with nbgrader):

* In a **code cell**, a solution sits between a line ``### BEGIN SOLUTION`` and a line ``### END SOLUTION``, and
  it assigns the exercise's answer variables (``answer_2 = ...``). The student copy replaces the block, markers
  included, by one ``NAME = None`` line for each name the block binds in the cell's scope, followed by
  ``# YOUR CODE HERE``, at the indentation of the ``### BEGIN SOLUTION`` line. The names are found with ``ast``:
  targets of assignments (``=``, ``+=``, annotated, and tuple unpacking) that are plain names, and ``def``/``class``
  names, at the block's top level or inside its ``if``/``for``/``while``/``with``/``try`` statements (not inside
  functions or comprehensions; loop variables and imports are not stubbed). The check after the block, e.g.
  ``course_lib.exercises.check("2", answer_2, ...)``, then sees ``None`` and prints "Exercise 2: set answer_2 and
  rerun this cell", so a student copy runs top to bottom under papermill/nbval. Consequently, the block should bind
  only the answer and the helpers it needs: a name that later cells use and that the block re-binds would be
  ``None`` in the student copy, so compute what the check needs outside the markers.
* In a **markdown** (or raw) cell, the lines between the markers, markers included, are replaced by
  ``YOUR ANSWER HERE`` (nbgrader's text stub).
* Outputs and execution counts are cleared; cell ids and metadata (tags such as ``parameters``) are kept (a cell
  without an id gets one derived from the file name and its position, so that copies are reproducible); every
  notebook is validated by nbformat before it is written. Cells without markers are copied verbatim.
* A marker line must be exactly ``### BEGIN SOLUTION`` / ``### END SOLUTION`` (leading white space allowed); any
  other line mentioning BEGIN SOLUTION or END SOLUTION, a nested or unclosed block, an END without a BEGIN, or a
  code block that does not parse on its own is an error (a solution must never leak into a student copy by a typo).

Why not nbgrader itself: ``nbgrader==0.9.6`` does install next to the pinned Jupyter stack, but it brings about
80 MB more (SQLAlchemy, alembic, notebook 7, rapidfuzz, nbgrader's own 20 MB), and its ``ClearSolutions``
preprocessor writes one fixed ``code_stub`` per language for every block (by default ``raise
NotImplementedError()``, which stops a top-to-bottom run at the first exercise). The stub here depends on the block
(it assigns that block's names to None), which ``ClearSolutions`` cannot express and whose removed lines it
discards, so this small nbformat transform (nbformat is already a dependency) is the only implementation.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4.rwbase import rejoin_lines

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CODE_STUB = "# YOUR CODE HERE"
TEXT_STUB = "YOUR ANSWER HERE"
_MENTION = re.compile(r"(BEGIN|END)\s+SOLUTION", re.IGNORECASE)


class SolutionMarkerError(ValueError):
    """Malformed solution markers, or a code solution that does not parse on its own."""


def _bind_targets(target: ast.expr, out: list[str]):
    if isinstance(target, ast.Name):
        out.append(target.id)
    elif isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            _bind_targets(elt, out)
    elif isinstance(target, ast.Starred):
        _bind_targets(target.value, out)
    # attributes and subscripts mutate an existing object: nothing to stub


def _bound(stmts: list[ast.stmt], out: list[str]):
    for s in stmts:
        if isinstance(s, ast.Assign):
            for t in s.targets:
                _bind_targets(t, out)
        elif isinstance(s, ast.AugAssign):
            _bind_targets(s.target, out)
        elif isinstance(s, ast.AnnAssign):
            if s.value is not None:
                _bind_targets(s.target, out)
        elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(s.name)
        else:  # compound statements: their bodies run in the cell's scope
            for field in ("body", "orelse", "finalbody"):
                _bound(getattr(s, field, []) or [], out)
            for h in getattr(s, "handlers", []) or []:
                _bound(h.body, out)
            for c in getattr(s, "cases", []) or []:
                _bound(c.body, out)


def _as_python(code: str) -> str:
    """IPython magics and shell escapes as `pass`, so that ast can parse a notebook cell."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in code.split("\n"))


def bound_names(code: str) -> list[str]:
    """The names a solution block binds in the cell's scope, in order of first binding, each once.

    >>> bound_names("q = 3\\nanswer_1, answer_2 = q, 2 * q\\nif q:\\n    answer_3 = 1\\nanswer_1 += 1")
    ['q', 'answer_1', 'answer_2', 'answer_3']
    """
    names: list[str] = []
    _bound(ast.parse(_as_python(textwrap.dedent(code))).body, names)
    return list(dict.fromkeys(names))


def _regions(lines: list[str], where: str) -> list[tuple[int, int]]:
    """(begin, end) line indices of the marker lines of each solution block."""
    regions, begin = [], None
    for i, line in enumerate(lines):
        s = line.strip()
        if s == BEGIN:
            if begin is not None:
                raise SolutionMarkerError(f"{where}: nested {BEGIN} (line {i + 1})")
            begin = i
        elif s == END:
            if begin is None:
                raise SolutionMarkerError(f"{where}: {END} without {BEGIN} (line {i + 1})")
            regions.append((begin, i))
            begin = None
        elif _MENTION.search(line):
            raise SolutionMarkerError(f"{where}: line {i + 1} mentions a solution marker but is not exactly "
                                      f"{BEGIN!r} or {END!r}: {line.strip()!r}")
    if begin is not None:
        raise SolutionMarkerError(f"{where}: {BEGIN} (line {begin + 1}) is never closed by {END}")
    return regions


def clear_code(source: str, where: str = "cell") -> tuple[str, list[list[str]]]:
    """A code cell's source with each solution block replaced by its stub; also the stubbed names per block.

    >>> print(clear_code("x = 1\\n### BEGIN SOLUTION\\nanswer_1 = x + 1\\n### END SOLUTION\\ncheck(answer_1)")[0])
    x = 1
    answer_1 = None
    # YOUR CODE HERE
    check(answer_1)
    """
    lines = source.split("\n")
    regions = _regions(lines, where)
    if not regions:
        return source, []
    out, stubbed, last = [], [], 0
    for b, e in regions:
        out += lines[last:b]
        indent = re.match(r"\s*", lines[b]).group(0)
        block = "\n".join(lines[b + 1:e])
        try:
            names = bound_names(block)
        except SyntaxError as err:
            raise SolutionMarkerError(f"{where}: the solution block at line {b + 1} does not parse on its own "
                                      f"({err.msg}, its line {err.lineno})") from None
        out += [f"{indent}{n} = None" for n in names]
        out.append(f"{indent}{CODE_STUB}" if names or not indent else f"{indent}pass  {CODE_STUB}")
        stubbed.append(names)
        last = e + 1
    out += lines[last:]
    result = "\n".join(out)
    try:
        ast.parse(_as_python(source))
    except SyntaxError:
        return result, stubbed  # the instructor cell itself is not plain Python: nothing to compare with
    try:
        ast.parse(_as_python(result))
    except SyntaxError as err:
        raise SolutionMarkerError(f"{where}: the student copy of this cell does not parse ({err.msg}); put the "
                                  f"markers around whole statements") from None
    return result, stubbed


def clear_text(source: str, where: str = "cell") -> tuple[str, int]:
    """A markdown cell's source with each solution block replaced by ``YOUR ANSWER HERE``; also the number of
    blocks."""
    lines = source.split("\n")
    regions = _regions(lines, where)
    out, last = [], 0
    for b, e in regions:
        out += lines[last:b]
        out.append(re.match(r"\s*", lines[b]).group(0) + TEXT_STUB)
        last = e + 1
    out += lines[last:]
    return "\n".join(out), len(regions)


def student_notebook(nb: nbformat.NotebookNode, name: str = "notebook") -> tuple[nbformat.NotebookNode, dict]:
    """The student copy of an instructor notebook (the input is not modified), validated; and a report:
    ``{"code": [names stubbed per block], "text": number of markdown blocks}``."""
    nb = copy.deepcopy(nb)
    report = {"code": [], "text": 0}
    for i, cell in enumerate(nb.cells):
        where = f"{name} cell {i}"
        if "id" not in cell and (nb.nbformat, nb.nbformat_minor) >= (4, 5):  # deterministic, unlike nbformat's
            cell.id = hashlib.sha1(f"{name}:{i}".encode()).hexdigest()[:8]
        if cell.cell_type == "code":
            cell.source, stubbed = clear_code(cell.source, where)
            report["code"] += stubbed
            cell.outputs = []
            cell.execution_count = None
        else:
            cell.source, n = clear_text(cell.source, where)
            report["text"] += n
    nbformat.validate(nb)
    return nb, report


def read_notebook(path: str | Path) -> nbformat.NotebookNode:
    """A notebook as stored (nbformat.read would give cells without an id random ones)."""
    nb = nbformat.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    if nb.nbformat != 4:
        return nbformat.convert(nb, 4)
    return rejoin_lines(nb)  # sources stored as lists of lines, as one string


def make_student(in_dir: str | Path, out_dir: str | Path, quiet: bool = False) -> dict[str, dict]:
    """Write the student copy of every ``*.ipynb`` in ``in_dir`` to ``out_dir``; returns the reports by file name."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise SystemExit(f"{in_dir} is not a folder")
    if out_dir.resolve() == in_dir.resolve():
        raise SystemExit("OUT_DIR must differ from IN_DIR: the student copies would overwrite the solutions")
    notebooks = sorted(in_dir.glob("*.ipynb"))
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for path in notebooks:
        nb, report = student_notebook(read_notebook(path), path.name)
        nbformat.write(nb, out_dir / path.name)
        reports[path.name] = report
        if not quiet:
            names = ", ".join(n for block in report["code"] for n in block) or "-"
            print(f"{path.name}: {len(report['code'])} code solution(s) removed (stubbed: {names}), "
                  f"{report['text']} text solution(s) removed -> {out_dir / path.name}")
    return reports


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        make_student(*argv)
    except SolutionMarkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
