"""Ed25519 identities: who produced an object. A worker's private key lives in a PEM file of its
own (mode 0600); its public key, as 64 hex characters, is its name in object headers and in
the lists of trusted producers."""

from __future__ import annotations

import os
import tempfile

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from manifold.store.kv import StoreError


class IdentityError(StoreError):
  """A key file that cannot be used (one line: the path and the fix)."""


class Identity:
  """An Ed25519 private key: `public_key` (hex of the raw 32 bytes) and `sign`."""

  def __init__(self, private_key: Ed25519PrivateKey, path: str | None = None):
    self._key = private_key
    self.path = path
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    self.public_key = raw.hex()

  def __repr__(self) -> str:
    return f"Identity({self.public_key[:16]}..., path={self.path!r})"

  @classmethod
  def generate(cls) -> Identity:
    """A fresh identity held only in memory."""
    return cls(Ed25519PrivateKey.generate())

  @classmethod
  def load_or_create(cls, path: str | os.PathLike) -> Identity:
    """The identity in the PEM private-key file `path`, created (mode 0600, its folder too) if
    there is none. Two processes creating the same file at once end with one key: the file
    appears whole, by a hard link that fails if it exists, and the loser loads the winner's."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.lexists(path):
      _create(path)
    try:
      with open(path, "rb") as f:
        pem = f.read()
    except OSError as e:
      raise IdentityError(f"identity key {path}: cannot read ({e.strerror or e}); fix its permissions") from None
    try:
      key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
      reason = " ".join(str(e).split())[:200]
      raise IdentityError(
        f"identity key {path}: not an unencrypted PEM private key ({reason}); give an Ed25519 key file "
        "or a path that does not exist yet"
      ) from None
    if not isinstance(key, Ed25519PrivateKey):
      raise IdentityError(
        f"identity key {path}: a {type(key).__name__.lstrip('_')}, not an Ed25519 key; give an Ed25519 key "
        "file or a path that does not exist yet"
      )
    return cls(key, path)

  def sign(self, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of `data`."""
    return self._key.sign(bytes(data))


def verify(public_key_hex: str, signature: bytes, data: bytes) -> bool:
  """Whether `signature` is the signature of `data` by the key `public_key_hex` (False, not an
  error, for a malformed key or signature)."""
  try:
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
    key.verify(bytes(signature), bytes(data))
  except (InvalidSignature, ValueError, TypeError):
    return False
  return True


def _create(path: str) -> None:
  folder = os.path.dirname(path)
  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
      serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)  # mode 0600
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
      os.chmod(tmp, 0o600)
      try:
        os.link(tmp, path)
      except FileExistsError:
        pass  # another process created it first: use theirs
    finally:
      os.remove(tmp)
  except OSError as e:
    raise IdentityError(f"identity key {path}: cannot create ({e.strerror or e}); give a writable path") from None
