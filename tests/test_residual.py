"""Residual streams: Sinkhorn projections, HC / mHC / mHC-lite, stream persistence, diagnostics, V4 parity."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from kernels.mhc.bench import equations
from kernels.mhc.sinkhorn import SINKHORN, birkhoff_combination, permutation_matrices
from safetensors.numpy import load_file

from manifold.config import ConfigError, base_config
from manifold.model import ModelConfig, Transformer
from manifold.model import residual as rs
from manifold.model.diagnostics import (
  amax_gain,
  composite_from_layer,
  composite_mixing,
  doubly_stochastic_deviation,
  mixing_stats,
)
from manifold.train.optimizer import make_optimizer

from .conftest import decode_with_cache

BASE = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16)
RESIDUALS = ["plain", "hc", "mhc", "mhc_lite"]
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "deepseek_v4_hyperconnection.safetensors"


def config(**kw) -> ModelConfig:
  return dataclasses.replace(BASE, **kw)


def tokens(batch=2, length=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, BASE.vocab_size)


# --- Sinkhorn and mHC-lite -------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(SINKHORN))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_doubly_stochastic_after_20_iterations_for_moderate_logits(variant, n):
  for scale, tolerance in [(1.0, 1e-5), (2.0, 1e-3 if n > 2 else 3e-3)]:
    logits = jax.random.uniform(jax.random.key(n), (4000, n, n), minval=-scale, maxval=scale)
    m = SINKHORN[variant](logits, 20)
    assert float(m.min()) >= 0
    assert float(doubly_stochastic_deviation(m).max()) < tolerance, (scale, variant)


@pytest.mark.parametrize("variant", ["exp", "log"])
def test_sinkhorn_at_logit_scale_10_leaves_rows_off_but_mhc_lite_is_exact(variant):
  """20 iterations are not enough for near-permutation logits: the gap mHC-lite removes."""
  logits = 10.0 * jax.random.normal(jax.random.key(0), (4000, 4, 4))
  m = SINKHORN[variant](logits, 20)
  np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)  # the last step normalises columns exactly
  assert float(doubly_stochastic_deviation(m).max()) > 1e-3
  lite = birkhoff_combination(10.0 * jax.random.normal(jax.random.key(1), (4000, 24)), permutation_matrices(4))
  assert float(doubly_stochastic_deviation(lite).max()) < 1e-6 and float(lite.min()) >= 0


def test_log_domain_equals_exp_start():
  logits = 3.0 * jax.random.normal(jax.random.key(2), (64, 4, 4))
  np.testing.assert_allclose(SINKHORN["log"](logits, 20), SINKHORN["exp"](logits, 20), atol=1e-5)


@pytest.mark.parametrize("variant", sorted(SINKHORN))
def test_gradients_through_sinkhorn_are_finite_up_to_logit_scale_50(variant):
  target = jax.random.uniform(jax.random.key(3), (4, 4))
  for scale in [1.0, 10.0, 50.0]:
    logits = scale * jax.random.normal(jax.random.key(4), (32, 4, 4))
    grad = jax.grad(lambda x: jnp.sum(SINKHORN[variant](x, 20) * target))(logits)
    assert bool(jnp.all(jnp.isfinite(grad))), (variant, scale)


def test_permutation_matrices_are_all_distinct_permutations():
  perms = permutation_matrices(4)
  assert perms.shape == (24, 4, 4)
  assert len({p.tobytes() for p in perms}) == 24
  np.testing.assert_array_equal(perms.sum(-1), 1)
  np.testing.assert_array_equal(perms.sum(-2), 1)


# --- composition across depth ------------------------------------------------------------------


def test_composite_gain_of_64_random_mhc_layers_stays_below_2_while_unconstrained_grows():
  logits = jax.random.normal(jax.random.key(5), (64, 256, 4, 4))
  mhc = jnp.swapaxes(SINKHORN["exp"](logits, 20), -1, -2)[:, :, None]  # [L, B, 1, n, n]
  assert float(amax_gain(composite_mixing(mhc)[-1]).max()) < 2.0
  unconstrained = jnp.eye(4) + 0.3 * jax.random.normal(jax.random.key(6), (64, 256, 1, 4, 4))
  assert float(amax_gain(composite_mixing(unconstrained)[-1]).max()) > 10.0


def test_composite_mixing_is_the_ordered_matrix_product():
  h = jax.random.normal(jax.random.key(7), (3, 2, 5, 4, 4))
  expected = h[2] @ h[1] @ h[0]
  np.testing.assert_allclose(composite_mixing(h)[-1], expected, rtol=1e-5, atol=1e-5)
  assert float(amax_gain(2.0 * jnp.eye(4))) == 2.0
  assert float(amax_gain(jnp.asarray(permutation_matrices(4)[5]))) == 1.0


def test_mixing_stats_shapes_and_values():
  h = jnp.broadcast_to(jnp.eye(4), (6, 2, 3, 4, 4))
  stats = mixing_stats(h)
  assert stats["composite_gain_per_layer"].shape == (6,) and stats["h_res_mean"].shape == (6, 4, 4)
  assert stats["forward_gain_from_layer"].shape == stats["backward_gain_from_layer"].shape == (6,)
  assert float(stats["amax_gain"]) == 1.0 and float(stats["ds_deviation"]) == 0.0
  assert float(stats["forward_gain"]) == float(stats["backward_gain"]) == 1.0


def test_gains_from_each_layer_to_the_last_match_numpy_token_means_of_suffix_products():
  """forward / backward gain of H_{L-1} ... H_l (max absolute row / column sum), averaged over tokens."""
  h = np.random.default_rng(0).normal(size=(5, 2, 3, 4, 4)).astype(np.float32)  # [L, B, T, n, n]
  forward, backward = [], []
  for first in range(len(h)):
    m = np.broadcast_to(np.eye(4, dtype=np.float32), h.shape[1:])
    for layer in range(first, len(h)):
      m = h[layer] @ m  # H_first acts first
    forward.append(np.abs(m).sum(-1).max(-1).mean())
    backward.append(np.abs(m).sum(-2).max(-1).mean())
  stats = mixing_stats(jnp.asarray(h))
  np.testing.assert_allclose(stats["forward_gain_from_layer"], forward, rtol=1e-5)
  np.testing.assert_allclose(stats["backward_gain_from_layer"], backward, rtol=1e-5)
  assert float(stats["forward_gain"]) == pytest.approx(forward[0], rel=1e-5)
  assert float(stats["backward_gain"]) == pytest.approx(backward[0], rel=1e-5)
  whole = composite_mixing(jnp.asarray(h))[-1]  # entries cancel: the tolerance is relative to the largest
  np.testing.assert_allclose(composite_from_layer(jnp.asarray(h))[0], whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_gains_from_layer_follow_the_output_input_layout_and_apply_h_l_first():
  """H_0 sends both inputs to output 0, H_1 triples stream 1: H_1 H_0 = [[1, 1], [0, 0]] has forward
  gain 2 and backward gain 1 (H_0 H_1 would give 4 and 3; the transposed layout 1 and 2)."""
  h0 = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  h1 = jnp.array([[1.0, 0.0], [0.0, 3.0]])
  stats = mixing_stats(jnp.stack([h0, h1])[:, None, None])  # [L=2, B=1, T=1, 2, 2]
  np.testing.assert_allclose(stats["forward_gain_from_layer"], [2.0, 3.0])
  np.testing.assert_allclose(stats["backward_gain_from_layer"], [1.0, 3.0])


def test_streams_persist_and_compose_across_depth_under_hc():
  """With every sub-block's output zeroed, x_L = (prod_l H_res) x_0 exactly: stream 3 at the
  input reaches stream 0 at the output only through the mixing matrices."""
  cfg = config(residual="hc", n_layers=3)
  model = Transformer(cfg, rngs=nnx.Rngs(params=0))
  key = jax.random.key(8)
  h_res = []
  for block in model.blocks:
    block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
    block.ffn.w_down[...] = jnp.zeros_like(block.ffn.w_down[...])
    for connection in (block.attn_connection, block.ffn_connection):
      key, sub = jax.random.split(key)
      b_res = jax.random.uniform(sub, (4, 4))  # HC layout [input, output]
      connection.b_res[...] = b_res
      h_res.append(b_res.T)
  x0 = jax.random.normal(jax.random.key(9), (1, 2, 4, cfg.d_model))
  positions = jnp.zeros((1, 2), jnp.int32)

  def run(x):
    pending = None
    for block in model.blocks:
      x, _, _, pending = block(x, positions, pending=pending)
    return rs.res_post_mix(x, *pending)

  composite = h_res[-1]
  for h in reversed(h_res[:-1]):
    composite = composite @ h
  np.testing.assert_allclose(run(x0), jnp.einsum("kj,btjd->btkd", composite, x0), rtol=1e-5, atol=1e-5)
  bumped = x0.at[:, :, 3].add(1.0)
  change = run(bumped)[:, :, 0] - run(x0)[:, :, 0]
  np.testing.assert_allclose(change, composite[0, 3] * jnp.ones_like(change), rtol=1e-4)
  assert float(composite[0, 3]) > 0.1


def test_hc_at_initialisation_computes_the_plain_residual_model():
  """b_res = I, b_post = 1, one-hot b_pre, zero dynamic weights: every stream carries the plain
  residual, and the final norm undoes the collapse's factor n."""
  plain = Transformer(config(residual="plain", norm_eps=1e-12), rngs=nnx.Rngs(params=0))
  hc = Transformer(config(residual="hc", norm_eps=1e-12), rngs=nnx.Rngs(params=1))
  nnx.update(hc, nnx.state(plain, nnx.Param))
  x = tokens()
  np.testing.assert_allclose(hc(x)[0], plain(x)[0], rtol=1e-5, atol=1e-5)


