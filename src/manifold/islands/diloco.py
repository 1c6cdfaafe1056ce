"""DiLoCo and Streaming DiLoCo as pure functions on parameter pytrees.

M islands start from the global parameters theta, each takes H inner steps on its own
data, and the outer step treats the weighted mean of their differences

    Delta = sum_m w_m (theta - theta_m) / sum_m w_m        (w_m: tokens the island saw)

as a gradient for an outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9 in the paper).
Streaming DiLoCo splits the parameters into P fragments of layers, syncs fragment p at
inner steps t = k H + p H / P, sends Delta quantised, and mixes the outer result into
the local parameters as `alpha theta_local + (1 - alpha) theta_outer`.

Quantisation here is symmetric integer absmax per block (int8 or int4); the Streaming
DiLoCo paper sends 4-bit floats. Either way the outer step accumulates in float32.

Everything takes plain arguments and pytrees of jnp / numpy arrays; no I/O. Leaves are
always visited in `jax.tree_util.tree_leaves` order.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
KeyPath = tuple
Quantized = tuple[jax.Array, jax.Array]  # (codes, scales) of one array

BITS = (4, 8, 32)
_QMAX = {8: 127, 4: 7}

# Top-level parameter names that feed the first block (they share layer 0's fragment).
INPUT_SIDE_MODULES = frozenset({"embed"})


# ----------------------------------------------------------------------------------------
# Outer gradient and outer optimizer


def _check_same_tree(reference: PyTree, other: PyTree, what: str) -> None:
  """Raises one line naming the first path or shape where `other` differs from `reference`."""
  ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  other_leaves = jax.tree_util.tree_flatten_with_path(other)[0]
  ref_paths = [jax.tree_util.keystr(p) for p, _ in ref_leaves]
  other_paths = [jax.tree_util.keystr(p) for p, _ in other_leaves]
  if ref_paths != other_paths:
    ref_set, other_set = set(ref_paths), set(other_paths)
    missing = [p for p in ref_paths if p not in other_set]
    extra = [p for p in other_paths if p not in ref_set]
    detail = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else "leaves in another order"
    raise ValueError(f"{what} does not match the global parameter tree: {detail}")
  if jax.tree_util.tree_structure(reference) != jax.tree_util.tree_structure(other):
    raise ValueError(f"{what} does not match the global parameter tree: same paths, different container types")
  for path, (_, a), (_, b) in zip(ref_paths, ref_leaves, other_leaves):
    if np.shape(a) != np.shape(b):
      raise ValueError(
        f"{what} does not match the global parameter tree: {path} has shape {np.shape(b)}, not {np.shape(a)}"
      )


def outer_gradient(
  global_params: PyTree, island_params: Sequence[PyTree], weights: Sequence[float] | None = None
) -> PyTree:
  """`Delta = sum_m w_m (global - island_m) / sum_m w_m`, leafwise in float32.

  `weights` (one non-negative number per island, e.g. its tokens) default to equal; they
  must be concrete. Islands of weight 0 are skipped.
  """
  islands = list(island_params)
  if not islands:
    raise ValueError("outer_gradient needs at least one island's parameters; got an empty list")
  w = np.ones(len(islands)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
  if w.shape != (len(islands),):
    raise ValueError(f"outer_gradient got {w.size} weights for {len(islands)} islands")
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise ValueError(f"outer_gradient weights must be finite and non-negative; got {w.tolist()}")
  if not w.sum() > 0:
    raise ValueError(f"outer_gradient weights must have a positive total; got {w.tolist()}")
  for m, island in enumerate(islands):
    _check_same_tree(global_params, island, f"island {m}'s parameter tree")
  fractions = (w / w.sum()).astype(np.float32)
  kept = [(f, island) for f, island in zip(fractions, islands) if f > 0]

  def leaf(g, *island_leaves):
    g = jnp.asarray(g, jnp.float32)
    return sum(f * (g - jnp.asarray(x, jnp.float32)) for (f, _), x in zip(kept, island_leaves))

  return jax.tree_util.tree_map(leaf, global_params, *(island for _, island in kept))


def outer_optimizer(
  learning_rate: float = 0.7, momentum: float = 0.9, nesterov: bool = True
) -> optax.GradientTransformation:
  """The outer optimizer: `optax.sgd`, fed the outer gradient Delta as its gradient.

  With Nesterov momentum mu and state m (zero at first): m <- Delta + mu m, then
  theta <- theta - lr (Delta + mu m). A positive Delta = theta - mean(island) moves theta
  toward the islands.
  """
  return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def outer_step(
  tx: optax.GradientTransformation, global_params: PyTree, outer_state: optax.OptState, delta: PyTree
) -> tuple[PyTree, optax.OptState]:
  """One outer update: `(new_global, new_state)`; start from `outer_state = tx.init(global_params)`."""
  updates, new_state = tx.update(delta, outer_state, global_params)
  return optax.apply_updates(global_params, updates), new_state


# ----------------------------------------------------------------------------------------
# Quantised outer gradients


def _check_bits(bits: int) -> int:
  if isinstance(bits, bool) or bits not in BITS:
    raise ValueError(f"islands.bits = {bits!r} is not supported; use 4, 8 or 32")
  return int(bits)


def _check_block(block: int) -> int:
  if isinstance(block, bool) or int(block) != block or block < 1:
    raise ValueError(f"islands.block = {block!r} must be a positive integer")
  return int(block)


def _pack_int4(codes: jax.Array) -> jax.Array:
  """int8 codes in [-8, 7] -> uint8, two's-complement nibbles: element 2i low, 2i + 1 high."""
  nibbles = (codes.astype(jnp.int32) & 0xF).astype(jnp.uint8)
  nibbles = jnp.pad(nibbles, (0, nibbles.size % 2))
  return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [k] -> int32 codes [2 k], the inverse of `_pack_int4`."""
  nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1).astype(jnp.int32)
  return (nibbles ^ 8) - 8


@functools.partial(jax.jit, static_argnames=("bits", "block"))
def _quantize(x: jax.Array, qmax: jax.Array, bits: int, block: int) -> Quantized:
  # qmax comes in as an argument so that XLA keeps `absmax / qmax` an IEEE division
  # instead of folding it into a multiplication by a rounded 1 / qmax.
  flat = jnp.ravel(x).astype(jnp.float32)
  if bits == 32:
    return flat, jnp.zeros((0,), jnp.float32)
  n = flat.size
  blocks = -(-n // block)
  rows = jnp.pad(flat, (0, blocks * block - n)).reshape(blocks, block)
  scales = jnp.max(jnp.abs(rows), axis=1) / qmax  # [blocks]
  divisor = jnp.where(scales > 0, scales, 1.0)[:, None]  # an all-zero block codes to 0
  codes = jnp.clip(jnp.round(rows / divisor), -qmax, qmax).astype(jnp.int8).reshape(-1)
  return (_pack_int4(codes) if bits == 4 else codes), scales


def quantize(x: jax.Array, bits: int, block: int) -> Quantized:
  """Symmetric per-block absmax quantisation: x (any shape) -> (codes, scales).

  x is flattened to float32, zero-padded to a multiple of `block` and cut into blocks;
  each block has scale = absmax / qmax (0 for an all-zero block) and codes
  round(x / scale) (to nearest, ties to even) in [-qmax, qmax]:
    bits 8: qmax 127, codes int8 [padded n];
    bits 4: qmax 7, codes uint8 [ceil(padded n / 2)], two codes per byte as
            two's-complement nibbles, element 2i in the low nibble;
    bits 32: codes = x flattened as float32, scales empty (no loss).
  scales float32 [ceil(n / block)]. Jit-able with `bits` and `block` static.
  """
  bits, block = _check_bits(bits), _check_block(block)
  return _quantize(x, np.float32(_QMAX.get(bits, 1)), bits, block)


@functools.partial(jax.jit, static_argnames=("shape", "block"))
def _dequantize(codes: jax.Array, scales: jax.Array, shape: tuple[int, ...], block: int) -> jax.Array:
  n = math.prod(shape)
  values = _unpack_int4(codes) if codes.dtype == jnp.uint8 else codes.astype(jnp.int32)
  blocks = scales.shape[0]
  rows = values[: blocks * block].reshape(blocks, block).astype(jnp.float32) * scales[:, None]
  return rows.reshape(-1)[:n].reshape(shape)


def dequantize(codes: jax.Array, scales: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The float32 array of `shape` that `quantize` coded as (codes, scales): code x scale.

  The kind of code is read from its dtype (float32: 32 bits, int8: 8, uint8: packed 4).
  """
  codes, scales = jnp.asarray(codes), jnp.asarray(scales, jnp.float32)
  shape = tuple(int(s) for s in shape)
  n, blocks = math.prod(shape), scales.size
  if codes.dtype == jnp.float32:
    if codes.size != n:
      raise ValueError(f"dequantize: {codes.size} float32 codes for shape {shape}")
    return codes.reshape(shape)
  if codes.dtype == jnp.int8:
    coded = codes.size
  elif codes.dtype == jnp.uint8:
    coded = 2 * codes.size  # padded n, or padded n + 1 when that is odd
  else:
    raise ValueError(f"dequantize: codes of dtype {codes.dtype}; expected float32, int8 or uint8 (packed int4)")
  if blocks == 0:
    if n or codes.size:
      raise ValueError(f"dequantize: no scales for {codes.size} codes of shape {shape}")
    return jnp.zeros(shape, jnp.float32)
  # Only with one block can `coded` be odd-padded ambiguously, and then every element is in it.
  block = coded // blocks if coded % blocks == 0 else (coded - 1) // blocks
  if -(-n // block) != blocks or block * blocks > coded:
    raise ValueError(f"dequantize: {codes.size} {codes.dtype} codes and {blocks} scales do not describe shape {shape}")
  return _dequantize(codes, scales, shape, block)


def quantized_nbytes(n: int, bits: int, block: int) -> int:
  """`codes.nbytes + scales.nbytes` of `quantize` on an n-element array."""
  bits, block = _check_bits(bits), _check_block(block)
  if bits == 32:
    return 4 * n
  blocks = -(-n // block)
  padded = blocks * block
  codes = padded if bits == 8 else -(-padded // 2)
  return codes + 4 * blocks


def tree_quantized_nbytes(tree: PyTree, bits: int, block: int) -> int:
  """Bytes of `quantize_tree(tree, bits, block)`: the sum of `quantized_nbytes` over leaves."""
  return sum(quantized_nbytes(int(np.size(x)), bits, block) for x in jax.tree_util.tree_leaves(tree))


def quantize_tree(tree: PyTree, bits: int, block: int) -> list[Quantized]:
  """`quantize` on every leaf: a list of (codes, scales), one per leaf in tree_leaves order."""
  return [quantize(x, bits, block) for x in jax.tree_util.tree_leaves(tree)]


def dequantize_tree(quantized: Sequence[Quantized], like_tree: PyTree) -> PyTree:
  """The float32 tree shaped like `like_tree` (leaves may be arrays or ShapeDtypeStructs)."""
  leaves, treedef = jax.tree_util.tree_flatten(like_tree)
  if len(quantized) != len(leaves):
    raise ValueError(f"dequantize_tree: {len(quantized)} quantised leaves for a tree of {len(leaves)}")
  return treedef.unflatten([dequantize(c, s, np.shape(x)) for (c, s), x in zip(quantized, leaves)])


def quantize_with_feedback(
  x: jax.Array, residual: jax.Array | None, bits: int, block: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Error feedback: quantise `x + residual` -> (codes, scales, new_residual).

  `new_residual = (x + residual) - dequantize(codes, scales)` (float32, x's shape) is
  carried into the next round, so the sum of what was sent trails the sum of the inputs
  by exactly the last residual, at most half a scale per element. `residual=None` is zero.
  """
  target = jnp.asarray(x, jnp.float32)
  if residual is not None:
    target = target + jnp.asarray(residual, jnp.float32)
  codes, scales = quantize(target, bits, block)
  return codes, scales, target - dequantize(codes, scales, target.shape)


def quantize_tree_with_feedback(
  tree: PyTree, residual: PyTree | None, bits: int, block: int
) -> tuple[list[Quantized], PyTree]:
  """`quantize_with_feedback` leafwise: (list of (codes, scales), new residual tree)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if residual is None:
    residuals = [None] * len(leaves)
  else:
    _check_same_tree(tree, residual, "the residual tree")
    residuals = jax.tree_util.tree_leaves(residual)
  out = [quantize_with_feedback(x, r, bits, block) for x, r in zip(leaves, residuals)]
  return [(c, s) for c, s, _ in out], treedef.unflatten([r for _, _, r in out])


# ----------------------------------------------------------------------------------------
# Streaming DiLoCo fragments


def fragment_of_layers(num_layers: int, fragments: int, pattern: str = "strided") -> list[int]:
  """The fragment of each layer: strided layer i -> i % P; sequential: P contiguous groups."""
  if fragments < 1 or num_layers < 1 or num_layers % fragments:
    divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
    raise ValueError(
      f"islands.fragments = {fragments} does not divide the {num_layers} layers; choose a divisor of {num_layers} {divisors}"
    )
  if pattern == "strided":
    return [i % fragments for i in range(num_layers)]
  if pattern == "sequential":
    return [i // (num_layers // fragments) for i in range(num_layers)]
  raise ValueError(f"islands.fragment_pattern = {pattern!r}; use 'strided' or 'sequential'")


def sync_step_offsets(inner_steps: int, fragments: int) -> list[int]:
  """`offset_p = p H // P`: fragment p syncs after inner steps t > 0 with t % H == offset_p.

  Offset 0 means t = H, 2H, ...; needs H >= P so that the P offsets are distinct.
  """
  if fragments < 1:
    raise ValueError(f"islands.fragments = {fragments} must be at least 1")
  if inner_steps < fragments:
    raise ValueError(
      f"islands.inner_steps = {inner_steps} is fewer than islands.fragments = {fragments}; each fragment needs its own step"
    )
  return [p * inner_steps // fragments for p in range(fragments)]


def fragments_due(step: int, inner_steps: int, fragments: int) -> list[int]:
  """The fragments to sync after `step` completed inner steps (1-based; none at step 0)."""
  offsets = sync_step_offsets(inner_steps, fragments)
  if step < 0:
    raise ValueError(f"fragments_due: step {step} is negative")
  if step == 0:
    return []
  return [p for p, offset in enumerate(offsets) if step % inner_steps == offset]


def _key_value(key) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def layer_index_of(path: KeyPath) -> int | None:
  """The block index of a leaf of the manifold Transformer's params (`blocks/<i>/...`), else None.

  Accepts jax key paths (DictKey, GetAttrKey, SequenceKey) or plain tuples of keys.
  """
  keys = [_key_value(k) for k in path]
  if len(keys) >= 2 and keys[0] == "blocks":
    index = keys[1]
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
      return int(index)
    if isinstance(index, str) and index.isdigit():
      return int(index)
  return None


def is_input_side(path: KeyPath) -> bool:
  """True for leaves of the modules in front of the first block (the embedding)."""
  return bool(path) and _key_value(path[0]) in INPUT_SIDE_MODULES


def partition(
  params: PyTree,
  layer_fragment: Sequence[int],
  fragments: int,
  layer_key: Callable[[KeyPath], int | None] = layer_index_of,
  input_side: Callable[[KeyPath], bool] = is_input_side,
) -> list[int]:
  """The fragment of each leaf of `params`, in tree_leaves order.

  A leaf of layer i (`layer_key(path) == i`) goes to `layer_fragment[i]`; a leaf outside
  every layer goes to layer 0's fragment if `input_side(path)` (the embedding) and to the
  last layer's otherwise (final norm, head, stream head, MTP modules).
  """
  layer_fragment = list(layer_fragment)
  if not layer_fragment:
    raise ValueError("partition needs the fragment of at least one layer")
  bad = [f for f in layer_fragment if not 0 <= f < fragments]
  if bad:
    raise ValueError(f"partition: layer fragments {bad} are outside 0..{fragments - 1}")
  out = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    layer = layer_key(path)
    if layer is None:
      out.append(layer_fragment[0] if input_side(path) else layer_fragment[-1])
    elif 0 <= layer < len(layer_fragment):
      out.append(layer_fragment[layer])
    else:
      raise ValueError(f"partition: {jax.tree_util.keystr(path)} is in layer {layer}, not one of {len(layer_fragment)}")
  return out


def select(tree: PyTree, leaf_fragments: Sequence[int], p: int) -> list:
  """The leaves of fragment p, in tree_leaves order."""
  leaves = jax.tree_util.tree_leaves(tree)
  if len(leaves) != len(leaf_fragments):
    raise ValueError(f"select: {len(leaf_fragments)} leaf fragments for a tree of {len(leaves)} leaves")
  return [x for x, f in zip(leaves, leaf_fragments) if f == p]


def merge_fragment(tree: PyTree, fragment_leaves: Sequence, leaf_fragments: Sequence[int], p: int) -> PyTree:
  """`tree` with fragment p's leaves replaced by `fragment_leaves` (as `select` lists them)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if len(leaves) != len(leaf_fragments):
    raise ValueError(f"merge_fragment: {len(leaf_fragments)} leaf fragments for a tree of {len(leaves)} leaves")
  wanted = sum(f == p for f in leaf_fragments)
  if len(fragment_leaves) != wanted:
    raise ValueError(f"merge_fragment: {len(fragment_leaves)} leaves given for fragment {p}, which has {wanted}")
  replacements = iter(fragment_leaves)
  return treedef.unflatten([next(replacements) if f == p else x for x, f in zip(leaves, leaf_fragments)])


def mix(local: PyTree, outer: PyTree, alpha: float) -> PyTree:
  """`alpha local + (1 - alpha) outer` leafwise in float32, cast back to each local leaf's dtype.

  Streaming DiLoCo's overlapped update; alpha = 0 takes the outer parameters.
  """
  if isinstance(alpha, (int, float)) and not 0 <= alpha <= 1:
    raise ValueError(f"islands.mix_alpha = {alpha} must be in [0, 1]")

  def leaf(x, o):
    x = jnp.asarray(x)
    return (alpha * x.astype(jnp.float32) + (1 - alpha) * jnp.asarray(o, jnp.float32)).astype(x.dtype)

  return jax.tree_util.tree_map(leaf, local, outer)


# ----------------------------------------------------------------------------------------
# Byte counting


def allreduce_bytes(num_params: int, parties: int, steps: int) -> float:
  """Bytes each party sends in a ring all-reduce of float32 gradients, over `steps` steps.

  A ring all-reduce of n float32 values over M parties is a reduce-scatter then an
  all-gather, each of M - 1 rounds sending n / M values: `2 (M - 1) / M * 4 n` bytes per
  party per step. This is the data-parallel baseline that islands are compared with
  (0 for a single party).
  """
  if num_params < 0 or parties < 1 or steps < 0:
    raise ValueError(
      f"allreduce_bytes: need num_params >= 0, parties >= 1, steps >= 0; got {num_params}, {parties}, {steps}"
    )
  return 2 * (parties - 1) / parties * 4 * num_params * steps
