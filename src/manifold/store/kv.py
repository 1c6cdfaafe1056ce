"""A key-value store at a URL, through tensorstore's kvstore: `file://` (a local or NFS folder),
`gs://` and `s3://` buckets, or a plain local path. Values are whole byte strings, written and
read whole; every operation retries transient failures with exponential backoff and gives up
with one line (`StoreUnavailable`); nothing waits forever."""

from __future__ import annotations

import os
import random
import re
import socket
import threading
import time
import uuid
from typing import Callable, TypeVar

import tensorstore as ts

T = TypeVar("T")

SCHEMES = ("file", "gs", "s3")  # tensorstore kvstore drivers a store may use

# A key: '/'-separated non-empty parts of letters, digits and `._-=+@,`; no `.`/`..` part, and
# not ending in `.__lock` (the file driver's lock files). The same key is valid on every driver.
_KEY = re.compile(r"[A-Za-z0-9_\-=+@,.]+(/[A-Za-z0-9_\-=+@,.]+)*")


class StoreError(Exception):
  """A store that cannot be used as configured (one line: the URL and the fix)."""


class StoreUnavailable(StoreError):
  """An operation still failed after every retry."""


def _no_value_generation() -> bytes:
  """tensorstore's 'no value' storage generation: the stamp of a key that does not exist (a write
  conditioned on it succeeds only if the key is absent). Read off the memory driver, not hard-coded."""
  kv = ts.KvStore.open({"driver": "memory"}).result()
  return kv.read("absent").result().stamp.generation


_NO_VALUE = _no_value_generation()


def store_url(url: str | os.PathLike) -> str:
  """`url` as a kvstore URL ending in '/': a plain path absolute, with `~` expanded, as `file://`."""
  url = os.fspath(url)
  if "://" not in url:
    url = "file://" + os.path.abspath(os.path.expanduser(url))
  return url if url.endswith("/") else url + "/"


def check_key(key: str) -> str:
  """`key` if it is a valid key (see `_KEY`), else ValueError."""
  if not isinstance(key, str) or not _KEY.fullmatch(key) or key.endswith(".__lock"):
    raise ValueError(f"bad store key {key!r}: use '/'-separated parts of [A-Za-z0-9_-=+@,.]")
  if any(part in (".", "..") for part in key.split("/")):
    raise ValueError(f"bad store key {key!r}: no '.' or '..' parts")
  return key


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 400 else text[:400] + "..."


