"""Orbax checkpoints of the train state and the data iterator, with keep-N, resume, and
falling back past checkpoints that do not restore."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from manifold import files
from manifold.config import ConfigError
from manifold.train.state import TrainState

UNREADABLE = "checkpoints_unreadable"  # beside checkpoints/: where a run sets aside the ones that do not restore


class UnreadableCheckpoint(ConfigError):
  """A checkpoint's files are missing, truncated or torn; the message says which and why."""


@dataclasses.dataclass
class Restored:
  step: int
  state: TrainState
  data: dict[str, Any]  # the data iterator's position
  skipped: dict[int, str]  # newer steps that did not restore -> why


class Checkpointer:
  """Saves `{state, data}` under `<workdir>/checkpoints/<step>/`.

  Saves are asynchronous; orbax finalises a step directory only once every
  array is written, so a crash mid-save never replaces the last complete one.
  `create=False` (eval, generate, and a run before its checks have passed) leaves a missing
  directory missing; only `save` removes old checkpoints.

  With a `lineage` (`manifold.provenance.lineage`), each save hashes the state it saves, and once
  its files are complete (at the next save, `wait` or `close`) signs its manifest.
  """

  def __init__(self, workdir: str, *, keep: int, create: bool = True, lineage=None):
    self.workdir = files.path(workdir)  # a local path made absolute, or a gs:// URL as it is
    self.keep, self.lineage = keep, lineage
    self.directory = self.workdir / "checkpoints"
    self._manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """Every checkpointed step, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    if self.lineage is not None:
      self.wait()  # orbax finishes the previous save before it starts this one anyway
      self.lineage.begin(step, state, data_state)
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
      force=True,
    )

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); raises
    `UnreadableCheckpoint` (one line) when the step's files do not restore on every process."""
    restored, why = self._attempt(step, abstract_state)
    if why:
      raise UnreadableCheckpoint(f"checkpoint {step} in {self.directory} does not restore: {why}")
    return restored.state, restored.data

  def restore_newest(self, abstract_state: TrainState) -> Restored | None:
    """The newest checkpoint that restores (None when there are none). Newer ones that do not
    are left where they are and listed in `skipped`; when none restores, `UnreadableCheckpoint`."""
    skipped = {}
    for step in reversed(self.steps()):
      restored, why = self._attempt(step, abstract_state)
      if not why:
        return Restored(step, restored.state, restored.data, skipped)
      skipped[step] = why
    if not skipped:
      return None
    reasons = "; ".join(f"step {s}: {why}" for s, why in skipped.items())
    raise UnreadableCheckpoint(
      f"no checkpoint in {self.directory} restores ({reasons}); move them aside to train from scratch, "
      "or use a new --workdir"
    )

  def _attempt(self, step: int, abstract_state: TrainState) -> tuple[Any, str]:
    """(the restored items, "") or (None, why not), agreed by every process."""
    restored, why = None, ""
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
      )
    except (MemoryError, jax.errors.JaxRuntimeError):  # the device, not the files
      raise
    except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds for damaged files
      why = _one_line(e)
    if not _on_every_process(not why):
      return None, why or "it did not restore on another process"
    return restored, ""

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` (one that does not restore) unchanged to
    `<workdir>/checkpoints_unreadable/<step>[.n]`, out of keep-N's sight; returns where."""
    names = itertools.chain([str(step)], (f"{step}.{n}" for n in itertools.count(1)))  # set aside before: .1, .2
    target = next(p for p in (self.workdir / UNREADABLE / name for name in names) if not p.exists())
    if jax.process_index() == 0:
      files.move(self.directory / str(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"manifold: set aside checkpoint {step}")
    self._manager.reload()
    if self.lineage is not None:
      self.lineage.retire(step, f"it does not restore; set aside to {target}")
    return str(target)

  def wait(self) -> None:
    """Blocks until the pending save is complete (and its manifest signed)."""
    self._manager.wait_until_finished()
    if self.lineage is not None and self.lineage.pending is not None:
      self.lineage.finish(self.keep)

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _on_every_process(ok: bool) -> bool:
  """`ok` and-ed over the processes of the job, so they all pick the same checkpoint."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _one_line(error: BaseException, limit: int = 240) -> str:
  """The innermost cause's type and first line, at most `limit` characters."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines() or [""]
  text = f"{type(error).__name__}: {' '.join(lines[0].split())}"
  return text if len(text) <= limit else text[: limit - 3] + "..."
