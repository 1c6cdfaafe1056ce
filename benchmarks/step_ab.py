"""Training-step time of several variants of one config, interleaved so that they share the machine's state.

  python benchmarks/step_ab.py --config experiments/quickstart.py \\
      "model.attention_impl=xla model.grouped_matmul_impl=xla train.seq_len=256" ""

Each argument is one variant: space-separated `section.field=value` overrides of the config
("" is the config as it is). All variants are compiled first; then `--rounds` rounds each run
two steps of every variant in turn (the first round is warm-up). A shared CPU or a host whose
speed drifts slows every variant alike, so the ratios to the first variant hold where the
absolute times do not. Prints the median step time of each variant and its ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def build(config: str, overrides: list[str]):
  """The compiled training step of `config` with `overrides`, its initial state and one random batch."""
  import jax
  import jax.numpy as jnp

  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.parallel.mesh import make_mesh
  from manifold.parallel.sharding import batch_sharding
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec
  from manifold.train.step import make_train_step

  cfg = load_config(config, [f"--config.{o}" for o in overrides])
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  model_cfg, tx = ModelConfig.from_mapping(cfg.model), make_optimizer(cfg.train)
  spec = make_state_spec(model_cfg, tx, mesh)
  state = spec.init(jax.random.key(0))
  step = make_train_step(spec, tx, mesh, jnp.ones(model_cfg.vocab_size, jnp.float32), cfg.train)
  shape = (cfg.train.batch_size, cfg.train.seq_len + 1)
  batch = jax.device_put(jax.random.randint(jax.random.key(1), shape, 0, model_cfg.vocab_size), batch_sharding(mesh))
  return step.lower(state, batch).compile(), state, batch


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/quickstart.py")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("variants", nargs="+", help='space-separated overrides per variant; "" for the config itself')
  args = parser.parse_args()
  import jax

  runs = [list(build(args.config, variant.split())) for variant in args.variants]
  times = [[] for _ in runs]
  for round_ in range(args.rounds):
    for run, spent in zip(runs, times):
      compiled, state, batch = run
      for _ in range(2):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if round_:
          spent.append(time.perf_counter() - start)
      run[1] = state  # donated: carry it on
  first = statistics.median(times[0])
  for variant, spent in zip(args.variants, times):
    print(
      f"{variant or '(the config)':72s} {statistics.median(spent):7.3f} s/step  x{statistics.median(spent) / first:.3f}"
    )


if __name__ == "__main__":
  main()
