"""Expert parallelism: routed experts sharded over the `expert` mesh axis, each token
sent to the devices that hold its experts and back, dropless.

Inside `shard_map` every device holds N local tokens (the batch is split over data,
fsdp and expert) and E / ep experts. It sorts its N K (token, slot) assignments by
expert, which groups them by destination device, and exchanges them:

- `ragged_all_to_all` (the TPU default) sends only the real rows;
- `all_to_all` (the GPU and CPU default; every backend) sends fixed chunks padded to
  N K rows.

Both land the rows from source s at rows [s N K, s N K + count) of a [ep N K, D]
buffer, so nothing is dropped whatever the routing. The received rows are regrouped by
local expert, run through the grouped matmul (kernels/grouped_matmul; padding rows fall outside
every group and come out zero), sent back the same way and combined with the gate
weights. The FFN width may also be split over `tensor` (partial sums, one `psum`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def default_exchange(mesh) -> str:
  """`ragged_all_to_all` on TPU meshes; padded `all_to_all` elsewhere. XLA:CPU does not
  implement the ragged one, and XLA:GPU's (JAX 0.11.2, 2 H100s) compiled but never
  finished a training step (benchmarks/README.md). A mesh with an `island` axis (DiLoCo
  islands, whose step is vmapped over them) pads too: JAX cannot vmap the ragged one."""
  if "island" in getattr(mesh, "axis_names", ()):
    return "all_to_all"
  return "ragged_all_to_all" if mesh.abstract_device.platform == "tpu" else "all_to_all"


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _per_device_zeros(shape, dtype) -> jax.Array:
  """The output buffer of a `ragged_all_to_all`, typed as differing per device: its rows
  are each device's own, so their gradients must not be summed over the mesh."""
  return jax.lax.pcast(jnp.zeros(shape, dtype), batch_axes(), to="varying")


def _dispatch(xs, send, offsets, recv, cap, exchange):
  """Rows sorted by destination [N K, D] -> [ep cap, D], source s's rows at s * cap."""
  ep = send.shape[0]
  if exchange == "ragged_all_to_all":
    me = jax.lax.axis_index("expert")
    out = _per_device_zeros((ep * cap, xs.shape[1]), xs.dtype)
    return jax.lax.ragged_all_to_all(xs, out, offsets, send, jnp.full((ep,), me * cap), recv, axis_name="expert")
  dest = jnp.repeat(jnp.arange(ep), send, total_repeat_length=xs.shape[0])  # [N K]
  slot = jnp.arange(xs.shape[0]) - offsets[dest]
  chunks = jnp.zeros((ep, cap, xs.shape[1]), xs.dtype).at[dest, slot].set(xs)
  return jax.lax.all_to_all(chunks, "expert", 0, 0, tiled=True).reshape(ep * cap, -1)


def _combine(ys, send, offsets, recv, cap, exchange):
  """The inverse of `_dispatch`: [ep cap, D] -> [N K, D] in the sender's sorted order."""
  ep = send.shape[0]
  if exchange == "ragged_all_to_all":
    back_offsets = jax.lax.all_to_all(offsets, "expert", 0, 0, tiled=True)  # where each source wants its rows
    out = _per_device_zeros((cap, ys.shape[1]), ys.dtype)
    return jax.lax.ragged_all_to_all(ys, out, jnp.arange(ep) * cap, recv, back_offsets, send, axis_name="expert")
  returned = jax.lax.all_to_all(ys.reshape(ep, cap, -1), "expert", 0, 0, tiled=True)  # [ep, cap, D]
  dest = jnp.repeat(jnp.arange(ep), send, total_repeat_length=cap)  # cap = N K: every row comes back
  return returned[dest, jnp.arange(cap) - offsets[dest]]


def _local_routed(
  x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, exchange: str, tensor_split: bool, matmul: str
):
  """One device's share: x [N, D] with its routing [N, K]; local experts [E_l, D, F_l]."""
  if jax.lax.axis_size("expert") == 1:  # every expert is here: route this device's tokens locally
    y = routed_ragged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, matmul=matmul)
  else:
    y = _exchanged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, exchange=exchange, matmul=matmul)
  return jax.lax.psum(y, "tensor") if tensor_split else y


def _exchanged(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, exchange: str, matmul: str):
  """The routed experts when they are spread over the `expert` axis: each (token, slot)
  row travels to its expert's device and back."""
  n, k = experts_nk.shape
  ep = jax.lax.axis_size("expert")
  local = w_gate.shape[0]
  cap = n * k
  order, rank, counts = sort_by_expert(experts_nk, ep * local)  # (token, slot) pairs grouped by expert, hence device
  counts = counts.reshape(ep, local)  # [dest, local expert]
  send = counts.sum(axis=1)  # [ep]
  offsets = _exclusive_cumsum(send)
  recv_counts = jax.lax.all_to_all(counts, "expert", 0, 0, tiled=True)  # [source, local expert]
  recv = recv_counts.sum(axis=1)  # [ep]

  received = _dispatch(dispatch_rows(x_nd, order, rank, k), send, offsets, recv, cap, exchange)  # [ep cap, D]
  row = jnp.arange(ep * cap)
  source, slot = row // cap, row % cap
  ends = jnp.cumsum(recv_counts, axis=1)  # [ep, E_l]
  local_expert = jnp.sum(slot[:, None] >= ends[source], axis=1)  # [ep cap]; == E_l for padding rows
  regroup = jnp.argsort(local_expert, stable=True)
  back = inverse_permutation(regroup)
  group_sizes = recv_counts.sum(axis=0)  # [E_l]
  xs = permute_rows(received, regroup, back)
  ys = permute_rows(grouped_swiglu(xs, w_gate, w_up, w_down, group_sizes, matmul), back, regroup)

  out = _combine(ys, send, offsets, recv, cap, exchange)  # [N K, D], sorted order
  return weighted_sum(permute_rows(out, rank, order).reshape(n, k, -1), weights_nk)


def routed_expert_parallel(
  x_nd, weights_nk, experts_nk, w_gate, w_up, w_down, *, exchange: str | None = None, matmul: str = "auto"
):
  """`routed_ragged` once per device on its own tokens, the experts split over the
  ambient mesh's `expert` axis (which may be 1: then nothing is exchanged).

  x [N, D], weights / experts [N, K], w_gate / w_up [E, D, F], w_down [E, F, D] -> [N, D].
  Requires E and N divisible by the expert axis and N by data x fsdp x expert.
  """
  mesh = jax.sharding.get_abstract_mesh()
  tensor_split = mesh.shape["tensor"] > 1 and w_gate.shape[2] % mesh.shape["tensor"] == 0
  ffn = "tensor" if tensor_split else None
  body = functools.partial(
    _local_routed, exchange=exchange or default_exchange(mesh), tensor_split=tensor_split, matmul=matmul
  )
  tokens = P(batch_axes(), None)
  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(tokens, tokens, tokens, P("expert", None, ffn), P("expert", None, ffn), P("expert", ffn, None)),
    out_specs=tokens,
  )(x_nd, weights_nk, experts_nk, w_gate, w_up, w_down)
