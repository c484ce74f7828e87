"""Run-time summary of executed chapters, as a markdown table, from papermill's record in each notebook.

    python tools/runtimes.py output/ > output/runtimes.md

Reads ``metadata.papermill.duration`` (wall seconds of the whole run) of every ``*.ipynb`` in the given folders (or
of the given notebooks), one row per chapter in name order, and a total. A notebook without that record (not
executed by papermill, or its run unfinished or failed) is an error that names the file. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def duration(path: Path) -> float:
    """The wall seconds papermill recorded for the run of the notebook at `path`; ValueError naming it if none."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable notebook ({e})") from None
    pm = nb.get("metadata", {}).get("papermill") if isinstance(nb, dict) else None
    if not isinstance(pm, dict):
        raise ValueError(f"{path}: no papermill metadata (metadata.papermill); not a notebook executed by papermill")
    if pm.get("exception"):
        raise ValueError(f"{path}: its papermill run failed (metadata.papermill.exception)")
    seconds = pm.get("duration")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise ValueError(f"{path}: no papermill duration (metadata.papermill.duration = {seconds!r}); run unfinished?")
    return float(seconds)


def notebooks(paths: list[Path]) -> list[Path]:
    found = []
    for p in paths:
        if p.is_dir():
            found += sorted(p.glob("*.ipynb"))
        elif p.is_file():
            found.append(p)
        else:
            raise ValueError(f"{p}: no such folder or notebook")
    if not found:
        raise ValueError(f"no notebooks in {', '.join(map(str, paths))}")
    return found


def table(rows: list[tuple[str, float]]) -> str:
    """Markdown table of (chapter, seconds) rows and their total."""
    lines = ["| chapter | wall time (s) | wall time (min) |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {s:.0f} | {s / 60:.1f} |" for name, s in rows]
    total = sum(s for _, s in rows)
    lines.append(f"| **total** | **{total:.0f}** | **{total / 60:.1f}** |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="folders of executed notebooks (e.g. output/), or notebooks")
    args = parser.parse_args(argv)
    try:
        rows = [(nb.name, duration(nb)) for nb in notebooks(args.paths)]
    except ValueError as e:
        print(f"runtimes: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
