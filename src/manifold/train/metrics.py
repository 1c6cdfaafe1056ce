"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from tensorboardX import SummaryWriter

from manifold import files


def _read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int]]:
  """(rows, numbers of the lines that are not a JSON object: a write cut short)."""
  text = files.read_text(path)
  if text is None:
    return [], []
  rows, torn = [], []
  for number, line in enumerate(text.split("\n"), start=1):
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


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
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

  A bucket cannot append: for a remote workdir the rows are kept here and the file is
  rewritten whole at each `flush` (the loop flushes at every evaluation and checkpoint), and
  the TensorBoard event files go to the local `tensorboard_dir`, copied into the workdir at
  `close`. A local workdir gets each row as it comes, and its own `tensorboard/`.
  """

  def __init__(
    self,
    workdir: str,
    *,
    resume_step: int,
    enabled: bool = True,
    say: Callable[[str], None] = print,
    tensorboard_dir: str | None = None,
  ):
    self.path = files.path(workdir) / "metrics.jsonl"
    self.enabled = enabled
    if not enabled:
      return
    rows, torn = _read_rows(self.path)
    if torn:
      say(f"{self.path}: dropped {len(torn)} line(s) cut short by an earlier crash (line {', '.join(map(str, torn))})")
    kept = [row for row in rows if row["step"] <= resume_step]
    self._written = {(row["step"], row_kind(row)) for row in kept}
    self._lines = [json.dumps(row) + "\n" for row in kept]
    files.write_atomic(self.path, "".join(self._lines))
    self._remote = files.is_remote(workdir)
    self._file = None if self._remote else open(self.path, "a")
    self._tensorboard_dir = os.fspath(files.path(tensorboard_dir or self.path.parent / "tensorboard"))
    self._tensorboard = SummaryWriter(self._tensorboard_dir)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """`metrics` maps names to floats, or to nested lists (per-layer values; jsonl only)."""
    if not self.enabled:
      return
    row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    if (step, row_kind(row)) in self._written:
      return
    self._written.add((step, row_kind(row)))
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()
    for name, value in row.items():
      if isinstance(value, float):
        self._tensorboard.add_scalar(name, value, step)

  def flush(self) -> None:
    """Brings the workdir's metrics.jsonl up to date (a remote one is rewritten whole)."""
    if self.enabled and self._remote:
      files.write_atomic(self.path, "".join(self._lines))

  def close(self) -> None:
    if not self.enabled:
      return
    self.flush()
    self._tensorboard.close()
    if self._remote:
      files.upload_tree(self._tensorboard_dir, self.path.parent / "tensorboard")
    else:
      self._file.close()
