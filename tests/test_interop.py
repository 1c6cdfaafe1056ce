"""Hugging Face DeepSeek-V3 checkpoints: logits parity after import, exact round trip on export."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from manifold.cli import main
from manifold.config import ConfigError, base_config
from manifold.interop import deepseek_v3
from manifold.model import ModelConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "deepseek_v3_tiny"


def imported_model():
  hf, tensors = deepseek_v3.read_hf_checkpoint(str(CHECKPOINT))
  model_cfg = ModelConfig.from_mapping({**base_config().model.to_dict(), **deepseek_v3.model_overrides_from_hf(hf)})
  params, extra = deepseek_v3.params_from_hf(tensors, model_cfg, rope_interleave=hf["rope_interleave"])
  from manifold.model import Transformer

  model = Transformer(model_cfg, rngs=nnx.Rngs(params=0))
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, extra), model_cfg, params, extra


def test_imported_deepseek_v3_matches_transformers_logits():
  """tests/fixtures/make_deepseek_v3_tiny.py: MLA with q compression and interleaved RoPE,
  group-limited routing with a non-zero bias, a dense first layer; float32, 1e-4."""
  model, cfg, _, _ = imported_model()
  assert (cfg.attention, cfg.ffn, cfg.first_k_dense_replace, cfg.n_group) == ("mla", "moe", 1, 4)
  expected = load_file(str(FIXTURES / "deepseek_v3_tiny_expected.safetensors"))
  logits, _ = model(jnp.asarray(expected["input_ids"]))
  error = float(jnp.max(jnp.abs(logits - expected["logits"])))
  assert error < 1e-4, error


def test_export_reproduces_the_hf_tensors_exactly():
  _, cfg, params, extra = imported_model()
  exported = deepseek_v3.params_to_hf(params, extra, cfg)
  original = load_file(str(CHECKPOINT / "model.safetensors"))
  assert set(exported) == set(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_convert_cli_imports_a_restorable_run_and_exports_it_back_exactly(tmp_path, capsys):
  from manifold.config import config_from_json
  from manifold.parallel.mesh import make_mesh
  from manifold.train.checkpoint import Checkpointer
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec

  workdir = tmp_path / "run"
  assert main(["convert", "--from-hf", str(CHECKPOINT), "--workdir", str(workdir)]) == 0
  cfg = config_from_json((workdir / "config.json").read_text())
  spec = make_state_spec(ModelConfig.from_mapping(cfg.model), make_optimizer(cfg.train), make_mesh(cfg.mesh))
  state, _ = Checkpointer(str(workdir), keep=1).restore(0, spec.abstract)
  _, _, params, extra = imported_model()
  for a, b in zip(
    jax.tree.leaves(state.params) + jax.tree.leaves(state.extra), jax.tree.leaves(params) + jax.tree.leaves(extra)
  ):
    np.testing.assert_array_equal(np.asarray(a), b)

  assert main(["convert", "--to-hf", str(tmp_path / "out"), "--workdir", str(workdir)]) == 0
  exported = load_file(str(tmp_path / "out" / "model.safetensors"))
  original = load_file(str(CHECKPOINT / "model.safetensors"))
  assert set(exported) == set(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert hf_config["model_type"] == "deepseek_v3" and hf_config["n_group"] == 4
  assert main(["convert", "--from-hf", str(CHECKPOINT), "--workdir", str(workdir)]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize(
  "change, message",
  [
    ({"quantization_config": {"quant_method": "fp8"}}, "dequantize"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "RoPE scaling 'yarn'"),
    ({"model_type": "llama"}, "only 'deepseek_v3'"),
  ],
)
def test_unsupported_checkpoints_are_refused_with_the_reason(change, message):
  hf = json.loads((CHECKPOINT / "config.json").read_text())
  hf.pop("rope_parameters", None)
  with pytest.raises(ConfigError, match=message):
    deepseek_v3.model_overrides_from_hf({**hf, **change})