def test_plain_equals_the_baseline_residual_bit_for_bit():
  """`residual = plain` adds nothing: x + attn(norm x), x + ffn(norm x), on [B, T, D]."""
  model = Transformer(config(residual="plain"), rngs=nnx.Rngs(params=0))
  x_tokens = tokens()
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  x = model.embed(x_tokens, jnp.float32)
  for block in model.blocks:
    x = x + block.attn(block.attn_norm(x), positions)[0]
    x = x + block.ffn(block.ffn_norm(x))
  expected = model.final_norm(x) @ model.head[...]
  np.testing.assert_array_equal(np.asarray(model(x_tokens)[0]), np.asarray(expected))


# --- every residual option through the model ---------------------------------------------------


@pytest.mark.parametrize("kind", RESIDUALS)
def test_every_parameter_gets_a_finite_gradient(kind):
  model = Transformer(config(residual=kind), rngs=nnx.Rngs(params=0))
  if kind == "hc":  # HC's dynamic weights start at zero, which blocks the gradient of their scales
    for block in model.blocks:
      for connection in (block.attn_connection, block.ffn_connection):
        connection.w_dynamic[...] = 0.1 * jax.random.normal(jax.random.key(0), connection.w_dynamic.shape)
  x = tokens()

  def loss(model):
    logits, _ = model(x[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[:, 1:, None], -1)[..., 0])

  grads = nnx.jit(nnx.grad(loss))(model)
  flat = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))
  assert all(bool(jnp.all(jnp.isfinite(g))) for _, g in flat)
  dead = [jax.tree_util.keystr(p) for p, g in flat if float(jnp.abs(g).max()) == 0]
  assert not dead, dead


