"""The mHC paper's 3B / 9B / 27B configs reproduce its parameter counts."""

from __future__ import annotations

import pytest

from manifold.config import load_config
from manifold.model import ModelConfig
from manifold.model.accounting import count_params

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


def test_unknown_size_names_the_choices():
  from manifold.config import ConfigError

  with pytest.raises(ConfigError, match="size='5b'; use one of 3b, 9b, 27b"):
    load_config("experiments/mhc_paper.py:5b")
