"""What signing a checkpoint costs: a save with and without its manifest, per model.

  python benchmarks/provenance.py                                  # quickstart's default model
  python benchmarks/provenance.py --config experiments/speed_proxies.py:model=dense-1b

For each config: a freshly initialised train state (random AdamW moments) is saved twice into a temporary run
directory, once by a plain `Checkpointer` and once by one with a `Lineage` (tensor hashes of
the state in memory, blake3 of every checkpoint file, the signed manifest, its ledger entry).
Prints one row per config: parameters, checkpoint bytes, the plain save's seconds, the
provenance seconds on top of it (hashing the state in memory; hashing the files and signing),
and their ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from manifold.results import markdown_table


def measure(config: str) -> dict:
  import jax
  import jax.numpy as jnp

  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.model.accounting import count_params
  from manifold.parallel.mesh import make_mesh
  from manifold.provenance.lineage import Lineage
  from manifold.store import Identity
  from manifold.train.checkpoint import Checkpointer
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec

  cfg = load_config(config, [])
  model_cfg = ModelConfig.from_mapping(cfg.model)
  spec = make_state_spec(model_cfg, make_optimizer(cfg.train), make_mesh(cfg.mesh))
  state = spec.init(jax.random.key(0))
  noise = jax.jit(  # AdamW moments as after training (fresh zeros would compress and hash unrealistically fast)
    lambda s: s.replace(opt_state=jax.tree.map(lambda x: x + 1e-3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)
                                               if jnp.issubdtype(x.dtype, jnp.floating) else x, s.opt_state)),
    donate_argnums=0,
  )  # fmt: skip
  state = jax.block_until_ready(noise(state))
  root = tempfile.mkdtemp(prefix="provenance-bench-")
  try:
    with open(os.path.join(root, "config.json"), "w") as f:
      f.write(cfg.to_json(indent=2))
    plain = Checkpointer(root, keep=4)
    began = time.perf_counter()
    plain.save(1, state, {"position": 0})
    plain.wait()
    save_s = time.perf_counter() - began
    plain.close()
    lineage = Lineage(root, Identity.generate(), origin={"kind": "init", "seed": 0}, say=lambda _: None)
    signed = Checkpointer(root, keep=4, lineage=lineage)
    signed.save(2, state, {"position": 0})
    signed.close()
    size = sum(
      os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(os.path.join(root, "checkpoints", "2")) for n in ns
    )
  finally:
    shutil.rmtree(root)
  return {
    "config": config.split("/")[-1],
    "params": f"{count_params(model_cfg)['total'] / 1e6:.1f}M",
    "checkpoint GB": f"{size / 1e9:.3f}",
    "save s": f"{save_s:.2f}",
    "hash state s": f"{lineage.tensor_s:.2f}",
    "hash files + sign s": f"{lineage.file_s:.2f}",
    "provenance / save": f"{(lineage.tensor_s + lineage.file_s) / save_s:.2f}",
    "device": jax.devices()[0].device_kind,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append", help="config path[:arg]; repeatable (default: quickstart)")
  args = parser.parse_args()
  rows = [measure(c) for c in args.config or ["experiments/quickstart.py"]]
  print(markdown_table(rows, [(k, lambda r, k=k: r[k]) for k in rows[0]]))


if __name__ == "__main__":
  main()
