"""`manifold rl local`: a learner and N rollout workers on this machine, each its own process, meeting
through a store (`file://<workdir>/store` unless given) exactly as they would across machines.

The learner trains in `<workdir>/learner`, worker k in `<workdir>/worker-<k>`; each process's output
goes to `log.txt` in its folder and to the console behind `learner |` or `worker k |`. The launcher
returns when the learner does (0 when it finished; the workers then exit on their own once they see
it done, or are stopped). A worker that fails is reported and the learner goes on with the others;
if every worker has failed, or the learner fails, the rest are stopped. Ctrl-C stops everything
(SIGTERM: the learner saves a checkpoint). Nothing outlives the launcher.

Fault drills: `--kill K@STEP` sends SIGKILL to worker K once the learner's metrics reach STEP;
`--join K@STEP` starts worker K once they do: a new worker, or worker K again after its `--kill`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Sequence

from manifold.processes import Child, child_env, last_step, serialized, stop, stops_on_sigterm


def learner_command(config: str, workdir: str, store: str, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "manifold.cli", "rl", "learner", "--config", config, "--workdir", workdir,
          "--store", store, *overrides]  # fmt: skip


def worker_command(config: str, workdir: str, store: str, k: int, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "manifold.cli", "rl", "worker", "--config", config, "--workdir", workdir,
          "--store", store, "--id", str(k), *overrides]  # fmt: skip


@stops_on_sigterm
def run_local(
  config: str,
  workdir: str,
  workers: int,
  overrides: Sequence[str] = (),
  *,
  store: str = "",
  echo: Callable[[str], None] = print,
  timeout_s: float | None = None,
  worker_grace_s: float = 30,
  kills: dict[int, int] | None = None,
  joins: dict[int, int] | None = None,
) -> int:
  """Starts the learner and workers 0..`workers`-1, runs the drills (`kills`, `joins`: worker id ->
  learner step), waits for the learner; its exit code (1 if every worker failed first, 124 past
  `timeout_s`, 130 after Ctrl-C or SIGTERM)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  store = store or "file://" + os.path.join(workdir, "store")
  kills, joins = dict(kills or {}), dict(joins or {})
  env = child_env(1 + len(set(range(workers)) | set(joins)))  # the learner and every worker there will be
  say = serialized(echo)

  learner = Child("learner", learner_command(config, os.path.join(workdir, "learner"), store, overrides),
                  os.path.join(workdir, "learner"), say)  # fmt: skip
  crew = {
    k: Child(
      f"worker {k}",
      worker_command(config, os.path.join(workdir, f"worker-{k}"), store, k, overrides),
      os.path.join(workdir, f"worker-{k}"),
      say,
    )  # fmt: skip
    for k in sorted(set(range(workers)) | set(joins))
  }
  everyone = [learner, *crew.values()]
  say(f"learner and {workers} worker(s), store {store}, logs in {workdir}/{{learner,worker-*}}/log.txt")
  began = time.monotonic()
  reported: set[str] = set()
  try:
    learner.start(env)
    for k in range(workers):
      crew[k].start(env)
    while True:
      step = last_step(learner.workdir)
      for k, at in list(kills.items()):
        if step >= at and crew[k].poll() is None:
          crew[k].signal(signal.SIGKILL)
          crew[k].proc.wait()
          crew[k].killed = True
          del kills[k]
          say(f"killed worker {k} (SIGKILL) at learner step {step}")
      for k, at in list(joins.items()):
        if step >= at and k not in kills:
          del joins[k]
          say(f"starting worker {k} at learner step {step}" + (" (again)" if crew[k].killed else ""))
          crew[k].start(env)
      code = learner.poll()
      if code is not None:
        if code == 0:  # the workers see `done` and leave; give them a moment
          deadline = time.monotonic() + worker_grace_s
          while any(c.poll() is None for c in crew.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
          say(f"learner finished; metrics in {os.path.join(workdir, 'learner', 'metrics.jsonl')}")
        else:
          say(f"learner failed (exit code {code}; see {os.path.join(workdir, 'learner', 'log.txt')}); stopping")
        return code
      for child in crew.values():
        c = child.poll()
        if c not in (None, 0) and not child.killed and child.name not in reported:
          reported.add(child.name)
          say(f"{child.name} failed (exit code {c}; see {os.path.join(child.workdir, 'log.txt')}); going on")
      if not joins and all(c.proc is None or c.poll() not in (None, 0) for c in crew.values()):
        say("every worker failed; stopping the learner")
        return 1
      if timeout_s is not None and time.monotonic() - began > timeout_s:
        say(f"past {timeout_s:.0f} s: stopping")
        return 124
      time.sleep(0.1)
  except KeyboardInterrupt:
    say("interrupted: stopping (the learner saves a checkpoint)")
    return 130
  finally:
    stop(everyone)  # nothing outlives the launcher
