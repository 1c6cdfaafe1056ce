"""The teacher's top-k cache: its k likeliest next tokens per position of every training batch, for
a teacher too big to sit beside the student.

    manifold distill cache --teacher TEACHER --config experiments/distill.py:logit_cache

writes, for train.steps batches in the order the student's run will read them (train.seed,
train.batch_size, train.seq_len), zarr arrays through tensorstore under `distill.cache` (a folder,
file://, gs:// or s3:// URL):

  ids       [steps * B, T, k] int32    the teacher's k likeliest tokens at each position
  logp      [steps * B, T, k] float32  their log-probabilities at distill.temperature
  log_rest  [steps * B, T]    float32  log of the rest of the mass (-inf when k = V)
  digests   [steps, 32]       uint8    sha256 of each batch's tokens

and `manifest.json`, written last, with the fingerprints of the data (tokenizer, files, batch
order) and of the teacher (workdir, step, parameter digest, temperature, k), and the cache's Merkle
root (`manifold.provenance.merkle`): a batch's leaf hashes its tokens' digest and its ids, logp and
log_rest bytes, and a run that reads the cache lists the root among its data shards. Training opens the
cache only if both fingerprints match its own, and checks each batch's digest as it reads it: a
cache built for other data or another teacher is refused, never silently used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable

import jax
import numpy as np
import tensorstore as ts
import tqdm

from manifold import files
from manifold.config import ConfigError
from manifold.distill.losses import top_k_teacher
from manifold.distill.teacher import Teacher
from manifold.parallel import sharding
from manifold.provenance.merkle import Tree, leaf_hash

FORMAT = "manifold-topk-cache/1"


def kvstore_url(location: str) -> str:
  """A tensorstore kvstore URL (ending in '/') for a folder or URL."""
  url = location if files.is_remote(location) else "file://" + os.path.abspath(os.path.expanduser(location))
  return url.rstrip("/") + "/"


def data_fingerprint(data, train_cfg) -> str:
  """sha256 of what fixes the training batches: tokenizer, files (name and content hash), batch order."""
  described = {
    "tokenizer": data.tokenizer.fingerprint,
    "files": [(r.name, r.sha256, r.split) for r in data.records],
    "seed": train_cfg.seed,
    "batch_size": train_cfg.batch_size,
    "seq_len": train_cfg.seq_len,
  }
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def teacher_fingerprint(teacher: Teacher, temperature: float, top_k: int) -> str:
  described = {"params": teacher.digest, "step": teacher.step, "temperature": temperature, "top_k": top_k}
  return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def batch_digest(tokens: np.ndarray) -> np.ndarray:
  """[32] uint8: sha256 of a batch's int32 tokens."""
  return np.frombuffer(hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).digest(), np.uint8)


def batch_leaf(digest: np.ndarray, ids: np.ndarray, logp: np.ndarray, log_rest: np.ndarray) -> bytes:
  """The Merkle leaf of one cached batch: its tokens' digest [32] and its arrays' little-endian bytes."""
  content = hashlib.sha256()
  for array, dtype in ((ids, "<i4"), (logp, "<f4"), (log_rest, "<f4")):
    content.update(np.ascontiguousarray(array, dtype).tobytes())
  return leaf_hash(np.asarray(digest, np.uint8).tobytes() + content.digest())


def _new_array(url: str, name: str, shape, chunks, dtype: str):
  """A fresh zstd-compressed zarr array `name` under `url`."""
  metadata = {"shape": list(shape), "chunks": list(chunks), "dtype": dtype, "compressor": {"id": "zstd"}}
  spec = {"driver": "zarr", "kvstore": url + name + "/", "metadata": metadata}
  return ts.open(spec, create=True, delete_existing=True).result()


def _open_array(url: str, name: str):
  return ts.open({"driver": "zarr", "kvstore": url + name + "/"}, open=True, read=True).result()


def _kvstore(url: str):
  return ts.KvStore.open(url).result()


