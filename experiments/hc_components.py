"""The mHC paper's component ablation (its Table 1), for HC and for mHC, at equal tokens.

Each of H_res, H_pre and H_post is either learned or fixed to the paper's stand-in (H_pre
1/n for every stream, H_post 1, H_res the identity; `model.hc_mappings`). The sweep trains
plain, and HC and mHC with only H_res learned, only H_pre and H_post, and all three, each
with 3 seeds; `manifold sweep` writes every run and `by_variant.md`, the mean and spread
of the final validation loss over seeds and of its gap to plain at the same seed.

  manifold sweep --config experiments/hc_components.py --workdir runs/hc_components \\
      --results experiments/results/hc_components
  manifold train --config experiments/hc_components.py:residual=mhc,mappings=res,seed=1 --workdir runs/x

Arguments (`:key=value,...`): residual (plain | hc | mhc), mappings (res | pre+post | all),
seed, scale: `cpu` (4 layers x 64 wide, 300 steps of 16 x 128 bytes: 0.6M tokens, about a
minute a run on 2 cores) or `gpu` (6 layers x 128 wide, 2,000 steps of 64 x 256 bytes:
32.8M tokens, experiments/residual_ablation.py's model).
"""

from manifold.config import ConfigError, base_config, parse_arg, schedule

MAPPINGS = {"res": "res", "pre+post": "pre,post", "all": "pre,post,res"}
SCALES = {  # layers, width, heads, steps, batch, sequence
  "cpu": (4, 64, 4, 300, 16, 128),
  "gpu": (6, 128, 4, 2000, 64, 256),
}
SEEDS = (0, 1, 2)
BASELINE = "residual=plain"  # by_variant.md's gaps are to this variant's run of the same seed


def study_config(*, residual, layers, width, heads, steps, batch, length, seed=0, learning_rate=3e-3, mappings="all"):
  """The byte-level dense model and run of every study of the mHC paper's ablations
  (this file's, experiments/depth_stress.py's and experiments/mhc_scaling.py's): `layers`
  blocks of `width` with `heads` heads, a SwiGLU of 3 x width, `steps` steps of `batch` x
  `length` bytes, warm-up a tenth of the steps, six validations."""
  c = base_config()
  c.model.update(
    d_model=width,
    n_layers=layers,
    n_heads=heads,
    n_kv_heads=heads,
    head_dim=width // heads,
    d_ff=3 * width,
    max_seq_len=length,
    residual=residual,
    hc_mappings=MAPPINGS[mappings],
  )
  c.train.update(
    seed=seed,
    batch_size=batch,
    seq_len=length,
    learning_rate=learning_rate,
    log_every=10,
    **schedule(steps, checkpoints=2),
  )
  c.eval.update(batch_size=16, num_batches=8)
  c.sample.max_new_tokens = 0
  return c


def get_config(arg: str | None = None):
  args = parse_arg(arg, residual="plain", mappings="all", seed=0, scale="cpu")
  if args.mappings not in MAPPINGS:
    raise ConfigError(f"experiments/hc_components.py: mappings={args.mappings!r}; use one of {', '.join(MAPPINGS)}")
  if args.scale not in SCALES:
    raise ConfigError(f"experiments/hc_components.py: scale={args.scale!r}; use one of {', '.join(SCALES)}")
  layers, width, heads, steps, batch, length = SCALES[args.scale]
  return study_config(
    residual=args.residual,
    mappings=args.mappings,
    seed=args.seed,
    layers=layers,
    width=width,
    heads=heads,
    steps=steps,
    batch=batch,
    length=length,
  )


def get_sweep():
  """Plain, then HC and mHC with each set of learned mappings; every one with each seed."""
  variants = ["residual=plain"] + [
    f"residual={residual},mappings={mappings}" for residual in ("hc", "mhc") for mappings in MAPPINGS
  ]
  return [f"{variant},seed={seed}" for seed in SEEDS for variant in variants]
