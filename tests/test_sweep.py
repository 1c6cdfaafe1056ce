"""`manifold sweep`: every variant trained, tabulated, plotted; a rerun reuses finished runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from manifold.processes import last_step
from manifold.sweep import by_variant, plot_sweep, run_name, spikes, sweep_args, variant_looks

from .conftest import TINY_SWEEP, data_overrides, error_line


def test_sweep_tabulates_every_variant_with_its_command(tiny_sweep):
  results, _ = tiny_sweep
  summaries = json.loads((results / "results.json").read_text())
  assert [s["run"] for s in summaries] == [f"residual={r},seed={s}" for s in (0, 1) for r in ("plain", "mhc")]
  assert [(s["residual"], s["seed"]) for s in summaries] == [("plain", 0), ("mhc", 0), ("plain", 1), ("mhc", 1)]
  plain, mhc = summaries[:2]
  assert plain["final_amax_gain"] is None and mhc["final_amax_gain"] >= 1.0 - 1e-5
  assert [r["step"] for r in mhc["validation"]] == [0, 3, 6] and mhc["validation"][-1]["forward_gain"] > 0
  assert [r["step"] for r in mhc["training"]] == [1, 2, 3, 4, 5, 6] and plain["commit"] and plain["device"]
  assert plain["tokens"] == 6 * 4 * 32
  table = (results / "results.md").read_text().splitlines()
  assert len(table) == 6 and "--config " in table[2] and ":residual=plain,seed=0 --workdir " in table[2]
  assert (results / "curves.png").stat().st_size > 1000
  variants = {r["variant"]: r for r in json.loads((results / "by_variant.json").read_text())}
  assert set(variants) == {"residual=plain", "residual=mhc"} and variants["residual=mhc"]["seeds"] == [0, 1]
  gaps = [mhc["final_val_loss"] - plain["final_val_loss"] for plain, mhc in (summaries[:2], summaries[2:])]
  np.testing.assert_allclose(variants["residual=mhc"]["gap_mean"], np.mean(gaps), rtol=1e-9)
  np.testing.assert_allclose(variants["residual=mhc"]["gap_spread"], np.std(gaps, ddof=1), rtol=1e-9)
  assert variants["residual=plain"]["gap_mean"] == 0.0


def test_each_variant_is_compared_with_the_baseline_that_shares_its_other_arguments():
  runs = [
    {"run": f"size={size},residual={r},seed={seed}", "seed": seed, "final_val_loss": loss + seed,
     "peak_amax_gain": None, "loss_spikes": 0, "grad_norm_spikes": 0}
    for seed in (0, 1)
    for size, r, loss in (("s", "plain", 3.0), ("s", "hc", 2.5), ("l", "plain", 2.0), ("l", "hc", 1.75))
  ]  # fmt: skip
  rows = {r["variant"]: r for r in by_variant(runs, "residual=plain")}
  assert rows["size=s,residual=hc"]["gap_mean"] == -0.5 and rows["size=l,residual=hc"]["gap_mean"] == -0.25
  assert rows["size=l,residual=plain"]["gap_mean"] == 0.0 and rows["size=s,residual=hc"]["gap_spread"] == 0.0


def test_the_curves_show_every_run_past_the_palettes_ten_colours(tmp_path):
  validation = [{"step": step, "val_loss": 3.0 - step / 100, "amax_gain": None} for step in (0, 50, 100)]
  runs = [{"run": f"lr={lr},seed={seed}", "validation": validation} for lr in range(7) for seed in range(3)]
  assert plot_sweep(runs, tmp_path / "curves.png") == 21
  assert (tmp_path / "curves.png").stat().st_size > 1000
  looks = variant_looks([f"layers={n},lr={lr}" for n in range(12) for lr in ("stable", "high")])  # 24 variants
  assert len({(look["color"], look["linestyle"]) for look in looks.values()}) == 24


def test_spikes_count_values_above_a_multiple_of_the_running_median():
  values = [1.0] * 10 + [1.05, 1.2, 1.0, 5.0] + [1.0] * 10
  assert spikes(values, 1.1) == 2 and spikes(values, 2.0) == 1 and spikes(values[:10], 1.1) == 0


def test_the_paper_ablation_studies_are_what_their_docstrings_say():
  """Component ablation: plain and HC / mHC x 3 learned sets, 3 seeds each; depth stress: 12 to
  96 sub-block layers at two learning rates with the spike stops off, 3 seeds at the stable
  rate; scaling: each size's variants see the same tokens, 10 per parameter of the plain model."""
  from manifold.config import load_config, model_config
  from manifold.model.accounting import count_params

  components = sweep_args("experiments/hc_components.py")
  assert len(components) == 21 and len({a.rsplit(",seed=", 1)[0] for a in components}) == 7
  assert load_config("experiments/hc_components.py:residual=hc,mappings=pre+post").model.hc_mappings == "pre,post"
  depth = sweep_args("experiments/depth_stress.py")
  assert len(depth) == 12 * 3 + 12 and {
    load_config(f"experiments/depth_stress.py:{a}").model.n_layers for a in depth
  } == {
    6,
    12,
    24,
    48,
  }
  assert {load_config(f"experiments/depth_stress.py:{a}").train.seed for a in depth if "lr=stable" in a} == {0, 1, 2}
  stress = load_config("experiments/depth_stress.py:residual=hc,layers=96,lr=high").train
  assert (stress.learning_rate, stress.spike_factor, stress.param_norm_factor) == (1e-2, 0.0, 0.0)
  assert sweep_args("experiments/depth_stress.py", "scale=cpu") == depth  # the same depths at either scale
  assert len(sweep_args("experiments/mhc_scaling.py")) == 27  # 3 sizes x 3 residuals x 3 seeds
  for size in ("s", "m", "l"):
    configs = [load_config(f"experiments/mhc_scaling.py:size={size},residual={r}") for r in ("plain", "hc", "mhc")]
    tokens = {c.train.steps * c.train.batch_size * c.train.seq_len for c in configs}
    plain = count_params(model_config(configs[0]))["non_embedding"]
    assert len(tokens) == 1 and 10 * plain <= tokens.pop() < 10 * plain + 64 * 256


