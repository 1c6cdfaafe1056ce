"""What an islands run did, read back from its folders: validation loss against the bytes that
crossed between islands, and who took part in each round.

A run folder is either a `manifold islands` workdir (`island-<k>/metrics.jsonl` and
`island-<k>/membership.jsonl` per island) or a plain `manifold train` workdir, read as the
data-parallel baseline of `parties` islands: a ring all-reduce of float32 gradients every step
(`diloco.allreduce_bytes`, counted both ways, as the islands' sent + received are).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from manifold import files
from manifold.config import config_from_json, model_config
from manifold.islands import diloco
from manifold.model.accounting import count_params
from manifold.train.metrics import read_metrics

SENT, RECEIVED = "islands/bytes_sent", "islands/bytes_received"  # per step


def island_dirs(run_dir: str) -> list[str]:
  """`island-<k>` folders of a `manifold islands` workdir, by k ([] for a plain run)."""
  found = glob.glob(os.path.join(run_dir, "island-*"))
  return sorted((d for d in found if os.path.isdir(d)), key=lambda d: int(d.rsplit("-", 1)[1]))


def _curve(rows: list[dict]) -> tuple[dict[int, float], dict[int, float]]:
  """(step -> validation loss, step -> bytes this island sent plus received so far)."""
  val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
  moved, total = {}, 0.0
  for r in sorted((r for r in rows if SENT in r), key=lambda r: r["step"]):  # per-step sums survive a resume
    total += r[SENT] + r[RECEIVED]
    moved[r["step"]] = total
  return val, moved


def _bytes_at(moved: dict[int, float], step: int) -> float:
  before = [s for s in moved if s <= step]
  return moved[max(before)] if before else 0.0


def summarize(run_dir: str, *, parties: int) -> dict[str, Any]:
  """One run: `curve` [(step, mean validation loss over islands, bytes across islands so far)],
  the final loss and bytes, the data-parallel bytes of the same model and steps, and (islands
  only) `membership`: every completed round as island 0 (or the lowest island with a record)
  saw it, plus each island's own rounds, for a timeline."""
  islands = island_dirs(run_dir)
  first = islands[0] if islands else run_dir
  cfg = config_from_json(files.read_text(os.path.join(first, "config.json")))
  n = count_params(model_config(cfg))["total"]
  per_step_dp = 2 * parties * diloco.allreduce_bytes(n, parties, 1)  # sent + received, every party
  if not islands:
    val, _ = _curve(read_metrics(os.path.join(run_dir, "metrics.jsonl")))
    curve = [(s, v, per_step_dp * s) for s, v in sorted(val.items())]
    membership = {}
  else:
    curves = [_curve(read_metrics(os.path.join(d, "metrics.jsonl"))) for d in islands]
    steps = sorted(set.intersection(*(set(val) for val, _ in curves)))
    curve = [
      (s, sum(val[s] for val, _ in curves) / len(curves), sum(_bytes_at(moved, s) for _, moved in curves))
      for s in steps
    ]
    membership = {
      os.path.basename(d): [
        json.loads(line) for line in (files.read_text(os.path.join(d, "membership.jsonl")) or "").splitlines()
      ]
      for d in islands
    }
  steps = curve[-1][0] if curve else 0
  return {
    "curve": curve,
    "final_val_loss": curve[-1][1] if curve else None,
    "bytes": curve[-1][2] if curve else 0.0,
    "dp_bytes": per_step_dp * steps,
    "params": n,
    "membership": membership,
  }
