"""Hugging Face DeepSeek-V3 checkpoints: logits parity after import (default RoPE and YaRN),
sharded and FP8 checkpoints, bounded import memory, exact round trip on export."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import manifold
from manifold.cli import main
from manifold.config import ConfigError, base_config
from manifold.interop import deepseek_v3
from manifold.model import ModelConfig
from manifold.parallel.mesh import make_mesh
from manifold.train import state as train_state
from manifold.train.optimizer import make_optimizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "deepseek_v3_tiny"
SHARDED = FIXTURES / "deepseek_v3_tiny_sharded"  # the same model in 40 kB shards with an index
YARN = FIXTURES / "deepseek_v3_tiny_yarn"


def write_sharded(tensors: dict[str, np.ndarray], directory: pathlib.Path, max_shard_bytes: int) -> int:
  """Saves `tensors` as HF does with `max_shard_size`: shards + model.safetensors.index.json."""
  shards: list[dict[str, np.ndarray]] = [{}]
  for name, tensor in tensors.items():
    if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > max_shard_bytes:
      shards.append({})
    shards[-1][name] = tensor
  weight_map = {}
  for k, shard in enumerate(shards, 1):
    file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(directory / file))
    weight_map |= dict.fromkeys(shard, file)
  (directory / deepseek_v3.INDEX).write_text(json.dumps({"weight_map": weight_map}))
  return len(shards)


def quantize_fp8(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(float8_e4m3fn weight, float32 scale_inv per block) as DeepSeek's FP8 checkpoints store them."""
  (bo, bi), (o, i) = block, w.shape
  padded = np.zeros((math.ceil(o / bo) * bo, math.ceil(i / bi) * bi), np.float32)
  padded[:o, :i] = np.abs(w)
  scale_inv = padded.reshape(padded.shape[0] // bo, bo, -1, bi).max(axis=(1, 3)) / 448  # e4m3's largest value
  full = np.repeat(np.repeat(scale_inv, bo, 0), bi, 1)[:o, :i]
  return (w / full).astype(ml_dtypes.float8_e4m3fn), scale_inv.astype(np.float32)


def fp8_tensors() -> dict[str, np.ndarray]:
  """The tiny fixture's tensors with every `*_proj*` weight stored as FP8 in 16 x 16 blocks (edge blocks
  partial), as the released V3 stores them (router, norms, embedding and head stay wide)."""
  tensors = {}
  for name, tensor in load_file(str(CHECKPOINT / "model.safetensors")).items():
    if "_proj" in name:
      tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(tensor, (16, 16))
    else:
      tensors[name] = tensor
  return tensors


def write_fp8(directory: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
  hf = json.loads((CHECKPOINT / "config.json").read_text())
  hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
  directory.mkdir(exist_ok=True)
  save_file(tensors, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(hf))
  return directory


def imported_params(checkpoint=CHECKPOINT):
  """(model config, params, extra) read through the import path, in memory."""
  hf, tensors = deepseek_v3.read_hf_checkpoint(str(checkpoint))
  model_cfg = ModelConfig.from_mapping({**base_config().model.to_dict(), **deepseek_v3.model_overrides_from_hf(hf)})
  return model_cfg, *deepseek_v3.params_from_hf(tensors, model_cfg, rope_interleave=hf["rope_interleave"])


def imported_model(checkpoint=CHECKPOINT):
  model_cfg, params, extra = imported_params(checkpoint)
  from manifold.model import Transformer

  model = Transformer(model_cfg, rngs=nnx.Rngs(params=0))
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, extra), model_cfg, params, extra


def test_imported_deepseek_v3_matches_transformers_logits():
  """tests/fixtures/make_deepseek_v3_tiny.py: MLA with q compression and interleaved RoPE,
  group-limited routing with a non-zero bias, a dense first layer; float32, 1e-4."""
  model, cfg, _, _ = imported_model()
  assert (cfg.attention, cfg.ffn, cfg.first_k_dense_replace, cfg.n_group, cfg.rope_scaling) == (
    "mla", "moe", 1, 4, "none",
  )  # fmt: skip
  expected = load_file(str(FIXTURES / "deepseek_v3_tiny_expected.safetensors"))
  logits, _ = model(jnp.asarray(expected["input_ids"]))
  error = float(jnp.max(jnp.abs(logits - expected["logits"])))
  assert error < 1e-4, error


def test_imported_yarn_deepseek_v3_matches_transformers_logits():
  """V3's YaRN (factor 40 over 4096 positions) with mscale_all_dim 0.8 against mscale 1, so
  the cos / sin and the softmax scales both move; an 8-wide RoPE part; float32, 1e-4."""
  model, cfg, _, _ = imported_model(YARN)
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len, cfg.rope_mscale_all_dim) == (
    "yarn", 40.0, 4096, 0.8,
  )  # fmt: skip
  expected = load_file(str(FIXTURES / "deepseek_v3_tiny_yarn_expected.safetensors"))
  logits, _ = model(jnp.asarray(expected["input_ids"]))
  error = float(jnp.max(jnp.abs(logits - expected["logits"])))
  assert error < 1e-4, error


