"""The RL learner and rollout workers (manifold.rl.{learner,worker,local,protocol}): the update against
on-policy GRPO, real processes end to end and under faults, and one-line refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from manifold import cli
from manifold.config import load_config, task_settings, validate
from manifold.data import load_tokenizer
from manifold.rl import grpo
from manifold.rl.protocol import (
  KIND_ROLLOUT,
  RolloutShape,
  claim_worker,
  publish_config,
  rollout_key,
  rollout_spec,
  shared_config,
)
from manifold.rl.rollout import Sampled, pack, prompt_ids, token_logprobs
from manifold.rl.tasks import get_task
from manifold.store import Identity, Store, config_fingerprint, encode
from manifold.train.metrics import read_metrics
from manifold.train.optimizer import make_optimizer

from .conftest import child_env

TINY = "experiments/grpo.py:tiny"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet(text: str) -> None:
  pass


def rl_command(verb: str, workdir, *args: str) -> list[str]:
  return [sys.executable, "-m", "manifold.cli", "rl", verb, "--config", TINY, "--workdir", str(workdir), *args]


def wait_for(what: str, ok, procs=(), timeout: float = 150) -> None:
  """Polls `ok()` until true; fails naming `what` past `timeout`, or as soon as a process in `procs` exits."""
  deadline = time.monotonic() + timeout
  while not ok():
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f"{what}: {p.args[4]} exited with {p.returncode} first")
    if time.monotonic() > deadline:
      raise AssertionError(f"{what}: not within {timeout} s")
    time.sleep(0.2)


def metric_steps(workdir) -> list[int]:
  return [row["step"] for row in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def stop_all(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  for p in procs:
    try:
      p.wait(timeout=20)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


# ---------------------------------------------------------------------------------------- (1) the update


def test_a_synchronous_update_without_importance_weights_is_the_on_policy_grpo_step(tmp_path):
  from manifold.rl.learner import Learner

  cfg = load_config(
    TINY,
    [
      "--config.rl.max_staleness=0",
      "--config.rl.is_cap=0",
      "--config.rl.updates_per_batch=1",
      "--config.rl.kl_coef=0.05",
      f"--config.rl.store={tmp_path / 'store'}",
    ],
  )
  c = validate(cfg)
  learner = Learner(cfg, str(tmp_path / "learner"), say=quiet)
  task, tokenizer = get_task(c.rl.task, **task_settings(c.rl.difficulty)), load_tokenizer("byte")
  shape = RolloutShape.of(c)

  logprobs = learner._logprobs  # (params, extra, tokens) -> log-probs: inputs here, not what is tested

  def rollout(seed: int) -> dict[str, np.ndarray]:
    """A batch of the task's prompts with random completions, laid out as a worker lays one out, its
    behaviour log-probs those of the learner's current policy, and rewards that vary within groups."""
    rng = np.random.default_rng(seed)
    prompts = [prompt_ids(tokenizer, e.prompt) for e in task.prompts("train", seed, shape.prompts)]
    rows = [p for p in prompts for _ in range(shape.group)]
    lengths = rng.integers(1, shape.max_new_tokens + 1, shape.rows).astype(np.int32)
    new = rng.integers(0, 256, (shape.rows, shape.max_new_tokens)).astype(np.int32)
    tokens, mask, _ = pack(rows, Sampled(new, lengths, np.zeros(new.shape, np.float32)), shape.seq_len)
    behaviour = np.asarray(logprobs(learner.state.params, learner.state.extra, tokens))
    return {
      "tokens": tokens,
      "mask": mask,
      "behaviour_logp": np.where(mask == 1, behaviour, 0.0).astype(np.float32),
      "rewards": rng.integers(0, 2, shape.rows).astype(np.float32),
      "correct": np.zeros(shape.rows, np.uint8),
      "lengths": lengths,
      "groups": np.repeat(np.arange(shape.prompts, dtype=np.int32), shape.group),
    }

  learner.train_on([rollout(1)])  # one step first, so the policy is no longer the KL reference
  batch = rollout(2)
  batch["behaviour_logp"] = np.where(batch["mask"] == 1, batch["behaviour_logp"] - 0.5, 0.0).astype(np.float32)
  params, opt_state = jax.device_get((learner.state.params, learner.state.opt_state))
  extra, (ref_params, ref_extra) = jax.device_get(learner.state.extra), jax.device_get(learner.reference)

  metrics = learner.train_on([batch])
  got = jax.device_get(learner.state.params)

  tokens, mask = batch["tokens"], batch["mask"]
  advantages = grpo.group_advantages(batch["rewards"].reshape(shape.prompts, shape.group)).reshape(-1)
  ref_logp = logprobs(ref_params, ref_extra, tokens)

  @jax.jit
  def on_policy_grads(p):
    def loss(p):
      logp = token_logprobs(learner.spec.merge(p, extra), tokens)
      value, _ = grpo.policy_loss(
        logp, None, ref_logp, None, advantages, mask, clip_low=0.2, clip_high=0.28, kl_coef=0.05, is_cap=None
      )
      return value

    return jax.grad(loss)(p)

  grads = on_policy_grads(params)
  tx = make_optimizer(c.train)
  updates, _ = jax.jit(tx.update)(grads, opt_state, params)
  want = optax.apply_updates(params, updates)
  assert optax.global_norm(grads) > 1e-4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert np.sum([np.abs(a - b).max() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))]) > 1e-4
  assert metrics["ratio"] == pytest.approx(1.0) and metrics["clip_frac"] == 0 and metrics["is_weight"] == 1
  assert metrics["kl"] > 0


