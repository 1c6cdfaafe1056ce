"""Tests for manifold.data: sources, tokenizers, token stores and batch iterators."""

import json
import os
import re

import numpy as np
import pytest

from manifold.data import (
  EOS,
  BatchIterator,
  ByteTokenizer,
  DataError,
  SourceFile,
  build_token_store,
  eval_batches,
  load_data,
  load_tokenizer,
  read_documents,
  resolve_sources,
  split_files,
  stdlib_files,
  train_bpe,
  write_manifest,
)

SEQ_LEN = 16


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path


def random_text(rng, num_chars):
  return "".join(rng.choice(list("abcdefghij klmnop\nqrstuvwxyzé€"), num_chars))


@pytest.fixture
def corpus(tmp_path):
  """Six text files of distinct random text under tmp_path/corpus."""
  rng = np.random.default_rng(0)
  return [write(tmp_path / "corpus" / f"doc{i}.txt", random_text(rng, 1500)) for i in range(6)]


@pytest.fixture
def store(tmp_path, corpus):
  files = resolve_sources(str(tmp_path / "corpus" / "*.txt"))
  return build_token_store(files, ByteTokenizer(), "text", str(tmp_path / "cache"))


def window_index(store, seq_len):
  """Maps each window's bytes to its index; asserts windows are distinguishable."""
  tokens = store.read(0, len(store))
  num_windows = (len(tokens) - 1) // seq_len
  index = {tokens[i * seq_len : i * seq_len + seq_len + 1].tobytes(): i for i in range(num_windows)}
  assert len(index) == num_windows
  return index


class CountingTokenizer(ByteTokenizer):
  def __init__(self):
    super().__init__()
    self.calls = 0

  def encode_batch(self, texts):
    self.calls += 1
    return super().encode_batch(texts)


# Sources.


def test_split_is_deterministic_by_file_and_both_sides_nonempty(tmp_path):
  files = [SourceFile(str(tmp_path / f"f{i}.py"), f"pkg/f{i}.py") for i in range(40)]
  train, val = split_files(files, 0.2)
  assert (train, val) == split_files(list(reversed(files)), 0.2)
  assert train and val and set(train).isdisjoint(val) and set(train) | set(val) == set(files)
  assert train == sorted(train, key=lambda f: f.name)
  # A file's side depends only on its name, not on which other files are present.
  sub_train, sub_val = split_files([f for f in files if f not in val[:1]], 0.2)
  assert set(sub_val) <= set(val) and set(sub_train) == set(train)
  assert len(split_files(files, 0.0)[1]) == 1
  assert len(split_files(files, 1.0)[0]) == 1
  with pytest.raises(DataError, match="data.sources.*at least two files"):
    split_files(files[:1], 0.1)


def test_stdlib_files_finds_megabytes_of_python_and_no_test_dirs():
  files = stdlib_files()
  assert sum(os.path.getsize(f.path) for f in files) > 5_000_000
  assert all(f.path.endswith(".py") and os.path.isabs(f.path) for f in files)
  excluded = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
  assert not any(excluded & set(f.name.split(os.sep)) for f in files)
  assert [f.name for f in files] == sorted(f.name for f in files)


def test_resolve_sources_names_glob_matches_relative_to_base_and_explicit_files_by_basename(tmp_path):
  write(tmp_path / "a" / "x.txt", "x")
  write(tmp_path / "a" / "sub" / "y.txt", "y")
  write(tmp_path / "b" / "z.md", "z")
  files = resolve_sources(f"{tmp_path}/a/**/*.txt, {tmp_path}/b/z.md,{tmp_path}/a/x.txt")
  assert [f.name for f in files] == [os.path.join("sub", "y.txt"), "x.txt", "z.md"]
  assert all(os.path.isabs(f.path) for f in files)


def test_unmatched_pattern_error_names_pattern_and_field(tmp_path):
  write(tmp_path / "a.txt", "a")
  pattern = f"{tmp_path}/nothing/**/*.txt"
  with pytest.raises(DataError, match=f"data.sources.*{re.escape(pattern)}"):
    resolve_sources(f"{tmp_path}/a.txt,{pattern}")
  with pytest.raises(DataError, match="data.sources"):
    resolve_sources(" , ")


def test_jsonl_yields_one_document_per_line_from_the_configured_field(tmp_path):
  path = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": "two\\u2028x", "id": 2}\n{"text": ""}\n')
  assert read_documents(SourceFile(str(path), "d.jsonl"), "text") == ["one", "two\u2028x"]
  with pytest.raises(DataError, match=r"d\.jsonl:1: .*'body'.*data\.jsonl_field"):
    read_documents(SourceFile(str(path), "d.jsonl"), "body")
  bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\nnot json\n')
  with pytest.raises(DataError, match=r"bad\.jsonl:2: "):
    read_documents(SourceFile(str(bad), "bad.jsonl"), "text")


