"""`sinkhorn` (the XLA path: a backward pass that recomputes the iterations) and `iterate` with
`iterate_backward` (the kernels' entry-by-entry form) against the definitions in `SINKHORN`,
differentiated by JAX through every unrolled iteration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from kernels.mhc.sinkhorn import SINKHORN, iterate, iterate_backward, sinkhorn


def entries(a):
  """[N, n, n] -> the entry-by-entry form `iterate` takes: a[:, j, k] at [j][k]."""
  n = a.shape[-1]
  return tuple(tuple(a[:, j, k] for k in range(n)) for j in range(n))


def relative_error(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  assert np.all(np.isfinite(a))
  return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize("kind", ["exp", "softmax_eps", "log"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_sinkhorn_equals_the_unrolled_definition_in_values_and_gradients_to_1e_5(kind, n, scale):
  """float32, [B, T, n, n] logits up to scale 50 (near-permutations, entries clamped at e^-40)."""
  k1, k2 = jax.random.split(jax.random.key(n))
  logits = scale * jax.random.normal(k1, (3, 37, n, n))
  cotangent = jax.random.normal(k2, (3, 37, n, n))
  value, vjp = jax.vjp(lambda a: sinkhorn(a, 20, kind), logits)
  ref_value, ref_vjp = jax.vjp(lambda a: SINKHORN[kind](a, 20), logits)
  assert value.shape == logits.shape and value.dtype == jnp.float32
  assert relative_error(value, ref_value) < 1e-5
  assert relative_error(vjp(cotangent)[0], ref_vjp(cotangent)[0]) < 1e-5


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
def test_iterate_entry_by_entry_equals_the_definition_to_1e_5(kind):
  logits = 10.0 * jax.random.normal(jax.random.key(3), (37, 4, 4))
  m = iterate(entries(logits), 20, kind)
  assert relative_error(jnp.stack([jnp.stack(row, -1) for row in m], -2), SINKHORN[kind](logits, 20)) < 1e-5


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("iters", [20, 3])
def test_iterate_backward_equals_the_definitions_gradient_to_1e_5(kind, n, scale, iters):
  """float32, 37 tokens, t_max 20 (4 checkpointed segments of 5) and 3; at scale 50 entries are
  clamped at e^-40 of their row's max. In the first token's rows the first n - 1 entries tie at
  the max and the last is clamped, so the max's
  gradient is not zero and is shared three ways at n = 4 (autodiff of `iterate`'s pairwise
  maximum would give 1/2, 1/4, 1/4)."""
  k1, k2 = jax.random.split(jax.random.key(n + 7))
  logits, cotangent = scale * jax.random.normal(k1, (37, n, n)), jax.random.normal(k2, (37, n, n))
  top = jnp.max(logits[0], axis=1, keepdims=True)
  logits = logits.at[0].set(jnp.where(jnp.arange(n) < n - 1, top, top - 60.0))
  got = jax.jit(iterate_backward, static_argnums=(2, 3))(entries(logits), entries(cotangent), iters, kind)
  want = jax.vjp(lambda a: SINKHORN[kind](a, iters), logits)[1](cotangent)[0]
  assert relative_error(jnp.stack([jnp.stack(row, -1) for row in got], -2), want) < 1e-5


def test_sinkhorn_gradient_follows_the_logits_dtype():
  logits = jax.random.normal(jax.random.key(0), (8, 4, 4)).astype(jnp.bfloat16)
  grad = jax.grad(lambda a: jnp.sum(sinkhorn(a, 20, "exp")[..., 0]))(logits)
  assert grad.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
def test_sinkhorn_keeps_only_its_logits_for_the_backward_pass(kind, capsys):
  logits = jax.random.normal(jax.random.key(0), (64, 4, 4))
  print_saved_residuals(lambda a: sinkhorn(a, 20, kind), logits)
  saved = capsys.readouterr().out.strip().splitlines()
  assert saved == ["f32[64,4,4] from the argument a"], saved
  print_saved_residuals(lambda a: SINKHORN[kind](a, 20), logits)
  assert len(capsys.readouterr().out.strip().splitlines()) > 40  # autodiff keeps every iteration's arrays
