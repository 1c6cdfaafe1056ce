"""DeepSeek-V3 routing: which K experts each token reaches and with what weights, the
sequence-wise balance loss, and the auxiliary-loss-free bias update.

Affinities s = sigmoid(x W_r) [N, E]; experts are *chosen* by s + b (b: per-expert bias,
moved outside the gradient toward an even load), optionally only within the `topk_group`
groups whose two best biased scores sum highest; the chosen experts are *weighted* by
their unbiased s, normalised to sum 1 and scaled by `routed_scaling_factor`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model.config import ModelConfig


class RouterBias(nnx.Variable):
  """Per-expert selection bias: trained by the load-balancing rule, not by gradients."""


class Routing(NamedTuple):
  weights: jax.Array  # [N, K] gate weights (sum to routed_scaling_factor when normalised)
  experts: jax.Array  # [N, K] int32 chosen experts
  scores: jax.Array  # [N, E] unbiased sigmoid affinities


def route(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """(weights [N, K], experts [N, K]) from affinities [N, E] and the selection bias [E]."""
  n, e = scores.shape
  choice = scores + bias  # [N, E]
  if cfg.n_group > 1:
    per_group = e // cfg.n_group
    group_scores = jax.lax.top_k(choice.reshape(n, cfg.n_group, per_group), 2)[0].sum(-1)  # [N, G]
    top_groups = jax.lax.top_k(group_scores, cfg.topk_group)[1]  # [N, topk_group]
    keep_group = jnp.sum(jax.nn.one_hot(top_groups, cfg.n_group, dtype=jnp.bool_), axis=1)  # [N, G]
    choice = jnp.where(jnp.repeat(keep_group, per_group, axis=1), choice, -jnp.inf)
  experts = jax.lax.top_k(choice, cfg.experts_per_token)[1]  # [N, K]
  weights = jnp.take_along_axis(scores, experts, axis=-1)  # [N, K], unbiased
  if cfg.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, experts


def sequence_balance_loss(scores_bte: jax.Array, experts_btk: jax.Array, num_experts: int) -> jax.Array:
  """DeepSeek-V3's complementary sequence-wise balance loss (before its weight alpha):
  mean over sequences of sum_i f_i P_i, with f_i = E / (K T) * #tokens choosing i and
  P_i = mean over tokens of s_i / sum_j s_j."""
  _, t, k = experts_btk.shape
  chosen = jnp.sum(jax.nn.one_hot(experts_btk, num_experts, dtype=jnp.float32), axis=2)  # [B, T, E]
  f = num_experts / (k * t) * jnp.sum(chosen, axis=1)  # [B, E]
  p = jnp.mean(scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True), axis=1)  # [B, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


def updated_bias(bias_e: jax.Array, load_e: jax.Array, rate: float) -> jax.Array:
  """Auxiliary-loss-free balancing: b_e + rate * sign(mean load - load_e), [E] -> [E]."""
  return bias_e + rate * jnp.sign(jnp.mean(load_e) - load_e)
