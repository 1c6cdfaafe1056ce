"""Loads a trained run back from its directory: config, data, newest checkpoint."""

from __future__ import annotations

import dataclasses
import os

from manifold.config import ConfigError, config_from_json, model_config
from manifold.data import Data
from manifold.model import Transformer
from manifold.parallel.mesh import make_mesh
from manifold.train.checkpoint import Checkpointer
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


def load_trained(workdir: str, step: int | None = None, *, data: bool = True) -> TrainedRun:
  """The run in `workdir` at checkpoint `step` (default: the newest); `data=False` skips
  building its tokenizer and token streams. The state is sharded over the run's mesh
  where it fits the devices here, else data-parallel over them."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"--workdir {workdir}: no config.json; train there first with `manifold train`")
  with open(config_path) as f:
    cfg = config_from_json(f.read())
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint yet; train longer than train.checkpoint_every steps")
  try:
    mesh = make_mesh(cfg.mesh)
  except ConfigError:  # trained on another topology: spread the restored state over the devices here
    mesh = make_mesh(dict(data=-1, fsdp=1, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  spec = make_state_spec(model_config(cfg), make_optimizer(cfg.train), mesh)
  try:
    state, _ = checkpointer.restore(step, spec.abstract)
  except FileNotFoundError:
    raise ConfigError(f"--step {step}: no such checkpoint in {checkpointer.directory}") from None
  finally:
    checkpointer.close()
  return TrainedRun(cfg=cfg, spec=spec, state=state, data=load_run_data(cfg) if data else None, step=step)
