"""`run/config`: the config fields every participant of a run shares (islands of one DiLoCo run,
an RL learner and its workers), written once by the first participant. Every later one reads it
and refuses to take part on the first field where its own config differs, in one line that names
the field, both values and the fix."""

from __future__ import annotations

from typing import Any, Mapping

from manifold.schema import ConfigError, first_difference
from manifold.store.kv import Store
from manifold.store.objects import BadObject, KeyExists, StoredObject, fetch, publish
from manifold.store.signing import Identity

KEY = "run/config"


def publish_once(store: Store, kind: str, fields: Mapping[str, Any], identity: Identity, fingerprint: str) -> bool:
  """Writes `fields` as the run's config (an object of `kind`) if the store has none: True; False
  if another participant (or this one, before a restart) wrote it first."""
  try:
    publish(store, KEY, kind, {}, {"fields": dict(fields)}, identity, fingerprint)
    return True
  except KeyExists:
    return False


def read(store: Store, kind: str, field: str) -> StoredObject:
  """The run's config object; a ConfigError naming `field` (the config field that holds the
  store's URL) if it fails its hash, signature or kind, or cannot be read."""
  try:
    obj = fetch(store, KEY, kind=kind)
  except BadObject as e:
    raise ConfigError(f"{field} {store.url}: {KEY} is unusable ({e}); start the run in a new store") from None
  if obj is None:
    raise ConfigError(f"{field} {store.url}: {KEY} exists but cannot be read; retry")
  return obj


def require_same(
  obj: StoredObject, fields: Mapping[str, Any], fingerprint: str, *, store: Store, field: str, owner: str, fix: str
) -> None:
  """A ConfigError if `fields` differ from the run's: "<name>=<mine>: <owner> in <url> has
  <theirs>; <fix>" for the first differing field, else one naming `field` if only the
  fingerprint differs (the fingerprint's definition changed between versions)."""
  diff = first_difference(obj.meta["fields"], fields)
  if diff is not None:
    name, theirs, ours = diff
    raise ConfigError(f"{name}={ours!r}: {owner} in {store.url} has {theirs!r}; {fix}")
  if obj.header["config_fingerprint"] != fingerprint:
    raise ConfigError(f"{field} {store.url}: {KEY} has another config fingerprint; {fix}")
