"""The routed experts' SwiGLU on rows grouped by expert: two grouped matmuls (gate and
up fused into one, then down) from kernels/grouped_matmul, on the implementation
`model.grouped_matmul_impl` names, with a backward pass that finishes each layer's weight
gradients before handing the input gradient on.

Without that, XLA may schedule the weight-gradient matmuls of every MoE layer at the
end of the backward pass (they feed nothing but the gradient sum), keeping each layer's
[rows, D] inputs and [rows, F] hidden gradients alive across all layers: with expert
parallelism's worst-case buffers that is gigabytes per layer (a 27B model on v5p:
about 4 GiB per layer per chip). An optimization barrier over (input gradient, weight
gradients) ties them together.

`routed_ragged` sorts (token, slot) pairs by expert and runs them through that SwiGLU;
`routed_dense` runs every expert on every token: the reference the tests hold it to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from kernels.grouped_matmul.api import gmm, varying


def _gate_up(xs, w_gate, w_up, group_sizes, matmul):
  f = w_gate.shape[2]
  h = gmm(xs, jnp.concatenate([w_gate, w_up], axis=2), group_sizes, matmul)  # [R, 2F]: one pass over xs
  return h[:, :f], h[:, f:]  # [R, F] each


def _down(gate, up, w_down, group_sizes, matmul):
  return gmm(jax.nn.silu(gate) * up, w_down, group_sizes, matmul)  # [R, D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def grouped_swiglu(xs, w_gate, w_up, w_down, group_sizes, matmul="auto"):
  """xs [R, D] sorted by expert, group_sizes [E] int32 (rows past their sum come out
  zero), w_gate / w_up [E, D, F], w_down [E, F, D] -> [R, D]. `matmul`: the grouped-matmul
  implementation (kernels/grouped_matmul/api.py)."""
  return _down(*_gate_up(xs, w_gate, w_up, group_sizes, matmul), w_down, group_sizes, matmul)


def _forward(xs, w_gate, w_up, w_down, group_sizes, matmul):
  gate, up = _gate_up(xs, w_gate, w_up, group_sizes, matmul)
  return _down(gate, up, w_down, group_sizes, matmul), (xs, gate, up, w_gate, w_up, w_down, group_sizes)


def _backward(matmul, residuals, dy):
  # The primal outputs of these vjps go unused and XLA drops them: no matmul is redone.
  xs, gate, up, w_gate, w_up, w_down, group_sizes = residuals
  _, down_vjp = jax.vjp(lambda g, u, w: _down(g, u, w, group_sizes, matmul), gate, up, w_down)
  d_gate, d_up, d_w_down = down_vjp(dy)
  _, gate_up_vjp = jax.vjp(lambda x, wg, wu: _gate_up(x, wg, wu, group_sizes, matmul), xs, w_gate, w_up)
  d_xs, d_w_gate, d_w_up = gate_up_vjp((d_gate, d_up))
  # The input gradient leaves only once the weight gradients exist: XLA cannot defer them.
  # (Under shard_map a barrier gives its outputs the union of its inputs' varying mesh
  # axes, so weight gradients that vary where d_xs does not, an FFN split over `tensor`,
  # stay out of it.)
  tied = [g for g in (d_w_gate, d_w_up, d_w_down) if varying(g) <= varying(d_xs)]
  d_xs = jax.lax.optimization_barrier((d_xs, *tied))[0]
  return d_xs, d_w_gate, d_w_up, d_w_down, None


grouped_swiglu.defvjp(_forward, _backward)


def sort_by_expert(experts_nk: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """experts [N, K] -> (order [N K]: the (token, slot) pair, flat n K + k, of each sorted row;
  rank [N K]: the sorted row of each pair (order's inverse); group_sizes [E] int32)."""
  flat = experts_nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  return order, inverse_permutation(order), jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  """perm [R], a permutation of 0..R-1 -> its inverse [R]."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype), unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch_rows(x_nd, order, rank, k):
  """x [N, D] -> [N K, D], row r = x[order[r] // k]. Its gradient gathers each token's K
  rows (rank) and sums them: no scatter-add with colliding indices."""
  return x_nd[order // k]


def _dispatch_forward(x_nd, order, rank, k):
  return dispatch_rows(x_nd, order, rank, k), (rank, x_nd.shape[0])


def _dispatch_backward(k, saved, d_rows):
  rank, n = saved
  per_token = d_rows[rank].reshape(n, k, -1)
  return per_token.sum(axis=1, dtype=jnp.float32).astype(d_rows.dtype), None, None


dispatch_rows.defvjp(_dispatch_forward, _dispatch_backward)


@jax.custom_vjp
def permute_rows(rows, perm, inverse):
  """rows [R, D] -> rows[perm], perm a permutation with inverse `inverse`; the gradient is
  a gather by the inverse, not a scatter."""
  return rows[perm]


def _permute_forward(rows, perm, inverse):
  return rows[perm], inverse


def _permute_backward(inverse, d_rows):
  return d_rows[inverse], None, None


permute_rows.defvjp(_permute_forward, _permute_backward)


def routed_ragged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, matmul="auto"):
  """Sorted-by-expert grouped matmuls: x [N, D] -> sum_k w[n, k] * expert_{e[n, k]}(x[n]) [N, D]."""
  n, k = experts_nk.shape
  order, rank, group_sizes = sort_by_expert(experts_nk, w_gate.shape[0])
  ys = grouped_swiglu(dispatch_rows(x_nd, order, rank, k), w_gate, w_up, w_down, group_sizes, matmul)  # [N K, D]
  return weighted_sum(permute_rows(ys, rank, order).reshape(n, k, -1), weights_nk)


def weighted_sum(pairs_nkd: jax.Array, weights_nk: jax.Array) -> jax.Array:
  """sum_k w[n, k] pairs[n, k] -> [N, D] in pairs' dtype: products in that dtype (so the
  backward pass keeps no float32 copy of the pairs), their sum in float32."""
  products = pairs_nkd * weights_nk.astype(pairs_nkd.dtype)[..., None]
  return jnp.sum(products, axis=1, dtype=jnp.float32).astype(pairs_nkd.dtype)


def routed_dense(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down):
  """The reference: every expert on every token, combined with the (mostly zero) gate weights."""
  num_experts = w_gate.shape[0]
  combine = jnp.einsum("nk,nke->ne", weights_nk, jax.nn.one_hot(experts_nk, num_experts, dtype=weights_nk.dtype))
  hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x_nd, w_gate)) * jnp.einsum("nd,edf->nef", x_nd, w_up)
  ys = jnp.einsum("nef,efd->ned", hidden, w_down)  # [N, E, D]
  return jnp.einsum("ne,ned->nd", combine.astype(ys.dtype), ys)
