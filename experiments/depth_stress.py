"""Depth stress (the mHC paper's Fig. 2 / 3 question, at small scale): plain vs HC vs mHC at
one width and 12, 24, 48 and 96 sub-block layers (6 to 48 blocks), at the stable learning
rate and at one above it.

Does HC's composite gain (the paper's forward and backward gains of prod H_res, logged as
`residual/forward_gain` / `residual/backward_gain` at every validation) grow with depth and
training time, and does mHC keep it near 1? The runs count loss spikes and gradient-norm
spikes (`manifold.sweep.spikes`) with the loss-spike and parameter-norm stops off, so an
unstable run keeps going; a non-finite loss still stops it (the table says "diverged").
At the stable rate every run has 3 seeds, so `by_variant.md` can tell final-loss differences
from seed noise; at the high rate one (the gains and spikes are the question there).

  manifold sweep --config experiments/depth_stress.py:scale=gpu --workers 7 --workdir runs/depth_stress \\
      --results experiments/results/depth_stress_gpu

Arguments (`:key=value,...`): residual (plain | hc | mhc), layers (sub-block layers: 12, 24,
48, 96), lr (stable | high: 3e-3 | 1e-2), seed, scale: `gpu` (width 128, 400 steps of
32 x 256 bytes: 3.3M tokens a run) or `cpu` (width 64, 150 steps of 8 x 128 bytes; a
smoke-sized version).

The layers are unrolled, so compilation grows with depth and sets the `gpu` scale's time: on
an H100 with 4 workers its twelve 96-layer runs took 26 minutes, each compiling in about 50 s
(plain), 130 s (HC) and 420 s (mHC) against 22 to 107 s of training (results/depth_stress_gpu,
at 5fa39d9; mHC's Sinkhorn backward has since compiled about 4x faster: kernels/mhc/README.md).
A 96-layer HC run peaked at 17.6 GB resident on the CPU (3 steps), so give an H200 `--workers 7`
(each takes 1/7 of 90% of its memory, 17.9 GB), an H100 4.
"""

import os

from manifold.config import ConfigError, experiment_module, parse_arg

LEARNING_RATES = {"stable": 3e-3, "high": 1e-2}
DEFAULTS = dict(residual="plain", layers=24, lr="stable", seed=0, scale="gpu")
DEPTHS = (12, 24, 48, 96)  # sub-block layers the sweep runs, at either scale
SEEDS = {"stable": (0, 1, 2), "high": (0,)}  # per learning rate; seed 0 is the default, unnamed
BASELINE = "residual=plain"  # by_variant.md's gaps: to plain at the same depth, rate and seed
SCALES = {"gpu": (128, 4, 400, 32, 256), "cpu": (64, 4, 150, 8, 128)}  # width, heads, steps, batch, sequence


def _components():
  """experiments/hc_components.py: the studies' one model and run definition."""
  return experiment_module(os.path.join(os.path.dirname(__file__), "hc_components.py"))


def _scale(args):
  if args.scale not in SCALES:
    raise ConfigError(f"experiments/depth_stress.py: scale={args.scale!r}; use one of {', '.join(SCALES)}")
  return SCALES[args.scale]


def get_config(arg: str | None = None):
  args = parse_arg(arg, **DEFAULTS)
  if args.lr not in LEARNING_RATES:
    raise ConfigError(f"experiments/depth_stress.py: lr={args.lr!r}; use one of {', '.join(LEARNING_RATES)}")
  if args.layers % 2:
    raise ConfigError(f"experiments/depth_stress.py: layers={args.layers}; sub-block layers come in pairs per block")
  width, heads, steps, batch, length = _scale(args)
  c = _components().study_config(
    residual=args.residual,
    seed=args.seed,
    layers=args.layers // 2,
    width=width,
    heads=heads,
    steps=steps,
    batch=batch,
    length=length,
    learning_rate=LEARNING_RATES[args.lr],
  )
  c.train.update(spike_factor=0.0, param_norm_factor=0.0, eval_every=steps // 10)  # count spikes, keep going
  return c


def get_sweep(arg: str | None = None):
  """Every depth x residual, at the stable and the high learning rate, with each of the rate's
  SEEDS (`arg`: the sweep's common arguments, checked here)."""
  _scale(parse_arg(arg, **DEFAULTS))
  return [
    f"residual={residual},layers={layers},lr={lr}" + (f",seed={seed}" if seed else "")
    for lr in LEARNING_RATES
    for seed in SEEDS[lr]
    for layers in DEPTHS
    for residual in ("plain", "hc", "mhc")
  ]
