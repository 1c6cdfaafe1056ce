"""`manifold verify WORKDIR`: re-hash every tensor and file of a run and check every signature, the
manifest chain and the ledger; the first broken link is one line naming the file, checkpoint or
signature.

What is trusted: the keys given with `--trust` (public key files or hex), else the public key of
the run's own key file when the workdir has it, else the signer of the ledger's first line (then a
run re-signed whole with another key passes: give `--trust` for a model you received).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Iterable

from manifold import files
from manifold.data.errors import DataError
from manifold.provenance import attestation, data_roots, ledger, lineage, tensors
from manifold.provenance.data_roots import ROOTS_FILE

KEY_FILES = ("run.key", "island.key", "learner.key")


class BrokenLink(RuntimeError):
  """The first check that failed (its message names what and where)."""


@dataclasses.dataclass
class Summary:
  trusted: str  # how the trusted keys were chosen
  checkpoints: int = 0  # checkpoints whose files and tensors were re-hashed
  retired: int = 0
  manifests: int = 0
  ledger_entries: int = 0
  data_files: int = 0
  data_shards: int = 0  # distillation caches re-hashed, rl shards' leaves checked
  data_missing: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    out = [
      f"trusted keys: {self.trusted}",
      f"manifests: {self.manifests} signed, chained from the first to the newest",
      f"checkpoints: {self.checkpoints} re-hashed (files and tensors), {self.retired} retired by keep-N",
      f"ledger: {self.ledger_entries} entries, chain and signatures intact",
      f"data: {self.data_files} corpus files re-hashed, {self.data_shards} other shards checked"
      + (f", {self.data_missing} not present here (not checked)" if self.data_missing else ""),
    ]
    return out + self.notes


def public_key(text: str) -> str:
  """A trusted key from `--trust`: a `.pub` file written by `manifold keys new`, or 64 hex characters."""
  value = text.strip()
  try:
    value = files.path(value).read_text().strip() if files.path(value).exists() else value
  except OSError:
    pass
  if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
    raise BrokenLink(f"--trust {text}: not a public key (64 hex characters) or a file holding one")
  return value


def _trusted(workdir: str, trust: Iterable[str], checked: ledger.Checked) -> tuple[set[str], str]:
  keys = {public_key(t) for t in trust}
  if keys:
    return keys, ", ".join(k[:16] + "..." for k in sorted(keys)) + " (--trust)"
  from manifold.store import Identity

  for name in KEY_FILES:
    path = files.path(workdir) / name
    if path.exists():
      key = Identity.load_or_create(str(path)).public_key
      return {key}, f"{key[:16]}... (the run's {name})"
  if checked.entries:
    key = checked.entries[0]["signer"]
    return {key}, f"{key[:16]}... (the ledger's first signer; pass --trust to pin it)"
  return set(), "none (no ledger)"


def _restore_state(directory) -> dict:
  """The saved train state as host arrays, whatever devices it was saved from."""
  import jax
  import orbax.checkpoint as ocp

  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns of an optional metadata file per restore
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(directory)
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return checkpointer.restore(directory, target)


def _check_checkpoint(workdir: str, step: int, m: lineage.Manifest) -> None:
  folder = files.path(workdir) / "checkpoints" / str(step)
  where = f"checkpoint {step} ({folder})"
  have = {r["name"]: r["digest"] for r in tensors.directory_resources(folder)}
  want = {r["name"]: r["digest"] for r in m.resources}
  for name in sorted(want):
    if name not in have:
      raise BrokenLink(f"{where}: file {name} is missing")
    if have[name] != want[name]:
      raise BrokenLink(f"{where}: file {name} does not hash as its manifest {m.path} says (changed)")
  extra = sorted(set(have) - set(want))
  if extra:
    raise BrokenLink(f"{where}: file {extra[0]} is not in its manifest (added)")
  try:
    state = _restore_state(str(folder / "state"))
  except Exception as e:  # noqa: BLE001 -- orbax raises many kinds for damaged files
    raise BrokenLink(f"{where}: does not restore ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
  named, rest = lineage.state_hashes(state)
  for name in sorted(set(named) | set(m.body["tensors"])):
    if named.get(name) != m.body["tensors"].get(name):
      raise BrokenLink(f"{where}: tensor {name} does not hash as its manifest says")
  if rest != m.body["optimizer_digest"]:
    raise BrokenLink(f"{where}: the optimizer state (or step) does not hash as its manifest says")


def _check_data(workdir: str, summary: Summary, newest: lineage.Manifest | None, entries: list[dict]) -> None:
  """Re-hashes the corpus files, the distillation cache and the rl shards' leaves the run read, and
  the newest manifest's training root when everything it covers is here."""
  docs = data_roots.TrainingDocuments(workdir)
  if docs.roots_sha is not None and newest is not None and newest.body["data"]["roots"] != docs.roots_sha:
    raise BrokenLink(f"{workdir}/{ROOTS_FILE}: not the data roots checkpoint {newest.step}'s manifest signed (edited)")
  try:
    for f in (docs.roots or {}).get("files", []):
      if data_roots.check_file(f):
        summary.data_files += 1
      else:
        summary.data_missing += 1
    for shard in (docs.roots or {}).get("shards", []):
      from manifold.distill.cache import check_shard

      if check_shard(shard):
        summary.data_shards += 1
      else:
        summary.data_missing += 1
    covered = newest.body["contributions"]["to"] if newest is not None else 0
    docs.add(entries[:covered])  # each leaves file read and checked once: these for the tree, the rest below
    for shard in data_roots.ledger_shards(entries[covered:]):
      data_roots.read_leaves(workdir, shard["root"])
    shards = data_roots.ledger_shards(entries)
    summary.data_shards += len(shards)
    if newest is not None and shards and not summary.data_missing:
      if docs.tree().root.hex() != newest.body["data"]["train_root"]:
        raise BrokenLink(
          f"checkpoint {newest.step}: its manifest's train_root is not the root of the run's training documents"
        )
  except DataError as e:
    raise BrokenLink(str(e)) from None


