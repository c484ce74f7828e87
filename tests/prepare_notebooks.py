"""Copy every chapter in notebooks/ to OUT with papermill parameters injected (no execution).

Usage: python tests/prepare_notebooks.py OUT name=value ...   (values are parsed as Python literals or kept
as strings). nbval then executes the copies (`pytest OUT --nbval-lax`), so a new chapter needs no test edits.
"""
import ast
import sys
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parent.parent


def parse(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def main(out: str, *assignments: str):
    params = dict(a.split("=", 1) for a in assignments)
    params = {k: parse(v) for k, v in params.items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        papermill.execute_notebook(str(nb), str(Path(out) / nb.name), parameters=params, prepare_only=True,
                                   progress_bar=False)
        print(f"prepared {nb.name} with {params}")


if __name__ == "__main__":
    main(*sys.argv[1:])
