"""The one object format: a signed header and named numpy arrays.

    b"manifold-object/1\\n"                   magic
    8 bytes, little-endian                    length of the header
    header: canonical JSON (sorted keys, no spaces, UTF-8)
    payload: safetensors bytes of the arrays (`safetensors.numpy.save`)

The header holds `kind`, `name` (the object's key), `meta` (the caller's JSON dict),
`config_fingerprint`, `parents` (content hashes), `payload_sha256`, `payload_bytes`, `producer`
(Ed25519 public key, hex) and `signature` (hex): Ed25519 over the canonical JSON of the header
without `signature`. The content hash of an object is the sha256 of those same bytes, so it
covers the payload (through `payload_sha256`) and everything else the producer signed.

A reader checks, in order: magic, length (truncated), header JSON (parses, has every field, is
in canonical form), payload hash, signature: any failure is `CorruptObject`. Then what the
caller asked for: kind, config fingerprint, trusted producers (and, in `fetch`, that the object
is stored under its own name): `RejectedObject`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from manifold.store.kv import Store, StoreError
from manifold.store.signing import Identity, verify

MAGIC = b"manifold-object/1\n"
_LEN = struct.Struct("<Q")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
_FINGERPRINT = re.compile(r"[0-9a-f]+")
FIELDS = {
  "kind": str,
  "name": str,
  "meta": dict,
  "config_fingerprint": str,
  "parents": list,
  "payload_sha256": str,
  "payload_bytes": int,
  "producer": str,
  "signature": str,
}

# safetensors dtype names -> numpy dtypes, with the ml_dtypes that `safetensors.numpy.load` lacks.
_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "U64": np.uint64,
  "I32": np.int32,
  "U32": np.uint32,
  "I16": np.int16,
  "U16": np.uint16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class BadObject(StoreError):
  """An object a reader must not use."""


class CorruptObject(BadObject):
  """The bytes are not a well-formed, intact, correctly signed object. `reason` is one of
  'magic', 'truncated', 'trailing bytes', 'header JSON', 'payload hash', 'signature', 'payload format'
  (a signed payload that is not safetensors)."""

  def __init__(self, source: str, reason: str, detail: str):
    super().__init__(f"{source}: corrupt object ({reason}): {detail}")
    self.reason = reason


class RejectedObject(BadObject):
  """An intact object that is not what the reader accepts. `reason` is one of 'kind',
  'config fingerprint', 'producer', 'name'."""

  def __init__(self, source: str, reason: str, detail: str):
    super().__init__(f"{source}: rejected object ({reason}): {detail}")
    self.reason = reason


class KeyExists(StoreError):
  """`publish` found its key already written."""


@dataclasses.dataclass(frozen=True)
class StoredObject:
  """A decoded, verified object (its arrays are its own, writable)."""

  header: dict
  arrays: dict[str, np.ndarray]
  content_hash: str
  producer: str

  @property
  def kind(self) -> str:
    return self.header["kind"]

  @property
  def name(self) -> str:
    return self.header["name"]

  @property
  def meta(self) -> dict:
    return self.header["meta"]

  @property
  def parents(self) -> list[str]:
    return self.header["parents"]


def canonical_json(obj: Any) -> bytes:
  """`obj` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN or infinity."""
  return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def config_fingerprint(d: Mapping) -> str:
  """The sha256 (hex) of `d` as canonical JSON (tuples hash as lists)."""
  return hashlib.sha256(canonical_json(d)).hexdigest()


def content_hash(header: Mapping) -> str:
  """The content hash of an object with this header: sha256 (hex) of its canonical JSON without
  `signature` (the bytes the producer signed)."""
  return hashlib.sha256(_signed_bytes(header)).hexdigest()


def _signed_bytes(header: Mapping) -> bytes:
  return canonical_json({k: v for k, v in header.items() if k != "signature"})


def encode(
  kind: str,
  name: str,
  arrays: Mapping[str, np.ndarray],
  meta: Mapping,
  *,
  identity: Identity,
  config_fingerprint: str,
  parents: Iterable[str] = (),
) -> tuple[bytes, str]:
  """The bytes of an object and its content hash. `meta` must be JSON-native (str keys, lists not
  tuples, finite floats): a reader sees exactly it. `parents` are content hashes."""
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"object kind must be a non-empty string, not {kind!r}")
  if not isinstance(name, str) or not name:
    raise ValueError(f"object name must be a non-empty string, not {name!r}")
  if not isinstance(config_fingerprint, str) or not _FINGERPRINT.fullmatch(config_fingerprint):
    raise ValueError(f"config fingerprint must be lowercase hex, not {config_fingerprint!r}")
  parents = list(parents)
  for p in parents:
    if not isinstance(p, str) or not _HEX64.fullmatch(p):
      raise ValueError(f"parent {p!r} is not a content hash (64 lowercase hex characters)")
  meta = dict(meta)
  try:
    same = json.loads(canonical_json(meta)) == meta
  except (TypeError, ValueError) as e:
    raise ValueError(f"object meta is not JSON: {e}") from None
  if not same:
    raise ValueError("object meta must be JSON-native (str keys, lists rather than tuples) to read back as given")
  arrays = {str(k): np.asarray(v, order="C") for k, v in arrays.items()}  # (ascontiguousarray makes 0-d 1-d)
  payload = safetensors.numpy.save(arrays)
  header = {
    "kind": kind,
    "name": name,
    "meta": meta,
    "config_fingerprint": config_fingerprint,
    "parents": parents,
    "payload_sha256": hashlib.sha256(payload).hexdigest(),
    "payload_bytes": len(payload),
    "producer": identity.public_key,
  }
  signed = canonical_json(header)
  header["signature"] = identity.sign(signed).hex()
  head = canonical_json(header)
  return MAGIC + _LEN.pack(len(head)) + head + payload, hashlib.sha256(signed).hexdigest()


def decode(
  data: bytes,
  *,
  kind: str | None = None,
  config_fingerprint: str | None = None,
  trusted_keys: Iterable[str] | None = None,
  source: str = "object",
) -> StoredObject:
  """The object in `data`, verified (see the module docstring); `kind`, `config_fingerprint` and
  `trusted_keys` (public keys, hex), when given, must match. `source` names it in errors."""
  data = memoryview(data).toreadonly()
  head_start = len(MAGIC) + _LEN.size
  if bytes(data[: len(MAGIC)]) != MAGIC:
    if MAGIC.startswith(bytes(data)):
      raise CorruptObject(source, "truncated", f"{len(data)} bytes, shorter than the magic line")
    raise CorruptObject(source, "magic", f"does not start with {MAGIC!r}")
  if len(data) < head_start:
    raise CorruptObject(source, "truncated", f"{len(data)} bytes end inside the header length")
  (head_len,) = _LEN.unpack(data[len(MAGIC) : head_start])
  payload_start = head_start + head_len
  if payload_start > len(data):
    raise CorruptObject(source, "truncated", f"a {head_len}-byte header does not fit in {len(data)} bytes")
  head = bytes(data[head_start:payload_start])
  header = _parse_header(head, source)
  payload = data[payload_start:]
  if len(payload) != header["payload_bytes"]:
    reason = "truncated" if len(payload) < header["payload_bytes"] else "trailing bytes"
    raise CorruptObject(source, reason, f"payload is {len(payload)} bytes, the header says {header['payload_bytes']}")
  if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
    raise CorruptObject(source, "payload hash", "the payload's sha256 is not the header's payload_sha256")
  signed = _signed_bytes(header)
  if not _SIGNATURE.fullmatch(header["signature"]) or not verify(
    header["producer"], bytes.fromhex(header["signature"]), signed
  ):
    raise CorruptObject(source, "signature", f"not signed by its producer {header['producer'][:16]}...")
  if kind is not None and header["kind"] != kind:
    raise RejectedObject(source, "kind", f"a {header['kind']!r} object where {kind!r} was expected")
  if config_fingerprint is not None and header["config_fingerprint"] != config_fingerprint:
    raise RejectedObject(
      source,
      "config fingerprint",
      f"made under config {header['config_fingerprint'][:16]}..., this run is {config_fingerprint[:16]}...",
    )
  if trusted_keys is not None and header["producer"] not in set(trusted_keys):
    raise RejectedObject(source, "producer", f"producer {header['producer'][:16]}... is not a trusted key")
  try:
    arrays = _load_arrays(bytes(payload))
  except (safetensors.SafetensorError, KeyError, ValueError) as e:  # signed but unreadable: its producer's bug
    raise CorruptObject(source, "payload format", f"the signed payload is not safetensors ({e})") from None
  return StoredObject(header, arrays, hashlib.sha256(signed).hexdigest(), header["producer"])


def _parse_header(head: bytes, source: str) -> dict:
  try:
    header = json.loads(head.decode("utf-8"))
  except (UnicodeDecodeError, ValueError) as e:
    raise CorruptObject(source, "header JSON", f"does not parse ({e})") from None
  if not isinstance(header, dict) or set(header) != set(FIELDS):
    got = sorted(header) if isinstance(header, dict) else type(header).__name__
    raise CorruptObject(source, "header JSON", f"fields {got}, expected {sorted(FIELDS)}")
  for field, typ in FIELDS.items():
    if not isinstance(header[field], typ) or (typ is int and isinstance(header[field], bool)):
      raise CorruptObject(source, "header JSON", f"{field} is not a {typ.__name__}")
  try:
    canonical = canonical_json(header) == head
  except ValueError:  # NaN or infinity
    canonical = False
  if not canonical:
    raise CorruptObject(source, "header JSON", "not in canonical form")
  if not _HEX64.fullmatch(header["payload_sha256"]) or not _HEX64.fullmatch(header["producer"]):
    raise CorruptObject(source, "header JSON", "payload_sha256 or producer is not 64 lowercase hex characters")
  return header


def _load_arrays(payload: bytes) -> dict[str, np.ndarray]:
  arrays = {}
  for name, view in safetensors.deserialize(payload):
    dtype = _DTYPES[view["dtype"]]
    arrays[name] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
  return arrays


def publish(
  store: Store,
  key: str,
  kind: str,
  arrays: Mapping[str, np.ndarray],
  meta: Mapping,
  identity: Identity,
  fingerprint: str,
  parents: Iterable[str] = (),
) -> str:
  """Writes the object under `key` (its name) once, with `put_new`; its content hash. Raises
  KeyExists if the key is taken: objects are immutable."""
  data, digest = encode(kind, key, arrays, meta, identity=identity, config_fingerprint=fingerprint, parents=parents)
  if not store.put_new(key, data):
    raise KeyExists(f"{store.url}{key}: key exists (objects are written once; publish under a new key)")
  return digest


def fetch(store: Store, key: str, **decode_checks) -> StoredObject | None:
  """The verified object under `key`, or None if there is none; BadObject if it is corrupt, not
  what `decode_checks` (see `decode`) accept, or named other than `key` (copied or replayed)."""
  data = store.get(key)
  if data is None:
    return None
  source = f"{store.url}{key}"
  obj = decode(data, source=source, **decode_checks)
  if obj.name != key:
    raise RejectedObject(source, "name", f"an object named {obj.name!r}, stored under another key")
  return obj


def stake_claim(store: Store, key: str, kind: str, meta: Mapping, identity: Identity, fingerprint: str) -> str | None:
  """Claims `key` for `identity` (an id in a run: written once, `put_new`); a restart with the
  same key holds it again. None when the claim is this identity's, else the holder's public key
  ("?" when the claim does not read); a claim that fails its checks raises `BadObject`."""
  try:
    publish(store, key, kind, {}, meta, identity, fingerprint)
    return None
  except KeyExists:
    pass
  obj = fetch(store, key, kind=kind)
  if obj is not None and obj.producer == identity.public_key:
    return None
  return obj.producer if obj is not None else "?"
