"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tensorboardX import SummaryWriter

from manifold.files import write_atomic


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All rows of a metrics.jsonl file, in order."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(value: Any) -> Any:
  """Floats stay floats (non-finite become null); arrays become nested lists."""
  if isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0:
    return [_jsonable(v) for v in value]
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsWriter:
  """Appends `{"step": s, **metrics}` rows; on resume, first drops rows past `resume_step`.

  Rows past the restored checkpoint belong to steps that will be recomputed
  (identically: training is deterministic), so they are replaced, not duplicated.
  """

  def __init__(self, workdir: str, *, resume_step: int, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    if not enabled:
      return
    kept = [row for row in read_metrics(self.path) if row["step"] <= resume_step]
    write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))
    self._file = open(self.path, "a")
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """`metrics` maps names to floats, or to nested lists (per-layer values; jsonl only)."""
    if not self.enabled:
      return
    row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for name, value in row.items():
      if isinstance(value, float):
        self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tensorboard.close()
