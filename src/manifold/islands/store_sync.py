"""Islands as independent jobs: each island is its own `manifold train` process, and the islands
share nothing but a store (`manifold.store`: a tensorstore key-value URL, `file://` on a local or
network disk, `gs://`, `s3://`).

Layout under the store URL (every object signed, content-hashed and tied to the run's config
fingerprint; a reader rejects one that fails any check):

    run/config                       the fields every island must agree on (the first island writes it)
    claims/<id>                      island id -> its Ed25519 public key (the key lives in its workdir)
    heartbeats/<id>                  step, virtual step, next round per fragment, time (rewritten every heartbeat_s)
    deltas/<p>/<round:08d>/<id>      island id's outer gradient of fragment p (quantised), its tokens and base round
    update/<p>/<round:08d>           the round's outer update of fragment p (quantised), members, weights, the
                                     sha256 of the parameters it makes; the round's commit point
    global/<p>/<round:08d>           the global parameters of fragment p after that round (float32), round 0 and
                                     every islands.snapshot_every-th round: for islands that join, restart or
                                     fall behind
    outer/<p>/<round:08d>/<leader>   the outer optimizer's momentum after that round (float32), on the same
                                     rounds: for an island that takes over as leader

The clock. Fragment p is synced at the steps `fragments_due` names (every H steps at its staggered
offset), and its r-th sync is round r. An island counts those steps on a virtual clock: its own step
plus a shift fixed when it joins, so that an island restarted from an older checkpoint (or a new one)
takes part in the run's next round, not in one long gone. Islands that started together have shift 0.

Round r of fragment p: each island sends `global_{r-1} - local` (float32, optionally with error
feedback, quantised to islands.bits), then (overlap_steps = 0) waits for `global/p/r`, or (tau > 0)
trains on and takes it tau steps later, mixed in. The leader of the round is the lowest live island
(fresh heartbeat) among those that reported it; it waits until every live island that will report the
round has (an island silent for deadline_s is dropped; a hung one is dropped after 10 x deadline_s),
checks every delta (hash, signature, producer, config, base round), screens the valid ones (a norm
bound against the others' median norm and a cosine bound against their coordinate-wise median:
`manifold.islands.robust`, islands.max_norm_ratio and islands.min_cosine), combines the kept ones in
float32 (islands.aggregate: the token-weighted mean, or the coordinate-wise trimmed mean or median)
and computes the outer Nesterov update u with the previous round's momentum. The update's meta says
which deltas were rejected and why, and every island's norm, norm ratio and cosine; once its update
has landed, the leader records a signed verdict on each delta in its contribution ledger
(`manifold.provenance.ledger`, kind island_delta, with the tokens and FLOPs it claims). u is
quantised like the deltas (islands.bits, islands.quant_block), and the round's global parameters are
defined as `global_{r-1} + dequantize(quantize(u))`, in float32 numpy from the update
object's bytes, so the leader and every island make the same bits (with bits = 32 it is the plain
outer step). The leader writes `update/p/r` once (a conditional write: of two would-be leaders, the
one whose update lands wins, and only it writes `outer/...` and then the full `global/p/r`); its
parents are round r - 1's id and the deltas used, and a round's id (what deltas name as their base)
is its update object's hash (round 0's: its global's). It is written only after the whole mean is
computed, so no round is ever made from a partial mean. An island holding round r - 1 reads only the
small update and applies it to its own copy, checking the result's sha256 against the update's; an
island that joins, restarts or falls behind reads the newest full global, then every newer update in
order (each checked: its parent is the round before's id, its result's sha256 the one it carries).

Snapshots. The full float32 global and the momentum are written (after the update) only on rounds
r % islands.snapshot_every == 0; in between the leader keeps its momentum in memory, and every
island gets each round from its update alone. An island whose update does not apply (a failed
check) keeps its own round until a newer snapshot is there. A leader that did not lead the round
before (the previous leader died or fell behind) takes the newest momentum it has (its own from an
earlier round, or the newest outer/ snapshot), and says how many rounds stale it is (from zero if
there is none): on a change of leader only, the outer momentum is an approximation.
Nothing waits forever: past its limit a wait ends with one `IslandsError` line.

Every byte through the store (deltas, updates, globals, momentum, heartbeats, claims) is counted and logged beside the
bytes a data-parallel all-reduce would have moved for the same model and steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from manifold import files
from manifold.config import ConfigError, validate
from manifold.islands import diloco, robust
from manifold.provenance.ledger import Ledger, LedgerError
from manifold.schema import FREE, Section, first_difference
from manifold.store import (
  BadObject,
  Identity,
  RejectedObject,
  Store,
  StoreError,
  StoreUnavailable,
  config_fingerprint,
  encode,
  fetch,
  run_config,
  stake_claim,
)

EXEMPT = ("islands.id", "islands.store")  # per island; every other field the run fixes must agree
KEY_FILE = "island.key"  # this island's Ed25519 identity, in its workdir
MEMBERSHIP = "membership.jsonl"  # one line per round this island completed
HUNG_FACTOR = 10  # a live island that has not reported is waited for at most this many deadline_s


class IslandsError(RuntimeError):
  """An island cannot go on (the store failed past its retries, or a round never completed); one line."""


def _now() -> float:
  return time.time()


# ----------------------------------------------------------------------------------------
# The config every island must share


def _walk(section: Section, out: dict[str, Any]) -> None:
  for f in dataclasses.fields(section):
    value = getattr(section, f.name)
    if isinstance(value, Section):
      _walk(value, out)
      continue
    dotted = f"{section.SECTION}.{f.name}"
    rule = f.metadata.get("resume") or section.RESUME
    if rule is FREE or dotted in EXEMPT:
      continue
    out[dotted] = rule.key(value)


def shared_config(cfg) -> dict[str, Any]:
  """`{dotted field: value}` of the fields every island of a run must agree on: all but islands.id,
  islands.store and the fields a resumed run may change (`resume=FREE`: batch size, learning rate,
  logging, ...); a field with a partial rule (train.grad_clip: on or off) contributes what it keeps."""
  out: dict[str, Any] = {}
  for section in validate(cfg).sections.values():
    _walk(section, out)
  return out


# ----------------------------------------------------------------------------------------
# Keys


def delta_key(p: int, r: int, island: int) -> str:
  return f"deltas/{p}/{r:08d}/{island}"


def global_key(p: int, r: int) -> str:
  return f"global/{p}/{r:08d}"


def update_key(p: int, r: int) -> str:
  return f"update/{p}/{r:08d}"


def outer_key(p: int, r: int, leader: int) -> str:
  return f"outer/{p}/{r:08d}/{leader}"


def _last_int(key: str) -> int | None:
  tail = key.rsplit("/", 1)[-1]
  return int(tail) if tail.isdigit() else None


def open_store(url: str) -> Store:
  """The store at `url`, probed (write, read, list, delete); a `ConfigError` line if it cannot be used."""
  try:
    return Store.open(url, setting="islands.store")
  except StoreError as e:
    raise ConfigError(str(e)) from None


def identity_path(workdir: str) -> str:
  """Where an island keeps its key: `<workdir>/island.key`, or for a bucket workdir (the key stays on
  this machine) `~/.cache/manifold/islands/<bucket path>/island.key`."""
  if not files.is_remote(workdir):
    return os.path.join(os.fspath(files.path(workdir)), KEY_FILE)
  from manifold.train.run import default_cache_dir

  return os.path.join(default_cache_dir(), "islands", workdir.split("://", 1)[1].strip("/"), KEY_FILE)


def check_config(store: Store, identity: Identity, cfg) -> str:
  """Writes `run/config` if this is the first island, else compares: a `ConfigError` naming the first
  field where this island's config differs from the run's. Returns the config fingerprint."""
  mine = shared_config(cfg)
  fingerprint = config_fingerprint(mine)
  if not run_config.publish_once(store, "run-config", mine, identity, fingerprint):
    obj = run_config.read(store, "run-config", "islands.store")
    fix = "islands of one run agree on every field but islands.id, islands.store and per-island ones; refusing to join"
    run_config.require_same(obj, mine, fingerprint, store=store, field="islands.store", owner="the run", fix=fix)
  return fingerprint


def claim(store: Store, identity: Identity, island: int, count: int, fingerprint: str) -> None:
  """Claims `claims/<island>` with this island's key; a restart (same key) reclaims it. A `ConfigError`
  if another island holds the id."""
  meta = {"id": island, "host": socket.gethostname(), "pid": os.getpid(), "time": _now()}
  try:
    holder = stake_claim(store, f"claims/{island}", "claim", meta, identity, fingerprint)
  except BadObject as e:
    raise ConfigError(f"islands.id={island}: its claim in {store.url} is unusable ({e}); pick another id") from None
  if holder is None:
    return
  taken = {_last_int(k) for k in store.list("claims/")}
  free = [k for k in range(count) if k not in taken]
  hint = (
    f"pick a free id ({', '.join(map(str, free))})" if free else "pick a free id (none is left: raise islands.count)"
  )
  raise ConfigError(f"islands.id={island} is taken by another island (key {holder[:16]}...); {hint}")


# ----------------------------------------------------------------------------------------
# Parameter fragments as named numpy arrays


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which leaves of `params` (in tree_leaves order) belong to each fragment, with names and shapes."""

  names: list[str]
  shapes: list[tuple[int, ...]]
  fragments: list[list[int]]  # fragment p -> leaf indices

  @classmethod
  def of(cls, params, ic) -> Layout:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    layers = 1 + max((diloco.layer_index_of(path) or 0) for path, _ in flat)
    try:
      layer_fragment = diloco.fragment_of_layers(layers, ic.fragments, ic.fragment_pattern)
      leaf_fragment = diloco.partition(params, layer_fragment, ic.fragments)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    return cls(
      names=[jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in flat],
      shapes=[tuple(np.shape(leaf)) for _, leaf in flat],
      fragments=[[i for i, f in enumerate(leaf_fragment) if f == p] for p in range(ic.fragments)],
    )

  def size(self, p: int | None = None) -> int:
    leaves = range(len(self.names)) if p is None else self.fragments[p]
    return sum(int(np.prod(self.shapes[i])) for i in leaves)

  def take(self, params, p: int) -> list[np.ndarray]:
    """Fragment p of `params` as float32 host arrays."""
    leaves = jax.tree_util.tree_leaves(params)
    return [np.asarray(jax.device_get(leaves[i]), np.float32) for i in self.fragments[p]]

  def put(self, params, p: int, arrays: list[np.ndarray]):
    """`params` with fragment p replaced by `arrays` (each cast and placed like the leaf it replaces)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    for i, a in zip(self.fragments[p], arrays):
      leaves[i] = jax.device_put(np.asarray(a).astype(leaves[i].dtype), leaves[i].sharding)
    return treedef.unflatten(leaves)

  def named(self, p: int, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {self.names[i]: a for i, a in zip(self.fragments[p], arrays)}

  def unnamed(self, p: int, arrays: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    out = []
    for i in self.fragments[p]:
      a = arrays.get(self.names[i])
      if a is None or tuple(a.shape) != self.shapes[i]:
        raise BadObject(f"{what}: {self.names[i]} is missing or of another shape")
      out.append(np.asarray(a, np.float32))
    return out


def _digest(arrays: list[np.ndarray]) -> str:
  import hashlib

  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a, np.float32).tobytes())
  return h.hexdigest()


def _apply(layout: Layout, p: int, base: list[np.ndarray], coded: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
  """Fragment p's canonical global parameters of a round: `base + dequantize(update)` leafwise, in
  float32 numpy from the update object's bytes, so the leader and every island make the same bits."""
  out = []
  for i, b in zip(layout.fragments[p], base):
    name, shape = layout.names[i], layout.shapes[i]
    codes = coded.get(f"{name}:codes")
    if codes is None:
      raise BadObject(f"{what}: no {name}")
    try:
      u = diloco.dequantize_numpy(codes, coded.get(f"{name}:scales", np.zeros(0, np.float32)), shape)
    except ValueError as e:
      raise BadObject(f"{what}: {e}") from None
    out.append(np.asarray(b, np.float32) + u)
  return out


