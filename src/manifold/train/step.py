"""The jitted training and evaluation steps."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from manifold.model import diagnostics
from manifold.model.attention import document_ids
from manifold.model.transformer import updated_router_biases
from manifold.parallel import sharding
from manifold.train.state import StateSpec, TrainState


def segments(inputs_bt: jax.Array, separator: int | None) -> jax.Array | None:
  """The packed documents of the model's inputs [B, T] (`document_ids`), or None when
  documents are not masked from each other (`separator` None)."""
  return None if separator is None else document_ids(inputs_bt, separator)


def token_losses(spec: StateSpec, params, extra, batch_bt1: jax.Array, separator: int | None = None) -> jax.Array:
  """Next-token cross-entropy in nats, [B, T], for a batch of T+1-token windows."""
  inputs = batch_bt1[:, :-1]
  logits, _, _ = spec.merge(params, extra).forward_with_aux(inputs, segment_ids_bt=segments(inputs, separator))
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch_bt1[:, 1:])  # [B, T]


def make_train_step(
  spec: StateSpec,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  token_bytes: jax.Array,
  train_cfg,
  separator: int | None = None,
):
  """`train_step_fn`, jitted over `mesh` with the state donated."""
  return sharding.jit_on_mesh(
    train_step_fn(spec, tx, token_bytes, train_cfg, separator=separator),
    mesh,
    in_shardings=(spec.shardings, sharding.batch_sharding(mesh)),
    out_shardings=(spec.shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def next_token_objective(logits: jax.Array, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy of `logits` [B, T, V] against the batch [B, T+1], and its sum ("nats")."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])  # [B, T]
  return losses.mean(), {"nats": losses.sum()}


def batch_tokens(batch) -> jax.Array:
  """The [B, T+1] tokens of a batch: the array itself, or a dict's "tokens" (with per-row extras)."""
  return batch["tokens"] if isinstance(batch, dict) else batch


def train_step_fn(
  spec: StateSpec,
  tx: optax.GradientTransformation,
  token_bytes: jax.Array,
  train_cfg,
  objective=next_token_objective,
  *,
  separator: int | None = None,
):
  """`(state, batch) -> (state, metrics)`, not jitted (`make_train_step` jits it;
  `manifold.islands.mesh` maps it over islands first).

  The batch is [B, T+1] tokens, or a dict of per-row arrays with "tokens" that `objective`
  reads (distillation). `objective(logits [B, T, V], batch) -> (loss, stats)` is the token
  term; its stats are sums over the batch, and with "nats" (label cross-entropy) the
  metrics report loss and bits per byte from them (else loss is the objective's value).

  `token_bytes` [V] gives the UTF-8 bytes each token stands for (bits per byte). With a
  `separator` (`document_separator`: the end-of-text id under `train.document_mask`) each
  token attends only within its packed document, in the main model and the MTP depths. With
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
    tokens = batch_tokens(batch)
    documents = segments(tokens[:, :-1], separator)  # [B, T] or None
    logits, _, aux = model.forward_with_aux(tokens[:, :-1], segment_ids_bt=documents)  # [B, T, V]
    loss, stats = objective(logits, batch)
    stats = {**stats, "objective": loss}
    if aux.expert_load is not None:
      loss = loss + train_cfg.balance_loss_weight * aux.balance_loss
      stats.update(expert_load=aux.expert_load, balance_loss=aux.balance_loss)
    if model_cfg.mtp_depth:  # depth k at position i predicts t_{i+k+1}
      depth_losses = [
        optax.softmax_cross_entropy_with_integer_labels(depth_logits, tokens[:, k + 1 :]).mean()
        for k, depth_logits in enumerate(model.mtp_logits(aux.hidden, tokens[:, :-1], documents), start=1)
      ]
      stats["mtp_loss"] = sum(depth_losses) / len(depth_losses)
      loss = loss + train_cfg.mtp_weight * stats["mtp_loss"]
    return loss, stats

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulated_grads(params, extra, batch):
    """Mean gradient over M slices [B/M, T+1]; stats summed (nats, load) or averaged."""

    def split(a):  # [B, ...] -> [M, B/M, ...], each slice split like the batch
      a = a.reshape(a.shape[0] // microbatches, microbatches, *a.shape[1:]).swapaxes(0, 1)
      return sharding.constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

    slices = jax.tree.map(split, batch)

    def like_params(tree):  # the float32 accumulator is sharded like the parameters, not replicated
      grads, stats = tree
      return jax.tree.map(jax.lax.with_sharding_constraint, grads, spec.shardings.params), stats

    def one(carry, mb):
      grads, stats = grad_fn(params, extra, mb)
      return like_params(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry, (grads, stats))), None

    first = jax.tree.map(lambda a: a[0], slices)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), jax.eval_shape(grad_fn, params, extra, first))
    (grads, stats), _ = jax.lax.scan(one, like_params(zeros), slices)
    mean = lambda tree: jax.tree.map(lambda g: g / microbatches, tree)  # noqa: E731
    averaged = {k: v / microbatches for k, v in stats.items() if k in ("balance_loss", "mtp_loss", "objective")}
    return mean(grads), {**stats, **averaged}

  def train_step(state: TrainState, batch: jax.Array):
    if microbatches == 1:
      grads, stats = grad_fn(state.params, state.extra, batch)
    else:
      grads, stats = accumulated_grads(state.params, state.extra, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    labels = batch_tokens(batch)[:, 1:]
    positions = stats.get("positions", labels.size)
    metrics = {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params)}
    if "nats" in stats:
      metrics["loss"] = stats["nats"] / positions
      metrics["bits_per_byte"] = stats["nats"] / math.log(2) / token_bytes[labels].sum()
    else:
      metrics["loss"] = stats["objective"]
    if "mtp_loss" in stats:
      metrics["mtp_loss"] = stats["mtp_loss"]
    if objective is not next_token_objective:  # its other stats are sums over positions
      metrics["objective"] = stats["objective"]
      reserved = ("nats", "positions", "objective", "mtp_loss", "expert_load", "balance_loss")
      metrics.update({k: v / positions for k, v in stats.items() if k not in reserved})
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


def make_eval_step(spec: StateSpec, mesh: Mesh, token_bytes: jax.Array, separator: int | None = None):
  """`(params, extra, batch [B, T+1]) -> {nats, bytes, tokens}` sums for one batch (documents
  masked as in training: `separator` as `train_step_fn` takes it)."""

  def eval_step(params, extra, batch):
    losses = token_losses(spec, params, extra, batch, separator)
    return {
      "nats": losses.sum(),
      "bytes": token_bytes[batch[:, 1:]].sum(),
      "tokens": jnp.array(losses.size, jnp.float32),
    }

  return _on_batches(eval_step, spec, mesh)


def make_residual_stats_step(spec: StateSpec, mesh: Mesh, separator: int | None = None):
  """`(params, extra, batch [B, T+1]) -> mixing_stats` of the residual streams' H_res."""

  def residual_stats(params, extra, batch):
    inputs = batch[:, :-1]
    _, _, aux = spec.merge(params, extra).forward_with_aux(inputs, segment_ids_bt=segments(inputs, separator))
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
