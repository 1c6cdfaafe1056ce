"""The routed experts' SwiGLU on rows grouped by expert: three grouped matmuls
(`jax.lax.ragged_dot`), with a backward pass that finishes each layer's weight gradients
before handing the input gradient on.

Without that, XLA may schedule the weight-gradient matmuls of every MoE layer at the
end of the backward pass (they feed nothing but the gradient sum), keeping each layer's
[rows, D] inputs and [rows, F] hidden gradients alive across all layers: with expert
parallelism's worst-case buffers that is gigabytes per layer (a 27B model on v5p:
about 4 GiB per layer per chip). An optimization barrier over (input gradient, weight
gradients) ties them together.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _gate_up(xs, w_gate, w_up, group_sizes):
  return jax.lax.ragged_dot(xs, w_gate, group_sizes), jax.lax.ragged_dot(xs, w_up, group_sizes)  # [R, F] each


def _down(gate, up, w_down, group_sizes):
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [R, D]


@jax.custom_vjp
def grouped_swiglu(xs, w_gate, w_up, w_down, group_sizes):
  """xs [R, D] sorted by expert, group_sizes [E] int32 (rows past their sum come out
  zero), w_gate / w_up [E, D, F], w_down [E, F, D] -> [R, D]."""
  return _down(*_gate_up(xs, w_gate, w_up, group_sizes), w_down, group_sizes)


def _forward(xs, w_gate, w_up, w_down, group_sizes):
  gate, up = _gate_up(xs, w_gate, w_up, group_sizes)
  return _down(gate, up, w_down, group_sizes), (xs, gate, up, w_gate, w_up, w_down, group_sizes)


def _backward(residuals, dy):
  # The primal outputs of these vjps go unused and XLA drops them: no matmul is redone.
  xs, gate, up, w_gate, w_up, w_down, group_sizes = residuals
  _, down_vjp = jax.vjp(lambda g, u, w: _down(g, u, w, group_sizes), gate, up, w_down)
  d_gate, d_up, d_w_down = down_vjp(dy)
  _, gate_up_vjp = jax.vjp(lambda x, wg, wu: _gate_up(x, wg, wu, group_sizes), xs, w_gate, w_up)
  d_xs, d_w_gate, d_w_up = gate_up_vjp((d_gate, d_up))
  # The input gradient leaves only once the weight gradients exist: XLA cannot defer them.
  # (Under shard_map a barrier gives its outputs the union of its inputs' varying mesh
  # axes, so weight gradients that vary where d_xs does not, an FFN split over `tensor`,
  # stay out of it.)
  tied = [g for g in (d_w_gate, d_w_up, d_w_down) if _varying(g) <= _varying(d_xs)]
  d_xs = jax.lax.optimization_barrier((d_xs, *tied))[0]
  return d_xs, d_w_gate, d_w_up, d_w_down, None


def _varying(x: jax.Array) -> frozenset[str]:
  """The shard_map mesh axes along which `x` differs between devices."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10; later versions: aval.vma
  return manual.varying if manual is not None else aval.vma


grouped_swiglu.defvjp(_forward, _backward)


def routed_ragged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down):
  """Sorted-by-expert grouped matmuls: x [N, D] -> sum_k w[n, k] * expert_{e[n, k]}(x[n]) [N, D]."""
  n, k = experts_nk.shape
  num_experts = w_gate.shape[0]
  flat = experts_nk.reshape(-1)  # [N K]
  order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
  token = order // k
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
  xs = x_nd[token]  # [N K, D]
  ys = grouped_swiglu(xs, w_gate, w_up, w_down, group_sizes) * weights_nk.reshape(-1)[order][:, None].astype(xs.dtype)
  return jnp.zeros_like(x_nd).at[token].add(ys)  # [N, D]
