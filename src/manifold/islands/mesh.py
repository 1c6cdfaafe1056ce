"""DiLoCo islands inside one job: the `island` mesh axis (`mesh.island = M > 1`).

Each island is one slice of the mesh's outermost axis (on TPU multislice: one or more
whole slices, joined to the others only by DCN). It holds its own train state, sharded
inside the island as a one-island run would be, and takes the ordinary AdamW train step
on its own rows of the batch: the step is `manifold.train.step.train_step_fn` mapped over
the islands with `jax.vmap(spmd_axis_name="island")`, so every sharding constraint of the
model still applies inside each island and no collective of the inner step crosses
islands. Between inner steps, the loop's `IslandSync` hook (`InJobIslands`) runs the
outer sync of each fragment that `diloco.fragments_due` says is due:

  1. each island's outer gradient `theta_global - theta_m` of the fragment (float32);
  2. with 32 bits, a mean over the islands: one `pmean` over the island axis; with
     `islands.bits` 4 or 8, each island quantises it (with `islands.error_feedback`, plus
     the error it carried from its last sync), the codes and scales of all the fragment's
     leaves as the bytes of one buffer, which the islands all-gather over the island axis,
     then each dequantises all M and averages. Either way each island's buffer is cut
     over its own devices, so one copy per island crosses the island axis, and the work of
     one island runs inside a `shard_map` that holds only the island axis: nothing there
     can cross islands but the exchange itself;
  3. the outer Nesterov step (`diloco.outer_step`) on the global parameters, computed
     identically on every island (they are replicated over the island axis);
  4. each island's parameters of the fragment := the new global ones (tau = 0), or with
     `islands.overlap_steps = tau > 0`, `tau` steps later, mixed
     `alpha local + (1 - alpha) global` (`diloco.mix`).

The islands' AdamW states are kept across syncs (DiLoCo, section 6.1). `extra` (MoE
router biases, moved outside the gradient) stays per island; at each sync of a fragment
the islands' mean of its `extra` becomes the global `extra` that evaluation reads.

Evaluation, sampling and `manifold eval` read `IslandState.params` / `.extra`: the global
model, i.e. each fragment as of its last outer step (between syncs the islands' own
parameters have moved on). Every island evaluates the same batches, so evaluation moves
nothing across islands.

Bytes: an outer sync moves, per island and fragment, `allreduce_bytes(n, M, 1)` (a ring
all-reduce of the float32 outer gradient's n values) or `(M - 1) * (quantized_nbytes
summed over its leaves)` (the all-gather of codes and scales) in each direction, each
padded to a multiple of an island's devices, plus a float32 all-reduce of the fragment's
`extra`; `InJobIslands` logs these per step and
cumulative beside `allreduce_bytes(N, M, steps)`, what data-parallel training across the
M islands would have moved. The step's metrics are per island ([M], left on each
island's devices) and averaged on the host when read (`IslandMean`), so they cross no
island link either (with several processes, reading them gathers them over processes).

With `islands.overlap_steps > 0` the update lands `tau` steps after it is computed, as in
Streaming DiLoCo, but the sync is a program of its own, run between two inner steps: the
all-reduce does not overlap the inner steps' compute here.

MoE: the expert exchange pads (`all_to_all`) on an island mesh, as JAX cannot vmap
`ragged_all_to_all`; XLA:TPU cannot compile the vmapped grouped matmul (`ragged_dot` with a
batch dimension), so MoE islands on TPU need `model.moe_impl=dense`; XLA:CPU replicates
the router's `top_k`, which then gathers the scores across islands too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from manifold.islands import diloco
from manifold.model import ModelConfig
from manifold.parallel import sharding
from manifold.parallel.mesh import ISLAND, MESH_AXES
from manifold.train.state import StateSpec, TrainState, make_state_spec
from manifold.train.step import train_step_fn


@flax.struct.dataclass
class IslandState:
  """The state of M islands and the model they agree on. `params` and `extra` are the
  global model (what evaluation and a checkpoint's readers use); `inner` is every island's
  train state with a leading [M] axis, each island's slice on its own devices."""

  params: dict[str, Any]  # global parameters, replicated over the island axis
  extra: dict[str, Any]  # the islands' mean `extra` as of each fragment's last sync
  inner: TrainState  # [M, ...] on every leaf
  outer_opt_state: optax.OptState  # of the global parameters
  residual: dict[str, Any] | None  # [M, ...] float32 quantisation error per island (error feedback), else None


@dataclasses.dataclass(frozen=True)
class IslandSpec:
  """How to build, shard and interpret an `IslandState`; stands in for `StateSpec`
  (`model_cfg`, `graphdef`, `abstract`, `shardings`, `init`, `merge`) in a run."""

  model_cfg: ModelConfig
  graphdef: nnx.GraphDef
  abstract: IslandState  # ShapeDtypeStructs
  shardings: IslandState  # NamedShardings
  init: Callable[[jax.Array], IslandState]  # jitted: key -> sharded state
  spread: Callable[[TrainState], IslandState]  # jitted: one state -> every island a copy of it, and the global model
  inner: StateSpec  # one island's state, on this mesh (not sharded over `island`)
  islands: int  # M
  outer_tx: optax.GradientTransformation
  leaf_fragments: list[int]  # the fragment of each parameter leaf (tree_leaves order)
  extra_fragments: list[int]  # the fragment of each `extra` leaf

  def merge(self, params, extra):
    return self.inner.merge(params, extra)


def island_spec_of(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with a leading dimension over the island axis (unsharded on a mesh without one)."""
  return PartitionSpec(ISLAND if ISLAND in mesh.shape else None, *spec)


def _per_island(tree, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, island_spec_of(s.spec, mesh)), tree)


def make_island_spec(
  model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, islands_cfg, islands: int
) -> IslandSpec:
  """The island state for `islands` islands on `mesh` (whose `island` axis, if it has one,
  must be `islands` long): every island starts from the same initialisation."""
  if ISLAND in mesh.shape and mesh.shape[ISLAND] != islands:
    raise ValueError(f"the mesh has {mesh.shape[ISLAND]} islands, not {islands}")
  inner = make_state_spec(model_cfg, tx, mesh)
  outer_tx = diloco.outer_optimizer(islands_cfg.outer_learning_rate, islands_cfg.outer_momentum, nesterov=True)
  layer_fragment = diloco.fragment_of_layers(model_cfg.n_layers, islands_cfg.fragments, islands_cfg.fragment_pattern)
  leaf_fragments = diloco.partition(inner.abstract.params, layer_fragment, islands_cfg.fragments)
  extra_fragments = diloco.partition(inner.abstract.extra, layer_fragment, islands_cfg.fragments)
  feedback = islands_cfg.error_feedback and islands_cfg.bits < 32

  def spread(state: TrainState) -> IslandState:
    """Every island a copy of `state`; the global model `state`'s."""
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (islands, *x.shape)), state)
    residual = jax.tree.map(lambda x: jnp.zeros((islands, *x.shape), jnp.float32), state.params) if feedback else None
    return IslandState(
      params=state.params,
      extra=state.extra,
      inner=stacked,
      outer_opt_state=outer_tx.init(state.params),
      residual=residual,
    )

  replicated = sharding.replicated(mesh)
  abstract = jax.eval_shape(spread, inner.abstract)
  outer_shardings = optax.tree_map_params(
    outer_tx,
    lambda _, s: s,
    abstract.outer_opt_state,
    inner.shardings.params,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )
  shardings = IslandState(
    params=inner.shardings.params,
    extra=inner.shardings.extra,
    inner=_per_island(inner.shardings, mesh),
    outer_opt_state=outer_shardings,
    residual=_per_island(inner.shardings.params, mesh) if feedback else None,
  )
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  spread_jit = jax.jit(spread, out_shardings=shardings)
  return IslandSpec(
    model_cfg=model_cfg,
    graphdef=inner.graphdef,
    abstract=abstract,
    shardings=shardings,
    init=lambda key: spread_jit(inner.init(key)),  # two programs: the random init compiles slowly, once
    spread=spread_jit,
    inner=inner,
    islands=islands,
    outer_tx=outer_tx,
    leaf_fragments=leaf_fragments,
    extra_fragments=extra_fragments,
  )


