"""Run as a script with 8 simulated devices: re-save a 1-device run's checkpoint from 8 devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/resharded_save.py SRC STEP OUT

Restores checkpoint STEP of the run in SRC with its parameters sharded 8 ways (fsdp = 8), saves
it into OUT through a Checkpointer that signs manifests, and prints one JSON object: how many
parameter tensors were split over the 8 devices.
"""

from __future__ import annotations

import json
import shutil
import sys

import jax

from manifold.config import config_from_json, model_config
from manifold.parallel.mesh import make_mesh
from manifold.provenance.lineage import Lineage
from manifold.store import Identity
from manifold.train.checkpoint import Checkpointer
from manifold.train.optimizer import make_optimizer
from manifold.train.state import make_state_spec


def main(src: str, step: int, out: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  cfg = config_from_json(open(f"{src}/config.json").read())
  mesh = make_mesh(dict(data=1, fsdp=8, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  spec = make_state_spec(model_config(cfg), make_optimizer(cfg.train), mesh)
  reader = Checkpointer(src, keep=3, create=False)
  state, data = reader.restore(step, spec.abstract)
  reader.close()
  split = sum(len({str(s.index) for s in x.addressable_shards}) > 1 for x in jax.tree.leaves(state.params))
  shutil.copy(f"{src}/config.json", f"{out}/config.json")
  lineage = Lineage(out, Identity.generate(), origin={"kind": "init", "seed": 0}, say=print)
  writer = Checkpointer(out, keep=3, lineage=lineage)
  writer.save(step, state, data)
  writer.close()
  print(json.dumps({"split": split}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
