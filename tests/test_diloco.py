"""DiLoCo / Streaming DiLoCo math (manifold.islands.diloco) against plain numpy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from manifold.islands import diloco

EPS32 = float(np.finfo(np.float32).eps)


def random_tree(rng, scale=1.0):
  return {
    "a": (scale * rng.standard_normal((3, 5))).astype(np.float32),
    "b": {"c": (scale * rng.standard_normal(7)).astype(np.float32), "d": np.float32(scale * rng.standard_normal())},
  }


# ---------------------------------------------------------------------------------------- outer gradient


def test_outer_gradient_is_the_numpy_weighted_mean_of_differences():
  rng = np.random.default_rng(0)
  theta = random_tree(rng)
  islands = [random_tree(rng) for _ in range(3)]
  tokens = [1000.0, 3000.0, 500.0]
  delta = diloco.outer_gradient(theta, islands, tokens)
  equal = diloco.outer_gradient(theta, islands)
  for path, g in jax.tree_util.tree_flatten_with_path(theta)[0]:
    xs = [np.asarray(dict_get(island, path), np.float64) for island in islands]
    want = sum(w * (np.float64(g) - x) for w, x in zip(tokens, xs)) / sum(tokens)
    got = dict_get(delta, path)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dict_get(equal, path), np.float64(g) - np.mean(xs, axis=0), rtol=1e-5, atol=1e-6)


def dict_get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize(
  "islands, weights, message",
  [
    ([], None, "empty list"),
    ("two", [0.0, 0.0], "positive total"),
    ("two", [1.0, -1.0], "non-negative"),
    ("two", [1.0], "1 weights for 2 islands"),
    ("missing", None, "missing ['b']['c']"),
    ("reshaped", None, "has shape (15,), not (3, 5)"),
  ],
)
def test_outer_gradient_rejects_empty_nonpositive_and_mismatched_inputs(islands, weights, message):
  rng = np.random.default_rng(1)
  theta = random_tree(rng)
  if islands == "two":
    islands = [random_tree(rng), random_tree(rng)]
  elif islands == "missing":
    islands = [{"a": theta["a"], "b": {"d": theta["b"]["d"]}}]
  elif islands == "reshaped":
    islands = [{**theta, "a": theta["a"].reshape(-1)}]
  with pytest.raises(ValueError, match="^[^\n]*$") as err:
    diloco.outer_gradient(theta, islands, weights)
  assert message in str(err.value)


def test_nesterov_outer_steps_match_the_closed_form_over_two_steps():
  rng = np.random.default_rng(2)
  theta0 = rng.standard_normal(6).astype(np.float32)
  d1, d2 = rng.standard_normal((2, 6)).astype(np.float32)
  tx = diloco.outer_optimizer()
  state = tx.init(theta0)
  theta1, state = diloco.outer_step(tx, theta0, state, d1)
  theta2, state = diloco.outer_step(tx, theta1, state, d2)
  lr, mu = 0.7, 0.9
  m1 = d1.astype(np.float64)
  want1 = theta0 - lr * (d1 + mu * m1)
  m2 = d2 + mu * m1
  want2 = want1 - lr * (d2 + mu * m2)
  np.testing.assert_allclose(theta1, want1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(theta2, want2, rtol=1e-5, atol=1e-6)


def test_an_outer_step_without_momentum_moves_global_toward_the_islands():
  rng = np.random.default_rng(3)
  theta = rng.standard_normal(8).astype(np.float32)
  islands = [rng.standard_normal(8).astype(np.float32) for _ in range(2)]
  tx = diloco.outer_optimizer(learning_rate=1.0, momentum=0.0, nesterov=False)
  new, _ = diloco.outer_step(tx, theta, tx.init(theta), diloco.outer_gradient(theta, islands))
  np.testing.assert_allclose(new, np.mean(islands, axis=0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- quantisation


def numpy_quantize(x, bits, block):
  """Reference: (int codes unpacked [padded n], scales [blocks]) in float32 arithmetic."""
  qmax = {8: 127, 4: 7}[bits]
  flat = np.asarray(x, np.float32).reshape(-1)
  blocks = -(-flat.size // block)
  rows = np.zeros(blocks * block, np.float32)
  rows[: flat.size] = flat
  rows = rows.reshape(blocks, block)
  scales = (np.abs(rows).max(axis=1) / np.float32(qmax)).astype(np.float32)
  divisor = np.where(scales > 0, scales, np.float32(1))[:, None]
  return np.clip(np.rint(rows / divisor), -qmax, qmax).astype(np.int64).reshape(-1), scales


def numpy_pack_int4(codes):
  nibbles = (codes & 0xF).astype(np.uint8)
  if nibbles.size % 2:
    nibbles = np.append(nibbles, np.uint8(0))
  return nibbles[0::2] | (nibbles[1::2] << 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, block", [((37, 29), 64), ((1000,), 128), ((5, 3), 7)])
def test_round_trip_error_is_at_most_half_a_scale_and_codes_match_numpy(bits, shape, block):
  rng = np.random.default_rng(bits + block)
  x = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape)).astype(np.float32)
  codes, scales = diloco.quantize(x, bits, block)
  want_codes, want_scales = numpy_quantize(x, bits, block)
  np.testing.assert_array_equal(scales, want_scales)
  if bits == 8:
    assert codes.dtype == jnp.int8
    np.testing.assert_array_equal(codes, want_codes)
  else:
    assert codes.dtype == jnp.uint8
    np.testing.assert_array_equal(codes, numpy_pack_int4(want_codes))
  decoded = diloco.dequantize(codes, scales, shape)
  assert decoded.shape == shape and decoded.dtype == jnp.float32
  n = x.size
  per_element_scale = np.repeat(want_scales, block)[:n].astype(np.float64)
  per_element_absmax = np.repeat(np.abs(np.pad(x.reshape(-1), (0, -n % block))).reshape(-1, block).max(1), block)[:n]
  error = np.abs(np.asarray(decoded, np.float64).reshape(-1) - x.reshape(-1).astype(np.float64))
  # The bound scale / 2, up to float32 rounding in x / scale and code * scale (a few ulps of the block's absmax).
  assert np.all(error <= per_element_scale / 2 + 4 * EPS32 * per_element_absmax)
  if n >= 1000:
    assert (error / (per_element_scale / 2)).max() > 0.9  # and it is tight: some element comes close to it
  np.testing.assert_allclose(decoded.reshape(-1), want_codes[:n] * per_element_scale, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_packed_nbytes_and_quantized_nbytes_match_the_arrays(bits):
  # (1, 1) and (7, 3) pad to an odd count: int4 then spends half a byte on nothing.
  for n, block in [(1, 1), (7, 3), (129, 64), (0, 16)]:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    codes, scales = diloco.quantize(x, bits, block)
    blocks = -(-n // block)
    padded = blocks * block
    assert codes.nbytes == {4: math.ceil(padded / 2), 8: padded, 32: 4 * n}[bits]
    assert scales.dtype == jnp.float32 and scales.nbytes == (0 if bits == 32 else 4 * blocks)
    assert diloco.quantized_nbytes(n, bits, block) == codes.nbytes + scales.nbytes
  one = np.float32([-2.5])  # a block of one element is its own absmax: exact
  np.testing.assert_array_equal(diloco.dequantize(*diloco.quantize(one, bits, 1), (1,)), one)


@pytest.mark.parametrize("bits", [4, 8])
def test_an_all_zero_block_has_scale_zero_and_decodes_to_zeros(bits):
  x = np.random.default_rng(4).standard_normal(48).astype(np.float32)
  x[16:32] = 0
  x[-3:] = 0  # the last block is zero only in part
  codes, scales = diloco.quantize(x, bits, 16)
  assert float(scales[1]) == 0.0
  decoded = np.asarray(diloco.dequantize(codes, scales, x.shape))
  assert np.all(np.isfinite(decoded))
  np.testing.assert_array_equal(decoded[16:32], 0)
  np.testing.assert_array_equal(decoded[-3:], 0)


def test_bits_32_is_the_identity():
  x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
  codes, scales = diloco.quantize(x, 32, 64)
  assert codes.dtype == jnp.float32 and scales.shape == (0,) and scales.dtype == jnp.float32
  np.testing.assert_array_equal(diloco.dequantize(codes, scales, x.shape), x)


@pytest.mark.parametrize("bits", [2, 16, 0, True])
def test_unsupported_bits_raise_naming_islands_bits(bits):
  with pytest.raises(ValueError, match=r"islands\.bits.*4, 8 or 32"):
    diloco.quantize(np.ones(4, np.float32), bits, 4)
  with pytest.raises(ValueError, match=r"islands\.bits"):
    diloco.quantized_nbytes(4, bits, 4)


@pytest.mark.parametrize("bits", [4, 32])
def test_quantize_tree_round_trips_every_leaf_and_counts_its_bytes(bits):
  tree = random_tree(np.random.default_rng(6))
  quantized = diloco.quantize_tree(tree, bits, 8)
  assert len(quantized) == len(jax.tree_util.tree_leaves(tree))
  decoded = diloco.dequantize_tree(quantized, tree)
  assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(tree)
  for (codes, scales), x, y in zip(quantized, jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(decoded)):
    assert np.shape(y) == np.shape(x)
    if bits == 32:
      np.testing.assert_array_equal(y, x)
    else:
      bound = np.repeat(np.asarray(scales), 8)[: np.size(x)].reshape(np.shape(x)) / 2
      assert np.all(np.abs(np.asarray(y) - x) <= bound * (1 + 1e-5) + 1e-7)
    if bits == 4:
      np.testing.assert_array_equal(codes, numpy_pack_int4(numpy_quantize(x, 4, 8)[0]))
  assert diloco.tree_quantized_nbytes(tree, bits, 8) == sum(c.nbytes + s.nbytes for c, s in quantized)


# ---------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("bits", [4, 8])
def test_error_feedback_keeps_the_running_sum_within_half_a_scale(bits):
  rng = np.random.default_rng(7)
  rounds, shape, block = 40, (10, 13), 16
  residual = None
  sum_x = np.zeros(shape)
  sum_sent = np.zeros(shape)
  max_scale = np.zeros(shape)
  for _ in range(rounds):
    x = rng.standard_normal(shape).astype(np.float32)
    codes, scales, residual = diloco.quantize_with_feedback(x, residual, bits, block)
    sum_x += x
    sum_sent += np.asarray(diloco.dequantize(codes, scales, shape), np.float64)
    max_scale = np.maximum(max_scale, np.repeat(np.asarray(scales), block)[: x.size].reshape(shape))
    gap = np.abs(sum_x - sum_sent)
    assert np.all(gap <= max_scale / 2 + 1e-5)
    np.testing.assert_allclose(np.asarray(residual), sum_x - sum_sent, atol=1e-5)


def test_without_feedback_a_constant_input_accumulates_bias_and_with_feedback_it_does_not():
  x = np.random.default_rng(8).uniform(-1, 1, 64).astype(np.float32)
  bits, block, rounds = 4, 32, 50
  codes, scales = diloco.quantize(x, bits, block)
  once = np.asarray(diloco.dequantize(codes, scales, x.shape), np.float64)
  half_scale = np.repeat(np.asarray(scales), block) / 2
  plain_gap = np.abs(rounds * x - rounds * once)  # every round sends the same rounded value
  assert plain_gap.max() > 10 * half_scale.max()
  residual, sent = None, np.zeros(x.shape)
  for _ in range(rounds):
    codes, scales, residual = diloco.quantize_with_feedback(x, residual, bits, block)
    sent += np.asarray(diloco.dequantize(codes, scales, x.shape), np.float64)
  assert np.abs(rounds * x.astype(np.float64) - sent).max() <= np.asarray(scales).max() / 2 + 1e-5


def test_quantize_tree_with_feedback_carries_a_residual_tree():
  rng = np.random.default_rng(9)
  first, second = random_tree(rng), random_tree(rng)
  quantized, residual = diloco.quantize_tree_with_feedback(first, None, 4, 8)
  _, residual2 = diloco.quantize_tree_with_feedback(second, residual, 4, 8)
  sent = diloco.dequantize_tree(quantized, first)
  for x, y, r in zip(*(jax.tree_util.tree_leaves(t) for t in (first, sent, residual))):
    np.testing.assert_allclose(r, x - np.asarray(y), atol=1e-6)
  assert jax.tree_util.tree_structure(residual2) == jax.tree_util.tree_structure(first)


# ---------------------------------------------------------------------------------------- fragments


def test_strided_and_sequential_fragment_assignment():
  assert diloco.fragment_of_layers(6, 3) == [0, 1, 2, 0, 1, 2]
  assert diloco.fragment_of_layers(6, 3, "sequential") == [0, 0, 1, 1, 2, 2]
  assert diloco.fragment_of_layers(4, 1) == [0, 0, 0, 0]
  assert diloco.fragment_of_layers(4, 4, "sequential") == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="strided"):
    diloco.fragment_of_layers(4, 2, "random")


@pytest.mark.parametrize("layers, fragments", [(4, 3), (6, 4), (4, 0), (4, 8)])
def test_a_fragment_count_that_does_not_divide_the_layers_raises(layers, fragments):
  with pytest.raises(
    ValueError, match=r"^islands\.fragments = \d+ does not divide the \d+ layers; choose a divisor"
  ) as err:
    diloco.fragment_of_layers(layers, fragments)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("layers, fragments", [(12, 1), (12, 2), (12, 3), (12, 4), (12, 6), (12, 12)])
@pytest.mark.parametrize("pattern", ["strided", "sequential"])
def test_every_layer_is_in_exactly_one_fragment_of_equal_size(layers, fragments, pattern):
  assignment = diloco.fragment_of_layers(layers, fragments, pattern)
  assert len(assignment) == layers
  assert sorted(set(assignment)) == list(range(fragments))
  assert all(assignment.count(p) == layers // fragments for p in range(fragments))


@pytest.mark.parametrize("inner_steps, fragments", [(8, 4), (12, 3), (10, 3), (5, 5), (7, 1)])
def test_each_fragment_is_synced_once_per_h_steps_at_staggered_offsets(inner_steps, fragments):
  offsets = diloco.sync_step_offsets(inner_steps, fragments)
  assert offsets == [p * inner_steps // fragments for p in range(fragments)]
  assert len(set(offsets)) == fragments and offsets[0] == 0
  assert diloco.fragments_due(0, inner_steps, fragments) == []
  windows = 4
  syncs = {p: [] for p in range(fragments)}
  for step in range(1, windows * inner_steps + 1):
    for p in diloco.fragments_due(step, inner_steps, fragments):
      syncs[p].append(step)
  for p, steps in syncs.items():
    for k in range(windows):  # exactly once in each window of H consecutive steps
      assert sum(k * inner_steps < t <= (k + 1) * inner_steps for t in steps) == 1
    assert all(b - a == inner_steps for a, b in zip(steps, steps[1:]))
    assert steps[0] == (offsets[p] or inner_steps)
  if inner_steps % fragments == 0:
    assert offsets == [p * (inner_steps // fragments) for p in range(fragments)]  # t = k H + p H / P


def test_fewer_inner_steps_than_fragments_raises():
  with pytest.raises(ValueError, match=r"islands\.inner_steps = 3 is fewer than islands\.fragments = 4"):
    diloco.sync_step_offsets(3, 4)
  with pytest.raises(ValueError):
    diloco.fragments_due(5, 3, 4)


@pytest.fixture(scope="module")
def quickstart_params():
  """The quickstart Transformer's parameter tree (4 blocks, MTP, mHC stream head), as shapes."""
  from flax import nnx

  from manifold.config import load_config, model_config
  from manifold.train.state import build_model

  cfg = model_config(load_config("experiments/quickstart.py"))
  model = nnx.eval_shape(lambda: build_model(cfg, jax.random.key(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg.n_layers


@pytest.mark.parametrize("fragments, pattern", [(2, "strided"), (4, "sequential"), (1, "strided")])
def test_partition_of_the_quickstart_transformer_puts_each_block_in_its_layers_fragment(
  quickstart_params, fragments, pattern
):
  params, layers = quickstart_params
  layer_fragment = diloco.fragment_of_layers(layers, fragments, pattern)
  leaf_fragments = diloco.partition(params, layer_fragment, fragments)
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert len(leaf_fragments) == len(paths)
  assert set(leaf_fragments) == set(range(fragments))
  for path, fragment in zip(paths, leaf_fragments):
    top = path[0].key
    if top == "blocks":
      assert fragment == layer_fragment[path[1].key]
    elif top == "embed":
      assert fragment == layer_fragment[0]
    else:
      assert top in ("final_norm", "head", "mtp", "stream_head")
      assert fragment == layer_fragment[-1]
  blocks_seen = {diloco.layer_index_of(p) for p in paths} - {None}
  assert blocks_seen == set(range(layers))
  sizes = [sum(math.prod(x.shape) for x in diloco.select(params, leaf_fragments, p)) for p in range(fragments)]
  assert sum(sizes) == sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def test_partition_rejects_out_of_range_fragments_and_layers():
  params = {"blocks": {0: np.zeros(2), 3: np.zeros(2)}}
  with pytest.raises(ValueError, match="outside 0..1"):
    diloco.partition(params, [0, 2], 2)
  with pytest.raises(ValueError, match="layer 3"):
    diloco.partition(params, [0, 1], 2)


def test_select_and_merge_fragment_take_out_and_put_back_one_fragments_leaves():
  rng = np.random.default_rng(10)
  tree = {
    "blocks": {i: rng.standard_normal(3).astype(np.float32) for i in range(4)},
    "embed": np.ones(2),
    "head": np.ones(5),
  }
  leaf_fragments = diloco.partition(tree, diloco.fragment_of_layers(4, 2), 2)
  assert leaf_fragments == [0, 1, 0, 1, 0, 1]  # blocks 0..3, embed, head
  part = diloco.select(tree, leaf_fragments, 1)
  np.testing.assert_array_equal(part[0], tree["blocks"][1])
  merged = diloco.merge_fragment(tree, [-x for x in part], leaf_fragments, 1)
  for x, y, f in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(merged), leaf_fragments):
    np.testing.assert_array_equal(y, -x if f == 1 else x)
  assert diloco.merge_fragment(tree, part, leaf_fragments, 1) is not tree
  with pytest.raises(ValueError, match="fragment 1, which has 3"):
    diloco.merge_fragment(tree, part[:2], leaf_fragments, 1)


# ---------------------------------------------------------------------------------------- mix and bytes


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mix_is_the_convex_combination_in_the_local_dtype(alpha):
  rng = np.random.default_rng(11)
  local = {"w": rng.standard_normal((4, 3)).astype(np.float32), "h": jnp.asarray(rng.standard_normal(5), jnp.bfloat16)}
  outer = {"w": rng.standard_normal((4, 3)).astype(np.float32), "h": rng.standard_normal(5).astype(np.float32)}
  mixed = diloco.mix(local, outer, alpha)
  assert mixed["w"].dtype == jnp.float32 and mixed["h"].dtype == jnp.bfloat16
  want_w = alpha * local["w"].astype(np.float64) + (1 - alpha) * outer["w"]
  np.testing.assert_allclose(mixed["w"], want_w, rtol=1e-6, atol=1e-6)
  want_h = alpha * np.asarray(local["h"], np.float64) + (1 - alpha) * outer["h"]
  np.testing.assert_allclose(np.asarray(mixed["h"], np.float64), want_h, rtol=1e-2, atol=1e-2)
  if alpha == 0.0:
    np.testing.assert_array_equal(mixed["w"], outer["w"])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    diloco.mix(local, outer, 1.5)


@pytest.mark.parametrize("n, parties, steps", [(1000, 4, 10), (123_456, 3, 7), (10, 1, 5), (0, 8, 1)])
def test_allreduce_bytes_is_two_m_minus_one_over_m_times_four_n_per_step(n, parties, steps):
  assert diloco.allreduce_bytes(n, parties, steps) == pytest.approx(
    2 * (parties - 1) / parties * 4 * n * steps, rel=1e-12
  )
  assert diloco.allreduce_bytes(1000, 4, 10) == 60_000