def island_batch_sharding(mesh: Mesh) -> NamedSharding:
  """A [B, T+1] batch split over the islands first (island m: rows m B/M to (m + 1) B/M),
  then over each island's batch axes."""
  return NamedSharding(mesh, PartitionSpec((ISLAND, *sharding.BATCH_AXES)))


def make_island_train_step(
  spec: IslandSpec, tx: optax.GradientTransformation, mesh: Mesh, token_bytes, train_cfg, separator=None
):
  """`(inner [M, ...], batch [B, T+1]) -> (inner, metrics [M])`: every island's train step on
  its own B/M rows, jitted over `mesh` with the islands' states (`IslandState.inner`)
  donated; the metrics stay on each island. `island_step` makes it a step of `IslandState`."""
  islands = spec.islands
  inner_step = jax.vmap(
    train_step_fn(spec.inner, tx, token_bytes, train_cfg, separator=separator), spmd_axis_name=ISLAND
  )
  rows = NamedSharding(mesh, PartitionSpec(ISLAND, sharding.BATCH_AXES))

  def step(inner: TrainState, batch: jax.Array):
    return inner_step(inner, jax.lax.with_sharding_constraint(batch.reshape(islands, -1, batch.shape[-1]), rows))

  return sharding.jit_on_mesh(
    step,
    mesh,
    in_shardings=(spec.shardings.inner, island_batch_sharding(mesh)),
    out_shardings=(spec.shardings.inner, NamedSharding(mesh, PartitionSpec(ISLAND))),
    donate_argnums=0,
  )


