"""Shared fixtures: a small real-text corpus and tiny configs that train in seconds."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from manifold.config import load_config
from manifold.data import stdlib_files

REPO = pathlib.Path(__file__).parents[1]

TINY = "experiments/quickstart.py:tiny"


def decode_with_cache(model, tokens_bt, prefill: int):
  """Logits [B, T, V] from a prefill of `prefill` tokens, then one cached step per token."""
  import jax.numpy as jnp

  cache = model.init_cache(tokens_bt.shape[0], tokens_bt.shape[1])
  logits, cache = model(tokens_bt[:, :prefill], cache, 0)
  pieces = [logits]
  for i in range(prefill, tokens_bt.shape[1]):
    logits, cache = model(tokens_bt[:, i : i + 1], cache, i)
    pieces.append(logits)
  return jnp.concatenate(pieces, axis=1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """40 standard-library modules (real Python text, ~0.5 MB) copied into a temp dir."""
  root = tmp_path_factory.mktemp("corpus")
  files = [f for f in stdlib_files() if 2_000 < os.path.getsize(f.path) < 40_000][:40]
  for i, f in enumerate(files):
    shutil.copy(f.path, root / f"m{i:02d}.py")
  return root


@pytest.fixture
def tiny_config(corpus_dir, tmp_path):
  """`tiny_config(*overrides)` -> the quickstart:tiny config on the small corpus."""

  def make(*overrides: str):
    base = [
      f"--config.data.sources={corpus_dir}/*.py",
      "--config.data.val_fraction=0.2",
      f"--config.data.cache_dir={tmp_path / 'cache'}",
    ]
    return load_config(TINY, base + list(overrides))

  return make


@pytest.fixture(scope="session")
def trained_workdir(corpus_dir, tmp_path_factory):
  """A finished 20-step tiny run (shared by the CLI tests; treat as read-only)."""
  from manifold.train.loop import train

  root = tmp_path_factory.mktemp("trained")
  cfg = load_config(
    TINY,
    [
      f"--config.data.sources={corpus_dir}/*.py",
      "--config.data.val_fraction=0.2",
      f"--config.data.cache_dir={root / 'cache'}",
    ],
  )
  train(cfg, str(root / "run"), progress=False)
  return root / "run"


TINY_SWEEP = """
from manifold.config import base_config, parse_arg


def get_config(arg=None):
  args = parse_arg(arg, residual="plain")
  c = base_config()
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=32,
                 residual=args.residual)
  c.train.update(steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3, checkpoint_every=6, log_every=3)
  c.eval.update(batch_size=4, num_batches=1)
  c.sample.max_new_tokens = 0
  return c


def get_sweep():
  return ["residual=plain", "residual=mhc"]
"""


@pytest.fixture(scope="session")
def tiny_sweep(corpus_dir, tmp_path_factory):
  """(results dir, the mhc run's directory) of a two-run plain / mhc sweep."""
  from manifold.sweep import run_sweep

  root = tmp_path_factory.mktemp("sweep")
  experiment = root / "tiny_sweep.py"
  experiment.write_text(TINY_SWEEP)
  overrides = [
    f"--config.data.sources={corpus_dir}/*.py",
    "--config.data.val_fraction=0.2",
    f"--config.data.cache_dir={root / 'cache'}",
  ]
  run_sweep(str(experiment), str(root / "runs"), str(root / "results"), overrides)
  return root / "results", root / "runs" / "residual-mhc"


@pytest.fixture(scope="session")
def tiny_islands(corpus_dir, tmp_path_factory):
  """The workdir of a finished two-island `manifold islands` run (experiments/islands.py:tiny)."""
  root = tmp_path_factory.mktemp("islands")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH", "")]))}
  command = [
    sys.executable, "-m", "manifold.cli", "islands", "--config", "experiments/islands.py:tiny", "--count", "2",
    "--workdir", str(root / "run"), f"--config.data.sources={corpus_dir}/*.py", "--config.data.val_fraction=0.2",
    f"--config.data.cache_dir={root / 'cache'}",
  ]  # fmt: skip
  subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True, timeout=600)
  return root / "run"
