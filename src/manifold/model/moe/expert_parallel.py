"""Expert parallelism: routed experts sharded over the `expert` mesh axis, each token
sent to the devices that hold its experts and back, dropless.

Inside `shard_map` every device holds N local tokens (the batch is split over data,
fsdp and expert) and E / ep experts. It sorts its N K (token, slot) assignments by
expert, which groups them by destination device, and exchanges them in rounds of at
most `cap` rows per (source, destination) pair:

- `ragged_all_to_all` (the TPU default) sends only the real rows;
- `all_to_all` (the GPU and CPU default; every backend) sends fixed chunks padded to
  `cap` rows.

`cap` is `model.expert_capacity_factor` times an even split, N K / ep (rounded up to a
multiple of 8; capped at N K, the worst case, which a factor of 0 asks for). Round r carries
the rows at places [r cap, (r + 1) cap) of each destination's segment, so the exchange
buffers and the grouped matmul hold ep cap rows whatever the routing. Rounds after the
first run only when some device of the mesh still has rows for them (a `lax.cond` on a
scalar `pmax`), and are rematerialised in the backward pass, so nothing is dropped. Fewer
rows per round is not always less memory: XLA may keep every round's buffers (the 27B config
at expert 8, 4 rounds, took 10 GiB more per chip than one round; experiments/results/compile). The received rows are regrouped by local expert, run
through the grouped matmul (kernels/grouped_matmul; padding rows fall outside every group
and come out zero), sent back the same way and combined with the gate weights. The FFN
width may also be split over `tensor` (partial sums, one `psum`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from kernels.grouped_matmul.api import varying

from manifold.model.moe.experts import (
  dispatch_rows,
  grouped_swiglu,
  inverse_permutation,
  permute_rows,
  routed_ragged,
  sort_by_expert,
  weighted_sum,
)
from manifold.model.partitioning import batch_axes

# TPUs whose XLA has no ragged_all_to_all: "not supported in limited ICI routing settings"
# (libtpu 0.0.42, compiling for v5e).
LIMITED_ICI_ROUTING = ("TPU v5 lite",)


def default_exchange(mesh) -> str:
  """`ragged_all_to_all` on TPU meshes (but v5e's); padded `all_to_all` elsewhere. XLA:CPU
  does not implement the ragged one, and XLA:GPU's (JAX 0.11.2, 2 H100s) compiled but never
  finished a training step (benchmarks/README.md). A mesh with an `island` axis (DiLoCo
  islands, whose step is vmapped over them) pads too: JAX cannot vmap the ragged one."""
  if "island" in getattr(mesh, "axis_names", ()):
    return "all_to_all"
  device = mesh.abstract_device
  ragged = device.platform == "tpu" and device.device_kind not in LIMITED_ICI_ROUTING
  return "ragged_all_to_all" if ragged else "all_to_all"


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _per_device_zeros(shape, dtype) -> jax.Array:
  """The output buffer of a `ragged_all_to_all`, typed as differing per device: its rows
  are each device's own, so their gradients must not be summed over the mesh."""
  return jax.lax.pcast(jnp.zeros(shape, dtype), batch_axes(), to="varying")


def _in_round(sizes, start, cap):
  """Of segments of `sizes` rows, the rows at places [start, start + cap)."""
  return jnp.clip(sizes - start, 0, cap)


def _destinations(send, offsets, start, cap, n_rows):
  """For the sorted rows [N K] (segments of `send` rows per destination, at `offsets`): their
  destination and their place in this round's chunk for it (cap, out of range, for the rows
  of other rounds)."""
  dest = jnp.repeat(jnp.arange(send.shape[0]), send, total_repeat_length=n_rows)  # [N K]
  slot = jnp.arange(n_rows) - offsets[dest] - start
  return dest, jnp.where((slot >= 0) & (slot < cap), slot, cap)


def _dispatch(xs, send, offsets, recv, start, cap, exchange):
  """This round's rows: sorted rows [N K, D] (segments of `send` rows per destination, at
  `offsets`) -> [ep cap, D], holding source s's rows from place `start` of its segment for
  this device (`recv` rows in all) at s * cap."""
  ep = send.shape[0]
  if exchange == "ragged_all_to_all":
    me = jax.lax.axis_index("expert")
    out = _per_device_zeros((ep * cap, xs.shape[1]), xs.dtype)
    return jax.lax.ragged_all_to_all(
      xs,
      out,
      offsets + start,
      _in_round(send, start, cap),
      jnp.full((ep,), me * cap),
      _in_round(recv, start, cap),
      axis_name="expert",
    )
  dest, slot = _destinations(send, offsets, start, cap, xs.shape[0])
  chunks = jnp.zeros((ep, cap, xs.shape[1]), xs.dtype).at[dest, slot].set(xs, mode="drop")
  return jax.lax.all_to_all(chunks, "expert", 0, 0, tiled=True).reshape(ep * cap, -1)


def _combine(ys, send, offsets, recv, start, cap, n_rows, exchange):
  """The inverse of `_dispatch`: [ep cap, D] -> [N K, D] in the sender's sorted order, zero
  for the rows of other rounds."""
  ep = send.shape[0]
  if exchange == "ragged_all_to_all":
    back_offsets = jax.lax.all_to_all(offsets + start, "expert", 0, 0, tiled=True)  # where each source wants its rows
    out = _per_device_zeros((n_rows, ys.shape[1]), ys.dtype)
    return jax.lax.ragged_all_to_all(
      ys,
      out,
      jnp.arange(ep) * cap,
      _in_round(recv, start, cap),
      back_offsets,
      _in_round(send, start, cap),
      axis_name="expert",
    )
  returned = jax.lax.all_to_all(ys.reshape(ep, cap, -1), "expert", 0, 0, tiled=True)  # [ep, cap, D]
  dest, slot = _destinations(send, offsets, start, cap, n_rows)
  return jnp.where((slot < cap)[:, None], returned[dest, jnp.minimum(slot, cap - 1)], 0)


def _local_routed(
  x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, exchange: str, tensor_split: bool, matmul: str, factor: float
):
  """One device's share: x [N, D] with its routing [N, K]; local experts [E_l, D, F_l]."""
  if jax.lax.axis_size("expert") == 1:  # every expert is here: route this device's tokens locally
    y = routed_ragged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, matmul=matmul)
  else:
    y = _exchanged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, exchange=exchange, matmul=matmul, factor=factor)
  return jax.lax.psum(y, "tensor") if tensor_split else y


