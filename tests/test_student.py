"""tools/make_student.py: student copies lose every solution line, keep everything else, validate, and still run
top to bottom (the checks ask for the answers); the instructor copy's checks say right. Also over the real
chapters in notebooks/."""
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_student", ROOT / "tools" / "make_student.py")
ms = importlib.util.module_from_spec(_spec)
sys.modules["make_student"] = ms
_spec.loader.exec_module(ms)

STUB = re.compile(r"^(\w+ = None|# YOUR CODE HERE|pass  # YOUR CODE HERE|YOUR ANSWER HERE)$")
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))

SETUP = "base = 21\nfrom course_lib.exercises import check"
EXERCISE = """# Exercise 1 and 2: answer_1 is half of base, answer_2 says whether base is "odd" or "even"
### BEGIN SOLUTION
half_of_base = base / 2
answer_1 = half_of_base
answer_2 = "odd" if base % 2 else "even"
### END SOLUTION"""
CHECK = """check("1", answer_1, base / 2, tol=1e-9, hint="divide base by two", explain=f"{base / 2}")
check("2", answer_2, "odd" if base % 2 else "even", hint="look at base % 2")"""
# an exercise whose check sits in the same cell, below an indented solution block
SAME_CELL = """if True:
    ### BEGIN SOLUTION
    for k in range(3):
        answer_3 = k * base
    ### END SOLUTION
check("3", answer_3, 2 * base, hint="the loop's last value")"""
TEXT = """**Question.** Why is the answer odd?

### BEGIN SOLUTION
Because twenty-one leaves a remainder when halved.
### END SOLUTION

Then go on."""


def split(source: str) -> tuple[list[str], list[str]]:
    """(lines strictly between the markers, lines outside them), stripped and non-empty; found independently of
    the module under test."""
    inside, outside, within = [], [], False
    for line in source.split("\n"):
        if line.strip() == "### BEGIN SOLUTION":
            within = True
        elif line.strip() == "### END SOLUTION":
            within = False
        elif line.strip():
            (inside if within else outside).append(line.strip())
    return inside, outside


def solution_lines(source: str) -> list[str]:
    return split(source)[0]


def all_text(nb) -> str:
    return "\n".join(c.source for c in nb.cells)


@pytest.fixture
def instructor(tmp_path):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [new_markdown_cell("# A chapter"),
                new_code_cell(SETUP, metadata={"tags": ["parameters"]}),
                new_code_cell(EXERCISE, execution_count=3, outputs=[new_output("stream", text="stale output\n")]),
                new_code_cell(CHECK),
                new_code_cell(SAME_CELL),
                new_markdown_cell(TEXT)]
    path = tmp_path / "instructor" / "01_chapter.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    return path


@pytest.fixture
def student(instructor, tmp_path):
    reports = ms.make_student(instructor.parent, tmp_path / "student", quiet=True)
    assert list(reports) == [instructor.name]
    return tmp_path / "student" / instructor.name


def test_student_copy_has_no_solution_line(instructor, student):
    ins, stu = nbformat.read(instructor, as_version=4), nbformat.read(student, as_version=4)
    removed = [line for c in ins.cells for line in solution_lines(c.source)]
    assert len(removed) == 6  # the fixture's own solution lines: the test looks for something
    text = all_text(stu)
    leaked = [line for line in removed if line in text]
    assert not leaked, f"solution lines in the student copy: {leaked}"
    assert "SOLUTION" not in text


def test_student_copy_keeps_checks_and_everything_outside_the_markers(instructor, student):
    ins, stu = nbformat.read(instructor, as_version=4), nbformat.read(student, as_version=4)
    assert len(stu.cells) == len(ins.cells)
    assert [c.cell_type for c in stu.cells] == [c.cell_type for c in ins.cells]
    assert [c.get("id") for c in stu.cells] == [c.get("id") for c in ins.cells]
    assert [c.metadata for c in stu.cells] == [c.metadata for c in ins.cells]
    for a, b in zip(ins.cells, stu.cells):
        if not solution_lines(a.source):
            assert b.source == a.source  # check cells (and every cell without a solution) verbatim
        kept = [line for line in split(b.source)[1] if not STUB.match(line)]
        assert kept == split(a.source)[1]  # every line outside the markers, in order
    # the same cell's check is kept, below the stub
    assert stu.cells[4].source.endswith('check("3", answer_3, 2 * base, hint="the loop\'s last value")')


