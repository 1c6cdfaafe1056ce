"""How the model asks where its batch lives on the mesh, without knowing the rules.

`manifold.parallel.sharding` owns the one table mapping logical axis names to mesh axes
and installs it (`flax.nnx.logical_axis_rules`) while a step is traced over a mesh; the
model only reads the `batch` rule back. Without a mesh (eager use, one device) they
leave everything as it is.
"""

from __future__ import annotations

import math

import jax
from flax.core import spmd
from jax.sharding import PartitionSpec as P


def axes_of(name: str) -> tuple[str, ...]:
  """The mesh axes logical axis `name` is split over under the rules in force; () without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  rules = dict(spmd.get_logical_axis_rules() or ())
  if name not in rules:
    raise RuntimeError(
      "the model runs under a mesh but no logical-axis rules are in force: trace it with "
      "manifold.parallel.sharding.jit_on_mesh or inside nnx.logical_axis_rules(sharding.AXIS_RULES)"
    )
  target = rules[name] or ()
  return tuple(a for a in ((target,) if isinstance(target, str) else target) if a in mesh.shape)


def batch_axes() -> tuple[str, ...]:
  """The mesh axes a batch (and its tokens) is split over under the rules in force; () without."""
  return axes_of("batch")


def batch_ways() -> int:
  """How many pieces the batch is split into on the ambient mesh (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in batch_axes())


def shard_batch(x: jax.Array) -> jax.Array:
  """Pins a [B, ...] activation to the batch axes of the ambient mesh (block boundaries)."""
  axes = batch_axes()
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))
