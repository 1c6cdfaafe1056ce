"""`manifold islands`: M islands of an independent-jobs run on this machine, one `manifold train`
process each (ids 0..M-1, workdirs `<workdir>/island-<k>`, store `file://<workdir>/store` unless
given), each one's output in `<workdir>/island-<k>/log.txt` and on the console behind `island k |`.
The islands share one XLA compilation cache (`<workdir>/xla_cache`, unless JAX_COMPILATION_CACHE_DIR
is set): the first island starts alone, the others once it has compiled and taken its first step, so
the machine compiles the programs once (the run's first round waits for every island).

Fault drills: `--kill K@STEP` sends SIGKILL to island K once its metrics reach STEP; `--join K@S`
starts island K S seconds after the others, or, after a `--kill`, restarts it S seconds after the
kill (from its own checkpoint). The launcher waits for every island; a failure or Ctrl-C stops the
others (SIGTERM: each saves a checkpoint), and the exit code is non-zero if any island failed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Sequence

from manifold.processes import Child, child_env, last_step, serialized, stop, stops_on_sigterm


def island_dir(workdir: str, k: int) -> str:
  return os.path.join(workdir, f"island-{k}")


def train_command(config: str, workdir: str, store: str, k: int, count: int, overrides: Sequence[str]) -> list[str]:
  """The `manifold train` command line of island k."""
  return [
    sys.executable, "-m", "manifold.cli", "train", "--config", config, "--workdir", island_dir(workdir, k),
    "--no-progress", "--islands.store", store, "--islands.id", str(k), *overrides, f"--config.islands.count={count}",
  ]  # fmt: skip


@stops_on_sigterm
def run_islands(
  config: str,
  workdir: str,
  count: int,
  overrides: Sequence[str] = (),
  *,
  store: str = "",
  kills: dict[int, float] | None = None,
  joins: dict[int, float] | None = None,
  echo: Callable[[str], None] = print,
  timeout_s: float | None = None,
) -> int:
  """Starts the islands, runs the drills, waits; 0 if every island ended well (a killed island
  that is not restarted counts as intended), else the first failure's exit code (130 after Ctrl-C or SIGTERM,
  124 past `timeout_s`)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  store = store or "file://" + os.path.join(workdir, "store")
  kills, joins = dict(kills or {}), dict(joins or {})
  env = child_env(count, compile_cache=os.path.join(workdir, "xla_cache"))  # identical programs compile once
  say = serialized(echo)

  islands = [
    Child(f"island {k}", train_command(config, workdir, store, k, count, overrides), island_dir(workdir, k), say)
    for k in range(count)
  ]
  began = time.monotonic()
  start_at = {k: began + joins.get(k, 0.0) if k not in kills else began for k in range(count)}
  first = min(start_at, key=start_at.get)
  held_back = set(start_at) - {first}  # until the first island has compiled (its first metrics row)
  say(f"{count} islands, store {store}, workdirs {island_dir(workdir, 0)} ... {island_dir(workdir, count - 1)}")
  try:
    while True:
      now = time.monotonic()
      if held_back and (last_step(islands[first].workdir) >= 1 or islands[first].poll() is not None):
        held_back = set()
      for k, island in enumerate(islands):
        if k in start_at and now >= start_at[k] and k not in held_back:
          del start_at[k]
          say(f"starting island {k}" + (" (restart from its checkpoint)" if island.killed else ""))
          island.start(env)
        if k in kills and island.proc is not None and island.poll() is None and last_step(island.workdir) >= kills[k]:
          island.signal(signal.SIGKILL)
          island.proc.wait()
          island.killed = True
          say(f"killed island {k} (SIGKILL) at step {last_step(island.workdir)}")
          del kills[k]
          if k in joins:
            start_at[k] = time.monotonic() + joins[k]
      codes = {k: island.poll() for k, island in enumerate(islands)}
      failed = [(k, c) for k, c in codes.items() if c not in (None, 0) and not islands[k].killed and k not in start_at]
      if failed:
        k, code = failed[0]
        say(
          f"island {k} failed (exit code {code}; see {os.path.join(island_dir(workdir, k), 'log.txt')}); stopping the others"
        )
        stop(islands, grace_s=60)
        return code if code > 0 else 1
      if not start_at and all(c is not None for c in codes.values()):
        say(f"all islands done; metrics and membership.jsonl in {workdir}/island-*")
        return 0
      if timeout_s is not None and now - began > timeout_s:
        say(f"past {timeout_s:.0f} s: stopping the islands")
        stop(islands, grace_s=60)
        return 124
      time.sleep(0.1)
  except KeyboardInterrupt:
    say("interrupted: stopping the islands (each saves a checkpoint)")
    stop(islands, grace_s=60)
    return 130
  finally:
    stop(islands, grace_s=10)  # nothing outlives the launcher
