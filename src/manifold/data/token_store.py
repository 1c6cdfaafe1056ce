"""Content-addressed on-disk token streams: each split is one 1-D zarr array read with tensorstore."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorstore as ts

from manifold.data.errors import DataError
from manifold.data.sources import SourceFile, read_documents
from manifold.data.tokenizer import Tokenizer
from manifold.files import atomic_path

_FORMAT_VERSION = 1
_CHUNK_TOKENS = 1 << 20
# Decoded-chunk cache shared by every open store, so random windows rarely touch disk.
_CONTEXT = ts.Context({"cache_pool": {"total_bytes_limit": 1 << 30}})


@dataclasses.dataclass(frozen=True)
class FileRecord:
  """Provenance of one source file, as written to the run manifest."""

  name: str
  path: str
  bytes: int
  sha256: str
  split: str


class TokenStore:
  """Read-only view of a token stream: `[len(self)]` ids, stored as uint16 or uint32."""

  def __init__(self, path: str, records: list[FileRecord]):
    self.path = path
    self.records = records
    self._array = ts.open(
      {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": path},
        "recheck_cached_data": False,
      },
      context=_CONTEXT,
      open=True,
      read=True,
    ).result()

  def __len__(self) -> int:
    return self._array.shape[0]

  def read(self, start: int, stop: int) -> np.ndarray:
    """[stop - start] int32 tokens."""
    return self._array[start:stop].read().result().astype(np.int32)

  def read_many(self, starts: np.ndarray, length: int) -> np.ndarray:
    """[len(starts), length] int32: row i is tokens[starts[i] : starts[i] + length], read concurrently."""
    futures = [self._array[int(s) : int(s) + length].read() for s in starts]
    out = np.empty((len(futures), length), np.int32)
    for row, future in zip(out, futures):
      row[:] = future.result()
    return out


def _file_record(f: SourceFile, split: str) -> FileRecord:
  with open(f.path, "rb") as fh:
    digest = hashlib.file_digest(fh, "sha256").hexdigest()
  return FileRecord(f.name, f.path, os.path.getsize(f.path), digest, split)


def _store_key(records: list[FileRecord], tokenizer: Tokenizer, jsonl_field: str) -> str:
  """sha256 of everything the token stream depends on."""
  content = {
    "format": _FORMAT_VERSION,
    "tokenizer": tokenizer.fingerprint,
    "jsonl_field": jsonl_field,
    "files": [[r.name, r.bytes, r.sha256] for r in records],
  }
  return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()


def _tokenize(files: list[SourceFile], tokenizer: Tokenizer, jsonl_field: str, dtype: np.dtype) -> np.ndarray:
  """All documents of `files` in order, each followed by `eos_id`: [num_tokens] `dtype`."""
  eos = np.array([tokenizer.eos_id], dtype)
  pieces = []
  for f in files:
    for ids in tokenizer.encode_batch(read_documents(f, jsonl_field)):
      pieces += [ids.astype(dtype), eos]
  return np.concatenate(pieces) if pieces else np.empty(0, dtype)


def _write_array(path: str, tokens: np.ndarray) -> None:
  ts.open(
    {
      "driver": "zarr",
      "kvstore": {"driver": "file", "path": path},
      "metadata": {
        "dtype": tokens.dtype.str,
        "shape": [tokens.size],
        "chunks": [min(tokens.size, _CHUNK_TOKENS)],
        "compressor": None,
      },
    },
    create=True,
  ).result().write(tokens).result()


def build_token_store(
  files: list[SourceFile], tokenizer: Tokenizer, jsonl_field: str, cache_dir: str, *, split: str = "train"
) -> TokenStore:
  """Tokenizes `files` into `<cache_dir>/<content key>`, or opens it if an earlier run already did.

  `split` only labels the returned `records`; it is not part of the key.
  """
  records = [_file_record(f, split) for f in files]
  path = os.path.join(cache_dir, _store_key(records, tokenizer, jsonl_field))
  if not os.path.isdir(path):
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    tokens = _tokenize(files, tokenizer, jsonl_field, dtype)
    if tokens.size == 0:
      raise DataError(f"data.sources: every {split} document is empty; add non-empty files")
    try:
      with atomic_path(path, directory=True) as tmp_path:
        _write_array(tmp_path, tokens)
    except OSError:
      if not os.path.isdir(path):  # Otherwise a concurrent writer published the same content first.
        raise
  return TokenStore(path, records)