def build_cache(
  cfg, teacher: Teacher, data, mesh, *, say: Callable[[str], None], progress: bool = True
) -> dict[str, float]:
  """Writes the cache of `cfg.distill` (see the module doc); returns its size figures."""
  from manifold.data.loader import BatchIterator
  from manifold.train.run import global_batch

  tc, d = cfg.train, cfg.distill
  if jax.process_count() > 1:
    raise ConfigError("manifold distill cache: runs as one process; start it without a multi-host launcher")
  url = kvstore_url(d.cache)
  k = min(d.top_k, teacher.model_cfg.vocab_size)
  rows, seq = tc.steps * tc.batch_size, tc.seq_len
  store = _kvstore(url)
  _clear(store, d.cache)
  arrays = {
    "ids": _new_array(url, "ids", (rows, seq, k), (tc.batch_size, seq, k), "<i4"),
    "logp": _new_array(url, "logp", (rows, seq, k), (tc.batch_size, seq, k), "<f4"),
    "log_rest": _new_array(url, "log_rest", (rows, seq), (tc.batch_size, seq), "<f4"),
    "digests": _new_array(url, "digests", (tc.steps, 32), (tc.steps, 32), "|u1"),
  }

  def top_k(variables, batch):
    return top_k_teacher(teacher.logits(variables, batch[:, :-1]), k, d.temperature)

  top_k_jit = sharding.jit_on_mesh(
    top_k,
    mesh,
    in_shardings=(teacher.shardings, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )
  iterator = BatchIterator(data.train, batch_size=tc.batch_size, seq_len=seq, seed=tc.seed)
  digests = np.zeros((tc.steps, 32), np.uint8)
  leaves = []
  began, pending = time.perf_counter(), []
  for step in tqdm.trange(tc.steps, disable=not progress, unit="batch", desc="teacher top-k", mininterval=1.0):
    host = next(iterator)
    digests[step] = batch_digest(host)
    ids, logp, rest = jax.device_get(top_k_jit(teacher.variables, global_batch(host, mesh)))
    leaves.append(batch_leaf(digests[step], ids, logp, rest))
    at = slice(step * tc.batch_size, (step + 1) * tc.batch_size)
    pending += [arrays["ids"][at].write(ids), arrays["logp"][at].write(logp), arrays["log_rest"][at].write(rest)]
    if len(pending) > 24:  # bounded writes in flight
      for future in pending:
        future.result()
      pending = []
  for future in pending:
    future.result()
  arrays["digests"].write(digests).result()
  tokens = rows * seq
  stored = _stored_bytes(d.cache, store)
  manifest = {
    "format": FORMAT,
    "data": data_fingerprint(data, tc),
    "teacher": teacher_fingerprint(teacher, d.temperature, k),
    "teacher_workdir": teacher.workdir,
    "teacher_step": teacher.step,
    "temperature": d.temperature,
    "top_k": k,
    "steps": tc.steps,
    "batch_size": tc.batch_size,
    "seq_len": seq,
    "tokens": tokens,
    "bytes": stored,
    "bytes_per_token": stored / tokens,
    "seconds": time.perf_counter() - began,
    "root": Tree(leaves).root.hex(),
    "leaves": [leaf.hex() for leaf in leaves],
  }
  store.write("manifest.json", json.dumps(manifest, indent=2).encode()).result()
  say(
    f"cache: {tokens:,} tokens x top-{k} in {d.cache}: {stored / 2**20:.1f} MiB, {stored / tokens:.1f} bytes per "
    f"token (uncompressed {8 * k + 4}), {manifest['seconds']:.0f} s"
  )
  return {"bytes": stored, "bytes_per_token": stored / tokens, "tokens": tokens}


def _clear(store, location: str) -> None:
  """Empties `store` if it holds nothing or an old cache (its manifest goes first, so half a cache
  never sits beside one); refuses a folder that holds anything else."""
  keys = store.list().result()
  if not keys:
    return
  raw = store.read("manifest.json").result()
  if raw.state != "value" or json.loads(raw.value).get("format") != FORMAT:
    if all(key.split(b"/")[0] in (b"ids", b"logp", b"log_rest", b"digests") for key in keys):
      pass  # a build that stopped before its manifest
    else:
      raise ConfigError(f"distill.cache={location}: holds files that are not a top-k cache; pick an empty folder")
  store.delete_range(ts.KvStore.KeyRange("manifest.json", "manifest.json\0")).result()
  store.delete_range(ts.KvStore.KeyRange()).result()


def _stored_bytes(location: str, store) -> int:
  """Bytes the cache takes in its store."""
  if not files.is_remote(location):
    walk = os.walk(os.fspath(files.path(location)))
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in walk for name in names)
  return sum(len(store.read(key).result().value) for key in store.list().result())


def _read_manifest(location: str) -> dict | None:
  """The cache's manifest.json (None when it has none); `ConfigError` if the store cannot be read."""
  try:
    raw = _kvstore(kvstore_url(location)).read("manifest.json").result()
  except Exception as e:  # noqa: BLE001 -- tensorstore reports an unreachable store in many ways
    raise ConfigError(f"distill.cache={location}: cannot read it ({' '.join(str(e).split())[:200]})") from None
  return json.loads(raw.value) if raw.state == "value" else None


