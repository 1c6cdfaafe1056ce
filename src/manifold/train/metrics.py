"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from tensorboardX import SummaryWriter

from manifold.files import write_atomic


def _read_rows(path: str) -> tuple[list[dict[str, Any]], list[int]]:
  """(rows, numbers of the lines that are not a JSON object: a write cut short)."""
  if not os.path.exists(path):
    return [], []
  rows, torn = [], []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
      else:
        torn.append(number)
  return rows, torn


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All rows of a metrics.jsonl file, in order; a line cut short by a crash is left out."""
  return _read_rows(path)[0]


def row_kind(row: dict[str, Any]) -> str:
  """ "val" for a validation row, "train" for the others: rows are unique per (step, kind)."""
  return "val" if "val_loss" in row else "train"


def _jsonable(value: Any) -> Any:
  """Floats stay floats (non-finite become null); arrays become nested lists."""
  if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
    return [_jsonable(v) for v in value]
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsWriter:
  """Appends `{"step": s, **metrics}` rows; on resume, first drops rows past `resume_step`
  and lines cut short by a crash (saying so through `say`).

  Rows past the restored checkpoint belong to steps that will be recomputed
  (identically: training is deterministic), so they are replaced, not duplicated; a row
  for a (step, kind) the file already holds is not written again.
  """

  def __init__(self, workdir: str, *, resume_step: int, enabled: bool = True, say: Callable[[str], None] = print):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    if not enabled:
      return
    rows, torn = _read_rows(self.path)
    if torn:
      say(f"{self.path}: dropped {len(torn)} line(s) cut short by an earlier crash (line {', '.join(map(str, torn))})")
    kept = [row for row in rows if row["step"] <= resume_step]
    self._written = {(row["step"], row_kind(row)) for row in kept}
    write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
    self._file = open(self.path, "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """`metrics` maps names to floats, or to nested lists (per-layer values; jsonl only)."""
    if not self.enabled:
      return
    row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    if (step, row_kind(row)) in self._written:
      return
    self._written.add((step, row_kind(row)))
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for name, value in row.items():
      if isinstance(value, float):
        self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tensorboard.close()