# ----------------------------------------------------------------------------------------
# One island


@dataclasses.dataclass
class Held:
  """The newest global parameters of one fragment this island has: its round, arrays, object hash, meta."""

  round: int
  arrays: list[np.ndarray]
  content_hash: str
  meta: dict
  snapshot: int = 0  # the round of the full global these parameters were rebuilt from (by updates since)


class StoreSync:
  """One island of an independent-jobs run (`IslandSync`): connects (`connect`), joins (`join`), then
  after every step sends, leads and takes the rounds that are due."""

  def __init__(self, cfg, workdir: str, store: Store, identity: Identity, fingerprint: str, say: Callable):
    typed = validate(cfg)
    ic = typed.islands
    self.ic = ic
    self.id, self.count = ic.id, ic.count
    self.H, self.P = ic.inner_steps, ic.fragments
    self.offsets = diloco.sync_step_offsets(self.H, self.P)
    self.workdir = workdir
    self.store, self.identity, self.fingerprint = store, identity, fingerprint
    self.say = say
    self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    self.total_steps = cfg.train.steps
    self.model_cfg, self.seq_len = typed.model, cfg.train.seq_len
    self.flops_per_token: float | None = None  # computed when this island first leads a round
    self.keeps_ledger = typed.provenance.enabled
    self.ledger: Ledger | None = None  # opened by join
    self.tx = diloco.outer_optimizer(ic.outer_learning_rate, ic.outer_momentum, nesterov=True)
    self.poll_s = min(0.25, ic.heartbeat_s / 4)  # the longest pause between looks at the store while waiting
    self.layout: Layout | None = None
    self.held: list[Held] = []
    self.next_round: list[int] = []
    self.tokens: list[int] = []
    self.residual: list[list[np.ndarray] | None] = []
    self.pending: list[tuple[int, int, int]] = []  # (virtual step to apply at, fragment, round)
    self.sent: dict[tuple[int, int], tuple[list[np.ndarray], int, str]] = {}  # own deltas, for leading
    self.outer_cache: dict[int, tuple[int, Any]] = {}  # fragment -> (round, outer state) this island made
    self.claims: dict[int, str] = {}
    self.claims_listed = -1e9
    self.heartbeats: dict[int, dict] = {}
    self.heartbeats_read = -1.0
    self.shift = 0
    self.step = self.start = 0
    self.waiting: list[int] | None = None  # [p, r] while blocked on a global
    self.last = {"members": 0, "round": 0, "dropped": 0}
    self.counted = (0, 0)
    self.wait_s = 0.0
    self.error: BaseException | None = None
    self.stop = threading.Event()
    self.beat: threading.Thread | None = None
    self.lock = threading.Lock()

  # -- joining ---------------------------------------------------------------------------------

  def join(self, spec, state, start: int):
    """Starts this island from the newest global parameters of each fragment (publishing its own as
    round 0 when the run has none yet), sets its clock to join the next round, starts heartbeats;
    returns the state to train from."""
    try:
      return self._join(spec, state, start)
    except StoreUnavailable as e:
      raise IslandsError(f"island {self.id}: the store failed past its retries: {e}") from None

  def _join(self, spec, state, start: int):
    try:  # the deltas this island judges as a round's leader, one signed entry each
      if self.keeps_ledger:
        self.ledger = Ledger.open(
          self.workdir, self.identity, store=self.store, fingerprint=self.fingerprint, say=self.say
        )
    except LedgerError as e:
      raise IslandsError(f"island {self.id}: {e}; move ledger.jsonl aside to start a new ledger") from None
    self.layout = layout = Layout.of(spec.abstract.params, self.ic)
    self.num_params = layout.size()
    self.start = self.step = start
    params = state.params
    events = []
    for p in range(self.P):
      mine = layout.take(params, p)
      held = self._newest_global(p)
      if held is None:
        data, _ = self._encode(
          "global", global_key(p, 0), layout.named(p, mine), {"round": 0, "fragment": p, "members": [],
                                                              "params_sha256": _digest(mine)})  # fmt: skip
        self.store.put_new(global_key(p, 0), data)
        held = self._newest_global(p)
        if held is None:
          raise IslandsError(f"islands.store {self.store.url}: round 0 of fragment {p} cannot be read back")
      if held.round == 0 and held.meta.get("params_sha256") != _digest(mine) and start == 0:
        self.say(f"island {self.id}: fragment {p}'s initial parameters differ from the run's round 0; using the run's")
      params = layout.put(params, p, held.arrays)
      self.held.append(held)
      self.next_round.append(held.round + 1)
      self.tokens.append(0)
      self.residual.append(None)
      events.append((self._event_step(p, held.round), self._event_step(p, held.round + 1)))
    v_start = min(max(done for done, _ in events), min(nxt for _, nxt in events) - 1)
    self.shift = v_start - start
    rounds = ", ".join(f"fragment {p} round {r}" for p, r in enumerate(self.next_round))
    built = ", ".join(
      f"fragment {p}'s round {h.snapshot} snapshot + {h.round - h.snapshot} updates" for p, h in enumerate(self.held)
    )
    self.say(
      f"island {self.id} of {self.count} joined {self.store.url}: next {rounds} (virtual step {v_start}; from {built})"
    )
    self.counted = (self.store.bytes_written, self.store.bytes_read)
    self.bytes_at_join = self.counted
    self._heartbeat()
    self.beat = threading.Thread(target=self._beat, name=f"island-{self.id}-heartbeat", daemon=True)
    self.beat.start()
    return state.replace(params=params)

  def _first(self, p: int) -> int:
    return self.offsets[p] or self.H

  def _event_step(self, p: int, r: int) -> int:
    """The virtual step at which fragment p's round r is sent (0 for round 0, the start)."""
    return 0 if r == 0 else self._first(p) + (r - 1) * self.H

  def _round_at(self, p: int, v: int) -> int:
    return (v - self._first(p)) // self.H + 1

  # -- objects -------------------------------------------------------------------------------

  def _encode(self, kind: str, key: str, arrays: dict, meta: dict, parents=()) -> tuple[bytes, str]:
    return encode(kind, key, arrays, meta, identity=self.identity, config_fingerprint=self.fingerprint, parents=parents)

  def _claim_key(self, island: int) -> str | None:
    if island not in self.claims:
      try:
        listed = f"claims/{island}" in self.store.list(f"claims/{island}")
        obj = self._fetch(f"claims/{island}", "claim", None, listed=listed)
      except BadObject as e:
        self.say(f"island {self.id}: island {island}'s claim is unusable ({e}); ignoring that island")
        obj = None
      if obj is None:
        return None
      self.claims[island] = obj.producer
    return self.claims[island]

  def _trusted(self) -> list[str]:
    """Every island's key (the claims are listed again at most every heartbeat_s)."""
    if len(self.claims) < self.count and _now() - self.claims_listed > self.ic.heartbeat_s:
      self.claims_listed = _now()
      for key in self.store.list("claims/"):
        k = _last_int(key)
        if k is not None:
          self._claim_key(k)
    return list(self.claims.values())

  def _fetch(self, key: str, kind: str, trusted: list[str] | None, *, listed: bool = False):
    """The verified object under `key` (None if absent). `listed`: the key is known to exist, so an
    absent read is the store failing for a moment (a file store whose folder is away reads as
    empty): it is retried with the store's backoff, then a `StoreUnavailable`."""
    for attempt in range(self.store.retries + 1 if listed else 1):
      obj = fetch(self.store, key, kind=kind, config_fingerprint=self.fingerprint, trusted_keys=trusted)
      if obj is not None or not listed:
        return obj
      time.sleep(self.store.backoff_s * 2**attempt)
    raise StoreUnavailable(
      f"{self.store.url}: {key} is listed but does not read after {self.store.retries + 1} attempts"
    )

  def _read_led(self, key: str, kind: str):
    """The verified object a leader wrote under `key` (None if absent)."""
    try:
      return self._fetch(key, kind, self._trusted())
    except RejectedObject as e:  # perhaps led by an island that claimed its id after the last listing
      if e.reason != "producer":
        raise
      self.claims_listed = -1e9
      return self._fetch(key, kind, self._trusted())

  def _read_global(self, p: int, r: int) -> Held | None:
    """Round r's full global parameters. A round's id (the parent of the deltas based on it) is its
    update object's hash, the global's only parent (round 0, which has no update: the global's own)."""
    key = global_key(p, r)
    obj = self._read_led(key, "global")
    if obj is None:
      return None
    if r > 0 and len(obj.parents) != 1:
      raise BadObject(f"{self.store.url}{key}: {len(obj.parents)} parents; expected its round's update")
    arrays = self.layout.unnamed(p, obj.arrays, f"{self.store.url}{key}")
    return Held(r, arrays, obj.parents[0] if r > 0 else obj.content_hash, dict(obj.meta), snapshot=r)

  def _read_update(self, p: int, r: int, base: Held) -> Held | str | None:
    """Round r's global parameters made from `base` (round r - 1) and round r's update object: None
    if there is no update yet, a reason (str) if it does not apply to `base` (read the full global)."""
    key = update_key(p, r)
    try:
      obj = self._read_led(key, "update")
    except BadObject as e:
      return str(e)
    if obj is None:
      return None
    if base.round != r - 1 or not obj.parents or obj.parents[0] != base.content_hash:
      return f"{self.store.url}{key}: not based on this island's round {base.round}"
    try:
      arrays = _apply(self.layout, p, base.arrays, obj.arrays, f"{self.store.url}{key}")
    except BadObject as e:
      return str(e)
    if obj.meta.get("params_sha256") != _digest(arrays):
      return f"{self.store.url}{key}: applied to this island's round {base.round}, params_sha256 differs"
    return Held(r, arrays, obj.content_hash, dict(obj.meta), snapshot=base.snapshot)

  def _roll(self, p: int, held: Held) -> Held:
    """`held` brought forward by every newer update that applies to it, one round after another."""
    while True:
      newer = self._read_update(p, held.round + 1, held)
      if not isinstance(newer, Held):
        if newer is not None:
          self.say(f"island {self.id}: {newer}; reading full global parameters instead")
        return held
      held = newer

  def _newest_global(self, p: int, after: int = -1) -> Held | None:
    """The newest readable global of fragment p newer than round `after` (a corrupt one is reported
    and skipped), brought forward by the updates written since."""
    listed = map(_last_int, self.store.list(f"global/{p}/"))
    rounds = sorted((r for r in listed if r is not None and r > after), reverse=True)
    for r in rounds:
      try:
        held = self._read_global(p, r)
      except BadObject as e:
        self.say(f"island {self.id}: {e}; trying the round before")
        continue
      if held is not None:
        return self._roll(p, held)
    return None

  # -- heartbeats ----------------------------------------------------------------------------

  def _heartbeat(self, done: bool = False) -> None:
    with self.lock:
      meta = {
        "id": self.id,
        "step": self.step,
        "virtual_step": self.step + self.shift,
        "next_round": list(self.next_round),
        "waiting": self.waiting,
        "done": done,
        "time": _now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
      }
    data, _ = self._encode("heartbeat", f"heartbeats/{self.id}", {}, meta)
    self.store.put(f"heartbeats/{self.id}", data)

  def _beat(self) -> None:
    while not self.stop.wait(self.ic.heartbeat_s):
      try:
        self._heartbeat()
      except BaseException as e:  # noqa: BLE001 -- reported by the main thread at its next step
        self.error = e
        return

  def _live(self, refresh: bool = False) -> dict[int, dict]:
    """Heartbeat meta of the islands whose heartbeat is fresh (within deadline_s) and not done."""
    if refresh or _now() - self.heartbeats_read > min(self.ic.heartbeat_s / 2, 1.0):
      self.heartbeats_read = _now()
      beats = {}
      for key in self.store.list("heartbeats/"):
        k = _last_int(key)
        trusted = self._claim_key(k) if k is not None and k != self.id else None
        if trusted is None:
          continue
        try:
          obj = self._fetch(key, "heartbeat", [trusted], listed=True)
        except BadObject as e:
          self.say(f"island {self.id}: island {k}'s heartbeat rejected: {e}")
          continue
        if obj is not None:
          beats[k] = obj.meta
      self.heartbeats = beats
    now = _now()
    live = {k: m for k, m in self.heartbeats.items() if not m["done"] and now - m["time"] < self.ic.deadline_s}
    live[self.id] = {"next_round": list(self.next_round), "done": False}
    return live

  # -- every step ----------------------------------------------------------------------------

  def after_step(self, state, step: int):
    if isinstance(self.error, StoreUnavailable):  # the heartbeat thread met the outage first
      raise IslandsError(f"island {self.id}: the store failed past its retries: {self.error}")
    if self.error is not None:
      raise IslandsError(f"island {self.id}: heartbeats to {self.store.url} failed: {self.error}")
    self.step = step
    v = step + self.shift
    for p in range(self.P):
      self.tokens[p] += self.tokens_per_step
    params = state.params
    waited = time.perf_counter()
    try:
      for p in diloco.fragments_due(v, self.H, self.P) if v > 0 else []:
        params = self._sync(params, p, self._round_at(p, v), v)
      last = step >= self.total_steps  # the run's last step takes every outer update still on its way
      for item in sorted(x for x in self.pending if x[0] <= v or last):
        self.pending.remove(item)
        _, p, r = item
        if self.held[p].round >= r:  # taken already (late)
          continue
        held = self._await_global(p, r)
        outer = diloco.mix(self.layout.take(params, p), held.arrays, self.ic.mix_alpha)
        params = self.layout.put(params, p, [np.asarray(a) for a in outer])
    except StoreUnavailable as e:
      self.error = e
      raise IslandsError(f"island {self.id}: the store failed past its retries: {e}") from None
    self.wait_s = time.perf_counter() - waited
    return state.replace(params=params), self._metrics(step)

  def _metrics(self, step: int) -> dict[str, float]:
    sent, received = self.store.bytes_written, self.store.bytes_read
    sent_total, received_total = sent - self.bytes_at_join[0], received - self.bytes_at_join[1]
    values = {
      "islands/bytes_sent": sent - self.counted[0],
      "islands/bytes_received": received - self.counted[1],
      "islands/bytes_sent_cumulative": sent_total,
      "islands/bytes_received_cumulative": received_total,
      "islands/dp_allreduce_bytes": diloco.allreduce_bytes(self.num_params, self.count, 1),
      "islands/dp_allreduce_bytes_cumulative": diloco.allreduce_bytes(self.num_params, self.count, step - self.start),
      "islands/members": self.last["members"],
      "islands/round": self.last["round"],
      "islands/dropped": self.last["dropped"],
      "islands/sync_s": self.wait_s,
      "islands/store_retries": self.store.transient_failures,
    }
    # A ring all-reduce receives what it sends: the data-parallel traffic per party is twice its sends.
    values["islands/dp_ratio"] = (
      2 * values["islands/dp_allreduce_bytes_cumulative"] / max(1, sent_total + received_total)
    )
    self.counted = (sent, received)
    return values

  def _sync(self, params, p: int, r: int, v: int):
    """Round r of fragment p is due: send this island's outer gradient, then take (tau = 0) or
    schedule (tau > 0) the round's global parameters."""
    held = self.held[p]
    if r <= held.round:
      return params
    if held.round < r - 1 or self._peek_global(p, r):  # behind, or the round closed without this island
      newest = self._roll(p, held)  # by the updates since its round, else (one does not apply) a newer snapshot
      newest = self._newest_global(p, after=newest.round) or newest
      if newest.round > held.round:
        self.say(f"island {self.id}: fragment {p} round {r}: late; taking the run's round {newest.round}")
        self._adopt(p, newest)
        params = self.layout.put(params, p, newest.arrays)
      self.next_round[p] = max(self.next_round[p], r + 1, self.held[p].round + 1)  # this round goes on without it
      return params
    local = self.layout.take(params, p)
    arrays, dequantized = {}, []
    for j, (i, g, x) in enumerate(zip(self.layout.fragments[p], held.arrays, local)):
      name = self.layout.names[i]
      residual = self.residual[p][j] if self.residual[p] is not None else None
      codes, scales, new_residual = diloco.quantize_with_feedback(g - x, residual, self.ic.bits, self.ic.quant_block)
      codes, scales = np.asarray(codes), np.asarray(scales, np.float32)
      arrays[f"{name}:codes"] = codes
      if self.ic.bits != 32:
        arrays[f"{name}:scales"] = scales
      dequantized.append(np.asarray(diloco.dequantize(codes, scales, self.layout.shapes[i]), np.float32))
      if self.ic.error_feedback:
        self.residual[p] = self.residual[p] or [None] * len(local)
        self.residual[p][j] = np.asarray(new_residual, np.float32)
    meta = {
      "island": self.id,
      "fragment": p,
      "round": r,
      "base_round": held.round,
      "tokens": self.tokens[p],
      "bits": self.ic.bits,
      "step": self.step,
    }
    key = delta_key(p, r, self.id)
    data, digest = self._encode("delta", key, arrays, meta, parents=[held.content_hash])
    if self.store.put_new(key, data):
      self.sent[(p, r)] = (dequantized, self.tokens[p], digest)
    else:
      self.say(
        f"island {self.id}: fragment {p} round {r}: a delta of this island is already there (sent before a restart); using it"
      )
    self.tokens[p] = 0
    self.next_round[p] = r + 1
    if self.ic.overlap_steps == 0:
      held = self._await_global(p, r)
      return self.layout.put(params, p, held.arrays)
    self.pending.append((v + self.ic.overlap_steps, p, r))
    return params

  def _peek_global(self, p: int, r: int) -> bool:
    """Round r of fragment p is done (its update object, the round's commit point, is there)."""
    return bool(self.store.list(update_key(p, r)))

  def _adopt(self, p: int, held: Held) -> None:
    """Takes `held` as fragment p's newest global parameters and records the round in membership.jsonl."""
    if held.round <= self.held[p].round:
      return
    self.held[p] = held
    self.next_round[p] = max(self.next_round[p], held.round + 1)
    for key in [k for k in self.sent if k[0] == p and k[1] <= held.round]:
      del self.sent[key]
    m = held.meta
    dropped = m.get("dropped", {})
    self.last = {"members": len(m.get("members", [])), "round": held.round, "dropped": len(dropped)}
    row = {
      "round": held.round,
      "fragment": p,
      "members": m.get("members", []),
      "tokens": m.get("tokens", []),
      "dropped": dropped,
      "screen": m.get("screen", {}),
      "leader": m.get("leader"),
      "step": self.step,
      "time": _now(),
    }
    files.append_text(files.path(self.workdir) / MEMBERSHIP, json.dumps(row) + "\n")

  # -- waiting and leading -------------------------------------------------------------------

  def _await_global(self, p: int, r: int) -> Held:
    """Global parameters of fragment p after round r: made from round r - 1's and round r's update
    when it appears (the full global if the update does not apply), led by this island when it is
    the round's leader; an `IslandsError` when no island makes them in time."""
    limit = HUNG_FACTOR * self.ic.deadline_s
    started, pause, warned = _now(), 0.005, False
    with self.lock:
      self.waiting = [p, r]
    try:
      while True:
        try:
          held = self._read_update(p, r, self.held[p])
          committed = isinstance(held, str)
          if committed:  # the update does not apply here: the full global (written after it)
            if not warned:
              self.say(f"island {self.id}: {held}; reading full global parameters instead")
              warned = True
            held = self._newest_global(p, after=r - 1)
            if held is None:  # none newer than this round yet: train on from this island's round until one is
              self.say(
                f"island {self.id}: fragment {p} round {r}: no snapshot past round {r - 1} yet; "
                f"going on from round {self.held[p].round}"
              )
              return self.held[p]
        except BadObject as e:
          raise IslandsError(f"island {self.id}: {e}; the run cannot go on past it (start a new store)") from None
        if held is not None:
          self._adopt(p, held)
          return held
        reporters = {k for k in map(_last_int, self.store.list(f"deltas/{p}/{r:08d}/")) if k is not None}
        live = self._live()
        leaders = sorted(k for k in reporters if k in live)
        waited = _now() - started
        if leaders and leaders[0] == self.id and not committed:
          missing = self._missing(p, r, live, reporters)
          if not missing and waited <= limit:  # about to lead: first make sure no island has just come
            missing = self._missing(p, r, self._live(refresh=True), reporters)
          if not missing or waited > limit:
            held = self._lead(p, r, reporters, missing)
            if held is not None:  # this island wrote the round: no need to read it back
              self._adopt(p, held)
              return held
            continue
        elif waited > limit + 3 * self.ic.deadline_s:
          raise IslandsError(
            f"island {self.id}: no global parameters for fragment {p} round {r} after {waited:.0f} s "
            f"(reported: {sorted(reporters)}; live: {sorted(live)}); is the store shared by every island?"
          )
        time.sleep(pause)
        pause = min(self.poll_s, 1.5 * pause)
    finally:
      with self.lock:
        self.waiting = None

  def _missing(self, p: int, r: int, live: dict[int, dict], reporters: set[int]) -> set[int]:
    """The islands round r of fragment p still waits for: the live ones that will report it (their
    heartbeat's next round is not past it); in a run's first round, every island."""
    expected = {k for k, m in live.items() if m["next_round"][p] <= r} | {self.id}
    if r == 1:  # the first round waits for the islands still starting up too (not for one that is done)
      expected |= {k for k in range(self.count) if not self.heartbeats.get(k, {}).get("done")}
    return expected - reporters

  def _outer_state(self, p: int, r: int):
    """The outer optimizer state after round r of fragment p: this island's own if it led round r,
    else (the leader changed) the newest it can have, its own of an earlier round or the newest
    `outer/` snapshot, said in one line with how many rounds stale it is; from zero if there is none."""
    template = self.held[p].arrays
    if r == 0:
      return self.tx.init(template)
    cached = self.outer_cache.get(p)
    if cached is not None and cached[0] == r:
      return cached[1]
    found = cached if cached is not None and cached[0] < r else None
    treedef = jax.tree_util.tree_structure(self.tx.init(template))
    snapshots = []
    for key in self.store.list(f"outer/{p}/"):
      parts = key.rsplit("/", 2)
      if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) <= r:
        snapshots.append((int(parts[1]), key))
    for s, key in sorted(snapshots, reverse=True):
      if found is not None and found[0] >= s:
        break
      try:
        obj = self._fetch(key, "outer", self._trusted(), listed=True)
        if obj.meta.get("fragment") != p or obj.meta.get("round") != s:
          raise BadObject(
            f"{self.store.url}{key}: says fragment {obj.meta.get('fragment')} round {obj.meta.get('round')}"
          )
        if any(str(i) not in obj.arrays for i in range(treedef.num_leaves)):
          raise BadObject(f"{self.store.url}{key}: not {treedef.num_leaves} momentum arrays")
        leaves = [obj.arrays[str(i)] for i in range(treedef.num_leaves)]
      except BadObject as e:
        self.say(f"island {self.id}: {e}; trying an older outer momentum")
        continue
      found = (s, jax.tree_util.tree_unflatten(treedef, leaves))
      break
    if found is None:
      self.say(f"island {self.id}: fragment {p}: no outer momentum up to round {r}; restarting it from zero")
      return self.tx.init(template)
    self.say(
      f"island {self.id}: fragment {p}: leading after round {r} with the outer momentum of round {found[0]} "
      f"({r - found[0]} rounds stale: the leader changed)"
    )
    return found[1]

  def _delta_of(self, p: int, r: int, k: int) -> tuple[list[np.ndarray], int, str]:
    """(dequantised outer gradient, tokens, content hash) of island k's delta; BadObject if unusable."""
    if k == self.id and (p, r) in self.sent:
      return self.sent[(p, r)]
    trusted = self._claim_key(k)
    if trusted is None:
      raise BadObject(f"island {k} has no claim in the store")
    key = delta_key(p, r, k)
    obj = self._fetch(key, "delta", [trusted], listed=True)
    m = obj.meta
    if m.get("fragment") != p or m.get("round") != r or m.get("island") != k:
      raise BadObject(f"{self.store.url}{key}: says fragment {m.get('fragment')} round {m.get('round')}")
    if m.get("base_round") != r - 1 or obj.parents != [self.held[p].content_hash]:
      raise BadObject(f"{self.store.url}{key}: based on round {m.get('base_round')}'s global parameters, not {r - 1}'s")
    arrays = []
    for i in self.layout.fragments[p]:
      name, shape = self.layout.names[i], self.layout.shapes[i]
      codes = obj.arrays.get(f"{name}:codes")
      scales = obj.arrays.get(f"{name}:scales", np.zeros(0, np.float32))
      if codes is None:
        raise BadObject(f"{self.store.url}{key}: no {name}")
      try:
        arrays.append(np.asarray(diloco.dequantize(codes, scales, shape), np.float32))
      except ValueError as e:
        raise BadObject(f"{self.store.url}{key}: {e}") from None
    tokens = m.get("tokens")
    if not isinstance(tokens, int) or tokens < 0:
      raise BadObject(f"{self.store.url}{key}: tokens {tokens!r}")
    return arrays, tokens, obj.content_hash

  def _dropped(self, p: int, members: list[int], rejected: dict[str, str], missing: set[int]) -> dict[str, str]:
    """{island: why} for each island of the previous round (or that this round waited for) that is
    not a member of this one."""
    out = dict(rejected)
    for k in sorted(set(self.held[p].meta.get("members", [])) | missing):
      if k in members or str(k) in out:
        continue
      beat = self.heartbeats.get(k, {})
      if k in missing:
        out[str(k)] = f"no delta within {HUNG_FACTOR} x islands.deadline_s"
      elif beat.get("done"):
        out[str(k)] = "left the run (done)"
      else:
        out[str(k)] = "no heartbeat within islands.deadline_s"
    return out

  def _lead(self, p: int, r: int, reporters: set[int], missing: set[int]) -> Held | None:
    """Computes round r of fragment p from every valid delta, writes its update (once: the commit
    point), then on snapshot rounds outer/ and global/; the new global parameters, or None if another
    island wrote the round first."""
    deltas, bad = {}, {}
    for k in sorted(reporters):
      try:
        deltas[k] = self._delta_of(p, r, k)
      except BadObject as e:
        bad[k] = str(e)
        self.say(f"island {self.id}: fragment {p} round {r}: island {k}'s delta rejected, not used: {e}")
    screened = robust.screen(
      {k: d[0] for k, d in deltas.items()}, max_norm_ratio=self.ic.max_norm_ratio, min_cosine=self.ic.min_cosine
    )
    for k, why in screened.rejected.items():
      self.say(f"island {self.id}: fragment {p} round {r}: island {k}'s delta rejected, not used: {why}")
    rejected = {str(k): why for k, why in sorted({**bad, **screened.rejected}.items())}
    held = self.held[p]
    members = screened.kept
    weights = [deltas[k][1] for k in members]
    total = float(sum(weights))
    if total > 0:
      mean = robust.aggregate(self.ic.aggregate, [deltas[k][0] for k in members], weights, self.ic.trim)
      update, state = self.tx.update(mean, self._outer_state(p, r - 1), held.arrays)
      update = [np.asarray(u, np.float32) for u in update]
    else:  # nothing valid arrived (or no tokens): the parameters and the momentum stay
      update, state = [np.zeros_like(a) for a in held.arrays], self._outer_state(p, r - 1)
    coded = {}  # the update quantised like the deltas: what every island applies to its round r - 1
    for i, u in zip(self.layout.fragments[p], update):
      codes, scales = diloco.quantize(u, self.ic.bits, self.ic.quant_block)
      coded[f"{self.layout.names[i]}:codes"] = np.asarray(codes)
      if self.ic.bits != 32:
        coded[f"{self.layout.names[i]}:scales"] = np.asarray(scales, np.float32)
    new_global = _apply(self.layout, p, held.arrays, coded, "this island's update")
    meta = {
      "round": r,
      "fragment": p,
      "members": members,
      "tokens": weights,
      "dropped": self._dropped(p, members, rejected, missing),
      "screen": {"aggregate": self.ic.aggregate, "islands": screened.numbers(), "note": screened.note},
      "leader": self.id,
      "params_sha256": _digest(new_global),
    }
    parents = [held.content_hash] + [deltas[k][2] for k in members]
    data, digest = self._encode("update", update_key(p, r), coded, {**meta, "bits": self.ic.bits}, parents=parents)
    if not self.store.put_new(update_key(p, r), data):
      return None
    self.outer_cache[p] = (r, state)  # kept here between snapshots
    if r % self.ic.snapshot_every == 0:  # full float32 snapshots: momentum for a new leader, then the global
      okey = outer_key(p, r, self.id)
      leaves = [np.asarray(x, np.float32) for x in jax.tree_util.tree_leaves(state)]
      data, _ = self._encode("outer", okey, {str(i): a for i, a in enumerate(leaves)}, {"fragment": p, "round": r})
      self.store.put(okey, data)
      data, _ = self._encode("global", global_key(p, r), self.layout.named(p, new_global), meta, parents=[digest])
      self.store.put_new(global_key(p, r), data)  # for islands that join, restart or fall behind
    self._record(p, r, deltas, screened, bad)  # only the round's leader (its update landed) judges its deltas
    return Held(r, new_global, digest, meta, snapshot=held.snapshot)

  def _record(self, p: int, r: int, deltas: dict, screened: robust.Screen, bad: dict[int, str]) -> None:
    """One ledger entry per delta this island judged as round r's leader: accepted, or rejected with the
    reason (the screen's numbers, or the check that failed); tokens and the model FLOPs they claim."""
    if self.ledger is None:
      return
    if self.flops_per_token is None:
      from manifold.model.accounting import training_flops_per_token

      self.flops_per_token = training_flops_per_token(self.model_cfg, self.seq_len)
    numbers = screened.numbers()
    for k in sorted(set(deltas) | set(bad)):
      if k in deltas:
        _, tokens, digest = deltas[k]
        why, found = screened.rejected.get(k, ""), numbers[str(k)]
      else:  # failed a check: the object is not trusted, so neither are its hash and tokens
        tokens, digest, why, found = 0, "", bad[k], {"norm": None, "ratio": None, "cosine": None}
      contributor = self.identity.public_key if k == self.id else self.claims.get(k, "")
      self.ledger.record(
        "island_delta",
        contributor=contributor,
        object_hash=digest,
        tokens=tokens,
        flops=tokens * self.flops_per_token,
        verdict="rejected" if why else "accepted",
        reason=why,
        detail={"fragment": p, "round": r, "island": k, **found},
      )

  # -- the end -------------------------------------------------------------------------------

  def close(self) -> None:
    """Stops heartbeats and leaves the run (a last heartbeat says done, so no round waits for it)."""
    self.stop.set()
    if self.beat is not None:
      self.beat.join(timeout=max(5.0, 2 * self.ic.heartbeat_s))
      if self.error is not None:  # the store is gone: no goodbye (the others drop this island at its deadline)
        return
      try:
        self._heartbeat(done=True)
      except StoreError as e:
        self.say(f"island {self.id}: could not say goodbye to the store: {e}")


def connect(cfg, workdir: str, say: Callable[[str], None]) -> StoreSync:
  """The island of `cfg.islands` (store set): opens the store, checks this island's config against
  the run's and claims its id (each refusal one `ConfigError` line). `join` starts it."""
  if jax.process_count() > 1:
    raise ConfigError(
      f"islands.store: an island of an independent-jobs run is one process here ({jax.process_count()} processes); "
      "run each island as one process, or use the in-job islands (mesh.island)"
    )
  ic = validate(cfg).islands
  store = open_store(ic.store)
  try:
    identity = Identity.load_or_create(identity_path(workdir))
    fingerprint = check_config(store, identity, cfg)
    claim(store, identity, ic.id, ic.count, fingerprint)
  except StoreUnavailable as e:
    raise IslandsError(f"island {ic.id}: the store failed past its retries: {e}") from None
  except StoreError as e:  # the identity key file
    raise ConfigError(str(e)) from None
  return StoreSync(cfg, workdir, store, identity, fingerprint, say)


__all__ = ["IslandsError", "Layout", "StoreSync", "connect", "first_difference", "shared_config"]
