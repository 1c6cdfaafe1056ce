"""TPU attention through JAX's maintained splash attention kernels
(`jax.experimental.pallas.ops.tpu.splash_attention`): causal self-attention, grouped key /
value heads, value heads of their own width (MLA), forward and backward in Mosaic. Interpret
mode runs the same kernels on the CPU (the tests). Scores are never materialised: memory is
O(T) per head instead of XLA's [B, N, T, T].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128  # splash's tiles (queries and keys, forward and backward); a length must be a multiple of it


def supports(q, k, *, mask, is_causal: bool) -> bool:
  """Whether `attention` covers this call: causal self-attention without an extra mask over a
  length that is a multiple of BLOCK (others go to XLA)."""
  return mask is None and is_causal and q.shape[1] == k.shape[1] and q.shape[1] % BLOCK == 0


def attention(q, k, v, *, scale: float, segment_ids=None, interpret: bool = False) -> jax.Array:
  """q [B, T, N, H], k [B, T, K, H], v [B, T, K, Hv], causal -> [B, T, N, Hv] in q's dtype;
  `segment_ids` [B, T] keeps each query to keys of its own segment. The scale multiplies q
  in its own dtype before the kernels (they take none)."""
  # Imported here: the TPU kernels' module costs every process that imports the model ~0.1 s.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  t, n = q.shape[1], q.shape[2]
  causal = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(n)])
  sizes = splash.BlockSizes(
    block_q=BLOCK,
    block_kv=BLOCK,
    block_kv_compute=BLOCK,
    block_q_dkv=BLOCK,
    block_kv_dkv=BLOCK,
    block_kv_dkv_compute=BLOCK,
    block_q_dq=BLOCK,
    block_kv_dq=BLOCK,
  )
  kernel = splash.make_splash_mha(causal, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
  heads_major = lambda x: x.swapaxes(1, 2)  # noqa: E731 -- [B, T, N, H] <-> [B, N, T, H]
  q, k, v = heads_major(q * scale).astype(q.dtype), heads_major(k), heads_major(v)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids)))(
      q, k, v, segment_ids.astype(jnp.int32)
    )
  return heads_major(out).astype(q.dtype)
