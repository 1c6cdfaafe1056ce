"""Training data: source files, tokenizers, cached token streams and batch iterators."""

import dataclasses

from manifold.data.errors import DataError
from manifold.data.loader import BatchIterator, eval_batches
from manifold.data.manifest import check_manifest, write_manifest
from manifold.data.sources import (
  SourceFile,
  absolute_sources,
  read_documents,
  resolve_sources,
  split_files,
  stdlib_files,
)
from manifold.data.token_store import FileRecord, TokenStore, build_token_store
from manifold.data.tokenizer import EOS, BpeTokenizer, ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
  "EOS",
  "BatchIterator",
  "BpeTokenizer",
  "ByteTokenizer",
  "Data",
  "DataError",
  "FileRecord",
  "SourceFile",
  "TokenStore",
  "Tokenizer",
  "absolute_sources",
  "build_token_store",
  "check_manifest",
  "eval_batches",
  "load_data",
  "load_tokenizer",
  "read_documents",
  "resolve_sources",
  "split_files",
  "stdlib_files",
  "train_bpe",
  "write_manifest",
]


@dataclasses.dataclass
class Data:
  """A tokenizer and the train/val token streams built with it."""

  tokenizer: Tokenizer
  train: TokenStore
  val: TokenStore
  records: list[FileRecord]  # Train files, then val files.


def load_data(*, sources: str, tokenizer: str, jsonl_field: str, val_fraction: float, cache_dir: str) -> Data:
  """Resolves `sources`, splits them by file, and builds (or reuses) both token stores under `cache_dir`."""
  train_files, val_files = split_files(resolve_sources(sources), val_fraction)
  tok = load_tokenizer(tokenizer)
  train = build_token_store(train_files, tok, jsonl_field, cache_dir, split="train")
  val = build_token_store(val_files, tok, jsonl_field, cache_dir, split="val")
  return Data(tok, train, val, train.records + val.records)
