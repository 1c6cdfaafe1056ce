"""AOT compilation of the full training step for a TPU slice, on this CPU-only machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from manifold.aot import parse_slice
from manifold.config import ConfigError


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None or os.path.isdir(os.path.join(sys.prefix, "libtpu"))


def test_slice_names():
  s = parse_slice("v5p-128")
  assert (s.topology, s.chips, s.hbm_bytes) == ("v5p:4x4x4", 64, 95 * 2**30)
  assert parse_slice("v5p:2x2x2").chips == 8
  assert parse_slice("v6e-16").topology == "v6e:4x4"
  with pytest.raises(ConfigError, match="not a slice size; known: v5p-8, v5p-16"):
    parse_slice("v5p-12")
  with pytest.raises(ConfigError, match="expected <generation>-<size> like v5p-128"):
    parse_slice("h100-8")
  two = parse_slice("2xv5p-32")  # two slices over DCN
  assert (two.name, two.topology, two.chips, two.count, two.one) == ("2xv5p-32", "v5p:2x2x4", 32, 2, "v5p-32")


@pytest.mark.skipif(
  not libtpu_available(), reason="libtpu is not installed: run `make libtpu` (pip install 'jax[tpu]')"
)
def test_compile_across_two_slices_puts_the_data_axis_over_dcn():
  """`--topology 2xv5e-4`: the step compiles for 8 chips of two slices, the batch split over them."""
  from manifold import aot
  from manifold.config import load_config
  from manifold.launch import slice_overrides

  two = parse_slice("2xv5e-4")
  cfg = load_config(
    "experiments/quickstart.py:tiny", slice_overrides(["--config.mesh.data=1", "--config.mesh.fsdp=-1"], 2)
  )
  report = aot.compile_train_step(cfg, two)
  assert report.mesh == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1} and report.total_bytes > 0


@pytest.mark.skipif(
  not libtpu_available(), reason="libtpu is not installed: run `make libtpu` (pip install 'jax[tpu]')"
)
def test_compile_quickstart_for_v5p_with_expert_parallelism(tmp_path):
  """The quickstart model (MLA, MoE, MTP, mHC) on a 4-chip v5p slice, experts over 2 chips:
  the step compiles for TPU (ragged all-to-all dispatch included) and its per-chip
  arguments hold between a quarter and all of the float32 train state."""
  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.model.accounting import count_params

  overrides = [
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
    "--config.mesh.expert=2",
    "--config.train.microbatches=2",
  ]
  proc = subprocess.run(
    [sys.executable, "-m", "manifold.cli", "compile", "--config", "experiments/quickstart.py", "--topology", "v5p-8",
     "--results", str(tmp_path), *overrides],
    capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "-> fits" in proc.stdout
  (row,) = json.loads((tmp_path / "results.json").read_text())
  assert row["slice"] == "v5p-8" and row["mesh"] == "fsdp 2 x expert 2"
  state_bytes = 3 * 4 * count_params(ModelConfig.from_mapping(load_config("experiments/quickstart.py").model))["total"]
  assert state_bytes / 4 < row["argument_bytes"] < state_bytes
  assert 0 < row["total_bytes"] < row["hbm_bytes"] and row["xla_flops_per_chip"] > 0 and row["model_flops_per_chip"] > 0
  assert "| experiments/quickstart.py | v5p-8 | fsdp 2 x expert 2 |" in (tmp_path / "results.md").read_text()
