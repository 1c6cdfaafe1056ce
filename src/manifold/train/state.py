"""The train state pytree and its sharded initialisation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from manifold.model import ModelConfig, Transformer
from manifold.parallel import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `params` are trained; `extra` holds the
  model's other variables (updated outside the gradient, e.g. router biases)."""

  step: jax.Array
  params: dict[str, Any]
  extra: dict[str, Any]
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """How to build, shard and interpret a TrainState for one model and mesh."""

  model_cfg: ModelConfig
  graphdef: nnx.GraphDef
  abstract: TrainState  # ShapeDtypeStructs
  shardings: TrainState  # NamedShardings
  init: Callable[[jax.Array], TrainState]  # jitted: key -> sharded state

  def merge(self, params, extra) -> Transformer:
    """The model for `params` and `extra` (inside or outside jit)."""
    return nnx.merge(self.graphdef, params, extra)


def build_model(model_cfg: ModelConfig, key: jax.Array) -> Transformer:
  return Transformer(model_cfg, rngs=nnx.Rngs(params=key))


def make_state_spec(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> StateSpec:
  """Derives the graph, abstract shapes and shardings without allocating parameters."""
  abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, jax.random.key(0)))
  graphdef, abstract_params, abstract_extra = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = sharding.state_shardings(abstract_params, mesh)
  extra_shardings = sharding.state_shardings(abstract_extra, mesh)
  replicated = sharding.replicated(mesh)

  def init(key: jax.Array) -> TrainState:
    _, params, extra = nnx.split(build_model(model_cfg, key), nnx.Param, ...)
    params, extra = nnx.to_pure_dict(params), nnx.to_pure_dict(extra)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, jax.random.key(0))
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abstract.opt_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )
  shardings = TrainState(step=replicated, params=param_shardings, extra=extra_shardings, opt_state=opt_shardings)
  init_jit = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StateSpec(model_cfg=model_cfg, graphdef=graphdef, abstract=abstract, shardings=shardings, init=init_jit)
