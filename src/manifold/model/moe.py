"""DeepSeekMoE: shared experts plus fine-grained routed experts, dropless.

Routing (DeepSeek-V3): affinities s = sigmoid(x W_r) [N, E]; experts are *chosen* by
s + b (b: per-expert bias, updated outside the gradient for auxiliary-loss-free load
balancing), optionally only within the `topk_group` groups whose two best biased scores
sum highest; the chosen experts are *weighted* by their unbiased s, normalised to sum 1
and scaled by `routed_scaling_factor`. Every token reaches its K experts (no capacity,
no dropping): tokens are sorted by expert and run through grouped matmuls
(kernels/grouped_matmul, `model.grouped_matmul_impl`); `moe_impl = dense` runs every expert on every token instead (the
reference the tests compare against). Under a mesh the ragged path runs once per device
on its own tokens, dispatching them to the devices holding their experts when the
`expert` axis is longer than 1 (`manifold.parallel.expert_parallel`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model.config import ModelConfig
from manifold.model.ffn import SwiGLU
from manifold.model.grouped_ffn import routed_ragged
from manifold.model.layers import normal, param
from manifold.parallel import expert_parallel  # a module: expert_parallel imports grouped_ffn from here


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


def routed_dense(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down):
  """The reference: every expert on every token, combined with the (mostly zero) gate weights."""
  num_experts = w_gate.shape[0]
  combine = jnp.einsum("nk,nke->ne", weights_nk, jax.nn.one_hot(experts_nk, num_experts, dtype=weights_nk.dtype))
  hidden = jax.nn.silu(jnp.einsum("nd,edf->nef", x_nd, w_gate)) * jnp.einsum("nd,edf->nef", x_nd, w_up)
  ys = jnp.einsum("nef,efd->ned", hidden, w_down)  # [N, E, D]
  return jnp.einsum("ne,ned->nd", combine.astype(ys.dtype), ys)


def sequence_balance_loss(scores_bte: jax.Array, experts_btk: jax.Array, num_experts: int) -> jax.Array:
  """DeepSeek-V3's complementary sequence-wise balance loss (before its weight alpha):
  mean over sequences of sum_i f_i P_i, with f_i = E / (K T) * #tokens choosing i and
  P_i = mean over tokens of s_i / sum_j s_j."""
  _, t, k = experts_btk.shape
  chosen = jnp.sum(jax.nn.one_hot(experts_btk, num_experts, dtype=jnp.float32), axis=2)  # [B, T, E]
  f = num_experts / (k * t) * jnp.sum(chosen, axis=1)  # [B, E]
  p = jnp.mean(scores_bte / jnp.sum(scores_bte, axis=-1, keepdims=True), axis=1)  # [B, E]
  return jnp.mean(jnp.sum(f * p, axis=-1))


class MoE(nnx.Module):
  """Shared experts (one SwiGLU of width n_shared * moe_d_ff) + routed experts."""

  def __init__(self, cfg: ModelConfig, *, out_std: float, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
    self.router = param(rngs, normal(cfg.init_std), (d, e), ("embed", None))
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
    self.w_gate = param(rngs, normal(cfg.init_std), (e, d, f), ("expert", "embed", "mlp"))
    self.w_up = param(rngs, normal(cfg.init_std), (e, d, f), ("expert", "embed", "mlp"))
    self.w_down = param(rngs, normal(out_std), (e, f, d), ("expert", "mlp", "embed"))
    self.shared = (
      SwiGLU(cfg, d_ff=cfg.n_shared_experts * f, out_std=out_std, rngs=rngs) if cfg.n_shared_experts else None
    )
    self.cfg = cfg

  def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x: [B, T, D] -> (y [B, T, D], {"load": [E] tokens per expert, "balance_loss": []})."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    scores = jax.nn.sigmoid(x_nd.astype(jnp.float32) @ self.router[...])  # [N, E], float32
    weights, experts = route(scores, jax.lax.stop_gradient(self.bias[...]), cfg)
    routed = routed_dense
    if cfg.moe_impl == "ragged":  # under a mesh: per device, not one global sort
      per_device = not jax.sharding.get_abstract_mesh().empty
      routed = functools.partial(
        expert_parallel.routed_expert_parallel if per_device else routed_ragged, matmul=cfg.grouped_matmul_impl
      )
    y = routed(x_nd, weights, experts, *(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)))
    y = y.reshape(b, t, d)
    if self.shared is not None:
      y = y + self.shared(x_btd)
    aux = {
      "load": jnp.bincount(experts.reshape(-1), length=cfg.n_routed_experts).astype(jnp.float32),
      "balance_loss": sequence_balance_loss(scores.reshape(b, t, -1), experts.reshape(b, t, -1), cfg.n_routed_experts),
    }
    return y, aux

  def update_bias(self, load: jax.Array, rate: float) -> None:
    """Auxiliary-loss-free balancing: b_e += rate * sign(mean load - load_e)."""
    self.bias[...] = self.bias[...] + rate * jnp.sign(jnp.mean(load) - load)
