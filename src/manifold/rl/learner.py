"""The GRPO learner: trains the policy on rollout batches that workers publish to the store.

    manifold rl learner --config experiments/grpo.py --workdir runs/grpo/learner --store file:///shared/grpo

One step: take `rl.batches_per_step` rollout batches from `rollouts/` (oldest policy version first),
each at most `rl.max_staleness` versions behind this learner and made from the very policy object it
published under that version; compute group advantages, the reference policy's log-probs (the KL
term) and, with `rl.updates_per_batch > 1`, the log-probs of the current policy (`old`); take the
optimizer update(s) of `manifold.rl.grpo.policy_loss`; publish the new policy as `policy/<step>`.
With one update per batch `old` is the current policy itself (ratio 1); the sampling policy's own
log-probs (`behaviour_logp`, possibly some versions behind) enter through the importance weight
min(exp(old - behaviour), rl.is_cap).

The policy starts from `rl.init_from` (the newest checkpoint of a `manifold train` run, e.g. an SFT
warm-up) or a fresh initialisation (train.seed); the KL reference is that initial policy (or
`rl.reference`), frozen. The learner checkpoints with orbax like `manifold train` (with its counters:
staleness histogram, tokens per worker, time waited, dropped and rejected batches, the content
hashes of its recent policies); killed and restarted with the same --workdir it resumes from its
newest checkpoint, withdraws the policy versions it had published past it, re-publishes its own
(byte for byte the same object when the parameters are the same), and drops rollouts made from the
withdrawn ones. Metrics go to `<workdir>/metrics.jsonl` and TensorBoard, one row per step.

Workers are not trusted: every batch that passes the store's checks and `check_rollout` is judged by
`manifold.rl.commitment.Verifier` (copies, prompts, rewards, commitment positions, and for a share
rl.verify_fraction a recomputation under the claimed policy version). The parameters of that version:
the training state's for the current one; for older ones (up to rl.max_staleness behind), the host
copy kept when it was published ((rl.max_staleness + 1) x the parameters' bytes of host memory, and
one device copy of an older version at a time), or after a restart the learner's own
`policy/<version>` object while the store keeps it (rl.keep_policies); a batch whose version is in
neither is dropped as "unverifiable".
Every batch judged is recorded in the learner's contribution ledger (`manifold.provenance.ledger`,
`<workdir>/ledger.jsonl`, mirrored to the store): kind "rollout", the worker's key, the object's hash,
its generated tokens, its generation FLOPs (`commitment.generation_flops`), the verdict, the reason
(a `rejected/<reason>` counter's name, or "stale" / "lineage" / "unverifiable" for batches dropped
without a judgment of honesty: recorded as rejected, earning no credit either) and the check's numbers;
an accepted batch's entry also holds the Merkle roots of its prompts and rollouts (`detail.data`, their
leaves kept under `provenance/leaves/`: `manifold.provenance.data_roots`).
A batch whose object cannot be read or verified (corrupt, unsigned, another run's) names no
contributor and is only counted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import time
from typing import Callable

import jax
import numpy as np
import optax

from manifold.config import ConfigError, model_config, task_settings, validate
from manifold.data import load_tokenizer
from manifold.parallel import sharding
from manifold.parallel.mesh import make_mesh
from manifold.provenance import ledger
from manifold.provenance.data_roots import write_leaves
from manifold.rl import grpo
from manifold.rl.commitment import Verdict, Verifier, generation_flops
from manifold.rl.protocol import (
  KIND_CLAIM,
  KIND_HEARTBEAT,
  KIND_POLICY,
  KIND_ROLLOUT,
  LEARNER_HEARTBEAT,
  BadRollout,
  RLError,
  RolloutShape,
  arrays_digest,
  check_rollout,
  claim_key,
  from_named,
  load_identity,
  named_arrays,
  open_store,
  parse_rollout_key,
  policy_key,
  publish_config,
  version_of_policy_key,
  write_heartbeat,
)
from manifold.rl.rollout import documents, greedy_accuracy, token_logprobs
from manifold.rl.tasks import get_task
from manifold.schema import differences
from manifold.store import (
  BadObject,
  CorruptObject,
  RejectedObject,
  Store,
  StoredObject,
  StoreUnavailable,
  encode,
  fetch,
)
from manifold.train.checkpoint import Checkpointer
from manifold.train.metrics import MetricsWriter
from manifold.train.optimizer import learning_rate_schedule, make_optimizer
from manifold.train.run import record_run, resume_changes, tensorboard_dir, with_absolute_paths
from manifold.train.state import TrainState, make_state_spec

REJECT_REASONS = {
  "config fingerprint": "fingerprint",
  "producer": "producer",
  "kind": "kind",
  "name": "name",
}


_group_advantages = jax.jit(grpo.group_advantages)


def _train_cfg_for_updates(tc, updates: int):
  """train.* with steps and warmup counted in optimizer updates (`updates` per learner step)."""
  return dataclasses.replace(tc, steps=tc.steps * updates, warmup_steps=tc.warmup_steps * updates)


@dataclasses.dataclass
class Counters:
  """What the learner has seen so far (saved with each checkpoint)."""

  wait_s: float = 0.0
  batches: int = 0
  tokens_per_worker: dict[str, int] = dataclasses.field(default_factory=dict)
  staleness: dict[str, int] = dataclasses.field(default_factory=dict)  # version lag -> accepted batches
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # stale | lineage | unverifiable
  rejected: dict[str, int] = dataclasses.field(default_factory=dict)  # corrupt | schema | ... | commitment | ...
  policy_hashes: dict[str, str] = dataclasses.field(default_factory=dict)  # version -> policy object hash
  verified: int = 0  # batches recomputed under their policy version
  verify_s: float = 0.0  # seconds spent judging batches
  init_step: int = -1  # the step of rl.init_from the policy started from (-1: fresh)
  reference_step: int = -1  # likewise for rl.reference

  @classmethod
  def load(cls, d: dict) -> Counters:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def bump(self, table: str, key, n: int = 1) -> None:
    d = getattr(self, table)
    d[str(key)] = d.get(str(key), 0) + n


def _load_run_params(flag: str, workdir: str, model_cfg, step: int | None, say):
  """(params, extra, step) of the run in `workdir` at `step` (None: its newest checkpoint); a
  ConfigError if its model differs from `model_cfg`."""
  from manifold import files
  from manifold.train.restore import load_trained

  if files.read_text(files.path(workdir) / "config.json") is None:
    raise ConfigError(f"{flag}={workdir}: no `manifold train` run there (no config.json); train one first")
  try:
    run = load_trained(workdir, step, data=False, say=say)
  except ConfigError as e:
    raise ConfigError(f"{flag}={workdir}: {e}") from None
  theirs = model_config(run.cfg)
  for dotted, old, new, _ in differences(theirs, model_cfg):
    raise ConfigError(
      f"{flag}={workdir}: that run has {dotted}={old!r}, this config {new!r}; the policy must be the same model"
    )
  return run.state.params, run.state.extra, run.step


class Learner:
  """Set up by the constructor (every check before anything is written); `run` trains."""

  def __init__(self, cfg, workdir: str, *, say: Callable[[str], None] = print, store: Store | None = None):
    cfg = with_absolute_paths(cfg)
    c = validate(cfg)
    self.cfg, self.c, self.rl, self.tc = cfg, c, c.rl, c.train
    self.workdir, self.say = workdir, say
    rl, tc = self.rl, self.tc
    self.model_cfg = model_config(cfg)
    self.mesh = make_mesh(cfg.mesh)
    self.tokenizer = load_tokenizer(cfg.data.tokenizer)
    if self.model_cfg.vocab_size < self.tokenizer.vocab_size:
      raise ConfigError(f"model.vocab_size={self.model_cfg.vocab_size}: must be >= the tokenizer's ids")
    self.task = get_task(rl.task, **task_settings(rl.difficulty))
    self.heldout = self.task.prompts("heldout", tc.seed, rl.heldout_size)
    longest = 1 + self.task.max_prompt_bytes()  # end-of-text, then at most a token per byte
    if longest + rl.max_new_tokens > tc.seq_len + 1:
      raise ConfigError(
        f"train.seq_len={tc.seq_len}: {rl.task} prompts take up to {longest} tokens, so with rl.max_new_tokens="
        f"{rl.max_new_tokens} a rollout row needs train.seq_len >= {longest + rl.max_new_tokens - 1}"
      )
    if longest + rl.max_new_tokens > self.model_cfg.max_seq_len:
      raise ConfigError(
        f"rl.max_new_tokens={rl.max_new_tokens}: with {rl.task} prompts of up to {longest} tokens it exceeds "
        f"model.max_seq_len={self.model_cfg.max_seq_len}"
      )
    self.shape = RolloutShape.of(c)
    if rl.commit_top_k > self.model_cfg.vocab_size:
      raise ConfigError(f"rl.commit_top_k={rl.commit_top_k}: must be <= model.vocab_size={self.model_cfg.vocab_size}")
    rows = rl.batches_per_step * self.shape.rows
    ways = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
    if rows % ways:
      raise ConfigError(
        f"rl.batches_per_step x rl.prompts_per_step x rl.group_size = {rows} rows must split over data x fsdp x "
        f"expert = {ways} devices"
      )
    changes = resume_changes(cfg, workdir)
    tx = make_optimizer(_train_cfg_for_updates(tc, rl.updates_per_batch))
    self.schedule = learning_rate_schedule(_train_cfg_for_updates(tc, rl.updates_per_batch))
    self.spec = spec = make_state_spec(self.model_cfg, tx, self.mesh)
    reader = Checkpointer(workdir, keep=tc.keep_checkpoints, create=False)
    try:
      restored = reader.restore_newest(spec.abstract)
    finally:
      reader.close()
    if restored is not None:
      self.start, self.state = restored.step, restored.state
      self.counters = Counters.load(restored.data)
    else:
      self.start, self.counters = 0, Counters()
      self.state = self._initial_state(tx)
    self.reference = self._reference() if rl.kl_coef > 0 else None
    self.store = store or open_store(rl.store)
    record_run(cfg, workdir, step=self.start, changes=changes)  # every check has passed
    self.identity = load_identity(workdir, "learner")
    self.fingerprint = publish_config(self.store, self.identity, cfg)
    self.checkpointer = Checkpointer(workdir, keep=tc.keep_checkpoints, lineage=self._lineage(restored))
    for step, why in (restored.skipped if restored else {}).items():
      where = self.checkpointer.set_aside(step)
      say(
        f"checkpoint {step} does not restore ({why}); resuming from step {self.start}; moved it, unchanged, to {where}"
      )
    self.writer = MetricsWriter(
      workdir, resume_step=self.start, say=say, tensorboard_dir=tensorboard_dir(workdir, cfg.data.cache_dir)
    )
    self.version = self.start
    self.published: tuple[int, str] = (self.start, "")  # the newest policy out: version, object hash
    self.worker_keys: dict[int, str] = {}
    self._consumed: list[str] = []  # keys of the rollouts taken for the step in progress
    self.ledger = ledger.Ledger.open(workdir, self.identity, store=self.store, fingerprint=self.fingerprint, say=say)
    entries = map(json.loads, ledger.read_lines(workdir) or [])  # verified by `open`
    accepted = [
      e["detail"].get("fingerprint") for e in entries if e["kind"] == "rollout" and e["verdict"] == "accepted"
    ]
    self.verifier = Verifier(c, spec.graphdef, task=self.task, tokenizer=self.tokenizer, seen=filter(None, accepted))
    self._policies: dict[int, dict[str, np.ndarray]] = {}  # version -> host arrays of the versions still usable
    self._device_policy: tuple[int, tuple] | None = None  # (version, (params, extra)) of an older version
    self._logprobs, self._update = self._compile(tx)
    self._lock = threading.Lock()
    self._stop_beats = threading.Event()
    self._beats: threading.Thread | None = None
    self._done = False
    self._stop = None  # the stop request (SIGTERM / SIGINT) while `run` runs

  # -- set-up ----------------------------------------------------------------------------------

  def _lineage(self, restored):
    """The signer of the learner's checkpoint manifests (None with provenance.enabled=false); the
    chain begins at rl.init_from's checkpoint, or at the seeded initialisation."""
    if not self.c.provenance.enabled:
      return None
    from manifold.provenance.lineage import Lineage, newest_manifest

    origin = {"kind": "init", "seed": self.tc.seed}
    if self.rl.init_from:
      step = self.counters.init_step
      origin = {"kind": "run", "workdir": self.rl.init_from, "step": step,
                "manifest": newest_manifest(self.rl.init_from, step)}  # fmt: skip
    lineage = Lineage(self.workdir, self.identity, origin=origin, say=self.say)
    lineage.resume(self.start if restored is not None else None, self.state)
    return lineage

  def _initial_state(self, tx) -> TrainState:
    if not self.rl.init_from:
      return self.spec.init(jax.random.key(self.tc.seed))
    params, extra, step = _load_run_params("rl.init_from", self.rl.init_from, self.model_cfg, None, self.say)
    self.counters.init_step = step
    params = jax.device_put(params, self.spec.shardings.params)
    extra = jax.device_put(extra, self.spec.shardings.extra)
    opt_state = jax.jit(tx.init, out_shardings=self.spec.shardings.opt_state)(params)
    zero = jax.device_put(np.zeros((), np.int32), self.spec.shardings.step)
    self.say(f"policy and reference start from {self.rl.init_from} (step {step})")
    return TrainState(step=zero, params=params, extra=extra, opt_state=opt_state)

  def _reference(self):
    """(params, extra) of the frozen KL reference."""
    rl, counters = self.rl, self.counters
    if rl.reference:
      step = counters.reference_step if counters.reference_step >= 0 else None
      params, extra, counters.reference_step = _load_run_params(
        "rl.reference", rl.reference, self.model_cfg, step, self.say
      )
    elif rl.init_from:
      step = counters.init_step if counters.init_step >= 0 else None
      params, extra, counters.init_step = _load_run_params("rl.init_from", rl.init_from, self.model_cfg, step, self.say)
    else:
      fresh = self.spec.init(jax.random.key(self.tc.seed))
      params, extra = fresh.params, fresh.extra
    return jax.device_put(params, self.spec.shardings.params), jax.device_put(extra, self.spec.shardings.extra)

  def _compile(self, tx):
    spec, mesh, rl = self.spec, self.mesh, self.rl
    rows = sharding.batch_sharding(mesh)

    def logprobs(params, extra, tokens):
      return token_logprobs(spec.merge(params, extra), tokens)

    def update(state: TrainState, batch: dict):
      def loss_fn(params):
        logp = token_logprobs(spec.merge(params, state.extra), batch["tokens"])
        return grpo.policy_loss(
          logp,
          batch.get("old_logp"),
          batch.get("ref_logp"),
          batch["behaviour_logp"],
          batch["advantages"],
          batch["mask"],
          clip_low=rl.clip_low,
          clip_high=rl.clip_high,
          kl_coef=rl.kl_coef,
          is_cap=rl.is_cap or None,
          aggregation=rl.aggregation,
        )

      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {
        **metrics,
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
      }
      return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    logprobs_jit = sharding.jit_on_mesh(
      logprobs, mesh, in_shardings=(spec.shardings.params, spec.shardings.extra, rows), out_shardings=rows
    )
    update_jit = sharding.jit_on_mesh(
      update,
      mesh,
      in_shardings=(spec.shardings, rows),
      out_shardings=(spec.shardings, sharding.replicated(mesh)),
      donate_argnums=0,
    )
    return logprobs_jit, update_jit

  # -- training --------------------------------------------------------------------------------

  def batch_of(self, rollouts: list[dict[str, np.ndarray]]) -> dict[str, jax.Array]:
    """The device batch of some rollout batches' arrays: tokens, mask, behaviour log-probs, group
    advantages, and the reference's (and, with several updates, the current policy's) log-probs."""
    p, g = self.shape.prompts, self.shape.group
    host = {k: np.concatenate([r[k] for r in rollouts]) for k in ("tokens", "mask", "behaviour_logp")}
    host["advantages"] = np.concatenate(
      [np.asarray(_group_advantages(r["rewards"].reshape(p, g))).reshape(-1) for r in rollouts]
    ).astype(np.float32)
    batch = jax.device_put(host, sharding.batch_sharding(self.mesh))
    if self.reference is not None:
      batch["ref_logp"] = self._logprobs(*self.reference, batch["tokens"])
    if self.rl.updates_per_batch > 1:
      batch["old_logp"] = self._logprobs(self.state.params, self.state.extra, batch["tokens"])
    return batch

  def train_on(self, rollouts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """`rl.updates_per_batch` optimizer updates on these rollout batches' arrays; their metrics
    (means over the updates) with the rollouts' reward, accuracy and completion length."""
    batch = self.batch_of(rollouts)
    history = []
    for _ in range(self.rl.updates_per_batch):
      self.state, metrics = self._update(self.state, batch)
      history.append(metrics)
    history = jax.device_get(history)
    values = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
    values["clip_frac"] = values["clip_low_frac"] + values["clip_high_frac"]
    rewards = np.concatenate([r["rewards"] for r in rollouts])
    values.update(
      reward=float(rewards.mean()),
      reward_std=float(rewards.std()),
      accuracy=float(np.concatenate([r["correct"] for r in rollouts]).mean()),
      completion_tokens=float(np.concatenate([r["lengths"] for r in rollouts]).mean()),
    )
    return values

  def heldout_accuracy(self) -> float:
    model = self.spec.merge(self.state.params, self.state.extra)
    return greedy_accuracy(model, self.task, self.tokenizer, self.heldout, max_new_tokens=self.rl.max_new_tokens)

  # -- the store -------------------------------------------------------------------------------

  def _retrying(self, what: str, fn):
    """`fn()`, retried while the store is unavailable, up to rl.deadline_s."""
    began = time.monotonic()
    while True:
      try:
        return fn()
      except StoreUnavailable as e:
        if time.monotonic() - began > self.rl.deadline_s:
          raise RLError(f"{what}: the store stayed unavailable for {self.rl.deadline_s:.0f} s: {e}") from None
        self.say(f"{what}: store unavailable ({e}); retrying")
        time.sleep(self.rl.poll_s)

  def publish_policy(self, *, resumed: bool = False) -> str:
    """Publishes the current parameters as `policy/<version>` (written once; the same bytes again
    after a restart from the same state), prunes old versions (and, `resumed`, versions past this
    one from before the restart), and beats. Returns the object's content hash."""
    v = self.version
    arrays = {**named_arrays(self.state.params, "params"), **named_arrays(self.state.extra, "extra")}
    meta = {"version": v, "params_sha256": arrays_digest(arrays)}
    key = policy_key(v)
    data, digest = encode(KIND_POLICY, key, arrays, meta, identity=self.identity, config_fingerprint=self.fingerprint)

    def write():
      if resumed:  # a restart withdraws the versions it had published past this one
        for k in self.store.list("policy/"):
          if (version_of_policy_key(k) or 0) > v:
            self.store.delete(k)
      while not self.store.put_new(key, data):
        if self.store.get(key) == data:
          break
        self.say(f"{key}: replacing a policy of another lineage (from before a restart)")
        self.store.delete(key)
      for k in self.store.list("policy/"):
        kv = version_of_policy_key(k)
        if kv is not None and kv <= v - self.rl.keep_policies:
          self.store.delete(k)

    self._retrying(f"publish {key}", write)
    self._policies[v] = arrays
    for old in [k for k in self._policies if k < v - self.rl.max_staleness]:
      del self._policies[old]
    hashes = self.counters.policy_hashes
    hashes[str(v)] = digest
    for old in [k for k in hashes if int(k) < v - self.rl.max_staleness]:
      del hashes[old]
    with self._lock:
      self.published = (v, digest)
    self._retrying("heartbeat", self._heartbeat)
    return digest

  def _heartbeat(self) -> None:
    with self._lock:
      meta = {
        "version": self.published[0],
        "policy": self.published[1],
        "done": self._done,
        "steps": self.tc.steps,
        "host": socket.gethostname(),
        "pid": os.getpid(),
      }
      write_heartbeat(self.store, LEARNER_HEARTBEAT, self.identity, self.fingerprint, meta)

  def _beat(self) -> None:
    while not self._stop_beats.wait(self.rl.heartbeat_s):
      try:
        self._heartbeat()
      except Exception as e:  # noqa: BLE001 -- a missed beat is not fatal; the main loop sees lasting trouble
        self.say(f"heartbeat failed: {' '.join(str(e).split())[:200]}")

  def _worker_key(self, worker: int) -> str | None:
    if worker not in self.worker_keys:
      obj = fetch(self.store, claim_key(worker), kind=KIND_CLAIM, config_fingerprint=self.fingerprint)
      if obj is None:
        return None
      self.worker_keys[worker] = obj.producer
    return self.worker_keys[worker]

  def live_workers(self) -> list[int]:
    """Workers whose heartbeat is younger than 5 x rl.heartbeat_s."""
    live = []
    for key in self.store.list("heartbeats/worker-"):
      worker = key.rsplit("-", 1)[-1]
      if not worker.isdigit() or (trusted := self._worker_key(int(worker))) is None:
        continue
      try:
        obj = fetch(self.store, key, kind=KIND_HEARTBEAT, config_fingerprint=self.fingerprint, trusted_keys=[trusted])
      except BadObject:
        continue
      if obj is not None and not obj.meta.get("done") and time.time() - obj.meta["time"] < 5 * self.rl.heartbeat_s:
        live.append(int(worker))
    return sorted(live)

  def _take(self, key: str, version: int, worker: int, seq: int) -> StoredObject | None:
    """The rollout under `key` if this step may train on it, else None; either way it is counted
    (but for a key that vanished) and, if its signer is known, recorded in the ledger; one it may not
    train on is deleted."""
    rl, counters = self.rl, self.counters
    obj = None
    where = {"version": version, "worker": worker, "seq": seq, "key": key}
    try:
      obj = fetch(self.store, key, kind=KIND_ROLLOUT, config_fingerprint=self.fingerprint)
      if obj is None:
        return None
      if obj.producer != self._worker_key(worker):
        raise RejectedObject(
          f"{self.store.url}{key}", "producer", f"not signed by the key that claimed workers/{worker}"
        )
      check_rollout(obj, self.shape, version=version, worker=worker, seq=seq, source=f"{self.store.url}{key}")
    except BadObject as e:
      reason = (
        "schema"
        if isinstance(e, BadRollout)
        else "corrupt"
        if isinstance(e, CorruptObject)
        else REJECT_REASONS.get(getattr(e, "reason", ""), "other")
      )
      counters.bump("rejected", reason)
      message = " ".join(str(e).split())[:300]
      self.say(f"rejected rollout {key} ({reason}): {message}")
      if obj is not None:  # signed, but not by worker's key or not a rollout batch: no tokens to credit
        self._record(obj, reason, {**where, "message": message}, tokens=0, flops=0.0)
      self.store.delete(key)
      return None
    lag = self.version - version
    if 0 <= version <= self.version and lag > rl.max_staleness:
      dropped = "stale"
    elif version > self.version or obj.parents != [counters.policy_hashes.get(str(version))]:
      dropped = "lineage"  # made from a policy this learner no longer stands behind
    else:
      began = time.monotonic()
      verdict = self.verifier.judge(obj, version=version, worker=worker, seq=seq, policy=lambda: self._policy(version))
      counters.verify_s += time.monotonic() - began
      counters.verified += bool(verdict.detail.get("verified"))
      if verdict.ok:
        counters.bump("tokens_per_worker", worker, int(obj.meta["tokens"]))
        counters.bump("staleness", lag)
        self.verifier.seen.add(verdict.fingerprint)
        prompts, rollouts = documents(self.tokenizer, obj.arrays["tokens"], obj.arrays["mask"])
        data = {"prompts": write_leaves(self.workdir, prompts), "rollouts": write_leaves(self.workdir, rollouts)}
        self._record(obj, "", {**where, **verdict.detail, "data": data})
        self._consumed.append(key)  # deleted once the next policy is out (see `release`)
        return obj
      self._judged_bad(key, obj, verdict, where)
      return None
    counters.bump("tokens_per_worker", worker, int(obj.meta["tokens"]))
    counters.bump("dropped", dropped)
    self._record(obj, dropped, {**where, "message": f"policy version {version}, the learner's {self.version}"})
    self.store.delete(key)
    return None

  def _judged_bad(self, key: str, obj: StoredObject, verdict: Verdict, where: dict) -> None:
    """Counts, reports, records and deletes a batch the verifier did not accept."""
    if verdict.reason == "unverifiable":  # not the worker's doing: dropped, like a stale batch
      self.counters.bump("dropped", verdict.reason)
    else:
      self.counters.bump("rejected", verdict.reason)
    self.say(f"rejected rollout {key} ({verdict.reason}): {verdict.message}")
    self._record(obj, verdict.reason, {**where, **verdict.detail, "message": verdict.message})
    self.store.delete(key)

  def _record(self, obj: StoredObject, reason: str, detail: dict, **work) -> None:
    """A ledger entry for the batch `obj` ("" reason: accepted): by default its claimed tokens and
    generation FLOPs (credited only when accepted)."""
    if not work:
      a = obj.arrays
      work = {"tokens": int(a["lengths"].sum()), "flops": generation_flops(self.model_cfg, a["mask"], a["lengths"])}
    self.ledger.record(
      "rollout",
      contributor=obj.producer,
      object_hash=obj.content_hash,
      verdict="rejected" if reason else "accepted",
      reason=reason,
      detail=detail,
      **work,
    )

  def _policy(self, version: int):
    """(params, extra) of policy `version` (None if neither this learner nor the store has them)."""
    if version == self.version:
      return self.state.params, self.state.extra
    if self._device_policy is not None and self._device_policy[0] == version:
      return self._device_policy[1]
    arrays = self._policies.get(version)
    source = f"{self.store.url}{policy_key(version)}"
    try:
      if arrays is None:
        obj = self._retrying(
          f"fetch {policy_key(version)}",
          lambda: fetch(self.store, policy_key(version), kind=KIND_POLICY, config_fingerprint=self.fingerprint,
                        trusted_keys=[self.identity.public_key]),
        )  # fmt: skip
        if obj is None or obj.content_hash != self.counters.policy_hashes.get(str(version)):
          return None
        arrays = obj.arrays
      params = from_named(arrays, self.spec.abstract.params, "params", source)
      extra = from_named(arrays, self.spec.abstract.extra, "extra", source)
    except BadObject as e:
      self.say(f"policy version {version} is unusable: {' '.join(str(e).split())[:300]}")
      return None
    params, extra = jax.device_put(params, self.spec.shardings.params), jax.device_put(extra, self.spec.shardings.extra)
    self._device_policy = (version, (params, extra))
    return params, extra

  def release(self) -> None:
    """Deletes the rollouts trained on. Not before the new policy is published: until then they tell
    synchronous workers that the current version needs no more."""
    while self._consumed:
      self._retrying("delete used rollouts", lambda: self.store.delete(self._consumed[-1]))
      self._consumed.pop()

  def collect(self, need: int) -> tuple[list[StoredObject], float] | None:
    """`need` rollout batches this step may train on, oldest version first, and the seconds spent
    waiting for them; None if a stop signal came first. An RLError past rl.deadline_s without one."""
    got: list[StoredObject] = []
    began = last = time.monotonic()
    while True:
      try:
        for key in self.store.list("rollouts/"):
          parsed = parse_rollout_key(key)
          if parsed is None or key in self._consumed:
            continue
          obj = self._take(key, *parsed)
          if obj is not None:
            got.append(obj)
            last = time.monotonic()
          if len(got) == need:
            return got, time.monotonic() - began
      except StoreUnavailable as e:
        self.say(f"reading rollouts: store unavailable ({e}); retrying")
      if self._stop is not None and self._stop.signal:
        return None
      if time.monotonic() - last > self.rl.deadline_s:
        try:
          live = self.live_workers()
        except StoreUnavailable:
          live = "unknown"
        raise RLError(
          f"no usable rollout for {self.rl.deadline_s:.0f} s at step {self.version} (live workers: {live}); start "
          f"workers with `manifold rl worker --store {self.store.url} --id K`, or raise rl.deadline_s"
        )
      time.sleep(self.rl.poll_s)

  # -- the loop --------------------------------------------------------------------------------

  def _row(self, values: dict[str, float], wait_s: float, lags: list[int]) -> dict[str, float]:
    c = self.counters
    row = dict(values)
    row.update(
      policy_version=float(self.version),
      learning_rate=float(self.schedule(self.state.step - 1)),
      wait_s=wait_s,
      wait_s_total=c.wait_s,
      staleness_mean=float(np.mean(lags)) if lags else 0.0,
      staleness_max=float(max(lags, default=0)),
      batches=float(c.batches),
      dropped_stale=float(c.dropped.get("stale", 0)),
      dropped_lineage=float(c.dropped.get("lineage", 0)),
      dropped_unverifiable=float(c.dropped.get("unverifiable", 0)),
      rejected=float(sum(c.rejected.values())),
      verified=float(c.verified),
      verify_s_total=c.verify_s,
      store_bytes_read=float(self.store.bytes_read),
      store_bytes_written=float(self.store.bytes_written),
      store_retries=float(self.store.transient_failures),
    )
    for lag in range(self.rl.max_staleness + 1):
      row[f"staleness/{lag}"] = float(c.staleness.get(str(lag), 0))
    for reason, n in c.rejected.items():
      row[f"rejected/{reason}"] = float(n)
    for worker, n in sorted(c.tokens_per_worker.items(), key=lambda kv: int(kv[0])):
      row[f"tokens/worker-{worker}"] = float(n)
    return row

  def run(self) -> int:
    """Trains to train.steps (or until SIGTERM / SIGINT, after saving); 0, or 130 after Ctrl-C."""
    from manifold.train.loop import _StopRequest

    tc, rl = self.tc, self.rl
    step = self.start
    try:
      with _StopRequest() as stop:
        self._stop = stop
        if step >= tc.steps:
          self.say(f"{self.workdir}: already trained to step {step} (train.steps={tc.steps}); raise train.steps")
        elif step:
          self.say(f"resuming from step {step} in {self.checkpointer.directory}")
        self.publish_policy(resumed=True)
        self._beats = threading.Thread(target=self._beat, name="learner-heartbeat", daemon=True)
        self._beats.start()
        self.say(
          f"learner at policy version {step} in {self.store.url}; {rl.batches_per_step} batch(es) of "
          f"{rl.prompts_per_step} x {rl.group_size} per step, max_staleness {rl.max_staleness}"
        )
        if step == 0 and self.heldout:
          self.writer.write(0, {"heldout_accuracy": self.heldout_accuracy()})
        saved = self.start if self.start else None
        loop_began = time.monotonic()
        while step < tc.steps:
          taken = self.collect(rl.batches_per_step)
          if taken is None:
            break
          rollouts, wait_s = taken
          began = time.monotonic()
          lags = [self.version - r.meta["version"] for r in rollouts]
          values = self.train_on([r.arrays for r in rollouts])
          step += 1
          self.version = step
          self.counters.wait_s += wait_s
          self.counters.batches += len(rollouts)
          self.publish_policy()
          self.release()
          row = self._row(values, wait_s, lags)
          row["train_s"] = time.monotonic() - began
          row["elapsed_s"] = time.monotonic() - loop_began  # since this process began training
          if self.heldout and (step % tc.eval_every == 0 or step == tc.steps):
            row["heldout_accuracy"] = self.heldout_accuracy()
          self.writer.write(step, row)
          held = f"  heldout {row['heldout_accuracy']:.3f}" if "heldout_accuracy" in row else ""
          self.say(
            f"step {step}: reward {row['reward']:.3f}  accuracy {row['accuracy']:.3f}{held}  kl {row['kl']:.4f}  "
            f"clip {row['clip_frac']:.3f}  staleness {lags}  waited {wait_s:.1f} s"
          )
          if step % tc.checkpoint_every == 0 or step == tc.steps or stop.signal:
            self.checkpointer.save(step, self.state, dataclasses.asdict(self.counters))
            self.writer.flush()
            saved = step
          if stop.signal:
            break
        if stop.signal and step < tc.steps:
          if saved != step:
            self.checkpointer.save(step, self.state, dataclasses.asdict(self.counters))
          self.say(f"{stop.signal}: saved step {step}; rerun the same command to resume")
        else:
          with self._lock:
            self._done = True
          self._retrying("heartbeat", self._heartbeat)
          self.say(f"done: trained to step {step}; metrics: {os.path.join(self.workdir, 'metrics.jsonl')}")
        return 130 if stop.signal == "SIGINT" else 0
    finally:
      self._stop_beats.set()
      if self._beats is not None:
        self._beats.join(timeout=10)
      self.checkpointer.wait()
      self.checkpointer.close()
      self.writer.close()