def test_binary_files_are_refused_by_content_naming_them(tmp_path):
  write(tmp_path / "ok.txt", "plain text")
  (tmp_path / "blob.txt").write_bytes(b"valid UTF-8 \x00 with a NUL")
  with pytest.raises(
    DataError, match=r"^data\.sources: 1 binary file\(s\) \(NUL bytes\): \S*blob\.txt; drop them"
  ) as e:
    resolve_sources(f"{tmp_path}/*.txt")
  assert "ok.txt" not in str(e.value)


def test_undecodable_file_error_names_the_file(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("café".encode("latin-1"))
  with pytest.raises(DataError, match="latin1.txt.*UTF-8"):
    read_documents(SourceFile(str(path), "latin1.txt"), "text")


# Tokenizers.


def test_byte_tokenizer_round_trips_unicode_and_counts_one_byte_per_token():
  tok = ByteTokenizer()
  text = "naïve café — 日本語 🚀\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.decode(ids) == text
  assert tok.token_byte_lengths[ids].sum() == len(text.encode("utf-8"))
  assert tok.decode([*ids[:4], tok.eos_id, 999, -5]) == text[:3]
  assert tok.decode(ids[:3]) == "na\ufffd"  # Half of "ï" decodes leniently.


def test_bpe_round_trips_text_has_eos_and_byte_lengths_sum_to_utf8_length(tmp_path, corpus):
  files = resolve_sources(str(tmp_path / "corpus" / "*.txt"))
  tok = train_bpe(files, 300, str(tmp_path / "tok" / "bpe.json"))
  assert tok.vocab_size == 300 and tok.decode([tok.eos_id]) == ""
  assert load_tokenizer(str(tmp_path / "tok" / "bpe.json")).fingerprint == tok.fingerprint
  text = "abc klm\nqrs é€ 日本 " + EOS + " tail"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.eos_id not in ids  # The separator string inside a document is plain text.
  assert len(ids) < len(text.encode("utf-8"))
  assert tok.token_byte_lengths[ids].sum() == len(text.encode("utf-8"))
  assert isinstance(tok.decode(np.arange(tok.vocab_size)), str)


def test_tokenizer_config_errors_name_the_field(tmp_path):
  with pytest.raises(DataError, match="--vocab-size"):
    train_bpe([], 257, str(tmp_path / "t.json"))
  with pytest.raises(DataError, match="data.tokenizer.*manifold tokenizer train"):
    load_tokenizer(str(tmp_path / "missing.json"))
  assert load_tokenizer("byte").vocab_size == 257


# Token stores.


def test_token_store_is_documents_each_followed_by_eos(tmp_path):
  docs = write(tmp_path / "d.jsonl", '{"text": "ab"}\n{"text": "é"}\n')
  write(tmp_path / "p.txt", "xyz")
  write(tmp_path / "empty.txt", "")
  tok = ByteTokenizer()
  store = build_token_store(resolve_sources(f"{tmp_path}/*"), tok, "text", str(tmp_path / "cache"))
  expected = np.concatenate([tok.encode("ab"), [256], tok.encode("é"), [256], tok.encode("xyz"), [256]])
  np.testing.assert_array_equal(store.read(0, len(store)), expected)
  assert store.read(0, 2).dtype == np.int32
  np.testing.assert_array_equal(store.read_many(np.array([3, 0]), 2), [expected[3:5], expected[0:2]])
  assert {r.name: r.bytes for r in store.records} == {"d.jsonl": docs.stat().st_size, "empty.txt": 0, "p.txt": 3}


def test_token_store_is_content_addressed_and_reused(tmp_path, corpus):
  cache = tmp_path / "cache"
  files = resolve_sources(str(tmp_path / "corpus" / "*.txt"))
  first = build_token_store(files, ByteTokenizer(), "text", str(cache))
  tok = CountingTokenizer()
  second = build_token_store(files, tok, "text", str(cache))
  assert second.path == first.path and tok.calls == 0 and os.listdir(cache) == [os.path.basename(first.path)]
  write(corpus[0], corpus[0].read_text() + "!")
  third = build_token_store(files, tok, "text", str(cache))
  assert third.path != first.path and tok.calls > 0 and len(third) == len(first) + 1
  assert build_token_store(files, ByteTokenizer(), "body", str(cache)).path != third.path


def test_empty_corpus_error_names_sources(tmp_path):
  write(tmp_path / "a.txt", "")
  write(tmp_path / "b.jsonl", '{"text": ""}\n')
  with pytest.raises(DataError, match="data.sources"):
    build_token_store(resolve_sources(f"{tmp_path}/*"), ByteTokenizer(), "text", str(tmp_path / "cache"))


def test_load_data_builds_disjoint_splits_and_writes_manifest(tmp_path, corpus):
  data = load_data(
    sources=f"{tmp_path}/corpus/*.txt",
    tokenizer="byte",
    jsonl_field="text",
    val_fraction=0.3,
    cache_dir=str(tmp_path / "cache"),
  )
  splits = {r.name: r.split for r in data.records}
  assert set(splits) == {p.name for p in corpus} and set(splits.values()) == {"train", "val"}
  assert len(data.train) + len(data.val) == sum(len(p.read_bytes()) + 1 for p in corpus)
  path = tmp_path / "run" / "data.json"
  tokens = {"train": len(data.train), "val": len(data.val)}
  write_manifest(str(path), data.records, tokenizer=data.tokenizer, tokens=tokens)
  manifest = json.loads(path.read_text())
  assert manifest["tokenizer"] == "byte" and manifest["tokens"]["val"] == len(data.val)
  assert {f["name"]: f["split"] for f in manifest["files"]} == splits
  assert set(manifest["files"][0]) == {"path", "name", "bytes", "sha256", "split"}


# Batches.


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_iterator_is_deterministic_in_its_seed(store):
  a, b, c = (BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=s) for s in (1, 1, 2))
  batches_a, batches_b, batches_c = take(a, 5), take(b, 5), take(c, 5)
  assert batches_a[0].shape == (8, SEQ_LEN + 1) and batches_a[0].dtype == np.int32
  np.testing.assert_array_equal(batches_a, batches_b)
  assert not np.array_equal(batches_a, batches_c)


