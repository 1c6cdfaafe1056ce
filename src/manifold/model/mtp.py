"""Multi-Token Prediction (DeepSeek-V3): D sequential modules predicting t_{i+k+1} at depth k.

Module k combines RMSNorm(h^{k-1}_i) and RMSNorm(Emb(t_{i+k})) by concatenation and a
projection M_k [2D, D], runs one transformer block on the result, and predicts through
its own final norm and the model's shared output head; the embedding is shared too.
h^0 is the main model's last hidden state (after the stream collapse, before the final
norm). Each depth sees one position fewer: depth k covers positions 0 .. T-k-1.
The MTP blocks use the plain residual and a dense FFN. `Transformer.mtp_logits` runs the
depths in training, `Transformer.mtp_step` one depth (speculative decoding drafts with it).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from manifold.model.config import ModelConfig
from manifold.model.layers import RMSNorm, normal, param


class MTPModule(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, depth: int, block_cls, rngs: nnx.Rngs):
    d = cfg.d_model
    self.hidden_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.embed_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.proj = param(rngs, normal(cfg.init_std), (2 * d, d), (None, "embed"))
    block_cfg = dataclasses.replace(cfg, residual="plain", ffn="dense", mhc_impl="xla")  # no streams to mix
    self.block = block_cls(block_cfg, index=cfg.n_layers + depth, rngs=rngs)
    self.final_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.dtype = cfg.compute_dtype

  def __call__(self, hidden_btd, next_embed_btd, positions_bt, cache=None, cache_index=0, segment_ids_bt=None):
    """h^{k-1} [B, T, D] and Emb(t_{i+k}) [B, T, D] -> (h^k [B, T, D], cache); segment_ids_bt
    [B, T] as the main model's blocks take it."""
    x = jnp.concatenate([self.hidden_norm(hidden_btd), self.embed_norm(next_embed_btd)], axis=-1)  # [B, T, 2D]
    x = jnp.einsum("bte,ed->btd", x, self.proj[...].astype(self.dtype))  # [B, T, D]
    x, cache, _, _ = self.block(x, positions_bt, cache, cache_index, segment_ids_bt=segment_ids_bt)
    return x, cache
