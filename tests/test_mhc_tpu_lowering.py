"""The mHC TPU kernels (kernels/mhc) lower and compile for a v5p chip, on this CPU-only
machine: libtpu's topology description stands in for the chip (`make libtpu`)."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from kernels.mhc import api

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
    def loss(x, y, phi, alpha, bias):
      h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
      return jnp.sum(api.res_post(xs, y, coeff, spec).astype(jnp.float32)) + jnp.sum(h.astype(jnp.float32))

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
  assert text.count("tpu_custom_call") >= 5, "expected the 5 Mosaic kernels (2 forward, 3 backward)"
  assert compiled.memory_analysis().temp_size_in_bytes > 0
