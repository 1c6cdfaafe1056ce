"""Weight-only quantisation: the rounding is within half a step per channel, and a quantised model
computes exactly what the float model computes with the dequantised weights put in."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold.config import base_config, model_config
from manifold.inference.quantize import QUANTIZED, QuantizedWeight, for_inference, quantize_array, quantize_model
from manifold.model import Transformer


def small_model() -> Transformer:
  c = base_config()
  c.model.update(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64, max_seq_len=32,
    attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    ffn="moe", n_routed_experts=4, experts_per_token=2, moe_d_ff=16,
  )  # fmt: skip
  c.train.seq_len = 32
  return Transformer(model_config(c), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mode, top", [("int8", 127), ("int4", 7)])
def test_rounding_is_within_half_a_step_of_each_channel(mode, top):
  w = jax.random.normal(jax.random.key(0), (4, 48, 24)) * jnp.linspace(0.1, 3.0, 24)  # channels of many scales
  for axis in (0, 1):
    q = quantize_array(w, mode, axis)
    assert q.values.dtype == jnp.dtype(mode) and q.scale.shape == tuple(1 if a == axis else n for a, n in
                                                                         enumerate(w.shape))  # fmt: skip
    values = np.asarray(q.values, np.int32)
    assert values.min() >= -top - (mode == "int4") and values.max() <= top
    assert np.all(np.abs(values).max(axis=axis) == top)  # each channel's largest magnitude hits the top level
    error = np.abs(np.asarray(q.astype(jnp.float32)) - np.asarray(w))
    assert np.all(error <= np.asarray(q.scale) / 2 * (1 + 1e-5))


@pytest.mark.parametrize("mode", ["bfloat16", "int8", "int4"])
def test_a_quantised_model_is_the_float_model_with_dequantised_weights(mode):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  quantized = small_model()
  counts = quantize_model(quantized, mode)
  reference = small_model()  # the same init; its matmul weights replaced by the dequantised values
  swapped = 0
  for (path, q), (_, p) in zip(nnx.iter_graph(quantized), nnx.iter_graph(reference), strict=True):
    if isinstance(q, nnx.Param) and path[-1] in QUANTIZED:
      assert isinstance(q.get_value(), QuantizedWeight) == (mode != "bfloat16")
      p.set_value(q.get_value().astype(jnp.float32))
      swapped += 1
  assert swapped == counts["quantized"] > 0 and counts["bytes_after"] < counts["bytes_before"]
  np.testing.assert_allclose(logits(quantized, tokens), logits(reference, tokens), rtol=1e-5, atol=1e-5)


def logits(model: Transformer, tokens: jax.Array) -> jax.Array:
  """The model's logits, jitted (a quantised model's int weights pass through jit as its state)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)


def test_bfloat16_compute_keeps_the_weights_and_changes_the_dtype():
  model = small_model()
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
  want = logits(model, tokens)
  half = for_inference(model, "none", "bfloat16")
  assert half.cfg.dtype == "bfloat16"
  np.testing.assert_allclose(logits(half, tokens), want, atol=5e-2)