def test_batch_iterator_visits_every_window_once_per_epoch(store):
  index = window_index(store, SEQ_LEN)
  batch_size = 8
  iterator = BatchIterator(store, batch_size=batch_size, seq_len=SEQ_LEN, seed=0)
  per_epoch = len(index) // batch_size
  epochs = []
  for epoch in range(2):
    assert iterator.state_dict() == {"epoch": epoch, "position": 0, "seed": 0}
    epochs.append([index[row.tobytes()] for batch in take(iterator, per_epoch) for row in batch])
    assert len(set(epochs[-1])) == len(epochs[-1]) == per_epoch * batch_size
  assert epochs[0] != epochs[1]


def test_batch_iterator_resumes_bit_for_bit_from_state_dict(store):
  reference = BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=3)
  expected = take(reference, 200)  # Crosses an epoch boundary.
  interrupted = BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=3)
  take(interrupted, 117)
  state = json.loads(json.dumps(interrupted.state_dict()))
  resumed = BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=3)
  resumed.load_state_dict(state)
  np.testing.assert_array_equal(take(resumed, 83), expected[117:])
  with pytest.raises(DataError, match="seed"):
    BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=4).load_state_dict(state)


def test_batch_iterator_shards_concatenate_to_the_global_batch(store):
  whole = take(BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=5), 4)
  shards = [
    take(BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=5, shard_index=i, shard_count=2), 4) for i in range(2)
  ]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([shards[0][step], shards[1][step]]), batch)
  with pytest.raises(DataError, match="train.batch_size"):
    BatchIterator(store, batch_size=8, seq_len=SEQ_LEN, seed=5, shard_count=3)


def test_batch_iterator_rejects_a_batch_larger_than_the_data(store):
  with pytest.raises(DataError, match=rf"train\.batch_size.*train\.seq_len.*{len(store)} tokens"):
    BatchIterator(store, batch_size=len(store), seq_len=SEQ_LEN, seed=0)


def test_eval_batches_are_fixed_consecutive_windows(store):
  batches = eval_batches(store, batch_size=4, seq_len=SEQ_LEN, num_batches=3)
  np.testing.assert_array_equal(batches, eval_batches(store, batch_size=4, seq_len=SEQ_LEN, num_batches=3))
  assert len(batches) == 3 and batches[0].shape == (4, SEQ_LEN + 1) and batches[0].dtype == np.int32
  windows = np.concatenate(batches)
  tokens = store.read(0, 12 * SEQ_LEN + 1)
  for i, window in enumerate(windows):
    np.testing.assert_array_equal(window, tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN + 1])
  available = (len(store) - 1) // SEQ_LEN // 4
  assert len(eval_batches(store, batch_size=4, seq_len=SEQ_LEN, num_batches=10**9)) == available
  with pytest.raises(DataError, match=rf"eval\.batch_size.*{len(store)} tokens"):
    eval_batches(store, batch_size=len(store), seq_len=SEQ_LEN, num_batches=1)
