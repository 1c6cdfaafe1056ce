"""Decoder-only transformer: embedding, pre-norm blocks, final norm, untied head.

With `residual = plain` a block is `x + attn(norm(x))`, `x + ffn(norm(x))` on
[B, T, D]. Otherwise the state is n streams [B, T, n, D] from the embedding to the
final collapse, and each sub-block is wrapped by its own connection (see residual.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model import residual
from manifold.model.attention import Attention, KVCache, document_positions
from manifold.model.config import ModelConfig
from manifold.model.ffn import SwiGLU
from manifold.model.layers import Embed, RMSNorm, normal, param
from manifold.model.mla import MultiHeadLatentAttention
from manifold.model.moe import MoE, MoEAux, updated_bias
from manifold.model.mtp import MTPModule
from manifold.model.partitioning import shard_batch

# model.remat -> what a block keeps for the backward pass (None: everything)
REMAT_POLICIES = {
  "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs; the rest is recomputed
  "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input
}


def _read_normed(connection, norm: RMSNorm, x_btnd: jax.Array) -> tuple[jax.Array, residual.Mixing]:
  """norm(sum_j H_pre[j] x[j]) and the layer's mixing."""
  h, mixing = connection.read(x_btnd)
  return norm(h), mixing


def _normed(norm: RMSNorm, h_btd: jax.Array) -> jax.Array:
  return norm(h_btd)


_read_normed_recomputed = nnx.remat(_read_normed)
_normed_recomputed = nnx.remat(_normed)


def _sub_block_input(connection, norm: RMSNorm, x_btnd, *, train: bool) -> tuple[jax.Array, residual.Mixing]:
  """norm(sum_j H_pre[j] x[j]) [B, T, D] and the layer's mixing. In training the XLA paths
  recompute it in the backward pass instead of keeping their [B, T, n, ...] intermediates;
  through the mHC kernels only the norm is recomputed and h [B, T, D] is kept, since
  recomputing the kernels' pre pass would read the streams twice more."""
  if not train:
    return _read_normed(connection, norm, x_btnd)
  if not connection.runs_kernels():
    return _read_normed_recomputed(connection, norm, x_btnd)
  h, mixing = connection.read(x_btnd)
  return _normed_recomputed(norm, h), mixing


Pending = tuple[jax.Array, residual.Mixing]  # a sub-block's output y [B, T, D] and its mixing, not yet applied


def _enter(connection, norm: RMSNorm, x_btnd, pending: Pending | None, *, train: bool):
  """Applies the pending connection to the streams and reads them for the next sub-block:
  (x [B, T, n, D], norm(sum_j H_pre[j] x[j]) [B, T, D], its mixing). Where both connections run
  the mHC kernels, one `merge` pass: the new streams are projected as they are written, and only
  the norm is recomputed in training (as `_sub_block_input`'s kernel path)."""
  if pending is not None and connection.fuses(pending[1]):
    x_btnd, h, mixing = connection.merge(x_btnd, *pending)
    return x_btnd, (_normed_recomputed if train else _normed)(norm, h), mixing
  if pending is not None:
    x_btnd = residual.res_post_mix(x_btnd, *pending)
  return x_btnd, *_sub_block_input(connection, norm, x_btnd, train=train)


class BlockAux(NamedTuple):
  """What one block reports besides its output; None where its parts do not exist."""

  h_res: jax.Array | None  # [2, B, T, n, n] the attention and FFN sub-blocks' H_res (streams only)
  moe: MoEAux | None  # the MoE layer's load [E] and balance loss (MoE blocks only)


class ModelAux(NamedTuple):
  """What `Transformer.forward_with_aux` reports besides the logits."""

  hidden: jax.Array  # [B, T, D] the last hidden state before the final norm (MTP's h^0)
  h_res: jax.Array | None  # [2 L, B, T, n, n] (layer 2i: block i's attention, 2i + 1 its FFN); streams only
  expert_load: jax.Array | None  # [L_moe, E] per MoE layer in depth order; MoE only
  balance_loss: jax.Array | None  # [] summed over the MoE layers; MoE only


def _train_block(block: "Block", x: jax.Array, positions_bt, segment_ids_bt, pending):
  x, _, aux, pending = block(x, positions_bt, segment_ids_bt=segment_ids_bt, pending=pending)
  return x, aux, pending


