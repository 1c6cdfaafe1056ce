"""The contribution ledger: an append-only, hash-chained, signed record of whose work a run used.

`<workdir>/ledger.jsonl` holds one canonical-JSON entry per line:

    seq          0, 1, 2, ... (no gaps)
    prev         the entry hash of line seq - 1 (64 zeros for the first)
    time         seconds since the epoch
    kind         what was offered: "rollout" (an RL worker's batch), "island_delta" (an island's outer
                 gradient), "checkpoint" (a signed checkpoint manifest), "retired" (keep-N removed a
                 checkpoint's files; its manifest stays)
    contributor  the producer's Ed25519 public key (hex)
    object       the content hash of what was offered (a store object's, or a manifest's)
    tokens       tokens of work it claims (generated tokens of a rollout, trained tokens of a delta)
    flops        model FLOPs of that work by `manifold.model.accounting`'s analytic count
    verdict      "accepted" | "rejected"
    reason       why a rejection (one line; "" when accepted)
    detail       a JSON dict of the rest (round, version, key, the check's numbers)
    signer       the public key of the process that judged it (the learner, a round's leader)
    signature    Ed25519 by `signer` over the canonical JSON of the entry without `signature`

An entry's hash is the sha256 of its canonical JSON line (signature included), so editing, dropping
or reordering a line breaks the chain at the first changed entry, and re-signing with another key
shows as another signer. Runs with a store mirror each entry there as a signed object under
`ledger/<signer>/<seq:08d>` (the store's one object format), so every party can read every judge's
chain. Only accepted entries earn credit (`totals`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Iterable

from manifold import files
from manifold.store import Identity, Store, StoreError, canonical_json, publish, verify

LEDGER_FILE = "ledger.jsonl"
GENESIS = "0" * 64
KINDS = ("rollout", "island_delta", "checkpoint", "retired")
VERDICTS = ("accepted", "rejected")
STORE_KIND = "ledger-entry"


class LedgerError(RuntimeError):
  """A ledger that does not verify; the message names the line and the broken link."""


def entry_hash(entry: dict) -> str:
  return hashlib.sha256(canonical_json(entry)).hexdigest()


def _signed_bytes(entry: dict) -> bytes:
  return canonical_json({k: v for k, v in entry.items() if k != "signature"})


def _signature_ok(public_key: str, signature: Any, data: bytes) -> bool:
  try:
    return isinstance(signature, str) and verify(public_key, bytes.fromhex(signature), data)
  except ValueError:
    return False


def store_key(signer: str, seq: int) -> str:
  return f"ledger/{signer}/{seq:08d}"


@dataclasses.dataclass(frozen=True)
class Checked:
  """A verified ledger: its entries, the hash of the last (GENESIS when empty), and the signers seen."""

  entries: list[dict]
  head: str
  signers: set[str]


def check_entries(lines: Iterable[str], source: str, trusted: Iterable[str] | None = None) -> Checked:
  """Verifies a ledger's lines in order: JSON, canonical form, seq, prev link, signature, and
  (`trusted` given) that the signer is one of those keys. Raises `LedgerError` naming the first
  broken line."""
  trusted = None if trusted is None else set(trusted)
  entries, head, signers = [], GENESIS, set()
  for n, line in enumerate(lines, start=1):
    where = f"{source} line {n}"
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      raise LedgerError(f"{where}: not JSON (torn or edited)") from None
    if not isinstance(entry, dict) or canonical_json(entry).decode("utf-8") != line:
      raise LedgerError(f"{where}: not in canonical form (edited by hand)")
    if entry.get("seq") != n - 1:
      raise LedgerError(f"{where}: seq {entry.get('seq')!r}, expected {n - 1} (a line was removed or reordered)")
    if entry.get("prev") != head:
      raise LedgerError(f"{where}: its prev hash is not the hash of line {n - 1} (a line before it was edited)")
    signer, signature = entry.get("signer", ""), entry.get("signature", "")
    if not (isinstance(signer, str) and _signature_ok(signer, signature, _signed_bytes(entry))):
      raise LedgerError(f"{where}: signature does not verify for signer {str(signer)[:16]}... (edited after signing)")
    if trusted is not None and signer not in trusted:
      raise LedgerError(f"{where}: signed by {signer[:16]}..., not by the run's key")
    entries.append(entry)
    signers.add(signer)
    head = entry_hash(entry)
  return Checked(entries, head, signers)


def read_lines(workdir: str) -> list[str] | None:
  """The ledger's lines (None when the run has no ledger)."""
  text = files.read_text(files.path(workdir) / LEDGER_FILE)
  return None if text is None else text.splitlines()


def read(workdir: str, trusted: Iterable[str] | None = None) -> Checked:
  """The run's verified ledger (empty when there is none)."""
  lines = read_lines(workdir)
  return check_entries(lines or [], f"{workdir}/{LEDGER_FILE}", trusted)


_OPEN: dict[str, Ledger] = {}


