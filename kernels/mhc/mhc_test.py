"""The mHC kernels against reference.py, in interpret mode on the CPU (the Triton blocks).

Tolerances: float32 1e-5 (relative to each output's largest magnitude); bfloat16 2e-2,
since h and the new streams are rounded to bfloat16 and the projection multiplies in
bfloat16 (the reference multiplies in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.mhc import api, reference
from kernels.mhc.tiles import parse_tiles

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SHAPES = [(32, 4, 128), (37, 4, 64), (21, 2, 96)]  # (tokens, n, D): a full block, ragged counts, n = 2


def inputs(tokens, n, d, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  w = 2 * n + n * n
  x = jax.random.normal(keys[0], (tokens, n * d), jnp.float32).astype(dtype)
  phi = 0.3 * jax.random.normal(keys[1], (n * d, w), jnp.float32)
  alpha = jnp.array([0.7, 1.3, 2.0], jnp.float32)
  bias = 0.5 * jax.random.normal(keys[2], (w,), jnp.float32)
  y = jax.random.normal(keys[3], (tokens, d), jnp.float32).astype(dtype)
  return x, phi, alpha, bias, y, keys[4:]


def close(a, b, tol, name=""):
  """Max |a - b| relative to max(1, max |b|) below `tol`, and a all finite."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = max(1.0, float(np.max(np.abs(b))))
  assert np.all(np.isfinite(a)), name
  err = float(np.max(np.abs(a - b))) / scale
  assert err < tol, (name, err)


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, n, d", SHAPES)
def test_forward_matches_reference(tokens, n, d, dtype, kind):
  x, phi, alpha, bias, y, _ = inputs(tokens, n, d, dtype)
  spec = api.Spec(n=n, iters=20, kind=kind, eps=1e-6, implementation="interpret")
  h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
  assert xs is x or bool(jnp.all(xs == x))
  out = api.res_post(xs, y, coeff, spec)
  ref_h, ref_pre, ref_post, ref_res = reference.pre(x, phi, alpha, bias, n=n, iters=20, kind=kind, eps=1e-6)
  pre, post, res = api.unpack(coeff, n)
  coeff_tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for got, want in ((pre, ref_pre), (post, ref_post), (res, ref_res)):
    close(got, want, coeff_tol)
  close(h, ref_h, TOL[dtype])
  assert h.dtype == out.dtype == dtype
  close(out, reference.res_post(x, y, ref_post, ref_res), TOL[dtype])
  # the last Sinkhorn step normalises each output's weights over the inputs
  np.testing.assert_allclose(np.asarray(res).sum(axis=2), 1.0, atol=1e-4)


def layer_loss(pre_fn, res_post_fn, x, phi, alpha, bias, y_weight, out_weight):
  """A scalar through both halves, with y depending on h as in a real layer."""
  h, state, xs = pre_fn(x, phi, alpha, bias)
  y = jnp.tanh(h.astype(jnp.float32) * y_weight).astype(x.dtype)
  out = res_post_fn(xs, y, state)
  return jnp.sum(jnp.sin(out.astype(jnp.float32)) * out_weight)


def layer_values_and_grads(spec, x, phi, alpha, bias, y_weight, out_weight):
  """layer_loss and its gradients in (x, phi, alpha, bias): (kernels, reference)."""
  settings = dict(n=spec.n, iters=spec.iters, kind=spec.kind, eps=spec.eps)

  def reference_pre(x, phi, alpha, bias):
    h, p, q, r = reference.pre(x, phi, alpha, bias, **settings)
    return h, (q, r), x

  loss = jax.value_and_grad(layer_loss, argnums=(2, 3, 4, 5))
  kernel = loss(
    lambda *a: api.pre(*a, spec), lambda x, y, c: api.res_post(x, y, c, spec), x, phi, alpha, bias, y_weight, out_weight
  )
  ref = loss(reference_pre, lambda x, y, s: reference.res_post(x, y, *s), x, phi, alpha, bias, y_weight, out_weight)
  return kernel, ref


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, n, d", SHAPES[1:])
def test_gradients_match_reference(tokens, n, d, dtype, kind):
  x, phi, alpha, bias, _, (k1, k2) = inputs(tokens, n, d, dtype, seed=1)
  y_weight = jax.random.normal(k1, (tokens, d))
  out_weight = jax.random.normal(k2, (tokens, n * d))
  spec = api.Spec(n=n, iters=20, kind=kind, eps=1e-6, implementation="interpret")
  (_, grads), (_, ref_grads) = layer_values_and_grads(spec, x, phi, alpha, bias, y_weight, out_weight)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  for name, got, want in zip(("x", "phi", "alpha", "bias"), grads, ref_grads):
    close(got, want, tol, name)


