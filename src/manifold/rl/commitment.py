"""Checking untrusted rollout workers: what a worker commits to with each batch, and how a verifier
(the learner, or anyone holding the policy) judges the batch.

A worker's batch (`manifold.rl.protocol`, N rows of S positions) carries, besides its tokens:

  positions   `positions(tokens, mask, parent, K)`: K = rl.commit_positions (row, col) pairs where
              mask == 1, drawn from a sha256 counter stream seeded with sha256 over the parent
              policy object's content hash, the tokens and the mask. They are fixed only once the
              whole batch is: changing any token redraws them.
  commitment  `commit`: under the policy it sampled with, at each position the top-k token ids
              (k = rl.commit_top_k) and their log-probs, log_softmax(logits) at temperature 1 (the
              model's own distribution, like behaviour_logp and the learner's log-probs; the
              sampling temperature rl.temperature enters only the sampling test). One forward pass
              over the rows involved, padded to min(K, N) rows (one compiled shape).

`Verifier.judge` checks, in this order, each failure a rejection reason:

  duplicate       the batch's rows, as a multiset (`fingerprint`), are those of a batch accepted
                  before: a copied, re-signed or replayed batch
  prompts         its prompts are not the ones its (worker, version, seq) draws (`seed_of`), or a row
                  is not laid out as the engine lays one out: prompt, completion through end-of-text
                  (or rl.max_new_tokens of them), then padding
  rewards         a reward or `correct` is not the task verifier's on the row's text
  positions       commit_rows / commit_cols are not the derived positions
  then, for a share rl.verify_fraction of the batches (picked with the verifier's secret salt), one
  forward pass under the claimed version's parameters over R = min(2K, N) rows: the rows of the
  positions and as many more picked with the salt, so a worker cannot know which rows besides the
  committed ones are checked (and cannot pass by doing honest work on those alone):
  commitment      committed ids repeat, are not a top-k of the recomputation, or
                  max |committed log-p - recomputed log-p of the same ids| > the commitment tolerance
  behaviour_logp  max |behaviour_logp - recomputed| over the completion tokens of the R rows > the behaviour tolerance
  sampling        the completion tokens of the R rows are too unlikely under q = softmax(logits / T),
                  T = rl.temperature (T > 0 always: the config refuses greedy workers)

The sampling test. Per completion position i, y_i = max(log q_i(x_i), c) with the floor
c = -log V - FLOOR_MARGIN (V the vocabulary), whose mean m_i and variance v_i under q_i are exact.
Under honest sampling S = sum_i (y_i - m_i) is a sum of martingale differences >= -b, b = max_i(m_i - c),
with predictable variance s^2 = sum_i v_i; Freedman's inequality bounds P(S <= -t) by
exp(-t^2 / (2 (s^2 + b t / 3))) = exp(-z*^2 / 2) for t = L b / 3 + sqrt((L b / 3)^2 + 2 L s^2),
L = z*^2 / 2, z* = rl.sampling_z. The batch is rejected when S < -t; `z` = S / s is reported, with
the limit -t / s. For many diffuse positions the limit is -z* (a plain z-test); for few or
near-certain ones, where one honest rare token would sink a plain z-test, it widens. The floor bounds
each term and costs little power: a token below e^-FLOOR_MARGIN / V is as damning as one at it.

Tolerances: rl.commit_tolerance and rl.behaviour_tolerance, or (0) the defaults for model.dtype:
`TOLERANCE_MULTIPLE` x the largest disagreement benchmarks/commitment_tolerance.py measured (rounded up
to one significant digit) between a worker's numbers and a recomputation over other rows, on CPU and
on an H200 (whose float32 matmuls, at JAX's default precision, are far coarser than float32), for
grpo.py's default and tiny models with peaked distributions. Commitments (two full forward passes of
other batch shapes) agree far more closely than behaviour log-probs (the engine's cached decoding
against a full forward), hence two numbers. Larger models: measure (`--variant`) and set them.

Costs. Worker: one forward over min(K, N) rows per batch (of the N rows it generated). Verifier:
sha256 of the batch and O(N S) host checks on every batch; on a verified one, a forward over min(2K, N)
rows (its logits [R, S, V] float32 and a few arrays like them on the device) under the claimed
version. The learner keeps host copies of the versions it may still be sent ((rl.max_staleness + 1)
x the parameters' bytes), one device copy of an older one, and a 32-hex-digit fingerprint per
accepted batch (rebuilt from its ledger on restart).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold.rl.protocol import RolloutShape
from manifold.rl.rollout import PAD, prompt_ids, seed_of
from manifold.rl.tasks import decode_completion
from manifold.store import StoredObject

DOMAIN = b"manifold/rl/commitment/v1\0"
FLOOR_MARGIN = 4.0  # the sampling test's floor: c = -log V - FLOOR_MARGIN
TOLERANCE_MULTIPLE = 4  # the default tolerances: this x the largest disagreement measured, rounded up
# max |delta log-p| per model.dtype; measured maxima (H200, grpo.py:default): commitments 0.028 (float32) and
# 0.23 (bfloat16), behaviour log-probs 0.33 and 1.8 (on CPU, float32: 0 and 2e-4; with float32 matmuls at
# JAX's "highest" precision the H200 gives 1.4e-4 and 3.1e-4)
COMMIT_TOLERANCE = {"float32": 0.2, "bfloat16": 1.0}
BEHAVIOUR_TOLERANCE = {"float32": 2.0, "bfloat16": 8.0}
REASONS = ("duplicate", "prompts", "rewards", "positions", "commitment", "behaviour_logp", "sampling")


# ----------------------------------------------------------------------------------------
# Positions


def batch_seed(tokens: np.ndarray, mask: np.ndarray, parent: str) -> bytes:
  """sha256 over the parent policy's content hash, the tokens [N, S+1] and the mask [N, S]."""
  h = hashlib.sha256(DOMAIN)
  h.update(parent.encode() + b"\0" + f"{tokens.shape}".encode())
  h.update(np.ascontiguousarray(tokens, "<i4").tobytes())
  h.update(np.ascontiguousarray(mask, np.uint8).tobytes())
  return h.digest()


