"""Attention in plain jnp: the specification the implementations are tested against."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, k, v, *, scale: float | None = None, mask=None, is_causal: bool = False) -> jax.Array:
  """q [B, T, N, Hqk], k [B, S, K, Hqk], v [B, S, K, Hv] (N a multiple of K) -> [B, T, N, Hv].

  softmax(q k^T * scale) v over keys, float32 scores; `mask` [B, 1, T, S] (True attends);
  `is_causal` lets query t attend keys s <= t.
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
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", weights, v.astype(jnp.float32)).astype(q.dtype)
