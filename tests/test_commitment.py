"""Untrusted rollout workers (manifold.rl.commitment): honest workers' batches, made by the worker's own
code from a real tiny policy, always pass the learner's checks; cheating workers are caught at the stated
rate and earn no credit in the learner's ledger. In one process: a Learner, honest Workers and cheating
ones meet through a store, and the learner judges each batch with `_take`, as its `collect` does."""

from __future__ import annotations

import hashlib
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from manifold.config import load_config, model_config, validate
from manifold.provenance import ledger
from manifold.rl import commitment
from manifold.rl.protocol import parse_rollout_key
from manifold.rl.rollout import Sampled, pack, token_logprobs
from manifold.rl.tasks import decode_completion
from manifold.store import StoredObject
from manifold.train.state import build_model

TINY = "experiments/grpo.py:tiny"
# init_std 0.5: a peaked policy (entropy ~2.9 nats a token, like a trained one), not the near-uniform
# initial one, whose samples no test could tell from uniform tokens
PEAKED = ["--config.model.init_std=0.5"]
ROUNDS = 10  # batches of each cheater; 4 honest batches a round


def quiet(text: str) -> None:
  pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(learner, {name: worker}): a learner that has published policy 0, and workers holding it."""
  from manifold.rl.learner import Learner
  from manifold.rl.worker import Worker

  root = tmp_path_factory.mktemp("commitment")
  over = [*PEAKED, f"--config.rl.store={root / 'store'}"]
  learner = Learner(load_config(TINY, over), str(root / "learner"), say=quiet)
  learner.publish_policy(resumed=True)
  version, digest = learner.published
  names = ["honest-0", "honest-1", "wrong-version", "perturbed", "copier", "random"]
  workers = {}
  for k, name in enumerate(names):
    w = Worker(load_config(TINY, [*over, f"--config.rl.worker={k}"]), str(root / name), say=quiet, store=learner.store)
    assert w.load_policy(version, digest)
    workers[name] = w
  # the wrong-version worker samples and commits with other parameters, claiming policy 0
  cheat = workers["wrong-version"]
  _, params, extra = nnx.split(build_model(model_config(cheat.cfg), jax.random.key(1)), nnx.Param, ...)
  cheat.params = (jax.device_put(nnx.to_pure_dict(params), cheat.shardings[0]),
                  jax.device_put(nnx.to_pure_dict(extra), cheat.shardings[1]))  # fmt: skip
  return learner, workers


def take(learner, key: str) -> tuple[bool, dict]:
  """(accepted, its ledger entry): the learner judges the batch under `key`."""
  obj = learner._take(key, *parse_rollout_key(key))
  entry = json.loads(ledger.read_lines(learner.workdir)[-1])
  assert entry["detail"]["key"] == key and (entry["verdict"] == "accepted") == (obj is not None)
  learner.release()
  return obj is not None, entry


def made(w) -> tuple[dict[str, np.ndarray], dict]:
  return w.make(w.held[0], w.seq)


def put(w, arrays: dict[str, np.ndarray], meta: dict) -> str:
  key = w.publish(arrays, {**meta, "seq": w.seq})
  w.seq += 1
  assert key is not None
  return key


def perturbed(w, arrays, meta, rng, round_: int) -> str:
  """An honest batch with its committed log-probs (even rounds) or its behaviour log-probs (odd ones)
  lowered by 1.5 to 3 times the tolerance."""
  verifier = commitment.Verifier(w.c, None, task=w.task, tokenizer=w.tokenizer)
  arrays = dict(arrays)
  if round_ % 2 == 0:
    noise = rng.uniform(1.5, 3, arrays["commit_logp"].shape) * verifier.commit_tolerance
    arrays["commit_logp"] = (arrays["commit_logp"] - noise).astype(np.float32)
  else:
    noise = rng.uniform(1.5, 3, arrays["mask"].shape) * verifier.behaviour_tolerance * arrays["mask"]
    arrays["behaviour_logp"] = (arrays["behaviour_logp"] - noise).astype(np.float32)
  return put(w, arrays, meta)


def random_tokens(w, arrays, meta, rng) -> str:
  """The batch's own prompts, uniform random completions (bytes, no end-of-text, rl.max_new_tokens of
  them), with everything else computed honestly under the policy: rewards, behaviour log-probs and
  the commitment."""
  shape, tokenizer = w.shape, w.tokenizer
  rows = [arrays["tokens"][b, : np.argmax(arrays["mask"][b]) + 1] for b in range(shape.rows)]
  new = rng.integers(0, 256, (shape.rows, shape.max_new_tokens)).astype(np.int32)
  lengths = np.full(shape.rows, shape.max_new_tokens, np.int32)
  tokens, mask, _ = pack(rows, Sampled(new, lengths, np.zeros(new.shape, np.float32)), shape.seq_len)
  behaviour = np.asarray(jax.jit(token_logprobs)(nnx.merge(w.graphdef, *w.params), tokens))
  examples = w.task.prompts("train", meta["seed"], shape.prompts)
  texts = [decode_completion(tokenizer, new[b]) for b in range(shape.rows)]
  out = dict(arrays, tokens=tokens, mask=mask, lengths=lengths)
  out["behaviour_logp"] = np.where(mask == 1, behaviour, 0).astype(np.float32)
  out["rewards"] = np.asarray([w.task.reward(examples[b // shape.group], t, format_weight=w.rl.format_weight)
                               for b, t in enumerate(texts)], np.float32)  # fmt: skip
  out["correct"] = np.asarray([w.task.correct(examples[b // shape.group], t) for b, t in enumerate(texts)], np.uint8)
  rl = w.rl
  out.update(commitment.commit((w.graphdef, *w.params), out, w.held[1], count=rl.commit_positions,
                               top_k=rl.commit_top_k))  # fmt: skip
  return put(w, out, {**meta, "tokens": int(lengths.sum())})


def test_honest_workers_always_pass_and_every_cheater_is_caught_and_earns_nothing(run):
  learner, workers = run
  rng = np.random.default_rng(0)
  verdicts: dict[str, list[str]] = {name: [] for name in workers}
  entries = {}

  def judge(name: str, key: str) -> tuple[bool, dict]:
    ok, entry = take(learner, key)
    verdicts[name].append(entry["reason"])
    entries[key] = entry
    return ok, entry

  for r in range(ROUNDS):
    for name in ("honest-0", "honest-1"):
      for _ in range(2):
        judge(name, put(workers[name], *made(workers[name])))
    honest = workers["honest-0"]
    arrays, meta = made(honest)
    if r % 3 == 2:  # the copy is taken before the original: its prompts are another worker's
      copy = put(workers["copier"], arrays, {**meta, "worker": workers["copier"].id})
      original = put(honest, arrays, meta)
      judge("copier", copy)
      judge("honest-0", original)
    else:  # another worker's accepted batch, re-signed
      judge("honest-0", put(honest, arrays, meta))
      judge("copier", put(workers["copier"], arrays, {**meta, "worker": workers["copier"].id}))
    judge("wrong-version", put(workers["wrong-version"], *made(workers["wrong-version"])))
    judge("perturbed", perturbed(workers["perturbed"], *made(workers["perturbed"]), rng, r))
    judge("random", random_tokens(workers["random"], *made(workers["random"]), rng))

  honest = verdicts["honest-0"] + verdicts["honest-1"]
  assert len(honest) == 4 * ROUNDS + ROUNDS and set(honest) == {""}, honest  # no false rejection
  expected = {
    "wrong-version": {"commitment"},
    "perturbed": {"commitment", "behaviour_logp"},
    "copier": {"duplicate", "prompts"},
    "random": {"sampling"},
  }
  for name, reasons in expected.items():
    assert len(verdicts[name]) == ROUNDS and set(verdicts[name]) == reasons, (name, verdicts[name])  # caught: 100%
  assert verdicts["copier"].count("prompts") == len(range(2, ROUNDS, 3))

  # the check's numbers: honest ones well inside the limits, each cheater's far outside
  details = [e["detail"] for e in entries.values()]
  assert all(d["verified"] and d["rows_checked"] == 8 for d in details if "z" in d)
  honest_details = [e["detail"] for e in entries.values() if e["verdict"] == "accepted"]
  assert max(d["max_abs_diff"] for d in honest_details) < 1e-4
  assert max(d["behaviour_diff"] for d in honest_details) < 1e-4
  assert min(d["z"] - d["z_limit"] for d in honest_details) > 4
  random_z = [e["detail"]["z"] for e in entries.values() if e["reason"] == "sampling"]
  assert max(random_z) < min(d["z_limit"] for d in honest_details)

  # credit: accepted work only; cheaters none, honest workers all they generated
  totals = ledger.totals(ledger.read(learner.workdir).entries)
  for name, w in workers.items():
    row = totals[w.identity.public_key]
    if name.startswith("honest"):
      assert row["rejected"] == 0 and row["accepted"] == len(verdicts[name])
      assert row["tokens"] > 0 and row["flops"] > 0
    else:
      assert row == {"accepted": 0, "rejected": ROUNDS, "tokens": 0, "flops": 0.0}, (name, row)
  accepted = [e for e in entries.values() if e["verdict"] == "accepted"]
  assert sum(e["tokens"] for e in accepted) == sum(t["tokens"] for t in totals.values())

  # counted and shown in the metrics row, under the reasons' names
  row = learner._row({}, 0.0, [])
  for reason in ("commitment", "behaviour_logp", "duplicate", "prompts", "sampling"):
    assert row[f"rejected/{reason}"] == learner.counters.rejected[reason] > 0
  assert row["rejected"] == 4 * ROUNDS and row["verified"] >= 5 * ROUNDS + 2 * ROUNDS
  assert len(ledger.read(learner.workdir, trusted=[learner.identity.public_key]).entries) == 9 * ROUNDS  # it verifies

  # the same signed object put back under its key after it was accepted (and deleted); an honest batch
  # whose reward was raised; one whose committed positions were moved
  w = workers["honest-1"]
  arrays, meta = made(w)
  key = put(w, arrays, meta)
  data = learner.store.get(key)
  assert take(learner, key)[0]
  learner.store.put(key, data)
  ok, entry = take(learner, key)
  assert not ok and entry["reason"] == "duplicate"

  arrays, meta = made(w)
  raised = dict(arrays, rewards=arrays["rewards"] + np.float32(1))
  ok, entry = take(learner, put(w, raised, meta))
  assert not ok and entry["reason"] == "rewards"
  arrays, meta = made(w)
  moved = dict(arrays, commit_cols=arrays["commit_cols"][::-1].copy())
  assert np.any(moved["commit_cols"] != arrays["commit_cols"])
  ok, entry = take(learner, put(w, moved, meta))
  assert not ok and entry["reason"] == "positions"


def test_half_the_batches_verified_catch_about_half_the_cheats(run):
  """rl.verify_fraction=0.5: which batches are recomputed is the secret's choice, so a worker lowering its
  committed log-probs is caught on a Binomial(40, 0.5) share (within 10..30, 3.3 standard deviations),
  exactly the batches selected; honest batches still always pass."""
  learner, workers = run
  c = validate(load_config(TINY, [*PEAKED, "--config.rl.verify_fraction=0.5"]))
  verifier = commitment.Verifier(c, learner.spec.graphdef, task=learner.task, tokenizer=learner.tokenizer,
                                 secret=b"test secret")  # fmt: skip
  w, rng = workers["perturbed"], np.random.default_rng(1)
  version, digest = w.held
  caught = selected = 0
  for i in range(40):
    arrays, meta = made(w)
    w.seq += 1
    for cheat in (False, True):
      a = dict(arrays)
      if cheat:
        a["commit_logp"] = (a["commit_logp"] - rng.uniform(0.5, 1, a["commit_logp"].shape)).astype(np.float32)
      obj = StoredObject(
        {"parents": [digest], "meta": meta}, a, hashlib.sha256(f"{i} {cheat}".encode()).hexdigest(), ""
      )
      v = verifier.judge(obj, version=version, worker=w.id, seq=meta["seq"],
                         policy=lambda: (learner.state.params, learner.state.extra))  # fmt: skip
      if cheat:
        caught += not v.ok
        selected += verifier.selected(obj.content_hash)
        assert v.reason in ("", "commitment") and v.detail["verified"] == (v.reason == "commitment")
      else:
        assert v.ok, v
  assert caught == selected and 10 <= caught <= 30, caught


def test_the_sampling_limit_holds_where_a_plain_z_test_fails():
  """Near-certain positions (one token at 1 - 7e-3, seven at 1e-3), 4 a batch, sampled honestly 5,000
  times: a plain z-test at z < -3 rejects every batch that drew a rare token (~3%), the Freedman limit
  never (its bound: exp(-9 / 2) = 1.1%); 16 uniform tokens fail it every time."""
  rng = np.random.default_rng(0)
  vocab, eps, z_star = 8, 1e-3, 3.0
  q = np.array([1 - 7 * eps] + [eps] * 7)
  floor = -math.log(vocab) - commitment.FLOOR_MARGIN

  def rejections(tokens_tn):
    logits = np.broadcast_to(np.log(q), (*tokens_tn.shape, vocab))
    y, m, v = (np.asarray(x) for x in commitment.sampling_terms(logits, tokens_tn, temperature=1.0, floor=floor))
    plain = freedman = 0
    for t in range(len(tokens_tn)):
      reject, z, _ = commitment.sampling_test(y[t], m[t], v[t], floor=floor, z=z_star)
      freedman += reject
      plain += z < -z_star
    return plain / len(tokens_tn), freedman / len(tokens_tn)

  plain, freedman = rejections(rng.choice(vocab, size=(5_000, 4), p=q))
  assert plain > 0.02 and freedman == 0
  assert rejections(rng.integers(0, vocab, (200, 16)))[1] == 1.0


def test_positions_are_a_function_of_the_batch_and_its_policy():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, (8, 13)).astype(np.int32)
  mask = np.zeros((8, 12), np.uint8)
  mask[:, 4:9] = 1
  rows, cols = commitment.positions(tokens, mask, "a" * 64, 16)
  assert rows.shape == cols.shape == (16,) and np.all(mask[rows, cols] == 1)
  assert len(set(zip(rows.tolist(), cols.tolist()))) == 16
  again = commitment.positions(tokens.copy(), mask.copy(), "a" * 64, 16)
  assert all(np.array_equal(x, y) for x, y in zip((rows, cols), again))
  other_policy = commitment.positions(tokens, mask, "b" * 64, 16)
  tokens[7, 12] += 1  # one token changed: other positions
  other_tokens = commitment.positions(tokens, mask, "a" * 64, 16)
  for other in (other_policy, other_tokens):
    assert not all(np.array_equal(x, y) for x, y in zip((rows, cols), other))
  few = commitment.positions(tokens, mask, "a" * 64, 50)  # more than the 40 completion positions: all, then again
  assert len(set(zip(*map(np.ndarray.tolist, few)))) == 40