def _draw(seed: bytes, n: int, count: int) -> list[int]:
  """`count` indices in [0, n): the first min(count, n) distinct ones of the stream
  sha256(seed || j) mod n (j = 0, 1, ...), then those again in order (only when count > n)."""
  if n <= 0:
    return []
  chosen: list[int] = []
  seen: set[int] = set()
  j = 0
  while len(chosen) < min(count, n):
    value = int.from_bytes(hashlib.sha256(seed + j.to_bytes(8, "little")).digest()[:8], "little") % n
    j += 1
    if value not in seen:
      seen.add(value)
      chosen.append(value)
  return chosen + [chosen[i % n] for i in range(count - len(chosen))]


def positions(tokens: np.ndarray, mask: np.ndarray, parent: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows, cols), int32 [count] each, sorted: the completion positions (mask == 1) a batch commits to."""
  flat = np.flatnonzero(np.asarray(mask).reshape(-1))
  picked = np.sort(flat[_draw(batch_seed(tokens, mask, parent), len(flat), count)])
  rows, cols = np.divmod(picked, mask.shape[1])
  return rows.astype(np.int32), cols.astype(np.int32)


def fingerprint(tokens: np.ndarray) -> str:
  """The batch's rows as a multiset: sha256 over their sorted sha256s (first 32 hex digits)."""
  rows = sorted(hashlib.sha256(np.ascontiguousarray(r, "<i4").tobytes()).digest() for r in tokens)
  return hashlib.sha256(b"".join(rows)).hexdigest()[:32]


# ----------------------------------------------------------------------------------------
# Forward passes (a policy is (graphdef, params, extra): nnx.merge's arguments)


def _logits(graphdef, params, extra, tokens_rs1):
  logits, _ = nnx.merge(graphdef, params, extra)(tokens_rs1[:, :-1])
  return logits.astype(jnp.float32)  # [R, S, V]


