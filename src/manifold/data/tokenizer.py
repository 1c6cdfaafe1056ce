"""Tokenizers: raw UTF-8 bytes, or byte-level BPE in Hugging Face `tokenizers` JSON format.

Every tokenizer reserves `<|endoftext|>` as the document separator. `token_byte_lengths[i]` is the
number of UTF-8 bytes token `i` stands for (special tokens count as 1 byte), so that
`bits_per_byte = sum(nll_bits) / sum(token_byte_lengths[targets])`.
"""

import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from manifold.data.errors import DataError
from manifold.data.sources import SourceFile, read_documents
from manifold.files import atomic_path
from manifold.files import path as file_path

EOS = "<|endoftext|>"


class Tokenizer(Protocol):
  """What the data pipeline and the training loop need from a tokenizer."""

  name: str  # For logs.
  vocab_size: int
  eos_id: int  # Appended after every document.
  fingerprint: str  # Stable across processes; changes whenever the id mapping does.
  token_byte_lengths: np.ndarray  # [vocab_size] int32.

  def encode(self, text: str) -> np.ndarray:
    """[num_tokens] int32 ids of `text`; never emits `eos_id`."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`[encode(t) for t in texts]`, possibly in parallel."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; special tokens render as nothing, invalid UTF-8 as U+FFFD."""


class ByteTokenizer:
  """Ids 0..255 are UTF-8 bytes; id 256 is `<|endoftext|>`."""

  name = "byte"
  vocab_size = 257
  eos_id = 256
  fingerprint = "byte"

  def __init__(self):
    self.token_byte_lengths = np.ones(self.vocab_size, np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64).ravel()
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def byte_level_characters() -> list[str]:
  """GPT-2's `bytes_to_unicode`: the character that stands for each byte 0..255 (printable bytes
  for themselves, the others for 256, 257, ... in byte order)."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
  remapped = iter(range(256, 512))
  return [chr(b if b in printable else next(remapped)) for b in range(256)]


class BpeTokenizer:
  """Byte-level BPE loaded from a Hugging Face `tokenizers` JSON file."""

  def __init__(self, path: str):
    self.path = os.fspath(file_path(path))
    raw = file_path(self.path).read_bytes()
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:
      raise DataError(
        f"data.tokenizer: {path} is not a tokenizers JSON file ({e}); train one with `manifold tokenizer train`"
      ) from None
    # `<|endoftext|>` inside a document is text, not a separator.
    self._tokenizer.encode_special_tokens = True
    eos_id = self._tokenizer.token_to_id(EOS)
    if eos_id is None:
      raise DataError(f"data.tokenizer: {path} has no {EOS} token; train one with `manifold tokenizer train`")
    self.name = f"bpe:{file_path(self.path).name}"
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = eos_id
    self.fingerprint = hashlib.sha256(raw).hexdigest()
    self.token_byte_lengths = self._byte_lengths()

  def _byte_lengths(self) -> np.ndarray:
    """[vocab_size] int32: each byte-level character is one byte; special tokens count 1."""
    alphabet = frozenset(byte_level_characters())
    special = self._tokenizer.get_added_tokens_decoder()
    lengths = np.ones(self.vocab_size, np.int32)
    for token_id in range(self.vocab_size):
      token = self._tokenizer.id_to_token(token_id)
      if token_id in special or token is None:
        continue
      if not alphabet.issuperset(token):
        raise DataError(
          f"data.tokenizer: {self.path} token {token!r} is not byte-level BPE; "
          "train one with `manifold tokenizer train`"
        )
      lengths[token_id] = len(token)
    return lengths

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64).ravel()
    return self._tokenizer.decode(ids[(ids >= 0) & (ids < self.vocab_size)].tolist(), skip_special_tokens=True)


def train_bpe(files: list[SourceFile], vocab_size: int, out_path: str, jsonl_field: str = "text") -> BpeTokenizer:
  """Trains byte-level BPE with `vocab_size` ids (256 bytes, `<|endoftext|>`, merges) on `files`."""
  if vocab_size < 258:
    raise DataError(f"--vocab-size={vocab_size} leaves no merges; use at least 258 (256 bytes + {EOS} + 1 merge)")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator((doc for f in files for doc in read_documents(f, jsonl_field)), trainer=trainer)
  out_path = os.fspath(file_path(out_path))
  with atomic_path(out_path) as tmp_path:
    tokenizer.save(tmp_path)
  return BpeTokenizer(out_path)


def load_tokenizer(spec: str) -> Tokenizer:
  """`data.tokenizer`: "byte", or the path of a byte-level BPE JSON file."""
  if spec == "byte":
    return ByteTokenizer()
  found = file_path(spec)
  if not found.is_file():
    raise DataError(
      f"data.tokenizer: {spec!r} is neither 'byte' nor an existing file; train one with `manifold tokenizer train`"
    )
  return BpeTokenizer(os.fspath(found))
