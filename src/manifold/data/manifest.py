"""The run's data manifest: which files, split how, and how many tokens each split holds."""

import dataclasses
import json

from manifold.data.token_store import FileRecord
from manifold.files import write_atomic


def write_manifest(path: str, records: list[FileRecord], *, tokenizer_name: str, tokens: dict[str, int]) -> None:
  """Atomically writes `{"tokenizer", "tokens": {split: count}, "files": [record, ...]}` as JSON."""
  manifest = {"tokenizer": tokenizer_name, "tokens": tokens, "files": [dataclasses.asdict(r) for r in records]}
  write_atomic(path, json.dumps(manifest, indent=2) + "\n")
