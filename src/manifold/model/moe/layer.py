"""DeepSeekMoE: shared experts plus fine-grained routed experts, dropless.

Every token reaches its K experts (router.py; no capacity, no dropping): tokens are
sorted by expert and run through grouped matmuls (experts.py, kernels/grouped_matmul,
`model.grouped_matmul_impl`); `moe_impl = dense` runs every expert on every token
instead (the reference the tests compare against). Under a mesh the ragged path runs
once per device on its own tokens, dispatching them to the devices holding their
experts when the `expert` axis is longer than 1 (expert_parallel.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model.config import ModelConfig
from manifold.model.ffn import SwiGLU
from manifold.model.layers import normal, param
from manifold.model.moe.expert_parallel import routed_expert_parallel
from manifold.model.moe.experts import routed_dense, routed_ragged
from manifold.model.moe.router import RouterBias, route, sequence_balance_loss


class MoEAux(NamedTuple):
  """What one MoE layer reports besides its output."""

  load: jax.Array  # [E] (token, slot) pairs routed to each expert
  balance_loss: jax.Array  # [] the sequence-wise balance loss, before its weight


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

  def __call__(self, x_btd: jax.Array) -> tuple[jax.Array, MoEAux]:
    """x: [B, T, D] -> (y [B, T, D], the layer's expert load and balance loss)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    b, t, d = x_btd.shape
    x_nd = x_btd.reshape(b * t, d)
    scores = jax.nn.sigmoid(x_nd.astype(jnp.float32) @ self.router[...])  # [N, E], float32
    weights, experts = route(scores, jax.lax.stop_gradient(self.bias[...]), cfg)
    routed = routed_dense
    if cfg.moe_impl != "dense":  # auto is ragged everywhere; under a mesh: per device, not one global sort
      per_device = not jax.sharding.get_abstract_mesh().empty
      routed = (
        functools.partial(routed_expert_parallel, capacity_factor=cfg.expert_capacity_factor)
        if per_device
        else routed_ragged
      )
      routed = functools.partial(routed, matmul=cfg.grouped_matmul_impl)
    y = routed(x_nd, weights, experts, *(w[...].astype(dt) for w in (self.w_gate, self.w_up, self.w_down)))
    y = y.reshape(b, t, d)
    if self.shared is not None:
      y = y + self.shared(x_btd)
    e = cfg.n_routed_experts
    return y, MoEAux(
      load=jnp.bincount(experts.reshape(-1), length=e).astype(jnp.float32),
      balance_loss=sequence_balance_loss(scores.reshape(b, t, -1), experts.reshape(b, t, -1), e),
    )