def test_yarn_settings_read_alike_from_released_and_transformers_configs_and_survive_export():
  """The released V3 config spells YaRN `rope_scaling: {type: yarn}` beside a top-level
  `rope_theta`; transformers 5 writes `rope_parameters: {rope_type: yarn, rope_theta}`."""
  hf = json.loads((YARN / "config.json").read_text())
  yarn = {k: v for k, v in hf["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
  released = {k: v for k, v in hf.items() if k != "rope_parameters"}
  released |= {"rope_theta": hf["rope_parameters"]["rope_theta"], "rope_scaling": {"type": "yarn", **yarn}}
  overrides = deepseek_v3.model_overrides_from_hf(hf)
  assert deepseek_v3.model_overrides_from_hf(released) == overrides
  cfg = ModelConfig.from_mapping({**base_config().model.to_dict(), **overrides})
  assert deepseek_v3.model_overrides_from_hf(deepseek_v3.hf_config(cfg)) == overrides


def test_sharded_checkpoint_imports_the_same_parameters_as_the_single_file():
  assert len(list(SHARDED.glob("*.safetensors"))) > 3
  for a, b in zip(jax.tree.leaves(imported_params(SHARDED)[1:]), jax.tree.leaves(imported_params()[1:])):
    np.testing.assert_array_equal(a, b)


def test_a_safetensors_file_outside_the_index_is_refused_in_one_line(tmp_path, capsys):
  """An extra file holding `model.norm.weight` would otherwise replace the real one."""
  hf_dir = tmp_path / "hf"
  shutil.copytree(SHARDED, hf_dir)
  save_file({"model.norm.weight": np.zeros(32, np.float32)}, str(hf_dir / "stray.safetensors"))
  assert main(["convert", "--from-hf", str(hf_dir), "--workdir", str(tmp_path / "run")]) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and "stray.safetensors is not in model.safetensors.index.json" in error, error
  assert "move it out of the folder" in error and not (tmp_path / "run").exists()


def sharded_with_index(change):
  def build(hf_dir):
    shutil.copytree(SHARDED, hf_dir)
    index = json.loads((hf_dir / deepseek_v3.INDEX).read_text())
    change(index["weight_map"])
    (hf_dir / deepseek_v3.INDEX).write_text(json.dumps(index))

  return build


def fp8_with(change):
  def build(hf_dir):
    tensors = fp8_tensors()
    change(tensors)
    write_fp8(hf_dir, tensors)

  return build


def fp8_with_quant_method(method):
  def build(hf_dir):
    write_fp8(hf_dir, fp8_tensors())
    hf = json.loads((hf_dir / "config.json").read_text())
    hf["quantization_config"]["quant_method"] = method
    (hf_dir / "config.json").write_text(json.dumps(hf))

  return build


def tiny_with(change):
  def build(hf_dir):
    shutil.copytree(CHECKPOINT, hf_dir)
    change(hf_dir)

  return build


def config_json_with(change):
  def edit(hf_dir):
    hf = json.loads((hf_dir / "config.json").read_text())
    change(hf)
    (hf_dir / "config.json").write_text(json.dumps(hf))

  return tiny_with(edit)


def truncate(hf_dir):
  weights = hf_dir / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda hf_dir: None, "--from-hf .*/hf: no such folder; pass a Hugging Face checkpoint folder"),
    (tiny_with(lambda d: (d / "config.json").write_text("{not json")), "config.json is not JSON .*; restore"),
    (tiny_with(lambda d: (d / "config.json").write_text("[1, 2]")), "config.json holds a list, not .*; restore"),
    (config_json_with(lambda hf: hf.pop("hidden_size")), "config.json has no 'hidden_size'; a DeepSeek-V3"),
    (config_json_with(lambda hf: hf.update(hidden_size="big")), "config.json hidden_size='big': must be an integer"),
    (config_json_with(lambda hf: hf.update(hidden_size=0)), "config.json gives model.d_model=0: must be a positive"),
    (tiny_with(lambda d: (d / "model.safetensors").write_bytes(b"")), "model.safetensors: not a safetensors file"),
    (tiny_with(truncate), "model.safetensors: not a safetensors file .*truncated.*; download it again"),
    (
      sharded_with_index(lambda m: m.pop("model.norm.weight")),
      "holds 'model.norm.weight', which model.safetensors.index.json does not map to it",
    ),
    (
      sharded_with_index(lambda m: m.update({"model.layers.0.extra.weight": m["model.norm.weight"]})),
      "maps 'model.layers.0.extra.weight' to .*, which does not hold it",
    ),
    (
      sharded_with_index(lambda m: m.update({"model.norm.weight": "model-00099-of-00099.safetensors"})),
      "names model-00099-of-00099.safetensors, which is not in the folder",
    ),
    (
      fp8_with(lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv")),
      "'model.layers.0.mlp.up_proj.weight' is float8 but 'model.layers.0.mlp.up_proj.weight_scale_inv' is missing",
    ),
    (fp8_with_quant_method("int8"), "quant_method='int8' .* is not supported"),
  ],
  ids=(
    "no-folder config-not-json config-a-list config-missing-key config-mistyped-key config-zero-width "
    "empty-safetensors truncated-safetensors tensor-not-in-index index-entry-not-in-shard index-names-absent-shard "
    "no-scale-inv int8"
  ).split(),
)
def test_broken_checkpoints_are_refused_in_one_line(build, message, tmp_path, capsys):
  build(tmp_path / "hf")
  assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]) == 2
  error = capsys.readouterr().err
  assert error.count("\n") == 1 and re.search(message, error), error


