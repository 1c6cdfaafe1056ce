"""The plain definitions the grouped-matmul kernels are tested against.

Rows of x are sorted by group: group g owns rows [offset_g, offset_g + size_g), with
offsets the running sums of `group_sizes`; rows past sum(group_sizes) belong to no group.

    gmm(x [M, K], w [G, K, N], sizes [G])   -> [M, N]: row r of group g is x[r] @ w[g]; other rows 0
    tgmm(x [M, K], dy [M, N], sizes [G])    -> [G, K, N]: x[rows of g]^T @ dy[rows of g]

tgmm is gmm's weight gradient; gmm with w transposed to [G, N, K] is its input gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [M, K], w [G, K, N], group_sizes [G] int32 -> [M, N] in x's dtype."""
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x [M, K], dy [M, N], group_sizes [G] int32 -> [G, K, N] in x's dtype."""
  numbers = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
  )
  out = jax.lax.ragged_dot_general(x, dy, group_sizes, numbers, preferred_element_type=jnp.float32)
  return out.astype(x.dtype)