@pytest.mark.parametrize("kind", ["hc", "mhc", "mhc_lite"])
def test_kv_cache_decoding_equals_full_forward_with_streams(kind):
  model = Transformer(config(residual=kind), rngs=nnx.Rngs(params=0))
  x = tokens()
  full, _ = model(x)
  np.testing.assert_allclose(decode_with_cache(model, x, 5), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,sinkhorn", [("mhc", "exp"), ("mhc", "log"), ("mhc", "softmax_eps"), ("mhc_lite", "exp")])
def test_mhc_layers_emit_doubly_stochastic_mixing(kind, sinkhorn):
  model = Transformer(config(residual=kind, mhc_sinkhorn=sinkhorn, mhc_alpha_init=1.0), rngs=nnx.Rngs(params=0))
  _, _, aux = model.forward_with_aux(tokens())
  h_res = aux.h_res
  assert h_res.shape == (4, 2, 16, 4, 4)
  assert float(doubly_stochastic_deviation(h_res).max()) < 1e-3


def test_same_seed_same_outputs_for_every_residual():
  for kind in RESIDUALS:
    a = Transformer(config(residual=kind), rngs=nnx.Rngs(params=3))(tokens())[0]
    b = Transformer(config(residual=kind), rngs=nnx.Rngs(params=3))(tokens())[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_weight_decay_skips_hc_static_parts_and_vectors_and_shrinks_every_other_matrix(kind):
  """One AdamW step with zero gradients changes a leaf only through weight decay."""
  model = Transformer(config(residual=kind), rngs=nnx.Rngs(params=0))
  params = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1]))
  train_cfg = base_config().train
  train_cfg.update(warmup_steps=0, learning_rate=0.1, weight_decay=0.1, eps=1e-20)
  tx = make_optimizer(train_cfg)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  changed = {
    jax.tree_util.keystr(path): bool(jnp.any(a != b))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new))
  }
  static = {k for k in changed if k.endswith(("['b_pre']", "['b_post']", "['b_res']"))}
  assert len(static) == (3 * 2 * BASE.n_layers if kind == "hc" else 0)
  assert not any(changed[k] for k in static)
  matrices = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(params) if leaf.ndim >= 2]
  assert all(changed[k] for k in matrices if k not in static)
  assert not any(changed[k] for k in changed if k not in matrices)  # norms' scales, gates, biases
  assert any(k.endswith("['phi']") for k in matrices) == (kind == "mhc")