class IslandMean:
  """A metric of every island ([M, ...], on the islands' own devices), read as the mean
  over islands: `float(m)` and `jax.device_get` average on the host."""

  def __init__(self, per_island: jax.Array):
    self.per_island = per_island

  def copy_to_host_async(self) -> None:
    self.per_island.copy_to_host_async()

  def islands(self) -> np.ndarray:
    if self.per_island.is_fully_addressable:
      return np.asarray(jax.device_get(self.per_island))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(self.per_island, tiled=True))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    return np.asarray(self.islands().mean(axis=0), dtype=dtype)

  def __float__(self) -> float:
    return float(self.__array__())


def island_step(inner_step: Callable) -> Callable:
  """`(state, batch) -> (state, metrics)` on an `IslandState` from `make_island_train_step`'s
  step of the islands' states, each metric an `IslandMean`."""

  def step(state: IslandState, batch: jax.Array):
    inner, metrics = inner_step(state.inner, batch)
    return state.replace(inner=inner), {k: IslandMean(v) for k, v in metrics.items()}

  return step


@dataclasses.dataclass(frozen=True)
class OuterSync:
  """The jitted outer sync of each fragment (`send[p]`), and with overlap the landing of its
  result (`land[p]`), with the bytes one island sends (= receives) in `send[p]`."""

  send: list[Callable[[IslandState], IslandState]]
  land: list[Callable[[IslandState], IslandState]]
  bytes_per_sync: list[int]  # per fragment
  params: int  # N: parameter elements of the model


def _labels_of_state(outer_tx, outer_state, params, leaf_fragments: list[int]) -> list[int]:
  """The fragment of each leaf of the outer optimizer's state (-1 for leaves not shaped like a parameter)."""
  labels = jax.tree.unflatten(jax.tree.structure(params), leaf_fragments)
  tree = optax.tree_map_params(outer_tx, lambda _, f: f, outer_state, labels, transform_non_params=lambda _: -1)
  return jax.tree.leaves(tree)


