"""Stability diagnostics of the residual-stream mixing matrices (the mHC paper's section on HC's instability).

Input everywhere: H_res for every layer, [L, B, T, n, n] with H_res[k, j] the weight of
input stream j in output stream k, so layer l maps x_{l+1} = H_l x_l. A matrix's forward
gain is its maximum absolute row sum (the most it amplifies a signal, in the max norm), its
backward gain its maximum absolute column sum (the same for a gradient, which flows through
the transpose); "Amax gain" is the larger of the two. The mHC paper reports the two separately
for the composite from layer l to the last, H_{L-1} ... H_l, averaged over tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def forward_gain(m: jax.Array) -> jax.Array:
  """[..., n, n] -> [...]: the maximum absolute row sum, max_k sum_j |m[k, j]|."""
  return jnp.max(jnp.sum(jnp.abs(m), axis=-1), axis=-1)


def backward_gain(m: jax.Array) -> jax.Array:
  """[..., n, n] -> [...]: the maximum absolute column sum, max_j sum_k |m[k, j]|."""
  return jnp.max(jnp.sum(jnp.abs(m), axis=-2), axis=-1)


def amax_gain(m: jax.Array) -> jax.Array:
  """[..., n, n] -> [...]: the larger of the forward and backward gains."""
  return jnp.maximum(forward_gain(m), backward_gain(m))


def composite_mixing(h_res: jax.Array) -> jax.Array:
  """Running products `H_l ... H_1 H_0` for l = 0..L-1: [L, B, T, n, n] -> [L, B, T, n, n]."""

  def step(carry, h):
    product = jnp.einsum("...kj,...ji->...ki", h, carry)
    return product, product

  identity = jnp.broadcast_to(jnp.eye(h_res.shape[-1], dtype=h_res.dtype), h_res.shape[1:])
  return jax.lax.scan(step, identity, h_res)[1]


def composite_from_layer(h_res: jax.Array) -> jax.Array:
  """Products `H_{L-1} ... H_{l+1} H_l` for l = 0..L-1, the map from layer l's input to the
  last layer's output: [L, B, T, n, n] -> [L, B, T, n, n]."""

  def step(carry, h):
    product = jnp.einsum("...kj,...ji->...ki", carry, h)
    return product, product

  identity = jnp.broadcast_to(jnp.eye(h_res.shape[-1], dtype=h_res.dtype), h_res.shape[1:])
  return jax.lax.scan(step, identity, h_res, reverse=True)[1]


def doubly_stochastic_deviation(h_res: jax.Array) -> jax.Array:
  """[..., n, n] -> [...]: the largest |row sum - 1| or |column sum - 1| (0 for doubly stochastic)."""
  rows = jnp.abs(jnp.sum(h_res, axis=-1) - 1).max(axis=-1)
  cols = jnp.abs(jnp.sum(h_res, axis=-2) - 1).max(axis=-1)
  return jnp.maximum(rows, cols)


def mixing_stats(h_res: jax.Array) -> dict[str, jax.Array]:
  """Per-layer and whole-network statistics, reduced over tokens (max unless named mean).

  Returns scalars and per-layer vectors [L] (plus the token-mean H_res [L, n, n]). The
  `composite_gain_per_layer` is the Amax gain of `H_l ... H_0` (max over tokens); the paper's
  `forward_gain_from_layer` / `backward_gain_from_layer` are those of `H_{L-1} ... H_l`
  (token-mean), and `forward_gain` / `backward_gain` their values for the whole network (l = 0).
  """
  h = h_res.astype(jnp.float32)
  token_axes = (1, 2)
  composite = composite_mixing(h)
  composite_gain = amax_gain(composite)  # [L, B, T]
  to_last = composite_from_layer(h)  # [L, B, T, n, n]
  per_layer = {
    "max_row_sum_per_layer": jnp.max(forward_gain(h), axis=token_axes),
    "max_col_sum_per_layer": jnp.max(backward_gain(h), axis=token_axes),
    "ds_deviation_per_layer": jnp.max(doubly_stochastic_deviation(h), axis=token_axes),
    "composite_gain_per_layer": jnp.max(composite_gain, axis=token_axes),
    "forward_gain_from_layer": jnp.mean(forward_gain(to_last), axis=token_axes),
    "backward_gain_from_layer": jnp.mean(backward_gain(to_last), axis=token_axes),
  }
  return {
    **per_layer,
    "h_res_mean": jnp.mean(h, axis=token_axes),
    "max_row_sum": jnp.max(per_layer["max_row_sum_per_layer"]),
    "max_col_sum": jnp.max(per_layer["max_col_sum_per_layer"]),
    "ds_deviation": jnp.max(per_layer["ds_deviation_per_layer"]),
    "amax_gain": per_layer["composite_gain_per_layer"][-1],
    "amax_gain_mean": jnp.mean(composite_gain[-1]),
    "forward_gain": per_layer["forward_gain_from_layer"][0],
    "backward_gain": per_layer["backward_gain_from_layer"][0],
  }


def expert_load_stats(load: jax.Array) -> dict[str, jax.Array]:
  """Per-MoE-layer balance of tokens per expert, load [L_moe, E]: max / mean and the
  coefficient of variation (std / mean); both 1 and 0 for a perfectly even load."""
  mean = jnp.mean(load, axis=-1)
  return {
    "load_max_over_mean_per_layer": jnp.max(load, axis=-1) / mean,
    "load_cv_per_layer": jnp.std(load, axis=-1) / mean,
  }
