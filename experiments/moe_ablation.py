"""DeepSeekMoE ablation at equal active parameters: dense vs MoE, auxiliary-loss-free vs
auxiliary-loss balancing, and MTP on / off.

A 6-layer, 128-wide byte-level model with MLA; the MoE has 16 routed experts of width 64
(4 per token) and 2 shared experts, so each token passes through 6 x 64 = 384 expert
channels, the dense FFN's width. The first block stays dense in every variant.

  manifold sweep --config experiments/moe_ablation.py --workdir runs/moe_ablation \\
      --results experiments/results/moe_ablation

Arguments (`:key=value,...`): ffn (dense | moe), balance (aux_free | aux_loss), mtp (0 | 1), steps.
  aux_free: router biases move by 1e-3 per step, sequence-wise balance loss weight 1e-4 (DeepSeek-V3).
  aux_loss: no bias updates, balance loss weight 1e-2 (a conventional auxiliary loss).
"""

from manifold.config import ConfigError, base_config, parse_arg, schedule


def get_config(arg: str | None = None):
  args = parse_arg(arg, ffn="moe", balance="aux_free", mtp=0, steps=600)
  if args.balance not in ("aux_free", "aux_loss"):
    raise ConfigError(f"experiments/moe_ablation.py: balance={args.balance!r}; use aux_free or aux_loss")
  c = base_config()
  c.model.update(
    d_model=128,
    n_layers=6,
    n_heads=4,
    max_seq_len=256,
    attention="mla",
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    d_ff=384,
    ffn=args.ffn,
    n_routed_experts=16,
    experts_per_token=4,
    n_shared_experts=2,
    moe_d_ff=64,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=1.0,
    first_k_dense_replace=1,
    mtp_depth=args.mtp,
  )
  aux_free = args.balance == "aux_free"
  c.train.update(
    batch_size=16,
    seq_len=256,
    learning_rate=3e-3,
    **schedule(args.steps),
    router_bias_rate=1e-3 if aux_free else 0.0,
    balance_loss_weight=1e-4 if aux_free else 1e-2,
    mtp_weight=0.3,
  )
  c.eval.update(batch_size=16, num_batches=8)
  c.sample.max_new_tokens = 0
  return c


def get_sweep():
  """The runs of `manifold sweep`: one config argument each."""
  return ["ffn=dense", "ffn=moe", "ffn=moe,balance=aux_loss", "ffn=moe,mtp=1"]