# --- parity with DeepSeek-V4 -------------------------------------------------------------------


def test_mhc_matches_deepseek_v4_hyperconnection_and_head():
  """Weights, inputs and outputs of transformers' DeepseekV4HyperConnection / HyperHead
  (tests/fixtures/make_deepseek_v4_hyperconnection.py); float32, 1e-5."""
  f = load_file(str(FIXTURE))
  streams, hidden = f["input.streams"].shape[2:]
  cfg = config(d_model=int(hidden), streams=int(streams), residual="mhc", mhc_sinkhorn="softmax_eps", norm_eps=1e-6)
  connection = rs.ManifoldHyperConnection(cfg, rngs=nnx.Rngs(params=0))
  connection.phi[...] = jnp.asarray(f["connection.fn"].T)  # V4 stores [out, in]
  connection.bias[...] = jnp.asarray(f["connection.base"])
  connection.alpha[...] = jnp.asarray(f["connection.scale"])
  head = rs.StreamHead(cfg, rngs=nnx.Rngs(params=0))
  head.weight[...] = jnp.asarray(f["head.hc_fn"].T)
  head.bias[...] = jnp.asarray(f["head.hc_base"])
  head.scale[...] = jnp.asarray(f["head.hc_scale"])

  x, y = jnp.asarray(f["input.streams"]), jnp.asarray(f["input.block_output"])
  mixing = connection(x)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixing.post, f["output.post"], **tol)
  np.testing.assert_allclose(jnp.swapaxes(mixing.res, -1, -2), f["output.comb"], **tol)  # V4's comb = H_res^T
  np.testing.assert_allclose(rs.pre_mix(x, mixing.pre), f["output.collapsed"], **tol)
  np.testing.assert_allclose(rs.res_post_mix(x, y, mixing), f["output.mixed"], **tol)
  np.testing.assert_allclose(head(x), f["output.head"], **tol)


