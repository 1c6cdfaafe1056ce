"""Multi-Token Prediction: shifted targets, causality of each depth, gradients, the logged loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold.model import ModelConfig, Transformer

CFG = ModelConfig(
  vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=16, mtp_depth=2
)


def tokens(seed=1, length=12):
  return jax.random.randint(jax.random.key(seed), (2, length), 0, CFG.vocab_size)


def depth_logits(model, x):
  _, _, aux = model.forward_with_aux(x)
  return model.mtp_logits(aux.hidden, x)


def test_depth_k_at_position_i_sees_tokens_up_to_i_plus_k_only():
  model = Transformer(CFG, rngs=nnx.Rngs(params=0))
  x = tokens()
  base = depth_logits(model, x)
  assert [lg.shape for lg in base] == [(2, 11, 53), (2, 10, 53)]
  for k, logits in enumerate(base, start=1):
    i = 4
    future = x.at[:, i + k + 1].set((x[:, i + k + 1] + 1) % 53)  # the token depth k predicts at i
    np.testing.assert_array_equal(
      np.asarray(depth_logits(model, future)[k - 1][:, : i + 1]), np.asarray(logits[:, : i + 1])
    )
    seen = x.at[:, i + k].set((x[:, i + k] + 1) % 53)  # the newest token depth k reads at i
    assert float(jnp.abs(depth_logits(model, seen)[k - 1][:, i] - logits[:, i]).max()) > 1e-4


def test_logged_mtp_loss_uses_targets_shifted_by_k_plus_1(tiny_config):
  from manifold.parallel.mesh import make_mesh
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec
  from manifold.train.step import make_train_step

  cfg = tiny_config("--config.model.mtp_depth=2", "--config.model.vocab_size=300")
  model_cfg = ModelConfig.from_mapping(cfg.model)
  mesh, tx = make_mesh(cfg.mesh), make_optimizer(cfg.train)
  spec = make_state_spec(model_cfg, tx, mesh)
  state = spec.init(jax.random.key(0))
  batch = np.asarray(jax.random.randint(jax.random.key(5), (8, 65), 0, 257), np.int32)
  model = spec.merge(state.params, state.extra)
  per_depth = []
  for k, logits in enumerate(depth_logits(model, jnp.asarray(batch[:, :-1])), start=1):
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    nll = [-log_probs[b, i, batch[b, i + k + 1]] for b in range(8) for i in range(64 - k)]
    per_depth.append(np.mean(nll))
  step = make_train_step(spec, tx, mesh, jnp.ones(300), cfg.train)
  _, metrics = step(state, jnp.asarray(batch))
  np.testing.assert_allclose(float(metrics["mtp_loss"]), np.mean(per_depth), rtol=1e-5)


def test_mtp_modules_receive_gradient_and_share_embedding_and_head():
  model = Transformer(CFG, rngs=nnx.Rngs(params=0))
  x = tokens()

  def loss(model):
    return sum(jnp.mean(jax.nn.logsumexp(lg, -1)) for lg in depth_logits(model, x))

  grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))
  for depth in grads["mtp"].values():
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(depth))
  assert float(jnp.abs(grads["head"]).max()) > 0 and float(jnp.abs(grads["embed"]["table"]).max()) > 0
  assert "head" not in grads["mtp"][0] and "embed" not in grads["mtp"][0]


def test_model_without_mtp_has_no_mtp_parameters():
  model = Transformer(dataclasses.replace(CFG, mtp_depth=0), rngs=nnx.Rngs(params=0))
  assert "mtp" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))
