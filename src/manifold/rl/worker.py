"""A rollout worker: samples completions of task prompts with the learner's newest policy, scores
them with the task's verifier, and publishes them to the store as rollout batches.

    manifold rl worker --config experiments/grpo.py --workdir runs/grpo/worker-0 --store file:///shared/grpo --id 0

It waits for the learner's `run/config` and refuses to start if its own config differs in any field
a worker shares with the learner (`manifold.rl.protocol.WORKER_FIELDS`, named in the error), claims
`workers/<id>` with the key in `<workdir>/worker.key`, then loops: read the learner's heartbeat
(newest policy version and its object's hash); fetch that policy if it is not the one held (a
signed, hashed object from the learner's key, checked leaf by leaf against the model); make a batch
if one is wanted, with its commitment (`manifold.rl.commitment.commit`: the top-k log-probs at
positions derived from the batch's hash); publish it as `rollouts/<version>/<id>/<seq>`, with the
policy's hash as parent.

When is a batch wanted: synchronous (rl.max_staleness = 0), while the store holds fewer than
rl.batches_per_step batches for the newest version (the learner's need for its step); asynchronous,
while this worker has fewer than rl.batches_per_step batches waiting in the store, so generation runs
at most a step ahead of the learner. The prompts of a batch are drawn from the train split with a
seed of (train.seed, worker id, version, seq), the samples with a key from the same; the learner
checks the prompts against that seed, so a seq whose key an earlier run left in the store is skipped
and its batch made again with the next one.

It exits when the learner's heartbeat says done; stops with one line when the learner has been
silent for rl.deadline_s; rides out a store that is briefly unreadable; SIGTERM or Ctrl-C ends it
between batches. Each batch also appends a row to `<workdir>/rollouts.jsonl`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from manifold.config import ConfigError, model_config, task_settings, validate
from manifold.data import load_tokenizer
from manifold.parallel import sharding
from manifold.parallel.mesh import make_mesh
from manifold.rl.commitment import commit
from manifold.rl.protocol import (
  KIND_HEARTBEAT,
  KIND_POLICY,
  KIND_ROLLOUT,
  LEARNER_HEARTBEAT,
  RLError,
  RolloutShape,
  claim_worker,
  from_named,
  join_config,
  load_identity,
  open_store,
  parse_rollout_key,
  policy_key,
  rollout_key,
  worker_heartbeat_key,
  write_heartbeat,
)
from manifold.rl.rollout import make_batch, seed_of
from manifold.rl.tasks import get_task
from manifold.store import BadObject, KeyExists, Store, StoreUnavailable, fetch, publish
from manifold.train.state import build_model


class _Stop:
  """SIGTERM / SIGINT -> a flag the loop checks between batches."""

  def __init__(self):
    self.signal: str | None = None
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class Worker:
  def __init__(self, cfg, workdir: str, *, say: Callable[[str], None] = print, store: Store | None = None):
    c = validate(cfg)
    self.cfg, self.c, self.rl = cfg, c, c.rl
    self.id = c.rl.worker
    if self.id < 0:
      raise ConfigError(f"rl.worker={self.id}: give this worker an id >= 0 (--id K)")
    self.workdir, self.say = workdir, say
    os.makedirs(workdir, exist_ok=True)
    self.model_cfg = model_config(cfg)
    self.tokenizer = load_tokenizer(cfg.data.tokenizer)
    self.task = get_task(c.rl.task, **task_settings(c.rl.difficulty))
    self.shape = RolloutShape.of(c)
    self.mesh = make_mesh(cfg.mesh)
    abstract = nnx.eval_shape(lambda: build_model(self.model_cfg, jax.random.key(0)))
    self.graphdef, params, extra = nnx.split(abstract, nnx.Param, ...)
    self.abstract = (nnx.to_pure_dict(params), nnx.to_pure_dict(extra))
    self.shardings = (sharding.state_shardings(params, self.mesh), sharding.state_shardings(extra, self.mesh))
    self.store = store or open_store(c.rl.store)
    self.identity = load_identity(workdir, "worker")
    self.fingerprint, self.learner_key = join_config(
      self.store, cfg, deadline_s=c.rl.deadline_s, poll_s=c.rl.poll_s, say=say
    )
    claim_worker(self.store, self.identity, self.id, self.fingerprint)
    self.held: tuple[int, str] | None = None  # (version, policy hash) of the parameters held
    self.params = None
    self.batches = self.tokens = 0
    self.seq = self._next_seq()  # a restarted worker goes on counting, so it never redraws a batch
    self._lock = threading.Lock()
    self._stop_beats = threading.Event()

  def _next_seq(self) -> int:
    """One past the last batch this worker logged in `<workdir>/rollouts.jsonl` (0 for a new one)."""
    try:
      with open(os.path.join(self.workdir, "rollouts.jsonl")) as f:
        lines = f.read().splitlines()
    except FileNotFoundError:
      return 0
    for line in reversed(lines):
      try:
        return int(json.loads(line)["key"].rsplit("/", 1)[1]) + 1
      except (ValueError, KeyError, IndexError, TypeError):
        continue  # a line cut short by a crash
    return 0

  # -- the store -------------------------------------------------------------------------------

  def _heartbeat(self, done: bool = False) -> None:
    with self._lock:
      meta = {
        "worker": self.id,
        "version": self.held[0] if self.held else -1,
        "batches": self.batches,
        "tokens": self.tokens,
        "done": done,
        "host": socket.gethostname(),
        "pid": os.getpid(),
      }
    write_heartbeat(self.store, worker_heartbeat_key(self.id), self.identity, self.fingerprint, meta)

  def _beat(self) -> None:
    while not self._stop_beats.wait(self.rl.heartbeat_s):
      try:
        self._heartbeat()
      except Exception as e:  # noqa: BLE001 -- a missed beat is not fatal
        self.say(f"heartbeat failed: {' '.join(str(e).split())[:200]}")

  def learner_state(self) -> dict | None:
    """The learner's heartbeat meta (version, policy, done, time), or None if there is none yet."""
    obj = fetch(
      self.store,
      LEARNER_HEARTBEAT,
      kind=KIND_HEARTBEAT,
      config_fingerprint=self.fingerprint,
      trusted_keys=[self.learner_key],
    )
    return None if obj is None else obj.meta

  def load_policy(self, version: int, digest: str) -> bool:
    """Fetches policy `version` (whose object hash must be `digest`) and holds it; False if it is
    gone (the learner has moved on or withdrawn it)."""
    obj = fetch(
      self.store,
      policy_key(version),
      kind=KIND_POLICY,
      config_fingerprint=self.fingerprint,
      trusted_keys=[self.learner_key],
    )
    if obj is None or obj.content_hash != digest:
      return False
    source = f"{self.store.url}{policy_key(version)}"
    params = from_named(obj.arrays, self.abstract[0], "params", source)
    extra = from_named(obj.arrays, self.abstract[1], "extra", source)
    self.params = (jax.device_put(params, self.shardings[0]), jax.device_put(extra, self.shardings[1]))
    with self._lock:
      self.held = (version, digest)
    return True

  def wanted(self, version: int) -> bool:
    """Whether to make a batch for `version` now (see the module docstring)."""
    waiting = [p for p in map(parse_rollout_key, self.store.list("rollouts/")) if p is not None]
    if self.rl.max_staleness == 0:
      return sum(v == version for v, _, _ in waiting) < self.rl.batches_per_step
    return sum(w == self.id for _, w, _ in waiting) < self.rl.batches_per_step

  # -- rollouts --------------------------------------------------------------------------------

  def make(self, version: int, seq: int) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays (with the commitment) and meta of batch `seq` for policy `version`, the one held."""
    rl, tc = self.rl, self.c.train
    held, parent = self.held
    if held != version:
      raise RLError(f"worker {self.id}: asked for a batch of policy version {version} while holding {held}")
    seed = seed_of(tc.seed, self.id, version, seq)
    examples = self.task.prompts("train", seed, rl.prompts_per_step)
    model = nnx.merge(self.graphdef, *self.params)
    began = time.monotonic()
    arrays = make_batch(
      model,
      self.task,
      self.tokenizer,
      examples,
      group_size=rl.group_size,
      max_new_tokens=rl.max_new_tokens,
      temperature=rl.temperature,
      seq_len=tc.seq_len,
      format_weight=rl.format_weight,
      key=jax.random.key(seed % 2**63),
    )
    policy = (self.graphdef, *self.params)
    arrays.update(commit(policy, arrays, parent, count=rl.commit_positions, top_k=rl.commit_top_k))
    meta = {
      "version": version,
      "worker": self.id,
      "seq": seq,
      "seed": seed,
      "prompts": [e.prompt for e in examples],
      "tokens": int(arrays["lengths"].sum()),
      "seconds": round(time.monotonic() - began, 3),
    }
    return arrays, meta

  def publish(self, arrays: dict[str, np.ndarray], meta: dict) -> str | None:
    """Writes the batch as `rollouts/<version>/<id>/<seq>` (meta's); its key, or None if an earlier run
    of this worker left that key (the batch's prompts are drawn with its seq: make one for the next)."""
    version, digest = self.held
    key = rollout_key(version, self.id, meta["seq"])
    try:
      publish(self.store, key, KIND_ROLLOUT, arrays, meta, self.identity, self.fingerprint, parents=[digest])
      return key
    except KeyExists:
      return None

  def run(self) -> int:
    """Makes and publishes batches until the learner is done (0), a signal (130 for SIGINT, else 0)."""
    rl = self.rl
    self._heartbeat()
    beats = threading.Thread(target=self._beat, name=f"worker-{self.id}-heartbeat", daemon=True)
    beats.start()
    heard, beat = time.monotonic(), None  # when the learner's heartbeat last changed, and its time stamp
    told: set[str] = set()

    def once(text: str) -> None:
      if text not in told:
        told.add(text)
        self.say(text)

    self.say(f"worker {self.id} joined {self.store.url}")
    try:
      with _Stop() as stop:
        while not stop.signal:
          try:
            learner = self.learner_state()
            if learner is not None and learner["time"] != beat:  # no clocks compared across machines
              heard, beat = time.monotonic(), learner["time"]
            if learner is not None and learner["done"]:
              self.say(f"the learner is done (policy version {learner['version']}); exiting")
              break
            if time.monotonic() - heard > rl.deadline_s:
              raise RLError(
                f"the learner in {self.store.url} has been silent for {rl.deadline_s:.0f} s; stopping (restart the "
                "learner, then this worker)"
              )
            if learner is None or not learner["policy"]:
              once("waiting for the learner's first policy")
              time.sleep(rl.poll_s)
              continue
            version, digest = learner["version"], learner["policy"]
            if self.held != (version, digest) and not self.load_policy(version, digest):
              time.sleep(rl.poll_s)
              continue
            if not self.wanted(version):
              time.sleep(rl.poll_s)
              continue
            arrays, meta = self.make(version, self.seq)
            key = self.publish(arrays, meta)
            self.seq += 1
            if key is None:
              self.say(
                f"{rollout_key(version, self.id, self.seq - 1)} exists (an earlier run's); moving to the next seq"
              )
              continue
            with self._lock:
              self.batches += 1
              self.tokens += meta["tokens"]
            self._log(key, arrays, meta)
          except StoreUnavailable as e:
            self.say(f"store unavailable ({e}); retrying")
            time.sleep(rl.poll_s)
          except BadObject as e:
            self.say(f"unusable object: {' '.join(str(e).split())[:300]}; retrying")
            time.sleep(rl.poll_s)
        return 130 if stop.signal == "SIGINT" else 0
    finally:
      self._stop_beats.set()
      beats.join(timeout=10)
      try:
        self._heartbeat(done=True)
      except Exception:  # noqa: BLE001 -- leaving anyway
        pass

  def _log(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    row = {
      "key": key,
      "version": meta["version"],
      "tokens": meta["tokens"],
      "seconds": meta["seconds"],
      "reward": float(arrays["rewards"].mean()),
      "accuracy": float(arrays["correct"].mean()),
      "store_retries": self.store.transient_failures,
      "time": time.time(),
    }
    with open(os.path.join(self.workdir, "rollouts.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")
    self.say(
      f"published {key}: reward {row['reward']:.3f}  accuracy {row['accuracy']:.3f}  {meta['tokens']} tokens in "
      f"{meta['seconds']:.1f} s"
    )