def test_convert_from_a_missing_folder_names_the_folder_whatever_the_working_directory(tmp_path):
  """The default --config is found beside the package, so only the folder can be wrong."""
  source = pathlib.Path(manifold.__file__).parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run(
    [sys.executable, "-m", "manifold.cli", "convert", "--from-hf", "/missing/folder", "--workdir", "run"],
    capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
  )  # fmt: skip
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "manifold: error: --from-hf /missing/folder: no such folder" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_convert_from_hf_finds_its_default_config_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert main(["convert", "--from-hf", str(CHECKPOINT), "--workdir", "run"]) == 0
  assert (tmp_path / "run" / "config.json").is_file()
  from manifold.provenance.lineage import Lineage
  from manifold.provenance.verify import verify_run

  (manifest,) = Lineage.read_all("run")  # step 0, chained to the HF files it came from
  assert manifest.step == 0 and manifest.body["origin"]["kind"] == "hf"
  assert set(manifest.body["origin"]["files"]) == {p.name for p in CHECKPOINT.iterdir() if p.is_file()}
  assert verify_run("run").checkpoints == 1


def test_fp8_dequantisation_matches_a_numpy_reference_per_128_block():
  """A [300, 200] weight: 3 x 2 blocks of 128 x 128, the last row and column partial."""
  rng = np.random.default_rng(0)
  weight = rng.standard_normal((300, 200), np.float32).astype(ml_dtypes.float8_e4m3fn)
  scale_inv = rng.uniform(1e-3, 1e-1, (3, 2)).astype(np.float32)
  expected = np.empty((300, 200), np.float32)
  for r in range(3):
    for c in range(2):
      rows, cols = slice(128 * r, 128 * (r + 1)), slice(128 * c, 128 * (c + 1))
      expected[rows, cols] = weight[rows, cols].astype(np.float32) * scale_inv[r, c]
  np.testing.assert_array_equal(deepseek_v3.dequantize_fp8(weight, scale_inv, (128, 128)), expected)


def test_imported_fp8_weights_equal_the_original_within_e4m3_rounding(tmp_path):
  """e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most 2^-4 of itself and
  a subnormal one (below 2^-6 of the block's scale) by at most 2^-10 of the block's scale."""
  stored = fp8_tensors()
  fp8_checkpoint = write_fp8(tmp_path, stored)
  _, tensors = deepseek_v3.read_hf_checkpoint(str(fp8_checkpoint))
  original = load_file(str(CHECKPOINT / "model.safetensors"))
  assert set(tensors) == set(original)
  quantized = [name for name in original if "_proj" in name]
  assert len(quantized) == 3 + 2 * (8 + 1) * 3 + 3 * 5  # dense MLP, routed + shared experts, attention
  for name in quantized:
    o, i = original[name].shape
    block_scale = np.repeat(np.repeat(stored[name + "_scale_inv"], 16, 0), 16, 1)[:o, :i]
    error = np.abs(tensors[name] - original[name])
    bound = 2.0**-4 * np.abs(original[name]) + 2.0**-10 * block_scale
    assert np.all(error <= bound * (1 + 1e-5)), name
  for a, b in zip(jax.tree.leaves(imported_params(fp8_checkpoint)[1:]), jax.tree.leaves(imported_params()[1:])):
    np.testing.assert_allclose(a, b, rtol=2.0**-4, atol=1e-4)