# --- the Pallas kernels wired into the model ----------------------------------------------------


def test_mhc_with_pallas_kernels_matches_the_xla_path():
  """`model.mhc_impl = pallas` (interpret mode on the CPU) against the XLA path: logits and
  every parameter's gradient, float32, 1e-5; decoding with the KV cache runs the kernels too.
  The kernels run in 8-token blocks (`model.mhc_tiles`), so 2 x 15 tokens are padded.
  (Both Sinkhorn variants are compared kernel by kernel in kernels/mhc/mhc_test.py.)"""
  cfgs = {k: config(residual="mhc", mhc_impl=k, mhc_tiles="block_tokens=8") for k in ("pallas", "xla")}
  models = {k: Transformer(c, rngs=nnx.Rngs(params=0)) for k, c in cfgs.items()}
  x = tokens()

  def loss(model):
    logits, _ = model(x[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, x[:, 1:, None], -1)[..., 0])

  graph, state = nnx.split(models["pallas"])
  assert "GridMapping(grid=(4," in str(jax.make_jaxpr(lambda s: loss(nnx.merge(graph, s)))(state))  # 30 tokens / 8
  # one pre, each connection's res_post fused with the next one's pre (across blocks too), one
  # res_post; each forward kernel once: the backward pass recomputes only the norm after them
  traced = jax.make_jaxpr(lambda s: nnx.grad(loss)(nnx.merge(graph, s)))(state).jaxpr
  names = [e.params["name"] for e in equations(traced) if e.primitive.name == "pallas_call"]
  forward = [names.count(f"mhc_{k}_forward_triton") for k in ("pre", "merge", "res_post")]
  assert forward == [1, 2 * cfgs["pallas"].n_layers - 1, 1], forward
  results = {k: nnx.jit(nnx.value_and_grad(loss))(m) for k, m in models.items()}
  (value, grads), (ref_value, ref_grads) = results["pallas"], results["xla"]
  assert abs(float(value - ref_value)) < 1e-5
  pairs = zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(ref_grads)))
  assert max(float(jnp.max(jnp.abs(g - r))) for g, r in pairs) < 1e-5
  logits = nnx.jit(lambda m: m(x)[0])(models["pallas"])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(models["xla"](x)[0]), atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(decode_with_cache(models["pallas"], x, prefill=13, jit=True)), np.asarray(logits), atol=1e-4
  )


@pytest.mark.parametrize("residual", ["hc", "mhc"])
def test_component_ablation_fixes_the_mappings_left_out(residual):
  """model.hc_mappings (the mHC paper's Table 1): mappings left out are H_pre = 1/n, H_post = 1,
  H_res = I for every token; the learned ones still vary by token."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 32))
  for learned in ("res", "pre,post"):
    cfg = config(residual=residual, hc_mappings=learned, mhc_impl="xla", mhc_alpha_init=1.0)
    model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    connection = model.blocks[0].attn_connection
    if residual == "hc":  # its dynamic weights start at zero: move them so the learned parts vary
      connection.w_dynamic[...] = jax.random.normal(jax.random.key(1), connection.w_dynamic.shape)
    mixing = connection(x)
    fixed = {
      "pre": jnp.full((2, 5, 4), 0.25),
      "post": jnp.ones((2, 5, 4)),
      "res": jnp.broadcast_to(jnp.eye(4), (2, 5, 4, 4)),
    }
    for name, value in fixed.items():
      got = getattr(mixing, name)
      if name in learned.split(","):
        assert float(jnp.std(got, axis=(0, 1)).max()) > 1e-4, (learned, name, "a learned mapping varies by token")
      else:
        np.testing.assert_array_equal(got, value)
  with pytest.raises(ConfigError, match="model.hc_mappings='res,lambda': name one or more of pre,post,res"):
    ModelConfig.from_mapping({"hc_mappings": "res,lambda"})