@functools.partial(jax.jit, static_argnums=0, static_argnames="k")
def _top_k(graphdef, params, extra, tokens_rs1, at_r, at_c, *, k):
  """(log-probs, ids) [K, k] of the k likeliest tokens at (at_r, at_c) of the rows [R, S+1]."""
  logp = jax.nn.log_softmax(_logits(graphdef, params, extra, tokens_rs1)[at_r, at_c])
  return jax.lax.top_k(logp, k)


def sampling_terms(logits, nxt, *, temperature: float, floor: float):
  """(y, m, v), each [...]: the sampling test's terms for tokens `nxt` [...] drawn from
  softmax(logits [..., V] / temperature): y = max(log q(nxt), floor), and y's mean and variance under q."""
  logq = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature)
  floored = jnp.maximum(logq, floor)
  q = jnp.exp(logq)
  mean = jnp.sum(q * floored, axis=-1)
  var = jnp.sum(q * jnp.square(floored - mean[..., None]), axis=-1)
  return jnp.take_along_axis(floored, jnp.asarray(nxt)[..., None], axis=-1)[..., 0], mean, var


def sampling_test(y, m, v, *, floor: float, z: float) -> tuple[bool, float, float]:
  """(reject, z = S / s, the limit -t / s) for the terms of the tokens tested (module docstring)."""
  y, m, v = (np.asarray(x, np.float64) for x in (y, m, v))
  s, s2, b = float(np.sum(y - m)), float(np.sum(v)), float(np.max(m - floor, initial=0.0))
  third = z * z / 2 * b / 3
  t = third + math.sqrt(third * third + z * z * s2)
  sd = math.sqrt(s2)
  return s < -t, (s / sd if sd else 0.0), (-t / sd if sd else -math.inf)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("temperature", "floor"))
def _recompute(graphdef, params, extra, tokens_rs1, at_r, at_c, ids_kk, *, temperature, floor):
  """What a verifier needs from one forward over the rows [R, S+1]: log-probs (temperature 1) of each
  next token [R, S], of the committed ids [K, k], the k-th largest at each position [K]; and the
  sampling test's terms y, m, v [R, S]."""
  logits = _logits(graphdef, params, extra, tokens_rs1)
  logp = jax.nn.log_softmax(logits)
  nxt = tokens_rs1[:, 1:]
  token_logp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
  at = logp[at_r, at_c]  # [K, V]
  committed = jnp.take_along_axis(at, ids_kk, axis=-1)
  kth = jax.lax.top_k(at, ids_kk.shape[1])[0][:, -1]
  return token_logp, committed, kth, *sampling_terms(logits, nxt, temperature=temperature, floor=floor)


def _row_index(rows: np.ndarray, order: list[int]) -> np.ndarray:
  where = {r: i for i, r in enumerate(order)}
  return np.asarray([where[int(r)] for r in rows], np.int32)


def commit(policy, arrays: dict[str, np.ndarray], parent: str, *, count: int, top_k: int) -> dict[str, np.ndarray]:
  """The worker's commitment arrays (commit_rows, commit_cols [K] int32, commit_ids [K, k] int32,
  commit_logp [K, k] float32) for a batch's arrays under `policy` = (graphdef, params, extra), the
  policy whose object hash is `parent`."""
  tokens, mask = arrays["tokens"], arrays["mask"]
  rows, cols = positions(tokens, mask, parent, count)
  order = sorted(set(rows.tolist()))
  padded = order + order[:1] * (min(count, len(tokens)) - len(order))
  logp, ids = _top_k(*policy, tokens[padded], _row_index(rows, order), cols, k=top_k)
  return {
    "commit_rows": rows,
    "commit_cols": cols,
    "commit_ids": np.asarray(ids, np.int32),
    "commit_logp": np.asarray(logp, np.float32),
  }


# ----------------------------------------------------------------------------------------
# Generation work


@functools.cache
def _forward_flops(model_cfg) -> tuple[float, float]:
  """(a, b): forward FLOPs of a token attending to n positions on average are a + b n
  (`manifold.model.accounting`, training FLOPs / 3, without the MTP modules generation never runs)."""
  from manifold.model.accounting import training_flops_per_token

  cfg = dataclasses.replace(model_cfg, mtp_depth=0)
  one, three = (training_flops_per_token(cfg, n) / 3 for n in (1, 3))  # averages over (n + 1) / 2 positions
  return 2 * one - three, three - one