def _inner_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes inside an island that have more than one device."""
  return tuple(a for a in MESH_AXES if mesh.shape.get(a, 1) > 1)


def _padded(n: int, ways: int) -> int:
  return -(-n // ways) * ways


def sync_bytes(spec: IslandSpec, islands_cfg, fragment: int, ways: int = 1) -> int:
  """Bytes one island sends (and receives) over the island axis in the outer sync of
  `fragment`: its values in one buffer cut into `ways` equal pieces (the devices of an
  island; zero-padded) and a float32 ring all-reduce of its `extra`."""
  m = spec.islands
  sizes = [x.size for x in diloco.select(spec.abstract.params, spec.leaf_fragments, fragment)]
  extra = sum(x.size for x in diloco.select(spec.abstract.extra, spec.extra_fragments, fragment))
  if islands_cfg.bits == 32:
    moved = diloco.allreduce_bytes(_padded(sum(sizes), ways), m, 1)
  else:
    coded = sum(diloco.quantized_nbytes(n, islands_cfg.bits, islands_cfg.quant_block) for n in sizes)
    moved = (m - 1) * _padded(coded, ways)
  return int(round(moved + (diloco.allreduce_bytes(_padded(extra, ways), m, 1) if extra else 0)))


def _as_bytes(x: jax.Array) -> jax.Array:
  """[M, k] of any dtype -> [M, k * itemsize] uint8 (the same bits)."""
  if x.dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8)
  return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(x.shape[0], -1)


def _from_bytes(b: jax.Array, like) -> jax.Array:
  """The inverse of `_as_bytes` for an [M, k] array like `like` (shape and dtype)."""
  dtype = jnp.dtype(like.dtype)
  if dtype.itemsize == 1:
    return jax.lax.bitcast_convert_type(b, dtype)
  return jax.lax.bitcast_convert_type(b.reshape(b.shape[0], -1, dtype.itemsize), dtype)


def make_outer_sync(spec: IslandSpec, mesh: Mesh, islands_cfg) -> OuterSync:
  """The jitted outer sync (and landing) of each fragment; see the module's docstring."""
  bits, block, alpha = islands_cfg.bits, islands_cfg.quant_block, islands_cfg.mix_alpha
  overlap, feedback = islands_cfg.overlap_steps > 0, spec.abstract.residual is not None
  lf, ef = spec.leaf_fragments, spec.extra_fragments
  state_labels = _labels_of_state(spec.outer_tx, spec.abstract.outer_opt_state, spec.abstract.params, lf)
  inner = _inner_axes(mesh) or None
  ways = math.prod(mesh.shape[a] for a in inner or ())

  def on(*spec_) -> Callable[[jax.Array], jax.Array]:
    return functools.partial(jax.lax.with_sharding_constraint, shardings=PartitionSpec(*spec_))

  def one_buffer(arrays: list[jax.Array]) -> jax.Array:
    """One island's arrays as one flat buffer, zero-padded and cut over the island's
    devices: what crosses the island axis is one copy of the island's values, not one per
    device that holds them (parameters replicated inside an island)."""
    flat = jnp.concatenate([a.reshape(-1) for a in arrays])
    return on(inner)(jnp.pad(flat, (0, _padded(flat.shape[0], ways) - flat.shape[0])))

  def unpack(flat: jax.Array, like: list) -> list[jax.Array]:
    out, at = [], 0
    for x in like:
      out.append(flat[at : at + x.size].reshape(x.shape))
      at += x.size
    return out

  def per_island(body: Callable, islands_in: tuple, out_specs, check_vma: bool = True) -> Callable:
    """`body` on each island's own slice of `islands_in` ([M, ...] -> [1, ...]), inside a
    shard_map that holds only the island axis: nothing of it crosses islands but the
    collectives over "island" it names (the rest of the mesh stays automatic)."""
    return jax.shard_map(
      body, mesh=mesh, in_specs=tuple(PartitionSpec(ISLAND) for _ in islands_in), out_specs=out_specs,
      axis_names={ISLAND}, check_vma=check_vma,
    )(*islands_in)  # fmt: skip

  def island_mean(arrays: list[jax.Array]) -> list[jax.Array]:
    """Means over the islands, [M, ...] -> [...] float32: one all-reduce (`pmean`) over the
    island axis of each device's piece of one buffer of the arrays' values."""

    def body(*own):
      own = [a[0].astype(jnp.float32) for a in own]
      return tuple(unpack(jax.lax.pmean(one_buffer(own), ISLAND), own))

    return list(per_island(body, tuple(arrays), tuple(PartitionSpec() for _ in arrays)))

  def exchange_quantized(deltas: list[jax.Array], residuals: list):
    """Each island quantises its outer gradients (with error feedback: plus its residuals)
    into the bytes of one buffer; the buffers are all-gathered over the island axis, piece
    by piece; every island dequantises all M and averages: (mean [...] per leaf, new
    residuals [M, ...])."""
    coded = [jax.eval_shape(functools.partial(diloco.quantize, bits=bits, block=block), d[0]) for d in deltas]
    flat = [jax.ShapeDtypeStruct((math.prod(x.shape) * x.dtype.itemsize,), jnp.uint8) for pair in coded for x in pair]

    def quantized(*own):
      own_deltas, own_residuals = own[: len(deltas)], own[len(deltas) :]
      sent, kept = [], []
      for i, d in enumerate(own_deltas):
        if feedback:
          codes, scales, r = diloco.quantize_with_feedback(d[0], own_residuals[i][0], bits, block)
          kept.append(r[None])
        else:
          codes, scales = diloco.quantize(d[0], bits, block)
        sent += [_as_bytes(codes[None])[0], _as_bytes(scales[None])[0]]
      return one_buffer(sent)[None], tuple(kept)

    def averaged(rows):
      parts = unpack_rows(rows[:, : sum(x.size for x in flat)], flat)
      means = []
      for i, d in enumerate(deltas):
        codes, scales = (_from_bytes(parts[2 * i + j], coded[i][j]) for j in (0, 1))
        dequantize = functools.partial(diloco.dequantize, shape=d.shape[1:])
        means.append(jnp.mean(jax.vmap(dequantize)(codes, scales), axis=0))
      return tuple(means)

    args = tuple(deltas) + (tuple(residuals) if feedback else ())
    out_specs = (PartitionSpec(ISLAND), tuple(PartitionSpec(ISLAND) for _ in residuals) if feedback else ())
    rows, kept = per_island(quantized, args, out_specs)  # [M, n] bytes, each island's on its own devices
    rows = jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, PartitionSpec(None, inner)))  # the exchange
    # every island now holds every island's bytes: decoding them is its own business
    means = jax.shard_map(
      averaged, mesh=mesh, in_specs=PartitionSpec(), out_specs=tuple(PartitionSpec() for _ in deltas),
      axis_names={ISLAND},
    )(rows)  # fmt: skip
    return list(means), (list(kept) if feedback else None)

  def unpack_rows(rows: jax.Array, like: list) -> list[jax.Array]:
    """[M, total] -> [M, k] pieces shaped like `like`'s flat [k] arrays."""
    out, at = [], 0
    for x in like:
      out.append(rows[:, at : at + x.size])
      at += x.size
    return out

  def outer_gradient(state: IslandState, p: int):
    """(Delta of fragment p's leaves, the new residual leaves or None)."""
    deltas = [
      g[None].astype(jnp.float32) - x.astype(jnp.float32)
      for g, x in zip(diloco.select(state.params, lf, p), diloco.select(state.inner.params, lf, p))
    ]  # [M, ...] each, on the islands' devices
    if bits == 32:
      return island_mean(deltas), None
    residuals = diloco.select(state.residual, lf, p) if feedback else []
    return exchange_quantized(deltas, residuals)

  def send(state: IslandState, p: int) -> IslandState:
    deltas, residuals = outer_gradient(state, p)
    deltas = [
      jax.lax.with_sharding_constraint(d, s) for d, s in zip(deltas, diloco.select(spec.shardings.params, lf, p))
    ]
    full_delta = diloco.merge_fragment(jax.tree.map(jnp.zeros_like, state.params), deltas, lf, p)
    new_params, new_outer = diloco.outer_step(spec.outer_tx, state.params, state.outer_opt_state, full_delta)
    params = diloco.merge_fragment(state.params, diloco.select(new_params, lf, p), lf, p)
    outer_leaves = [
      new if label in (p, -1) else old
      for new, old, label in zip(jax.tree.leaves(new_outer), jax.tree.leaves(state.outer_opt_state), state_labels)
    ]
    outer_opt_state = jax.tree.unflatten(jax.tree.structure(state.outer_opt_state), outer_leaves)
    extra, extra_p = state.extra, diloco.select(state.inner.extra, ef, p)
    if extra_p:  # evaluation's copy
      extra = diloco.merge_fragment(extra, [m.astype(x.dtype) for m, x in zip(island_mean(extra_p), extra_p)], ef, p)
    inner_params = state.inner.params
    if not overlap:
      fresh = [
        jnp.broadcast_to(g[None], x.shape).astype(x.dtype)
        for g, x in zip(diloco.select(params, lf, p), diloco.select(inner_params, lf, p))
      ]
      inner_params = diloco.merge_fragment(inner_params, fresh, lf, p)
    residual = state.residual
    if residuals is not None:
      residual = diloco.merge_fragment(residual, residuals, lf, p)
    return state.replace(
      params=params,
      extra=extra,
      inner=state.inner.replace(params=inner_params),
      outer_opt_state=outer_opt_state,
      residual=residual,
    )

  def land(state: IslandState, p: int) -> IslandState:
    local = diloco.select(state.inner.params, lf, p)
    outer = [g[None] for g in diloco.select(state.params, lf, p)]
    mixed = diloco.mix(local, outer, alpha)
    return state.replace(inner=state.inner.replace(params=diloco.merge_fragment(state.inner.params, mixed, lf, p)))

  def jitted(fn: Callable, p: int) -> Callable:
    return sharding.jit_on_mesh(
      functools.partial(fn, p=p), mesh, in_shardings=(spec.shardings,), out_shardings=spec.shardings, donate_argnums=0
    )

  fragments = range(islands_cfg.fragments)
  return OuterSync(
    send=[jitted(send, p) for p in fragments],
    land=[jitted(land, p) for p in fragments] if overlap else [],
    bytes_per_sync=[sync_bytes(spec, islands_cfg, p, ways) for p in fragments],
    params=sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract.params)),
  )


