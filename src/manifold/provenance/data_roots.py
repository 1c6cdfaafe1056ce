"""Data roots: Merkle roots over the documents a run reads, and proofs that a document was (or was
not) in its training data.

Every run writes `data_roots.json` beside its manifest: for each corpus file, its content hash,
split, document count and the root of the sorted Merkle tree of its documents (a document is what
the loader reads: a whole file, or one `.jsonl` line's field; a leaf is the sha256 of its UTF-8
bytes with a leaf prefix, `manifold.provenance.merkle`), and one root over all training documents
(`train_root`) and one over the held-out ones (`val_root`).

    manifold provenance prove WORKDIR --document PATH [--out proof.json]
    manifold provenance verify proof.json [--document PATH]

`prove` rebuilds the training tree from the files (each must still hash as the manifest says) and
writes an inclusion proof, or the two neighbouring leaves that show the document is absent;
`verify` checks a proof against the root it names and, given the document, that the proof is
about that document. Nothing but the proof and the root is needed to verify.
"""

from __future__ import annotations

import hashlib
import json
import os

from manifold import files
from manifold.data.errors import DataError
from manifold.data.sources import SourceFile, read_documents
from manifold.provenance.merkle import Inclusion, Tree, check, leaf_hash

ROOTS_FILE = "data_roots.json"
FORMAT = "manifold-data-roots/1"
PROOF_FORMAT = "manifold-document-proof/1"


def document_leaf(text: str) -> bytes:
  return leaf_hash(text.encode("utf-8"))


def _leaves(path: str, name: str, jsonl_field: str) -> list[bytes]:
  return [document_leaf(d) for d in read_documents(SourceFile(path, name), jsonl_field)]


def data_roots(records, jsonl_field: str) -> dict:
  """The content of `data_roots.json` for a run's file records (train, then val)."""
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
    "train_root": Tree(by_split["train"]).root.hex(),
    "val_root": Tree(by_split["val"]).root.hex(),
  }


def write_data_roots(workdir: str, records, jsonl_field: str) -> None:
  files.write_atomic(files.path(workdir) / ROOTS_FILE, json.dumps(data_roots(records, jsonl_field), indent=1))


def read_data_roots(workdir: str) -> dict:
  text = files.read_text(files.path(workdir) / ROOTS_FILE)
  if text is None:
    raise DataError(f"{workdir}: no {ROOTS_FILE}; train there with this version of manifold first")
  return json.loads(text)


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


def prove(workdir: str, document: str) -> dict:
  """The proof (JSON-ready) that `document` is, or is not, one of the run's training documents."""
  roots = read_data_roots(workdir)
  leaves = []
  for f in roots["files"]:
    if f["split"] != "train":
      continue
    if not check_file(f):
      raise DataError(f"{f['path']}: the run's training file is gone; a proof needs every training file")
    leaves += _leaves(f["path"], f["name"], roots["jsonl_field"])
  tree = Tree(leaves)
  if tree.root.hex() != roots["train_root"]:
    raise DataError(f"{workdir}/{ROOTS_FILE}: its train_root does not match the training files; the file was edited")
  leaf = document_leaf(document)
  present, proofs = tree.prove(leaf)
  return {
    "format": PROOF_FORMAT,
    "document_leaf": leaf.hex(),
    "present": present,
    "root": roots["train_root"],
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