class Ledger:
  """The ledger of one judge (a run, a learner, an island): appends entries signed by `identity`.
  Use `Ledger.open`, which gives every caller in a process the same writer for a workdir.

  Opening it verifies the whole chain (a run refuses to extend a broken one). A final line left
  torn by a crash (no newline at the end) is moved to `ledger.jsonl.torn` and reported through
  `say`: it was never a complete entry. `store` (with `fingerprint`): each entry is also published
  there (`store_key`)."""

  def __init__(
    self,
    workdir: str,
    identity: Identity,
    *,
    store: Store | None = None,
    fingerprint: str = "",
    say: Callable[[str], None] = print,
  ):
    self.path = files.path(workdir) / LEDGER_FILE
    self.identity, self.store, self.fingerprint, self.say = identity, store, fingerprint, say
    self.path.parent.mkdir(parents=True, exist_ok=True)
    text = files.read_text(self.path) or ""
    if text and not text.endswith("\n"):
      body, _, torn = text.rpartition("\n")
      files.append_text(files.path(workdir) / f"{LEDGER_FILE}.torn", torn + "\n")
      files.write_atomic(self.path, body + "\n" if body else "")
      say(f"{self.path}: a torn last line (a crash mid-write) moved to {LEDGER_FILE}.torn")
      text = body + "\n" if body else ""
    checked = check_entries(text.splitlines(), str(self.path))
    self.entries = checked.entries  # every entry so far (this writer's view of the file)
    self.seq, self.head = len(checked.entries), checked.head

  @classmethod
  def open(
    cls,
    workdir: str,
    identity: Identity,
    *,
    store: Store | None = None,
    fingerprint: str = "",
    say: Callable[[str], None] = print,
  ) -> Ledger:
    """The process's one writer of `<workdir>/ledger.jsonl` (opened on first use; a later caller
    may add the store mirror). Raises ValueError if it is asked to sign with another identity."""
    key = str(files.path(workdir) / LEDGER_FILE)
    ledger = _OPEN.get(key)
    if ledger is None:
      ledger = _OPEN[key] = cls(workdir, identity, store=store, fingerprint=fingerprint, say=say)
    elif ledger.identity.public_key != identity.public_key:
      raise ValueError(f"{key}: already open with key {ledger.identity.public_key[:16]}...; one judge per ledger")
    elif store is not None and ledger.store is None:
      ledger.store, ledger.fingerprint = store, fingerprint
    return ledger

  def close(self) -> None:
    """Forgets this writer (the next `open` re-reads and re-verifies the file)."""
    _OPEN.pop(str(self.path), None)

  def record(
    self,
    kind: str,
    *,
    contributor: str,
    object_hash: str,
    tokens: int = 0,
    flops: float = 0.0,
    verdict: str = "accepted",
    reason: str = "",
    detail: dict[str, Any] | None = None,
  ) -> dict:
    """Appends one entry (flushed before returning; mirrored to the store if there is one); the entry."""
    if kind not in KINDS:
      raise ValueError(f"ledger kind {kind!r}: one of {KINDS}")
    if verdict not in VERDICTS:
      raise ValueError(f"ledger verdict {verdict!r}: one of {VERDICTS}")
    entry = {
      "seq": self.seq,
      "prev": self.head,
      "time": round(time.time(), 3),
      "kind": kind,
      "contributor": contributor,
      "object": object_hash,
      "tokens": int(tokens),
      "flops": float(flops),
      "verdict": verdict,
      "reason": " ".join(reason.split()),
      "detail": dict(detail or {}),
      "signer": self.identity.public_key,
    }
    entry["signature"] = self.identity.sign(_signed_bytes(entry)).hex()
    line = canonical_json(entry).decode("utf-8")
    files.append_text(self.path, line + "\n")
    self.entries.append(entry)
    self.seq, self.head = self.seq + 1, entry_hash(entry)
    if self.store is not None:
      try:
        publish(self.store, store_key(entry["signer"], entry["seq"]), STORE_KIND, {}, entry, self.identity,
                self.fingerprint)  # fmt: skip
      except StoreError as e:  # the local ledger has it; the mirror is for other parties
        self.say(f"ledger entry {entry['seq']}: not mirrored to the store ({e})")
    return entry


def totals(entries: Iterable[dict]) -> dict[str, dict[str, float]]:
  """Per contributor: accepted and rejected counts, and the tokens and FLOPs of accepted work
  (credit is paid on accepted work only); checkpoint and retirement entries are not contributions."""
  out: dict[str, dict[str, float]] = {}
  for e in entries:
    if e["kind"] not in ("rollout", "island_delta"):
      continue
    row = out.setdefault(e["contributor"], {"accepted": 0, "rejected": 0, "tokens": 0, "flops": 0.0})
    row[e["verdict"]] += 1
    if e["verdict"] == "accepted":
      row["tokens"] += e["tokens"]
      row["flops"] += e["flops"]
  return out


def read_store(store: Store) -> dict[str, Checked]:
  """Every judge's ledger mirrored in `store` ({signer: verified chain}); `LedgerError` names the
  first object or line that does not verify."""
  from manifold.store import BadObject, fetch

  by_signer: dict[str, list[str]] = {}
  for key in sorted(store.list("ledger/")):
    parts = key.split("/")
    if len(parts) != 3:
      continue
    try:
      obj = fetch(store, key, kind=STORE_KIND)
    except BadObject as e:
      raise LedgerError(str(e)) from None
    if obj is None:
      continue
    if obj.producer != parts[1] or obj.meta.get("signer") != parts[1]:
      raise LedgerError(f"{store.url}{key}: stored under {parts[1][:16]}... but signed by {obj.producer[:16]}...")
    by_signer.setdefault(parts[1], []).append(canonical_json(obj.meta).decode("utf-8"))
  return {s: check_entries(lines, f"{store.url}ledger/{s}", [s]) for s, lines in by_signer.items()}