class InJobIslands:
  """The loop's `IslandSync` for islands inside one job: after inner step t, the outer sync
  of each fragment due at t (`diloco.fragments_due`) and, with overlap tau, the landing of
  each sent at t - tau. Metrics (per island; each island sends what it receives):
  `islands/bytes_sent`, `islands/bytes_received` at this step and `..._cumulative` since step
  0, beside `islands/dp_allreduce_bytes` (`_cumulative`): a float32 ring all-reduce of all N
  gradients over the M islands at every step. Written at sync steps and every
  `train.log_every` steps."""

  def __init__(self, sync: OuterSync, islands_cfg, train_cfg, islands: int, start: int = 0):
    self.sync, self.cfg, self.log_every, self.last = sync, islands_cfg, train_cfg.log_every, train_cfg.steps
    self.dp_per_step = diloco.allreduce_bytes(sync.params, islands, 1)
    self.total = sum(self.bytes_at(s) for s in range(1, start + 1))
    self.dp_total = self.dp_per_step * start

  def bytes_at(self, step: int) -> int:
    """Bytes one island sends (= receives) over the island axis after inner step `step`."""
    due = diloco.fragments_due(step, self.cfg.inner_steps, self.cfg.fragments)
    return sum(self.sync.bytes_per_sync[p] for p in due)

  def after_step(self, state: IslandState, step: int) -> tuple[IslandState, dict[str, float]]:
    h, fragments, tau = self.cfg.inner_steps, self.cfg.fragments, self.cfg.overlap_steps
    if tau and step > tau:
      for p in diloco.fragments_due(step - tau, h, fragments):
        state = self.sync.land[p](state)
    due = diloco.fragments_due(step, h, fragments)
    for p in due:
      state = self.sync.send[p](state)
    moved = self.bytes_at(step)
    self.total += moved
    self.dp_total += self.dp_per_step
    if not due and step % self.log_every and step != self.last:
      return state, {}
    return state, {
      "islands/bytes_sent": float(moved),
      "islands/bytes_received": float(moved),
      "islands/bytes_sent_cumulative": float(self.total),
      "islands/bytes_received_cumulative": float(self.total),
      "islands/dp_allreduce_bytes": float(self.dp_per_step),
      "islands/dp_allreduce_bytes_cumulative": float(self.dp_total),
      "islands/fragments_synced": float(len(due)),
    }

  def close(self) -> None:
    pass
