"""Run as a script with 8 simulated devices: one training step on several meshes vs one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step.py

Prints one JSON object: for each run, whether the step dispatches tokens with all_to_all,
and the largest absolute difference to the
single-device step in loss, gradient norm, every updated parameter (which, with the
optimizer settings below, bounds the gradients' difference) and the router biases.
Meshes with `expert` > 1 dispatch tokens with `shard_map` + `all_to_all`; the last run
also splits the expert FFN over `tensor`, accumulates two microbatches and rematerialises;
the last mixes the residual streams with the Pallas mHC kernels (interpret mode), once
per device on its own tokens; splash attention runs likewise on its batch rows and heads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold.config import base_config
from manifold.model import ModelConfig
from manifold.parallel import sharding
from manifold.parallel.mesh import make_mesh
from manifold.train.optimizer import make_optimizer
from manifold.train.state import make_state_spec
from manifold.train.step import make_train_step

SINGLE = dict(data=1, fsdp=1, expert=1, tensor=1)
RUNS = {  # name -> (mesh axes, config overrides); each axis in at least two of them
  "fsdp2_tensor4": (dict(SINGLE, fsdp=2, tensor=4), {}),
  "data2_expert4": (dict(SINGLE, data=2, expert=4), {}),
  "fsdp2_expert2_tensor2_microbatches2_remat": (
    dict(SINGLE, fsdp=2, expert=2, tensor=2),
    {"train.microbatches": 2, "model.remat": "full"},
  ),
  "data4_tensor2_mhc_kernels": (dict(SINGLE, data=4, tensor=2), {"model.mhc_impl": "pallas"}),
}


def config():
  c = base_config()
  c.model.update(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=64, max_seq_len=16,
    attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    ffn="moe", n_routed_experts=8, experts_per_token=2, moe_d_ff=16, residual="mhc", mtp_depth=1,
  )  # fmt: skip
  # Adam's first step is lr * g / (|g| + eps); with lr = eps = 1 and no decay or clipping the
  # update is g / (|g| + 1), whose error is at most the gradient's: params compare gradients.
  c.train.update(steps=10, warmup_steps=0, batch_size=8, seq_len=16, learning_rate=1.0, eps=1.0, weight_decay=0.0,
                 grad_clip=0.0, min_lr_ratio=1.0)  # fmt: skip
  return c


def spec_of(cfg, devices):
  """(state spec, optimizer, mesh) of `cfg` on `devices`."""
  mesh = make_mesh(cfg.mesh, devices)
  tx = make_optimizer(cfg.train)
  return make_state_spec(ModelConfig.from_mapping(cfg.model), tx, mesh), tx, mesh


def one_step(cfg, devices, initial):
  """(state after one step from `initial` (a host state) placed on this mesh, its metrics,
  whether the step dispatches with all_to_all)."""
  spec, tx, mesh = spec_of(cfg, devices)
  state = jax.device_put(initial, spec.shardings)
  step = make_train_step(spec, tx, mesh, jnp.ones(cfg.model.vocab_size), cfg.train)
  batch = jnp.asarray(np.asarray(jax.random.randint(jax.random.key(1), (8, 17), 0, 64), np.int32))
  lowered = step.lower(state, batch)  # before partitioning: only shard_map's own collectives
  state, metrics = lowered.compile()(state, batch)
  return jax.device_get(state), jax.device_get(metrics), "all_to_all" in lowered.as_text()


def skewed_dispatch(axes: dict, matmul: str, capacity_factor: float = 0.0) -> dict[str, float]:
  """Expert-parallel routed experts vs the dense reference when every token picks experts
  held by one device (the worst case for the exchange buffers), values and gradients;
  `matmul` names the grouped-matmul implementation. Also the rows per (source, destination)
  chunk of the traced exchange, which `capacity_factor` bounds (rows past it go in more rounds)."""
  from manifold.model.moe.expert_parallel import routed_expert_parallel
  from manifold.model.moe.experts import routed_dense

  mesh = make_mesh(dict(SINGLE, **axes, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  routed = functools.partial(routed_expert_parallel, matmul=matmul, capacity_factor=capacity_factor)
  keys = jax.random.split(jax.random.key(2), 5)
  n, d, f, e, k = 64, 16, 8, 8, 2
  x = jax.random.normal(keys[0], (n, d))
  experts = jax.random.randint(keys[1], (n, k), 0, 2)  # experts 0 and 1, both on the first device
  experts = experts.at[:, 1].set(1 - experts[:, 0])
  weights = jax.random.uniform(keys[2], (n, k))
  w_gate, w_up = (jax.random.normal(kk, (e, d, f)) / 4 for kk in jax.random.split(keys[3]))
  w_down = jax.random.normal(keys[4], (e, f, d)) / 4

  def loss(routed, x, w_gate, w_up, w_down):
    return jnp.sum(jnp.sin(routed(x, weights, experts, w_gate, w_up, w_down)))

  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.AXIS_RULES):
    ep = jax.jit(jax.value_and_grad(lambda *a: loss(routed, *a), argnums=(0, 1, 2, 3)))
    value, grads = ep(x, w_gate, w_up, w_down)
    chunks = re.findall(r"all_to_all.*?tensor<\d+x(\d+)x\d+xf32>", ep.lower(x, w_gate, w_up, w_down).as_text())
  ref_value, ref_grads = jax.value_and_grad(lambda *a: loss(routed_dense, *a), argnums=(0, 1, 2, 3))(
    x, w_gate, w_up, w_down
  )
  return {
    "value": float(abs(value - ref_value)),
    "grads": float(max(np.max(np.abs(a - b)) for a, b in zip(grads, ref_grads))),
    "exchange_chunk_rows": max(int(rows) for rows in chunks),
  }


@contextlib.contextmanager
def kernel_math_from_reference():
  """The grouped-matmul kernel path (padding, custom_vjp, mesh-axis typing) with the Triton
  calls answered by reference.py: Pallas interpret mode cannot run under shard_map's
  check_vma, and XLA:CPU cannot run the kernels."""
  from kernels.grouped_matmul import api, reference

  def gmm(x, w, group_sizes, *, transpose_w=False, **tiles):
    return reference.gmm(x, jnp.swapaxes(w, 1, 2) if transpose_w else w, group_sizes)

  def tgmm(x, dy, group_sizes, **tiles):
    return reference.tgmm(x, dy, group_sizes)

  with mock.patch.object(api.triton, "gmm", gmm), mock.patch.object(api.triton, "tgmm", tgmm):
    yield


def ragged_exchange_sums_over_expert() -> int:
  """How many gradient sums over the `expert` axis the ragged_all_to_all exchange adds
  (traced only, in bounded rounds: XLA:CPU cannot run it). Each device's received rows are its own, so
  there must be none; the weights' gradients are summed over data and fsdp only."""
  from manifold.model.moe.expert_parallel import routed_expert_parallel

  mesh = make_mesh(dict(SINGLE, data=2, expert=4, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  keys = jax.random.split(jax.random.key(3), 4)
  n, d, f, e, k = 64, 16, 8, 8, 2
  x, weights = jax.random.normal(keys[0], (n, d)), jax.random.uniform(keys[1], (n, k))
  experts = jax.random.randint(keys[2], (n, k), 0, e)
  w_gate = w_up = jax.random.normal(keys[3], (e, d, f))
  w_down = jnp.swapaxes(w_gate, 1, 2)

  def loss(x, w_gate, w_up, w_down):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(sharding.AXIS_RULES):
      y = routed_expert_parallel(
        x, weights, experts, w_gate, w_up, w_down, exchange="ragged_all_to_all", capacity_factor=1.0
      )
    return jnp.sum(jnp.sin(y))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w_gate, w_up, w_down)
  return sum("psum" in line and "'expert'" in line for line in str(jaxpr).splitlines())


def splash_per_shard() -> dict[str, float]:
  """The model's `attend` with splash attention (interpret mode), once per device on its own
  batch rows and heads (data 4 x tensor 2), against one device: GQA heads, narrower values,
  packed documents of other lengths in each row (the rows' segment ids go with their rows)."""
  from manifold.model.attention import attend

  mesh = make_mesh(dict(SINGLE, data=4, tensor=2, dcn=dict(data=1, fsdp=1, expert=1, tensor=1)))
  keys = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(keys[0], (8, 128, 4, 16))
  k, v = jax.random.normal(keys[1], (8, 128, 2, 16)), jax.random.normal(keys[2], (8, 128, 2, 8))
  segment_ids = jnp.arange(128)[None, :] // (8 * jnp.arange(1, 9)[:, None])  # row r: documents of 8 (r + 1) tokens

  def loss(q, k, v):
    out = attend(q, k, v, scale=0.25, is_causal=True, segment_ids=segment_ids, implementation="splash")
    return jnp.sum(jnp.sin(out))

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.AXIS_RULES):
    traced = str(jax.make_jaxpr(grad)(q, k, v))
    assert "shard_map" in traced and "pallas_call" in traced, "splash did not run per shard"
    value, grads = jax.jit(grad)(q, k, v)
  ref_value, ref_grads = jax.jit(grad)(q, k, v)
  return {  # relative to the largest reference value: the loss sums 32,768 terms
    "value_relative": float(abs(value - ref_value) / abs(ref_value)),
    "grads_relative": float(max(np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in zip(grads, ref_grads))),
  }