def verify_run(workdir: str, trust: Iterable[str] = ()) -> Summary:
  """Checks everything `manifold verify` checks; returns the summary or raises `BrokenLink`."""
  root = files.path(workdir)
  if not (root / "config.json").exists():
    raise BrokenLink(f"{workdir}: no config.json; not a manifold run directory")
  try:
    checked = ledger.read(workdir)
  except ledger.LedgerError as e:
    raise BrokenLink(str(e)) from None
  keys, how = _trusted(workdir, trust, checked)
  summary = Summary(trusted=how, ledger_entries=len(checked.entries))
  try:
    ledger.check_entries(ledger.read_lines(workdir) or [], f"{workdir}/{ledger.LEDGER_FILE}", keys)
  except ledger.LedgerError as e:
    raise BrokenLink(str(e)) from None

  manifests: dict[str, lineage.Manifest] = {}
  for step, path in lineage.manifest_files(workdir):
    try:
      m = lineage.read_manifest(path)
    except attestation.AttestationError as e:
      raise BrokenLink(f"checkpoint {step}: manifest {path}: {e}") from None
    if m.signer not in keys:
      raise BrokenLink(f"checkpoint {step}: manifest {path} is signed by {m.signer[:16]}..., not a trusted key")
    if m.step != step:
      raise BrokenLink(f"manifest {path}: says step {m.step} (renamed)")
    manifests[m.hash] = m
  summary.manifests = len(manifests)

  by_entry = {e["object"]: e for e in checked.entries if e["kind"] == "checkpoint"}
  for e in by_entry.values():
    if e["object"] not in manifests:
      step = e["detail"].get("step")
      raise BrokenLink(f"checkpoint {step}: its manifest {e['object'][:12]}... (ledger line {e['seq'] + 1}) is gone")
  heads = [ledger.GENESIS] + [ledger.entry_hash(e) for e in checked.entries]
  for m in sorted(manifests.values(), key=lambda m: m.step):
    if m.hash not in by_entry:
      raise BrokenLink(f"checkpoint {m.step}: manifest {m.path} is not in the ledger (added)")
    parent = m.body["parent"]
    if parent is not None and parent["manifest"] not in manifests:
      raise BrokenLink(
        f"checkpoint {m.step}: its parent, checkpoint {parent['step']}'s manifest {parent['manifest'][:12]}..., is gone"
      )
    c = m.body["contributions"]
    if not (0 <= c["to"] < len(heads)) or heads[c["to"]] != c["head"]:
      raise BrokenLink(f"checkpoint {m.step}: its manifest pins ledger line {c['to']}, which has changed")
    listed = [s for s in m.body["data"].get("shards", []) if s["kind"].startswith("rl ")]
    if listed != data_roots.ledger_shards(checked.entries[c["from"] : c["to"]]):
      raise BrokenLink(f"checkpoint {m.step}: its manifest's rl shards are not those its ledger range accepted")
    config = root / lineage.CONFIGS / f"{m.body['config']}.json"
    if not config.exists() or hashlib.sha256(config.read_bytes()).hexdigest() != m.body["config"]:
      raise BrokenLink(f"checkpoint {m.step}: its config {config} is missing or changed")

  newest_of: dict[int, lineage.Manifest] = {}
  order = {h: e["seq"] for h, e in by_entry.items()}
  for m in sorted(manifests.values(), key=lambda m: (m.step, order[m.hash])):
    newest_of[m.step] = m
  newest = max(newest_of.values(), key=lambda m: order[m.hash], default=None)
  if newest is not None and hashlib.sha256((root / "config.json").read_bytes()).hexdigest() != newest.body["config"]:
    raise BrokenLink(f"{workdir}/config.json: not the config checkpoint {newest.step}'s manifest signed (replaced)")
  _check_data(workdir, summary, newest, checked.entries)

  retired = {e["object"] for e in checked.entries if e["kind"] == "retired"}
  folder = root / "checkpoints"
  present = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  for step in present:
    if step not in newest_of:
      raise BrokenLink(f"checkpoint {step} ({folder / str(step)}): has no signed manifest")
  for step, m in sorted(newest_of.items()):
    if step in present:
      _check_checkpoint(workdir, step, m)
      summary.checkpoints += 1
    elif m.hash in retired:
      summary.retired += 1
    else:
      raise BrokenLink(f"checkpoint {step} ({folder / str(step)}): its files are gone, and no ledger entry retired it")
  if not manifests:
    summary.notes.append("no signed checkpoints (provenance was off, or the run has not saved one)")
  return summary
