"""The run's data manifest: which files, split how, with which tokenizer, and how many tokens
each split holds; and the check that a resumed run (or eval) still has that data."""

import dataclasses
import json
import os

from manifold import files
from manifold.data.errors import DataError
from manifold.data.token_store import FileRecord
from manifold.data.tokenizer import Tokenizer


def write_manifest(
  path: str | os.PathLike, records: list[FileRecord], *, tokenizer: Tokenizer, tokens: dict[str, int]
) -> None:
  """Atomically writes `{"tokenizer", "tokenizer_fingerprint", "tokens": {split: count}, "files": [record, ...]}`
  as JSON; the fingerprint is the sha256 of a tokenizer file ("byte" for bytes)."""
  manifest = {
    "tokenizer": tokenizer.name,
    "tokenizer_fingerprint": tokenizer.fingerprint,
    "tokens": tokens,
    "files": [dataclasses.asdict(r) for r in records],
  }
  files.write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def check_manifest(path: str | os.PathLike, tokenizer: Tokenizer, records: list[FileRecord] | None = None) -> None:
  """Raises `DataError` naming the tokenizer, or the first source file of `records`, that
  differs from the manifest at `path` (files are not compared without `records`; nothing is
  when there is no manifest yet)."""
  text = files.read_text(path)
  if text is None:
    return
  saved = json.loads(text)
  workdir = files.path(path).parent
  fingerprint = saved.get("tokenizer_fingerprint", tokenizer.fingerprint)  # older manifests have none
  if fingerprint != tokenizer.fingerprint:
    raise DataError(
      f"data.tokenizer: {getattr(tokenizer, 'path', tokenizer.name)} changed since {workdir} was trained with it "
      f"(sha256 {fingerprint[:12]}..., now {tokenizer.fingerprint[:12]}...); restore that file, or train in a new --workdir"
    )
  if records is None:
    return
  old = {f["path"]: f["sha256"] for f in saved["files"]}
  new = {r.path: r.sha256 for r in records}
  problems = [
    (sorted(new.keys() - old.keys()), "is new since {w} was trained; take it out of data.sources"),
    (sorted(old.keys() - new.keys()), "was trained on in {w} but is gone from data.sources; restore it"),
    (sorted(p for p in old.keys() & new.keys() if old[p] != new[p]), "changed since {w} was trained on it; restore it"),
  ]
  for paths, what in problems:
    if paths:
      more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
      raise DataError(
        f"data.sources: {paths[0]}{more} {what.format(w=workdir)} (see its manifest.json), or train in a new --workdir"
      )
