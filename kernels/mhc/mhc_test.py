"""The mHC kernels against reference.py, in interpret mode on the CPU (the Triton blocks).

Tolerances: float32 1e-5 (relative to each output's largest magnitude); bfloat16 2e-2,
since h and the new streams are rounded to bfloat16 and the projection multiplies in
bfloat16 (the reference multiplies in float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.mhc import api, bench, calls, reference, tpu, triton
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
  assert xs.x is x or bool(jnp.all(xs.x == x))
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


def chain_loss(pre_fn, merge_fn, res_post_fn, unpack_fn, x, first, second, weights):
  """A scalar through three connections as the model runs them: pre of x (weights `first`), a
  merge (the first connection's res_post with the second's pre, weights `second`), res_post;
  each sub-block y = tanh(h w). The merge's coefficients (unpack_fn: -> pre, post, res) are also
  read directly, so every output of it receives a cotangent."""
  w_y1, w_y2, w_out, w_coeff = weights
  h, state, xs = pre_fn(x, *first)
  h2, state2, xs2 = merge_fn(xs, jnp.tanh(h.astype(jnp.float32) * w_y1).astype(x.dtype), state, *second)
  out = res_post_fn(xs2, jnp.tanh(h2.astype(jnp.float32) * w_y2).astype(x.dtype), state2)
  coefficients = jnp.concatenate([a.reshape(a.shape[0], -1) for a in unpack_fn(state2)], axis=1)
  return jnp.sum(jnp.sin(out.astype(jnp.float32)) * w_out) + jnp.sum(coefficients * w_coeff)


@pytest.mark.parametrize(
  "tokens, n, d, dtype, kind",
  [(*SHAPES[1], jnp.float32, "exp"), (*SHAPES[1], jnp.bfloat16, "exp"), (*SHAPES[2], jnp.float32, "softmax_eps")],
)
def test_merge_equals_res_post_then_pre_values_and_gradients(tokens, n, d, dtype, kind):
  """`merge` (res_post's mix and pre's projection in one kernel, out projected as it is written)
  equals res_post then pre: h, out and the coefficients against the reference; the gradients of a loss through pre, merge and res_post
  in x and both connections' phi, alpha and bias against the same chain with `res_post` then
  `pre` kernels (1e-5; bfloat16 1e-2) and, in float32, against the reference: through two
  connections the float32 kernels, merged or not, differ from it by up to 2e-5, so that check is
  at 5e-5. In bfloat16 the loss sums 10^4 terms of streams rounded where the reference does not
  round, so the reference checks stay per connection (test_gradients_match_reference)."""
  x, phi, alpha, bias, y, (k1, k2) = inputs(tokens, n, d, dtype, seed=3)
  first, second = (phi, alpha, bias), (jnp.flip(phi, 0), alpha[::-1], jnp.roll(bias, 3))
  spec = api.Spec(n=n, iters=20, kind=kind, eps=1e-6, implementation="interpret")
  settings = dict(n=n, iters=20, kind=kind, eps=1e-6)
  _, coeff, xs = api.pre(x, *first, spec)
  h2, coeff2, out = api.merge(xs, y, coeff, *second, spec)
  _, _, post, res = reference.pre(x, *first, **settings)
  ref_out = reference.res_post(x, y, post, res)
  ref_h2, *ref_coeff2 = reference.pre(ref_out, *second, **settings)
  assert out.x.dtype == h2.dtype == dtype
  close(out.x, ref_out, TOL[dtype], "out")
  close(h2, ref_h2, TOL[dtype], "h")
  for name, got, want in zip(("pre", "post", "res"), api.unpack(coeff2, n), ref_coeff2):
    close(got, want, 1e-5 if dtype == jnp.float32 else 2e-2, name)

  keys = jax.random.split(k1, 3)
  weights = (jax.random.normal(keys[0], (tokens, d)), jax.random.normal(keys[1], (tokens, d)))
  weights += (jax.random.normal(keys[2], x.shape), jax.random.normal(k2, (tokens, 2 * n + n * n)))
  pre, merge, res_post = (functools.partial(f, spec=spec) for f in (api.pre, api.merge, api.res_post))

  def kernels(merge_fn):
    return lambda x, first, second: chain_loss(
      pre, merge_fn, res_post, lambda c: api.unpack(c, n), x, first, second, weights
    )

  def references(x, first, second):
    def pre(x, *w):
      h, *state = reference.pre(x, *w, **settings)
      return h, tuple(state), x

    def merge(x, y, state, *w):
      return pre(reference.res_post(x, y, *state[1:]), *w)

    res_post = lambda x, y, state: reference.res_post(x, y, *state[1:])  # noqa: E731
    return chain_loss(pre, merge, res_post, lambda state: state, x, first, second, weights)

  separate = lambda xs, y, c, *w: pre(res_post(xs, y, c), *w)  # noqa: E731
  wanted = (kernels(separate), references) if dtype == jnp.float32 else (kernels(separate),)
  results = [jax.value_and_grad(f, argnums=(0, 1, 2))(x, first, second) for f in (kernels(merge), *wanted)]
  names = ["x"] + [f"{c} {p}" for c in ("first", "second") for p in ("phi", "alpha", "bias")]
  (value, grads), *others = results
  for (want_value, want_grads), tol in zip(others, [1e-5, 5e-5] if dtype == jnp.float32 else [1e-2], strict=True):
    close(value, want_value, tol, "loss")
    for name, got, want in zip(names, jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
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
  assert "GridMapping(grid=(5,)" in traced  # ceil(37 / 8) blocks, not the 1 of pre_forward's own 64-token blocks


def test_each_kernel_keeps_its_tile_and_a_given_setting_applies_to_all():
  fastest = triton.backend()
  assert [t.block_tokens for t in fastest.tiles] == [triton.FASTEST[k][0] for k in calls.KERNELS]
  assert fastest.tile("pre_forward").compiler_params.num_warps == triton.FASTEST["pre_forward"][2]
  given = triton.backend(block_tokens=16, num_warps=2)
  assert {t.block_tokens for t in given.tiles} == {16}
  assert {t.compiler_params.num_warps for t in given.tiles} == {2}
  assert [t.chunk for t in given.tiles] == [t.chunk for t in fastest.tiles]


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


@pytest.mark.parametrize("n", [4, 2])
def test_traffic_counts_each_stream_array_the_layer_reads_and_writes(n):
  """bench.traffic, from the traced layer (tracing only), in stream units. Separate: forward, pre
  reads x twice and writes h, res_post reads x and y and writes out (4n + 2); the backward pass
  adds res_post's x, y, dL/d out and dL/dy (2n + 2), pre's <dL/dh, x_j> pass (n + 1), its dL/dx
  pass (3n + 1) and dL/dphi's matmul (n): 11n + 6. Merged: forward, merge reads x and y and
  writes out (2n + 1), the pre-mix reads out and writes h (n + 1); the same backward pass:
  10n + 6. The rest is per-token rows and weights, under a unit."""
  tokens, d = 4096, 2048
  (x, y, phi, alpha, bias), (g_h, g_out) = bench.inputs(tokens, d, n)
  unit = tokens * d * x.dtype.itemsize
  for form, (want_forward, want_both) in {
    "separate": (4 * n + 2, 11 * n + 6),
    "merged": (3 * n + 2, 10 * n + 6),
  }.items():
    kernel, _ = bench.layer_fns(n, form=form)
    forward, _ = bench.traffic(unit, jax.jit(kernel), x, y, phi, alpha, bias)
    both, rows = bench.traffic(unit, bench.forward_backward(kernel), x, y, phi, alpha, bias, g_h, g_out)
    assert want_forward <= forward < want_forward + 0.5, (form, forward)
    assert want_both <= both < want_both + 0.5, (form, both)
    assert 0 < rows < 1, (form, rows)
  per_kernel = bench.kernel_bytes(bench.forward_backward(kernel), x, y, phi, alpha, bias, g_h, g_out)
  w = calls.width(n)
  rows_and_weights = (
    3 * tokens * w * 4 + tokens * 4 + n * d * w * 2 + 2 * w * 4
  )  # coeff, coeff / logits / rms, phi, affine
  assert per_kernel["mhc_merge_forward_triton"] == (2 * n + 1) * unit + rows_and_weights  # x, y, out


@pytest.mark.parametrize("kind", ["exp", "softmax_eps"])
def test_the_xla_sinkhorn_lowers_to_a_few_hundred_lines(kind):
  """bench.sinkhorn_costs: the Sinkhorn's forward+backward on one [n, n, N] array (the XLA path)
  lowers to 225 / 258 lines of StableHLO at JAX 0.10.2; as n^2 separate [N] arrays it took
  1,088 / 1,214, and most of a deep mHC model's compile time."""
  got = bench.sinkhorn_costs(64, kind)
  assert got["lines"] < 400, got


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernels_lower_for_a_cuda_device(dtype):
  """Every kernel at its GPU tile, forward and backward, lowered for CUDA on this CPU machine
  (Pallas's Triton lowering; only compiling the Triton IR needs the GPU), at a width whose n D is
  no power of two: a shape or an op the Triton lowering rejects fails here, not on a lent GPU.
  Four connections as the model runs them (pre, two merges, res_post) lower to one kernel each
  (XLA compiles each distinct one once)."""
  x, phi, alpha, bias, y, _ = inputs(64, 4, 320, dtype)
  spec = api.Spec(n=4, iters=20, kind="exp", eps=1e-6, implementation="triton")

  def connections(x, y, phi, alpha, bias):
    h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
    for scale in (2.0, 3.0):
      h, coeff, xs = api.merge(xs, y + h, coeff, phi * scale, alpha, bias, spec)
    return jnp.sum(api.res_post(xs, y * h, coeff, spec).astype(jnp.float32))

  grads = jax.value_and_grad(connections, argnums=(0, 1, 2, 3, 4))  # the value keeps res_post's forward
  text = jax.jit(grads).trace(x, y, phi, alpha, bias).lower(lowering_platforms=("cuda",)).as_text()
  kernels = {line.split("backend_config", 1)[1] for line in text.splitlines() if "__gpu$xla.gpu.triton" in line}
  assert len(kernels) == len(calls.KERNELS)


