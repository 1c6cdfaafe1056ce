"""Divergences between a teacher's and a student's next-token distributions, and the distillation loss.

P is the teacher, Q the student; both arrive as log-probabilities over the last axis.

  forward_kl  KL(P || Q) = sum_v P (log P - log Q)                  Hinton et al. 2015; mode-covering
  reverse_kl  KL(Q || P)                                            GKD's on-policy choice; mode-seeking
  jsd         beta KL(P || M) + (1 - beta) KL(Q || M),              GKD's generalised Jensen-Shannon
              M = beta P + (1 - beta) Q                             (beta -> 0: ~ beta forward KL; beta -> 1: ~ reverse)

The loss of a token is `w * T^2 * D(P_T || Q_T) + (1 - w) * CE(label, Q_1)`, with P_T, Q_T the
distributions at temperature T (T^2 keeps the gradient's scale as T changes; Hinton et al.).

From a top-k cache the teacher is its k likeliest tokens plus one bucket for the rest of its
mass; the student's distribution is folded onto the same k + 1 buckets and D is taken between
the folded pair. With k = V there is no rest bucket and the result is the full-vocabulary D.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """sum_v p (log p - log q) over the last axis; a term with p = 0 is 0 (and passes no gradient)."""
  empty = jnp.isneginf(logp)
  safe_p = jnp.where(empty, 0.0, logp)
  safe_q = jnp.where(empty, 0.0, logq)
  return jnp.sum(jnp.where(empty, 0.0, jnp.exp(safe_p) * (safe_p - safe_q)), axis=-1)


def divergence(teacher_logp: jax.Array, student_logp: jax.Array, kind: str, beta: float = 0.5) -> jax.Array:
  """[...] D(P || Q) per position, for log-probabilities [..., V] (or [..., k + 1] buckets)."""
  if kind == "forward_kl":
    return _kl(teacher_logp, student_logp)
  if kind == "reverse_kl":
    return _kl(student_logp, teacher_logp)
  if kind == "jsd":
    mixture = jnp.logaddexp(math.log(beta) + teacher_logp, math.log1p(-beta) + student_logp)
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)
  raise ValueError(f"divergence {kind!r}: use one of {', '.join(DIVERGENCES)}")


def top_k_teacher(teacher_logits: jax.Array, k: int, temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What the cache stores per position: (ids [..., k] int32, their log-probs [..., k] at
  `temperature`, log of the rest of the mass [...]; -inf when k = V)."""
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  top_logp, ids = jax.lax.top_k(logp, k)
  return ids.astype(jnp.int32), top_logp, _log_rest(logp, ids)


def _log_rest(logp: jax.Array, ids: jax.Array) -> jax.Array:
  """[...] log of the mass `logp` [..., V] puts outside `ids` [..., k] (-inf when k = V)."""
  if ids.shape[-1] == logp.shape[-1]:
    return jnp.full(logp.shape[:-1], -jnp.inf, logp.dtype)
  flat, flat_ids = logp.reshape(-1, logp.shape[-1]), ids.reshape(-1, ids.shape[-1])
  outside = flat.at[jnp.arange(flat.shape[0])[:, None], flat_ids].set(-jnp.inf)
  return jax.nn.logsumexp(outside, axis=-1).reshape(logp.shape[:-1])


def folded_divergence(
  top_ids: jax.Array, top_logp: jax.Array, log_rest: jax.Array, student_logp: jax.Array, kind: str, beta: float = 0.5
) -> jax.Array:
  """[...] D between the teacher's top-k buckets (`top_ids`, `top_logp` [..., k], `log_rest` [...])
  and the student's log-probs [..., V] folded onto the same buckets."""
  student_top = jnp.take_along_axis(student_logp, top_ids, axis=-1)  # [..., k]
  if top_ids.shape[-1] == student_logp.shape[-1]:  # k = V: no rest bucket
    return divergence(top_logp, student_top, kind, beta)
  teacher = jnp.concatenate([top_logp, log_rest[..., None]], axis=-1)
  student = jnp.concatenate([student_top, _log_rest(student_logp, top_ids)[..., None]], axis=-1)
  return divergence(teacher, student, kind, beta)


def distill_loss(
  student_logits: jax.Array,
  labels: jax.Array | None,
  mask: jax.Array,
  *,
  divergence_of,
  temperature: float,
  weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`w * T^2 * D + (1 - w) * CE` averaged over the positions where `mask` [B, T] is 1.

  `divergence_of(student_logp_T [B, T, V]) -> [B, T]` gives D against the teacher (online
  logits or cached top-k); `labels` [B, T] are the next tokens for the CE term (None when
  `weight` is 1, e.g. on the student's own samples). Returns the loss and the per-position
  sums {"divergence", "nats" (with labels), "positions"}."""
  logits = student_logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  positions = jnp.maximum(mask.sum(), 1.0)
  div = divergence_of(jax.nn.log_softmax(logits / temperature, axis=-1)) * mask  # [B, T]
  loss = weight * temperature**2 * div.sum() / positions
  stats = {"divergence": div.sum(), "positions": mask.sum()}
  if labels is not None:
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask
    loss = loss + (1 - weight) * nats.sum() / positions
    stats["nats"] = nats.sum()
  return loss, stats
