"""Parameter counts and training FLOPs per token, from the model's own structure."""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from manifold.model.config import ModelConfig
from manifold.model.transformer import Transformer


@functools.cache  # building even an abstract model takes seconds at depth; sweeps ask per variant
def _abstract_params(cfg: ModelConfig) -> nnx.State:
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def _size(tree) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


def _inactive_expert_params(cfg: ModelConfig) -> int:
  """Routed-expert weights a token does not use: (E - K) experts in every MoE block."""
  if cfg.ffn != "moe":
    return 0
  moe_blocks = cfg.n_layers - min(cfg.first_k_dense_replace, cfg.n_layers)
  return moe_blocks * (cfg.n_routed_experts - cfg.experts_per_token) * 3 * cfg.d_model * cfg.moe_d_ff


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts by part.

  total: everything; embedding / mtp: the embedding table's and the MTP modules' shares;
  main: total without MTP (how DeepSeek-V3 and the mHC paper quote model size);
  active: the main model's parameters a token uses (all but the unchosen routed experts);
  active_matmul: active without the embedding table, which a token only looks up (the
  mHC paper's "active params" follow this convention; the output head is counted).
  """
  params = _abstract_params(cfg)
  total = _size(params)
  embedding = math.prod(params["embed"]["table"].shape)
  mtp = _size(params["mtp"]) if cfg.mtp_depth else 0
  active = total - mtp - _inactive_expert_params(cfg)
  return {
    "total": total,
    "embedding": embedding,
    "non_embedding": total - embedding,
    "mtp": mtp,
    "main": total - mtp,
    "active": active,
    "active_matmul": active - embedding,
  }


def matmul_params(cfg: ModelConfig) -> int:
  """Weights a token multiplies through in training: every matrix except the embedding
  lookup and the routed experts it was not sent to (MTP modules included)."""
  params = _abstract_params(cfg)
  matrices = sum(math.prod(p.shape) for p in jax.tree.leaves(params) if len(p.shape) >= 2)
  return matrices - math.prod(params["embed"]["table"].shape) - _inactive_expert_params(cfg)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward (3x forward) model FLOPs per token.

  Matmuls: 2 FLOPs per weight forward (each MTP depth reuses the output head once more).
  Attention scores and the weighted sum of values: 2 * n_heads * (qk_head_dim +
  value_head_dim) FLOPs per attended position forward, in the main blocks and the MTP
  blocks; a causal token attends to (seq_len + 1) / 2 positions on average.
  """
  forward_matmul = 2 * (matmul_params(cfg) + cfg.mtp_depth * cfg.d_model * cfg.vocab_size)
  per_position = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim)
  forward_attention = (cfg.n_layers + cfg.mtp_depth) * per_position * (seq_len + 1) / 2
  return 3 * (forward_matmul + forward_attention)


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
  """Decoding-cache bytes one token occupies across all layers, at the compute dtype."""
  if cfg.attention == "mla":
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
  else:
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
  return cfg.n_layers * per_layer * cfg.compute_dtype.itemsize
