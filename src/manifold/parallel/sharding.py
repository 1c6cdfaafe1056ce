"""Logical axis names -> mesh axes: the one table of rules, and the helpers that apply it.

Parameters carry logical names in their `out_sharding` metadata (see
`manifold.model.layers.param`); the model pins activations to the batch axes at block
boundaries, reading them from the rules that `jit_on_mesh` installs while a step is traced. A dimension whose size the mesh axes do not divide is replicated
instead, so small models run on any mesh. The batch is split over every axis but
`tensor`: `expert` doubles as a data axis outside the routed experts.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical name -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": ("data", "fsdp", "expert"),
  "vocab": "tensor",
  "embed": ("fsdp", "expert"),  # ZeRO-3 over every batch axis but data; experts' own dim takes `expert` first
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "expert": "expert",
  "q_lora": None,
  "kv_lora": None,
  "norm": None,
}
BATCH_AXES: tuple[str, ...] = LOGICAL_RULES["batch"]  # the mesh axes a batch (and its tokens) split over
AXIS_RULES = tuple(LOGICAL_RULES.items())  # the same, as flax's logical-axis rules (read by the model while traced)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """The mesh PartitionSpec for an array of `shape` whose dimensions have logical names `axes`.

  A mesh axis serves one dimension at most (the first that asks for it); a dimension
  takes the longest prefix of its remaining mesh axes whose sizes divide it.
  """
  spec, used = [], set()
  for name, size in zip(axes, shape):
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"logical axis {name!r} has no rule in manifold.parallel.sharding.LOGICAL_RULES")
    target = LOGICAL_RULES.get(name) if name is not None else None
    mesh_axes = [a for a in ((target,) if isinstance(target, str) else (target or ())) if a not in used]
    while mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
      mesh_axes.pop()
    mesh_axes = [a for a in mesh_axes if mesh.shape[a] > 1]
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
  return PartitionSpec(*spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict[str, Any]:
  """NamedShardings (as a pure dict mirroring `nnx.to_pure_dict`) for an abstract nnx state."""

  def one(variable: nnx.Variable) -> NamedSharding:
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the ambient mesh (`jax.set_mesh`);
  unchanged where there is none (eager use, single-device tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [B, ...] batch: the batch dimension over every data-parallel axis."""
  return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def jit_on_mesh(fn: Callable, mesh: Mesh, *, in_shardings, out_shardings, donate_argnums=()) -> Callable:
  """`jax.jit(fn)` with these shardings, traced under `mesh` (abstractly: `jax.sharding.get_abstract_mesh`
  answers inside) and the logical-axis rules, so layers can pin activations and map over devices."""

  @functools.wraps(fn)
  def on_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(AXIS_RULES):
      return fn(*args)

  return jax.jit(on_mesh, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