@pytest.mark.parametrize(
  "name, settings",
  [("arithmetic", {"digits": 1}), ("arithmetic", {"digits": 3, "ops": 2}), ("sort", {"max_value": 99})],
)
def test_max_prompt_bytes_bounds_the_prompts_tightly(name, settings):
  task = get_task(name, **settings)
  assert max(len(e.prompt.encode()) for e in task.prompts("train", 0, 2000)) == task.max_prompt_bytes()


def test_a_learner_refuses_rows_longer_than_the_window(tmp_path, capsys):
  code = cli.main(["rl", "learner", "--config", TINY, "--workdir", str(tmp_path / "w"), "--store",
                   str(tmp_path / "s"), "--config.rl.max_new_tokens=10"])  # fmt: skip
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("manifold: error: train.seq_len=12: arithmetic prompts take up to 5 tokens, so with "), err
  assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


def test_a_learner_refuses_an_init_from_that_is_no_run(tmp_path, capsys):
  code = cli.main(["rl", "learner", "--config", TINY, "--workdir", str(tmp_path / "w"), "--store",
                   str(tmp_path / "s"), "--init-from", str(tmp_path / "nothing")])  # fmt: skip
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"manifold: error: rl.init_from={tmp_path / 'nothing'}: no `manifold train` run there"), err


def test_experiment_variants_load_and_rl_corpus_writes_warm_up_files(tmp_path, capsys):
  for variant in ("default", "sync", "sft", "tiny"):
    c = validate(load_config(f"experiments/grpo.py:{variant}"))
    assert c.rl.group_size >= 2 and c.model.vocab_size >= 257
  assert validate(load_config("experiments/grpo.py:sync")).rl.max_staleness == 0
  out = tmp_path / "sft"
  assert cli.main(["rl", "corpus", "--config", "experiments/grpo.py:sft", "--out", str(out), "--count", "40"]) == 0
  files = sorted(os.listdir(out))
  assert files == [f"sft-{i:02d}.jsonl" for i in range(10)]
  lines = [json.loads(line)["text"] for f in files for line in (out / f).read_text().splitlines()]
  assert len(lines) == 40 and all(t.endswith("\n") and "=" in t for t in lines)
  assert "manifold train --config experiments/grpo.py:sft" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- (2) end to end