def main() -> None:
  assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  cfg = config()
  cfg.mesh.update(**SINGLE)
  initial = jax.device_get(spec_of(cfg, jax.devices()[:1])[0].init(jax.random.key(0)))  # every mesh starts here
  reference_state, reference_metrics, _ = one_step(cfg, jax.devices()[:1], initial)
  report = {}
  for name, (axes, overrides) in RUNS.items():
    cfg = config()
    cfg.mesh.update(**axes)
    for field, value in overrides.items():
      section, key = field.split(".")
      cfg[section][key] = value
    state, metrics, all_to_all = one_step(cfg, jax.devices(), initial)
    diffs = [
      np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params))
    ]
    report[name] = {
      "dispatches_with_all_to_all": all_to_all,
      "loss": float(abs(metrics["loss"] - reference_metrics["loss"])),
      "grad_norm": float(abs(metrics["grad_norm"] - reference_metrics["grad_norm"])),
      "params": float(max(diffs)),
      "router_bias": float(
        max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state.extra), jax.tree.leaves(reference_state.extra)))
      ),
    }
  report["skewed_expert_parallel_vs_dense"] = skewed_dispatch(dict(data=2, expert=4), "auto")
  report["skewed_bounded_exchange_vs_dense"] = skewed_dispatch(dict(data=2, expert=4), "auto", capacity_factor=1.0)
  report["skewed_megablox_per_device_vs_dense"] = skewed_dispatch(dict(data=2, expert=4), "megablox")
  report["skewed_tokamax_per_device_vs_dense"] = skewed_dispatch(dict(data=2, expert=4), "tokamax")
  with kernel_math_from_reference():
    report["skewed_expert_tensor_split_kernel_path_vs_dense"] = skewed_dispatch(
      dict(fsdp=2, expert=2, tensor=2), "triton"
    )
  report["ragged_exchange"] = {"gradient_sums_over_expert": ragged_exchange_sums_over_expert()}
  report["splash_attention_per_shard"] = splash_per_shard()
  print(json.dumps(report))


if __name__ == "__main__":
  main()
