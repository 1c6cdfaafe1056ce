"""How the RL learner and its rollout workers meet: only through the store (`manifold.store`).

Layout under the store URL (every object signed by its producer, content-hashed and tied to the
run's config fingerprint; a reader refuses one that fails any check):

    run/config                                 the fields a worker must share with the learner (`WORKER_FIELDS`),
                                               written by the learner; its producer key is the learner's identity
    workers/<id>                               worker id -> its Ed25519 public key (first come; a restart with the
                                               same key file reclaims it)
    heartbeats/learner                         the learner's newest policy version and that object's content hash,
                                               step, `done`, time (rewritten every rl.heartbeat_s and at every version)
    heartbeats/worker-<id>                     a worker's version, batches and tokens so far, time
    policy/<version:08d>                       the policy after learner step `version`: params and the model's other
                                               variables as named float arrays (the newest rl.keep_policies are kept)
    rollouts/<version:08d>/<id>/<seq:08d>      one rollout batch of worker `id`, sampled from policy `version`; its
                                               parent is that policy object's content hash

A rollout batch holds `prompts_per_step` prompts x `group_size` completions, rows grouped by prompt:

    tokens          int32  [N, S+1]  prompt, then completion (through end-of-text), then 0s; S = train.seq_len
    mask            uint8  [N, S]    1 where the next token (tokens[:, t+1]) is a completion token
    behaviour_logp  float32 [N, S]   log-prob of that token under the sampling policy's model (0 off the mask)
    rewards         float32 [N]      the verifier's reward
    correct         uint8  [N]       whether the answer is right
    lengths         int32  [N]       completion tokens
    groups          int32  [N]       prompt index of each row: 0,0,..,0 (G times), 1,...
    commit_rows     int32  [K]       the completion positions committed to (K = rl.commit_positions), derived
    commit_cols     int32  [K]       from the batch's hash (`manifold.rl.commitment.positions`); sorted
    commit_ids      int32  [K, k]    the sampling policy's top-k token ids there (k = rl.commit_top_k) ...
    commit_logp     float32 [K, k]   ... and their log-probs (log-softmax of the logits: temperature 1)
    meta: version, worker, seq, seed (of the prompts), prompts (their text), tokens (sum of lengths), seconds

The learner drops a batch whose version is more than rl.max_staleness behind its own, or whose
parent is not the policy it published under that version (a policy from before a learner restart),
and rejects one that fails its hash, signature, producer, config fingerprint or this schema
(`check_rollout`), or the checks of `manifold.rl.commitment.Verifier` (copies, prompts and rewards,
positions, and a recomputation under the claimed policy of the commitments, the behaviour log-probs
and the sampling): each is counted, deleted, never trained on, and recorded in the learner's ledger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
from typing import Any, Callable

import numpy as np

from manifold.config import ConfigError, validate
from manifold.schema import Section
from manifold.store import (
  BadObject,
  Identity,
  Store,
  StoredObject,
  StoreError,
  StoreUnavailable,
  config_fingerprint,
  encode,
  run_config,
  stake_claim,
)

LEARNER_HEARTBEAT = "heartbeats/learner"

KIND_CONFIG = "rl-config"
KIND_CLAIM = "rl-worker"
KIND_HEARTBEAT = "rl-heartbeat"
KIND_POLICY = "rl-policy"
KIND_ROLLOUT = "rl-rollout"

# The fields a worker must share with the learner: what shapes the policy (the model), how a rollout
# is made and read (tokenizer, window, task, group, batch) and which rollouts the learner accepts.
WORKER_FIELDS = (
  "model.*",
  "data.tokenizer",
  "train.seed",
  "train.seq_len",
  "rl.task",
  "rl.difficulty",
  "rl.format_weight",
  "rl.group_size",
  "rl.prompts_per_step",
  "rl.max_new_tokens",
  "rl.temperature",
  "rl.max_staleness",
  "rl.batches_per_step",
  "rl.commit_positions",
  "rl.commit_top_k",
)


class RLError(RuntimeError):
  """A learner or worker cannot go on (a deadline passed, the store is gone); one line."""


def policy_key(version: int) -> str:
  return f"policy/{version:08d}"


def rollout_key(version: int, worker: int, seq: int) -> str:
  return f"rollouts/{version:08d}/{worker}/{seq:08d}"


def claim_key(worker: int) -> str:
  return f"workers/{worker}"


def worker_heartbeat_key(worker: int) -> str:
  return f"heartbeats/worker-{worker}"


def parse_rollout_key(key: str) -> tuple[int, int, int] | None:
  """(version, worker, seq) of a `rollouts/...` key, or None for any other key."""
  parts = key.split("/")
  if len(parts) != 4 or parts[0] != "rollouts" or not all(p.isdigit() for p in parts[1:]):
    return None
  return int(parts[1]), int(parts[2]), int(parts[3])


def version_of_policy_key(key: str) -> int | None:
  tail = key.removeprefix("policy/")
  return int(tail) if key.startswith("policy/") and tail.isdigit() else None


def open_store(url: str, setting: str = "rl.store") -> Store:
  """The store at `url`, probed; a ConfigError line if it cannot be used."""
  if not url:
    raise ConfigError(f'{setting}="": pass the store URL (--store file:///shared/dir, gs://..., s3://...)')
  try:
    return Store.open(url, setting=setting)
  except StoreError as e:
    raise ConfigError(str(e)) from None


def load_identity(workdir: str, name: str) -> Identity:
  """This process's Ed25519 key, `<workdir>/<name>.key` (created on first use)."""
  from manifold.store import IdentityError

  try:
    return Identity.load_or_create(os.path.join(workdir, f"{name}.key"))
  except IdentityError as e:
    raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------------------
