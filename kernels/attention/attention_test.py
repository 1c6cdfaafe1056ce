"""Attention's implementations against the plain-jnp reference, float32 1e-5, on the CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import api, reference


def documents(t=37, seed=1):
  """[2, t] segment ids of packed documents: row 0 has several of random lengths, row 1 one."""
  starts = jax.random.bernoulli(jax.random.key(seed), 0.1, (t,)).at[0].set(False)
  return jnp.stack([jnp.cumsum(starts), jnp.zeros(t, jnp.int32)])


def qkv(t=37, n=4, kv=2, h=8, hv=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(keys[0], (2, t, n, h)),
    jax.random.normal(keys[1], (2, t, kv, h)),
    jax.random.normal(keys[2], (2, t, kv, hv)),
  )


def test_auto_picks_by_backend_and_names_are_checked():
  backend = jax.default_backend()
  assert api.resolve("auto", jnp.bfloat16) == {"gpu": "cudnn", "cpu": "matmul"}.get(backend, "xla")
  assert api.resolve("auto", jnp.float32) == ("matmul" if backend == "cpu" else "xla")
  assert api.resolve("cudnn", jnp.float32) == "cudnn"
  with pytest.raises(ValueError, match="use one of auto, cudnn, xla, matmul, splash"):
    api.resolve("flash", jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "matmul"])
@pytest.mark.parametrize("hv", [8, 5, 12])  # values as wide as, narrower and wider than queries / keys (MLA)
def test_matches_the_reference_with_grouped_heads_and_any_value_width(hv, impl):
  """Values and gradients: causal, with a mask [B, 1, T, S] (queries that each see a key), and
  causal within packed documents."""
  q, k, v = qkv(hv=hv)
  mask = jnp.arange(37)[None, None, None, :] <= jnp.arange(37)[None, None, :, None] - 3  # [1, 1, T, S]
  cases = (
    ({"scale": 0.3, "is_causal": True}, q),
    ({"mask": mask[:, :, 3:]}, q[:, 3:]),
    ({"is_causal": True, "segment_ids": documents()}, q),
  )
  for kwargs, queries in cases:

    def loss(attend, q, k, v):
      return jnp.sum(jnp.sin(attend(q, k, v, **kwargs)))  # noqa: B023 - called in this iteration

    implementation = functools.partial(api.dot_product_attention, implementation=impl)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, implementation), argnums=(0, 1, 2)))(queries, k, v)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, reference.attention), argnums=(0, 1, 2)))(queries, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_cudnn_pads_odd_causal_lengths_without_changing_outputs_or_gradients(monkeypatch):
  """For cuDNN a causal length that is not a multiple of 64 is padded at the end; XLA
  stands in for cuDNN on the CPU, so only the padding is under test."""
  original = jax.nn.dot_product_attention
  calls = []

  def xla_standing_in_for_cudnn(q, k, v, *, implementation=None, **kwargs):
    calls.append((q.shape[1], implementation))
    return original(q, k, v, **kwargs)

  q, k, v = qkv(kv=4)

  def loss(attend, q, k, v):
    return jnp.sum(jnp.sin(attend(q, k, v)))

  reference_attention = lambda q, k, v: reference.attention(q, k, v, is_causal=True)  # noqa: E731
  expected, expected_grads = jax.value_and_grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_standing_in_for_cudnn)
  padded = lambda q, k, v: api.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # noqa: E731
  value, grads = jax.value_and_grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
  assert calls == [(64, "cudnn")]
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)

  segments = documents()  # packed documents: their mask is padded with the sequence
  reference_attention = lambda q, k, v: reference.attention(q, k, v, is_causal=True, segment_ids=segments)  # noqa: E731
  padded = lambda q, k, v: api.dot_product_attention(  # noqa: E731
    q, k, v, is_causal=True, segment_ids=segments, implementation="cudnn"
  )
  with monkeypatch.context() as patch:
    patch.setattr(jax.nn, "dot_product_attention", original)
    expected, expected_grads = jax.value_and_grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
  value, grads = jax.value_and_grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=1e-5)


# grouped heads; MLA's narrower values within packed documents
@pytest.mark.parametrize("n, kv, h, hv, packed", [(4, 2, 64, 64, False), (2, 2, 96, 64, True)])
def test_splash_matches_the_reference_in_interpret_mode(n, kv, h, hv, packed):
  """JAX's TPU splash kernels (interpret mode on the CPU): causal, values and gradients, float32 1e-5."""
  q, k, v = qkv(t=256, n=n, kv=kv, h=h, hv=hv)
  segments = documents(t=256, seed=2) if packed else None

  def loss(attend, q, k, v):
    return jnp.sum(jnp.sin(attend(q, k, v, scale=0.3, is_causal=True, segment_ids=segments)))

  splash = functools.partial(api.dot_product_attention, implementation="splash")
  traced = str(jax.make_jaxpr(functools.partial(loss, splash))(q, k, v))
  assert "pallas_call" in traced, "splash attention did not run"
  got = jax.jit(jax.value_and_grad(functools.partial(loss, splash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.value_and_grad(functools.partial(loss, reference.attention), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_splash_leaves_what_it_does_not_cover_to_xla():
  """A length that is not a multiple of 128, or an explicit mask: XLA's attention, no kernel."""
  q, k, v = qkv(t=37)
  for kwargs in ({"is_causal": True}, {"mask": jnp.ones((1, 1, 37, 37), bool)}):
    attend = functools.partial(api.dot_product_attention, implementation="splash", **kwargs)
    assert "pallas_call" not in str(jax.make_jaxpr(attend)(q, k, v))
