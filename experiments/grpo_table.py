"""The GRPO experiment: an SFT warm-up, then GRPO with asynchronous and synchronous learners, with
one and two rollout workers, and a run in which a worker is killed halfway and a new one joins.

  python experiments/grpo_table.py --runs runs/grpo --results experiments/results/grpo

The warm-up (`manifold rl corpus`, then `manifold train` with experiments/grpo.py:sft) runs once;
each row then runs `manifold rl local` from its checkpoint and reads the learner's metrics back:
greedy held-out accuracy at the start, at the end and at best, the sampled (rollout) accuracy of
the first and last 20 steps, the time the learner waited for rollouts, the share of its time it
trained, and the tokens the workers generated per second of the learner's run. Writes results.md /
results.json and each row's `<run>-learner-metrics.jsonl` for notebooks/grpo.ipynb.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

from manifold import files
from manifold.results import write_results
from manifold.train.metrics import read_metrics

CONFIG = "experiments/grpo.py"
WINDOW = 20  # steps averaged for the sampled accuracy at the start and the end


def rows(steps: int, only: set[str] | None) -> list[dict]:
  """Every row: its name, learner mode, workers and `manifold rl local` arguments."""
  half = steps // 2
  out = [
    {"run": "async-2", "mode": "async (max_staleness 2)", "workers": 2, "args": [CONFIG, "--workers", "2"]},
    {"run": "sync-2", "mode": "sync (max_staleness 0)", "workers": 2, "args": [f"{CONFIG}:sync", "--workers", "2"]},
    {"run": "async-1", "mode": "async (max_staleness 2)", "workers": 1, "args": [CONFIG, "--workers", "1"]},
    {
      "run": "async-2-fault",
      "mode": f"async; worker 1 SIGKILLed at step {half}, worker 2 joins then",
      "workers": 2,
      "args": [CONFIG, "--workers", "2", "--kill", f"1@{half}", "--join", f"2@{half}"],
    },
  ]
  return [r for r in out if only is None or r["run"] in only]


def summarize(metrics_path: str) -> dict:
  """The table's figures from a learner's metrics.jsonl."""
  rows_ = read_metrics(metrics_path)
  held = [(r["step"], r["heldout_accuracy"]) for r in rows_ if "heldout_accuracy" in r]
  steps = [r for r in rows_ if "reward" in r]
  last = steps[-1]
  tokens = sum(v for k, v in last.items() if k.startswith("tokens/worker-"))
  return {
    "steps": last["step"],
    "heldout_start": held[0][1],
    "heldout_end": held[-1][1],
    "heldout_best": max(a for _, a in held),
    "sampled_start": float(np.mean([r["accuracy"] for r in steps[:WINDOW]])),
    "sampled_end": float(np.mean([r["accuracy"] for r in steps[-WINDOW:]])),
    "wait_s": last["wait_s_total"],
    "busy": sum(r["train_s"] for r in steps) / last["elapsed_s"],
    "tokens_per_s": tokens / last["elapsed_s"],
    "dropped_stale": last["dropped_stale"],
  }


COLUMNS = [
  ("run", lambda r: r["run"]),
  ("learner", lambda r: r["mode"]),
  ("workers", lambda r: str(r["workers"])),
  ("steps", lambda r: str(r["steps"])),
  ("held-out accuracy: start", lambda r: f"{r['heldout_start']:.1%}"),
  ("end", lambda r: f"{r['heldout_end']:.1%}"),
  ("best", lambda r: f"{r['heldout_best']:.1%}"),
  (f"sampled accuracy: first {WINDOW} steps", lambda r: f"{r['sampled_start']:.1%}"),
  (f"last {WINDOW}", lambda r: f"{r['sampled_end']:.1%}"),
  ("learner waited s", lambda r: f"{r['wait_s']:.1f}"),
  ("learner busy", lambda r: f"{r['busy']:.0%}"),
  ("generated tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
  ("stale batches dropped", lambda r: f"{r['dropped_stale']:.0f}"),
  ("wall s", lambda r: f"{r['wall_s']:.0f}"),
  ("command", lambda r: f"`{r['command']}`"),
]


def run(command: list[str]) -> float:
  """Runs `manifold <command>`, echoing it; its wall time in seconds."""
  print(f"== {shlex.join(['manifold', *command])}", flush=True)
  began = time.perf_counter()
  subprocess.run([sys.executable, "-m", "manifold.cli", *command], check=True)
  return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="runs/grpo", help="folder of the warm-up's and the rows' workdirs")
  parser.add_argument("--results", default="experiments/results/grpo")
  parser.add_argument("--steps", type=int, default=200, help="GRPO steps of every row (train.steps)")
  parser.add_argument("--only", nargs="*", default=None, help="run names to (re)run; the others stay in the table")
  args = parser.parse_args(argv)
  sft, data = os.path.join(args.runs, "sft"), os.path.join(args.runs, "sft-data")
  if not os.path.exists(os.path.join(sft, "metrics.jsonl")):
    run(["rl", "corpus", "--config", f"{CONFIG}:sft", "--out", data, "--count", "100000"])
    run(
      ["train", "--config", f"{CONFIG}:sft", "--workdir", sft, "--no-progress", f"--config.data.sources={data}/*.jsonl"]
    )
  os.makedirs(args.results, exist_ok=True)
  done = []
  for row in rows(args.steps, set(args.only) if args.only else None):
    workdir = os.path.join(args.runs, row["run"])
    config, *rest = row["args"]
    command = ["rl", "local", "--config", config, "--workdir", workdir, *rest, "--init-from", sft]
    command += [f"--config.train.steps={args.steps}"]
    wall = run(command)
    metrics = os.path.join(workdir, "learner", "metrics.jsonl")
    shutil.copyfile(metrics, os.path.join(args.results, f"{row['run']}-learner-metrics.jsonl"))
    done.append(
      {
        **{k: row[k] for k in ("run", "mode", "workers")},
        **summarize(metrics),
        "wall_s": wall,
        "command": shlex.join(["manifold", *command]),
      }  # fmt: skip
    )
  write_results(args.results, done, COLUMNS, key="run")
  print(files.read_text(os.path.join(args.results, "results.md")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
