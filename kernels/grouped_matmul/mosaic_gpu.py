"""The Hopper implementation: the Pallas Mosaic GPU grouped matmuls that ship with JAX
(warpgroup matmuls fed by TMA, one persistent program per SM), with tile sizes for
bfloat16. Hopper only; rows past the groups are left unwritten (api.py zeroes them)."""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.jit, static_argnames=("transpose_w", "block_m", "block_n", "block_k", "stages", "grid_block_n"))
def gmm(x, w, group_sizes, *, transpose_w=False, block_m=128, block_n=128, block_k=64, stages=4, grid_block_n=1):
  """x [M, K], w [G, K, N] (or [G, N, K] with transpose_w), group_sizes [G] -> [M, N];
  M a multiple of 8 (its TMA tiles), K of block_k, N of block_n."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # imports Mosaic GPU: only where it runs

  return ragged_dot_mgpu.ragged_dot(
    x,
    w,
    group_sizes=group_sizes,
    block_m=block_m,
    block_n=block_n,
    block_k=block_k,
    max_concurrent_steps=stages,
    grid_block_n=grid_block_n,
    transpose_rhs=transpose_w,
  )


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "stages", "grid_block_n"))
def tgmm(x, dy, group_sizes, *, block_m=128, block_n=128, block_k=64, stages=4, grid_block_n=1):
  """x [M, K], dy [M, N], group_sizes [G] -> [G, K, N]; K, N multiples of block_m, block_n
  (the kernel's names: its m is our K, its k our rows)."""
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  return transposed_ragged_dot_mgpu.transposed_ragged_dot(
    x,
    dy,
    group_sizes=group_sizes,
    block_m=block_m,
    block_n=block_n,
    block_k=block_k,
    max_concurrent_steps=stages,
    grid_block_n=grid_block_n,
  )
