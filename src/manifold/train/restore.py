"""Loads a trained run back from its directory: config, data, newest checkpoint."""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

from manifold import files
from manifold.config import ConfigError, config_from_json, model_config, validate
from manifold.data import Data, check_manifest
from manifold.model import Transformer
from manifold.parallel.mesh import islands_of, make_mesh
from manifold.train.checkpoint import Checkpointer, UnreadableCheckpoint
from manifold.train.optimizer import make_optimizer
from manifold.train.run import load_run_data
from manifold.train.state import StateSpec, TrainState, make_state_spec


@dataclasses.dataclass
class TrainedRun:
  cfg: object  # ConfigDict
  spec: StateSpec
  state: TrainState
  data: Data | None  # None when loaded with data=False
  step: int

  @property
  def model(self) -> Transformer:
    return self.spec.merge(self.state.params, self.state.extra)


def _warn(text: str) -> None:
  print(f"manifold: warning: {text}", file=sys.stderr)


def read_run_config(workdir: str):
  """The run's config (`workdir`/config.json); one ConfigError line if there is none."""
  text = files.read_text(files.path(workdir) / "config.json")
  if text is None:
    raise ConfigError(f"--workdir {workdir}: no config.json; train there first with `manifold train`")
  return config_from_json(text)


def load_trained(
  workdir: str, step: int | None = None, *, data: bool = True, say: Callable[[str], None] = _warn
) -> TrainedRun:
  """The run in `workdir` at checkpoint `step`, or the newest that restores (each newer one
  that does not is skipped, and left in place, with one line through `say`); `data=False`
  skips building its tokenizer and token streams, which must otherwise match the run's
  manifest. The state is sharded over the run's mesh where it fits the devices here, else
  data-parallel over them."""
  cfg = read_run_config(workdir)
  run_data = None
  if data:
    run_data = load_run_data(cfg)
    check_manifest(files.path(workdir) / "manifest.json", run_data.tokenizer)
  try:
    mesh = make_mesh(cfg.mesh)
  except ConfigError:  # trained on another topology: spread the restored state over the devices here
    mesh = make_mesh(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  if islands_of(cfg.mesh) > 1:  # DiLoCo islands in one job: the whole island state; `state.params` are global
    from manifold.islands.mesh import make_island_spec

    islands = islands_of(cfg.mesh)
    spec = make_island_spec(model_config(cfg), make_optimizer(cfg.train), mesh, validate(cfg).islands, islands)
  else:
    spec = make_state_spec(model_config(cfg), make_optimizer(cfg.train), mesh)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, create=False)
  try:
    if step is None:
      restored = checkpointer.restore_newest(spec.abstract)
      if restored is None:
        raise ConfigError(f"--workdir {workdir}: no checkpoint yet; train longer than train.checkpoint_every steps")
      for skipped, why in restored.skipped.items():
        say(f"checkpoint {skipped} does not restore ({why}); skipped it (left in place), using step {restored.step}")
      step, state = restored.step, restored.state
    elif step not in checkpointer.steps():
      steps = ", ".join(map(str, checkpointer.steps())) or "none"
      raise ConfigError(f"--step {step}: no such checkpoint in {checkpointer.directory} (it has: {steps})")
    else:
      try:
        state, _ = checkpointer.restore(step, spec.abstract)
      except UnreadableCheckpoint as e:
        raise ConfigError(
          f"--step {step}: {e}; pick another step, or omit --step for the newest that restores"
        ) from None
  finally:
    checkpointer.close()
  return TrainedRun(cfg=cfg, spec=spec, state=state, data=run_data, step=step)
