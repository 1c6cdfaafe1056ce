"""The TPU kernels (kernels/mhc's mHC kernels, JAX's splash attention through kernels/attention)
lower and compile for a v5p chip, on this CPU-only machine: libtpu's topology description
stands in for the chip (`make libtpu`)."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from kernels.attention import api as attention
from kernels.mhc import api, calls

from manifold.aot import parse_slice, slice_devices

LIBTPU = importlib.util.find_spec("libtpu") is not None or os.path.isdir(os.path.join(sys.prefix, "libtpu"))


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed: run `make libtpu` (pip install 'jax[tpu]')")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_compile_for_v5p_forward_and_backward(dtype):
  device = slice_devices(parse_slice("v5p-8"))[0]
  whole = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
  n, d, tokens = 4, 2048, 4096
  spec = api.Spec(n=n, iters=20, kind="exp", eps=1e-6, implementation="tpu")

  def layer_grads(x, y, phi, alpha, bias):
    def loss(x, y, phi, alpha, bias):  # two connections: pre, merge (res_post + the next pre), res_post
      h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
      h_next, coeff_next, out = api.merge(xs, y * h, coeff, phi, alpha, bias, spec)
      return jnp.sum(api.res_post(out, y * h_next, coeff_next, spec).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, y, phi, alpha, bias)

  args = [
    jax.ShapeDtypeStruct((tokens, n * d), dtype, sharding=whole),
    jax.ShapeDtypeStruct((tokens, d), dtype, sharding=whole),
    jax.ShapeDtypeStruct((n * d, 2 * n + n * n), jnp.float32, sharding=whole),
    jax.ShapeDtypeStruct((3,), jnp.float32, sharding=whole),
    jax.ShapeDtypeStruct((2 * n + n * n,), jnp.float32, sharding=whole),
  ]
  compiled = jax.jit(layer_grads).lower(*args).compile()
  text = compiled.as_text()
  missing = [
    k for k in calls.KERNELS if k != "pre_mix" and f"mhc_{k}_tpu" not in text
  ]  # the TPU pre-mixes in pre_forward
  assert not missing, f"Mosaic kernels missing from the compiled step: {missing}"
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed: run `make libtpu` (pip install 'jax[tpu]')")
# GQA; MLA (27B's) over packed documents
@pytest.mark.parametrize("heads, kv_heads, qk, v, packed", [(16, 4, 128, 128, False), (32, 32, 192, 128, True)])
def test_splash_attention_compiles_for_v5p_forward_and_backward(heads, kv_heads, qk, v, packed):
  """`model.attention_impl=auto` on a TPU is splash's Mosaic kernels: a quarter of the memory or
  less of XLA's attention, which holds [B, N, T, T] float32 scores."""
  device = slice_devices(parse_slice("v5p-8"))[0]
  whole = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
  b, t = 2, 4096
  shapes = [(b, t, heads, qk), (b, t, kv_heads, qk), (b, t, kv_heads, v)]
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=whole) for shape in shapes]
  args.append(jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=whole) if packed else None)

  def compiled(implementation):
    def loss(q, k, val, segment_ids):
      out = attention.dot_product_attention(
        q, k, val, is_causal=True, segment_ids=segment_ids, implementation=implementation
      )
      return jnp.sum(out.astype(jnp.float32))

    with jax.sharding.use_abstract_mesh(whole.mesh.abstract_mesh):  # `auto` resolves for the mesh's TPU
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()

  splash, xla = compiled("auto"), compiled("xla")
  assert splash.as_text().count("tpu_custom_call") >= 3, "expected splash's forward, dq and dkv kernels"
  assert "tpu_custom_call" not in xla.as_text()
  scores = b * heads * t * t * 4
  assert xla.memory_analysis().temp_size_in_bytes >= scores
  assert splash.memory_analysis().temp_size_in_bytes < xla.memory_analysis().temp_size_in_bytes / 4


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed: run `make libtpu` (pip install 'jax[tpu]')")
@pytest.mark.parametrize("chips", [1, 4])  # 4: per chip inside shard_map, as expert parallelism runs it
def test_megablox_grouped_matmul_compiles_for_v5p_forward_and_backward(chips):
  """`model.grouped_matmul_impl=auto` on a TPU: megablox's gmm (forward, dx) and tgmm (dw), not `ragged_dot`."""
  from kernels.grouped_matmul import api as grouped

  mesh = Mesh(np.array(slice_devices(parse_slice("v5p-8"))[:chips]), ("expert",))
  split = NamedSharding(mesh, PartitionSpec("expert"))
  rows, k, n, groups = 16384, 2560, 1536, 72  # one MoE layer of the 27B model: 4 x 4,096 tokens x 6 / 6
  args = [
    jax.ShapeDtypeStruct((rows, k), jnp.bfloat16, sharding=split),
    jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16, sharding=split),
    jax.ShapeDtypeStruct((groups,), jnp.int32, sharding=split),
  ]

  def grads(x, w, sizes):
    def loss(x, w):
      per_chip = lambda x, w, sizes: grouped.gmm(x, w, sizes, "auto")  # noqa: E731
      if chips > 1:
        per_chip = jax.shard_map(
          per_chip, mesh=mesh, in_specs=PartitionSpec("expert"), out_specs=PartitionSpec("expert")
        )
      return jnp.sum(per_chip(x, w, sizes).astype(jnp.float32))

    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    text = jax.jit(grads).lower(*args).compile().as_text()
  assert text.count("tpu_custom_call") >= 3, "expected megablox's gmm, its transpose for dx and tgmm"
