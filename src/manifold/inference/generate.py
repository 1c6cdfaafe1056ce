"""Fixed-length generation for one batch of equal-length prompts, on the decoding engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold.inference.engine import sample
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
  """Returns [B, P + max_new_tokens] tokens: the prompt followed by samples (no
  end-of-sequence stop; row b draws with `jax.random.split(key, B)[b]`, see engine.py)."""
  out = sample(
    model, prompt_bp, max_new_tokens=max_new_tokens, key=key, temperature=temperature, top_k=top_k, top_p=top_p
  )
  return jnp.concatenate([prompt_bp, out.tokens.astype(prompt_bp.dtype)], axis=1)
