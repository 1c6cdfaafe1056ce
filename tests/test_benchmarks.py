"""The speed-benchmark proxies have the sizes they claim; the table reports mHC overhead."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from manifold.config import load_config
from manifold.model import ModelConfig
from manifold.model.accounting import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark_module(name: str = "train_step"):
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
  "model, total, active",
  [("dense-1b", 1.036e9, 1.036e9), ("moe-1b-active", 2.871e9, 0.944e9), ("moe-27b-layers", 4.054e9, 0.800e9)],
)
def test_speed_proxies_have_their_stated_sizes(model, total, active):
  for residual in ("plain", "mhc"):
    cfg = load_config(f"{ROOT}/experiments/speed_proxies.py:model={model},residual={residual}")
    counts = count_params(ModelConfig.from_mapping(cfg.model))
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts["active"] == pytest.approx(active, rel=0.01)
    assert (cfg.train.seq_len, cfg.model.dtype, cfg.model.residual) == (4096, "bfloat16", residual)


def test_table_rows_and_mhc_ratio():
  bench = _benchmark_module()
  row = dict(
    params_b=1.0, active_b=1.0, tokens_per_step=32768, tokens_per_s=70000.0, gflop_per_token=6.8,
    model_tflops=476.0, mfu_datasheet=0.481, mfu_measured=0.6, matmul_tflops=790.0, peak_gib=40.0,
  )  # fmt: skip
  rows = [dict(row, model="dense-1b", step_ms=400.0), dict(row, model="dense-1b+mhc", step_ms=420.0)]
  rows.append({"model": "moe-1b-active", "error": "out of memory"})
  rows.append(dict(row, model="moe-1b-active", step_ms=350.0, devices=2, mesh=dict(data=1, fsdp=1, expert=2, tensor=1)))
  text = bench.table(rows)
  assert "| moe-1b-active (2 devices: expert 2) | 1.00 (1.00) | 32,768 | 350.0 |" in text
  assert "| dense-1b | 1.00 (1.00) | 32,768 | 400.0 | 70,000 | 6.80 | 476 | 48.1% | 60.0% of 790 | 40.0 |" in text
  assert "failed: out of memory" in text
  assert "mHC n=4 over plain, dense-1b: step time x1.050 (+5.0%)" in text


def test_profile_sums_gpu_stream_kernels_by_kind(tmp_path, monkeypatch):
  """A trace with kernels on a GPU stream, an XLA-op line on the same device (not summed:
  it repeats the kernels) and host events: per-step ms by kind and by kernel."""
  import contextlib
  import gzip
  import json

  import jax

  bench = _benchmark_module()
  events = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
    {"ph": "X", "name": "gmm", "pid": 1, "tid": 7, "dur": 3000},
    {"ph": "X", "name": "nvjet_sm90_tst_128x256", "pid": 1, "tid": 7, "dur": 6000},
    {"ph": "X", "name": "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "pid": 1, "tid": 7, "dur": 1500},
    {"ph": "X", "name": "loop_add_fusion_3", "pid": 1, "tid": 7, "dur": 1500},
    {"ph": "X", "name": "fusion.12", "pid": 1, "tid": 8, "dur": 9000},
    {"ph": "X", "name": "PjitFunction(step)", "pid": 2, "tid": 1, "dur": 99000},
  ]

  @contextlib.contextmanager
  def fake_trace(logdir, create_perfetto_trace):
    yield
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
      json.dump({"traceEvents": events}, f)

  monkeypatch.setattr(jax.profiler, "trace", fake_trace)
  calls = []
  hlo = """FileNames
1 "/src/manifold/model/ffn.py"

