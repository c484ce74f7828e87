"""tools/runtimes.py: the run-time table that `make course` writes to output/runtimes.md."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("runtimes", Path(__file__).resolve().parents[1] / "tools" / "runtimes.py")
runtimes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runtimes)


def _notebook(path, papermill):
    meta = {"kernelspec": {"name": "python3"}} | ({} if papermill is None else {"papermill": papermill})
    path.write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))


def test_table_rows_in_name_order_and_total(tmp_path, capsys):
    _notebook(tmp_path / "02_lds.ipynb", {"duration": 35.4, "exception": None})
    _notebook(tmp_path / "01_influence.ipynb", {"duration": 144.6})
    (tmp_path / "runtimes.md").write_text("an earlier summary, not a notebook")
    assert runtimes.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "| chapter | wall time (s) | wall time (min) |",
        "| --- | ---: | ---: |",
        "| 01_influence.ipynb | 145 | 2.4 |",
        "| 02_lds.ipynb | 35 | 0.6 |",
        "| **total** | **180** | **3.0** |",
    ]


@pytest.mark.parametrize("papermill, says", [
    (None, "no papermill metadata"),
    ({"duration": None}, "no papermill duration"),  # a run that has not finished
    ({"duration": 12.0, "exception": True}, "run failed"),
])
def test_notebook_without_a_papermill_run_is_an_error_naming_it(tmp_path, capsys, papermill, says):
    _notebook(tmp_path / "01_ok.ipynb", {"duration": 1.0})
    _notebook(tmp_path / "02_bad.ipynb", papermill)
    assert runtimes.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no partial table for `> output/runtimes.md`
    assert str(tmp_path / "02_bad.ipynb") in err and says in err


def test_empty_folder_is_an_error(tmp_path, capsys):
    assert runtimes.main([str(tmp_path)]) == 1
    assert "no notebooks" in capsys.readouterr().err
