"""Checking untrusted island updates (manifold.islands.robust): the screen and the robust aggregates
against plain numpy, poisoned deltas rejected or bounded, honest ones never; then three in-process
`StoreSync` islands on a real `file://` store (a linear-regression toy in place of the model) where one
island publishes -100 x its outer gradient: the leader rejects it, records why in the round's update
and its ledger, and the run's loss is that of the honest islands."""

from __future__ import annotations

import dataclasses
import threading
import types

import jax.numpy as jnp
import numpy as np
import pytest

from manifold.config import base_config, validate
from manifold.islands import robust
from manifold.islands.store_sync import connect, delta_key, shared_config, update_key
from manifold.model.accounting import training_flops_per_token
from manifold.provenance import ledger
from manifold.store import Store, fetch

DEFAULTS = validate(base_config()).islands


def random_deltas(rng, n, shapes=((7, 5), (11,), (3, 2, 4))):
  return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(n)]


def honest_deltas(rng, n, noise=1.5, shapes=((64, 8), (128,))):
  """n islands' deltas: a common direction plus independent noise of `noise` x its size (pairwise
  cosine ~ 1 / (1 + noise^2) = 0.3), each scaled by a factor in [0.75, 1.35] (honest runs: 0.81-1.30)."""
  common = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  return [
    [(rng.uniform(0.75, 1.35) * (c + noise * rng.standard_normal(c.shape))).astype(np.float32) for c in common]
    for _ in range(n)
  ]