def test_rl_local_with_two_workers_trains_on_their_rollouts_and_logs_it(tiny_grpo):
  """`manifold rl local` starts the learner and both workers, each a process on a 2-device mesh."""
  workdir, out = tiny_grpo
  assert "learner | step 4:" in out and "learner finished" in out
  rows = read_metrics(workdir / "learner" / "metrics.jsonl")
  by_step = {row["step"]: row for row in rows}
  assert sorted(by_step) == [0, 1, 2, 3, 4]
  last = by_step[4]
  for key in (
    "reward",
    "accuracy",
    "kl",
    "clip_frac",
    "is_weight",
    "wait_s",
    "wait_s_total",
    "staleness_mean",
    "staleness/0",
    "staleness/2",
    "tokens/worker-0",
    "tokens/worker-1",
    "heldout_accuracy",
    "batches",
  ):
    assert key in last, key  # fmt: skip
  assert all("heldout_accuracy" in by_step[s] for s in (0, 2, 4))
  # two updates a step (the tiny variant): `old` is the policy before the first, so the mean ratio is not 1
  # (from step 2 on: at step 1 the policy is still the KL reference and every reward 0, so only weight decay moves it)
  assert all(by_step[s]["ratio"] != pytest.approx(1.0, abs=1e-5) for s in (2, 3, 4))
  assert sum(last[f"staleness/{lag}"] for lag in range(3)) == last["batches"] == 8  # 2 batches a step
  assert last["tokens/worker-0"] > 0 and last["tokens/worker-1"] > 0
  assert last["wait_s_total"] == pytest.approx(sum(by_step[s]["wait_s"] for s in (1, 2, 3, 4)), abs=1e-6)
  assert last["rejected"] == 0
  policies = sorted(name for name in os.listdir(workdir / "store" / "policy") if name.isdigit())
  assert policies == [f"{v:08d}" for v in (1, 2, 3, 4)]  # versions 0..4 published, the newest 4 kept
  for k in (0, 1):
    log = (workdir / f"worker-{k}" / "log.txt").read_text()
    assert "published rollouts/" in log and "the learner is done" in log, log[-2000:]
  # the learner's ledger credits both workers' accepted batches, and its signed chain verifies
  from manifold.provenance import ledger
  from manifold.provenance.verify import verify_run

  credit = ledger.totals(ledger.read(str(workdir / "learner")).entries)
  assert len(credit) == 2 and sum(r["accepted"] for r in credit.values()) == 8
  assert all(r["rejected"] == 0 and r["flops"] > 0 for r in credit.values())
  assert verify_run(str(workdir / "learner")).checkpoints >= 1


# ---------------------------------------------------------------------------------------- (3) faults


def planted_rollouts(store: Store, cfg) -> None:
  """Three bad objects for version 0: bytes flipped (corrupt), a wrong schema from a claimed worker,
  and one made under another config."""
  fingerprint = config_fingerprint(shared_config(cfg))
  c = validate(cfg)
  shape = RolloutShape.of(c)
  me = Identity.generate()
  arrays = {name: np.zeros(dims, dtype) for name, (dtype, dims) in rollout_spec(shape).items()}
  meta = {"version": 0, "worker": 5, "seq": 0, "tokens": 0}
  data, _ = encode(KIND_ROLLOUT, rollout_key(0, 5, 0), arrays, meta, identity=me, config_fingerprint=fingerprint)
  flipped = bytearray(data)
  flipped[-10] ^= 0xFF
  store.put(rollout_key(0, 5, 0), bytes(flipped))
  claim_worker(store, me, 6, fingerprint)
  short = {**arrays, "tokens": arrays["tokens"][:, :-1]}
  data, _ = encode(KIND_ROLLOUT, rollout_key(0, 6, 0), short, {**meta, "worker": 6}, identity=me,
                   config_fingerprint=fingerprint)  # fmt: skip
  store.put(rollout_key(0, 6, 0), data)
  data, _ = encode(KIND_ROLLOUT, rollout_key(0, 6, 1), arrays, {**meta, "worker": 6, "seq": 1}, identity=me,
                   config_fingerprint="ab" * 32)  # fmt: skip
  store.put(rollout_key(0, 6, 1), data)


