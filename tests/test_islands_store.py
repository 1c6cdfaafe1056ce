"""Islands as independent jobs (manifold.islands.store_sync): real `manifold train` processes that
share only a `file://` store. Two islands to the end (every round checked against a numpy outer
step of the published deltas); three islands through a SIGKILL, a corrupt object and a restart;
and the one-line refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from manifold import cli
from manifold.config import ConfigError, load_config
from manifold.islands import diloco
from manifold.islands.local import run_islands
from manifold.islands.store_sync import (
  check_config,
  claim,
  delta_key,
  first_difference,
  global_key,
  open_store,
  shared_config,
  update_key,
)
from manifold.provenance import ledger
from manifold.store import Identity, Store, fetch
from manifold.train.metrics import read_metrics

from .conftest import data_overrides

EXPERIMENT = "experiments/islands.py:tiny"


@pytest.fixture
def island_env(compile_cache, monkeypatch):
  """The island processes share the session's persistent XLA cache: each program compiles once."""
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def warm_cache(overrides: list[str]) -> None:
  """Tokenises the corpus once here, so the islands do not all do it at once."""
  from manifold.train.run import load_run_data, with_absolute_paths

  load_run_data(with_absolute_paths(load_config(EXPERIMENT, overrides)))


class Outage:
  """A `file://` store behind a symlink: `down()` points it at a plain file (every write and
  listing fails: the store is unavailable), `up()` back at its folder; each switch is atomic."""

  def __init__(self, root):
    self.root, self.link, self.folder, self.blocker = root, root / "store", root / "store_folder", root / "blocker"
    self.folder.mkdir()
    self.blocker.write_text("")
    self.link.symlink_to(self.folder)
    self.url = f"file://{self.link}"

  def _point(self, target) -> None:
    tmp = self.root / f".store-{time.monotonic_ns()}"
    tmp.symlink_to(target)
    os.replace(tmp, self.link)

  def down(self) -> None:
    self._point(self.blocker)

  def up(self) -> None:
    self._point(self.folder)