def test_importing_24_layers_holds_about_one_layer_in_memory(tmp_path, monkeypatch):
  """A bfloat16 checkpoint of 24 layers in 1 MiB shards: the peak of the import's traced
  allocations (numpy buffers included; memory-mapped file pages are not) stays within a
  few layers' float32 bytes, far below the whole model's."""
  base = base_config()
  model = dict(
    base.model.to_dict(), vocab_size=64, d_model=128, n_layers=24, n_heads=2, n_kv_heads=2, head_dim=24,
    max_seq_len=64, attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, ffn="moe", n_routed_experts=16, experts_per_token=2, moe_d_ff=256, d_ff=256,
    first_k_dense_replace=1,
  )  # fmt: skip
  cfg = ModelConfig.from_mapping(model)
  spec = train_state.make_state_spec(cfg, make_optimizer(base.train), make_mesh(base.mesh))
  rng = np.random.default_rng(0)
  params, extra = (
    jax.tree.map(lambda a: rng.standard_normal(a.shape, np.float32), t)
    for t in (spec.abstract.params, spec.abstract.extra)
  )
  tensors = {k: t.astype(ml_dtypes.bfloat16) for k, t in deepseek_v3.params_to_hf(params, extra, cfg).items()}
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  assert write_sharded(tensors, hf_dir, 1 << 20) > 20
  (hf_dir / "config.json").write_text(json.dumps(deepseek_v3.hf_config(cfg)))
  layer = sum(4 * t.size for name, t in tensors.items() if name.startswith("model.layers.1."))
  model_bytes = sum(4 * t.size for t in tensors.values())
  deepseek_v3.import_checkpoint(str(CHECKPOINT), str(tmp_path / "first"), base)  # loads the modules it uses
  monkeypatch.setattr(train_state, "make_state_spec", lambda *_: spec)  # tracing is slow under tracemalloc

  tracemalloc.start()
  deepseek_v3.import_checkpoint(str(hf_dir), str(tmp_path / "run"), base)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  print(f"import peak {peak / 2**20:.1f} MiB; one layer {layer / 2**20:.1f} MiB, model {model_bytes / 2**20:.1f} MiB")
  assert peak < 3 * layer and peak < model_bytes / 8, (peak, layer, model_bytes)


def test_export_reproduces_the_hf_tensors_exactly():
  _, cfg, params, extra = imported_model()
  exported = deepseek_v3.params_to_hf(params, extra, cfg)
  original = load_file(str(CHECKPOINT / "model.safetensors"))
  assert set(exported) == set(original)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_convert_cli_imports_a_restorable_run_and_exports_it_back_exactly(tmp_path, capsys):
  from manifold.config import config_from_json
  from manifold.train.checkpoint import Checkpointer

  workdir = tmp_path / "run"
  assert main(["convert", "--from-hf", str(CHECKPOINT), "--workdir", str(workdir)]) == 0
  cfg = config_from_json((workdir / "config.json").read_text())
  spec = train_state.make_state_spec(
    ModelConfig.from_mapping(cfg.model), make_optimizer(cfg.train), make_mesh(cfg.mesh)
  )
  state, _ = Checkpointer(str(workdir), keep=1).restore(0, spec.abstract)
  _, _, params, extra = imported_model()
  for a, b in zip(
    jax.tree.leaves(state.params) + jax.tree.leaves(state.extra), jax.tree.leaves(params) + jax.tree.leaves(extra)
  ):
    np.testing.assert_array_equal(np.asarray(a), b)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(make_optimizer(cfg.train).init(state.params))):
    np.testing.assert_array_equal(a, b)

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
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq' .* is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4}}, "RoPE scaling 'dynamic'"),
    ({"model_type": "llama"}, "only 'deepseek_v3'"),
  ],
)
def test_unsupported_checkpoints_are_refused_with_the_reason(change, message):
  hf = json.loads((CHECKPOINT / "config.json").read_text())
  hf.pop("rope_parameters", None)
  with pytest.raises(ConfigError, match=message):
    deepseek_v3.model_overrides_from_hf({**hf, **change})
