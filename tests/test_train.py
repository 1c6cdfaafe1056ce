"""The training loop: learning, run artifacts, resume, SIGTERM, divergence, workdir safety."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from manifold.config import ConfigError, TrainConfig, config_from_json, load_config
from manifold.data import DataError
from manifold.train.checkpoint import Checkpointer
from manifold.train.divergence import DivergenceCheck
from manifold.train.loop import TrainingDiverged, train
from manifold.train.metrics import read_metrics

from .conftest import TINY, data_overrides


def assert_trees_bit_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train_command(workdir, corpus_dir, cache_dir, *overrides: str) -> list[str]:
  """`manifold train` of quickstart:tiny on the test corpus, as a separate process would run it."""
  return [
    sys.executable, "-m", "manifold.cli", "train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
    *data_overrides(corpus_dir, cache_dir), *overrides,
  ]  # fmt: skip


def test_tiny_run_learns_and_writes_its_artifacts(trained_workdir):
  rows = read_metrics(trained_workdir / "metrics.jsonl")
  val = [r["val_bits_per_byte"] for r in rows if "val_bits_per_byte" in r]
  assert val[0] > 7.5 and val[-1] < val[0] - 1.0, val
  logged = [r for r in rows if "tokens_per_s" in r][-1]
  for key in (
    "loss",
    "bits_per_byte",
    "grad_norm",
    "learning_rate",
    "tokens_per_s",
    "step_time_s",
    "model_tflops_per_s_per_device",
  ):
    assert np.isfinite(logged[key]), key
  assert (trained_workdir / "loss.png").stat().st_size > 1000
  assert Checkpointer(str(trained_workdir), keep=3).latest_step() == 20
  assert list((trained_workdir / "tensorboard").iterdir())
  manifest = json.loads((trained_workdir / "manifest.json").read_text())
  entry = manifest["files"][0]
  with open(entry["path"], "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]
  assert {e["split"] for e in manifest["files"]} == {"train", "val"}


def test_rerun_of_a_finished_run_resumes_instead_of_restarting(tiny_config, tmp_path):
  cfg = tiny_config("--config.train.steps=6", "--config.train.eval_every=100")
  first = train(cfg, str(tmp_path / "run"), progress=False)
  rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
  again = train(cfg, str(tmp_path / "run"), progress=False)
  assert again.step == first.step == 6
  assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows
  assert_trees_bit_identical(first.state.params, again.state.params)


def test_resume_after_sigterm_is_bit_identical_to_an_uninterrupted_run(tiny_config, corpus_dir, tmp_path):
  overrides = [
    "--config.train.steps=150",
    "--config.train.log_every=1",
    "--config.train.eval_every=1000",
    "--config.train.checkpoint_every=1000",
  ]
  cfg = tiny_config(*overrides)
  reference = train(cfg, str(tmp_path / "straight"), progress=False)

  workdir = tmp_path / "interrupted"
  command = train_command(workdir, corpus_dir, cfg.data.cache_dir, *overrides)
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not any(r.get("step", 0) >= 3 for r in read_metrics(workdir / "metrics.jsonl")):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output
  assert "SIGTERM: saved step" in output
  stopped_at = Checkpointer(str(workdir), keep=3).latest_step()
  assert 3 <= stopped_at < 150
  assert f"stopped at step {stopped_at} of 150 by SIGTERM" in output

  resumed = train(cfg, str(workdir), progress=False)
  assert resumed.step == 150
  assert_trees_bit_identical(reference.state.params, resumed.state.params)
  assert_trees_bit_identical(reference.state.opt_state, resumed.state.opt_state)
  losses = lambda d: {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r}  # noqa: E731
  assert losses(tmp_path / "straight") == losses(workdir)


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  good = train(tiny_config("--config.train.steps=10", "--config.train.eval_every=100"), workdir, progress=False)
  with pytest.raises(TrainingDiverged, match=r"non-finite .* newest checkpoint \(step 10\)"):
    train(tiny_config("--config.train.steps=20", "--config.train.learning_rate=1e30"), workdir, progress=False)
  checkpointer = Checkpointer(workdir, keep=3)
  assert checkpointer.latest_step() == 10
  assert sorted(os.listdir(checkpointer.directory)) == ["10"]
  restored, _ = checkpointer.restore(10, good.spec.abstract)
  assert_trees_bit_identical(good.state.params, restored.params)


def test_workdir_trained_with_another_model_is_refused(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  train(tiny_config("--config.train.steps=3", "--config.train.eval_every=100"), workdir, progress=False)
  with pytest.raises(ConfigError, match="model.d_model=32: .* was trained with 64"):
    train(tiny_config("--config.train.steps=3", "--config.model.d_model=32"), workdir, progress=False)
  assert os.path.exists(os.path.join(workdir, "checkpoints", "3"))


# Reliability: corrupt checkpoints, run directories that failed commands leave alone, interrupts, divergence.


def corrupt(step_dir, how: str) -> None:
  """Damages one checkpoint the way a crash or a full disk does."""
  state = step_dir / "state"
  if how == "truncated data file":
    data_file = max((state / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
  elif how == "emptied manifest.ocdbt":
    (state / "manifest.ocdbt").write_bytes(b"")
  else:  # torn data/metadata
    metadata = step_dir / "data" / "metadata"
    metadata.write_bytes(metadata.read_bytes()[:12])


def tree_digest(root) -> dict[str, str]:
  return {
    os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
    for d, _, files in os.walk(root)
    for f in files
  }


@pytest.mark.parametrize("how", ["truncated data file", "emptied manifest.ocdbt", "torn data/metadata"])
def test_load_trained_falls_back_past_a_corrupt_newest_checkpoint_and_leaves_it(trained_workdir, tmp_path, how):
  from manifold.train.restore import load_trained

  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  corrupt(workdir / "checkpoints" / "20", how)
  before = tree_digest(workdir)
  said = []
  run = load_trained(str(workdir), data=False, say=said.append)
  assert run.step == 15
  assert len(said) == 1 and re.match(
    r"checkpoint 20 does not restore \(\w+: .+\); skipped it .* using step 15$", said[0]
  )
  assert tree_digest(workdir) == before


def test_an_explicit_corrupt_step_is_refused_in_one_line(trained_workdir, tmp_path, capsys):
  from manifold.cli import main

  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  corrupt(workdir / "checkpoints" / "20", "truncated data file")
  assert main(["eval", "--workdir", str(workdir), "--step", "20"]) == 2
  err = capsys.readouterr().err
  assert re.fullmatch(
    r"manifold: error: --step 20: checkpoint 20 in \S+ does not restore: .+; pick another step.*\n", err
  )


def test_resume_sets_a_corrupt_checkpoint_aside_and_keep_n_then_keeps_only_good_ones(trained_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  corrupt(workdir / "checkpoints" / "20", "truncated data file")
  bad = tree_digest(workdir / "checkpoints" / "20")
  cfg = config_from_json((workdir / "config.json").read_text())
  cfg.train.update(steps=40, keep_checkpoints=2)
  result = train(cfg, str(workdir), progress=False)
  assert result.start == 15 and result.step == 40
  assert sorted(os.listdir(workdir / "checkpoints")) == ["35", "40"]  # the new 20 was saved, then rotated out
  assert tree_digest(workdir / "checkpoints_unreadable" / "20") == bad
  from manifold.provenance.verify import verify_run

  summary = verify_run(str(workdir))  # the chain runs 15 -> new 20 -> ... -> 40; the set-aside 20 is retired
  assert summary.checkpoints == 2 and summary.manifests == 9


def test_failed_checks_write_nothing_so_the_corrected_retry_trains(tiny_config, corpus_dir, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="model.vocab_size=100"):
    train(tiny_config("--config.model.vocab_size=100"), str(workdir), progress=False)
  with pytest.raises(DataError, match="data.sources"):
    train(tiny_config(f"--config.data.sources={corpus_dir}/m00.py"), str(workdir), progress=False)
  with pytest.raises(ConfigError, match="mesh"):
    train(tiny_config("--config.mesh.data=2"), str(workdir), progress=False)
  assert not workdir.exists()
  assert (
    train(tiny_config("--config.train.steps=1", "--config.train.warmup_steps=0"), str(workdir), progress=False).step
    == 1
  )


def test_resume_refuses_turning_clipping_off_and_leaves_the_run_unchanged(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  train(tiny_config("--config.train.steps=2", "--config.train.warmup_steps=0"), str(workdir), progress=False)
  before = tree_digest(workdir)
  cfg = tiny_config("--config.train.steps=4", "--config.train.warmup_steps=0", "--config.train.grad_clip=0")
  with pytest.raises(
    ConfigError, match=r"^train\.grad_clip=0\.0: \S+ was trained with 1\.0; clipping on \(> 0\) or off"
  ):
    train(cfg, str(workdir), progress=False)
  assert tree_digest(workdir) == before


def test_resume_accepts_and_records_changes_to_the_schedule_and_cadence(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  base = ["--config.train.warmup_steps=0", "--config.train.eval_every=100"]
  train(tiny_config("--config.train.steps=2", *base), str(workdir), progress=False)
  changed = ["--config.train.steps=3", "--config.train.learning_rate=0.001", "--config.train.checkpoint_every=1"]
  assert train(tiny_config(*base, *changed), str(workdir), progress=False).step == 3
  history = [json.loads(line) for line in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert [(h["step"], h["changes"]) for h in history] == [
    (2, {"train.steps": [2, 3], "train.learning_rate": [0.003, 0.001], "train.checkpoint_every": [10, 1]})
  ]
  saved = json.loads((workdir / "config.json").read_text())["train"]
  assert (saved["steps"], saved["learning_rate"], saved["checkpoint_every"]) == (3, 0.001, 1)


def test_resume_refuses_a_file_added_under_the_same_glob(corpus_dir, tiny_config, tmp_path):
  corpus = tmp_path / "corpus"
  shutil.copytree(corpus_dir, corpus)
  workdir = tmp_path / "run"
  overrides = [f"--config.data.sources={corpus}/*.py", "--config.train.steps=1", "--config.train.warmup_steps=0"]
  train(tiny_config(*overrides), str(workdir), progress=False)
  manifest = (workdir / "manifest.json").read_text()
  (corpus / "zz_new.py").write_text("print('a file that was not there')\n")
  with pytest.raises(DataError, match=r"^data\.sources: \S+zz_new\.py is new since \S+ was trained"):
    train(tiny_config(*overrides), str(workdir), progress=False)
  assert (workdir / "manifest.json").read_text() == manifest


def test_a_tokenizer_retrained_in_place_is_refused_on_resume_and_by_eval(corpus_dir, tiny_config, tmp_path):
  from manifold.data import resolve_sources, train_bpe
  from manifold.train.restore import load_trained

  files = resolve_sources(f"{corpus_dir}/*.py")
  tok = tmp_path / "tok.json"
  train_bpe(files[:10], 300, str(tok))
  workdir = tmp_path / "run"
  overrides = [f"--config.data.tokenizer={tok}", "--config.train.steps=1", "--config.train.warmup_steps=0"]
  train(tiny_config(*overrides), str(workdir), progress=False)
  train_bpe(files[10:20], 300, str(tok))
  with pytest.raises(DataError, match=r"^data\.tokenizer: \S+tok\.json changed since \S+ was trained with it"):
    train(tiny_config(*overrides), str(workdir), progress=False)
  with pytest.raises(DataError, match=r"^data\.tokenizer: \S+tok\.json changed since"):
    load_trained(str(workdir))


def test_relative_data_paths_are_recorded_absolute_so_eval_works_from_elsewhere(corpus_dir, tmp_path, monkeypatch):
  from manifold.data import resolve_sources, train_bpe
  from manifold.train.restore import load_trained

  here = tmp_path / "here"
  here.mkdir()
  cfg = load_config(
    TINY,
    [
      f"--config.data.sources={os.path.relpath(corpus_dir, here)}/*.py",
      "--config.data.tokenizer=tok.json",
      "--config.data.cache_dir=cache",
      "--config.data.val_fraction=0.2",
      "--config.train.steps=1",
      "--config.train.warmup_steps=0",
    ],
  )
  monkeypatch.chdir(here)
  train_bpe(resolve_sources(f"{corpus_dir}/*.py")[:10], 300, "tok.json")
  train(cfg, "run", progress=False)
  data = json.loads((here / "run" / "config.json").read_text())["data"]
  assert data["sources"] == f"{corpus_dir}/*.py"
  assert (data["tokenizer"], data["cache_dir"]) == (str(here / "tok.json"), str(here / "cache"))
  monkeypatch.chdir(tmp_path)
  assert load_trained(str(here / "run")).data.tokenizer.vocab_size == 300


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_on_resume(tiny_config, tmp_path, capsys):
  workdir = tmp_path / "run"
  base = ["--config.train.warmup_steps=0", "--config.train.log_every=1", "--config.train.eval_every=100"]
  train(tiny_config("--config.train.steps=2", *base), str(workdir), progress=False)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "loss": 4.')
  capsys.readouterr()
  train(tiny_config("--config.train.steps=3", *base), str(workdir), progress=False)
  assert re.search(
    r"metrics\.jsonl: dropped 1 line\(s\) cut short by an earlier crash \(line \d+\)", capsys.readouterr().out
  )
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_a_rerun_after_an_early_kill_writes_each_metrics_row_once(tiny_config, tmp_path):
  workdir = tmp_path / "run"
  cfg = tiny_config("--config.train.steps=2", "--config.train.warmup_steps=0", "--config.train.log_every=1")
  train(cfg, str(workdir), progress=False)
  shutil.rmtree(workdir / "checkpoints")  # killed before its first checkpoint: metrics rows, no checkpoint
  train(cfg, str(workdir), progress=False)
  keys = [(r["step"], "val" if "val_loss" in r else "train") for r in read_metrics(workdir / "metrics.jsonl")]
  assert sorted(keys) == [(0, "val"), (1, "train"), (2, "train"), (2, "val")]


def test_ctrl_c_before_compilation_saves_at_the_next_step_and_exits_130(tiny_config, corpus_dir, tmp_path):
  cfg = tiny_config()
  workdir = tmp_path / "run"
  command = train_command(workdir, corpus_dir, cfg.data.cache_dir, "--config.train.steps=150")
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  lines = []
  while not lines or "process(es)" not in lines[-1]:  # announced: the step-0 evaluation compiles next
    lines.append(proc.stdout.readline())
    assert lines[-1], "".join(lines)
  proc.send_signal(signal.SIGINT)
  output = "".join(lines) + proc.communicate(timeout=240)[0]
  assert proc.returncode == 130, output
  assert "stopped at step 1 of 150 by SIGINT" in output and "Traceback" not in output
  assert Checkpointer(str(workdir), keep=3).latest_step() == 1


def test_an_exploding_update_stops_the_run_before_it_is_checkpointed(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_config(
    "--config.train.learning_rate=1e4",  # as reported: the loss then sat at ln(vocab) with no gradient
    "--config.train.grad_clip=0",
    "--config.train.checkpoint_every=1",
    "--config.train.log_every=1",
  )
  with pytest.raises(
    TrainingDiverged, match=r"^parameter norm .* at step 2: stopped; the newest checkpoint \(step 1\)"
  ):
    train(cfg, workdir, progress=False)
  checkpointer = Checkpointer(workdir, keep=3)
  assert sorted(os.listdir(checkpointer.directory)) == ["1"]
  row = next(r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["step"] == 1)
  state, _ = checkpointer.restore(1, train_state_spec(cfg).abstract)
  np.testing.assert_allclose(float(optax.global_norm(state.params)), row["param_norm"], rtol=1e-6)


def train_state_spec(cfg):
  from manifold.config import model_config
  from manifold.parallel.mesh import make_mesh
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec

  return make_state_spec(model_config(cfg), make_optimizer(cfg.train), make_mesh(cfg.mesh))


def divergence_check(**train_overrides) -> DivergenceCheck:
  return DivergenceCheck(dataclasses.replace(TrainConfig(), **train_overrides))


def test_divergence_check_flags_a_loss_spike_over_the_running_median():
  check = divergence_check(spike_factor=3.0, divergence_window=4)
  assert [check.update(loss, 1.0, 10.0) for loss in (5.0, 4.0, 12.0, 3.5)] == [None] * 4  # 12 <= 3 x 4.5
  assert re.match(r"loss 14 > train\.spike_factor=3 x its median 4\.5", check.update(14.0, 1.0, 10.0))


def test_divergence_check_flags_an_exploding_parameter_norm():
  check = divergence_check(param_norm_factor=10.0)
  assert [check.update(5.0, 1.0, norm) for norm in (19.0, 20.0, 150.0)] == [None] * 3
  assert re.match(r"parameter norm 1\.38e\+06 > train\.param_norm_factor=10", check.update(5.0, 1.0, 1.38e6))


def test_divergence_check_flags_gradients_that_collapse_while_the_loss_stays_flat():
  check = divergence_check(grad_norm_floor=1e-6, collapse_steps=3)
  assert [check.update(loss, 0.0, 20.0) for loss in (5.0, 4.0, 3.0)] == [None] * 3  # falling: still learning
  assert check.before_save() is not None  # but a step below the floor is never checkpointed
  assert check.update(2.0, 0.5, 20.0) is None and check.before_save() is None
  assert [check.update(5.77, 0.0, 20.0) for _ in range(2)] == [None] * 2
  assert re.match(r"collapsed gradients: .* for 3 steps while the loss did not fall", check.update(5.77, 0.0, 20.0))


def test_divergence_check_passes_a_noisy_healthy_run_and_each_check_turns_off_at_zero():
  rng = np.random.default_rng(0)
  losses = 5.5 * np.exp(-np.arange(300) / 100) + 1 + rng.uniform(-0.3, 0.3, 300)
  norms = 19 + np.arange(300) / 10
  check = divergence_check()
  assert all(check.update(loss, 0.5, norm) is None for loss, norm in zip(losses, norms))
  off = divergence_check(spike_factor=0, param_norm_factor=0, grad_norm_floor=0)
  assert all(off.update(loss, 0.0, norm) is None for loss, norm in zip([5.0, 1e6, 5.0, 5.0], [20.0, 1e14, 1e15, 1e16]))
  assert off.update(float("nan"), 0.0, 20.0).startswith("non-finite")


def test_bfloat16_moments_are_stored_in_bfloat16_and_step_like_float32(tiny_config):
  """`train.moments_dtype=bfloat16`: AdamW's mu and nu live in bfloat16; five updates of random
  gradients move the parameters as float32 moments do, to bfloat16's precision (1e-2 of the move)."""
  import jax
  import jax.numpy as jnp

  from manifold.train.optimizer import make_optimizer

  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(keys[0], (64, 32)), "b": jax.random.normal(keys[1], (32,))}
  grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.fold_in(keys[2], i), p.shape), params)
           for i in range(5)]  # fmt: skip
  moved = {}
  for dtype in ("float32", "bfloat16"):
    optimizer = make_optimizer(
      tiny_config(f"--config.train.moments_dtype={dtype}", "--config.train.warmup_steps=0").train
    )
    p, state = params, optimizer.init(params)
    for g in grads:
      updates, state = optimizer.update(g, state, p)
      p = jax.tree.map(jnp.add, p, updates)
    floats = {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(dtype)}, floats
    moved[dtype] = jax.tree.map(jnp.subtract, p, params)
  for want, got in zip(jax.tree.leaves(moved["float32"]), jax.tree.leaves(moved["bfloat16"]), strict=True):
    assert (
      float(jnp.max(jnp.abs(got - want))) <= 1e-2 * float(jnp.max(jnp.abs(want))) and float(jnp.max(jnp.abs(want))) > 0
    )