def test_run_names_are_filesystem_safe():
  assert run_name("residual=mhc,streams=2") == "residual-mhc-streams-2"


def test_a_rerun_completes_summaries_an_older_manifold_wrote_without_retraining(tiny_sweep, tmp_path):
  """A finished run's summary.json from before spikes, gains and curves were recorded is
  completed from its metrics (device and commit stay unknown); nothing is trained again."""
  from manifold.sweep import run_sweep

  results, _ = tiny_sweep
  runs = tmp_path / "runs"
  shutil.copytree(results.parent / "runs", runs)
  old = runs / "residual-mhc-seed-1" / "summary.json"
  summary = json.loads(old.read_text())
  keep = ("run", "residual", "final_val_loss", "final_val_bits_per_byte", "final_amax_gain", "peak_amax_gain")
  old.write_text(json.dumps({k: summary[k] for k in (*keep, "tokens", "tokens_per_s", "wall_time_s", "command")}))
  rows = run_sweep(str(results.parent / "tiny_sweep.py"), str(runs), str(tmp_path / "results"))
  completed = json.loads(old.read_text())
  assert completed["training"] == summary["training"] and completed["validation"] == summary["validation"]
  assert (completed["device"], completed["commit"], completed["seed"]) == (None, None, 1)
  assert completed["wall_time_s"] == summary["wall_time_s"], "kept, not trained again"
  assert [r["final_val_loss"] for r in rows] == [
    json.loads((runs / run_name(a) / "summary.json").read_text())["final_val_loss"]
    for a in ("residual=plain,seed=0", "residual=mhc,seed=0", "residual=plain,seed=1", "residual=mhc,seed=1")
  ]


def test_tables_alone_tabulate_the_finished_runs_and_train_nothing(tiny_sweep, tmp_path, capsys):
  """`manifold sweep --tables`: the tables from the runs with a summary; an unfinished variant is
  named, left out and not trained."""
  from manifold.cli import main

  results, _ = tiny_sweep
  runs, tables = tmp_path / "runs", tmp_path / "results"
  shutil.copytree(results.parent / "runs", runs)
  shutil.rmtree(runs / "residual-mhc-seed-1")
  args = ["sweep", "--config", str(results.parent / "tiny_sweep.py"), "--workdir", str(runs), "--results", str(tables)]
  assert main([*args, "--tables"]) == 0
  assert "residual=mhc,seed=1: not finished" in capsys.readouterr().out
  assert not (runs / "residual-mhc-seed-1").exists(), "nothing trained"
  rows = {s["run"]: s for s in json.loads((tables / "results.json").read_text())}
  assert rows.keys() == {"residual=plain,seed=0", "residual=mhc,seed=0", "residual=plain,seed=1"}
  variants = {v["variant"]: v for v in json.loads((tables / "by_variant.json").read_text())}
  assert variants["residual=mhc"]["seeds"] == [0] and variants["residual=plain"]["seeds"] == [0, 1]
  shutil.rmtree(runs)
  assert main([*args, "--tables"]) == 2
  assert "no finished run" in error_line(capsys.readouterr().err)


