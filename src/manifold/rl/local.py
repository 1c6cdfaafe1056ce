"""`manifold rl local`: a learner and N rollout workers on this machine, each its own process, meeting
through a store (`file://<workdir>/store` unless given) exactly as they would across machines.

The learner trains in `<workdir>/learner`, worker k in `<workdir>/worker-<k>`; each process's output
goes to `log.txt` in its folder and to the console behind `learner |` or `worker k |`. The launcher
returns when the learner does (0 when it finished; the workers then exit on their own once they see
it done, or are stopped). A worker that fails is reported and the learner goes on with the others;
if every worker has failed, or the learner fails, the rest are stopped. Ctrl-C stops everything
(SIGTERM: the learner saves a checkpoint). Nothing outlives the launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # .../src


def learner_command(config: str, workdir: str, store: str, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "manifold.cli", "rl", "learner", "--config", config, "--workdir", workdir,
          "--store", store, *overrides]  # fmt: skip


def worker_command(config: str, workdir: str, store: str, k: int, overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "manifold.cli", "rl", "worker", "--config", config, "--workdir", workdir,
          "--store", store, "--id", str(k), *overrides]  # fmt: skip


def child_env() -> dict[str, str]:
  """This environment, with this checkout's sources first on PYTHONPATH."""
  path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": path}


class Child:
  """One process, its output copied to `<workdir>/log.txt` and, prefixed with `name |`, to `echo`."""

  def __init__(self, name: str, command: list[str], workdir: str, echo: Callable[[str], None]):
    self.name, self.command, self.workdir, self.echo = name, command, workdir, echo
    self.proc: subprocess.Popen | None = None
    self.code: int | None = None
    self._pump: threading.Thread | None = None

  def start(self, env: dict) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    self.proc = subprocess.Popen(
      self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    self._pump = threading.Thread(target=self._copy, args=(self.proc,), daemon=True)
    self._pump.start()

  def _copy(self, proc: subprocess.Popen) -> None:
    with open(os.path.join(self.workdir, "log.txt"), "a", encoding="utf-8") as log:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        self.echo(f"{self.name} | {line.rstrip()}")

  def poll(self) -> int | None:
    if self.proc is not None and self.code is None and self.proc.poll() is not None:
      self._pump.join(timeout=5)
      self.code = self.proc.returncode
    return self.code

  def signal(self, sig: int) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(sig)


def stop(children: Sequence[Child], grace_s: float = 30) -> None:
  """SIGTERM to every child still running, then SIGKILL to those still running after `grace_s`."""
  for child in children:
    child.signal(signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  for child in children:
    if child.proc is None:
      continue
    try:
      child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      child.signal(signal.SIGKILL)
      child.proc.wait()
    child.poll()


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
) -> int:
  """Starts the learner and `workers` workers, waits for the learner; its exit code (1 if every
  worker failed first, 124 past `timeout_s`, 130 after Ctrl-C)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  store = store or "file://" + os.path.join(workdir, "store")
  env = child_env()
  lock = threading.Lock()

  def say(text: str) -> None:
    with lock:
      echo(text)

  learner = Child("learner", learner_command(config, os.path.join(workdir, "learner"), store, overrides),
                  os.path.join(workdir, "learner"), say)  # fmt: skip
  crew = [
    Child(
      f"worker {k}",
      worker_command(config, os.path.join(workdir, f"worker-{k}"), store, k, overrides),
      os.path.join(workdir, f"worker-{k}"),
      say,
    )  # fmt: skip
    for k in range(workers)
  ]
  everyone = [learner, *crew]
  say(f"learner and {workers} worker(s), store {store}, logs in {workdir}/{{learner,worker-*}}/log.txt")
  began = time.monotonic()
  reported: set[str] = set()
  try:
    learner.start(env)
    for child in crew:
      child.start(env)
    while True:
      code = learner.poll()
      if code is not None:
        if code == 0:  # the workers see `done` and leave; give them a moment
          deadline = time.monotonic() + worker_grace_s
          while any(c.poll() is None for c in crew) and time.monotonic() < deadline:
            time.sleep(0.1)
          say(f"learner finished; metrics in {os.path.join(workdir, 'learner', 'metrics.jsonl')}")
        else:
          say(f"learner failed (exit code {code}; see {os.path.join(workdir, 'learner', 'log.txt')}); stopping")
        return code
      for child in crew:
        c = child.poll()
        if c not in (None, 0) and child.name not in reported:
          reported.add(child.name)
          say(f"{child.name} failed (exit code {c}; see {os.path.join(child.workdir, 'log.txt')}); going on")
      if crew and all(c.poll() not in (None, 0) for c in crew):
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
