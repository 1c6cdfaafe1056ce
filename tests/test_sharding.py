"""Sharded training equals single-device training: 8 simulated CPU devices in a subprocess."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

from .conftest import xla_flags


def test_one_step_on_several_meshes_equals_one_device():
  """MLA + MoE + mHC + MTP; data, FSDP, tensor and expert axes (tokens dispatched with
  all_to_all), microbatches and remat, the mHC kernels per shard; float32, 1e-5. The
  grouped-matmul kernel path (its Triton calls answered by the reference) runs under a
  tensor-split expert mesh; JAX's megablox kernels (interpret mode) and `tokamax.ragged_dot`
  run per device under the expert mesh. The
  ragged_all_to_all exchange (TPU) is traced: its gradient sums nothing over `expert`. Splash
  attention (interpret mode) runs per device on its batch rows and heads."""
  env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
  script = pathlib.Path(__file__).with_name("sharded_step.py")
  proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(report) == {
    "fsdp2_tensor4",
    "data2_expert4",
    "fsdp2_expert2_tensor2_microbatches2_remat",
    "data4_tensor2_mhc_kernels",
    "skewed_expert_parallel_vs_dense",
    "skewed_bounded_exchange_vs_dense",
    "skewed_megablox_per_device_vs_dense",
    "skewed_tokamax_per_device_vs_dense",
    "skewed_expert_tensor_split_kernel_path_vs_dense",
    "ragged_exchange",
    "splash_attention_per_shard",
  }
  for run, diffs in report.items():
    if "dispatches_with_all_to_all" in diffs:  # expert parallel iff the mesh has an expert axis
      assert diffs.pop("dispatches_with_all_to_all") == ("expert" in run), run
    if "exchange_chunk_rows" in diffs:  # 64 tokens x 2 slots over 8 (4) batch shards: 16 (32) rows a device
      chunk = {"skewed_bounded_exchange_vs_dense": 8, "skewed_expert_tensor_split_kernel_path_vs_dense": 32}
      assert diffs.pop("exchange_chunk_rows") == chunk.get(run, 16), run  # bounded: 16 / 4 rounded up to 8
    for quantity, diff in diffs.items():
      assert diff < 1e-5, (run, quantity, diff)


def test_expert_exchange_is_ragged_only_on_tpu():
  """XLA:CPU lacks `ragged_all_to_all`, XLA:GPU's hung in a training step and XLA:TPU has none
  for v5e (limited ICI routing): they pad."""
  from manifold.model.moe.expert_parallel import default_exchange

  cases = [("tpu", "TPU v5", "ragged_all_to_all"), ("tpu", "TPU v6 lite", "ragged_all_to_all"),
           ("tpu", "TPU v5 lite", "all_to_all"), ("gpu", "NVIDIA H200", "all_to_all"), ("cpu", "cpu", "all_to_all")]  # fmt: skip
  for platform, kind, want in cases:
    mesh = types.SimpleNamespace(abstract_device=types.SimpleNamespace(platform=platform, device_kind=kind))
    assert default_exchange(mesh) == want, kind