def test_workers_train_the_same_runs_as_one_process(tiny_sweep, corpus_dir, tmp_path, capsys):
  """`manifold sweep --workers 2`: two worker processes, each with its log, train the four
  variants; the tables hold the one-process sweep's final losses."""
  from manifold.cli import main

  results, _ = tiny_sweep
  overrides = data_overrides(corpus_dir, tmp_path / "cache")
  runs, tables = tmp_path / "runs", tmp_path / "results"
  args = ["sweep", "--config", str(results.parent / "tiny_sweep.py"), "--workdir", str(runs), "--results", str(tables)]
  assert main([*args, "--workers", "2", *overrides]) == 0
  assert "| residual=mhc,seed=1 |" in capsys.readouterr().out
  logs = [(runs / f"worker-{i}" / "log.txt").read_text() for i in (0, 1)]
  for arg in sweep_args(str(results.parent / "tiny_sweep.py")):  # each by one worker, whichever claimed it
    assert sum(f":{arg} -> " in log for log in logs) == 1, (arg, [log[-2000:] for log in logs])
  want = {s["run"]: s["final_val_loss"] for s in json.loads((results / "results.json").read_text())}
  got = {s["run"]: s["final_val_loss"] for s in json.loads((tables / "results.json").read_text())}
  assert got.keys() == want.keys()
  np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)


def test_claims_train_first_seeds_then_the_longest_unclaimed_variants(corpus_dir, tmp_path, capsys):
  """`--claims`: a process trains only the variants it claims first in the shared folder, every
  variant's first seed before a second seed (that one compiles nothing new), within a seed the
  most training FLOPs first, and writes no tables; one claimed elsewhere is left to its claimant."""
  from manifold.cli import main

  experiment = tmp_path / "layers.py"
  experiment.write_text(
    TINY_SWEEP.replace('residual="plain", seed=0)', 'residual="plain", seed=0, layers=2)')
    .replace("n_layers=2", "n_layers=args.layers")
    .replace(
      '[f"residual={r},seed={s}" for s in (0, 1) for r in ("plain", "mhc")]',
      '["layers=1", "layers=3", "layers=2", "layers=3,seed=1"]',
    )
  )
  claims, runs = tmp_path / "claims", tmp_path / "runs"
  claims.mkdir()
  (claims / "layers-2").touch()  # another process's
  args = ["sweep", "--config", str(experiment), "--workdir", str(runs), "--claims", str(claims)]
  assert main([*args, *data_overrides(corpus_dir, tmp_path / "cache")]) == 0
  out = capsys.readouterr().out
  trained = [line.split(":", 1)[1].split(" -> ")[0] for line in out.splitlines() if line.startswith("=== ")]
  assert trained == ["layers=3", "layers=1", "layers=3,seed=1"], out[-2000:]
  assert sorted(p.name for p in claims.iterdir()) == ["layers-1", "layers-2", "layers-3", "layers-3-seed-1"]
  assert not (runs / "layers-2").exists() and not (runs / "results.md").exists()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--shard", "2/2"], "--shard '2/2': must be I/K with 0 <= I < K"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--shard", "0/2", "--workers", "2"], "--shard, --claims and --workers: pass one"),
    (["--claims", ".", "--shard", "0/2"], "--shard, --claims and --workers: pass one"),
    (["--workers", "2", "--tables"], "--tables trains nothing: pass it without --shard, --claims and --workers"),
    (["--claims", "no-such-folder"], "--claims no-such-folder: no such folder"),
  ],
)
def test_bad_shard_or_workers_is_one_line(flags, message, tmp_path, capsys):
  from manifold.cli import main

  assert main(["sweep", "--config", "experiments/hc_components.py", "--workdir", str(tmp_path), *flags]) == 2
  assert message in error_line(capsys.readouterr().err)


def test_a_sweep_sent_sigterm_stops_its_workers_and_leaves_none_running(tiny_sweep, corpus_dir, tmp_path):
  """SIGTERM to `manifold sweep --workers 2` (a preempted launcher) stops both workers as Ctrl-C
  would: exit code 130, each worker's run saved, and no worker process left."""
  results, _ = tiny_sweep
  runs = tmp_path / "runs"
  command = [
    sys.executable, "-m", "manifold.cli", "sweep", "--config", str(results.parent / "tiny_sweep.py"),
    "--workdir", str(runs), "--workers", "2", "--config.train.steps=5000",
    *data_overrides(corpus_dir, tmp_path / "cache"),
  ]  # fmt: skip
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")]))}
  launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline, variants = time.monotonic() + 240, sweep_args(str(results.parent / "tiny_sweep.py"))
    while sum(last_step(str(runs / run_name(a))) >= 1 for a in variants) < 2:  # both workers training
      assert launcher.poll() is None and time.monotonic() < deadline, "the workers never started training"
      time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=180) == 130
  finally:
    launcher.kill()
  left = [p for p in pathlib.Path("/proc").glob("[0-9]*") if str(runs) in _cmdline(p)]
  assert not left, [_cmdline(p) for p in left]
  for i in (0, 1):
    assert "stopped during" in (runs / f"worker-{i}" / "log.txt").read_text()  # its run saved, to resume


def _cmdline(proc: pathlib.Path) -> str:
  try:
    return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
  except OSError:  # gone meanwhile
    return ""
