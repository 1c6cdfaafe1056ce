"""Data roots: Merkle roots over the documents a run reads, and proofs that a document was (or was
not) in its training data.

A document's leaf is the sha256 of its UTF-8 bytes with a leaf prefix (`manifold.provenance.merkle`);
a shard's root is that of the sorted tree of its leaves. The shards:

  corpus file     a file of data.sources; a document is what the loader reads (a whole file, or
                  one `.jsonl` line's field). Listed in `data_roots.json`, written at every start
                  with each file's content hash, split and root, and one root over all training
                  documents (`train_root`) and one over the held-out ones (`val_root`).
  distill cache   a teacher's top-k cache (`manifold.distill.cache`); a document is one batch's
                  teacher outputs. Listed in `data_roots.json` (`shards`) by a run that reads it.
  rl prompts      the prompt set of an accepted rollout batch (a document: one prompt);
  rl rollouts     its rollouts (a document: prompt + completion, as the learner trained on it).
                  Both roots are in the batch's ledger entry (`detail.data`); their sorted leaves
                  are kept in `provenance/leaves/<root>.bin` so a proof needs no rollout.

A checkpoint's manifest lists the shards read since its parent and signs `train_root`, the root of
every training document of the run so far (corpus training files and rl shards; a distillation
cache is listed, its documents are not text).

    manifold provenance prove WORKDIR --document PATH [--out proof.json]
    manifold provenance verify proof.json [--document PATH]

`prove` rebuilds the newest checkpoint's training tree (each corpus file must still hash as
recorded, each leaves file as its root) and writes an inclusion proof, or the two neighbouring leaves
that show the document is absent; `verify` checks a proof against the root it names and, given the
document, that the proof is about that document. Nothing but the proof and the root is needed to verify.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

from manifold import files
from manifold.data.errors import DataError
from manifold.data.sources import SourceFile, read_documents
from manifold.provenance.merkle import Inclusion, Tree, check, leaf_hash

ROOTS_FILE = "data_roots.json"
LEAVES = "provenance/leaves"
FORMAT = "manifold-data-roots/1"
PROOF_FORMAT = "manifold-document-proof/1"


def document_leaf(text: str) -> bytes:
  return leaf_hash(text.encode("utf-8"))


def _leaves(path: str, name: str, jsonl_field: str) -> list[bytes]:
  return [document_leaf(d) for d in read_documents(SourceFile(path, name), jsonl_field)]


def data_roots(records, jsonl_field: str, shards: Sequence[dict] = ()) -> dict:
  """The content of `data_roots.json` for a run's file records (train, then val) and the other
  `shards` it reads (rows with kind, location, root, documents)."""
  rows, by_split = [], {"train": [], "val": []}
  for r in records:
    leaves = _leaves(r.path, r.name, jsonl_field)
    by_split[r.split] += leaves
    row = {"name": r.name, "path": r.path, "split": r.split, "sha256": r.sha256, "documents": len(leaves)}
    rows.append({**row, "root": Tree(leaves).root.hex()})
  return {
    "format": FORMAT,
    "jsonl_field": jsonl_field,
    "files": rows,
    "shards": list(shards),
    "train_root": Tree(by_split["train"]).root.hex(),
    "val_root": Tree(by_split["val"]).root.hex(),
  }


def write_data_roots(workdir: str, records, jsonl_field: str, shards: Sequence[dict] = ()) -> None:
  text = json.dumps(data_roots(records, jsonl_field, shards), indent=1)
  files.write_atomic(files.path(workdir) / ROOTS_FILE, text)


def check_file(f: dict) -> bool:
  """Whether the corpus file of a `data_roots.json` row is here (False: gone); raises `DataError`
  if it no longer hashes as the run recorded."""
  try:
    digest = hashlib.sha256(files.path(f["path"]).read_bytes()).hexdigest()
  except OSError:
    return False
  if digest != f["sha256"]:
    raise DataError(f"{f['path']}: changed since the run read it (sha256 {digest[:12]}..., was {f['sha256'][:12]}...)")
  return True


def write_leaves(workdir: str, documents: Iterable[str]) -> dict:
  """{root, documents} of a shard of `documents`, whose sorted leaves are kept in `LEAVES/<root>.bin`."""
  tree = Tree([document_leaf(d) for d in documents])
  path = files.path(workdir) / LEAVES / f"{tree.root.hex()}.bin"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, b"".join(tree.leaves))
  return {"root": tree.root.hex(), "documents": len(tree.leaves)}


def read_leaves(workdir: str, root: str) -> list[bytes]:
  """The leaves of shard `root` from its leaves file (`DataError` if it is gone or does not hash to `root`)."""
  path = files.path(workdir) / LEAVES / f"{root}.bin"
  try:
    raw = path.read_bytes()
  except OSError:
    raise DataError(f"{path}: gone; the documents of shard {root[:16]}... can no longer be proven") from None
  leaves = [raw[i : i + 32] for i in range(0, len(raw), 32)]
  if len(raw) % 32 or Tree(leaves).root.hex() != root:
    raise DataError(f"{path}: does not hash to its root {root[:16]}... (edited)")
  return leaves


def ledger_shards(entries: Iterable[dict]) -> list[dict]:
  """The shards of the accepted rollout batches among ledger `entries`: {kind, seq, root, documents}."""
  return [
    {"kind": f"rl {name}", "seq": e["seq"], **row}
    for e in entries
    if e["kind"] == "rollout" and e["verdict"] == "accepted"
    for name, row in sorted(e["detail"].get("data", {}).items())
  ]


class TrainingDocuments:
  """The training documents of the run in `workdir`: its corpus training files (`data_roots.json`)
  and the rl shards of the ledger entries `add`ed."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    text = files.read_text(files.path(workdir) / ROOTS_FILE)
    self.roots = None if text is None else json.loads(text)
    self.roots_sha = None if text is None else hashlib.sha256(text.encode()).hexdigest()  # what a manifest signs
    self.added: dict[str, list[bytes]] = {}  # root -> leaves of the rl shards

  def add(self, entries: Iterable[dict]) -> None:
    for shard in ledger_shards(entries):
      if shard["root"] not in self.added:
        self.added[shard["root"]] = read_leaves(self.workdir, shard["root"])

  def run_shards(self) -> list[dict]:
    """The shards `data_roots.json` lists: one row per corpus file, then the others."""
    if self.roots is None:
      return []
    files_ = [
      {"kind": "corpus", **{k: f[k] for k in ("name", "split", "root", "documents")}} for f in self.roots["files"]
    ]
    return files_ + self.roots.get("shards", [])

  def corpus_leaves(self) -> list[bytes]:
    """The leaves of the corpus training files (`DataError` if one is gone or changed)."""
    leaves = []
    for f in (self.roots or {"files": []})["files"]:
      if f["split"] != "train":
        continue
      if not check_file(f):
        raise DataError(f"{f['path']}: the run's training file is gone; a proof needs every training file")
      leaves += _leaves(f["path"], f["name"], self.roots["jsonl_field"])
    return leaves

  def tree(self) -> Tree:
    return Tree([*self.corpus_leaves(), *(leaf for leaves in self.added.values() for leaf in leaves)])

  def root(self) -> str:
    """The training root (read from `data_roots.json` while no rl shard is added, without rereading the corpus)."""
    if not self.added and self.roots is not None:
      return self.roots["train_root"]
    return self.tree().root.hex()


