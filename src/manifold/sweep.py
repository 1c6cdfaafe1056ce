"""Runs every variant an experiment file lists in `get_sweep()`, then tabulates and plots them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from manifold import files  # noqa: E402
from manifold.config import ConfigError, load_config  # noqa: E402
from manifold.results import fmt, write_results  # noqa: E402
from manifold.train.loop import train  # noqa: E402
from manifold.train.metrics import read_metrics  # noqa: E402


def sweep_args(config_path: str) -> list[str]:
  """The config arguments of `get_sweep()` in the experiment file."""
  spec = importlib.util.spec_from_file_location("experiment", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--config {config_path}: defines no get_sweep(); list the variants to run there")
  return list(module.get_sweep())


def run_name(arg: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", arg).strip("-")


def summarize(run_dir: str, cfg, *, name: str, command: str, wall_time_s: float) -> dict[str, Any]:
  """The results-table row of one finished run."""
  rows = read_metrics(files.path(run_dir) / "metrics.jsonl")
  val = [r for r in rows if "val_loss" in r]
  gains = [r["residual/amax_gain"] for r in val if r.get("residual/amax_gain") is not None]
  tokens = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s") is not None]
  return {
    "run": name,
    "residual": cfg.model.residual,
    "final_val_loss": val[-1]["val_loss"],
    "final_val_bits_per_byte": val[-1]["val_bits_per_byte"],
    "final_amax_gain": gains[-1] if gains else None,
    "peak_amax_gain": max(gains) if gains else None,
    "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
    "tokens_per_s": sum(tokens) / len(tokens) if tokens else None,
    "wall_time_s": wall_time_s,
    "command": command,
    "validation": [
      {"step": r["step"], "val_loss": r["val_loss"], "amax_gain": r.get("residual/amax_gain")} for r in val
    ],
  }


def run_sweep(
  config_path: str, workdir: str, results_dir: str, overrides: Sequence[str] = ()
) -> list[dict[str, Any]] | None:
  """Trains (or resumes) each variant in `<workdir>/<name>`, then writes results.{json,md} and curves.png.

  Returns the results rows, or None if SIGTERM stopped a run (saved; rerunning resumes).
  """
  files.path(results_dir).mkdir(parents=True, exist_ok=True)
  summaries = []
  for arg in sweep_args(config_path):
    spec = f"{config_path}:{arg}"
    cfg = load_config(spec, overrides)
    run_dir = os.path.join(workdir, run_name(arg))
    summary_path = files.path(run_dir) / "summary.json"
    if (saved := files.read_text(summary_path)) is not None:
      summaries.append(json.loads(saved))
      continue
    print(f"=== {spec} -> {run_dir}")
    started = time.perf_counter()
    if train(cfg, run_dir).stopped_early:  # SIGTERM: the run is saved; leave the rest for the rerun
      print(f"stopped during {spec}; rerun the same command to resume the sweep")
      return None
    command = " ".join(["manifold train", f"--config {spec}", f"--workdir {run_dir}", *overrides])
    summary = summarize(run_dir, cfg, name=arg, command=command, wall_time_s=time.perf_counter() - started)
    files.write_atomic(summary_path, json.dumps(summary, indent=2))
    summaries.append(summary)
  write_results(results_dir, summaries, COLUMNS)
  plot_sweep(summaries, files.path(results_dir) / "curves.png")
  return summaries


# The sweep table: one row per variant, with the command that trained it.
COLUMNS = [
  ("run", lambda s: s["run"]),
  ("final val loss", lambda s: f"{s['final_val_loss']:.4f}"),
  ("final val bits/byte", lambda s: f"{s['final_val_bits_per_byte']:.4f}"),
  ("final Amax gain", lambda s: fmt(s["final_amax_gain"], ".3f")),
  ("peak Amax gain", lambda s: fmt(s["peak_amax_gain"], ".3f")),
  ("tokens", lambda s: f"{s['tokens']:,}"),
  ("tokens/s", lambda s: fmt(s["tokens_per_s"], ",.0f")),
  ("wall time", lambda s: f"{s['wall_time_s'] / 60:.1f} min"),
  ("command", lambda s: f"`{s['command']}`"),
]


def plot_sweep(summaries: list[dict[str, Any]], out_path: str | os.PathLike) -> None:
  """Validation loss (after step 0, so the runs' differences show) against step, and the
  composite Amax gain where runs have residual streams; one colour per run."""
  with_gain = any(s["validation"][0]["amax_gain"] is not None for s in summaries)
  fig, axes = plt.subplots(1, 2 if with_gain else 1, figsize=(11 if with_gain else 6, 3.8), squeeze=False)
  ax_loss = axes[0, 0]
  for color, s in zip(plt.cm.tab10.colors, summaries):
    rows = s["validation"]
    trained = [r for r in rows if r["step"] > 0]
    ax_loss.plot(
      [r["step"] for r in trained], [r["val_loss"] for r in trained], marker="o", color=color, label=s["run"]
    )
    if with_gain and rows[0]["amax_gain"] is not None:
      axes[0, 1].plot(
        [r["step"] for r in rows], [r["amax_gain"] for r in rows], marker="o", color=color, label=s["run"]
      )
  ax_loss.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss")
  if with_gain:
    axes[0, 1].set(xlabel="step", ylabel="Amax gain of prod H_res", title="composite mixing gain", yscale="log")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  with files.atomic_path(out_path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
