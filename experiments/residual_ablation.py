"""Residual-stream ablation: plain vs HC vs mHC vs mHC-lite (n = 4) at equal tokens.

A 6-layer, 128-wide byte-level model on the standard-library corpus; each run takes a
few minutes on 2 CPU cores.

  manifold sweep --config experiments/residual_ablation.py --workdir runs/residual_ablation \\
      --results experiments/results/residual_ablation
  manifold train --config experiments/residual_ablation.py:residual=mhc --workdir runs/mhc

Arguments (`:key=value,...`): residual (plain | hc | mhc | mhc_lite), streams, steps.
"""

from manifold.config import base_config, parse_arg, schedule


def get_config(arg: str | None = None):
  args = parse_arg(arg, residual="plain", streams=4, steps=600)
  c = base_config()
  c.model.update(
    d_model=128,
    n_layers=6,
    n_heads=4,
    n_kv_heads=4,
    head_dim=32,
    d_ff=384,
    max_seq_len=256,
    residual=args.residual,
    streams=args.streams,
  )
  c.train.update(batch_size=16, seq_len=256, learning_rate=3e-3, log_every=10, **schedule(args.steps))
  c.eval.update(batch_size=16, num_batches=8)
  c.sample.max_new_tokens = 0
  return c


def get_sweep():
  """The runs of `manifold sweep`: one config argument each."""
  return [f"residual={r}" for r in ("plain", "hc", "mhc", "mhc_lite")]
