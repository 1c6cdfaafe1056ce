"""The GPU implementation: Pallas on Triton, any CUDA GPU. The same blocks run in
interpret mode on the CPU (the tests).

gmm: a work item is one (group, row tile) pair whose rows overlap; a tile that straddles
a group boundary is visited once per group, and each visit stores only its group's rows.
There are at most M / block_m + G - 1 items (`schedule`); the unused ones do nothing.
Grid (N / block_n, items): the programs that run side by side share a row tile.

tgmm: one program per (group, K tile, N tile) walks its group's row tiles, loading
only that group's rows (others read as 0), and writes its [block_k, block_n] block of
the group's weight gradient; an empty group writes zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def schedule(group_sizes: jax.Array, rows: int, block_m: int) -> tuple[jax.Array, jax.Array]:
  """Work items of gmm over `rows` (a multiple of block_m): (group [W], row tile [W]), int32,
  W = rows / block_m + G - 1; unused items have tile -1."""
  g = group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first, last = starts // block_m, (ends - 1) // block_m
  count = jnp.where(group_sizes > 0, last - first + 1, 0)
  offsets = jnp.cumsum(count)  # items before each group's end
  item = jnp.arange(rows // block_m + g - 1, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(offsets, item, side="right"), g - 1).astype(jnp.int32)
  tile = first[group] + item - (offsets[group] - count[group])
  return group, jnp.where(item < offsets[-1], tile, -1).astype(jnp.int32)


def _gmm_kernel(group_ref, tile_ref, bounds_ref, x_ref, w_ref, o_ref, *, block_m, block_n, block_k, transpose_w):
  col_tile, item = pl.program_id(0), pl.program_id(1)
  tile = tile_ref[item]

  @pl.when(tile >= 0)
  def _():
    group = group_ref[item]
    row0 = pl.multiple_of(tile * block_m, block_m)
    rows, cols = pl.ds(row0, block_m), pl.ds(pl.multiple_of(col_tile * block_n, block_n), block_n)

    def step(k, acc):
      ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
      if transpose_w:  # w [G, N, K]
        contract = (((1,), (1,)), ((), ()))
        return acc + jax.lax.dot_general(
          x_ref[rows, ks], w_ref[group, cols, ks], contract, preferred_element_type=jnp.float32
        )
      return acc + jnp.dot(x_ref[rows, ks], w_ref[group, ks, cols], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    row = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
    mine = (row >= bounds_ref[0, group]) & (row < bounds_ref[1, group])
    plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mine)


def _tgmm_kernel(bounds_ref, x_ref, dy_ref, o_ref, *, block_m, block_n, block_k):
  col_tile, k_tile, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = bounds_ref[0, group], bounds_ref[1, group]
  ks = pl.ds(pl.multiple_of(k_tile * block_k, block_k), block_k)
  cols = pl.ds(pl.multiple_of(col_tile * block_n, block_n), block_n)

  def step(t, acc):
    row0 = pl.multiple_of(t * block_m, block_m)
    row = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    mine = (row >= start) & (row < end)
    rows = pl.ds(row0, block_m)
    x = plgpu.load(x_ref.at[rows, ks], mask=jnp.broadcast_to(mine, (block_m, block_k)), other=0)
    dy = plgpu.load(dy_ref.at[rows, cols], mask=jnp.broadcast_to(mine, (block_m, block_n)), other=0)
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(start // block_m, pl.cdiv(end, block_m), step, jnp.zeros((block_k, block_n), jnp.float32))
  o_ref[group, ks, cols] = acc.astype(o_ref.dtype)


def out_type(like: jax.Array, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
  """An output type varying over the same shard_map mesh axes as `like` (which pallas_call
  needs under shard_map's check_vma)."""
  aval = jax.typeof(like)
  manual = getattr(aval, "manual_axis_type", None)
  if manual is None:  # JAX versions that call it `vma`
    return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)


def _bounds(group_sizes: jax.Array) -> jax.Array:
  """[2, G] int32: each group's first row and one past its last."""
  ends = jnp.cumsum(group_sizes).astype(jnp.int32)
  return jnp.stack([ends - group_sizes, ends])


def _params(interpret: bool, num_warps: int, num_stages: int):
  return None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(
  jax.jit, static_argnames=("transpose_w", "block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret")
)
def gmm(
  x,
  w,
  group_sizes,
  *,
  transpose_w=False,
  block_m=128,
  block_n=128,
  block_k=64,
  num_warps=4,
  num_stages=4,
  interpret=False,
):
  """x [M, K], w [G, K, N] (or [G, N, K] with transpose_w), group_sizes [G] -> [M, N].
  M, K, N must be multiples of block_m, block_k, block_n (api.py pads); under shard_map
  all operands must vary over the same mesh axes (api.py sees to it)."""
  m, k = x.shape
  n = w.shape[1] if transpose_w else w.shape[2]
  group, tile = schedule(group_sizes, m, block_m)
  kernel = functools.partial(_gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k, transpose_w=transpose_w)
  return pl.pallas_call(
    kernel,
    out_shape=out_type(x, (m, n), x.dtype),
    grid=(n // block_n, group.shape[0]),
    compiler_params=_params(interpret, num_warps, num_stages),
    interpret=interpret,
    name="gmm",
  )(group, tile, _bounds(group_sizes), x, w)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages", "interpret"))
def tgmm(x, dy, group_sizes, *, block_m, block_n, block_k, num_warps=4, num_stages=3, interpret=False):
  """x [M, K], dy [M, N], group_sizes [G] -> [G, K, N]. M, K, N must be multiples of the blocks."""
  (m, k), n = x.shape, dy.shape[1]
  del m
  g = group_sizes.shape[0]
  kernel = functools.partial(_tgmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k)
  return pl.pallas_call(
    kernel,
    out_shape=out_type(x, (g, k, n), x.dtype),
    grid=(n // block_n, k // block_k, g),
    compiler_params=_params(interpret, num_warps, num_stages),
    interpret=interpret,
    name="tgmm",
  )(_bounds(group_sizes), x, dy)
