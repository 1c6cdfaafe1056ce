"""The public entry point: `dot_product_attention` on the implementation `resolve` picks.

Implementations are those of `jax.nn.dot_product_attention`: `cudnn` (cuDNN's fused flash
attention, GPUs in 16-bit compute) and `xla`. `auto` is cuDNN on GPUs in bfloat16 or
float16 and XLA otherwise: this is the one place that looks at the platform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "cudnn", "xla")
CUDNN_SEQ_MULTIPLE = 64  # cuDNN's flash attention trains on lengths divisible by this


def resolve(implementation: str, dtype) -> str:
  """The implementation `auto` stands for on this backend at compute `dtype`; others as given."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "auto":
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else "xla"
  return implementation


def dot_product_attention(
  q, k, v, *, scale: float | None = None, mask=None, is_causal: bool = False, implementation: str = "xla"
) -> jax.Array:
  """q [B, T, N, Hqk], k [B, S, K, Hqk], v [B, S, K, Hv] -> [B, T, N, Hv] (reference.attention's contract).

  Value heads of another width than query / key heads are zero-padded to the wider one
  (the scores do not change under the explicit scale) and the output sliced back. For
  cuDNN, causal self-attention over a length that is not a multiple of 64 (an MTP depth
  sees T - k tokens) is zero-padded at the end: the padded keys come after every real
  query, so the causal mask hides them, and the padded queries are dropped.
  """
  impl = resolve(implementation, q.dtype)
  length, v_width = q.shape[1], v.shape[-1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  width = max(q.shape[-1], v_width)
  pad_seq = -length % CUDNN_SEQ_MULTIPLE if impl == "cudnn" and is_causal and k.shape[1] == length else 0

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, pad_seq), (0, 0), (0, width - x.shape[-1])])

  out = jax.nn.dot_product_attention(
    pad(q), pad(k), pad(v), scale=scale, mask=mask, is_causal=is_causal, implementation=None if impl == "xla" else impl
  )
  return out[:, :length, :, :v_width]
