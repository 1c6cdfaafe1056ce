"""GRPO math (manifold.rl.grpo) against plain numpy statements of the same formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manifold.rl import grpo

SETTINGS = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, is_cap=1.5)


# ---------------------------------------------------------------------------------------- advantages


def test_group_advantages_are_the_numpy_standardised_rewards_per_group():
  rng = np.random.default_rng(0)
  rewards = rng.random((6, 8)).astype(np.float32)
  rewards[1] = rng.integers(0, 2, 8)  # 0/1 rewards, as a verifier gives
  rewards[1, :2] = [0, 1]
  adv = np.asarray(grpo.group_advantages(rewards))
  r = rewards.astype(np.float64)
  want = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
  np.testing.assert_allclose(adv.std(1), 1.0, rtol=1e-4)


def test_group_advantages_are_exactly_zero_when_a_group_ties():
  rewards = np.array([[0.1] * 7, [1.0] * 7, [0.0] * 7, [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], np.float32)
  adv = np.asarray(grpo.group_advantages(rewards))
  assert np.all(adv[:3] == 0.0)
  assert adv[3, 0] > 0 and np.all(adv[3, 1:] < 0)


def test_group_advantages_refuse_a_group_of_one():
  with pytest.raises(ValueError, match=r"^rl\.group_size=1 must be at least 2"):
    grpo.group_advantages(np.zeros((4, 1)))
  with pytest.raises(ValueError, match=r"rewards \[prompts, group_size\]"):
    grpo.group_advantages(np.zeros(8))


# ---------------------------------------------------------------------------------------- numpy reference


def np_loss_and_grad(logp, old, ref, beh, adv, mask, *, clip_low, clip_high, kl_coef, is_cap, aggregation):
  """float64 numpy: (loss, dloss/dlogp, metrics), straight from the formulas."""
  logp, old, ref, beh = (np.where(mask, x, 0.0).astype(np.float64) for x in (logp, old, ref, beh))
  m = mask.astype(np.float64)
  a = adv.astype(np.float64)[:, None]
  rho = np.exp(logp - old)
  clipped = np.clip(rho, 1 - clip_low, 1 + clip_high)
  raw_w = np.exp(old - beh)
  w = np.minimum(raw_w, is_cap) if is_cap else np.ones_like(rho)
  k3 = np.exp(ref - logp) - (ref - logp) - 1
  per_token = -np.minimum(rho * a, clipped * a) * w + kl_coef * k3
  # d/dlogp: the clip removes the gradient where min() picks the clipped, constant term.
  clip_active = ((a > 0) & (rho > 1 + clip_high)) | ((a < 0) & (rho < 1 - clip_low))
  d_token = -np.where(clip_active, 0.0, rho * a) * w + kl_coef * (1 - np.exp(ref - logp))
  if aggregation == "dapo":
    weights = m / m.sum()
  else:
    n = m.sum(1, keepdims=True)
    rows = (n[:, 0] > 0).sum()
    weights = np.where(n > 0, m / np.maximum(n, 1), 0.0) / rows
  loss = np.sum(per_token * weights)
  token_mean = lambda x: np.sum(x * m) / m.sum()  # noqa: E731
  metrics = {
    "kl": token_mean(k3),
    "ratio": token_mean(rho),
    "is_weight": token_mean(w),
    "clip_low_frac": token_mean((a < 0) & (rho < 1 - clip_low)),
    "clip_high_frac": token_mean((a > 0) & (rho > 1 + clip_high)),
    "is_capped_frac": token_mean(raw_w > is_cap) if is_cap else 0.0,
    "tokens": m.sum(),
  }
  return loss, d_token * weights, metrics


def random_batch(seed, n=6, t=9, spread=0.4):
  """Log-probs that put tokens past both clips and past the importance cap; padding is NaN."""
  rng = np.random.default_rng(seed)
  old = -rng.random((n, t)) * 3
  logp = old + spread * rng.standard_normal((n, t))
  ref = old + 0.3 * rng.standard_normal((n, t))
  beh = old + 0.5 * rng.standard_normal((n, t))
  adv = rng.standard_normal(n)
  adv[:2] = [1.0, -1.0]  # both signs, so both clips can act
  lengths = rng.integers(1, t + 1, n)
  lengths[-1] = 0  # one empty completion: GRPO averages over the others
  starts = rng.integers(0, t - lengths + 1)
  cols = np.arange(t)
  mask = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
  arrays = [np.where(mask, x, np.nan).astype(np.float32) for x in (logp, old, ref, beh)]
  return (*arrays, adv.astype(np.float32), mask)


# ---------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_policy_loss_and_metrics_match_numpy(aggregation):
  batch = random_batch(1)
  loss, metrics = grpo.policy_loss(*batch, **SETTINGS, aggregation=aggregation)
  want, _, want_metrics = np_loss_and_grad(*batch, **SETTINGS, aggregation=aggregation)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
  # The batch exercises every branch: both clips, the cap, and a nonzero KL.
  assert metrics["clip_low_frac"] > 0 and metrics["clip_high_frac"] > 0
  assert 0 < metrics["is_capped_frac"] < 1 and metrics["kl"] > 0
  np.testing.assert_allclose(metrics["policy_loss"] + metrics["kl_loss"], loss, rtol=1e-6, atol=1e-6)


def test_grpo_and_dapo_weigh_completions_differently():
  batch = random_batch(2)
  grpo_loss, _ = grpo.policy_loss(*batch, **SETTINGS, aggregation="grpo")
  dapo_loss, _ = grpo.policy_loss(*batch, **SETTINGS, aggregation="dapo")
  assert abs(float(grpo_loss) - float(dapo_loss)) > 1e-3


@pytest.mark.parametrize("aggregation", ["grpo", "dapo"])
def test_policy_loss_gradient_matches_the_numpy_analytic_gradient(aggregation):
  logp, *rest = random_batch(3)
  grad = jax.grad(lambda x: grpo.policy_loss(x, *rest, **SETTINGS, aggregation=aggregation)[0])(jnp.asarray(logp))
  _, want, _ = np_loss_and_grad(logp, *rest, **SETTINGS, aggregation=aggregation)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grad)[~rest[-1]] == 0.0)  # padding gets no gradient


def test_policy_loss_gradient_matches_finite_differences():
  logp, *rest = random_batch(4, n=3, t=5, spread=0.1)
  mask = rest[-1]
  loss = jax.jit(lambda x: grpo.policy_loss(x, *rest, **SETTINGS)[0])
  f = lambda x: np.float64(loss(x))  # noqa: E731
  grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
  h = 1e-2
  for i, j in zip(*np.nonzero(mask)):
    up, down = logp.copy(), logp.copy()
    up[i, j] += h
    down[i, j] -= h
    np.testing.assert_allclose(grad[i, j], (f(up) - f(down)) / (2 * h), rtol=2e-2, atol=2e-4)


def test_on_policy_with_the_cap_off_is_the_plain_clipped_objective():
  logp, old, _, _, adv, mask = random_batch(5)
  plain = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0)
  m = mask.astype(np.float64)
  rho = np.exp(np.where(mask, logp - old, 0.0).astype(np.float64))
  a = adv.astype(np.float64)[:, None]
  per_token = -np.minimum(rho * a, np.clip(rho, 0.8, 1.28) * a)
  n = m.sum(1)
  want = np.mean(((per_token * m).sum(1) / np.maximum(n, 1))[n > 0])
  for cap in (None, 0, 2.0):  # with behaviour == old the weight is 1 whatever the cap
    loss, metrics = grpo.policy_loss(logp, old, None, old, adv, mask, **plain, is_cap=cap)
    np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)
    assert metrics["is_weight"] == 1.0 and metrics["is_capped_frac"] == 0.0
  loss, _ = grpo.policy_loss(logp, old, None, None, adv, mask, **plain)
  np.testing.assert_allclose(loss, want, rtol=1e-6, atol=1e-6)


def test_without_old_logp_the_ratio_is_one_and_the_gradient_is_the_policy_gradient():
  logp, _, _, _, adv, mask = random_batch(6)
  f = lambda x: grpo.policy_loss(x, None, None, None, adv, mask, kl_coef=0.0, aggregation="dapo")[0]  # noqa: E731
  m = mask.astype(np.float64)
  np.testing.assert_allclose(f(logp), -np.sum(adv[:, None] * m) / m.sum(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(logp)), -adv[:, None] * m / m.sum(), rtol=1e-6, atol=1e-8)


def test_stale_rollouts_are_reweighted_not_dropped():
  logp, old, ref, beh, adv, mask = random_batch(7)
  fresh, _ = grpo.policy_loss(logp, old, ref, old, adv, mask, **SETTINGS)
  stale, metrics = grpo.policy_loss(logp, old, ref, beh, adv, mask, **SETTINGS)
  off, _ = grpo.policy_loss(logp, old, ref, beh, adv, mask, **{**SETTINGS, "is_cap": 0})
  assert float(stale) != float(fresh) and float(off) == pytest.approx(float(fresh), abs=1e-7)
  assert metrics["is_weight"] != 1.0


def test_policy_loss_jits_to_the_same_values():
  batch = random_batch(8)
  f = functools.partial(grpo.policy_loss, **SETTINGS, aggregation="dapo")
  eager = f(*batch)
  jitted = jax.jit(f)(*batch)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  for name in eager[1]:
    np.testing.assert_allclose(jitted[1][name], eager[1][name], rtol=1e-6, err_msg=name)


@pytest.mark.parametrize(
  "override, message",
  [
    ({"aggregation": "seq"}, r"^rl\.aggregation='seq' is not one of 'grpo', 'dapo'$"),
    ({"clip_low": -0.1}, r"^rl\.clip_low=-0\.1 must lie in \[0, 1\]"),
    ({"clip_high": -0.1}, r"^rl\.clip_high=-0\.1 must be non-negative"),
    ({"kl_coef": -1.0}, r"^rl\.kl_coef=-1\.0 must be non-negative"),
    ({"is_cap": -1.0}, r"^rl\.is_cap=-1\.0 must be non-negative"),
  ],
)
def test_policy_loss_refuses_bad_settings_in_one_line(override, message):
  with pytest.raises(ValueError, match=message):
    grpo.policy_loss(*random_batch(9), **{**SETTINGS, **override})


def test_policy_loss_refuses_mismatched_shapes_and_a_missing_reference():
  logp, old, ref, beh, adv, mask = random_batch(10)
  with pytest.raises(ValueError, match=r"ref_logp has shape \(6, 8\), not logp's \(6, 9\)"):
    grpo.policy_loss(logp, old, ref[:, :-1], beh, adv, mask, **SETTINGS)
  with pytest.raises(ValueError, match=r"advantages has shape \(5,\), not \(6,\)"):
    grpo.policy_loss(logp, old, ref, beh, adv[:-1], mask, **SETTINGS)
  with pytest.raises(ValueError, match=r"^rl\.kl_coef=0\.05 needs ref_logp"):
    grpo.policy_loss(logp, old, None, beh, adv, mask, **SETTINGS)