# The config a worker shares with the learner


def _flatten(section: Section, out: dict[str, Any]) -> None:
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if isinstance(value, Section):
      _flatten(value, out)
    else:
      out[f"{section.SECTION}.{f.name}"] = value


def shared_config(cfg) -> dict[str, Any]:
  """`{dotted field: value}` of the `WORKER_FIELDS` of `cfg`."""
  every: dict[str, Any] = {}
  for section in validate(cfg).sections.values():
    _flatten(section, every)
  out = {}
  for name, value in every.items():
    if any(name == f or (f.endswith(".*") and name.startswith(f[:-1])) for f in WORKER_FIELDS):
      out[name] = value
  return out


def publish_config(store: Store, identity: Identity, cfg) -> str:
  """The learner's side: writes `run/config` (or, on a restart, checks it is this learner's and
  this config's); returns the config fingerprint every object carries."""
  mine = shared_config(cfg)
  fingerprint = config_fingerprint(mine)
  if run_config.publish_once(store, KIND_CONFIG, mine, identity, fingerprint):
    return fingerprint
  obj = run_config.read(store, KIND_CONFIG, "rl.store")
  if obj.producer != identity.public_key:
    raise ConfigError(
      f"rl.store {store.url}: its run belongs to another learner (key {obj.producer[:16]}...); a learner keeps its "
      "key in its --workdir: restart it with the same --workdir, or use a new store"
    )
  fix = "resume with the same value, or use a new store and --workdir"
  run_config.require_same(obj, mine, fingerprint, store=store, field="rl.store", owner="this learner's run", fix=fix)
  return fingerprint


