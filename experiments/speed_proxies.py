"""Proxy models for measuring training speed on one GPU (benchmarks/train_step.py).

  python benchmarks/train_step.py                      # all four on this machine's GPU
  manifold train --config experiments/speed_proxies.py:moe-1b-active,residual=mhc --workdir ...

Arguments (`:key=value,...`): model (dense-1b | moe-1b-active | moe-27b-layers), residual
(plain | mhc), batch (sequences per step; 0: the model's default below).

  dense-1b       1.04B parameters: 20 blocks x 2048, GQA 16 query / 4 KV heads of 128,
                 SwiGLU 5632, vocabulary 32,768 (Llama-style).
  moe-1b-active  DeepSeek-V3-style, 2.87B parameters of which 0.94B active per token:
                 14 blocks x 2048, MLA (16 heads, KV rank 512, no query compression,
                 128 + 64 query/key and 128 value widths), the first block dense (SwiGLU
                 7168), then DeepSeekMoE with 2 shared + 32 routed experts of width 896,
                 6 routed per token, sigmoid routing scaled by 2.5, one MTP module.
  moe-27b-layers 4.05B parameters of which 0.80B active: the mHC paper's 27B model
                 (experiments/mhc_paper.py:27b) cut to 5 of its blocks (more with
                 --config.model.n_layers): width 2560, MLA with 32 heads (KV rank 512,
                 128 + 64 / 128), 2 shared + 72 routed experts of 1536, 6 active, the first
                 block dense; the paper's norm epsilon, init and mHC settings; vocabulary
                 32,768 as above; no rematerialisation (the overhead on the paper's layer).

Both: sequence 4,096, bfloat16 compute with float32 parameters and AdamW state;
`residual=mhc` adds mHC with n = 4 streams.
"""

import os

from manifold.config import ConfigError, base_config, load_config, parse_arg

MODELS = ("dense-1b", "moe-1b-active", "moe-27b-layers")
DEFAULT_BATCH = {"dense-1b": 8, "moe-1b-active": 4, "moe-27b-layers": 4}  # sequences of 4,096 per step
PAPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mhc_paper.py")
PAPER_LAYER = (  # the fields of experiments/mhc_paper.py's model that make its layer
  "d_model", "n_heads", "n_kv_heads", "norm_eps", "init_std", "attention", "q_lora_rank", "kv_lora_rank",
  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn", "d_ff", "n_routed_experts", "n_shared_experts",
  "experts_per_token", "moe_d_ff", "n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace",
  "mtp_depth", "mhc_sinkhorn", "sinkhorn_iters", "mhc_alpha_init", "hc_scale_init",
)  # fmt: skip


def get_config(arg: str | None = None):
  args = parse_arg(arg, model="dense-1b", residual="plain", batch=0)
  if args.model not in MODELS:
    raise ConfigError(f"experiments/speed_proxies.py: model={args.model!r}; use one of {', '.join(MODELS)}")
  if args.residual not in ("plain", "mhc"):
    raise ConfigError(f"experiments/speed_proxies.py: residual={args.residual!r}; use plain or mhc")
  c = base_config()
  c.model.update(
    vocab_size=32_768,
    d_model=2048,
    n_heads=16,
    max_seq_len=4096,
    rope_theta=10_000.0,
    dtype="bfloat16",
    residual=args.residual,
    streams=4,
  )
  if args.model == "dense-1b":
    c.model.update(n_layers=20, n_kv_heads=4, head_dim=128, d_ff=5632)
  elif args.model == "moe-27b-layers":
    paper = load_config(f"{PAPER}:27b,residual={args.residual}").model
    c.model.update({name: paper[name] for name in PAPER_LAYER}, n_layers=5)
  else:
    c.model.update(
      n_layers=14,
      n_kv_heads=16,
      attention="mla",
      q_lora_rank=0,
      kv_lora_rank=512,
      qk_nope_head_dim=128,
      qk_rope_head_dim=64,
      v_head_dim=128,
      ffn="moe",
      d_ff=8 * 896,
      n_routed_experts=32,
      n_shared_experts=2,
      experts_per_token=6,
      moe_d_ff=896,
      routed_scaling_factor=2.5,
      first_k_dense_replace=1,
      mtp_depth=1,
    )
  c.train.update(
    batch_size=args.batch or DEFAULT_BATCH[args.model],
    seq_len=4096,
    steps=1000,
    warmup_steps=100,
    learning_rate=3e-4,
    log_every=10,
    eval_every=500,
    checkpoint_every=500,
  )
  c.eval.update(batch_size=args.batch or DEFAULT_BATCH[args.model], num_batches=2)
  c.sample.max_new_tokens = 0
  return c
