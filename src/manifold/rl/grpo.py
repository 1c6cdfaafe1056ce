"""GRPO (DeepSeekMath, arXiv 2402.03300; R1, arXiv 2501.12948) as pure functions.

For each prompt the policy samples G completions o_1..o_G, a verifier scores them r_i, and
each completion's advantage is its reward standardised within its group:

    A_i = (r_i - mean(r)) / (std(r) + eps)

Per token t of o_i, with rho = exp(logp - old_logp) the ratio between the policy being
trained and the learner's policy when the rollout was scored ("old"),

    L = -min(rho A_i, clip(rho, 1 - clip_low, 1 + clip_high) A_i) * w + kl_coef * k3
    w = min(exp(old_logp - behaviour_logp), is_cap)                (a stop-gradient weight)
    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1              (>= 0, unbiased KL(pi || ref))

`behaviour_logp` are the log-probs of the policy that sampled the rollout (an inference
engine, possibly some versions behind); w is the truncated importance weight that corrects
a stale or numerically different rollout instead of dropping it. Separate low / high clips
are DAPO's "clip-higher" (arXiv 2503.14476). The loss is the mean over each completion's
tokens, then over completions (GRPO: every completion weighs the same), or the mean over
all tokens of the batch (DAPO: every token weighs the same).

All arrays are jnp / numpy; hyperparameters are Python numbers (static under `jax.jit`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("grpo", "dapo")


def group_advantages(rewards: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """`[P, G]` rewards -> `[P, G]` float32 advantages `(r - mean(r)) / (std(r) + eps)` per row.

  One row per prompt, one column per completion; std is the population std (ddof 0). A
  group whose rewards are all equal carries no signal: its advantages are exactly 0.
  """
  r = jnp.asarray(rewards, jnp.float32)
  if r.ndim != 2:
    raise ValueError(f"group_advantages takes rewards [prompts, group_size]; got shape {tuple(r.shape)}")
  if r.shape[1] < 2:
    raise ValueError(f"rl.group_size={r.shape[1]} must be at least 2: a group of one has no baseline")
  if not eps > 0:
    raise ValueError(f"group_advantages eps={eps} must be positive")
  mean = jnp.mean(r, axis=1, keepdims=True)
  std = jnp.std(r, axis=1, keepdims=True)
  tied = jnp.all(r == r[:, :1], axis=1, keepdims=True)
  return jnp.where(tied, 0.0, (r - mean) / (std + eps))


def _check_settings(clip_low, clip_high, kl_coef, is_cap, aggregation) -> None:
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"rl.aggregation={aggregation!r} is not one of {', '.join(map(repr, AGGREGATIONS))}")
  if not 0 <= clip_low <= 1:
    raise ValueError(f"rl.clip_low={clip_low} must lie in [0, 1] (the ratio is clipped below at 1 - clip_low)")
  if not clip_high >= 0:
    raise ValueError(f"rl.clip_high={clip_high} must be non-negative (the ratio is clipped above at 1 + clip_high)")
  if not kl_coef >= 0:
    raise ValueError(f"rl.kl_coef={kl_coef} must be non-negative")
  if is_cap is not None and not is_cap >= 0:
    raise ValueError(f"rl.is_cap={is_cap} must be non-negative (0 or None turns the importance weight off)")


def _aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str) -> jax.Array:
  """Masked mean of `[N, T]` per-token values: per completion then over completions, or over all tokens."""
  if aggregation == "dapo":
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  tokens = jnp.sum(mask, axis=1)
  per_completion = jnp.sum(per_token * mask, axis=1) / jnp.maximum(tokens, 1.0)
  present = (tokens > 0).astype(per_token.dtype)
  return jnp.sum(per_completion * present) / jnp.maximum(jnp.sum(present), 1.0)


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array | None,
  ref_logp: jax.Array | None,
  behaviour_logp: jax.Array | None,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_low: float = 0.2,
  clip_high: float = 0.28,
  kl_coef: float = 1e-3,
  is_cap: float | None = 2.0,
  aggregation: str = "grpo",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO / DAPO loss of one batch of N completions padded to T tokens: `(loss, metrics)`.

  logp: [N, T] log-probs of the sampled tokens under the policy being trained (the only
    argument gradients flow through).
  old_logp: [N, T] the same under the learner's policy when the rollout was scored; None
    means `stop_gradient(logp)` (one update per rollout, so rho = 1).
  ref_logp: [N, T] the same under the frozen reference policy; None only with kl_coef = 0.
  behaviour_logp: [N, T] the same under the policy that sampled the rollout; None means
    equal to old_logp (importance weight 1).
  advantages: [N] one per completion (from `group_advantages`, flattened).
  mask: [N, T] 1 (or True) on completion tokens, 0 on prompt and padding; values of the
    other arrays at masked positions are ignored, even if not finite.
  clip_low, clip_high: rho is clipped to [1 - clip_low, 1 + clip_high].
  kl_coef: beta, the weight of the k3 term (R1: 1e-3).
  is_cap: the truncation of the importance weight w = min(exp(old - behaviour), is_cap);
    0 or None turns it off (w = 1). w multiplies the clipped surrogate as a constant.
  aggregation: "grpo" (mean over each completion's tokens, then over the completions that
    have any) or "dapo" (mean over all tokens).

  Metrics (float32 scalars, means over unmasked tokens unless said otherwise):
    policy_loss, kl_loss: the two terms of the loss, aggregated like it;
    kl: mean k3; ratio: mean rho; is_weight: mean w;
    clip_low_frac / clip_high_frac: share of tokens whose gradient the clip removes
      (A < 0 and rho < 1 - clip_low / A > 0 and rho > 1 + clip_high);
    is_capped_frac: share of tokens with exp(old - behaviour) > is_cap;
    tokens: the number of unmasked tokens.
  """
  _check_settings(clip_low, clip_high, kl_coef, is_cap, aggregation)
  logp = jnp.asarray(logp, jnp.float32)
  if logp.ndim != 2:
    raise ValueError(f"policy_loss takes logp [completions, tokens]; got shape {tuple(logp.shape)}")
  shape = tuple(logp.shape)
  given = {"old_logp": old_logp, "ref_logp": ref_logp, "behaviour_logp": behaviour_logp, "mask": mask}
  for name, value in given.items():
    if value is not None and tuple(np.shape(value)) != shape:
      raise ValueError(f"policy_loss: {name} has shape {tuple(np.shape(value))}, not logp's {shape}")
  if tuple(np.shape(advantages)) != shape[:1]:
    raise ValueError(f"policy_loss: advantages has shape {tuple(np.shape(advantages))}, not ({shape[0]},)")
  if ref_logp is None and kl_coef > 0:
    raise ValueError(f"rl.kl_coef={kl_coef} needs ref_logp, the reference policy's log-probs; pass them or set 0")

  const = lambda x: jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))  # noqa: E731
  on = jnp.asarray(mask).astype(bool)
  m = on.astype(jnp.float32)
  old = jax.lax.stop_gradient(logp) if old_logp is None else const(old_logp)
  a = const(advantages)[:, None]

  def masked_diff(x, y):  # x - y on completion tokens, 0 elsewhere (so padding never overflows)
    return jnp.where(on, x - y, 0.0)

  rho = jnp.exp(masked_diff(logp, old))
  clipped = jnp.clip(rho, 1.0 - clip_low, 1.0 + clip_high)
  surrogate = jnp.minimum(rho * a, clipped * a)

  if is_cap:
    raw_w = jnp.exp(masked_diff(old, old if behaviour_logp is None else const(behaviour_logp)))
    w = jnp.minimum(raw_w, jnp.float32(is_cap))
    capped = raw_w > is_cap
  else:
    w = jnp.ones_like(logp)
    capped = jnp.zeros_like(on)
  w = jax.lax.stop_gradient(w)

  if ref_logp is None:
    k3 = jnp.zeros_like(logp)
  else:
    log_ref_ratio = masked_diff(const(ref_logp), logp)
    k3 = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0

  policy_term = -surrogate * w
  loss = _aggregate(policy_term + kl_coef * k3, m, aggregation)

  tokens = jnp.sum(m)
  token_mean = lambda x: jax.lax.stop_gradient(jnp.sum(x * m) / jnp.maximum(tokens, 1.0))  # noqa: E731
  sg = jax.lax.stop_gradient
  metrics = {
    "policy_loss": sg(_aggregate(policy_term, m, aggregation)),
    "kl_loss": sg(kl_coef * _aggregate(k3, m, aggregation)),
    "kl": token_mean(k3),
    "ratio": token_mean(rho),
    "is_weight": token_mean(w),
    "clip_low_frac": token_mean(((a < 0) & (rho < 1.0 - clip_low)).astype(jnp.float32)),
    "clip_high_frac": token_mean(((a > 0) & (rho > 1.0 + clip_high)).astype(jnp.float32)),
    "is_capped_frac": token_mean(capped.astype(jnp.float32)),
    "tokens": tokens,
  }
  return loss, metrics