def test_document_mask_scores_each_packed_document_on_its_own(tiny_config):
  """train.document_mask: the steps take the tokenizer's end-of-text as the separator, and the
  evaluated nats of packed windows are the sum of each document's alone."""
  from manifold.parallel.mesh import make_mesh
  from manifold.train.run import document_separator, load_run_data, token_byte_table
  from manifold.train.step import make_eval_step, token_losses

  cfg = tiny_config("--config.train.document_mask=True")
  data = load_run_data(cfg)
  separator = document_separator(cfg, data)
  assert separator == data.tokenizer.eos_id
  assert document_separator(tiny_config(), data) is None
  spec = train_state_spec(cfg)
  state = spec.init(jax.random.key(0))
  batch = np.asarray(data.val.read(0, 2 * 65)).reshape(2, 65)
  batch[:, [10, 41]] = separator  # documents [0, 11), [11, 42), [42, 64) of each row's 64 inputs
  mesh = make_mesh(cfg.mesh)
  packed = make_eval_step(spec, mesh, token_byte_table(data, cfg.model.vocab_size), separator)(
    state.params, state.extra, batch
  )
  alone = sum(
    float(token_losses(spec, state.params, state.extra, batch[:, start : end + 1]).sum())
    for start, end in ((0, 11), (11, 42), (42, 64))
  )
  whole = float(token_losses(spec, state.params, state.extra, batch).sum())
  np.testing.assert_allclose(float(packed["nats"]), alone, rtol=1e-5)
  assert abs(whole - alone) > 1e-3, "without the mask the documents see each other"
