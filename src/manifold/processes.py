"""Child processes a local launcher starts (`manifold islands`, `manifold rl local`, `manifold
sweep --workers`): each one's output copied to `<workdir>/log.txt` and to the console behind its
name, and all of them stopped (SIGTERM, then SIGKILL after a grace period) so that nothing
outlives the launcher, also when the launcher itself is sent SIGTERM (`stops_on_sigterm`)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import threading
import time
from typing import Callable, Sequence

from manifold.cli import GPU_MEMORY_FRACTION
from manifold.config import ConfigError

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../src


def child_env(processes: int, compile_cache: str | None = None) -> dict[str, str]:
  """This environment for one of `processes` children on this machine: this checkout's sources
  first on PYTHONPATH, and each child's share of the GPUs' memory (JAX would take 90% in each);
  with `compile_cache`, a JAX compilation cache there that the children share (programs that
  several of them run compile once), unless one is set already."""
  path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
  share = f"{float(GPU_MEMORY_FRACTION) / processes:.3f}"
  env = {**os.environ, "PYTHONPATH": path, "XLA_PYTHON_CLIENT_MEM_FRACTION": share}
  if compile_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
    env.update(
      JAX_COMPILATION_CACHE_DIR=compile_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def serialized(echo: Callable[[str], None]) -> Callable[[str], None]:
  """`echo` behind a lock: the children's output threads print whole lines."""
  lock = threading.Lock()

  def say(text: str) -> None:
    with lock:
      echo(text)

  return say


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def stops_on_sigterm(launcher: Callable) -> Callable:
  """`launcher` with SIGTERM raising KeyboardInterrupt in it, as Ctrl-C does: a launcher that is
  itself stopped (a scheduler's preemption, `kill`) stops its children the same way, each saving
  its run. The previous handler is restored after; off the main thread it runs as it is."""

  @functools.wraps(launcher)
  def run(*args, **kwargs):
    if threading.current_thread() is not threading.main_thread():
      return launcher(*args, **kwargs)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
      return launcher(*args, **kwargs)
    finally:
      signal.signal(signal.SIGTERM, previous)

  return run


class Child:
  """One process, its output copied to `<workdir>/log.txt` and, prefixed with `name |`, to `echo`."""

  def __init__(self, name: str, command: list[str], workdir: str, echo: Callable[[str], None]):
    self.name, self.command, self.workdir, self.echo = name, command, workdir, echo
    self.proc: subprocess.Popen | None = None
    self.code: int | None = None
    self.killed = False  # by the launcher on purpose (a fault drill)
    self._pump: threading.Thread | None = None

  def start(self, env: dict) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    self.killed, self.code = False, None
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


def parse_drill(flag: str, values: Sequence[str], kind: type, who: str, count: int | None = None) -> dict[int, float]:
  """Fault-drill flags, `["K@X", ...]` -> {K: X} with K in [0, count) (any K >= 0 without `count`);
  one ConfigError line naming `flag` for a malformed item."""
  out = {}
  for item in values:
    name, sep, at = item.partition("@")
    try:
      k, x = int(name), kind(at)
    except ValueError:
      k, x, sep = -1, 0, ""
    if not sep or k < 0 or (count is not None and k >= count) or x < 0:
      where = f" with {who} in [0, {count})" if count is not None else ""
      raise ConfigError(f"{flag} {item!r}: must be {who}@{kind.__name__.upper()}{where}")
    out[k] = x
  return out


def last_step(workdir: str) -> int:
  """The step of the last row of `<workdir>/metrics.jsonl` (0 if none)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return 0