def join_config(store: Store, cfg, *, deadline_s: float, poll_s: float, say: Callable[[str], None]) -> tuple[str, str]:
  """The worker's side: waits (up to `deadline_s`) for the learner's `run/config`, then checks this
  worker's config against it; returns (fingerprint, the learner's public key). A ConfigError naming
  the first field that differs."""
  mine = shared_config(cfg)
  fingerprint = config_fingerprint(mine)
  started, told = time.monotonic(), False
  while True:
    try:
      present = bool(store.list(run_config.KEY))
    except StoreUnavailable as e:
      say(f"store unavailable ({e}); retrying")
      present = False
    if present:
      break
    if time.monotonic() - started > deadline_s:
      raise RLError(f"no learner in {store.url} after {deadline_s:.0f} s (no run/config); start `manifold rl learner`")
    if not told:
      say(f"waiting for a learner in {store.url} (run/config)")
      told = True
    time.sleep(poll_s)
  obj = run_config.read(store, KIND_CONFIG, "rl.store")
  fix = "a worker must run the learner's model and rollout settings; refusing to start"
  run_config.require_same(obj, mine, fingerprint, store=store, field="rl.store", owner="the learner", fix=fix)
  return fingerprint, obj.producer


def claim_worker(store: Store, identity: Identity, worker: int, fingerprint: str) -> None:
  """Claims `workers/<worker>` with this worker's key (a restart with the same key reclaims it)."""
  meta = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid()}
  try:
    holder = stake_claim(store, claim_key(worker), KIND_CLAIM, meta, identity, fingerprint)
  except BadObject as e:
    raise ConfigError(f"rl.worker={worker}: its claim in {store.url} is unusable ({e}); pick another --id") from None
  if holder is not None:
    raise ConfigError(
      f"rl.worker={worker}: id taken by another worker (key {holder[:16]}...) in {store.url}; pick another --id, or "
      "restart that worker with its own --workdir"
    )


def write_heartbeat(store: Store, key: str, identity: Identity, fingerprint: str, meta: dict) -> None:
  data, _ = encode(
    KIND_HEARTBEAT, key, {}, {**meta, "time": time.time()}, identity=identity, config_fingerprint=fingerprint
  )
  store.put(key, data)


# ----------------------------------------------------------------------------------------
# Parameters as named arrays


def _name(prefix: str, path) -> str:
  """`<prefix>/<the leaf's path, keys joined by />`."""
  import jax

  return f"{prefix}/{jax.tree_util.keystr(path, simple=True, separator='/')}"


