"""Autoregressive generation with a KV cache: one prefill, then one token per step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.inference.sampling import sample_token
from manifold.model import Transformer


def generate(
  model: Transformer,
  prompt_bp: jax.Array,
  *,
  max_new_tokens: int,
  key: jax.Array,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Returns [B, P + max_new_tokens] tokens: the prompt followed by samples."""
  if prompt_bp.shape[1] == 0:
    raise ValueError("the prompt is empty; generation continues at least one token")
  total = prompt_bp.shape[1] + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(
      f"prompt ({prompt_bp.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
      f"model.max_seq_len={model.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
    )
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_bp, key, max_new_tokens, float(temperature), int(top_k), float(top_p))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt_bp, key, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_bp.shape
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model(prompt_bp, cache, 0)  # prefill: [B, P, V]
  tokens = jnp.concatenate([prompt_bp, jnp.zeros((batch, max_new_tokens), prompt_bp.dtype)], axis=1)

  def step(i, carry):
    tokens, cache, last_logits, key = carry
    key, sub = jax.random.split(key)
    position = prompt_len + i
    next_token = sample(last_logits, sub).astype(tokens.dtype)  # [B]
    tokens = tokens.at[:, position].set(next_token)
    logits, cache = model(next_token[:, None], cache, position)  # [B, 1, V]
    return tokens, cache, logits[:, 0], key

  tokens, *_ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, cache, logits[:, -1], key))
  return tokens
