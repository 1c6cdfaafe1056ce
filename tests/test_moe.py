"""DeepSeekMoE: routing rules, dropless grouped matmul against the dense reference, balancing."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold.model import ModelConfig, Transformer
from manifold.model.moe import MoE, route, sequence_balance_loss, updated_bias
from manifold.model.moe.experts import routed_dense, routed_ragged

CFG = ModelConfig(
  vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64, max_seq_len=16,
  ffn="moe", n_routed_experts=8, n_shared_experts=1, experts_per_token=3, moe_d_ff=16,
  n_group=4, topk_group=2, routed_scaling_factor=2.5,
)  # fmt: skip


def scores(n=64, e=8, seed=0):
  return jax.nn.sigmoid(jax.random.normal(jax.random.key(seed), (n, e)))


def test_gate_weights_sum_to_the_routed_scaling_factor():
  weights, experts = route(scores(), jnp.zeros(8), CFG)
  assert weights.shape == experts.shape == (64, 3)
  np.testing.assert_allclose(weights.sum(-1), 2.5, rtol=1e-6)
  assert all(len(set(row)) == 3 for row in np.asarray(experts))


def test_group_limited_routing_uses_at_most_topk_group_groups_and_the_best_ones():
  s = scores(n=256)
  _, experts = route(s, jnp.zeros(8), CFG)
  groups = np.asarray(experts) // 2  # 4 groups of 2 experts
  assert max(len(set(row)) for row in groups) <= 2
  group_score = np.asarray(s).reshape(256, 4, 2).sum(-1)  # with 2 experts a group, top-2 sum = sum
  best = np.argsort(-group_score, axis=1)[:, :2]
  for row, allowed in zip(groups, best):
    assert set(row) <= set(allowed)


def test_bias_changes_selection_but_gate_values_stay_the_unbiased_scores():
  cfg = dataclasses.replace(CFG, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
  s = scores()
  bias = jnp.zeros(8).at[7].set(10.0)  # expert 7 always chosen
  weights, experts = route(s, bias, cfg)
  assert bool(jnp.all(jnp.any(experts == 7, axis=-1)))
  np.testing.assert_array_equal(weights, jnp.take_along_axis(s, experts, -1))
  plain_experts = route(s, jnp.zeros(8), cfg)[1]
  assert not np.array_equal(np.sort(experts, -1), np.sort(plain_experts, -1))


def test_bias_update_moves_a_skewed_load_toward_uniform():
  moe = MoE(dataclasses.replace(CFG, n_group=1, topk_group=1), out_std=0.02, rngs=nnx.Rngs(params=0))
  moe.router[...] = moe.router[...].at[:, 0].add(0.2)  # with inputs around +1, every token prefers expert 0
  x = 1.0 + jax.random.normal(jax.random.key(1), (4, 16, 32))
  spreads = []
  for _ in range(300):
    _, aux = moe(x)
    spreads.append(float(jnp.std(aux.load)))
    moe.bias[...] = updated_bias(moe.bias[...], aux.load, rate=0.01)
  assert float(moe(x)[1].load[0]) < 64  # expert 0 no longer takes every token
  assert np.mean(spreads[-50:]) < 0.5 * spreads[0], (spreads[0], spreads[-50:])
  assert float(moe.bias[...][0]) < 0  # the overloaded expert was pushed down


@pytest.mark.parametrize("matmul", ["xla", "interpret"])  # interpret: the Triton kernels' blocks on the CPU
def test_grouped_matmul_equals_dense_reference_forward_and_gradients(matmul):
  dtype = jnp.float32
  n, d, f, e, k = 48, 16, 8, 6, 2
  keys = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(keys[0], (n, d), dtype)
  w = [0.3 * jax.random.normal(key, shape, dtype) for key, shape in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)])]
  gate_scores = jax.nn.sigmoid(jax.random.normal(keys[4], (n, e)))
  weights, experts = jax.lax.top_k(gate_scores, k)
  experts = experts.at[:5].set(jnp.array([0, 1]))  # make expert 0's group large, some experts empty
  ragged = functools.partial(routed_ragged, matmul=matmul)
  np.testing.assert_allclose(
    ragged(x, weights, experts, *w), routed_dense(x, weights, experts, *w), rtol=1e-5, atol=1e-5
  )

  def loss(impl, x, weights, *w):
    return jnp.sum(jnp.sin(impl(x, weights, experts, *w)))

  grads_ragged = jax.grad(lambda *a: loss(ragged, *a), argnums=(0, 1, 2, 3, 4))(x, weights, *w)
  grads_dense = jax.grad(lambda *a: loss(routed_dense, *a), argnums=(0, 1, 2, 3, 4))(x, weights, *w)
  for a, b in zip(grads_ragged, grads_dense):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_moe_model_ragged_equals_dense_reference():
  ragged = Transformer(CFG, rngs=nnx.Rngs(params=0))
  dense = Transformer(dataclasses.replace(CFG, moe_impl="dense"), rngs=nnx.Rngs(params=0))
  x = jax.random.randint(jax.random.key(3), (2, 16), 0, 61)
  np.testing.assert_allclose(ragged(x)[0], dense(x)[0], rtol=1e-5, atol=1e-5)


def test_sequence_balance_loss_is_1_for_a_perfectly_even_routing():
  # 4 experts, K = 1, every expert chosen equally and uniform affinities: sum_i f_i P_i = sum_i 1 * 1/4 = 1
  experts = jnp.array([[[0], [1], [2], [3]]])
  loss = sequence_balance_loss(jnp.full((1, 4, 4), 0.5), experts, 4)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  skewed = sequence_balance_loss(jnp.full((1, 4, 4), 0.5), jnp.zeros((1, 4, 1), jnp.int32), 4)
  np.testing.assert_allclose(skewed, 1.0, rtol=1e-6)  # uniform P: f sums to E, P = 1/E
  peaked = jnp.array([[[0.9, 0.1, 0.1, 0.1]] * 4])
  assert float(sequence_balance_loss(peaked, jnp.zeros((1, 4, 1), jnp.int32), 4)) > 2.0


def test_first_k_dense_replace_keeps_dense_ffn_in_the_first_blocks():
  model = Transformer(dataclasses.replace(CFG, first_k_dense_replace=1), rngs=nnx.Rngs(params=0))
  assert [b.moe for b in model.blocks] == [False, True]
  _, _, aux = model.forward_with_aux(jax.random.randint(jax.random.key(4), (2, 8), 0, 61))
  assert aux.expert_load.shape == (1, 8)
  assert float(aux.expert_load.sum()) == 2 * 8 * 3  # dropless: every token reaches its K experts


def test_training_updates_router_biases_outside_the_gradient_and_checkpoints_them(tiny_config, tmp_path):
  from manifold.train.checkpoint import Checkpointer
  from manifold.train.loop import train

  cfg = tiny_config("--config.model.ffn=moe", "--config.train.steps=4", "--config.train.eval_every=100",
                    "--config.train.router_bias_rate=0.01")  # fmt: skip
  result = train(cfg, str(tmp_path / "run"), progress=False)
  biases = jax.tree.leaves(result.state.extra)
  assert len(biases) == cfg.model.n_layers and max(float(jnp.abs(b).max()) for b in biases) > 0
  restored, _ = Checkpointer(str(tmp_path / "run"), keep=3).restore(4, result.spec.abstract)
  for a, b in zip(jax.tree.leaves(restored.extra), biases):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_active_parameters_leave_out_the_unchosen_routed_experts_and_mtp():
  from manifold.model.accounting import count_params, training_flops_per_token

  cfg = dataclasses.replace(CFG, first_k_dense_replace=1, mtp_depth=1)
  counts = count_params(cfg)
  per_expert = 3 * cfg.d_model * cfg.moe_d_ff
  assert counts["active"] == counts["total"] - counts["mtp"] - 1 * (8 - 3) * per_expert
  assert counts["mtp"] > 0
  dense_all = dataclasses.replace(cfg, experts_per_token=8, n_group=1, topk_group=1)
  flops_gap = training_flops_per_token(dense_all, 16) - training_flops_per_token(cfg, 16)
  assert flops_gap == 3 * 2 * (8 - 3) * per_expert  # only the chosen experts count
