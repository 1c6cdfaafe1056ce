"""The jitted training and evaluation steps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from manifold.model import diagnostics
from manifold.model.transformer import updated_router_biases
from manifold.parallel import sharding
from manifold.train.state import StateSpec, TrainState


def token_losses(spec: StateSpec, params, extra, batch_bt1: jax.Array) -> jax.Array:
  """Next-token cross-entropy in nats, [B, T], for a batch of T+1-token windows."""
  logits, _ = spec.merge(params, extra)(batch_bt1[:, :-1])  # [B, T, V]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch_bt1[:, 1:])  # [B, T]


def make_train_step(spec: StateSpec, tx: optax.GradientTransformation, mesh: Mesh, token_bytes: jax.Array, train_cfg):
  """`train_step_fn`, jitted over `mesh` with the state donated."""
  return sharding.jit_on_mesh(
    train_step_fn(spec, tx, token_bytes, train_cfg),
    mesh,
    in_shardings=(spec.shardings, sharding.batch_sharding(mesh)),
    out_shardings=(spec.shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def train_step_fn(spec: StateSpec, tx: optax.GradientTransformation, token_bytes: jax.Array, train_cfg):
  """`(state, batch [B, T+1]) -> (state, metrics)`, not jitted (`make_train_step` jits it;
  `manifold.islands.mesh` maps it over islands first).

  `token_bytes` [V] gives the UTF-8 bytes each token stands for (bits per byte). With
  MoE, the objective adds `train.balance_loss_weight` times the sequence-wise balance
  loss, and after the update each router bias moves by `train.router_bias_rate` toward
  an even load (outside the gradient); with MTP, it adds `train.mtp_weight` times the
  mean of the depths' losses. With `train.microbatches = M` the gradient is the mean of
  M equal slices' gradients (accumulated in float32), the same as one pass over B.
  """
  microbatches = train_cfg.microbatches
  model_cfg = spec.model_cfg

  def loss_fn(params, extra, batch):
    model = spec.merge(params, extra)
    logits, _, aux = model.forward_with_aux(batch[:, :-1])  # [B, T, V]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [B, T]
    objective = losses.mean()
    stats = {"nats": losses.sum()}
    if aux.expert_load is not None:
      objective = objective + train_cfg.balance_loss_weight * aux.balance_loss
      stats.update(expert_load=aux.expert_load, balance_loss=aux.balance_loss)
    if model_cfg.mtp_depth:  # depth k at position i predicts t_{i+k+1}
      depth_losses = [
        optax.softmax_cross_entropy_with_integer_labels(depth_logits, batch[:, k + 1 :]).mean()
        for k, depth_logits in enumerate(model.mtp_logits(aux.hidden, batch[:, :-1]), start=1)
      ]
      stats["mtp_loss"] = sum(depth_losses) / len(depth_losses)
      objective = objective + train_cfg.mtp_weight * stats["mtp_loss"]
    return objective, stats

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulated_grads(params, extra, batch):
    """Mean gradient over M slices [B/M, T+1]; stats summed (nats, load) or averaged."""
    slices = batch.reshape(batch.shape[0] // microbatches, microbatches, -1).swapaxes(0, 1)  # [M, B/M, T+1]
    slices = sharding.constrain(slices, (None, "batch", None))  # keep each slice split like the batch

    def like_params(tree):  # the float32 accumulator is sharded like the parameters, not replicated
      grads, stats = tree
      return jax.tree.map(jax.lax.with_sharding_constraint, grads, spec.shardings.params), stats

    def one(carry, mb):
      grads, stats = grad_fn(params, extra, mb)
      return like_params(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry, (grads, stats))), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(grad_fn, params, extra, slices[0]))
    (grads, stats), _ = jax.lax.scan(one, like_params(zeros), slices)
    mean = lambda tree: jax.tree.map(lambda g: g / microbatches, tree)  # noqa: E731
    averaged = {k: v / microbatches for k, v in stats.items() if k in ("balance_loss", "mtp_loss")}
    return mean(grads), {**stats, **averaged}

  def train_step(state: TrainState, batch: jax.Array):
    if microbatches == 1:
      grads, stats = grad_fn(state.params, state.extra, batch)
    else:
      grads, stats = accumulated_grads(state.params, state.extra, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": stats["nats"] / batch[:, 1:].size,
      "bits_per_byte": stats["nats"] / math.log(2) / token_bytes[batch[:, 1:]].sum(),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
    }
    if "mtp_loss" in stats:
      metrics["mtp_loss"] = stats["mtp_loss"]
    extra = state.extra
    if "expert_load" in stats:
      extra = updated_router_biases(extra, stats["expert_load"], model_cfg, train_cfg.router_bias_rate)
      metrics.update(_moe_metrics(stats["expert_load"], stats["balance_loss"], extra, model_cfg))
    return state.replace(step=state.step + 1, params=params, extra=extra, opt_state=opt_state), metrics

  return train_step


def _moe_metrics(expert_load, balance_loss, extra, model_cfg) -> dict[str, jax.Array]:
  """Balance of the load [L_moe, E] and the router biases after their update."""
  load_stats = diagnostics.expert_load_stats(expert_load)
  biases = jnp.stack([extra["blocks"][i]["ffn"]["bias"] for i in model_cfg.moe_blocks])  # [L_moe, E]
  return {
    "moe/balance_loss": balance_loss,
    "moe/load_max_over_mean": jnp.max(load_stats["load_max_over_mean_per_layer"]),
    "moe/load_cv": jnp.mean(load_stats["load_cv_per_layer"]),
    "moe/bias_abs_max": jnp.max(jnp.abs(biases)),
    "moe/bias_std": jnp.mean(jnp.std(biases, axis=-1)),
    **{f"moe/{k}": v for k, v in load_stats.items()},
  }


def make_eval_step(spec: StateSpec, mesh: Mesh, token_bytes: jax.Array):
  """`(params, extra, batch [B, T+1]) -> {nats, bytes, tokens}` sums for one batch."""

  def eval_step(params, extra, batch):
    losses = token_losses(spec, params, extra, batch)
    return {
      "nats": losses.sum(),
      "bytes": token_bytes[batch[:, 1:]].sum(),
      "tokens": jnp.array(losses.size, jnp.float32),
    }

  return _on_batches(eval_step, spec, mesh)


def make_residual_stats_step(spec: StateSpec, mesh: Mesh):
  """`(params, extra, batch [B, T+1]) -> mixing_stats` of the residual streams' H_res."""

  def residual_stats(params, extra, batch):
    _, _, aux = spec.merge(params, extra).forward_with_aux(batch[:, :-1])
    return diagnostics.mixing_stats(aux.h_res)

  return _on_batches(residual_stats, spec, mesh)


def _on_batches(fn, spec: StateSpec, mesh: Mesh):
  """`fn(params, extra, batch)` jitted over the mesh, its outputs replicated."""
  return sharding.jit_on_mesh(
    fn,
    mesh,
    in_shardings=(spec.shardings.params, spec.shardings.extra, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