def membership(workdir) -> list[dict]:
  path = os.path.join(workdir, "membership.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def dequantize(codes: np.ndarray, scales: np.ndarray | None, shape, block: int) -> np.ndarray:
  """numpy reference of int8 / float32 outer-gradient codes."""
  n = int(np.prod(shape))
  if scales is None:
    return codes.astype(np.float32).reshape(shape)
  rows = codes.astype(np.float32)[: scales.size * block].reshape(scales.size, block) * scales[:, None]
  return rows.reshape(-1)[:n].reshape(shape)


def test_two_islands_match_a_numpy_outer_step_and_count_their_bytes(corpus_dir, tmp_path, island_env):
  lr, mu, block = 0.7, 0.9, 32
  overrides = data_overrides(corpus_dir, tmp_path / "cache") + [
    "--config.islands.bits=8",
    f"--config.islands.quant_block={block}",
    "--config.islands.error_feedback=true",
    "--config.islands.overlap_steps=1",
    "--config.islands.snapshot_every=4",  # full float32 globals and momentum after rounds 0 and 4 only
  ]
  warm_cache(overrides)
  outage, stop, outages = Outage(tmp_path), threading.Event(), []

  def go_down_for_a_moment():  # the store is away for 1.5 s mid-run: every island retries with backoff and goes on
    while not stop.is_set() and len(membership(tmp_path / "run" / "island-0")) < 2:
      time.sleep(0.01)
    if not stop.is_set():
      outage.down()
      time.sleep(1.5)
      outage.up()
      outages.append(len(membership(tmp_path / "run" / "island-0")))

  lines, thread = [], threading.Thread(target=go_down_for_a_moment)
  thread.start()
  try:
    code = run_islands(
      EXPERIMENT, str(tmp_path / "run"), 2, overrides, store=outage.url, echo=lines.append, timeout_s=240
    )
  finally:
    stop.set()
    thread.join()
    outage.up()
  assert code == 0, "\n".join(lines[-60:])
  assert outages and outages[0] < 12, outages  # it happened before the last round

  store = Store.open(outage.url)
  rows = membership(tmp_path / "run" / "island-0")
  assert {(r["fragment"], r["round"]) for r in rows} == {(p, r) for p in (0, 1) for r in range(1, 7)}  # 24 / H=4
  assert all(r["members"] == [0, 1] and not r["dropped"] for r in rows), rows  # the default screen passes honest ones
  judged = [  # each island's ledger verifies; the deltas it judged as a round's leader
    e for k in (0, 1) for e in ledger.read(str(tmp_path / "run" / f"island-{k}")).entries if e["kind"] == "island_delta"
  ]
  assert sorted((e["detail"]["fragment"], e["detail"]["round"], e["detail"]["island"]) for e in judged) == [
    (p, r, k) for p in (0, 1) for r in range(1, 7) for k in (0, 1)
  ]  # each delta judged once, by its round's leader
  assert all(e["verdict"] == "accepted" for e in judged)
  num_params = 0
  for p in (0, 1):
    assert sorted(store.list(f"global/{p}/")) == [global_key(p, 0), global_key(p, 4)]
    assert [k.rsplit("/", 1)[0] for k in store.list(f"outer/{p}/")] == [f"outer/{p}/{4:08d}"]
    start = fetch(store, global_key(p, 0))
    params, momentum = dict(start.arrays), {}  # each round's parameters, rebuilt from the update objects
    prev_id = start.content_hash  # a round's id: round 0's global, then each round's update
    num_params += sum(a.size for a in params.values())
    for r in range(1, 7):
      update = fetch(store, update_key(p, r))
      deltas = [fetch(store, delta_key(p, r, k)) for k in update.meta["members"]]
      assert update.parents == [prev_id] + [d.content_hash for d in deltas]  # what the mean was made of
      tokens = np.array([d.meta["tokens"] for d in deltas], np.float64)
      assert list(tokens) == update.meta["tokens"]
      for name, before in params.items():
        grads = [dequantize(d.arrays[f"{name}:codes"], d.arrays[f"{name}:scales"], before.shape, block) for d in deltas]
        mean = sum(w / tokens.sum() * g.astype(np.float64) for w, g in zip(tokens, grads))
        momentum[name] = mu * momentum.get(name, 0.0) + mean
        step = -lr * (mean + mu * momentum[name])  # Nesterov SGD, published quantised like the deltas (8 bits)
        scales = update.arrays[f"{name}:scales"]
        applied = dequantize(update.arrays[f"{name}:codes"], scales, before.shape, block)
        half_scale = np.repeat(scales, block)[: before.size].reshape(before.shape) / 2
        assert np.all(np.abs(applied - step) <= half_scale * (1 + 1e-3) + 1e-6), f"{name} round {r}"
        np.testing.assert_allclose(scales, np.abs(np.pad(step.ravel(), (0, -before.size % block))).reshape(-1, block).max(1) / 127, rtol=1e-4, atol=1e-9)  # fmt: skip
        params[name] = before + applied  # what every island makes of round r - 1 and the update
      if r == 4:  # the snapshot: bit for bit the parameters rebuilt from round 0 and updates 1..4
        new = fetch(store, global_key(p, r))
        assert new.parents == [update.content_hash] and new.meta["members"] == update.meta["members"]
        for name, rebuilt in params.items():
          np.testing.assert_array_equal(new.arrays[name], rebuilt, err_msg=f"{name} round {r}")
        outer = fetch(store, store.list(f"outer/{p}/")[0])
        assert outer.meta == {"fragment": p, "round": 4}
      prev_id = update.content_hash

  first_loss = [
    next(r["loss"] for r in read_metrics(tmp_path / "run" / f"island-{k}" / "metrics.jsonl") if "loss" in r)
    for k in (0, 1)
  ]
  assert first_loss[0] != first_loss[1]  # both start from round 0: only their own data can tell them apart
  logged = [row for row in read_metrics(tmp_path / "run" / "island-0" / "metrics.jsonl") if "islands/bytes_sent" in row]
  assert len(logged) == 24 and sum(row["islands/bytes_sent"] for row in logged) > 0
  last = logged[-1]
  sent, received = last["islands/bytes_sent_cumulative"], last["islands/bytes_received_cumulative"]
  assert sent == sum(row["islands/bytes_sent"] for row in logged)
  assert received == sum(row["islands/bytes_received"] for row in logged) > 0
  assert last["islands/dp_allreduce_bytes_cumulative"] == diloco.allreduce_bytes(num_params, 2, 24)
  retries = [
    read_metrics(tmp_path / "run" / f"island-{k}" / "metrics.jsonl")[-2]["islands/store_retries"] for k in (0, 1)
  ]
  assert min(retries) > 0, retries  # both islands met the outage
  ratio = 2 * last["islands/dp_allreduce_bytes_cumulative"] / (sent + received)
  assert last["islands/dp_ratio"] == pytest.approx(ratio) and ratio > 1, (sent, received, ratio)


def _train(corpus_dir, cache_dir, workdir, store: str, k: int, *extra: str) -> subprocess.Popen:
  os.makedirs(workdir, exist_ok=True)
  command = [
    sys.executable, "-m", "manifold.cli", "train", "--config", EXPERIMENT, "--workdir", str(workdir), "--no-progress",
    "--islands.store", store, "--islands.id", str(k), *data_overrides(corpus_dir, cache_dir), *extra,
  ]  # fmt: skip
  log = open(os.path.join(workdir, "log.txt"), "a")
  return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(workdir) -> str:
  with open(os.path.join(workdir, "log.txt")) as f:
    return f.read()


def _wait(what: str, ok, procs, deadline: float):
  while not (result := ok()):
    dead = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
    assert not dead and time.time() < deadline, f"waiting for {what}: exited {dead} or timed out"
    time.sleep(0.05)
  return result


def test_islands_survive_a_kill_a_corrupt_delta_and_a_restart(corpus_dir, tmp_path, island_env):
  cache = tmp_path / "cache"
  extra = [
    "--config.islands.count=3",
    "--config.islands.fragments=1",
    "--config.islands.inner_steps=2",
    "--config.islands.bits=4",
    "--config.islands.snapshot_every=3",  # a restarted island rebuilds the newest round from an older snapshot
    "--config.train.steps=100000",  # ended by SIGTERM once the restarted island is back
    "--config.train.checkpoint_every=10",
    "--config.train.eval_every=100000",
    "--config.train.log_every=50",
  ]
  warm_cache(data_overrides(corpus_dir, cache) + extra)
  outage = Outage(tmp_path)
  url, root = outage.url, outage.folder
  dirs = {k: tmp_path / f"island-{k}" for k in range(3)}
  procs = {}
  deadline = time.time() + 240
  try:
    procs[0] = _train(corpus_dir, cache, dirs[0], url, 0, *extra)  # compiles first: the others find its programs cached
    stepped = lambda: any(r["step"] >= 1 for r in read_metrics(dirs[0] / "metrics.jsonl"))  # noqa: E731
    _wait("island 0's first step", stepped, procs, deadline)
    procs.update({k: _train(corpus_dir, cache, dirs[k], url, k, *extra) for k in (1, 2)})
    checkpointed = lambda: any(p.name.isdigit() for p in (dirs[2] / "checkpoints").glob("*"))  # noqa: E731
    _wait("island 2's first checkpoint", lambda: checkpointed() and len(membership(dirs[2])) >= 12, procs, deadline)
    assert all(r["members"] == [0, 1, 2] for r in membership(dirs[0]))  # round 1 waited for the late starters
    procs[2].send_signal(signal.SIGKILL)
    procs[2].wait()
    killed = procs.pop(2)
    assert killed.returncode == -signal.SIGKILL
    last_with_2 = max(r["round"] for r in membership(dirs[0]) if 2 in r["members"])

    # The run goes on without island 2 (dropped once its heartbeat is past islands.deadline_s).
    after = lambda: [r for r in membership(dirs[0]) if r["round"] > last_with_2]  # noqa: E731
    _wait("a round without island 2", lambda: any(r["members"] == [0, 1] for r in after()), procs, deadline)
    without = min(r["round"] for r in after() if r["members"] == [0, 1])
    assert without <= last_with_2 + 2  # island 2 may have sent one more delta before it died
    row = next(r for r in after() if r["round"] == without)
    assert row["dropped"] == {"2": "no heartbeat within islands.deadline_s"}, row

    # A copy of a real delta with bytes flipped, planted as island 2's for a round ahead: rejected by its hash.
    newest = max(r["round"] for r in membership(dirs[0]))
    source = root / "deltas" / "0" / f"{newest:08d}" / "1"
    data = bytearray(source.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    planted = newest + 25
    target = root / "deltas" / "0" / f"{planted:08d}" / "2"
    target.parent.mkdir(parents=True, exist_ok=True)
    (target.parent / ".planting").write_bytes(bytes(data))
    os.replace(target.parent / ".planting", target)
    row = _wait(
      f"round {planted}", lambda: next((r for r in membership(dirs[0]) if r["round"] == planted), None), procs, deadline
    )
    assert row["members"] == [0, 1] and "corrupt object (payload hash)" in row["dropped"]["2"], row
    assert f"round {planted}: island 2's delta rejected, not used" in _log(dirs[0])
    entry = next(
      e
      for e in ledger.read(str(dirs[0])).entries
      if e["kind"] == "island_delta" and e["detail"]["round"] == planted and e["detail"]["island"] == 2
    )
    assert entry["verdict"] == "rejected" and "corrupt object (payload hash)" in entry["reason"], entry
    assert entry["contributor"] == Identity.load_or_create(str(dirs[2] / "island.key")).public_key

    # Island 2 restarts from its own checkpoint and rejoins the run at its next round.
    procs[2] = _train(corpus_dir, cache, dirs[2], url, 2, *extra)
    rejoined = lambda: [r for r in membership(dirs[0]) if r["round"] > planted and 2 in r["members"]]  # noqa: E731
    _wait("island 2 back", lambda: len(rejoined()) >= 3, procs, deadline)
    assert all(r["members"] == [0, 1] for r in membership(dirs[0]) if without <= r["round"] < rejoined()[0]["round"])
    assert "resuming from step" in _log(dirs[2])
    assert _log(dirs[2]).count("island 2 of 3 joined") == 2
    # It rejoined from the newest snapshot (a multiple of 3) and the updates written since, each checked
    # against its parent and sha256: the round it then reported was accepted (based on the run's round).
    joined = re.findall(
      r"next fragment 0 round (\d+) .*from fragment 0's round (\d+) snapshot \+ (\d+) updates", _log(dirs[2])
    )
    assert len(joined) == 2, _log(dirs[2])[-3000:]
    next_round, snapshot, updates = map(int, joined[1])
    # (3 updates when it read the store between a snapshot round's update, the commit point, and its snapshot)
    assert snapshot % 3 == 0 and snapshot + updates == next_round - 1 and updates <= 3, joined
    assert planted < next_round <= rejoined()[0]["round"]  # it restarted after round `planted` was judged
    rounds = [int(k.rsplit("/", 1)[1]) for k in Store.open(url).list("global/0/")]
    assert rounds == list(range(0, max(rounds) + 1, 3)), rounds  # the leader's full float32 writes: every 3rd round
    assert "reading full global parameters instead" not in _log(dirs[2])
    for k in (0, 1):  # the others stop cleanly (SIGTERM: a checkpoint, exit 0) ...
      procs[k].send_signal(signal.SIGTERM)
    for k in (0, 1):
      assert procs[k].wait(timeout=120) == 0, _log(dirs[k])[-3000:]
      assert "stopped at step" in _log(dirs[k])
    # ... and island 2, alone, loses the store for good: past the retries, one clear line and exit 1.
    outage.down()
    assert procs[2].wait(timeout=120) == 1, _log(dirs[2])[-3000:]
    last = _log(dirs[2]).strip().splitlines()[-1]
    assert re.fullmatch(
      r"manifold: islands: island 2: the store failed past its retries: .* failed after 6 attempts: .*", last
    )
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()


def test_refusals_are_one_line(tiny_config, corpus_dir, tmp_path, capsys):
  base = ("--config.islands.count=2", "--config.islands.store=file:///unused", "--config.islands.id=0")
  cfg = tiny_config(*base)
  store = open_store(f"file://{tmp_path}/store")
  first, second = Identity.generate(), Identity.generate()

  fingerprint = check_config(store, first, cfg)
  assert check_config(store, second, tiny_config(*base[:2], "--config.islands.id=1")) == fingerprint  # id is per island
  assert check_config(store, second, tiny_config(*base, "--config.train.learning_rate=1e-3")) == fingerprint  # FREE
  with pytest.raises(ConfigError, match=r"^islands\.inner_steps=8: the run in .* has 100; .*refusing to join$") as e:
    check_config(store, second, tiny_config(*base, "--config.islands.inner_steps=8"))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"^model\.d_model=32: the run .* has 64"):
    check_config(store, second, tiny_config(*base, "--config.model.d_model=32"))
  assert first_difference(shared_config(cfg), shared_config(cfg)) is None

  claim(store, first, 0, 2, fingerprint)
  claim(store, first, 0, 2, fingerprint)  # a restart with the same key reclaims its id
  with pytest.raises(ConfigError, match=r"^islands\.id=0 is taken by another island \(key [0-9a-f]{16}\.\.\.\); pick a free id \(1\)$"):  # fmt: skip
    claim(store, second, 0, 2, fingerprint)

  blocker = tmp_path / "a-file"
  blocker.write_text("")
  with pytest.raises(ConfigError, match=r"^islands\.store='nosuch://bucket/run': unsupported store scheme") as e:
    open_store("nosuch://bucket/run")
  assert "\n" not in str(e.value)

  for bad, message in (
    ("--config.islands.id=2", r"islands\.id=2: must be in \[0, islands\.count=2\)"),
    ("--config.islands.bits=5", r"islands\.bits=5: must be 4, 8 or 32"),
    ("--config.islands.fragments=3", r"islands\.fragments=3: must divide islands.inner_steps|must divide model"),
  ):
    with pytest.raises(ConfigError, match=message):
      tiny_config(*base, bad)
  with pytest.raises(ConfigError, match=r"islands\.fragments=2: must divide model\.n_layers=1"):
    tiny_config(*base, "--config.islands.fragments=2", "--config.model.n_layers=1")

  train = ["train", "--config", EXPERIMENT, "--workdir", str(tmp_path / "run"), "--no-progress"]
  train += data_overrides(corpus_dir, tmp_path / "cache")
  for flags, message in (
    (
      ["--islands.store", "nosuch://bucket/run", "--islands.id", "0"],
      "islands.store='nosuch://bucket/run': unsupported",
    ),
    (["--islands.store", f"file://{blocker}/store", "--islands.id", "0"], "cannot write"),
    (["--islands.store", store.url, "--islands.id", "2"], "islands.id=2: must be in [0, islands.count=2)"),
    (["--islands.store", store.url, "--islands.id", "-1"], "--islands.id -1: must be an integer in [0, islands.count)"),
  ):
    assert cli.main(train + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("manifold: error: ") and message in err and err.count("\n") == 1, err
