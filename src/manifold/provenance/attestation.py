"""Signed in-toto statements in DSSE envelopes: the format of a checkpoint manifest.

The statement follows `model-signing`'s v1.0 layout, so its parsers read our manifests:

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": NAME, "digest": {"sha256": ROOT}}],
     "predicateType": "https://model_signing/signature/v1.0",
     "predicate": {"serialization": {"method": "files", "hash_type": "blake3", ...},
                   "resources": [{"name": PATH, "algorithm": "blake3", "digest": HEX}, ...],   sorted by name
                   "manifold": {...}}}                                                         our lineage

ROOT is the sha256 of the resources' digests concatenated in order (model-signing's definition);
v1.0 verifiers ignore predicate fields other than `serialization` and `resources`. The envelope is
DSSE (`payloadType`, base64 `payload`, `signatures: [{keyid, sig}]`) and the signature is Ed25519
(the store's one signing scheme, `manifold.store.signing`) over DSSE's pre-authentication encoding;
`keyid` is the signer's public key in hex. model-signing's own key-based signer takes elliptic-curve
keys, so its CLI reads these statements but cannot check an Ed25519 signature: `manifold verify` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from manifold.store import Identity, canonical_json, verify

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


class AttestationError(ValueError):
  """An envelope or statement that does not verify (one line: what is wrong)."""


def resources_root(resources: list[dict[str, str]]) -> str:
  """model-signing's subject digest: sha256 over the resources' digests in order."""
  h = hashlib.sha256()
  for r in resources:
    h.update(bytes.fromhex(r["digest"]))
  return h.hexdigest()


def statement(name: str, resources: list[dict[str, str]], extension: dict[str, Any]) -> dict:
  """The in-toto statement for files `resources` ({name, algorithm, digest}) under subject `name`,
  with our fields under `predicate.manifold`."""
  resources = sorted(resources, key=lambda r: r["name"])
  return {
    "_type": STATEMENT_TYPE,
    "subject": [{"name": name, "digest": {"sha256": resources_root(resources)}}],
    "predicateType": PREDICATE_TYPE,
    "predicate": {
      "serialization": {"method": "files", "hash_type": "blake3", "allow_symlinks": False, "ignore_paths": []},
      "resources": resources,
      "manifold": extension,
    },
  }


def _pae(payload: bytes) -> bytes:
  """DSSE's pre-authentication encoding of an in-toto payload."""
  kind = PAYLOAD_TYPE.encode()
  return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign(stmt: dict, identity: Identity) -> tuple[dict, str]:
  """(the DSSE envelope of `stmt` signed by `identity`, the sha256 of its payload: the manifest's hash)."""
  payload = canonical_json(stmt)
  envelope = {
    "payloadType": PAYLOAD_TYPE,
    "payload": base64.b64encode(payload).decode(),
    "signatures": [{"keyid": identity.public_key, "sig": base64.b64encode(identity.sign(_pae(payload))).decode()}],
  }
  return envelope, hashlib.sha256(payload).hexdigest()


def open_envelope(envelope: Any) -> tuple[dict, str, str]:
  """(statement, signer's public key, payload sha256) of a DSSE envelope whose one signature
  verifies and whose statement is well formed (its subject digest matches its resources)."""
  try:
    payload = base64.b64decode(envelope["payload"], validate=True)
    (signature,) = envelope["signatures"]
    keyid, sig = signature["keyid"], base64.b64decode(signature["sig"], validate=True)
  except (KeyError, TypeError, ValueError) as e:
    raise AttestationError(f"not a DSSE envelope with one signature ({type(e).__name__}: {e})") from None
  if envelope.get("payloadType") != PAYLOAD_TYPE:
    raise AttestationError(f"payloadType {envelope.get('payloadType')!r}, not {PAYLOAD_TYPE}")
  if not (isinstance(keyid, str) and verify(keyid, sig, _pae(payload))):
    raise AttestationError(f"the signature does not verify for key {str(keyid)[:16]}... (edited or re-signed)")
  try:
    stmt = json.loads(payload)
    resources = stmt["predicate"]["resources"]
    (subject,) = stmt["subject"]
    root = subject["digest"]["sha256"]
  except (KeyError, TypeError, ValueError) as e:
    raise AttestationError(f"not an in-toto statement of this layout ({type(e).__name__}: {e})") from None
  if stmt.get("_type") != STATEMENT_TYPE or stmt.get("predicateType") != PREDICATE_TYPE:
    raise AttestationError(f"statement type {stmt.get('_type')!r} / {stmt.get('predicateType')!r} is not ours")
  if resources_root(resources) != root:
    raise AttestationError("the subject digest is not the root of the listed resources")
  return stmt, keyid, hashlib.sha256(payload).hexdigest()