def test_tiles_change_the_blocks_not_the_results():
  """8-token blocks (37 tokens: padded) and 16-wide chunks (4 per stream) match the reference."""
  x, phi, alpha, bias, _, (k1, k2) = inputs(37, 4, 64, jnp.float32, seed=2)
  y_weight, out_weight = jax.random.normal(k1, (37, 64)), jax.random.normal(k2, (37, 4 * 64))
  tiles = parse_tiles("block_tokens=8,chunk=16,num_warps=8,num_stages=1")
  spec = api.Spec(n=4, iters=20, kind="exp", eps=1e-6, implementation="interpret", tiles=tiles)
  (value, grads), (ref_value, ref_grads) = layer_values_and_grads(spec, x, phi, alpha, bias, y_weight, out_weight)
  close(value, ref_value, 1e-5, "loss")
  for name, got, want in zip(("x", "phi", "alpha", "bias"), grads, ref_grads):
    close(got, want, 1e-5, name)
  traced = str(jax.make_jaxpr(lambda x: api.pre(x, phi, alpha, bias, spec))(x))
  assert "GridMapping(grid=(5,)" in traced  # ceil(37 / 8) blocks, not interpret mode's default 16-token blocks' 3


@pytest.mark.parametrize(
  "text, message",
  [
    ("block_size=8", "unknown tile"),
    ("block_tokens=12", "power of two"),
    ("num_stages=0", "positive integer"),
    ("chunk=abc", "positive integer"),
  ],
)
def test_bad_tiles_are_named(text, message):
  with pytest.raises(ValueError, match=message):
    parse_tiles(text)


def test_tiles_a_backend_does_not_take_are_refused():
  x, phi, alpha, bias, _, _ = inputs(8, 2, 32, jnp.float32)
  spec = api.Spec(n=2, iters=4, kind="exp", eps=1e-6, implementation="tpu", tiles=parse_tiles("num_warps=4"))
  with pytest.raises(ValueError, match=r"\['num_warps'\]: the tpu backend"):
    api.pre(x, phi, alpha, bias, spec)


@pytest.mark.parametrize(
  "implementation, platform, resolved",
  [
    ("auto", "gpu", "triton"),
    ("auto", "cuda", "triton"),
    ("auto", "tpu", "tpu"),
    ("auto", "cpu", None),
    ("pallas", "cpu", "interpret"),
    ("pallas", "tpu", "tpu"),
    ("xla", "gpu", None),
  ],
)
def test_resolve_picks_the_kernels_on_gpu_and_tpu_and_the_xla_path_elsewhere(implementation, platform, resolved):
  assert api.resolve(implementation, platform) == resolved


def test_resolve_names_an_unknown_implementation():
  with pytest.raises(ValueError, match="'reference'; use one of auto, pallas, xla"):
    api.resolve("reference", "cpu")


def packed(pre, post, res, w):
  """Coefficient rows [N, W] as the kernels keep them, from pre, post [N, n] and res [N, n, n]."""
  rows = jnp.concatenate([pre, post, res.reshape(res.shape[0], -1)], axis=1)
  return jnp.pad(rows, ((0, 0), (0, w - rows.shape[1])))


