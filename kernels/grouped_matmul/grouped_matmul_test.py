"""The grouped matmuls against reference.py: XLA's `ragged_dot`, the blocked XLA matmul
(also at small tiles, so that groups span several), the Triton blocks in interpret mode on
the CPU (at small tiles so that several tiles, straddling groups and padding all occur),
JAX's megablox TPU kernels in interpret mode (compiled on a TPU), `tokamax.ragged_dot` (its
kernels on a GPU or TPU, XLA's on the CPU), and on a GPU the compiled
Triton and (Hopper) Mosaic GPU kernels too; the Triton kernels are lowered for CUDA on any
machine. Tolerances relative
to each output's largest magnitude: float32 1e-5, bfloat16 1e-2 (both accumulate in
float32; the rounding of the output differs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.grouped_matmul import api, blocked, reference, triton

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
ON_GPU = jax.default_backend() == "gpu"
HOPPER = ON_GPU and any(name in jax.devices()[0].device_kind for name in ("H100", "H200"))
IMPLS = [
  (i, d)
  for i in ("xla", "blocked", "interpret", "megablox", "tokamax", "triton")
  for d in (jnp.float32, jnp.bfloat16)
  if i != "triton" or ON_GPU
]
IMPLS += [("mosaic_gpu", jnp.bfloat16)] if HOPPER else []  # Mosaic GPU's kernels take 16-bit operands
CASES = [  # (M, K, N, group sizes): the sizes may leave rows past their sum
  (96, 32, 64, (10, 0, 50, 36)),  # sizes sum to M; an empty group; tiles straddle groups
  (100, 40, 24, (0, 7, 70, 0, 3)),  # M, K, N off the tiles (padded); 20 rows past the groups
  (64, 16, 32, (0, 0, 64)),  # one group holds every row
]


def inputs(m, k, n, sizes, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
  w = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32).astype(dtype)
  dy = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
  return x, w, dy, jnp.array(sizes, jnp.int32)


def close(got, want, tol, name=""):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), name
  err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
  assert err < tol, (name, err)


@pytest.mark.parametrize("impl, dtype", IMPLS)
@pytest.mark.parametrize("m, k, n, sizes", CASES)
def test_gmm_forward_and_gradients_match_reference(m, k, n, sizes, dtype, impl):
  x, w, dy, group_sizes = inputs(m, k, n, sizes, dtype)

  def loss(gmm):
    return lambda x, w: jnp.sum(gmm(x, w, group_sizes).astype(jnp.float32) * dy.astype(jnp.float32))

  y = jax.jit(api.gmm, static_argnums=3)(x, w, group_sizes, impl)
  assert y.dtype == dtype
  close(y, reference.gmm(x, w, group_sizes), TOL[dtype], "y")
  assert not np.any(np.asarray(y[int(sum(sizes)) :], np.float32)), "rows past the groups must be 0"
  got = jax.jit(jax.grad(loss(lambda *a: api.gmm(*a, impl)), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(reference.gmm), argnums=(0, 1)))(x, w)
  for name, g, r in zip(("dx", "dw"), got, want):
    close(g, r, TOL[dtype], name)


def test_tokamax_runs_under_a_program_with_flags_of_its_own(monkeypatch):
  """tokamax reads absl flags, which parse sys.argv on first use: `manifold train --config ...`
  must not be taken for (unknown) absl flags."""
  from absl import flags

  flags.FLAGS.unparse_flags()
  monkeypatch.setattr("sys.argv", ["manifold", "train", "--config", "experiments/moe_ablation.py"])
  x, w, _, group_sizes = inputs(*CASES[0], jnp.float32)
  close(api.gmm(x, w, group_sizes, "tokamax"), reference.gmm(x, w, group_sizes), TOL[jnp.float32])


@pytest.mark.parametrize("m, k, n, sizes", CASES)
def test_blocked_with_groups_over_several_tiles(m, k, n, sizes):
  x, w, dy, group_sizes = inputs(m, k, n, sizes, jnp.float32)

  def loss(gmm):
    return lambda x, w: jnp.sum(gmm(x, w, group_sizes) * dy)

  got = jax.jit(jax.value_and_grad(loss(lambda x, w, s: blocked.gmm(x, w, s, block_m=16)), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.value_and_grad(loss(reference.gmm), argnums=(0, 1)))(x, w)
  for name, g, r in zip(("loss", "dx", "dw"), jax.tree.leaves(got), jax.tree.leaves(want)):
    close(g, r, 1e-5, name)


def test_tgmm_is_the_weight_gradient():
  x, w, dy, group_sizes = inputs(*CASES[1], jnp.float32)
  dw = jax.grad(lambda w: jnp.sum(reference.gmm(x, w, group_sizes) * dy))(w)
  close(reference.tgmm(x, dy, group_sizes), dw, 1e-5)
  close(
    triton.tgmm(
      *(jnp.pad(a, ((0, 28), (0, 8))) for a in (x, dy)), group_sizes, block_m=32, block_n=32, block_k=16, interpret=True
    )[:, :40, :24],
    dw,
    1e-5,
  )


def test_schedule_visits_each_group_tile_pair_once():
  sizes = jnp.array([5, 0, 40, 1, 0, 18, 0], jnp.int32)  # sum 64 of 96 rows
  group, tile = (np.asarray(a) for a in triton.schedule(sizes, 96, 16))
  assert group.shape == tile.shape == (96 // 16 + 7 - 1,)
  ends = np.cumsum(np.asarray(sizes))
  want = {
    (g, t) for g in range(7) for t in range(6) if sizes[g] and t * 16 < ends[g] and (t + 1) * 16 > ends[g] - sizes[g]
  }
  used = [(int(g), int(t)) for g, t in zip(group, tile) if t >= 0]
  assert len(used) == len(set(used)) and set(used) == want


def test_jit_and_deterministic():
  x, w, dy, group_sizes = inputs(*CASES[0], jnp.bfloat16)
  f = jax.jit(jax.grad(lambda x, w: jnp.sum(api.gmm(x, w, group_sizes, "interpret") * dy), argnums=(0, 1)))
  a, b = f(x, w), f(x, w)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


def test_bad_input_names_the_problem():
  x, w, _, group_sizes = inputs(*CASES[0], jnp.float32)
  with pytest.raises(ValueError, match="x is bfloat16 but w is float32"):
    api.gmm(x.astype(jnp.bfloat16), w, group_sizes)
  with pytest.raises(ValueError, match="use one of auto, xla"):
    api.gmm(x, w, group_sizes, "cublas")
  want = {"gpu": api.GPU_DEFAULT, "tpu": "megablox", "cpu": "blocked"}.get(jax.default_backend(), "xla")
  assert api.resolve("auto") == want


def test_gmm_kernel_stores_only_its_groups_rows():
  # Interpret mode fills output nobody wrote with NaN: rows past the groups must stay so.
  x, w, _, group_sizes = inputs(96, 32, 64, (10, 0, 30, 1), jnp.float32)
  y = np.asarray(triton.gmm(x, w, group_sizes, block_m=16, block_n=32, block_k=16, interpret=True))
  close(y[:41], reference.gmm(x, w, group_sizes)[:41], 1e-5)
  assert np.all(np.isnan(y[41:]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernels_lower_for_a_cuda_device(dtype):
  """gmm and tgmm at their GPU tiles, lowered for CUDA on this CPU machine (Pallas's Triton
  lowering; only compiling the Triton IR needs the GPU), on shapes off the tiles: a shape or an
  op the Triton lowering rejects fails here, not on a lent GPU."""
  x, w, dy, group_sizes = inputs(*CASES[1], dtype)

  def forward_backward(x, w):
    y, vjp = jax.vjp(lambda x, w: api.gmm(x, w, group_sizes, "triton"), x, w)
    return y, vjp(dy)

  lowered = jax.jit(forward_backward).trace(x, w).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # y = x w, dL/dx = dy w^T, dL/dw (tgmm)
