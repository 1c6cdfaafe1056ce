"""The public entry point: `dot_product_attention` on the implementation `resolve` picks.

Implementations: those of `jax.nn.dot_product_attention`, `cudnn` (cuDNN's fused flash
attention, GPUs in 16-bit compute) and `xla`; and `matmul`, two batched matmuls in the
heads-major layout [B, N, T, H] with the softmax's division applied to the [T, Hv] output
instead of the [T, S] weights (on a 2-core CPU 5x faster forward and 2x faster forward +
backward than `xla` at the quickstart's shapes); and `splash`, JAX's TPU splash attention
kernels (`splash.py`; interpret mode off the TPU), for causal self-attention over lengths
that are multiples of 128 (other calls take `xla`). `auto` is cuDNN on GPUs in bfloat16 or
float16, `splash` on TPUs, `matmul` on the CPU and `xla` otherwise: this is the one place
that looks at the platform.

Packed documents pass `segment_ids` [B, T] (self-attention): splash takes them natively
(its block mask skips tiles across documents); the others turn them into a [B, 1, T, T]
mask, which cuDNN applies as a materialised bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention import reference, splash
from kernels.platform import platform

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "matmul", "splash")
CUDNN_SEQ_MULTIPLE = 64  # cuDNN's flash attention trains on lengths divisible by this


def resolve(implementation: str, dtype) -> str:
  """The implementation `auto` stands for on this backend at compute `dtype`; others as given."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "auto":
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    backend = platform()
    if backend == "tpu":
      return "splash"
    return "cudnn" if backend == "gpu" and sixteen_bit else "matmul" if backend == "cpu" else "xla"
  return implementation


def dot_product_attention(
  q,
  k,
  v,
  *,
  scale: float | None = None,
  mask=None,
  is_causal: bool = False,
  segment_ids=None,
  implementation: str = "xla",
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
  if impl == "splash":
    if splash.supports(q, k, mask=mask, is_causal=is_causal):
      return splash.attention(q, k, v, scale=scale, segment_ids=segment_ids, interpret=platform() != "tpu")
    impl = "xla"
  if segment_ids is not None:
    documents = reference.segment_mask(segment_ids)  # [B, 1, T, T]
    mask = documents if mask is None else mask & documents
  if impl == "matmul":
    return _matmul_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
  width = max(q.shape[-1], v_width)
  pad_seq = -length % CUDNN_SEQ_MULTIPLE if impl == "cudnn" and is_causal and k.shape[1] == length else 0

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, pad_seq), (0, 0), (0, width - x.shape[-1])])

  if mask is not None and pad_seq:  # padded keys are causally hidden; padded queries may see anything
    mask = jnp.pad(mask, [(0, 0), (0, 0), (0, pad_seq), (0, pad_seq)], constant_values=True)
  out = jax.nn.dot_product_attention(
    pad(q), pad(k), pad(v), scale=scale, mask=mask, is_causal=is_causal, implementation=None if impl == "xla" else impl
  )
  return out[:, :length, :, :v_width]


def _matmul_attention(q, k, v, *, scale, mask, is_causal) -> jax.Array:
  """The `matmul` implementation (same contract); float32 scores. A query that may attend
  no key averages every value (the reference gives NaN)."""
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  f32 = jnp.float32
  q_h = (q.astype(f32) * scale).transpose(0, 2, 1, 3)  # [B, N, T, H]
  k_h, v_h = (jnp.repeat(x, groups, axis=2).astype(f32).transpose(0, 2, 1, 3) for x in (k, v))  # [B, N, S, .]
  allowed = jnp.ones((1, 1, t, k.shape[1]), bool) if mask is None else mask
  if is_causal:
    allowed = allowed & jnp.tril(jnp.ones((t, k.shape[1]), bool))
  scores = q_h @ k_h.swapaxes(-1, -2) + jnp.where(allowed, 0.0, jnp.finfo(f32).min)  # [B, N, T, S]
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))  # unnormalised
  out = (weights @ v_h) / weights.sum(axis=-1, keepdims=True)  # [B, N, T, Hv]
  return out.transpose(0, 2, 1, 3).astype(q.dtype)
