"""The main job: a small DeepSeek-V3-style byte-level model on the Python standard library.

  manifold train --config experiments/quickstart.py --workdir runs/quickstart
  manifold train --config experiments/quickstart.py:tiny --workdir /tmp/tiny

Variants (`:arg`):
  default  a small DeepSeek-V3-style model: 4 blocks x 128 wide, Multi-head Latent
           Attention, DeepSeekMoE (8 routed experts of width 96, 2 per token, 1 shared;
           the first block dense), one MTP module, and mHC with n = 4 streams;
           128-byte context, 360 steps of 16 sequences (README.md, "The main job", gives
           its measured wall time and why these sizes).
  tiny     a seconds-long smoke run (used by the tests and the notebook checks).
"""

from manifold.config import ConfigError, base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, variant="default")
  c = base_config()
  if args.variant == "default":
    c.model.update(
      d_model=128,
      n_layers=4,
      n_heads=4,
      n_kv_heads=4,
      attention="mla",
      kv_lora_rank=64,
      qk_nope_head_dim=32,
      qk_rope_head_dim=16,
      v_head_dim=32,
      ffn="moe",
      n_routed_experts=8,
      experts_per_token=2,
      n_shared_experts=1,
      moe_d_ff=96,
      d_ff=384,
      first_k_dense_replace=1,
      mtp_depth=1,
      residual="mhc",
      streams=4,
      max_seq_len=128,
    )
    c.train.update(steps=360, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=20)
    c.train.update(eval_every=120, checkpoint_every=120)
    c.sample.max_new_tokens = 120
  elif args.variant == "tiny":
    c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)
    c.train.update(steps=20, batch_size=8, seq_len=64, warmup_steps=2, log_every=5, eval_every=10, checkpoint_every=10)
    c.eval.update(batch_size=8, num_batches=2)
    c.sample.max_new_tokens = 16
  else:
    raise ConfigError(f"experiments/quickstart.py: unknown variant {args.variant!r}; use default or tiny")
  return c
