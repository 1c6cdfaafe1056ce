"""Multi-head Latent Attention: cached decoding, the latent-only cache, and the attention core."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold.model import ModelConfig, Transformer
from manifold.model.accounting import kv_cache_bytes_per_token

from .conftest import decode_with_cache

CFG = ModelConfig(
  vocab_size=61, d_model=48, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=12, d_ff=64, max_seq_len=16,
  attention="mla", kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=10,
)  # fmt: skip


def tokens(seed=1):
  return jax.random.randint(jax.random.key(seed), (2, 16), 0, CFG.vocab_size)


@pytest.mark.parametrize("q_lora_rank,residual", [(0, "plain"), (24, "plain"), (24, "mhc")])
def test_cached_decoding_equals_full_forward(q_lora_rank, residual):
  model = Transformer(dataclasses.replace(CFG, q_lora_rank=q_lora_rank, residual=residual), rngs=nnx.Rngs(params=0))
  x = tokens()
  full, _ = model(x)
  cache = model.init_cache(2, 16)
  assert set(cache[0]) == {"latent", "k_rope"} and cache[0]["latent"].shape == (2, 16, 20)
  np.testing.assert_allclose(decode_with_cache(model, x, 6), full, rtol=1e-5, atol=1e-5)


def test_latent_cache_is_smaller_than_gqa_cache():
  gqa = dataclasses.replace(CFG, attention="gqa")
  assert kv_cache_bytes_per_token(CFG) == 2 * (20 + 4) * 4
  assert kv_cache_bytes_per_token(gqa) == 2 * (2 * 4 * 12) * 4
  v3 = dataclasses.replace(CFG, n_layers=61, n_heads=128, n_kv_heads=128, head_dim=128, kv_lora_rank=512,
                           qk_rope_head_dim=64, dtype="bfloat16")  # fmt: skip
  assert kv_cache_bytes_per_token(v3) == 61 * 576 * 2  # DeepSeek-V3: 576 numbers per token and layer


def test_every_mla_parameter_gets_a_finite_gradient():
  model = Transformer(dataclasses.replace(CFG, q_lora_rank=24), rngs=nnx.Rngs(params=0))
  x = tokens()

  def loss(model):
    logits, _ = model(x[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[:, 1:, None], -1)[..., 0])

  grads = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model)))
  assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in grads)
  assert not [jax.tree_util.keystr(p) for p, g in grads if float(jnp.abs(g).max()) == 0]
