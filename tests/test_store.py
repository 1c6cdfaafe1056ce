"""The store: a tensorstore kvstore at a URL, and signed, content-hashed objects in it. Real files
under tmp_path; real processes where the property is about processes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import manifold.store
from manifold.schema import ConfigError
from manifold.store import (
  CorruptObject,
  Identity,
  IdentityError,
  KeyExists,
  RejectedObject,
  Store,
  StoreError,
  StoreUnavailable,
  check_key,
  config_fingerprint,
  content_hash,
  decode,
  encode,
  fetch,
  publish,
  run_config,
  verify,
)
from manifold.store.objects import MAGIC

SRC = str(pathlib.Path(manifold.store.__file__).resolve().parents[2])
FP = config_fingerprint({"model": {"d": 64, "layers": 2}, "lr": 3e-4})


@pytest.fixture(scope="module")
def me():
  return Identity.generate()


def _arrays():
  rng = np.random.default_rng(0)
  return {
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
    "f8": rng.standard_normal(6).astype(ml_dtypes.float8_e4m3fn),
    "i8": np.array([-128, -1, 0, 1, 127], np.int8),
    "u8": np.arange(250, 256, dtype=np.uint8).reshape(2, 3),
    "f16": np.array([np.inf, -0.0, 65504], np.float16),
    "mask": np.array([True, False]),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 4), np.float32),
  }


def _children(script: str, *args: str, n: int = 2) -> list[subprocess.Popen]:
  env = {**os.environ, "PYTHONPATH": SRC}
  return [
    subprocess.Popen([sys.executable, "-c", script, *args, str(i)], env=env, stdout=subprocess.PIPE, text=True)
    for i in range(n)
  ]


def _flip_hex(data: bytes, i: int) -> bytes:
  """`data` with the hex digit at `i` replaced by another hex digit."""
  c = chr(data[i])
  return data[:i] + ("1" if c == "0" else "0").encode() + data[i + 1 :]


def test_object_round_trips_every_dtype_through_a_file_store(tmp_path, me):
  store = Store.open(tmp_path / "store")
  parent = publish(store, "diloco/global/00000000/root", "diloco/global", {}, {}, me, FP)
  meta = {"round": 1, "fragment": 0, "tokens": 12_345, "loss": 2.75, "note": "bäckström ✓", "ranks": [0, 1], "x": None}
  key = f"diloco/delta/00000001/{me.public_key}"
  digest = publish(store, key, "diloco/delta", _arrays(), meta, me, FP, parents=[parent])
  obj = fetch(store, key, kind="diloco/delta", config_fingerprint=FP, trusted_keys=[me.public_key])
  assert obj.content_hash == digest == content_hash(obj.header)
  assert (obj.kind, obj.name, obj.meta, obj.parents, obj.producer) == (
    "diloco/delta",
    key,
    meta,
    [parent],
    me.public_key,
  )
  for name, want in _arrays().items():
    got = obj.arrays[name]
    assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
    assert got.flags.writeable
  assert fetch(store, "diloco/delta/00000001/nobody") is None
  with pytest.raises(ValueError, match="JSON-native"):
    encode("k", "n", {}, {"shape": (1, 2)}, identity=me, config_fingerprint=FP)


def test_every_flipped_byte_is_corrupt_with_the_right_reason(me):
  arrays = {"w": np.arange(6, dtype=np.float32)}
  data, _ = encode("diloco/delta", "d/00000001/a", arrays, {"r": 1}, identity=me, config_fingerprint=FP)
  for i in range(len(data)):  # every byte, two ways (a low bit; ASCII case, which hex decoding ignores)
    for mask in (0x01, 0x20):
      with pytest.raises(CorruptObject):
        decode(data[:i] + bytes([data[i] ^ mask]) + data[i + 1 :])
  head_start = len(MAGIC) + 8
  head_end = head_start + int.from_bytes(data[len(MAGIC) : head_start], "little")
  head = data[head_start:head_end].decode()

  def reason(bad: bytes) -> str:
    with pytest.raises(CorruptObject) as e:
      decode(bad)
    assert "\n" not in str(e.value)
    return e.value.reason

  at = head_start + head.index('"kind":"') + len('"kind":"')
  sig = head_start + head.index('"signature":"') + len('"signature":"')
  assert reason(b"X" + data[1:]) == "magic"
  assert reason(data[:head_start] + b"[" + data[head_start + 1 :]) == "header JSON"
  assert reason(data[:at] + b"e" + data[at + 1 :]) == "signature"  # 'diloco' -> 'eiloco': no longer what was signed
  assert reason(_flip_hex(data, sig)) == "signature"
  letter = next(j for j in range(sig, sig + 128) if chr(data[j]) in "abcdef")  # 'A' decodes as 'a' does
  assert reason(data[:letter] + data[letter : letter + 1].upper() + data[letter + 1 :]) == "signature"
  assert reason(data[:-1] + bytes([data[-1] ^ 0xFF])) == "payload hash"


def test_a_truncated_or_padded_object_is_corrupt(me):
  data, _ = encode("k", "n", {"w": np.ones(16, np.float32)}, {}, identity=me, config_fingerprint=FP)
  for n in range(len(data)):
    with pytest.raises(CorruptObject) as e:
      decode(data[:n])
    assert e.value.reason in ("truncated", "header JSON"), n  # a cut header length can point inside the JSON
  with pytest.raises(CorruptObject, match=r"\(truncated\): payload is"):
    decode(data[:-1])
  with pytest.raises(CorruptObject, match="trailing bytes"):
    decode(data + b"\0")


def test_wrong_kind_fingerprint_producer_or_key_is_rejected(tmp_path, me):
  store = Store.open(tmp_path)
  key = "diloco/delta/00000003/a"
  publish(store, key, "diloco/delta", {"w": np.zeros(2, np.float32)}, {"round": 3}, me, FP)
  data = store.get(key)
  stranger = Identity.generate()
  for checks, reason in [
    ({"kind": "diloco/global"}, "kind"),
    ({"config_fingerprint": config_fingerprint({"lr": 1.0})}, "config fingerprint"),
    ({"trusted_keys": [stranger.public_key]}, "producer"),
  ]:
    with pytest.raises(RejectedObject) as e:
      fetch(store, key, **checks)
    assert e.value.reason == reason and key in str(e.value) and "\n" not in str(e.value)
  store.put("diloco/delta/00000004/a", data)  # a validly signed object replayed under another round's key
  with pytest.raises(RejectedObject, match=r"\(name\)"):
    fetch(store, "diloco/delta/00000004/a")
  with pytest.raises(KeyExists, match="key exists"):
    publish(store, key, "diloco/delta", {}, {}, me, FP)


def test_run_config_is_written_once_and_a_differing_or_unusable_one_is_refused_in_one_line(tmp_path, me):
  store = Store.open(tmp_path)
  fields = {"model.d_model": 64, "train.seed": 0}
  fp = config_fingerprint(fields)
  assert run_config.publish_once(store, "run-config", fields, me, fp)
  assert not run_config.publish_once(store, "run-config", {**fields, "train.seed": 1}, Identity.generate(), fp)
  obj = run_config.read(store, "run-config", "islands.store")
  run_config.require_same(obj, fields, fp, store=store, field="islands.store", owner="the run", fix="refusing")
  with pytest.raises(ConfigError, match=r"^train\.seed=1: the run in file://.* has 0; refusing$"):
    run_config.require_same(
      obj, {**fields, "train.seed": 1}, fp, store=store, field="islands.store", owner="the run", fix="refusing"
    )
  with pytest.raises(ConfigError, match=r"^islands\.store file://.*: run/config has another config fingerprint"):
    run_config.require_same(obj, fields, FP, store=store, field="islands.store", owner="the run", fix="refusing")
  with pytest.raises(ConfigError, match=r"^rl\.store file://.*: run/config is unusable \(.*kind.*\); start the run"):
    run_config.read(store, "rl-config", "rl.store")  # another capability's object under the key
  data = store.get(run_config.KEY)
  store.delete(run_config.KEY)
  store.put(run_config.KEY, _flip_hex(data, len(data) // 2))
  with pytest.raises(ConfigError, match=r"run/config is unusable") as e:
    run_config.read(store, "run-config", "islands.store")
  assert "\n" not in str(e.value)


RACE = """
import json, os, sys, time
from manifold.store import Store
url, go, n, who = sys.argv[1:]
store = Store.open(url)
open(f"{go}.{who}", "w").close()
while not os.path.exists(go):
  time.sleep(0.001)