def generation_flops(model_cfg, mask: np.ndarray, lengths: np.ndarray) -> float:
  """Forward FLOPs of generating a batch: each row runs its k prompt tokens and all but the last of
  its completion through the model, n = k + length - 1 positions attending causally to (n + 1) / 2."""
  a, b = _forward_flops(model_cfg)
  n = (np.argmax(mask, axis=1) + 1 + lengths - 1).astype(np.float64)
  return float(np.sum(n * (a + b * (n + 1) / 2)))


# ----------------------------------------------------------------------------------------
# The verifier


def tolerances(c) -> tuple[float, float]:
  """(commitment, behaviour) tolerances: rl.commit_tolerance, rl.behaviour_tolerance, or the defaults
  for model.dtype."""
  dtype = c.model.dtype
  return c.rl.commit_tolerance or COMMIT_TOLERANCE[dtype], c.rl.behaviour_tolerance or BEHAVIOUR_TOLERANCE[dtype]


@dataclasses.dataclass
class Verdict:
  reason: str  # "" when accepted; one of REASONS, or "unverifiable" (the claimed version's parameters are gone)
  message: str  # one line
  fingerprint: str
  detail: dict[str, Any]

  @property
  def ok(self) -> bool:
    return not self.reason


def _round(x: float) -> float:
  return float(f"{x:.6g}")