def test_stubs_assign_the_removed_names(student):
    stu = nbformat.read(student, as_version=4)
    assert stu.cells[2].source == ("# Exercise 1 and 2: answer_1 is half of base, answer_2 says whether base is "
                                   '"odd" or "even"\nhalf_of_base = None\nanswer_1 = None\nanswer_2 = None\n'
                                   "# YOUR CODE HERE")
    assert stu.cells[4].source.startswith("if True:\n    answer_3 = None\n    # YOUR CODE HERE\ncheck(")
    assert stu.cells[5].source == "**Question.** Why is the answer odd?\n\nYOUR ANSWER HERE\n\nThen go on."


def test_student_copy_is_valid_and_has_no_outputs(student):
    raw = json.loads(student.read_text())
    nbformat.validate(nbformat.from_dict(raw))
    for c in raw["cells"]:
        if c["cell_type"] == "code":
            assert c["outputs"] == [] and c["execution_count"] is None


def execute(path: Path) -> str:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in env_threads.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    # a cell ending in check(...) shows the printed line only, not the returned verdict as well
    assert not [o for o in outputs if o.output_type == "execute_result"]
    return "".join(o.get("text", "") for o in outputs)


def test_student_copy_runs_and_asks_for_the_answers(student):
    out = execute(student)  # strict mode is on in the tests (conftest): unset answers must not raise
    for n in (1, 2, 3):
        assert f"Exercise {n}: set answer_{n} and rerun this cell" in out
    assert "right" not in out


def test_instructor_copy_runs_and_is_right(instructor):
    out = execute(instructor)
    assert "Exercise 1: right — 10.5" in out
    assert "Exercise 2: right" in out and "Exercise 3: right" in out


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION", "nested"),
    ("### BEGIN SOLUTION\nx = 1", "never closed"),
    ("x = 1\n### END SOLUTION", "without"),
    ("## BEGIN SOLUTION\nx = 1\n### END SOLUTION", "not exactly"),
    ("### BEGIN SOLUTION\nx = (1,\n### END SOLUTION\n)", "does not parse"),
])
def test_malformed_markers_are_errors(source, message):
    with pytest.raises(ms.SolutionMarkerError, match=message):
        ms.clear_code(source)


def test_names_bound_by_a_block():
    code = ("a = 1\nb, (c, *d) = 1, (2, 3)\ne += 1\nf: int = 2\ng: int\nobj.attr = 3\nm[0] = 4\n"
            "def fn():\n    inner = 1\nclass K:\n    pass\nfor i in range(2):\n    h = i\nimport os\n"
            "try:\n    t = 1\nexcept Exception:\n    u = 2\nw = [z for z in range(3)]\n%time v = 1")
    assert ms.bound_names(code) == ["a", "b", "c", "d", "e", "f", "fn", "K", "h", "t", "u", "w"]


def test_refuses_to_overwrite_the_instructor_notebooks(instructor):
    with pytest.raises(SystemExit):
        ms.make_student(instructor.parent, instructor.parent, quiet=True)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_real_chapters(path):
    """Every chapter yields a valid student copy with no solution left, and keeps all its checks."""
    ins = ms.read_notebook(path)
    stu, report = ms.student_notebook(ins, path.name)
    nbformat.validate(stu)
    markers = sum(line.strip() == "### BEGIN SOLUTION" for c in ins.cells for line in c.source.split("\n"))
    assert len(report["code"]) + report["text"] == markers
    assert "BEGIN SOLUTION" not in all_text(stu) and "END SOLUTION" not in all_text(stu)
    outside = "\n".join(line for c in ins.cells for line in split(c.source)[1])
    removed = {line for c in ins.cells for line in solution_lines(c.source) if line not in outside}
    leaked = sorted(line for line in removed if line in all_text(stu))
    assert not leaked, f"{path.name}: solution lines in the student copy: {leaked}"
    assert sum("check(" in c.source for c in stu.cells) == sum("check(" in c.source for c in ins.cells)
    assert len(stu.cells) == len(ins.cells)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stu.cells
               if c.cell_type == "code")