FileLocations
1 {file_name_id=1 function_name_id=1 line=27 end_line=27 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

ENTRY %main {
  ROOT %loop_add_fusion.3 = f32[8]{0} fusion(%x), kind=kLoop, calls=%c, metadata={op_name="jit(step)/add" stack_frame_id=1}
}
"""
  result = bench.profile(lambda: calls.append(1), str(tmp_path), hlo, steps=3)
  assert len(calls) == 3
  assert result["gpu_ms_per_step"] == pytest.approx(4.0)  # 12 ms of stream kernels over 3 steps
  assert dict(result["by_kind"]) == pytest.approx(
    {"matmul (cuBLAS / XLA)": 2.0, "grouped matmul (Pallas)": 1.0, "attention (cuDNN)": 0.5, "other fusions": 0.5}
  )
  assert result["top_kernels"][0] == ("nvjet_sm90_tst_128x256", pytest.approx(2.0))
  assert ["other fusions", "ffn.py:27 add", pytest.approx(0.5)] in result["top_sources"]
  assert ["matmul (cuBLAS / XLA)", "?", pytest.approx(2.0)] in result["top_sources"]  # no HLO name: a library kernel
  text = bench.table([{"model": "moe-1b-active", "profile": result, "error": "x"}])
  assert "GPU kernel time 4.0 ms per step" in text and "50.0%  matmul (cuBLAS / XLA)" in text


def test_hlo_sources_name_the_model_line_of_each_compiled_instruction():
  """On a module compiled here: every instruction of `f` maps to this file and the line of
  its jnp call, whichever way this XLA writes source locations."""
  import jax
  import jax.numpy as jnp

  bench = _benchmark_module()

  def f(x):
    return jnp.sum(jnp.exp(x) * 2.0, axis=0)

  line = f.__code__.co_firstlineno + 1
  sources = bench.hlo_sources(jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text())
  assert sources and set(sources.values()) <= {f"test_benchmarks.py:{line} {op}" for op in ("exp", "mul", "reduce_sum")}
  assert any(v.endswith("reduce_sum") for v in sources.values())


def test_rollout_benchmark_times_the_engine_beside_the_old_generate():
  from flax import nnx

  from manifold.results import markdown_table

  bench = _benchmark_module("rollout")
  cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32, max_seq_len=16)
  row = bench.measure(bench.Transformer(cfg, rngs=nnx.Rngs(params=0)), batch=2, prompt_len=4, new_tokens=3, repeats=1)
  assert row["ratio"] == pytest.approx(row["engine_tokens_per_s"] / row["generate_tokens_per_s"])
  assert row["cpu_ratio"] == pytest.approx(row["generate_cpu_s"] / row["engine_cpu_s"])
  assert "| 2 | 4 + 3 |" in markdown_table([row], bench.COLUMNS)


def test_maxtext_reference_maps_the_proxy_and_reads_maxtext_log(monkeypatch):
  """MaxText gets the proxy's shapes (mHC's streams only with residual=mhc; a model MaxText's
  DeepSeek block cannot express is refused), and its log becomes a row: the median step after
  the warm-up, its parameter count and memory estimate; the table compares the two sides."""
  monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # maxtext_reference imports train_step
  bench = _benchmark_module("maxtext_reference")
  for residual, streams in (("mhc", 4), ("plain", 1)):
    cfg = ModelConfig.from_mapping(
      load_config(f"{ROOT}/experiments/speed_proxies.py:model=moe-1b-active,residual={residual}").model
    )
    args = bench.maxtext_overrides(cfg, 4, 4096, 13)
    for expected in ("base_emb_dim=2048", "base_num_decoder_layers=14", "first_num_dense_layers=1", "num_experts=32",
                     "shared_experts=2", "base_moe_mlp_dim=896", "kv_lora_rank=512", "q_lora_rank=0", "mtp_num_layers=0",
                     f"mhc_expansion_rate={streams}", "per_device_batch_size=4", "max_target_length=4096", "steps=13"):  # fmt: skip
      assert expected in args
  with pytest.raises(ValueError, match="MLA / MoE"):
    bench.maxtext_overrides(
      ModelConfig.from_mapping(load_config(f"{ROOT}/experiments/speed_proxies.py").model), 1, 8, 1
    )

  line = "I1205 metric_logger.py:265] completed step: {}, seconds: {}, TFLOP/s/device: 1.0, Tokens/s/device: {}, total_weights: 16384, loss: {}, lm_loss: 1.0"
  seconds = [9.0, 0.9, 0.5, 0.46, 0.45, 0.47]  # step 0 compiles, steps 1-2 warm up
  lines = [line.format(i, s, 16384 / s, 10.0 - i) for i, s in enumerate(seconds)]
  lines += ["number parameters: 2.805 billion", "Total estimated memory size: 69.1 GB, estimated output size: 1.0 GB"]
  row = bench.parse_maxtext_log(lines, warmup=2)
  assert row["step_ms"] == pytest.approx(460.0) and row["step_ms_min_max"] == pytest.approx([450.0, 470.0])
  assert row["tokens_per_s"] == pytest.approx(16384 / 0.46) and row["final_loss"] == 5.0
  assert row["params_b"] == 2.805 and row["peak_gib"] == pytest.approx(69.1e9 / 2**30)
  with pytest.raises(ValueError, match="none after step 2"):
    bench.parse_maxtext_log(lines[:3], warmup=2)

  def side(model, implementation, ms):
    return dict(model=model, implementation=implementation, step_ms=ms, step_ms_min_max=[ms, ms], tokens_per_s=16384e3 / ms, final_loss=1.0)  # fmt: skip

  rows = [side("moe-1b-active", "manifold", 300.0), side("moe-1b-active", "MaxText", 450.0)]
  rows += [
    side("moe-1b-active+mhc", "manifold", 330.0),
    {"model": "moe-1b-active+mhc", "implementation": "MaxText", "error": "x"},
  ]
  text = bench.table(rows)
  assert "moe-1b-active: manifold / MaxText tokens/s x1.50" in text
  assert "manifold: mHC over plain, moe-1b-active: step time x1.100" in text
  assert "| MaxText, moe-1b-active+mhc | failed: x |" in text and "MaxText: mHC" not in text