def test_the_tpu_pre_forward_equals_the_gpu_kernel_pair():
  """The TPU's pre_forward pre-mixes in the same kernel; the GPU's projection kernel + pre_mix give the
  same h, coefficient rows, logits and RMS (both in interpret mode; 37 tokens: padded blocks)."""
  x, phi, alpha, bias, _, _ = inputs(37, 4, 64, jnp.float32, seed=3)
  phi_p, affine = api.kernel_operands(x, phi, alpha, bias, 4)
  settings = dict(n=4, iters=20, kind="exp", eps=1e-6)
  one = calls.pre_forward(tpu.backend(interpret=True), x, phi_p, affine, **settings)
  two = calls.pre_forward(triton.backend(interpret=True), x, phi_p, affine, **settings)
  for got, want, name in zip(one, two, ("h", "coeff", "logits", "rms")):
    close(got, want, 1e-5, name)


@pytest.mark.parametrize("form", bench.FORMS)
def test_the_benchs_op_equals_its_reference(form):
  """bench.layer_fns' kernels and reference (what `bench.py`'s error column compares) agree in
  both forms, outputs and the vjp of both cotangents (interpret mode, bfloat16: 2e-2); in the
  merged form the reference takes the kernels' `Streams` convention for x's and out's cotangents."""
  primal, cotangents = bench.inputs(40, 64, 4)
  kernel, ref = bench.layer_fns(4, implementation="interpret", form=form)
  assert bench.max_relative_error(*(bench.forward_backward(f)(*primal, *cotangents) for f in (kernel, ref))) < 2e-2


def test_triton_ir_is_captured_for_every_gpu_kernel():
  """bench.triton_ir (what `bench.py --static` compiles) gives each GPU kernel of the layer's
  forward+backward in its two forms as Triton IR text, from a CUDA lowering on this CPU machine."""
  modules = bench.layer_triton_ir(4, *bench.inputs(64, 128, 4))
  assert sorted(modules) == sorted(f"mhc_{kernel}_triton" for kernel in calls.KERNELS)
  assert all("tt.func" in module for module in modules.values())


def test_tile_sweep_times_only_the_runs_named(capsys):
  """bench.sweep_tiles(only=...) times the named kernel alone (here in interpret mode), and an
  unknown name is refused in one line that lists the names."""
  bench.sweep_tiles(32, 64, "block_tokens=8", only="pre backward streams")
  out = capsys.readouterr().out
  assert "block_tokens=8 | pre backward streams" in out and "res_post" not in out and "layer" not in out
  with pytest.raises(SystemExit, match=r"--only: unknown run\(s\) \['layr'\]; use layer, pre forward"):
    bench.sweep_tiles(32, 64, "block_tokens=8", only="layr")
