"""Checkpoint lineage: a signed manifest for every checkpoint, chained back to where the run began.

For each checkpoint `checkpoints/<step>/` a run writes
`provenance/checkpoints/<step:08d>.<hash12>.json`: a DSSE envelope (`attestation`) whose statement
lists the blake3 of every file of the checkpoint (model-signing's `resources`) and, under
`predicate.manifold`:

    step, signer                 the step and the signing key (hex)
    parent                       {step, manifest} of the checkpoint this one trained on from (null for the first),
    origin                       where the first began: {"kind": "init", "seed"}, {"kind": "hf", "files"},
                                 {"kind": "run", "workdir", "step", "manifest"} (RL / distillation starts)
    tensors, tensors_digest      the hash of every parameter and model variable (`tensors`: the same from 1
                                 device or 8) and one digest over them
    optimizer_digest             one digest over the rest of the state: optimizer, step (an in-job island run: inner states)
    config                       sha256 of the run's config.json then (a copy: provenance/configs/<sha256>.json)
    data                         sha256 of data_roots.json; the shards read since the parent (the first
                                 manifest of a run: its corpus files and distillation cache; each:
                                 the accepted rollout batches' prompts and rollouts); train_root, the
                                 root of every training document so far (`data_roots`); and the data
                                 position (the iterator state) at the parent and now
    contributions                the ledger range since the parent ({from, to, head}) and its accepted
                                 tokens and FLOPs per contributor

The manifest's hash is the sha256 of the statement; a child names it, and the ledger records it
(kind "checkpoint"), so the manifests form a hash chain that the ledger also pins. When keep-N
removes an old checkpoint's files, its manifest stays and the ledger records a "retired" entry;
`manifold verify` accepts a missing checkpoint only when it was retired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Callable

import jax

from manifold import files
from manifold.provenance import attestation, data_roots, ledger, tensors
from manifold.store import Identity, IdentityError, canonical_json

MANIFESTS = "provenance/checkpoints"
CONFIGS = "provenance/configs"
FORMAT = "manifold-checkpoint/1"
_NAME = re.compile(r"(\d{8})\.([0-9a-f]{12})\.json")


def key_path(cfg, workdir: str) -> str:
  """The key a `manifold train` run signs with: a store island's own identity (`island.key`, the key
  its store objects carry), else `provenance.key`, else `<workdir>/run.key`. (An RL learner signs
  with its `learner.key`.)"""
  if cfg.islands.store:
    from manifold.islands.store_sync import identity_path

    return identity_path(workdir)
  if cfg.provenance.key:
    return cfg.provenance.key
  if files.is_remote(workdir):  # a private key never goes to a bucket: keep it on this machine
    from manifold.train.run import default_cache_dir

    return os.path.join(default_cache_dir(), "keys", workdir.split("://", 1)[1].strip("/"), "run.key")
  return str(files.path(workdir) / "run.key")


def load_key(path: str) -> Identity:
  from manifold.config import ConfigError

  try:
    return Identity.load_or_create(path)
  except IdentityError as e:
    raise ConfigError(f"provenance.key: {e}") from None


@dataclasses.dataclass(frozen=True)
class Manifest:
  """One verified manifest file."""

  path: str
  step: int
  hash: str  # sha256 of the statement
  signer: str
  body: dict  # predicate.manifold
  resources: list[dict]


def manifest_files(workdir: str) -> list[tuple[int, Any]]:
  """(step, path) of every manifest file, in step order."""
  folder = files.path(workdir) / MANIFESTS
  if not folder.exists():
    return []
  found = [(m, p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
  return sorted(((int(m.group(1)), p) for m, p in found), key=lambda sp: (sp[0], sp[1].name))


def read_manifest(path) -> Manifest:
  """The manifest at `path`, its signature and layout checked (`AttestationError` if not)."""
  try:
    envelope = json.loads(files.path(path).read_text())
  except (OSError, ValueError) as e:
    raise attestation.AttestationError(f"unreadable ({type(e).__name__})") from None
  stmt, signer, digest = attestation.open_envelope(envelope)
  body = stmt["predicate"].get("manifold")
  if not isinstance(body, dict) or body.get("format") != FORMAT:
    raise attestation.AttestationError(f"no {FORMAT} lineage in the statement")
  return Manifest(str(path), int(body["step"]), digest, signer, body, stmt["predicate"]["resources"])


def newest_manifest(workdir: str, step: int | None = None) -> str | None:
  """The hash of the newest readable manifest of `workdir` (of checkpoint `step` if given), or None."""
  found = [m for m in Lineage.read_all(workdir) if step is None or m.step == step]
  return found[-1].hash if found else None


def state_hashes(state) -> tuple[dict[str, str], str]:
  """({name: hash} of the parameters and model variables, one digest of the rest: the optimizer
  state and step, and an in-job island run's inner states) of a train state, in memory (a TrainState
  or IslandState) or restored as a dict. Every process of a job must call it: it gathers sharded arrays."""
  fields = state if isinstance(state, dict) else {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  named = tensors.tree_hashes(fields["params"], "params/") | tensors.tree_hashes(fields["extra"], "extra/")
  rest = {k: v for k, v in fields.items() if k not in ("params", "extra")}
  return named, tensors.digest(tensors.tree_hashes(rest))


def _since(entries: list[dict]) -> dict[str, dict[str, float]]:
  return {
    k: {"tokens": v["tokens"], "flops": v["flops"], "accepted": v["accepted"]}
    for k, v in ledger.totals(entries).items()
  }


class Lineage:
  """Signs a manifest for each checkpoint of the run in `workdir`.

  `begin(step, state, data_state)` (every process, at save time) hashes the state in memory;
  `finish(keep)` (every process, once the save's files are complete) hashes the files and, on
  the main process, writes the manifest and its ledger entry, and retires what keep-N removed."""

  def __init__(
    self,
    workdir: str,
    identity: Identity,
    *,
    origin: dict[str, Any],
    say: Callable[[str], None] = print,
  ):
    self.workdir, self.identity, self.origin, self.say = workdir, identity, origin, say
    self.is_main = jax.process_index() == 0
    self.ledger = ledger.Ledger.open(workdir, identity, say=say) if self.is_main else None
    entries = self.ledger.entries if self.ledger else None  # verified when the ledger was opened
    self.known = self.read_all(workdir, entries)  # every manifest, kept up to date here (so a save reads none back)
    self.retired = {e["object"] for e in entries or [] if e["kind"] == "retired"}
    self.parent: Manifest | None = None
    self.pending: dict[str, Any] | None = None
    self.documents: data_roots.TrainingDocuments | None = None  # read at the first save
    self.tensor_s = self.file_s = 0.0  # the newest manifest's time: hashing the state; its files and signing

  def resume(self, step: int | None, state=None) -> None:
    """Continues the chain from the newest manifest of checkpoint `step` (the one restored, whose
    `state` is given); a checkpoint saved without provenance becomes the chain's origin, named by
    its tensors' digest (every process must call this: it may hash `state`)."""
    self.parent = None
    if step is None:
      return
    mine = [m for m in self.known if m.step == step]
    self.parent = mine[-1] if mine else None
    if self.parent is None:
      digest = tensors.digest(state_hashes(state)[0])
      self.origin = {"kind": "unsigned-checkpoint", "step": step, "tensors_digest": digest}
      if self.is_main:
        self.say(f"checkpoint {step} has no signed manifest; the chain of its successors starts at it")

  @staticmethod
  def read_all(workdir: str, entries: list[dict] | None = None) -> list[Manifest]:
    """Every readable manifest, in step order, newest of a step last (by the order of the ledger,
    read here unless its verified `entries` are given)."""
    try:
      entries = ledger.read(workdir).entries if entries is None else entries
    except ledger.LedgerError:
      entries = []  # `manifold verify` reports it
    order = {e["object"]: e["seq"] for e in entries if e["kind"] == "checkpoint"}
    out = []
    for _, path in manifest_files(workdir):
      try:
        out.append(read_manifest(path))
      except attestation.AttestationError:
        continue  # `manifold verify` reports it
    return sorted(out, key=lambda m: (m.step, order.get(m.hash, -1)))

  def begin(self, step: int, state, data_state: dict) -> None:
    began = time.perf_counter()
    named, optimizer = state_hashes(state)
    self.pending = {"step": step, "tensors": named, "optimizer": optimizer, "data_state": data_state}
    self.tensor_s = time.perf_counter() - began

  def finish(self, keep: int) -> Manifest | None:
    """Writes the pending manifest (its checkpoint's files must be complete); None if none pending."""
    pending, self.pending = self.pending, None
    if pending is None or not self.is_main:
      return None
    began = time.perf_counter()
    root = files.path(self.workdir)
    step = pending["step"]
    resources = tensors.directory_resources(root / "checkpoints" / str(step))
    config_text = (root / "config.json").read_text()
    config_sha = hashlib.sha256(config_text.encode()).hexdigest()
    copy = root / CONFIGS / f"{config_sha}.json"
    if not copy.exists():
      copy.parent.mkdir(parents=True, exist_ok=True)
      files.write_atomic(copy, config_text)
    parent = self.parent
    begun = parent.body["contributions"]["to"] if parent else 0
    entries = self.ledger.entries[begun:]
    if self.documents is None:
      self.documents = data_roots.TrainingDocuments(self.workdir)
    self.documents.add(self.ledger.entries)
    body = {
      "format": FORMAT,
      "step": step,
      "signer": self.identity.public_key,
      "parent": {"step": parent.step, "manifest": parent.hash} if parent else None,
      "origin": self.origin if parent is None else None,
      "tensors": pending["tensors"],
      "tensors_digest": tensors.digest(pending["tensors"]),
      "optimizer_digest": pending["optimizer"],
      "config": config_sha,
      "data": {
        "roots": self.documents.roots_sha,
        "shards": (self.documents.run_shards() if parent is None else []) + data_roots.ledger_shards(entries),
        "train_root": self.documents.root(),
        "position_from": parent.body["data"]["position_to"] if parent else None,
        "position_to": hashlib.sha256(canonical_json(pending["data_state"])).hexdigest(),
      },
      "contributions": {
        "from": begun,
        "to": self.ledger.seq,
        "head": self.ledger.head,
        "accepted": _since(entries),
      },
    }
    stmt = attestation.statement(f"{root.name}/checkpoints/{step}", resources, body)
    envelope, digest = attestation.sign(stmt, self.identity)
    path = root / MANIFESTS / f"{step:08d}.{digest[:12]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, json.dumps(envelope, indent=1))
    self.ledger.record("checkpoint", contributor=self.identity.public_key, object_hash=digest, detail={"step": step})
    self.parent = Manifest(str(path), step, digest, self.identity.public_key, body, stmt["predicate"]["resources"])
    self.known.append(self.parent)
    self._retire_removed(keep)
    self.file_s = time.perf_counter() - began
    self.say(f"checkpoint {step}: manifest {digest[:12]} signed ({self.tensor_s + self.file_s:.2f} s)")
    return self.parent

  def retire(self, step: int, reason: str) -> None:
    """Records that checkpoint `step`'s files are gone for `reason` (its manifests stay)."""
    if not self.is_main:
      return
    for m in self.known:
      if m.step == step and m.hash not in self.retired:
        self.retired.add(m.hash)
        self.ledger.record(
          "retired", contributor=self.identity.public_key, object_hash=m.hash, reason=reason, detail={"step": step}
        )

  def _retire_removed(self, keep: int) -> None:
    """Retires the manifested steps older than the newest `keep` whose files keep-N removed."""
    live = {m.step for m in self.known if m.hash not in self.retired}
    steps = sorted({m.step for m in self.known})
    for step in steps[: max(0, len(steps) - keep)]:
      if step in live and not (files.path(self.workdir) / "checkpoints" / str(step)).exists():
        self.retire(step, "keep-N removed its files")