class Store:
  """A key-value store at `url` (see `Store.open`).

  `put` is atomic: a reader sees the whole new value or the old one (or none), never part. The
  file driver writes the value into `<key>.__lock`, fsyncs it and renames it over `<key>`, and
  never modifies a value file in place (tensorstore's file_key_value_store.cc); a bucket upload
  is one object version. `put_new` writes only if the key does not exist, conditioned on
  tensorstore's 'no value' generation, which the file driver checks under an OS lock on
  `<key>.__lock` (race-free across processes, and across hosts on NFS where POSIX locks work),
  GCS with `ifGenerationMatch=0` (server-side) and S3 with `If-None-Match: *` on AWS endpoints.
  On other S3-compatible servers tensorstore checks with a HEAD first and sends the header too
  (on Ceph, detected, only the HEAD): race-safe there only where the server enforces the header.
  Keys that name their sender have one writer each, so only deliberately shared keys race.

  `bytes_written` and `bytes_read` count the payload bytes of successful puts and gets;
  `transient_failures` the failed attempts that were retried or gave up."""

  def __init__(self, url: str, kvstore: ts.KvStore, *, retries: int, backoff_s: float, timeout_s: float):
    self.url = url
    self._kv = kvstore
    self.retries = retries
    self.backoff_s = backoff_s
    self.timeout_s = timeout_s
    self.bytes_written = 0
    self.bytes_read = 0
    self.transient_failures = 0
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"Store({self.url!r})"

  @classmethod
  def open(
    cls,
    url: str | os.PathLike,
    *,
    retries: int = 5,
    backoff_s: float = 0.2,
    timeout_s: float = 30,
    setting: str = "store",
  ) -> Store:
    """Opens the store at `url` and checks it can be written, read back, listed and deleted from
    (a probe key under `_probe/`). `setting` names the config field in the error, e.g.
    `islands.store`. Raises StoreError (one line) for an unsupported scheme or an unusable store."""
    raw = os.fspath(url)
    url = store_url(raw)
    scheme = url.split("://", 1)[0]
    hint = "give a writable local folder or a file://, gs:// or s3:// URL"
    if scheme not in SCHEMES or "|" in url:
      raise StoreError(f"{setting}={raw!r}: unsupported store scheme {scheme + '://'!r}; {hint}")
    # A plain path goes in as a spec, not a URL, so that '#', '?' or '%' in it stay characters.
    spec = url if "://" in raw else {"driver": "file", "path": url.removeprefix("file://")}
    try:
      kv = ts.KvStore.open(spec).result(timeout=timeout_s)
    except Exception as e:
      raise StoreError(f"{setting}={raw!r}: cannot open ({_one_line(e)}); {hint}") from None
    store = cls(kv.url, kv, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s)
    probe = f"_probe/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    data = b"manifold store probe " + probe.encode()
    step = "write"
    try:
      if not store.put_new(probe, data):
        raise StoreError("a fresh probe key already exists")
      step = "read back"
      if store.get(probe) != data:
        raise StoreError("the probe read back differs")
      step = "list"
      if store.list(probe) != [probe]:
        raise StoreError("the probe is not listed")
      step = "delete"
      store.delete(probe)
    except StoreError as e:
      msg = str(e).split(": ", 1)[-1] if isinstance(e, StoreUnavailable) else str(e)
      raise StoreError(f"{setting}={raw!r}: cannot {step} ({msg}); {hint}") from None
    store.bytes_written = store.bytes_read = store.transient_failures = 0
    return store

  # -- operations --------------------------------------------------------------------------------

  def put(self, key: str, data: bytes) -> None:
    """Writes `data` under `key`, replacing any value, atomically (see the class docstring)."""
    check_key(key)
    data = bytes(data)
    self._retrying("put", key, lambda _: self._wait(self._kv.write(key, data)))
    self._count(written=len(data))

  def put_new(self, key: str, data: bytes) -> bool:
    """Writes `data` under `key` only if the key does not exist; False if it does (someone wrote it
    first). One conditional write, race-safe across processes (see the class docstring). If an
    attempt failed in a way that may have written anyway (a timeout), a later 'exists' counts as
    ours when the stored bytes are `data`."""
    check_key(key)
    data = bytes(data)

    def attempt(i: int) -> bool:
      stamp = self._wait(self._kv.write(key, data, if_equal=_NO_VALUE))
      if stamp.generation:  # a failed condition returns the empty ('unknown') generation
        return True
      return i > 0 and self._read(key) == data

    won = self._retrying("put_new", key, attempt)
    if won:
      self._count(written=len(data))
    return won

  def get(self, key: str) -> bytes | None:
    """The value under `key`, or None if there is none."""
    check_key(key)
    value = self._retrying("get", key, lambda _: self._read(key))
    if value is not None:
      self._count(read=len(value))
    return value

  def list(self, prefix: str = "") -> list[str]:
    """The keys that start with `prefix` (a string prefix, not only a folder), sorted."""
    key_range = ts.KvStore.KeyRange(prefix.encode(), _successor(prefix.encode()))
    keys = self._retrying("list", prefix, lambda _: self._wait(self._kv.list(key_range)))
    return sorted(k.decode() for k in keys)

  def delete(self, key: str) -> None:
    """Removes `key` (nothing happens if it does not exist)."""
    check_key(key)
    self._retrying("delete", key, lambda _: self._wait(self._kv.write(key, None)))

  # -- internals ---------------------------------------------------------------------------------

  def _wait(self, future: ts.Future) -> T:
    """The result of a tensorstore future; TimeoutError (and the future cancelled) past `timeout_s`."""
    try:
      return future.result(timeout=self.timeout_s)
    except TimeoutError:
      future.cancel()
      raise

  def _read(self, key: str) -> bytes | None:
    r = self._wait(self._kv.read(key))
    return bytes(r.value) if r.state == "value" else None

  def _count(self, *, written: int = 0, read: int = 0) -> None:
    with self._lock:
      self.bytes_written += written
      self.bytes_read += read

  def _retrying(self, op: str, key: str, fn: Callable[[int], T]) -> T:
    """`fn(attempt)`, retried on tensorstore's errors (ValueError for a failed status,
    TimeoutError past `timeout_s`) after `backoff_s * 2**k` seconds (jittered by 0.5-1x), at most
    `retries` times. 'Not found' and 'condition failed' are results, not errors, in tensorstore,
    so they are never retried."""
    attempts = self.retries + 1
    for i in range(attempts):
      try:
        return fn(i)
      except (ValueError, OSError, RuntimeError) as e:
        with self._lock:
          self.transient_failures += 1
        if i + 1 == attempts:
          raise StoreUnavailable(f"{self.url}: {op} {key!r} failed after {attempts} attempts: {_one_line(e)}") from None
        time.sleep(min(60.0, self.backoff_s * 2**i) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _successor(prefix: bytes) -> bytes:
  """The smallest byte string greater than every string that starts with `prefix` ('' = no bound)."""
  b = bytearray(prefix)
  while b and b[-1] == 0xFF:
    b.pop()
  if b:
    b[-1] += 1
  return bytes(b)
