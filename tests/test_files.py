"""Atomic writes and results tables: a reader never sees half a file; tables merge by key."""

from __future__ import annotations

import json
import os

import pytest

from manifold.files import atomic_path, write_atomic
from manifold.results import markdown_table, write_results


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "config.json"
  write_atomic(str(path), "old")
  with pytest.raises(RuntimeError), atomic_path(str(path)) as tmp:
    with open(tmp, "w") as f:
      f.write("half")
    raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["config.json"]
  with atomic_path(str(tmp_path / "store"), directory=True) as tmp:
    (tmp_path / tmp / "a").write_text("x")
  assert (tmp_path / "store" / "a").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["config.json", "store"]


def test_results_rows_merge_by_key_and_errors_show_in_the_table(tmp_path):
  columns = [("config", lambda r: r["config"]), ("GiB", lambda r: f"{r['gib']:.1f}")]
  write_results(str(tmp_path), [{"config": "a", "gib": 1.0}, {"config": "b", "gib": 2.0}], columns, key="config")
  rows = write_results(str(tmp_path), [{"config": "b", "gib": 3.0}], columns, key="config")
  assert (
    rows
    == json.loads((tmp_path / "results.json").read_text())
    == [
      {"config": "a", "gib": 1.0},
      {"config": "b", "gib": 3.0},
    ]
  )
  assert (tmp_path / "results.md").read_text() == "| config | GiB |\n| --- | --- |\n| a | 1.0 |\n| b | 3.0 |\n"
  assert markdown_table([{"config": "c", "error": "out of memory"}], columns).splitlines()[-1] == (
    "| c | failed: out of memory |"
  )
