"""A small scaling curve (the mHC paper's Fig. 6a question): plain vs HC vs mHC at three sizes,
each trained on the same multiple of its parameter count in tokens, so the relative loss
advantage of mHC over plain can be read across sizes.

  manifold sweep --config experiments/mhc_scaling.py:scale=gpu --workers 14 --workdir runs/mhc_scaling \\
      --results experiments/results/mhc_scaling_gpu

The sweep runs every size x residual with 3 seeds; `by_variant.md` gives each variant's mean
and spread over the seeds of the final loss and of its gap to plain at the same size and seed.

Arguments (`:key=value,...`): size (s | m | l), residual (plain | hc | mhc), seed, scale:
`gpu` (blocks x width 3 x 128, 4 x 192, 5 x 256: 0.68M, 1.98M, 4.34M parameters without the
embedding, batch 64 x 256 bytes; 416 to 2,652 steps, about 38,500 for the sweep) or `cpu`
(2 x 32, 3 x 48, 4 x 64; batch 16 x 128). Steps give TOKENS_PER_PARAMETER tokens per parameter
of the plain model of the size (`manifold params`' count without the embedding); HC and mHC
train on the same tokens. At a fixed ratio the cost grows with the square of the size. The
`gpu` sweep took about 12 minutes on an H100 with `--workers 7` (results/mhc_scaling_gpu). The
largest mHC run peaked at 6.3 GB resident on the CPU (3 steps), so an H200 takes 14 workers
(each 1/14 of 90% of its memory, 8.9 GB), an H100 7.
"""

import math
import os

from manifold.config import ConfigError, experiment_module, model_config, parse_arg

TOKENS_PER_PARAMETER = 10
SCALES = {  # size -> (blocks, width, heads); batch, sequence
  "gpu": ({"s": (3, 128, 2), "m": (4, 192, 3), "l": (5, 256, 4)}, 64, 256),
  "cpu": ({"s": (2, 32, 2), "m": (3, 48, 3), "l": (4, 64, 4)}, 16, 128),
}
DEFAULTS = dict(size="s", residual="plain", seed=0, scale="gpu")
SEEDS = (0, 1, 2)
BASELINE = "residual=plain"  # by_variant.md's gaps: to plain at the same size and seed


def _components():
  """experiments/hc_components.py: the studies' one model and run definition."""
  return experiment_module(os.path.join(os.path.dirname(__file__), "hc_components.py"))


def get_config(arg: str | None = None):
  from manifold.model.accounting import count_params

  args = parse_arg(arg, **DEFAULTS)
  if args.scale not in SCALES:
    raise ConfigError(f"experiments/mhc_scaling.py: scale={args.scale!r}; use one of {', '.join(SCALES)}")
  sizes, batch, length = SCALES[args.scale]
  if args.size not in sizes:
    raise ConfigError(f"experiments/mhc_scaling.py: size={args.size!r}; use one of {', '.join(sizes)}")
  layers, width, heads = sizes[args.size]
  study = _components().study_config
  shape = dict(seed=args.seed, layers=layers, width=width, heads=heads, batch=batch, length=length)
  plain = count_params(model_config(study(residual="plain", steps=100, **shape)))["non_embedding"]
  return study(residual=args.residual, steps=math.ceil(TOKENS_PER_PARAMETER * plain / (batch * length)), **shape)


def get_sweep():
  """Every size x residual, with each seed."""
  return [
    f"size={size},residual={residual},seed={seed}"
    for seed in SEEDS
    for size in ("s", "m", "l")
    for residual in ("plain", "hc", "mhc")
  ]
