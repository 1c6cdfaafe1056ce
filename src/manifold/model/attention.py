"""Grouped-query attention with rotary embeddings and a fixed-size KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from kernels.attention.api import dot_product_attention, resolve

from manifold.model.config import ModelConfig
from manifold.model.layers import normal, param
from manifold.model.partitioning import axes_of, batch_axes
from manifold.model.rope import apply_rope

KVCache = dict[str, jax.Array]  # {"k": [B, S, K, H], "v": [B, S, K, H]}


def cache_mask(cache_len: int, cache_index: jax.Array | int, num_queries: int, kv_mask: jax.Array | None = None):
  """[1 or B, 1, T, S] which cache slots each of T queries sees: the query written at slot
  `cache_index + t` (a scalar, or [B]: one per row) sees the slots up to its own, and with
  `kv_mask` [B, S] only those it marks."""
  query_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(num_queries)  # [T] or [B, T]
  mask = jnp.arange(cache_len) <= query_slots[..., None]  # [T, S] or [B, T, S]
  mask = mask.reshape(-1, 1, num_queries, cache_len)  # [1 or B, 1, T, S]
  return mask if kv_mask is None else mask & kv_mask[:, None, None, :]


def write_cache(cache_bs: jax.Array, new_bt: jax.Array, cache_index: jax.Array | int) -> jax.Array:
  """`cache_bs` [B, S, ...] with `new_bt` [B, T, ...] written at slots `cache_index ..` (a scalar,
  or [B]: each row at its own slot, as a server's rows of different lengths are)."""
  new_bt = new_bt.astype(cache_bs.dtype)
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache_bs, new_bt, cache_index, axis=1)
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(cache_bs, new_bt, cache_index)


def document_ids(tokens_bt: jax.Array, separator: int) -> jax.Array:
  """[B, T] int32: which packed document each token belongs to (0, 1, ... along a row); the
  separator ends its document, so the token after it starts the next."""
  ends = (tokens_bt == separator).astype(jnp.int32)
  return jnp.cumsum(ends, axis=1) - ends


def document_positions(segment_ids_bt: jax.Array) -> jax.Array:
  """[B, T] int32: each token's position within its document (RoPE restarts at 0 for each)."""
  index = jnp.arange(segment_ids_bt.shape[1])
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids_bt[:, :1], bool), segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], 1
  )
  return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def attend(
  q,
  k,
  v,
  *,
  scale: float | None = None,
  mask=None,
  is_causal: bool = False,
  segment_ids=None,
  implementation: str = "xla",
):
  """`dot_product_attention` (q [B, T, N, H], k / v [B, S, K, .] -> [B, T, N, Hv]; segment_ids
  [B, T] or None); a Pallas kernel (`splash`) runs once per device on its own batch rows and
  heads under the ambient mesh."""
  call = lambda q, k, v, ids=None: dot_product_attention(  # noqa: E731
    q, k, v, scale=scale, mask=mask, is_causal=is_causal, segment_ids=ids, implementation=implementation
  )
  mesh = jax.sharding.get_abstract_mesh()
  if resolve(implementation, q.dtype) != "splash" or mesh.empty:
    return call(q, k, v, segment_ids)
  heads = axes_of("heads")
  ways = math.prod(mesh.shape[a] for a in heads)
  heads = heads if q.shape[2] % ways == 0 and k.shape[2] % ways == 0 else ()  # else each device takes all heads
  spec = P(batch_axes(), None, heads, None)
  args, specs = (q, k, v), (spec,) * 3
  if segment_ids is not None:
    args, specs = (*args, segment_ids), (*specs, P(batch_axes(), None))
  return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)(*args)


class Attention(nnx.Module):
  """Causal multi-head attention; `n_kv_heads < n_heads` shares each K/V head across a group."""

  def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.wq = param(rngs, normal(cfg.init_std), (d, n, h), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, normal(cfg.init_std), (d, k, h), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, normal(cfg.init_std), (d, k, h), ("embed", "kv_heads", "head_dim"))
    self.wo = param(rngs, normal(out_std), (n, h, d), ("heads", "head_dim", "embed"))
    self.cfg = cfg

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim)
    zeros = jnp.zeros(shape, self.cfg.compute_dtype)
    return {"k": zeros, "v": zeros}

  def __call__(
    self,
    x_btd: jax.Array,
    positions_bt: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    kv_mask: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """x: [B, T, D], positions: [B, T] (RoPE). With `cache`, the T new keys/values are
    written at slots `cache_index ..` and queries attend to every cached slot <= their own;
    `kv_mask` [B, S] (cache only) hides the slots it marks False, e.g. a row's left padding.
    Without one, `segment_ids_bt` [B, T] keeps each query to the keys of its own document."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(dt))  # [B, T, N, H]
    k = jnp.einsum("btd,dkh->btkh", x_btd, self.wk[...].astype(dt))  # [B, T, K, H]
    v = jnp.einsum("btd,dkh->btkh", x_btd, self.wv[...].astype(dt))  # [B, T, K, H]
    q = apply_rope(q, positions_bt, cfg.rope_theta)
    k = apply_rope(k, positions_bt, cfg.rope_theta)

    if cache is None:
      out = attend(q, k, v, is_causal=True, segment_ids=segment_ids_bt, implementation=cfg.attention_impl)
    else:
      k_all, v_all = write_cache(cache["k"], k, cache_index), write_cache(cache["v"], v, cache_index)
      cache = {"k": k_all, "v": v_all}  # [B, S, K, H]
      mask = cache_mask(k_all.shape[1], cache_index, x_btd.shape[1], kv_mask)  # [B, 1, T, S]
      out = dot_product_attention(q, k_all.astype(dt), v_all.astype(dt), mask=mask)
    # out: [B, T, N, H]
    return jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dt)), cache  # [B, T, D]