def test_faults_a_killed_worker_bad_objects_a_killed_learner_and_a_store_outage(tmp_path, compile_cache):
  """Synchronous mode, two workers: bad rollout objects are rejected and counted; worker 1 is SIGKILLed
  and the learner goes on with worker 0; the learner is SIGKILLed past its step-2 checkpoint and
  restarted while worker 0 keeps running; the store is unreadable for 3 s; the run still finishes."""
  overrides = ["--config.rl.max_staleness=0", "--config.train.steps=6"]
  store_dir = tmp_path / "store"
  url = f"file://{store_dir}"
  cfg = load_config(TINY, overrides)
  store = Store.open(url)
  planted_rollouts(store, cfg)
  env = child_env(compile_cache, devices=2)  # as tiny_grpo's run, whose compiled programs it reuses
  learner_dir, logs = tmp_path / "learner", tmp_path / "logs"
  logs.mkdir()

  def start(verb: str, name: str, *args: str) -> subprocess.Popen:
    out = open(logs / f"{name}.txt", "a")
    workdir = learner_dir if verb == "learner" else tmp_path / name
    command = rl_command(verb, workdir, "--store", url, *args, *overrides)
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

  def log(name: str) -> str:
    return (logs / f"{name}.txt").read_text()

  procs = []
  try:
    learner = start("learner", "learner")
    workers = [start("worker", f"worker-{k}", "--id", str(k)) for k in (0, 1)]
    procs += [learner, *workers]
    wait_for("worker 1 publishes", lambda: "published rollouts/" in log("worker-1"), procs)
    wait_for("the learner's first step", lambda: 1 in metric_steps(learner_dir), procs)
    workers[1].send_signal(signal.SIGKILL)  # the worker dies wherever it is, mid-batch or between
    workers[1].wait()
    wait_for(
      "step 3, past the step-2 checkpoint",
      lambda: 3 in metric_steps(learner_dir) and (learner_dir / "checkpoints" / "2").is_dir(),
      [learner, workers[0]],
    )
    learner.send_signal(signal.SIGKILL)
    learner.wait()
    assert workers[0].poll() is None  # the worker rides out the learner's absence
    learner = start("learner", "learner")
    procs.append(learner)
    wait_for("the restarted learner resumes", lambda: "resuming from step" in log("learner"), [learner, workers[0]])
    away = tmp_path / "store-away"
    os.rename(store_dir, away)
    store_dir.write_text("the store is away")  # every operation fails: 'Not a directory'
    time.sleep(3)
    store_dir.unlink()
    os.rename(away, store_dir)
    assert learner.wait(timeout=150) == 0, log("learner")[-3000:]
    assert workers[0].wait(timeout=60) == 0, log("worker-0")[-3000:]
  finally:
    stop_all(procs)
  rows = read_metrics(learner_dir / "metrics.jsonl")
  assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5, 6]  # rows past the checkpoint were replaced
  last = rows[-1]
  assert last["rejected/corrupt"] == 1 and last["rejected/schema"] == 1 and last["rejected/fingerprint"] == 1
  assert last["staleness/0"] == last["batches"] == 12  # synchronous: every batch from the current policy
  assert all(row["staleness_max"] == 0 for row in rows[1:])
  # on-policy: the engine's log-probs (the behaviour) and the learner's agree, so the weight is ~1
  assert all(abs(row["is_weight"] - 1) < 1e-3 and row["is_capped_frac"] == 0 for row in rows[1:])
  assert last["tokens/worker-0"] > 0 and last["tokens/worker-1"] > 0
  assert last["store_retries"] > 0  # the restarted learner met the outage, and rode it out
  text = log("learner")
  assert "rejected rollout rollouts/00000000/5/00000000 (corrupt)" in text
  assert "resuming from step" in text and text.count("done: trained to step 6") == 1
  assert "the learner is done" in log("worker-0")


# ---------------------------------------------------------------------------------------- (4) refusals


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.rl.task=chess", "rl.task='chess' is not a known task; choose one of arithmetic, reverse, sort"),
    ("--config.rl.group_size=1", "rl.group_size=1: must be an integer >= 2 (a group of one has no baseline"),
    ("--config.rl.max_staleness=-1", "rl.max_staleness=-1: must be an integer >= 0"),
    ("--config.rl.difficulty=digits=0", "rl.task arithmetic: digits=0 must be an integer in [1, 18]"),
  ],
)
@pytest.mark.parametrize("verb", ["learner", "worker", "local"])
def test_bad_settings_are_refused_in_one_line(tmp_path, capsys, override, message, verb):
  extra = {"learner": ["--store", str(tmp_path / "s")], "worker": ["--store", str(tmp_path / "s"), "--id", "0"],
           "local": ["--workers", "2"]}[verb]  # fmt: skip
  code = cli.main(["rl", verb, "--config", TINY, "--workdir", str(tmp_path / "w"), *extra, override])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith(f"manifold: error: {message}") and err.count("\n") == 1, err
  assert not (tmp_path / "s").exists()


def test_a_worker_whose_model_differs_from_the_learners_is_refused_naming_the_field(tmp_path, capsys):
  store = Store.open(tmp_path / "store")
  publish_config(store, Identity.generate(), load_config(TINY))  # what a learner writes first
  code = cli.main(["rl", "worker", "--config", TINY, "--workdir", str(tmp_path / "w"), "--store",
                   str(tmp_path / "store"), "--id", "0", "--config.model.d_model=48"])  # fmt: skip
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith("manifold: error: model.d_model=48: the learner in file://") and "has 32" in err, err
  assert "refusing to start" in err
  assert store.list("workers/") == []  # it claimed nothing
