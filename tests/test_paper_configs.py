"""The mHC paper's 3B / 9B / 27B configs reproduce its parameter counts and Table 5's settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from manifold.config import load_config
from manifold.model import ModelConfig
from manifold.model.accounting import count_params
from manifold.model.layers import RMSNorm

# (main-model total, active without the embedding table), from the paper's appendix table
PAPER = {"3b": (2.97e9, 612e6), "9b": (9.18e9, 1.66e9), "27b": (27.0e9, 4.14e9)}


@pytest.mark.parametrize("size", list(PAPER))
@pytest.mark.parametrize("residual", ["plain", "hc", "mhc"])
def test_parameter_counts_within_two_percent_of_the_paper(size, residual):
  cfg = load_config(f"experiments/mhc_paper.py:{size},residual={residual}")
  counts = count_params(ModelConfig.from_mapping(cfg.model))
  total, active = PAPER[size]
  assert abs(counts["main"] / total - 1) < 0.02, (counts["main"], total)
  assert abs(counts["active_matmul"] / active - 1) < 0.02, (counts["active_matmul"], active)
  if residual == "mhc":  # the paper's models are the mHC ones: within 0.5%
    assert abs(counts["main"] / total - 1) < 0.005 and abs(counts["active_matmul"] / active - 1) < 0.005


def test_paper_hyperparameters():
  cfg = load_config("experiments/mhc_paper.py:27b,residual=mhc")
  m, t = cfg.model, cfg.train
  assert (m.n_layers, m.d_model, m.n_routed_experts, m.moe_d_ff, m.experts_per_token, m.n_shared_experts) == (
    30, 2560, 72, 1536, 6, 2,
  )  # fmt: skip
  assert (m.streams, m.sinkhorn_iters, m.mhc_alpha_init, m.vocab_size) == (4, 20, 0.01, 129_280)
  assert t.batch_size * t.steps * t.seq_len == 1280 * 50_000 * 4096  # 262B tokens
  assert (t.learning_rate, t.lr_schedule, t.warmup_steps) == (4.0e-4, "step", 2000)


@pytest.mark.parametrize("residual", ["plain", "hc", "mhc"])
def test_the_1t_token_variant_is_the_3b_model_on_1_05t_tokens(residual):
  long = load_config(f"experiments/mhc_paper.py:3b-1t,residual={residual}")
  short = load_config(f"experiments/mhc_paper.py:3b,residual={residual}")
  t = long.train
  assert (t.batch_size, t.steps, t.learning_rate) == (2560, 100_000, 9.0e-4)
  assert abs(t.batch_size * t.seq_len * t.steps / 1.05e12 - 1) < 0.005  # 1,048.6B tokens
  assert count_params(ModelConfig.from_mapping(long.model)) == count_params(ModelConfig.from_mapping(short.model))
  assert long.train.batch_size // long.train.microbatches == short.train.batch_size // short.train.microbatches
  assert long.eval == short.eval  # validation losses of the two runs compare


@pytest.mark.parametrize("size", ["3b", "9b", "27b", "3b-1t"])
def test_paper_rmsnorm_and_adamw_epsilons_are_1e_20_and_pass_validation(size):
  cfg = load_config(f"experiments/mhc_paper.py:{size}")  # validates
  assert (cfg.model.norm_eps, cfg.train.eps) == (1e-20, 1e-20)
  load_config("experiments/quickstart.py:tiny", ["--config.model.norm_eps=1e-20", "--config.train.eps=1e-20"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_with_eps_1e_20_is_finite_on_zero_rows_and_normalises_the_others(dtype):
  norm = RMSNorm(8, eps=1e-20, rngs=nnx.Rngs(params=0))
  x = jnp.stack([jnp.zeros(8), jax.random.normal(jax.random.key(0), (8,)) * 3.0]).astype(dtype)  # [2, 8]
  y = np.asarray(norm(x), np.float32)
  x32 = np.asarray(x, np.float32)
  np.testing.assert_array_equal(y[0], 0.0)
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(y[1], x32[1] / np.sqrt(np.mean(x32[1] ** 2)), rtol=tolerance, atol=tolerance)
  grads = jax.grad(lambda x: jnp.sum(norm(x).astype(jnp.float32)))(x).astype(jnp.float32)  # 1e10 on the zero row
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[0]).max()) > 1e9


def test_unknown_size_names_the_choices():
  from manifold.config import ConfigError

  with pytest.raises(ConfigError, match="size='5b'; use one of 3b, 9b, 27b, 3b-1t"):
    load_config("experiments/mhc_paper.py:5b")
