"""Shared fixtures: a small real-text corpus and tiny configs that train in seconds."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import filelock
import pytest

# The tests compile hundreds of tiny programs, so compilation dominates their time: LLVM's cheap
# passes only (the same operations, so the same numerics; this halves it). Set before any test
# starts XLA; the child processes tests start inherit it (or take it from `xla_flags`).
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE]).strip()

from manifold.config import load_config  # noqa: E402
from manifold.data import stdlib_files  # noqa: E402


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child process with `devices` simulated CPU devices, compiling fast."""
  return " ".join([*FAST_COMPILE, f"--xla_force_host_platform_device_count={devices}"])


REPO = pathlib.Path(__file__).parents[1]

TINY = "experiments/quickstart.py:tiny"


def decode_with_cache(model, tokens_bt, prefill: int, *, jit: bool = False):
  """Logits [B, T, V] from a prefill of `prefill` tokens, then one cached step per token; `jit`
  compiles the calls (the cache index traced: two programs in all) instead of running them eagerly."""
  import jax.numpy as jnp
  from flax import nnx

  call = lambda m, t, c, i: m(t, c, i)  # noqa: E731
  if jit:
    call = nnx.jit(call)
  cache = model.init_cache(tokens_bt.shape[0], tokens_bt.shape[1])
  logits, cache = call(model, tokens_bt[:, :prefill], cache, jnp.int32(0) if jit else 0)
  pieces = [logits]
  for i in range(prefill, tokens_bt.shape[1]):
    logits, cache = call(model, tokens_bt[:, i : i + 1], cache, jnp.int32(i) if jit else i)
    pieces.append(logits)
  return jnp.concatenate(pieces, axis=1)


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """The folder `<session temp>/<name>` after `make(folder)` has run in it once per test session:
  the first xdist worker to ask makes it while the others wait, then all of them share it."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the session's folder, above each worker's own
  root = base / name
  with filelock.FileLock(f"{root}.lock"):
    if not (root / ".made").exists():
      shutil.rmtree(root, ignore_errors=True)
      root.mkdir()
      make(root)
      (root / ".made").touch()
  return root


def error_line(err: str) -> str:
  """The one stderr line of a refused command; fails on anything longer (a traceback)."""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("manifold: error: "), err
  return lines[0]


def child_env(cache: str, devices: int = 1) -> dict[str, str]:
  """The environment of a `manifold` child process: this checkout's sources, the CPU, `devices`
  simulated devices (compiling fast) and the persistent XLA cache `cache`."""
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  if devices > 1:
    env["XLA_FLAGS"] = xla_flags(devices)
  return env


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """A persistent XLA cache the tests' child processes share (from both pytest workers), so each
  program compiles once a session."""
  return str(made_once(tmp_path_factory, "xla_cache", lambda root: None))


@pytest.fixture(scope="session", autouse=True)
def in_process_compile_cache(compile_cache):
  """The tests' own programs (many tests train the same tiny model) share that cache too."""
  import jax

  jax.config.update("jax_compilation_cache_dir", compile_cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


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
    return load_config(TINY, data_overrides(corpus_dir, tmp_path / "cache") + list(overrides))

  return make


@pytest.fixture(scope="session")
def trained_workdir(corpus_dir, tmp_path_factory):
  """A finished 20-step tiny run with checkpoints 10, 15 and 20 (5 retired by keep-N), each with a
  signed manifest (shared by the CLI and provenance tests; treat as read-only)."""
  from manifold.train.loop import train

  def make(root):
    overrides = [*data_overrides(corpus_dir, root / "cache"), "--config.train.checkpoint_every=5"]
    train(load_config(TINY, overrides), str(root / "run"), progress=False)

  return made_once(tmp_path_factory, "trained", make) / "run"


TINY_SWEEP = """
from manifold.config import base_config, parse_arg


BASELINE = "residual=plain"


def get_config(arg=None):
  args = parse_arg(arg, residual="plain", seed=0)
  c = base_config()
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16, d_ff=64, max_seq_len=32,
                 residual=args.residual)
  c.train.update(seed=args.seed, steps=6, batch_size=4, seq_len=32, warmup_steps=1, eval_every=3,
                 checkpoint_every=6, log_every=1)
  c.eval.update(batch_size=4, num_batches=1)
  c.sample.max_new_tokens = 0
  return c


def get_sweep():
  return [f"residual={r},seed={s}" for s in (0, 1) for r in ("plain", "mhc")]
"""


def data_overrides(corpus_dir, cache_dir) -> list[str]:
  """The tests' data: the test corpus, a fifth of it for validation, a token cache of its own."""
  return [
    f"--config.data.sources={corpus_dir}/*.py",
    "--config.data.val_fraction=0.2",
    f"--config.data.cache_dir={cache_dir}",
  ]


@pytest.fixture(scope="session")
def tiny_sweep(corpus_dir, tmp_path_factory):
  """(results dir, the mhc run's directory) of a plain / mhc sweep over seeds 0 and 1."""
  from manifold.sweep import run_sweep

  def make(root):
    experiment = root / "tiny_sweep.py"
    experiment.write_text(TINY_SWEEP)
    run_sweep(str(experiment), str(root / "runs"), str(root / "results"), data_overrides(corpus_dir, root / "cache"))

  root = made_once(tmp_path_factory, "tiny_sweep", make)
  return root / "results", root / "runs" / "residual-mhc-seed-0"


@pytest.fixture(scope="session")
def tiny_islands(corpus_dir, tmp_path_factory):
  """The workdir of a finished two-island `manifold islands` run (experiments/islands.py:tiny)."""

  def make(root):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH", "")]))}
    command = [
      sys.executable, "-m", "manifold.cli", "islands", "--config", "experiments/islands.py:tiny", "--count", "2",
      "--workdir", str(root / "run"), f"--config.data.sources={corpus_dir}/*.py", "--config.data.val_fraction=0.2",
      f"--config.data.cache_dir={root / 'cache'}",
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=True, timeout=600)

  return made_once(tmp_path_factory, "tiny_islands", make) / "run"


@pytest.fixture(scope="session")
def tiny_grpo(tmp_path_factory, compile_cache):
  """(workdir, console output) of a finished `manifold rl local` run of experiments/grpo.py:tiny: a
  learner and two workers, each a process on a 2-device CPU mesh, sharing one XLA cache."""

  def make(root):
    command = [
      sys.executable, "-m", "manifold.cli", "rl", "local", "--config", "experiments/grpo.py:tiny", "--workdir",
      str(root / "run"), "--workers", "2", "--config.rl.max_staleness=2",
    ]  # fmt: skip
    done = subprocess.run(
      command, env=child_env(compile_cache, devices=2), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    (root / "console.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

  root = made_once(tmp_path_factory, "tiny_grpo", make)
  return root / "run", (root / "console.txt").read_text()


@pytest.fixture(scope="session")
def tiny_distill(corpus_dir, tmp_path_factory, compile_cache):
  """(runs, results) of `experiments/distill_table.py --size tiny` on the small corpus: a teacher
  and every student (k = V in its cache), each command a process sharing one XLA cache."""

  def make(root):
    sets = [f"data.sources={corpus_dir}/*.py", "data.val_fraction=0.2", f"data.cache_dir={root / 'cache'}"]
    command = [
      sys.executable, "experiments/distill_table.py", "--size", "tiny", "--runs", str(root / "runs"),
      "--results", str(root / "results"), *(f"--set={s}" for s in sets),
    ]  # fmt: skip
    done = subprocess.run(command, env=child_env(compile_cache), cwd=REPO, capture_output=True, text=True, timeout=900)
    (root / "console.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

  root = made_once(tmp_path_factory, "tiny_distill", make)
  return root / "runs", root / "results"
