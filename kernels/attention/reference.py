"""Attention in plain jnp: the specification the implementations are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(segment_ids) -> jax.Array:
  """[B, T] segment ids -> [B, 1, T, T]: query t may attend key s of the same segment."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention(
  q, k, v, *, scale: float | None = None, mask=None, is_causal: bool = False, segment_ids=None
) -> jax.Array:
  """q [B, T, N, Hqk], k [B, S, K, Hqk], v [B, S, K, Hv] (N a multiple of K) -> [B, T, N, Hv].

  softmax(q k^T * scale) v over keys, float32 scores; `mask` [B, 1, T, S] (True attends);
  `is_causal` lets query t attend keys s <= t; `segment_ids` [B, T] (self-attention, S = T)
  lets it attend only keys of its own segment (packed documents).
  """
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))  # [B, S, N, .]
  scale = h**-0.5 if scale is None else scale
  scores = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale  # [B, N, T, S]
  if is_causal:
    scores = jnp.where(jnp.tril(jnp.ones((t, k.shape[1]), bool)), scores, -jnp.inf)
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  if segment_ids is not None:
    scores = jnp.where(segment_mask(segment_ids), scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", weights, v.astype(jnp.float32)).astype(q.dtype)
