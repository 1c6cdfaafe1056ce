"""Next-token sampling: temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_logits(
  logits_bv: jax.Array, *, temperature: float | jax.Array, top_k: int, top_p: float | jax.Array
) -> jax.Array:
  """float32 logits [B, V] of the distribution sampled from at `temperature > 0`: the
  logits over the temperature, -inf outside the top-k and the top-p nucleus (the smallest
  set of likeliest tokens reaching mass `top_p`; always the likeliest token).
  `top_k == 0` (or >= V) and `top_p == 1` disable those filters. `temperature` and `top_p`
  are numbers, or [B, 1] arrays: one per row."""
  logits = logits_bv.astype(jnp.float32) / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  per_row = not isinstance(top_p, (int, float))
  if per_row or top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    # the smallest logit still needed to reach mass top_p (always keeps the top token)
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    nucleus = jnp.where(logits < cutoff, -jnp.inf, logits)
    logits = jnp.where(top_p < 1, nucleus, logits) if per_row else nucleus
  return logits


def sample_token(logits_bv: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Samples [B] tokens from logits [B, V]. `temperature == 0` is greedy. `key` is one key
  for the whole batch, or [B] keys: row b then draws with `key[b]` alone, as it would in a
  batch of one."""
  if temperature == 0:
    return jnp.argmax(logits_bv, axis=-1)
  logits = filtered_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p)
  if key.ndim > (0 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 1):  # one key per row
    return jax.vmap(jax.random.categorical)(key, logits)
  return jax.random.categorical(key, logits, axis=-1)


def sample_rows(logits_bv: jax.Array, keys_b: jax.Array, *, temperature_b: jax.Array, top_p_b: jax.Array) -> jax.Array:
  """[B] tokens from logits [B, V]: row b with `keys_b[b]`, its own temperature (0: greedy) and
  top-p, drawing what `sample_token` draws for that row alone with that key and those settings."""
  hot = temperature_b > 0
  temperature = jnp.where(hot, temperature_b, 1.0)[:, None]
  logits = filtered_logits(logits_bv, temperature=temperature, top_k=0, top_p=top_p_b[:, None])
  drawn = jax.vmap(jax.random.categorical)(keys_b, logits)
  return jnp.where(hot, drawn, jnp.argmax(logits_bv, axis=-1))
