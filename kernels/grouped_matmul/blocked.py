"""The grouped matmul as one batched XLA matmul over row tiles that each hold one group.

Each group's rows are gathered into whole tiles of `block_m` rows (its last tile
zero-padded), each tile's group weight is gathered beside it, and one batched matmul
multiplies them; the products are gathered back to the sorted rows. The work is
sum_g ceil(size_g / block_m) * block_m rows, at most M + G (block_m - 1). Where the
backend has no grouped-matmul kernel (the CPU, whose `ragged_dot` computes every group on
every row and masks), this is up to G times less arithmetic. JAX differentiates it: the
gathers transpose to scatter-adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tile_layout(group_sizes: jax.Array, m: int, block_m: int):
  """The padded layout of M sorted rows: (tile_group [T], source [T block_m], row_slot [M]).

  T = ceil(M / block_m) + G tiles bound the layout for any sizes. tile_group: the group
  of each tile (clamped to G - 1 for unused tiles); source: the sorted row each padded
  slot holds, or -1 for padding; row_slot: each sorted row's padded slot, or -1 for rows
  past sum(group_sizes)."""
  num_groups = group_sizes.shape[0]
  num_tiles = -(-m // block_m) + num_groups
  tiles = (group_sizes + block_m - 1) // block_m  # [G]
  tile_ends = jnp.cumsum(tiles)
  row_ends = jnp.cumsum(group_sizes)
  row_starts, slot_starts = row_ends - group_sizes, (tile_ends - tiles) * block_m
  tile_group = jnp.minimum(jnp.searchsorted(tile_ends, jnp.arange(num_tiles), side="right"), num_groups - 1)
  slot = jnp.arange(num_tiles * block_m)
  slot_group = tile_group[slot // block_m]
  offset = slot - slot_starts[slot_group]
  used = (offset < group_sizes[slot_group]) & (slot // block_m < tile_ends[-1])
  source = jnp.where(used, row_starts[slot_group] + offset, -1)
  row = jnp.arange(m)
  row_group = jnp.minimum(jnp.searchsorted(row_ends, row, side="right"), num_groups - 1)
  row_slot = jnp.where(row < row_ends[-1], row - row_starts[row_group] + slot_starts[row_group], -1)
  return tile_group, source, row_slot


def _take_rows(a: jax.Array, index: jax.Array) -> jax.Array:
  """a[index] with rows of index -1 zero."""
  return jnp.where((index >= 0)[:, None], a[jnp.maximum(index, 0)], 0)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block_m: int) -> jax.Array:
  """x [M, K] sorted by group, w [G, K, N], group_sizes [G] -> [M, N] in x's dtype (float32
  accumulation); rows past sum(group_sizes) are 0."""
  (m, k), n = x.shape, w.shape[2]
  tile_group, source, row_slot = tile_layout(group_sizes, m, block_m)
  x_tiles = _take_rows(x, source).reshape(-1, block_m, k)  # [T, block_m, K]
  y_tiles = jnp.matmul(x_tiles, w[tile_group], preferred_element_type=jnp.float32).astype(x.dtype)
  return _take_rows(y_tiles.reshape(-1, n), row_slot)
