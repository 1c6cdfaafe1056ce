"""Configuration: variants, overrides, and one-line errors that name the field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from manifold.config import ConfigError, load_config, parse_arg

TINY = "experiments/quickstart.py:tiny"


def test_override_is_applied_with_the_field_type():
  cfg = load_config(TINY, ["--config.model.d_model=96", "--config.train.learning_rate=1e-3"])
  assert cfg.model.d_model == 96 and cfg.train.learning_rate == 1e-3


def test_parse_arg_bare_first_item_and_typed_values():
  args = parse_arg("tiny,steps=5,fast=true", variant="default", steps=1, fast=False)
  assert (args.variant, args.steps, args.fast) == ("tiny", 5, True)
  with pytest.raises(ConfigError, match="'nope'"):
    parse_arg("nope=1", variant="default")
  with pytest.raises(ConfigError, match="steps='x': expected int"):
    parse_arg("steps=x", steps=1)


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.model.dtype=fp8", "model.dtype='fp8': must be one of 'float32', 'bfloat16'"),
    ("--config.model.n_kv_heads=3", "model.n_kv_heads=3: must divide model.n_heads=4"),
    ("--config.model.head_dim=15", "model.head_dim=15: must be a positive even integer"),
    ("--config.train.seq_len=1000", "train.seq_len=1000: must be <= model.max_seq_len=64"),
    ("--config.train.learning_rate=-1", "train.learning_rate=-1.0: must be a finite number > 0"),
    ("--config.data.val_fraction=1.5", "data.val_fraction=1.5: must be a number in (0, 1)"),
    ("--config.sample.top_p=0", "sample.top_p=0.0: must be a number in (0, 1]"),
    ("--config.model.not_a_field=1", "model.not_a_field: unknown field"),
    ("--config.model.d_model=abc", "--config.model.d_model=abc"),
    ("--config.train.microbatches=3", "train.microbatches=3: must divide train.batch_size=8"),
    ("--config.train.lr_decay_to=0.5", "train.lr_decay_to='0.5': give one multiple per train.lr_decay_at='0.8,0.9'"),
    ("--config.train.lr_decay_at=0.8,x", "train.lr_decay_at='0.8,x': must be comma-separated fractions in (0, 1)"),
    ("--config.model.remat=some", "model.remat='some': must be one of 'none', 'dots', 'full'"),
    ("--config.mesh.dcn.data=0", "mesh.dcn.data=0: must be a positive integer"),
    ("--config.model.kernels=pallas", "model.kernels: renamed; use model.mhc_impl"),
    ("--config.model.grouped_matmul=xla", "model.grouped_matmul: renamed; use model.grouped_matmul_impl"),
    (
      "--config.model.mhc_tiles=block_tokens=12",
      "model.mhc_tiles='block_tokens=12': 'block_tokens=12': block_tokens must be a power of two",
    ),
    (
      "--config.distill.teacher=/runs/teacher --config.train.document_mask=True",
      "train.document_mask=True: the teacher of distill.teacher='/runs/teacher' reads whole windows",
    ),
  ],
)
def test_bad_value_names_field_value_and_what_is_allowed(override, message):
  with pytest.raises(ConfigError) as info:
    load_config(TINY, override.split())
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_missing_config_file_and_unknown_variant():
  with pytest.raises(ConfigError, match="no such file 'experiments/nope.py'"):
    load_config("experiments/nope.py")
  with pytest.raises(ConfigError, match="unknown variant 'huge'"):
    load_config("experiments/quickstart.py:huge")


def test_two_free_mesh_axes_rejected():
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    load_config(TINY, ["--config.mesh.tensor=-1"])


@pytest.mark.parametrize(
  "override, field",
  [("--config.model.dtype=fp8", "model.dtype"), ("--config.data.sources=/nonexistent/*.txt", "data.sources")],
)
def test_cli_prints_one_line_without_traceback(tmp_path, override, field):
  proc = subprocess.run(
    [sys.executable, "-m", "manifold.cli", "train", "--config", TINY, "--workdir", str(tmp_path / "w"), override],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("manifold: error:") and field in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_step_schedule_warms_up_then_drops_at_the_given_fractions():
  from manifold.train.optimizer import learning_rate_schedule

  cfg = load_config(TINY, ["--config.train.steps=1000", "--config.train.warmup_steps=100",
                           "--config.train.learning_rate=1.0", "--config.train.lr_schedule=step"])  # fmt: skip
  schedule = learning_rate_schedule(cfg.train)
  values = [float(schedule(s)) for s in (0, 50, 100, 799, 800, 899, 900, 999)]
  assert values == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.316, 0.316, 0.1, 0.1], rel=1e-6)
  with pytest.raises(ConfigError, match="every drop must come after train.warmup_steps=900"):
    load_config(
      TINY, ["--config.train.steps=1000", "--config.train.warmup_steps=900", "--config.train.lr_schedule=step"]
    )


def test_mesh_from_slice_and_cross_slice_factors():
  from manifold.parallel.mesh import check_fits, make_mesh, mesh_shape

  cfg = load_config(TINY, ["--config.mesh.dcn.data=2", "--config.mesh.tensor=2"])
  assert mesh_shape(cfg.mesh, 16) == (4, 1, 1, 2)  # per slice: 8 devices; data x 2 slices = 8 in all
  with pytest.raises(ConfigError, match="mesh.dcn: factors multiply to 2, which does not divide the 3 devices"):
    mesh_shape(cfg.mesh, 3)
  moe = load_config(TINY, ["--config.model.ffn=moe", "--config.model.n_routed_experts=6", "--config.mesh.expert=1"])
  check_fits(moe, make_mesh(moe.mesh))  # one device: anything fits
  moe.train.batch_size, moe.train.microbatches = 6, 3

  class FourWayExpertMesh:
    shape = {"data": 1, "fsdp": 1, "expert": 4, "tensor": 1}

  with pytest.raises(ConfigError, match="each of the 3 microbatch\\(es\\) must split over data x fsdp x expert = 4"):
    check_fits(moe, FourWayExpertMesh())
  moe.train.batch_size = 12
  with pytest.raises(ConfigError, match="model.n_routed_experts=6: must be divisible by the expert axis"):
    check_fits(moe, FourWayExpertMesh())


def test_a_field_declared_only_in_its_dataclass_is_overridable_validated_saved_and_reaches_the_model(
  tiny_config, tmp_path, monkeypatch
):
  import dataclasses
  import json

  from manifold import config
  from manifold.model.config import ModelConfig
  from manifold.schema import POSITIVE, field
  from manifold.train.loop import train

  @dataclasses.dataclass(frozen=True)
  class WithProbe(ModelConfig):
    probe_width: int = field(7, "a field declared nowhere else", POSITIVE)

  monkeypatch.setitem(config.SECTIONS, "model", WithProbe)
  assert config.base_config().model.probe_width == 7
  with pytest.raises(ConfigError, match="model.probe_width=0: must be a positive integer"):
    tiny_config("--config.model.probe_width=0")
  cfg = tiny_config("--config.model.probe_width=3", "--config.train.steps=2", "--config.train.warmup_steps=1")
  result = train(cfg, str(tmp_path / "run"), progress=False)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["probe_width"] == 3
  assert result.spec.merge(result.state.params, result.state.extra).cfg.probe_width == 3
