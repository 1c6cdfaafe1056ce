"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are rebuilt from a compressed latent c_KV = RMSNorm(x W_dkv) [r_kv]
through W_ukv, and share one RoPE key part k_R = RoPE(x W_kr) [d_rope] across heads;
queries are optionally compressed too (q_lora_rank > 0). Decoding caches only c_KV and
k_R: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer, against
2 * n_kv_heads * head_dim for grouped-query attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model.attention import attend, cache_mask, write_cache
from manifold.model.config import ModelConfig
from manifold.model.layers import RMSNorm, normal, param
from manifold.model.rope import apply_rope, rope_scaling

MLACache = dict[str, jax.Array]  # {"latent": [B, S, r_kv], "k_rope": [B, S, d_rope]}
LATENT_NORM_EPS = 1e-6  # DeepSeek-V3's q_a / kv_a norms use this, not the model's norm_eps


class MultiHeadLatentAttention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.n_heads
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    init = normal(cfg.init_std)
    r_q = cfg.q_lora_rank  # 0: queries straight from x through wq; else through wq_a, q_norm and wq_b
    self.wq = None if r_q else param(rngs, init, (d, h, nope + rope), ("embed", "heads", "head_dim"))
    self.wq_a = param(rngs, init, (d, r_q), ("embed", "q_lora")) if r_q else None
    self.q_norm = RMSNorm(r_q, eps=LATENT_NORM_EPS, rngs=rngs, axis_name="q_lora") if r_q else None
    self.wq_b = param(rngs, init, (r_q, h, nope + rope), ("q_lora", "heads", "head_dim")) if r_q else None
    self.wkv_a = param(rngs, init, (d, cfg.kv_lora_rank + rope), ("embed", "kv_lora"))
    self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=LATENT_NORM_EPS, rngs=rngs, axis_name="kv_lora")
    self.wkv_b = param(rngs, init, (cfg.kv_lora_rank, h, nope + v), ("kv_lora", "heads", "head_dim"))
    self.wo = param(rngs, normal(out_std), (h, v, d), ("heads", "head_dim", "embed"))
    self.cfg = cfg

  def init_cache(self, batch: int, max_len: int) -> MLACache:
    cfg = self.cfg
    return {
      "latent": jnp.zeros((batch, max_len, cfg.kv_lora_rank), cfg.compute_dtype),
      "k_rope": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), cfg.compute_dtype),
    }

  def __call__(
    self, x_btd, positions_bt, cache: MLACache | None = None, cache_index=0, kv_mask=None, segment_ids_bt=None
  ):
    """x: [B, T, D] -> ([B, T, D], cache). With `cache`, the T new latents and rope keys are
    written at slots `cache_index ..` and queries attend to every cached slot <= their own;
    `kv_mask` [B, S] (cache only) hides the slots it marks False, e.g. a row's left padding.
    Without one, `segment_ids_bt` [B, T] keeps each query to the keys of its own document."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    nope, yarn = cfg.qk_nope_head_dim, rope_scaling(cfg)
    if cfg.q_lora_rank:
      q_latent = self.q_norm(jnp.einsum("btd,dr->btr", x_btd, self.wq_a[...].astype(dt)))  # [B, T, r_q]
      q = jnp.einsum("btr,rnh->btnh", q_latent, self.wq_b[...].astype(dt))  # [B, T, N, nope + rope]
    else:
      q = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(dt))  # [B, T, N, nope + rope]
    q = jnp.concatenate([q[..., :nope], apply_rope(q[..., nope:], positions_bt, cfg.rope_theta, yarn)], axis=-1)

    kv = jnp.einsum("btd,dr->btr", x_btd, self.wkv_a[...].astype(dt))  # [B, T, r_kv + rope]
    latent = self.kv_norm(kv[..., : cfg.kv_lora_rank])  # [B, T, r_kv]
    k_rope = apply_rope(kv[..., None, cfg.kv_lora_rank :], positions_bt, cfg.rope_theta, yarn)[:, :, 0]  # [B, T, rope]

    mask, is_causal = None, True
    if cache is not None:
      latent, k_rope = (
        write_cache(cache["latent"], latent, cache_index),
        write_cache(cache["k_rope"], k_rope, cache_index),
      )
      cache = {"latent": latent, "k_rope": k_rope}  # [B, S, ...]
      mask = cache_mask(latent.shape[1], cache_index, x_btd.shape[1], kv_mask)  # [B, 1, T, S]
      is_causal = False

    kv_heads = jnp.einsum("bsr,rnh->bsnh", latent.astype(dt), self.wkv_b[...].astype(dt))  # [B, S, N, nope + v]
    k_nope, v = kv_heads[..., :nope], kv_heads[..., nope:]
    k = jnp.concatenate(
      [k_nope, jnp.broadcast_to(k_rope.astype(dt)[:, :, None, :], (*k_nope.shape[:3], cfg.qk_rope_head_dim))], axis=-1
    )  # [B, S, N, nope + rope]
    impl = "xla" if cache is not None else cfg.attention_impl
    scale = (nope + cfg.qk_rope_head_dim) ** -0.5 * (yarn.softmax_scale if yarn else 1.0)
    out = attend(
      q, k, v, scale=scale, mask=mask, is_causal=is_causal, segment_ids=segment_ids_bt, implementation=impl
    )  # [B, T, N, v]
    return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dt)), cache  # [B, T, D]