class Verifier:
  """Judges rollout batches that passed `check_rollout`, as the module docstring says.

  c: the validated config. graphdef: the model's (`nnx.split(model, nnx.Param, ...)`). task,
  tokenizer: the run's. secret: the salt that picks the verified batches and the extra rows (drawn
  here, never published, unless given). seen: fingerprints of batches accepted before."""

  def __init__(self, c, graphdef, *, task, tokenizer, secret: bytes | None = None, seen=()):
    self.c, self.rl, self.graphdef, self.task, self.tokenizer = c, c.rl, graphdef, task, tokenizer
    self.shape = RolloutShape.of(c)
    self.commit_tolerance, self.behaviour_tolerance = tolerances(c)
    self.secret = os.urandom(32) if secret is None else secret
    self.seen: set[str] = set(seen)
    self.floor = -math.log(c.model.vocab_size) - FLOOR_MARGIN

  def selected(self, content_hash: str) -> bool:
    """Whether a batch is recomputed: sha256(secret, its hash) read as a number in [0, 1) < rl.verify_fraction."""
    u = int.from_bytes(hashlib.sha256(self.secret + b"select" + content_hash.encode()).digest()[:8], "little")
    return u / 2**64 < self.rl.verify_fraction

  def judge(self, obj: StoredObject, *, version: int, worker: int, seq: int, policy: Callable[[], Any]) -> Verdict:
    """The verdict on `obj`, stored as rollouts/<version>/<worker>/<seq> with the policy object's hash
    as its only parent; `policy()` gives (params, extra) of that version, or None if they are gone."""
    a = obj.arrays
    fp = fingerprint(a["tokens"])
    detail: dict[str, Any] = {"fingerprint": fp, "verified": False}

    def verdict(reason: str = "", message: str = "") -> Verdict:
      return Verdict(reason, " ".join(message.split()), fp, detail)

    if fp in self.seen:
      return verdict("duplicate", "its rows are those of a batch accepted before")
    wrong = self._layout(a, version, worker, seq)
    if wrong:
      return verdict(*wrong)
    parent = obj.parents[0] if len(obj.parents) == 1 else ""
    rows, cols = positions(a["tokens"], a["mask"], parent, self.shape.commit_positions)
    if np.any(rows != a["commit_rows"]) or np.any(cols != a["commit_cols"]):
      return verdict("positions", "commit_rows / commit_cols are not the positions its hash derives")
    if not self.selected(obj.content_hash):
      return verdict()
    params = policy()
    if params is None:
      return verdict("unverifiable", f"policy version {version}'s parameters are gone")
    return self._recomputed(a, parent, rows, cols, params, detail, verdict)

  def _layout(self, a, version: int, worker: int, seq: int) -> tuple[str, str] | None:
    """("prompts" | "rewards", why) for a batch whose rows are not its prompts' completions or whose
    rewards are not the verifier's; None if they are."""
    shape, rl, tokenizer = self.shape, self.rl, self.tokenizer
    examples = self.task.prompts("train", seed_of(self.c.train.seed, worker, version, seq), shape.prompts)
    tokens, mask, lengths = a["tokens"], a["mask"], a["lengths"]
    for b in range(shape.rows):
      example = examples[b // shape.group]
      p = prompt_ids(tokenizer, example.prompt)
      k, n = len(p), int(lengths[b])
      completion = tokens[b, k : k + n]
      want = np.zeros(shape.seq_len, np.uint8)
      want[k - 1 : k - 1 + n] = 1
      if k + n > shape.seq_len + 1 or np.any(tokens[b, :k] != p):
        return "prompts", f"row {b} does not start with the prompt {example.prompt!r} its seq draws"
      if np.any(mask[b] != want) or np.any(tokens[b, k + n :] != PAD):
        return "prompts", f"row {b}'s mask or padding is not laid out after its prompt and {n} completion tokens"
      ended = completion[-1] == tokenizer.eos_id
      if np.any(completion[:-1] == tokenizer.eos_id) or not (ended or n == shape.max_new_tokens):
        return "prompts", f"row {b}'s completion does not end at its first end-of-text or rl.max_new_tokens"
      text = decode_completion(tokenizer, completion)
      reward = np.float32(self.task.reward(example, text, format_weight=rl.format_weight))
      if a["rewards"][b] != reward or a["correct"][b] != self.task.correct(example, text):
        return "rewards", f"row {b}'s reward {a['rewards'][b]} / correct {a['correct'][b]} are not the task's"
    return None

  def _recomputed(self, a, parent, rows, cols, params, detail, verdict) -> Verdict:
    shape, tol, btol = self.shape, self.commit_tolerance, self.behaviour_tolerance
    n_rows, width = shape.rows, min(2 * shape.commit_positions, shape.rows)
    public = sorted(set(rows.tolist()))
    rest = sorted(set(range(n_rows)) - set(public))
    salt = hashlib.sha256(self.secret + b"rows" + batch_seed(a["tokens"], a["mask"], parent)).digest()
    order = public + [rest[i] for i in _draw(salt, len(rest), width - len(public))]
    ids = a["commit_ids"]
    out = _recompute(self.graphdef, *params, a["tokens"][order], _row_index(rows, order), cols, ids,
                     temperature=float(self.rl.temperature), floor=float(self.floor))  # fmt: skip
    token_logp, committed, kth, y, mean, var = (np.asarray(x, np.float64) for x in out)
    on = a["mask"][order].astype(bool)
    commit_diff = float(np.max(np.abs(committed - a["commit_logp"])))
    behaviour_diff = float(np.max(np.abs(token_logp - a["behaviour_logp"][order])[on]))
    unlikely, z, limit = sampling_test(y[on], mean[on], var[on], floor=self.floor, z=self.rl.sampling_z)
    detail.update(verified=True, rows_checked=len(order), max_abs_diff=_round(commit_diff),
                  behaviour_diff=_round(behaviour_diff), z=_round(z), z_limit=_round(max(limit, -1e9)))  # fmt: skip
    repeated = any(len(set(r)) < len(r) for r in ids.tolist())
    if repeated or np.any(committed.min(axis=1) < kth - tol):
      return verdict("commitment", "the committed ids repeat or are not the policy's top-k")
    if commit_diff > tol:
      return verdict("commitment", f"committed log-probs differ from the recomputation by {commit_diff:.3g} > {tol}")
    if behaviour_diff > btol:
      return verdict(
        "behaviour_logp", f"behaviour log-probs differ from the recomputation by {behaviour_diff:.3g} > {btol}"
      )
    if unlikely:
      return verdict(
        "sampling", f"tokens too unlikely under the policy: z = {z:.2f} < {limit:.2f} over {on.sum()} tokens"
      )
    return verdict()
