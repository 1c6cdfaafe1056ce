"""Next-token sampling: temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_token(logits_bv: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Samples [B] tokens from logits [B, V]. `temperature == 0` is greedy;
  `top_k == 0` (or >= V) and `top_p == 1` disable those filters."""
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1)
  logits = logits_bv.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    # the smallest logit still needed to reach mass top_p (always keeps the top token)
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1)
