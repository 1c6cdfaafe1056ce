"""The dense transformer: shapes, gradients, causality, KV cache, determinism, counts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold.model import ModelConfig, Transformer
from manifold.model.accounting import count_params, training_flops_per_token
from manifold.model.attention import document_ids

from .conftest import decode_with_cache

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=24)


def make_model(cfg=CFG, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def tokens(batch=2, length=24, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_finite_gradients(dtype):
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": dtype})
  model = make_model(cfg)
  x = tokens()
  logits, cache = model(x)
  assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == jnp.float32 and cache is None

  def loss(model):
    logits, _ = model(x[:, :-1])
    return -jnp.mean(jax.nn.log_softmax(logits) * jax.nn.one_hot(x[:, 1:], cfg.vocab_size)) * cfg.vocab_size

  grads = nnx.jit(nnx.grad(loss))(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves), "every parameter receives gradient"


def test_causal_future_tokens_do_not_change_earlier_logits():
  model = make_model()
  x = tokens()
  t = 13
  changed = x.at[:, t].set((x[:, t] + 1) % CFG.vocab_size)
  before, _ = model(x)
  after, _ = model(changed)
  np.testing.assert_array_equal(np.asarray(before[:, :t]), np.asarray(after[:, :t]))
  assert float(jnp.abs(before[:, t:] - after[:, t:]).max()) > 1e-3, "position t and later must see the change"


@pytest.mark.parametrize("prefill", [1, 9])
def test_kv_cache_decoding_equals_full_forward(prefill):
  model = make_model()
  x = tokens()
  full, _ = model(x)
  np.testing.assert_allclose(np.asarray(decode_with_cache(model, x, prefill)), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_same_seed_same_model_and_outputs_different_seed_differs():
  a, b, c = make_model(seed=0), make_model(seed=0), make_model(seed=1)
  x = tokens()
  np.testing.assert_array_equal(np.asarray(a(x)[0]), np.asarray(b(x)[0]))
  assert not np.array_equal(np.asarray(a(x)[0]), np.asarray(c(x)[0]))


def test_parameter_count_matches_closed_form():
  c = CFG
  per_layer = (
    c.d_model * c.n_heads * c.head_dim * 2  # wq, wo
    + 2 * c.d_model * c.n_kv_heads * c.head_dim  # wk, wv
    + 3 * c.d_model * c.d_ff  # SwiGLU
    + 2 * c.d_model  # two RMSNorm scales
  )
  expected = 2 * c.vocab_size * c.d_model + c.n_layers * per_layer + c.d_model
  counts = count_params(c)
  assert counts["total"] == expected
  assert counts["embedding"] == c.vocab_size * c.d_model
  assert counts["active"] == counts["total"]  # dense: every parameter is active


def test_training_flops_per_token_is_6n_plus_causal_attention():
  c = CFG
  matmul = count_params(c)["non_embedding"] - c.n_layers * 2 * c.d_model - c.d_model
  attention = 3 * 4 * c.n_layers * c.n_heads * c.head_dim * (16 + 1) / 2
  assert math.isclose(training_flops_per_token(c, 16), 6 * matmul + attention)


@pytest.mark.parametrize(
  "changes",
  [
    {},  # grouped-query attention, plain residual
    dict(  # MLA on mHC streams, with an MTP depth
      attention="mla",
      kv_lora_rank=16,
      qk_nope_head_dim=8,
      qk_rope_head_dim=4,
      v_head_dim=6,
      residual="mhc",
      mtp_depth=1,
    ),
  ],
)
def test_packed_documents_equal_each_document_alone(changes):
  """With segment ids from the separator, each document's logits (and MTP logits) in a packed
  row equal the document's run on its own, from position 0; without them they do not."""
  cfg = ModelConfig(**{**CFG.__dict__, **changes})
  model = make_model(cfg)
  separator, bounds = 0, [(0, 7), (7, 16), (16, 24)]  # documents 0 and 1 end with the separator
  x = tokens(vocab=cfg.vocab_size) % (cfg.vocab_size - 1) + 1
  x = x.at[:, 6].set(separator).at[:, 15].set(separator)
  ids = document_ids(x, separator)
  np.testing.assert_array_equal(ids[0], [0] * 7 + [1] * 9 + [2] * 8)

  @nnx.jit
  def run(model, x, ids):
    """(main, MTP logits) packed, unmasked, and per document alone."""
    logits, _, aux = model.forward_with_aux(x, segment_ids_bt=ids)
    packed = (logits, model.mtp_logits(aux.hidden, x, ids))
    alone = []
    for start, end in bounds:
      logits, _, aux = model.forward_with_aux(x[:, start:end])
      alone.append((logits, model.mtp_logits(aux.hidden, x[:, start:end])))
    return packed, model(x)[0], alone

  (packed, packed_mtp), crossing, alone = run(model, x, ids)
  assert float(jnp.abs(crossing[:, 7:] - packed[:, 7:]).max()) > 1e-3, "unmasked documents see each other"
  assert len(packed_mtp) == cfg.mtp_depth
  for (start, end), (logits, mtp) in zip(bounds, alone):
    np.testing.assert_allclose(packed[:, start:end], logits, atol=1e-5, rtol=1e-5)
    for depth, (got, want) in enumerate(zip(packed_mtp, mtp), 1):
      np.testing.assert_allclose(got[:, start : end - depth], want, atol=1e-5, rtol=1e-5)
