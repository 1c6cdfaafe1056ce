"""The distillation experiment: a teacher, then a ~5x smaller student trained five ways on equal tokens.

  python experiments/distill_table.py --runs runs/distill --results experiments/results/distill

Runs every command of experiments/distill.py's docstring in order (the teacher, the student from
scratch, online and cached logit distillation, sequence distillation on the teacher's samples,
on-policy distillation), then tabulates the students' and the teacher's validation bits per byte on
the same held-out files (a sequence-distilled student trains on the teacher's samples, so it is
scored with `manifold eval --sources`), the share of the scratch-to-teacher gap each closes, student
tokens, wall time (the cache's and the samples' own time beside it) and cache bytes per token.
Writes results.md / results.json and each run's `<run>-metrics.jsonl` for notebooks/distill.ipynb.
`--size tiny` runs it all in seconds; `--set a.b=v` is added to every command (e.g. data.sources).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from manifold import files
from manifold.results import fmt, write_results
from manifold.train.metrics import read_metrics

CONFIG = "experiments/distill.py"


def _config(variant: str, size: str) -> str:
  return f"{CONFIG}:{variant}" + (f",size={size}" if size != "default" else "")


def plan(runs: str, size: str) -> list[dict]:
  """The commands in order: (name, method, argv after `manifold`, the run whose student it trains)."""
  teacher, cache, gen = (os.path.join(runs, name) for name in ("teacher", "cache", "gen"))

  def student(variant, *extra, verb=("distill",), teach=True):
    argv = [*verb, "--config", _config(variant, size), "--workdir", os.path.join(runs, variant), "--no-progress"]
    return argv + (["--teacher", teacher] if teach else []) + list(extra)

  return [
    {"run": "teacher", "method": "teacher (quickstart model, 4x the steps)",
     "argv": ["train", "--config", _config("teacher", size), "--workdir", teacher, "--no-progress"]},
    {"run": "scratch", "method": "student from scratch", "argv": student("scratch", verb=("train",), teach=False)},
    {"run": "logit", "method": "logit distillation, online", "argv": student("logit")},
    {"run": "cache", "argv": ["distill", "cache", "--config", _config("logit_cache", size), "--teacher", teacher,
                              "--out", cache, "--no-progress"]},
    {"run": "logit_cache", "method": "logit distillation from the top-k cache",
     "argv": student("logit_cache", f"--config.distill.cache={cache}")},
    {"run": "gen", "argv": ["distill", "generate", "--config", _config("sequence", size), "--teacher", teacher,
                            "--out", gen, "--no-progress"]},
    {"run": "sequence", "method": "sequence distillation (trains on the teacher's samples)",
     "argv": student("sequence", f"--config.data.sources={gen}/*.jsonl", verb=("train",), teach=False)},
    {"run": "on_policy", "method": "on-policy distillation, on its own samples",
     "argv": student("on_policy")},
  ]  # fmt: skip


def run(argv: list[str]) -> tuple[float, str]:
  """Runs `manifold <argv>`, echoing it; (wall seconds, its stdout)."""
  print(f"== {shlex.join(['manifold', *argv])}", flush=True)
  began = time.perf_counter()
  out = subprocess.run([sys.executable, "-m", "manifold.cli", *argv], check=True, stdout=subprocess.PIPE, text=True)
  print(out.stdout, end="", flush=True)
  return time.perf_counter() - began, out.stdout


def _last_val(workdir: str) -> float:
  return [
    r["val_bits_per_byte"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "val_bits_per_byte" in r
  ][-1]


COLUMNS = [
  ("run", lambda r: r["run"]),
  ("method", lambda r: r["method"]),
  ("val bits per byte", lambda r: f"{r['val_bpb']:.3f}"),
  ("teacher", lambda r: f"{r['teacher_bpb']:.3f}"),
  ("gap closed", lambda r: fmt(r.get("gap_closed"), ".0%")),
  ("student tokens", lambda r: f"{r['tokens']:,}"),
  ("wall s", lambda r: f"{r['wall_s']:.0f}" + (f" (+{r['prep_s']:.0f} {r['prep']})" if r.get("prep") else "")),
  ("cache bytes/token", lambda r: fmt(r.get("cache_bytes_per_token"), ".1f")),
  ("command", lambda r: "<br>".join(f"`{c}`" for c in r["commands"])),
]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="runs/distill", help="folder of every run's workdir")
  parser.add_argument("--results", default="experiments/results/distill")
  parser.add_argument("--size", default="default", choices=("default", "tiny"))
  parser.add_argument("--set", action="append", default=[], metavar="A.B=V", help="an override for every command")
  args = parser.parse_args(argv)
  overrides = [f"--config.{item}" for item in args.set]
  if os.path.isdir(args.runs) and os.listdir(args.runs):
    parser.error(f"--runs {args.runs}: not empty; every row must be a fresh run (pass a new folder)")
  done: dict[str, dict] = {}
  for step in plan(args.runs, args.size):
    argv_ = step["argv"] + overrides
    wall, _ = run(argv_)
    done[step["run"]] = {**step, "argv": argv_, "wall_s": wall}
  sources = next((o.split("=", 1)[1] for o in overrides if o.startswith("--config.data.sources=")), "stdlib")
  eval_argv = ["eval", "--workdir", os.path.join(args.runs, "sequence"), "--sources", sources]
  _, text = run(eval_argv)
  sequence_bpb = float(re.search(r"val_bits_per_byte ([0-9.]+)", text).group(1))
  cache = json.loads(files.read_text(os.path.join(args.runs, "cache", "manifest.json")))
  teacher_bpb = _last_val(os.path.join(args.runs, "teacher"))
  os.makedirs(args.results, exist_ok=True)
  rows = []
  for name in ("teacher", "scratch", "logit", "logit_cache", "sequence", "on_policy"):
    step = done[name]
    workdir = os.path.join(args.runs, name)
    shutil.copyfile(os.path.join(workdir, "metrics.jsonl"), os.path.join(args.results, f"{name}-metrics.jsonl"))
    cfg = json.loads(files.read_text(os.path.join(workdir, "config.json")))
    commands = [step["argv"]]
    method = step["method"]
    if name in ("logit", "logit_cache", "on_policy"):
      d = cfg["distill"]
      method += f" ({d['divergence']}, w {d['weight']:g}, T {d['temperature']:g})"
    row = {"run": name, "method": method, "teacher_bpb": teacher_bpb, "wall_s": step["wall_s"]}
    row["val_bpb"] = sequence_bpb if name == "sequence" else _last_val(workdir)
    row["tokens"] = cfg["train"]["steps"] * cfg["train"]["batch_size"] * cfg["train"]["seq_len"]
    if name == "logit_cache":
      commands.insert(0, done["cache"]["argv"])
      row.update(prep="cache", prep_s=done["cache"]["wall_s"], cache_bytes_per_token=cache["bytes_per_token"])
    if name == "sequence":
      commands = [done["gen"]["argv"], step["argv"], eval_argv]
      row.update(prep="samples", prep_s=done["gen"]["wall_s"])
    row["commands"] = [shlex.join(["manifold", *c]) for c in commands]
    rows.append(row)
  scratch = next(r["val_bpb"] for r in rows if r["run"] == "scratch")
  for row in rows:
    if row["run"] not in ("teacher", "scratch") and scratch != teacher_bpb:
      row["gap_closed"] = (scratch - row["val_bpb"]) / (scratch - teacher_bpb)
  write_results(args.results, rows, COLUMNS)
  print(files.read_text(os.path.join(args.results, "results.md")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
