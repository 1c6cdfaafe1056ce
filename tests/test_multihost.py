"""Two local processes of 4 CPU devices each, joined by jax.distributed, train like one process of 8.

The pair runs a hybrid mesh (the data axis split across the two processes as if over DCN,
experts over the 2-device `expert` axis inside each process); the single process runs
the same axes sizes on one flat mesh.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from manifold.serve.server import free_port
from manifold.train.metrics import read_metrics

from .conftest import data_overrides, xla_flags

SCRIPT = pathlib.Path(__file__).with_name("multihost_train.py")


def env(devices: int, **extra) -> dict[str, str]:
  return {
    **os.environ,
    "XLA_FLAGS": xla_flags(devices),
    "JAX_PLATFORMS": "cpu",
    **extra,
  }


def test_two_processes_train_and_checkpoint_like_one(tiny_config, corpus_dir, tmp_path):
  cfg = tiny_config()  # the shared small corpus and a data cache under tmp_path
  overrides = [
    *data_overrides(corpus_dir, cfg.data.cache_dir),
    "--config.model.residual=mhc",
    "--config.model.ffn=moe",
    "--config.train.steps=2",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.sample.max_new_tokens=0",
    "--config.mesh.expert=2",
  ]
  pair, single = tmp_path / "pair", tmp_path / "single"
  port = free_port()
  workers = [
    subprocess.Popen(
      [sys.executable, str(SCRIPT), "train", str(pair), *overrides, "--config.mesh.dcn.data=2"],
      env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in (0, 1)
  ]
  outputs = [w.communicate(timeout=400)[0] for w in workers]
  assert all(w.returncode == 0 for w in workers), outputs[0][-3000:] + outputs[1][-3000:]
  assert "2 process(es), 8 cpu device(s)" in outputs[0], outputs[0][-2000:]  # one job, not two runs
  run = subprocess.run([sys.executable, str(SCRIPT), "train", str(single), *overrides], env=env(8),
                       capture_output=True, text=True, timeout=400)  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  assert "1 process(es), 8 cpu device(s)" in run.stdout + run.stderr

  losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]  # noqa: E731
  assert len(losses(pair)) == 2
  for a, b in zip(losses(pair), losses(single)):
    assert abs(a - b) < 1e-5, (losses(pair), losses(single))

  compare = subprocess.run([sys.executable, str(SCRIPT), "compare", str(pair), str(single)], env=env(1),
                           capture_output=True, text=True, timeout=400)  # fmt: skip
  assert compare.returncode == 0, compare.stderr[-3000:]
  report = json.loads(compare.stdout.strip().splitlines()[-1])
  assert report["step"] == report["other_step"] == 2
  assert report["max_param_diff"] < 1e-5, report
