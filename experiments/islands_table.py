"""The islands experiment: data parallel vs DiLoCo vs Streaming DiLoCo (int4, tau = 1) at equal
tokens, M = 2 and 4 islands, plus a run in which one of 4 islands is killed halfway and rejoins.

  python experiments/islands_table.py --runs runs/islands --results experiments/results/islands

Each row runs its command (printed in the table), then reads its folders back
(`manifold.islands.report`): the final validation loss (the mean over islands of each island's
own model), the bytes that crossed between islands (every island's store traffic, both ways),
the bytes a data-parallel all-reduce would have moved for the same model and steps, and the
wall time. Writes results.md / results.json and runs.json (every run's loss-against-bytes curve
and the fault run's membership) for notebooks/islands.ipynb.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from manifold import files
from manifold.islands import report
from manifold.results import write_results

CONFIG = "experiments/islands.py"


def rows(steps: int, inner_steps: int, only: set[str] | None) -> list[dict]:
  """Every row: its name, method, island count and `manifold` arguments."""
  out = []
  for m in (2, 4):
    arg = f"{CONFIG}:{{}},count={m},steps={steps},inner_steps={inner_steps}"
    out.append(
      {"run": f"dp-{m}", "method": "data parallel", "islands": m, "args": ["train", "--config", arg.format("dp")]}
    )
    for variant, method in (("diloco", f"DiLoCo H={inner_steps}"), ("int4_tau1", "Streaming DiLoCo P=2 int4 tau=1")):
      out.append(
        {
          "run": f"{variant}-{m}",
          "method": method,
          "islands": m,
          "args": ["islands", "--config", arg.format(variant), "--count", str(m)],
        }
      )
  fault = f"{CONFIG}:int4_tau1,count=4,steps={steps},inner_steps={inner_steps}"
  drill = ["--kill", f"3@{steps // 2}", "--join", "3@20"]
  out.append(
    {
      "run": "int4_tau1-4-fault",
      "method": "Streaming DiLoCo P=2 int4 tau=1; island 3 killed at half, restarted 20 s later",
      "islands": 4,
      "args": ["islands", "--config", fault, "--count", "4", *drill],
    }
  )
  return [r for r in out if only is None or r["run"] in only]


COLUMNS = [
  ("run", lambda r: r["run"]),
  ("method", lambda r: r["method"]),
  ("islands", lambda r: str(r["islands"])),
  ("final val loss", lambda r: f"{r['final_val_loss']:.4f}"),
  ("vs data parallel", lambda r: f"{r['vs_dp']:+.2%}" if r.get("vs_dp") is not None else ""),
  ("MB across islands", lambda r: f"{r['bytes'] / 1e6:,.1f}"),
  ("data-parallel MB", lambda r: f"{r['dp_bytes'] / 1e6:,.1f}"),
  ("bytes ratio", lambda r: f"{r['dp_bytes'] / r['bytes']:,.0f}x" if r["bytes"] else "1x"),
  ("wall s", lambda r: f"{r['wall_s']:.0f}"),
  ("command", lambda r: f"`{r['command']}`"),
]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--runs", default="runs/islands", help="folder of the runs' workdirs")
  parser.add_argument("--results", default="experiments/results/islands")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--inner-steps", type=int, default=50)
  parser.add_argument("--only", nargs="*", default=None, help="run names to (re)run; the others stay in the table")
  args = parser.parse_args(argv)
  done = []
  saved = files.read_text(os.path.join(args.results, "runs.json"))
  curves = json.loads(saved) if saved else {}
  for row in rows(args.steps, args.inner_steps, set(args.only) if args.only else None):
    workdir = os.path.join(args.runs, row["run"])
    command = ["manifold", *row["args"], "--workdir", workdir] + (
      ["--no-progress"] if row["args"][0] == "train" else []
    )
    print(f"== {row['run']}: {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "manifold.cli", *command[1:]], check=True)
    wall = time.perf_counter() - started
    summary = report.summarize(workdir, parties=row["islands"])
    curves[row["run"]] = {"method": row["method"], "curve": summary["curve"], "membership": summary["membership"]}
    done.append(
      {**{k: row[k] for k in ("run", "method", "islands")}, **summary, "wall_s": wall, "command": shlex.join(command)}
    )
  for r in done:
    for key in ("curve", "membership"):
      r.pop(key)
  files.write_atomic(os.path.join(args.results, "runs.json"), json.dumps(curves) + "\n")
  table = write_results(args.results, done, COLUMNS, key="run")
  by_run = {r["run"]: r for r in table}
  for r in table:  # against the data-parallel row of the same island count, in this table
    base = by_run.get(f"dp-{r['islands']}")
    r["vs_dp"] = r["final_val_loss"] / base["final_val_loss"] - 1 if base and base is not r else None
  write_results(args.results, table, COLUMNS)
  print(files.read_text(os.path.join(args.results, "results.md")))
  return 0


if __name__ == "__main__":
  sys.exit(main())