def data_shard(location: str) -> dict:
  """The cache as a data shard of the run that reads it (`manifold.provenance.data_roots`)."""
  manifest = _read_manifest(location) or {}
  return {"kind": "distill cache", "location": location, "root": manifest.get("root"),
          "documents": manifest.get("steps")}  # fmt: skip


def check_shard(shard: dict) -> bool:
  """Whether the cache of a data shard row is reachable (False: not checked); raises `DataError`
  if its batches no longer hash to the row's root."""
  from manifold.data.errors import DataError

  location = shard["location"]
  try:
    manifest = _read_manifest(location)
  except ConfigError:
    return False
  if manifest is None:
    return False
  url = kvstore_url(location)
  arrays = {name: _open_array(url, name) for name in ("ids", "logp", "log_rest", "digests")}
  digests, b = arrays["digests"].read().result(), manifest["batch_size"]
  leaves = []
  for step in range(manifest["steps"]):
    at = slice(step * b, (step + 1) * b)
    ids, logp, rest = (arrays[name][at].read().result() for name in ("ids", "logp", "log_rest"))
    leaves.append(batch_leaf(digests[step], ids, logp, rest))
  root = Tree(leaves).root.hex()
  if root != shard["root"]:
    raise DataError(
      f"distill.cache={location}: its batches hash to root {root[:16]}..., the run read {str(shard['root'])[:16]}..."
    )
  return True


@dataclasses.dataclass
class TopKCache:
  """An opened cache whose fingerprints matched; `rows(step, tokens)` reads one batch's entries."""

  location: str
  manifest: dict
  arrays: dict
  batch_size: int

  def rows(self, step: int, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """{"top_ids", "top_logp", "log_rest"} of batch `step` (0-based), whose tokens [B, T+1] must be
    the ones the cache was built from (their digest is checked)."""
    if step >= self.manifest["steps"]:
      raise ConfigError(
        f"distill.cache={self.location}: holds {self.manifest['steps']} batches and the run reached batch {step + 1}; "
        "rebuild it with `manifold distill cache` for this train.steps"
      )
    if not np.array_equal(self.arrays["digests"][step].read().result(), batch_digest(tokens)):
      raise ConfigError(
        f"distill.cache={self.location}: batch {step}'s tokens differ from those the cache was built from; "
        "rebuild it for this data"
      )
    at = slice(step * self.batch_size, (step + 1) * self.batch_size)
    ids, logp, rest = (self.arrays[name][at].read() for name in ("ids", "logp", "log_rest"))
    return {"top_ids": ids.result(), "top_logp": logp.result(), "log_rest": rest.result()}


def open_cache(location: str, data, train_cfg, teacher: Teacher, temperature: float, top_k: int) -> TopKCache:
  """The cache at `location`, refused (ConfigError naming distill.cache) unless it was built for
  this data, batch order, teacher, temperature and k, for at least train.steps batches."""
  url = kvstore_url(location)
  flag = f"distill.cache={location}"
  manifest = _read_manifest(location)
  if manifest is None:
    raise ConfigError(f"{flag}: no complete cache there (no manifest.json); build it with `manifold distill cache`")
  k = min(top_k, teacher.model_cfg.vocab_size)
  if manifest.get("format") != FORMAT:
    raise ConfigError(f"{flag}: format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild it")
  if manifest["data"] != data_fingerprint(data, train_cfg):
    raise ConfigError(
      f"{flag}: built for other data (tokenizer, files, train.seed, train.batch_size or train.seq_len differ); "
      "rebuild it with `manifold distill cache` for this config"
    )
  if manifest["teacher"] != teacher_fingerprint(teacher, temperature, k):
    raise ConfigError(
      f"{flag}: built from another teacher or setting ({manifest['teacher_workdir']} step {manifest['teacher_step']}, "
      f"temperature {manifest['temperature']}, top_k {manifest['top_k']}); rebuild it for distill.teacher="
      f"{teacher.workdir} step {teacher.step}, temperature {temperature}, top_k {k}"
    )
  if manifest["steps"] < train_cfg.steps:
    raise ConfigError(
      f"{flag}: holds {manifest['steps']} batches, fewer than train.steps={train_cfg.steps}; rebuild it"
    )
  arrays = {name: _open_array(url, name) for name in ("ids", "logp", "log_rest", "digests")}
  return TopKCache(location=location, manifest=manifest, arrays=arrays, batch_size=train_cfg.batch_size)