print(json.dumps([i for i in range(int(n)) if store.put_new(f"race/{i:04d}", who.encode() * 100)]))
"""


def test_put_new_has_exactly_one_winner_across_processes(tmp_path):
  url, go, n = f"file://{tmp_path}/store", str(tmp_path / "go"), 150
  procs = _children(RACE, url, go, str(n))
  deadline = time.time() + 60
  while not all(os.path.exists(f"{go}.{i}") for i in range(len(procs))):  # a barrier: both started
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.01)
  open(go, "w").close()
  won = [set(json.loads(p.communicate(timeout=60)[0])) for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert won[0].isdisjoint(won[1]) and won[0] | won[1] == set(range(n))
  store = Store.open(url)
  for who, keys in enumerate(won):
    for i in keys:
      assert store.get(f"race/{i:04d}") == str(who).encode() * 100
  assert store.list("race/") == [f"race/{i:04d}" for i in range(n)]


WRITER = """
import sys
from manifold.store import Store
store = Store.open(sys.argv[1])
for i in range(40):
  store.put("atom", (b"a" if i % 2 else b"b") * 2_000_000)
store.put("done", b"")
"""


def test_a_reader_sees_a_whole_value_or_nothing_while_another_process_writes(tmp_path):
  url = f"file://{tmp_path}/store"
  store = Store.open(url)
  (writer,) = _children(WRITER, url, n=1)
  seen = set()
  while store.get("done") is None:
    value = store.get("atom")
    assert value in (None, b"a" * 2_000_000, b"b" * 2_000_000)
    seen.add(value[:1] if value else None)
    assert writer.poll() in (None, 0)
  assert writer.wait(timeout=60) == 0 and store.get("atom") == b"a" * 2_000_000 and seen & {b"a", b"b"}


def test_an_unusable_url_is_one_line_naming_it_and_the_fix(tmp_path):
  (tmp_path / "a-file").write_text("x")
  for url, why in [
    ("/proc/nope/store", "cannot write"),
    (f"file://{tmp_path}/a-file/store", "cannot write"),
    ("ftp://example.com/store", "unsupported store scheme 'ftp://'"),
    ("memory://store", "unsupported store scheme"),
  ]:
    with pytest.raises(StoreError) as e:
      Store.open(url, retries=1, backoff_s=0.01, setting="islands.store")
    msg = str(e.value)
    assert msg.startswith(f"islands.store={url!r}: {why}") and msg.endswith("s3:// URL") and "\n" not in msg, msg


def test_operations_retry_until_the_store_is_back_then_give_up_in_one_line(tmp_path):
  root = tmp_path / "store"
  store = Store.open(root, retries=6, backoff_s=0.05)

  def break_store():
    shutil.rmtree(root)
    root.write_text("not a folder")  # every write now fails: 'Not a directory'

  def mend_store():
    root.unlink()
    root.mkdir()

  break_store()
  timer = threading.Timer(0.3, mend_store)
  timer.start()
  store.put("diloco/delta/00000001/a", b"x" * 10)  # fails until mended, then succeeds on a retry
  timer.join()
  assert store.transient_failures >= 2 and store.get("diloco/delta/00000001/a") == b"x" * 10

  break_store()
  store.retries, store.backoff_s = 2, 0.01
  with pytest.raises(StoreUnavailable) as e:
    store.put_new("diloco/delta/00000002/a", b"y")
  msg = str(e.value)
  assert msg.startswith(f"file://{root}/: put_new 'diloco/delta/00000002/a' failed after 3 attempts: ")
  assert "Not a directory" in msg and "\n" not in msg
  with pytest.raises(StoreUnavailable, match="list 'diloco/' failed after 3 attempts"):
    store.list("diloco/")


class _LostReply:
  """A kvstore whose first write lands but whose reply is lost (it times out)."""

  def __init__(self, kv):
    self.kv, self.lost = kv, 1

  def __getattr__(self, name):
    return getattr(self.kv, name)

  def write(self, key, value, **kwargs):
    future = self.kv.write(key, value, **kwargs)
    if not self.lost:
      return future
    self.lost -= 1
    future.result()
    return _TimedOut()


class _TimedOut:
  def result(self, timeout=None):
    raise TimeoutError()

  def cancel(self):
    pass


def test_put_new_whose_reply_was_lost_still_knows_it_won(tmp_path):
  store = Store.open(tmp_path, backoff_s=0.01)
  store._kv = _LostReply(store._kv)
  assert store.put_new("k", b"mine")  # attempt 1 wrote but timed out; attempt 2 finds its own bytes
  assert store.transient_failures == 1 and store.bytes_written == 4
  store._kv.lost = 1
  assert store.put_new("j", b"theirs")
  store._kv.lost = 1
  assert not store.put_new("j", b"mine")  # someone else's bytes: not ours, however the first reply went


def test_byte_counters_count_payload_bytes_of_successful_puts_and_gets(tmp_path):
  store = Store.open(tmp_path)
  assert (store.bytes_written, store.bytes_read) == (0, 0)  # the probe is not traffic
  store.put("a/1", b"x" * 10)
  assert store.put_new("a/2", b"y" * 20) and not store.put_new("a/2", b"z" * 5)
  assert store.get("a/1") == b"x" * 10 and store.get("a/3") is None
  store.list("a/")
  store.delete("a/1")
  assert store.get("a/1") is None and store.list("a") == ["a/2"] and store.list("a/1") == []
  assert (store.bytes_written, store.bytes_read) == (30, 10)
  for bad in ["", "/abs", "a//b", "a/../b", "a/.", "x.__lock", "a b"]:
    with pytest.raises(ValueError, match="bad store key"):
      check_key(bad)


def test_identity_file_is_0600_reloads_to_the_same_key_and_refuses_bad_files(tmp_path):
  path = tmp_path / "keys" / "island-0.pem"
  me = Identity.load_or_create(path)
  assert os.stat(path).st_mode & 0o777 == 0o600 and os.listdir(path.parent) == ["island-0.pem"]
  again = Identity.load_or_create(path)
  assert again.public_key == me.public_key and len(me.public_key) == 64
  sig = again.sign(b"round 7")
  assert verify(me.public_key, sig, b"round 7") and not verify(me.public_key, sig, b"round 8")
  assert not verify("zz", sig, b"round 7") and not verify(me.public_key, b"short", b"round 7")
  ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
  )
  (tmp_path / "ec.pem").write_bytes(ec_pem)
  (tmp_path / "junk.pem").write_text("not a key")
  (tmp_path / "folder.pem").mkdir()
  for name, why in [
    ("ec.pem", "not an Ed25519 key"),
    ("junk.pem", "not an unencrypted PEM"),
    ("folder.pem", "cannot read"),
  ]:
    with pytest.raises(IdentityError) as e:
      Identity.load_or_create(tmp_path / name)
    assert str(e.value).startswith(f"identity key {tmp_path / name}: ") and why in str(e.value)
    assert "\n" not in str(e.value)