def named_arrays(tree, prefix: str) -> dict[str, np.ndarray]:
  """The leaves of a params pytree as host arrays named `<prefix>/<path>`."""
  import jax

  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(prefix, path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def from_named(arrays: dict[str, np.ndarray], abstract, prefix: str, source: str):
  """The pytree shaped like `abstract` (ShapeDtypeStructs) with leaves from `arrays`; BadObject
  naming the first missing or misshapen leaf."""
  import jax

  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, leaf in flat:
    name = _name(prefix, path)
    a = arrays.get(name)
    if a is None or tuple(a.shape) != tuple(leaf.shape) or a.dtype != np.dtype(leaf.dtype):
      got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
      raise BadObject(f"{source}: {name} is {got}, not {np.dtype(leaf.dtype)}{list(leaf.shape)}")
    leaves.append(a)
  return treedef.unflatten(leaves)


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
  """sha256 over the arrays' names and bytes, in name order."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    h.update(name.encode() + b"\0" + np.ascontiguousarray(arrays[name]).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------
# Rollout batches


class BadRollout(BadObject):
  """A verified rollout object whose arrays or meta are not a rollout batch of this run."""

  reason = "schema"


@dataclasses.dataclass(frozen=True)
class RolloutShape:
  prompts: int  # rl.prompts_per_step
  group: int  # rl.group_size
  seq_len: int  # train.seq_len
  max_new_tokens: int
  vocab: int
  commit_positions: int  # K: rl.commit_positions
  commit_top_k: int  # k: rl.commit_top_k

  @property
  def rows(self) -> int:
    return self.prompts * self.group

  @classmethod
  def of(cls, c) -> RolloutShape:
    """From a validated `Config`."""
    rl = c.rl
    return cls(rl.prompts_per_step, rl.group_size, c.train.seq_len, rl.max_new_tokens, c.model.vocab_size,
               rl.commit_positions, rl.commit_top_k)  # fmt: skip


def rollout_spec(shape: RolloutShape) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
  n, s = shape.rows, shape.seq_len
  return {
    "tokens": (np.dtype(np.int32), (n, s + 1)),
    "mask": (np.dtype(np.uint8), (n, s)),
    "behaviour_logp": (np.dtype(np.float32), (n, s)),
    "rewards": (np.dtype(np.float32), (n,)),
    "correct": (np.dtype(np.uint8), (n,)),
    "lengths": (np.dtype(np.int32), (n,)),
    "groups": (np.dtype(np.int32), (n,)),
    "commit_rows": (np.dtype(np.int32), (shape.commit_positions,)),
    "commit_cols": (np.dtype(np.int32), (shape.commit_positions,)),
    "commit_ids": (np.dtype(np.int32), (shape.commit_positions, shape.commit_top_k)),
    "commit_logp": (np.dtype(np.float32), (shape.commit_positions, shape.commit_top_k)),
  }


def check_rollout(obj: StoredObject, shape: RolloutShape, *, version: int, worker: int, seq: int, source: str) -> None:
  """Raises BadRollout (one line, naming what is wrong) unless `obj` is a well-formed rollout batch
  of this run stored under (version, worker, seq)."""

  def bad(detail: str):
    raise BadRollout(f"{source}: not a rollout batch of this run: {detail}")

  spec = rollout_spec(shape)
  a = obj.arrays
  if set(a) != set(spec):
    bad(f"arrays {sorted(a)}, expected {sorted(spec)}")
  for name, (dtype, dims) in spec.items():
    if a[name].dtype != dtype or tuple(a[name].shape) != dims:
      bad(f"{name} is {a[name].dtype}{list(a[name].shape)}, expected {dtype}{list(dims)}")
  meta = obj.meta
  for name, want in (("version", version), ("worker", worker), ("seq", seq)):
    if meta.get(name) != want:
      bad(f"meta {name}={meta.get(name)!r}, its key says {want}")
  if np.any(a["groups"] != np.repeat(np.arange(shape.prompts, dtype=np.int32), shape.group)):
    bad(f"groups are not {shape.prompts} prompts x {shape.group} completions in order")
  if np.any(a["mask"] > 1) or np.any(a["correct"] > 1):
    bad("mask or correct holds values other than 0 and 1")
  lengths = a["lengths"]
  if np.any((lengths < 1) | (lengths > shape.max_new_tokens)) or np.any(a["mask"].sum(1) != lengths):
    bad(f"completion lengths outside [1, {shape.max_new_tokens}] or unequal to the mask's")
  if np.any((a["tokens"] < 0) | (a["tokens"] >= shape.vocab)):
    bad(f"token ids outside [0, {shape.vocab})")
  on = a["mask"].astype(bool)
  logp = a["behaviour_logp"]
  if not np.all(np.isfinite(logp[on])) or np.any(logp[on] > 1e-3):
    bad("behaviour log-probs are not finite and <= 0 on the completion tokens")
  if not np.all(np.isfinite(a["rewards"])):
    bad("rewards are not finite")
  if meta.get("tokens") != int(lengths.sum()):
    bad(f"meta tokens={meta.get('tokens')!r}, the lengths sum to {int(lengths.sum())}")
  rows, cols = a["commit_rows"], a["commit_cols"]
  if np.any((rows < 0) | (rows >= shape.rows) | (cols < 0) | (cols >= shape.seq_len)):
    bad(f"commit positions outside the [{shape.rows}, {shape.seq_len}] batch")
  if np.any((a["commit_ids"] < 0) | (a["commit_ids"] >= shape.vocab)):
    bad(f"committed token ids outside [0, {shape.vocab})")
  if not np.all(np.isfinite(a["commit_logp"])) or np.any(a["commit_logp"] > 1e-3):
    bad("committed log-probs are not finite and <= 0")