def prove(workdir: str, document: str) -> dict:
  """The proof (JSON-ready) that `document` is, or is not, one of the training documents of the
  run's newest signed checkpoint (of `data_roots.json` before the first)."""
  from manifold.provenance import ledger, lineage

  docs = TrainingDocuments(workdir)
  try:
    entries = ledger.read(workdir).entries
  except ledger.LedgerError as e:
    raise DataError(f"{e}; `manifold verify {workdir}` says more") from None
  saved = [e for e in entries if e["kind"] == "checkpoint"]
  manifests = {m.hash: m for m in lineage.Lineage.read_all(workdir, entries)}
  newest = manifests.get(saved[-1]["object"]) if saved else None
  if newest is not None:
    if newest.body["data"]["roots"] != docs.roots_sha:
      raise DataError(f"{workdir}/{ROOTS_FILE}: not the one checkpoint {newest.step}'s manifest signed; it was edited")
    docs.add(entries[: newest.body["contributions"]["to"]])
    want, anchor = newest.body["data"]["train_root"], {"step": newest.step, "manifest": newest.hash}
    signed = f"checkpoint {newest.step}'s manifest"
  elif docs.roots is not None:
    want, anchor, signed = docs.roots["train_root"], None, ROOTS_FILE
  else:
    raise DataError(f"{workdir}: no signed checkpoint and no {ROOTS_FILE}; nothing records its training data")
  tree = docs.tree()
  if tree.root.hex() != want:
    raise DataError(f"{workdir}: the training documents do not hash to the root {signed} records; its data was edited")
  leaf = document_leaf(document)
  present, proofs = tree.prove(leaf)
  return {
    "format": PROOF_FORMAT,
    "document_leaf": leaf.hex(),
    "present": present,
    "root": want,
    "checkpoint": anchor,
    "proofs": [p.to_json() for p in proofs],
  }


def verify(proof: dict, document: str | None = None) -> tuple[bool, str]:
  """(valid, one line saying what the proof shows or why it fails)."""
  if proof.get("format") != PROOF_FORMAT:
    return False, f"not a document proof (format {proof.get('format')!r})"
  leaf = bytes.fromhex(proof["document_leaf"])
  if document is not None and document_leaf(document) != leaf:
    return False, "the proof is about another document"
  proofs = [Inclusion.from_json(p) for p in proof["proofs"]]
  if not check(leaf, bool(proof["present"]), proofs, bytes.fromhex(proof["root"])):
    return False, f"the proof does not lead to root {proof['root'][:16]}..."
  where = "in" if proof["present"] else "not in"
  return True, f"the document is {where} the training data of root {proof['root'][:16]}..."


def read_document(path: str) -> str:
  """A document file's text, as the loader would read a whole-file document."""
  if not os.path.isfile(path):
    raise DataError(f"--document {path}: no such file")
  with open(path, "rb") as fh:
    return fh.read().decode("utf-8")
