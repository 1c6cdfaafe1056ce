"""Results tables: rows as JSON (the data) and Markdown (the view), written together.

The compile command, sweeps and benchmarks describe their tables as columns, a header
and how a row becomes its cell, and write them here, so every table is made the same way.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
from typing import Any, Callable, Sequence

from manifold import files

Column = tuple[str, Callable[[dict], str]]  # (header, row -> cell text)


def fmt(value: Any, spec: str) -> str:
  """`format(value, spec)`, or '-' for a missing value."""
  return "-" if value is None else format(value, spec)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
  """One Markdown table; a row with an "error" shows it after its first cell."""
  lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + " --- |" * len(columns)]
  for row in rows:
    cells = [columns[0][1](row), f"failed: {row['error']}"] if "error" in row else [cell(row) for _, cell in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def source_commit() -> str | None:
  """The commit of the checkout this package runs from (with "+changes" if its tree differs),
  or None outside a git checkout: results say which code made them."""
  root = pathlib.Path(__file__).resolve().parents[2]
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write_results(
  results_dir: str,
  rows: list[dict],
  columns: Sequence[Column],
  *,
  key: str | None = None,
  name: str = "results",
) -> list[dict]:
  """Writes `<name>.json` and `<name>.md` in `results_dir`; returns the rows written.

  With `key`, rows already in results.json stay unless a new row has the same value of
  `key` (the new one replaces it), so runs of a few configs add to one table.
  """
  root = files.path(results_dir)
  saved = files.read_text(root / f"{name}.json") if key is not None else None
  if saved is not None:
    new = {r[key] for r in rows}
    rows = [r for r in json.loads(saved) if r[key] not in new] + list(rows)
  files.write_atomic(root / f"{name}.json", json.dumps(rows, indent=1) + "\n")
  files.write_atomic(root / f"{name}.md", markdown_table(rows, columns))
  return rows