def chain_loss(merge_fn, res_post_fn, x, y, coeff, phi, alpha, bias, weights):
  """A scalar through a merge (this connection's res_post, the next one's pre), the next
  sub-block (y' from h) and the next res_post, with out and the next coefficients also read
  directly: every output of the merge receives a cotangent."""
  w_y, w_out, w_final, w_coeff = weights
  out, h, state = merge_fn(x, y, coeff, phi, alpha, bias)
  y_next = jnp.tanh(h.astype(jnp.float32) * w_y).astype(x.dtype)
  final = res_post_fn(out, y_next, state)
  pre, post, res = state if isinstance(state, tuple) else api.unpack(state, x.shape[1] // y.shape[1])
  coefficients = jnp.concatenate([pre, post, res.reshape(res.shape[0], -1)], axis=1)
  return (
    jnp.sum(jnp.sin(final.astype(jnp.float32)) * w_final)
    + jnp.sum(jnp.cos(out.astype(jnp.float32)) * w_out)
    + jnp.sum(coefficients * w_coeff)
  )


def merge_values_and_grads(spec, x, y, pre, post, res, phi, alpha, bias, weights):
  """chain_loss and its gradients in (x, y, pre/post/res of this connection, phi, alpha, bias):
  (kernels, reference)."""
  n, w = spec.n, 16 if spec.n == 2 else 32
  settings = dict(n=n, iters=spec.iters, kind=spec.kind, eps=spec.eps)

  def kernel_loss(x, y, pre, post, res, phi, alpha, bias):
    return chain_loss(
      lambda *a: api.merge(*a, spec),
      lambda out, y, c: api.res_post(out, y, c, spec),
      x, y, packed(pre, post, res, w), phi, alpha, bias, weights,
    )  # fmt: skip

  def reference_loss(x, y, pre, post, res, phi, alpha, bias):
    def merge(x, y, state, phi, alpha, bias):
      out = reference.res_post(x, y, *state)
      h, p, q, r = reference.pre(out, phi, alpha, bias, **settings)
      return out, h, (p, q, r)

    return chain_loss(
      merge, lambda out, y, s: reference.res_post(out, y, *s[1:]), x, y, (post, res), phi, alpha, bias, weights
    )

  argnums = tuple(range(8))
  args = (x, y, pre, post, res, phi, alpha, bias)
  return jax.value_and_grad(kernel_loss, argnums)(*args), jax.value_and_grad(reference_loss, argnums)(*args)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, n, d", SHAPES)
def test_merge_matches_res_post_then_pre_values_and_gradients(tokens, n, d, dtype):
  """`merge` (one kernel pass each way over the streams) equals the reference's res_post of
  one connection followed by the next connection's pre: outputs and every gradient."""
  x, phi, alpha, bias, y, (k1, k2) = inputs(tokens, n, d, dtype, seed=3)
  keys = jax.random.split(k1, 4)
  pre = jax.nn.sigmoid(jax.random.normal(keys[0], (tokens, n)))
  post = 2 * jax.nn.sigmoid(jax.random.normal(keys[1], (tokens, n)))
  res = jax.nn.softmax(jax.random.normal(keys[2], (tokens, n, n)), axis=-1)
  w = 2 * n + n * n
  weights = (
    jax.random.normal(keys[3], (tokens, d)),
    jax.random.normal(k2, (tokens, n * d)),
    jax.random.normal(jax.random.fold_in(k2, 1), (tokens, n * d)),
    jax.random.normal(jax.random.fold_in(k2, 2), (tokens, w)),
  )
  spec = api.Spec(n=n, iters=20, kind="exp", eps=1e-6, implementation="interpret")
  out, h, coeff_next = api.merge(x, y, packed(pre, post, res, 16 if n == 2 else 32), phi, alpha, bias, spec)
  ref_out = reference.res_post(x, y, post, res)
  ref_h, ref_pre, ref_post, ref_res = reference.pre(ref_out, phi, alpha, bias, n=n, iters=20, kind="exp", eps=1e-6)
  assert out.dtype == h.dtype == dtype
  close(out, ref_out, TOL[dtype], "out")
  close(h, ref_h, TOL[dtype], "h")
  for name, got, want in zip(("pre", "post", "res"), api.unpack(coeff_next, n), (ref_pre, ref_post, ref_res)):
    close(got, want, 1e-5 if dtype == jnp.float32 else 2e-2, name)
  (value, grads), (ref_value, ref_grads) = merge_values_and_grads(spec, x, y, pre, post, res, phi, alpha, bias, weights)
  close(value, ref_value, TOL[dtype], "loss")
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  for name, got, want in zip(("x", "y", "pre", "post", "res", "phi", "alpha", "bias"), grads, ref_grads):
    close(got, want, tol, name)
  np.testing.assert_array_equal(np.asarray(grads[2]), 0.0)  # this connection's pre is not used by the merge
