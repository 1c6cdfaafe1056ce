"""The store: the one transport between islands (DiLoCo now; rollout workers, distillation
teachers and a provenance ledger later).

- One transport: a key-value store at a URL, opened with tensorstore's kvstore (`file://` for a
  local or NFS folder, `gs://`, `s3://`). `Store.open` writes, reads, lists and deletes a probe
  first, so a bad URL fails at start-up in one line, not mid-run.
- Objects are immutable and written once (`put_new`: a conditional write that succeeds only if
  the key is absent, race-safe across processes), each whole or not at all.
- An object is a signed header plus named numpy arrays (`objects`): content-hashed (sha256 over
  the signed header, which holds the payload's sha256), signed by its producer's Ed25519 key
  (`signing`), tied to a config fingerprint and to its parents' hashes. Readers verify all of it
  and refuse what fails (`CorruptObject`, `RejectedObject`).
- Keys: `<run-relative kind>/<round or version:08d>/<sender>`, e.g. `diloco/delta/00000012/<key>`,
  so a writer never contends for another's key, and `list(prefix)` finds a round's objects.
- `run_config`: the fields every participant of a run shares, written once under `run/config`;
  a later participant that differs is refused in one line naming the field.
- Nothing waits forever: every operation retries with backoff, then raises `StoreUnavailable`;
  callers poll (`list`, `fetch`) against their own deadlines."""

from manifold.store.kv import Store, StoreError, StoreUnavailable, check_key, store_url
from manifold.store.objects import (
  BadObject,
  CorruptObject,
  KeyExists,
  RejectedObject,
  StoredObject,
  canonical_json,
  config_fingerprint,
  content_hash,
  decode,
  encode,
  fetch,
  publish,
  stake_claim,
)
from manifold.store.signing import Identity, IdentityError, verify

__all__ = [
  "BadObject",
  "CorruptObject",
  "Identity",
  "IdentityError",
  "KeyExists",
  "RejectedObject",
  "Store",
  "StoreError",
  "StoreUnavailable",
  "StoredObject",
  "canonical_json",
  "check_key",
  "config_fingerprint",
  "content_hash",
  "decode",
  "encode",
  "fetch",
  "publish",
  "stake_claim",
  "store_url",
  "verify",
]
