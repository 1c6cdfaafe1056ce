"""AdamW's moments stored in float32 (the default) or bfloat16 (`train.moments_dtype`) on the
quickstart model and corpus, 3 seeds: what halving the optimizer state's memory and traffic
costs in loss. The speed side is in benchmarks/README.md (the paper's 27B layer on one H200:
-4.1% step time, 75.6 -> 60.5 GiB peak).

  manifold sweep --config experiments/moments_dtype.py --workdir runs/moments_dtype \\
      --results experiments/results/moments_dtype

Arguments (`:key=value,...`): moments (float32 | bfloat16), seed.
"""

import os

from manifold.config import experiment_module, parse_arg

DEFAULTS = dict(moments="float32", seed=0)
SEEDS = (0, 1, 2)
BASELINE = "moments=float32"  # by_variant.md's gaps: to float32 moments at the same seed


def get_config(arg: str | None = None):
  args = parse_arg(arg, **DEFAULTS)
  c = experiment_module(os.path.join(os.path.dirname(__file__), "quickstart.py")).get_config()
  c.train.update(moments_dtype=args.moments, seed=args.seed)
  return c


def get_sweep():
  """Both dtypes, with each seed."""
  return [f"moments={moments},seed={seed}" for seed in SEEDS for moments in ("float32", "bfloat16")]