class Block(nnx.Module):
  """One attention and one FFN sub-block, each pre-normed, on the plain or n-stream residual."""

  def __init__(self, cfg: ModelConfig, *, index: int, rngs: nnx.Rngs):
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    attention = MultiHeadLatentAttention if cfg.attention == "mla" else Attention
    self.attn = attention(cfg, out_std=out_std, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.moe = cfg.is_moe_block(index)
    self.ffn = (
      MoE(cfg, out_std=out_std, rngs=rngs) if self.moe else SwiGLU(cfg, d_ff=cfg.d_ff, out_std=out_std, rngs=rngs)
    )
    self.streams = cfg.residual != "plain"
    connection = functools.partial(residual.make_connection, cfg, rngs=rngs)
    self.attn_connection = connection(layer_index=2 * index) if self.streams else None
    self.ffn_connection = connection(layer_index=2 * index + 1) if self.streams else None

  def _ffn(self, x_btd: jax.Array) -> tuple[jax.Array, MoEAux | None]:
    return self.ffn(x_btd) if self.moe else (self.ffn(x_btd), None)

  def __call__(
    self, x, positions_bt, cache=None, cache_index=0, kv_mask=None, segment_ids_bt=None, pending: Pending | None = None
  ) -> tuple[jax.Array, KVCache | None, BlockAux, Pending | None]:
    """x: [B, T, D] (plain) or [B, T, n, D] (streams) -> (x in the same shape, the cache, aux,
    pending); `segment_ids_bt` [B, T] (no cache): the packed document of each token, attended
    within. With streams the FFN's connection is left pending (its output and mixing): the next
    block's first read applies it, fused with that read where the kernels run, and so does the
    model's end; `pending` in is the previous block's."""
    if not self.streams:
      attn_out, cache = self.attn(self.attn_norm(x), positions_bt, cache, cache_index, kv_mask, segment_ids_bt)
      x = x + attn_out  # [B, T, D]
      ffn_out, moe_aux = self._ffn(self.ffn_norm(x))
      return x + ffn_out, cache, BlockAux(None, moe_aux), None

    train = cache is None
    x, attn_in, attn_mixing = _enter(self.attn_connection, self.attn_norm, x, pending, train=train)  # [B, T, D]
    attn_out, cache = self.attn(attn_in, positions_bt, cache, cache_index, kv_mask, segment_ids_bt)
    x, ffn_in, ffn_mixing = _enter(self.ffn_connection, self.ffn_norm, x, (attn_out, attn_mixing), train=train)
    ffn_out, moe_aux = self._ffn(ffn_in)  # [B, T, D]
    aux = BlockAux(jnp.stack([attn_mixing.res, ffn_mixing.res]), moe_aux)
    return x, cache, aux, (ffn_out, ffn_mixing)


class Transformer(nnx.Module):
  """Maps tokens [B, T] to float32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, index=i, rngs=rngs) for i in range(cfg.n_layers)])
    learned_collapse = cfg.residual in ("mhc", "mhc_lite")
    self.stream_head = residual.StreamHead(cfg, rngs=rngs) if learned_collapse else None
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mtp = nnx.List([MTPModule(cfg, depth=k, block_cls=Block, rngs=rngs) for k in range(1, cfg.mtp_depth + 1)])
    self.head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def init_cache(self, batch: int, max_len: int) -> list[KVCache]:
    """One empty cache per block for decoding up to `max_len` positions (MLA: latents only)."""
    return [block.attn.init_cache(batch, max_len) for block in self.blocks]

  def __call__(
    self,
    tokens_bt: jax.Array,
    cache: list[KVCache] | None = None,
    cache_index: jax.Array | int = 0,
    *,
    positions_bt: jax.Array | None = None,
    kv_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, list[KVCache] | None]:
    """Returns (logits [B, T, V] float32, updated cache or None).

    Without a cache the T tokens sit at positions 0..T-1; with one, they are written at
    cache slots `cache_index .. cache_index + T - 1` and sit at those positions (`cache_index`
    a scalar, or [B]: one per row, for rows of different lengths decoding together). A batch of
    left-padded rows passes `positions_bt` [B, T] (each row's own positions, for RoPE) and
    `kv_mask` [B, S] (the cache slots a row may attend to: not its padding); attention stays
    causal over the slots either way.
    """
    logits, new_cache, _ = self.forward_with_aux(
      tokens_bt, cache, cache_index, positions_bt=positions_bt, kv_mask=kv_mask
    )
    return logits, new_cache

  def forward_with_aux(
    self,
    tokens_bt: jax.Array,
    cache: list[KVCache] | None = None,
    cache_index: jax.Array | int = 0,
    *,
    positions_bt: jax.Array | None = None,
    kv_mask: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
  ) -> tuple[jax.Array, list[KVCache] | None, ModelAux]:
    """`__call__` that also returns what the blocks report (ModelAux). Training on packed
    documents passes `segment_ids_bt` [B, T] (`attention.document_ids`): each token attends
    only within its document, whose positions restart at 0 unless `positions_bt` is given."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    batch, length = tokens_bt.shape
    if kv_mask is not None and cache is None:
      raise ValueError("kv_mask hides cache slots; it needs a cache")
    if segment_ids_bt is not None and cache is not None:
      raise ValueError("segment_ids_bt masks packed documents in training; decoding with a cache takes kv_mask")
    if positions_bt is None and segment_ids_bt is not None:
      positions_bt = document_positions(segment_ids_bt)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.asarray(cache_index)[..., None] + jnp.arange(length), (batch, length))
    x = self.embed(tokens_bt, dt)  # [B, T, D]
    if cfg.residual != "plain":
      x = residual.widen(x, cfg.streams)  # [B, T, n, D], once
    x = shard_batch(x)
    new_cache = [] if cache is not None else None
    block_aux: list[BlockAux] = []
    train_block = _train_block
    if cfg.remat != "none":
      train_block = nnx.remat(_train_block, policy=REMAT_POLICIES[cfg.remat])
    pending = None
    for i, block in enumerate(self.blocks):
      if cache is None:
        x, aux, pending = train_block(block, x, positions_bt, segment_ids_bt, pending)
      else:
        x, layer_cache, aux, pending = block(x, positions_bt, cache[i], cache_index, kv_mask, pending=pending)
        new_cache.append(layer_cache)
      x = shard_batch(x)
      block_aux.append(aux)
    if cfg.residual != "plain":
      x = residual.res_post_mix(x, *pending)  # the last FFN's connection
      x = residual.collapse(x, self.stream_head)  # [B, T, D], once
    logits = jnp.einsum("btd,dv->btv", self.final_norm(x), self.head[...].astype(dt))  # [B, T, V]
    moe_aux = [a.moe for a in block_aux if a.moe is not None]
    aux = ModelAux(
      hidden=x,
      h_res=jnp.concatenate([a.h_res for a in block_aux]) if cfg.residual != "plain" else None,
      expert_load=jnp.stack([a.load for a in moe_aux]) if moe_aux else None,
      balance_loss=sum(a.balance_loss for a in moe_aux) if moe_aux else None,
    )
    return logits.astype(jnp.float32), new_cache, aux

  def mtp_step(
    self, depth: int, hidden_btd, next_tokens_bt, positions_bt, cache=None, cache_index=0, segment_ids_bt=None
  ):
    """MTP module `depth` (1-based) on (h^{k-1}_i, t_{i+k}): (logits [B, T, V] float32, h^k, cache)."""
    module, dt = self.mtp[depth - 1], self.cfg.compute_dtype
    h, cache = module(hidden_btd, self.embed(next_tokens_bt, dt), positions_bt, cache, cache_index, segment_ids_bt)
    logits = jnp.einsum("btd,dv->btv", module.final_norm(h), self.head[...].astype(dt))
    return logits.astype(jnp.float32), h, cache

  def mtp_logits(self, hidden_btd: jax.Array, tokens_bt: jax.Array, segment_ids_bt=None) -> list[jax.Array]:
    """Training-time MTP: for depth k = 1..D, logits [B, T-k, V] at positions i < T-k
    predicting t_{i+k+1}, from the main hidden states [B, T, D] and the input tokens [B, T]
    (attending within the documents of `segment_ids_bt` [B, T], as the main model did)."""
    batch, length = tokens_bt.shape
    if segment_ids_bt is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    else:
      positions = document_positions(segment_ids_bt)
    h, out = hidden_btd, []
    for k in range(1, len(self.mtp) + 1):
      ids = None if segment_ids_bt is None else segment_ids_bt[:, : length - k]
      logits, h, _ = self.mtp_step(
        k, h[:, : length - k], tokens_bt[:, k:], positions[:, : length - k], segment_ids_bt=ids
      )
      out.append(logits)  # [B, T - k, V]
    return out


def updated_router_biases(extra: dict, expert_load: jax.Array, cfg: ModelConfig, rate: float) -> dict:
  """The model's non-trained state (`nnx.to_pure_dict` of everything but Params) with each
  MoE layer's router bias moved by `updated_bias`; expert_load [L_moe, E] in depth order."""
  blocks = dict(extra["blocks"])
  for load, i in zip(expert_load, cfg.moe_blocks, strict=True):
    ffn = blocks[i]["ffn"]
    blocks[i] = {**blocks[i], "ffn": {**ffn, "bias": updated_bias(ffn["bias"], load, rate)}}
  return {**extra, "blocks": blocks}