def distance(a, b) -> float:
  return robust.global_norm([x - y for x, y in zip(a, b)])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_trimmed_mean_and_median_match_sort_based_references(n):
  rng = np.random.default_rng(n)
  deltas = random_deltas(rng, n)
  for j in range(3):
    ordered = np.sort(np.stack([d[j] for d in deltas]).astype(np.float64), axis=0)
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    np.testing.assert_allclose(robust.median(deltas)[j], middle, rtol=1e-6, atol=1e-6)
    assert robust.median(deltas)[j].dtype == np.float32
    for trim in (0.0, 0.1, 0.25, 0.34, 0.49):
      cut = min(int(np.floor(trim * n)), (n - 1) // 2)
      got = robust.aggregate("trimmed_mean", deltas, [1] * n, trim)[j]
      assert got.dtype == np.float32 and got.shape == deltas[0][j].shape
      np.testing.assert_allclose(got, ordered[cut : n - cut].mean(0), rtol=1e-6, atol=1e-6)
  assert robust.trim_count(3, 0.25) == 0 and robust.trim_count(4, 0.25) == 1 and robust.trim_count(2, 0.49) == 0


def test_mean_is_the_token_weighted_mean_the_leader_computed_before():
  rng = np.random.default_rng(0)
  deltas, weights = random_deltas(rng, 4), [512, 1024, 0, 3072]
  total = float(sum(weights))
  got = robust.aggregate("mean", deltas, weights)
  for j in range(3):
    before = sum(np.float32(w / total) * d[j] for d, w in zip(deltas, weights)).astype(np.float32)  # _lead's own
    np.testing.assert_array_equal(got[j], before)
    exact = sum(w / total * d[j].astype(np.float64) for d, w in zip(deltas, weights))
    np.testing.assert_allclose(got[j], exact, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="islands.aggregate='mode'"):
    robust.aggregate("mode", deltas, weights)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_delta_scaled_100x_is_rejected_by_the_norm_bound(n):
  rng = np.random.default_rng(n)
  deltas = dict(enumerate(honest_deltas(rng, n)))
  deltas[n - 1] = [100 * a for a in deltas[n - 1]]
  s = robust.screen(deltas, max_norm_ratio=DEFAULTS.max_norm_ratio, min_cosine=DEFAULTS.min_cosine)
  assert s.kept == list(range(n - 1)) and list(s.rejected) == [n - 1]
  assert "x the median of the others'" in s.rejected[n - 1] and "islands.max_norm_ratio=10" in s.rejected[n - 1]
  assert s.ratios[n - 1] > 50 and max(s.ratios[k] for k in range(n - 1)) < 2
  assert s.note == ("cosine bound skipped: 2 deltas (it needs 3)" if n == 2 else "")
  numbers = s.numbers()
  assert set(numbers) == {str(k) for k in range(n)} and all(
    set(v) == {"norm", "ratio", "cosine"} for v in numbers.values()
  )
  off = robust.screen(deltas, max_norm_ratio=0, min_cosine=-1)
  assert off.kept == list(range(n)) and not off.rejected


def test_a_sign_flipped_delta_among_three_is_rejected_by_the_cosine_bound_and_two_cannot_tell():
  rng = np.random.default_rng(1)
  deltas = dict(enumerate(honest_deltas(rng, 3, noise=0.75)))  # cosine to the median ~0.84 (honest runs: 0.68-0.98)
  deltas[1] = [-a for a in deltas[1]]
  s = robust.screen(deltas, max_norm_ratio=DEFAULTS.max_norm_ratio, min_cosine=DEFAULTS.min_cosine)
  assert s.kept == [0, 2] and list(s.rejected) == [1], s
  assert s.cosines[1] < -0.1 and "to the coordinate-wise median of 3 deltas < islands.min_cosine=0" in s.rejected[1]
  assert min(s.cosines[0], s.cosines[2]) > 0.3
  two = robust.screen({0: deltas[0], 1: deltas[1]}, max_norm_ratio=10, min_cosine=0)
  assert two.kept == [0, 1] and two.cosines == {0: None, 1: None} and "skipped" in two.note


def test_a_delta_with_a_nan_or_an_infinity_is_always_rejected_and_left_out_of_the_references():
  rng = np.random.default_rng(2)
  deltas = dict(enumerate(honest_deltas(rng, 4)))
  deltas[1][0][3, 3], deltas[3][1][0] = np.nan, np.inf
  s = robust.screen(deltas, max_norm_ratio=0, min_cosine=0)  # the norm bound off: rejected all the same
  assert s.kept == [0, 2] and set(s.rejected) == {1, 3} and "non-finite" in s.rejected[1]
  assert s.numbers()["1"] == {"norm": None, "ratio": None, "cosine": None}
  assert s.ratios[0] == pytest.approx(s.norms[0] / s.norms[2]) and "skipped: 2 deltas" in s.note


def test_honest_correlated_deltas_are_never_rejected():
  rejected = 0
  for trial in range(200):
    rng = np.random.default_rng(1000 + trial)
    n = 2 + trial % 7
    s = robust.screen(
      dict(enumerate(honest_deltas(rng, n))),
      max_norm_ratio=DEFAULTS.max_norm_ratio,
      min_cosine=DEFAULTS.min_cosine,
    )
    rejected += len(s.rejected)
  assert rejected == 0


@pytest.mark.parametrize("poison", [-100.0, 100.0])
def test_with_the_screen_off_median_and_trimmed_mean_stay_near_the_honest_mean_and_mean_does_not(poison):
  rng = np.random.default_rng(7)
  n = 5  # trim 0.25 of 5: one value dropped at each end
  deltas = honest_deltas(rng, n, noise=0.5)
  honest = robust.mean(deltas[:-1], [1] * (n - 1))
  scale = robust.global_norm(honest)
  poisoned = deltas[:-1] + [[poison * a for a in deltas[-1]]]
  assert distance(robust.aggregate("mean", poisoned, [1] * n), honest) > 10 * scale
  for method in ("median", "trimmed_mean"):
    assert distance(robust.aggregate(method, poisoned, [1] * n, DEFAULTS.trim), honest) < 0.5 * scale, method
  three = deltas[:2] + [[poison * a for a in deltas[2]]]
  assert distance(robust.median(three), robust.mean(deltas[:2], [1, 1])) < 0.5 * scale


def test_the_settings_are_shared_by_every_island_and_checked():
  shared = shared_config(base_config())
  assert {"islands.aggregate": "mean", "islands.trim": 0.25, "islands.max_norm_ratio": 10.0}.items() <= shared.items()
  assert shared["islands.min_cosine"] == DEFAULTS.min_cosine
  for name, bad in (("aggregate", "mode"), ("trim", 0.5), ("max_norm_ratio", 1.0), ("min_cosine", -1.5)):
    c = base_config()
    c.islands[name] = bad
    with pytest.raises(ValueError, match=rf"islands\.{name}="):
      validate(c)


# ----------------------------------------------------------------------------------------
# The real leader: three StoreSync islands in threads, a file:// store, a linear-regression toy

DIM, ROWS, INNER, STEPS, LR = 16, 64, 4, 40, 0.2  # 10 rounds of 4 inner SGD steps


@dataclasses.dataclass(frozen=True)
class ToyState:
  params: dict

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def toy_data(k: int):
  rng = np.random.default_rng(100)
  w_true = rng.standard_normal(DIM).astype(np.float32)
  x = np.random.default_rng(k).standard_normal((ROWS, DIM)).astype(np.float32)
  return x, x @ w_true + 0.1 * np.random.default_rng(50 + k).standard_normal(ROWS).astype(np.float32)


def toy_loss(w: np.ndarray, islands=(0, 1, 2)) -> float:
  return float(np.mean([np.mean((x @ w - y) ** 2) / 2 for x, y in map(toy_data, islands)]))


def run_toy(root, poisoned: int | None, **islands) -> tuple[np.ndarray, list[dict], list[list[str]]]:
  """Three islands train the toy (island `poisoned` publishes -100 x its outer gradient, signed and
  well-formed); the final global weights, each island's sync object and its console lines."""
  url = f"file://{root}/store"
  syncs, lines, results, errors = [None] * 3, [[] for _ in range(3)], [None] * 3, []

  def island(k: int):
    try:
      c = base_config()
      c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, max_seq_len=64)
      c.train.update(steps=STEPS, batch_size=8, seq_len=64, warmup_steps=2)
      c.islands.update(count=3, store=url, id=k, inner_steps=INNER, heartbeat_s=0.2, deadline_s=10.0, **islands)
      sync = syncs[k] = connect(c, str(root / f"island-{k}"), lines[k].append)
      if k == poisoned:
        real = sync._sync

        def _sync(params, p, r, v):  # x' = g + 100 (g - x): the delta g - x' it sends is -100 (g - x)
          g, x = sync.held[p].arrays, sync.layout.take(params, p)
          return real(sync.layout.put(params, p, [gi + 100 * (gi - xi) for gi, xi in zip(g, x)]), p, r, v)

        sync._sync = _sync
      state = ToyState({"w": jnp.zeros(DIM, jnp.float32)})
      state = sync.join(types.SimpleNamespace(abstract=state), state, 0)
      x, y = toy_data(k)
      for step in range(1, STEPS + 1):
        w = np.asarray(state.params["w"])
        state = state.replace(params={"w": jnp.asarray(w - LR * x.T @ (x @ w - y) / ROWS)})
        state, _ = sync.after_step(state, step)
      sync.close()
      results[k] = np.asarray(state.params["w"])
    except BaseException as e:  # noqa: BLE001 -- re-raised by the test
      errors.append(e)

  threads = [threading.Thread(target=island, args=(k,)) for k in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors and not any(t.is_alive() for t in threads), (errors, lines)
  return results[0], syncs, lines


def test_a_poisoned_island_is_rejected_by_the_leader_recorded_in_its_ledger_and_the_loss_is_unharmed(tmp_path):
  honest_w, _, _ = run_toy(tmp_path / "honest", None)
  w, syncs, lines = run_toy(tmp_path / "poisoned", 2)
  median_w, _, _ = run_toy(tmp_path / "median", 2, aggregate="median", max_norm_ratio=0.0, min_cosine=-1.0)
  mean_w, _, _ = run_toy(tmp_path / "mean", 2, max_norm_ratio=0.0, min_cosine=-1.0)
  start, honest, screened, median, mean = map(toy_loss, (np.zeros(DIM, np.float32), honest_w, w, median_w, mean_w))
  assert honest < 0.05 * start, (start, honest)
  assert screened < 1.5 * honest and median < 1.5 * honest, (honest, screened, median)  # unharmed
  assert not mean <= 100 * start, (start, mean)  # what the poisoned island does to a plain mean (NaN counts)

  # Every round: island 2 rejected by the norm and cosine bounds, the update the honest islands' outer step.
  store, rounds = Store.open(f"file://{tmp_path}/poisoned/store"), STEPS // INNER
  leaders = {}
  for r in range(1, rounds + 1):
    update = fetch(store, update_key(0, r))
    assert update.meta["members"] == [0, 1], update.meta
    leaders[r] = update.meta["leader"]  # island 0 unless a heartbeat read missed it for a moment
    why = update.meta["dropped"]["2"]
    assert "x the median of the others'" in why and "islands.min_cosine=0" in why, why
    numbers = update.meta["screen"]["islands"]
    assert numbers["2"]["ratio"] > 50 and numbers["2"]["cosine"] < 0 < min(numbers[k]["cosine"] for k in "01")
    if r == 1:  # momentum from zero: u = -lr (g + mu g), g the token-weighted mean of islands 0 and 1
      g = np.mean([fetch(store, delta_key(0, 1, k)).arrays["w:codes"] for k in (0, 1)], axis=0)
      np.testing.assert_allclose(update.arrays["w:codes"], -0.7 * 1.9 * g, rtol=1e-5, atol=1e-7)
  assert any("island 2's delta rejected, not used: norm" in line for k in set(leaders.values()) for line in lines[k])

  # The leaders' ledgers: islands 0 and 1 accepted, island 2 rejected with the reason, every round, each
  # delta judged once, by its round's leader only.
  tokens = 8 * 64 * INNER
  flops = tokens * training_flops_per_token(syncs[0].model_cfg, 64)
  entries, mirrored = [], 0
  for judge in range(3):
    checked = ledger.read(str(tmp_path / "poisoned" / f"island-{judge}"), trusted=[syncs[judge].identity.public_key])
    mirrored += len(checked.entries)
    for e in checked.entries:
      assert e["kind"] == "island_delta" and leaders[e["detail"]["round"]] == judge, e
      entries.append(e)
  assert sorted((e["detail"]["round"], e["detail"]["island"]) for e in entries) == [
    (r, k) for r in range(1, rounds + 1) for k in range(3)
  ]
  for e in entries:
    k = e["detail"]["island"]
    assert e["contributor"] == syncs[k].identity.public_key and e["tokens"] == tokens and e["flops"] == flops
    assert e["object"] == fetch(store, delta_key(0, e["detail"]["round"], k)).content_hash
    assert set(e["detail"]) == {"fragment", "round", "island", "norm", "ratio", "cosine"}
    if k == 2:
      assert e["verdict"] == "rejected" and "islands.max_norm_ratio=10" in e["reason"], e
    else:
      assert e["verdict"] == "accepted" and e["reason"] == "", e
  totals = ledger.totals(entries)
  assert totals[syncs[2].identity.public_key]["accepted"] == 0 and totals[syncs[1].identity.public_key]["tokens"] > 0
  assert len(store.list("ledger/")) == mirrored  # mirrored to the store

  # A would-be leader that loses the race (the round's update is there) records nothing.
  loser = next(k for k in range(3) if k != leaders[rounds])
  before = len(ledger.read(str(tmp_path / "poisoned" / f"island-{loser}")).entries)
  assert syncs[loser]._lead(0, rounds, {0, 1, 2}, set()) is None
  assert len(ledger.read(str(tmp_path / "poisoned" / f"island-{loser}")).entries) == before
