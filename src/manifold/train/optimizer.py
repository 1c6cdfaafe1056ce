"""AdamW (weight decay on matrices) with linear warmup, cosine or step decay, and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _step_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup, then constant with drops to `lr_decay_to[i] * learning_rate` at
  `lr_decay_at[i] * steps` (DeepSeek-V3 and the mHC paper: 0.316x at 80%, 0.1x at 90%)."""
  peak = train_cfg.learning_rate
  at = [float(f) for f in train_cfg.lr_decay_at.split(",") if f.strip()]
  to = [float(f) for f in train_cfg.lr_decay_to.split(",") if f.strip()]
  warmup = optax.linear_schedule(0.0, peak, train_cfg.warmup_steps)
  boundaries = [round(f * train_cfg.steps) - train_cfg.warmup_steps for f in at]
  multiples = [1.0, *to]
  scales = {b: after / before for b, before, after in zip(boundaries, multiples, multiples[1:])}
  plateau = optax.piecewise_constant_schedule(peak, scales)
  return optax.join_schedules([warmup, plateau], [train_cfg.warmup_steps])


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then (`lr_schedule`) cosine decay to
  `learning_rate * min_lr_ratio` or step decay."""
  if train_cfg.lr_schedule == "step":
    return _step_schedule(train_cfg)
  peak = train_cfg.learning_rate
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=train_cfg.warmup_steps,
    decay_steps=train_cfg.steps,
    end_value=peak * train_cfg.min_lr_ratio,
  )


# HyperConnection's static parts (model/residual.py): the HC paper applies no weight decay to
# them, so b_res [n, n] stays near its identity start. mHC's projection phi [n D, 2n + n^2] is
# a matrix like any other and decays; its gates alpha and biases are vectors.
NO_DECAY = frozenset({"b_pre", "b_post", "b_res"})


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales, other vectors and HC's static parts
  (`NO_DECAY`, matched by the leaf's name in the params tree) are exempt."""

  def decays(path, p) -> bool:
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    return p.ndim >= 2 and name not in NO_DECAY

  return jax.tree_util.tree_map_with_path(decays, params)


def stored_as(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`inner` with its float32 state kept in `dtype`: each update reads the state back as float32,
  runs `inner` and rounds the new state to `dtype` (optax's `mu_dtype` covers only the first moment)."""
  if jnp.dtype(dtype) == jnp.float32:
    return inner
  cast = lambda tree, a, b: jax.tree.map(lambda x: x.astype(b) if x.dtype == a else x, tree)  # noqa: E731

  def init(params):
    return cast(inner.init(params), jnp.float32, dtype)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, cast(state, dtype, jnp.float32), params)
    return updates, cast(state, jnp.float32, dtype)

  return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
  adamw = optax.adamw(
    learning_rate_schedule(train_cfg),
    b1=train_cfg.b1,
    b2=train_cfg.b2,
    eps=train_cfg.eps,
    weight_decay=train_cfg.weight_decay,
    mask=_decay_mask,
  )
  parts.append(stored_as(adamw, train_cfg.moments_dtype))
  return optax.chain(*parts)