def _skipped(*operands, like):
  """A round no device has rows for: its output, zeros typed like the first round's."""
  return jax.lax.pcast(jnp.zeros(like.shape, like.dtype), tuple(varying(like)), to="varying")


def round_capacity(rows: int, ep: int, factor: float) -> int:
  """Rows per (source, destination) pair and round: `factor` x rows / ep, rounded up to a
  multiple of 8 and at most `rows` (a factor of 0: `rows`, one round for any routing)."""
  if factor <= 0:
    return rows
  return min(rows, -(-math.ceil(factor * rows / ep) // 8) * 8)


def _exchanged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, exchange: str, matmul: str, factor: float):
  """The routed experts when they are spread over the `expert` axis: each (token, slot)
  row travels to its expert's device and back, in rounds of at most `cap` rows per pair."""
  n, k = experts_nk.shape
  ep = jax.lax.axis_size("expert")
  local = w_gate.shape[0]
  rows = n * k
  cap = round_capacity(rows, ep, factor)
  order, rank, counts = sort_by_expert(experts_nk, ep * local)  # (token, slot) pairs grouped by expert, hence device
  counts = counts.reshape(ep, local)  # [dest, local expert]
  send = counts.sum(axis=1)  # [ep]
  offsets = _exclusive_cumsum(send)
  recv_counts = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # [source, local expert]
  recv = recv_counts.sum(axis=1)  # [ep]
  ends = jnp.cumsum(recv_counts, axis=1)  # [ep, E_l]: each source's segment boundaries by local expert
  xs = dispatch_rows(x_nd, order, rank, k)  # [N K, D] sorted

  def one_round(xs, w_gate, w_up, w_down, start):
    received = _dispatch(xs, send, offsets, recv, start, cap, exchange)  # [ep cap, D]
    row = jnp.arange(ep * cap)
    source, place = row // cap, row % cap + start
    local_expert = jnp.sum(place[:, None] >= ends[source], axis=1)  # [ep cap]; == E_l for padding rows
    group_sizes = jnp.sum(_in_round(ends, start, cap) - _in_round(ends - recv_counts, start, cap), axis=0)  # [E_l]
    regroup = jnp.argsort(local_expert, stable=True)
    back = inverse_permutation(regroup)
    hidden = grouped_swiglu(permute_rows(received, regroup, back), w_gate, w_up, w_down, group_sizes, matmul)
    return _combine(permute_rows(hidden, back, regroup), send, offsets, recv, start, cap, rows, exchange)

  out = one_round(xs, w_gate, w_up, w_down, 0)  # [N K, D], sorted order
  longest = jax.lax.pmax(jnp.max(send), batch_axes())  # the same on every device: all take the same branch
  skipped = functools.partial(_skipped, like=out)
  for r in range(1, -(-rows // cap)):
    run = jax.checkpoint(functools.partial(one_round, start=r * cap))
    out = out + jax.lax.cond(longest > r * cap, run, skipped, xs, w_gate, w_up, w_down)
  return weighted_sum(permute_rows(out, rank, order).reshape(n, k, -1), weights_nk)


def routed_expert_parallel(
  x_nd,
  weights_nk,
  experts_nk,
  w_gate,
  w_up,
  w_down,
  *,
  exchange: str | None = None,
  matmul: str = "auto",
  capacity_factor: float,
):
  """`routed_ragged` once per device on its own tokens, the experts split over the
  ambient mesh's `expert` axis (which may be 1: then nothing is exchanged).

  x [N, D], weights / experts [N, K], w_gate / w_up [E, D, F], w_down [E, F, D] -> [N, D].
  Requires E and N divisible by the expert axis and N by data x fsdp x expert.
  `capacity_factor` sizes the exchange rounds (`round_capacity`; 0: one round, the worst case;
  the model passes `model.expert_capacity_factor`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  tensor_split = mesh.shape["tensor"] > 1 and w_gate.shape[2] % mesh.shape["tensor"] == 0
  ffn = "tensor" if tensor_split else None
  body = functools.partial(
    _local_routed,
    exchange=exchange or default_exchange(mesh),
    tensor_split=tensor_split,
    matmul=matmul,
    factor=capacity_factor,
  )
  tokens = P(batch_axes(), None)
  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(tokens, tokens, tokens, P("expert", None, ffn), P("expert", None, ffn), P("expert", ffn, None)),
    out_specs=tokens,
  )(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down)
