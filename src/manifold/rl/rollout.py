"""Making rollouts: sample completions of task prompts, score them, pack them into a batch
(`manifold.rl.protocol` describes its arrays); and the per-token log-probs both sides compute.

Sampling goes through `manifold.inference.engine.sample` (batched, ragged prompts, per-row stop
at end-of-text, the model's own log-probs of the sampled tokens) when this checkout has it; else
through `manifold.inference.generate.generate`, one call per prompt length (rows padded to a power
of two), cut at the first end-of-text here, with the log-probs from a forward pass.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from manifold.rl.tasks import Example, Task, decode_completion

try:  # the rollout engine, where this checkout has it
  from manifold.inference import engine as _engine
except ImportError:  # pragma: no cover - depends on the checkout
  _engine = None

PAD = 0


def token_logprobs(model, tokens_bt1: jax.Array) -> jax.Array:
  """[B, S] log p(tokens[:, t+1] | tokens[:, :t+1]) under `model`, for [B, S+1] tokens."""
  logits, _ = model(tokens_bt1[:, :-1])  # [B, S, V] float32
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens_bt1[:, 1:, None], axis=-1)[..., 0]


def seed_of(*parts: Any) -> int:
  """A 63-bit seed from the parts' text (stable across processes and machines)."""
  return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


class Sampled(NamedTuple):
  tokens: np.ndarray  # [B, M] int32: the completion, then PAD past its length
  lengths: np.ndarray  # [B] int32: tokens through end-of-text (or M)
  logprobs: np.ndarray | None  # [B, M] float32: the model's own log-probs of them; None: not computed


def sample(
  model, prompts: Sequence[np.ndarray], *, max_new_tokens: int, key: jax.Array, temperature: float, eos_id: int
) -> Sampled:
  """Continues each prompt (token ids) by up to `max_new_tokens` tokens (temperature 0: greedy),
  each row stopping after `eos_id`."""
  if _engine is not None:
    out = _engine.sample(
      model,
      [list(map(int, p)) for p in prompts],
      max_new_tokens=max_new_tokens,
      key=key,
      temperature=temperature,
      eos_id=eos_id,
      pad_id=PAD,
    )
    tokens = np.asarray(jax.device_get(out.tokens), np.int32)[:, :max_new_tokens]
    logprobs = np.asarray(jax.device_get(out.model_logprobs), np.float32)[:, :max_new_tokens]
    return Sampled(tokens, np.asarray(jax.device_get(out.lengths), np.int32), logprobs)
  return _sample_with_generate(model, prompts, max_new_tokens, key, temperature, eos_id)


def _sample_with_generate(model, prompts, max_new_tokens, key, temperature, eos_id) -> Sampled:
  from manifold.inference.generate import generate

  out = np.full((len(prompts), max_new_tokens), PAD, np.int32)
  by_length: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    by_length.setdefault(len(p), []).append(i)
  for length, rows in sorted(by_length.items()):
    padded = max(1, 1 << (len(rows) - 1).bit_length())  # a few compiled batch sizes, not one per count
    batch = np.zeros((padded, length), np.int32)
    batch[: len(rows)] = np.stack([prompts[i] for i in rows])
    tokens = generate(
      model,
      jnp.asarray(batch),
      max_new_tokens=max_new_tokens,
      key=jax.random.fold_in(key, length),
      temperature=temperature,
    )
    out[rows] = np.asarray(jax.device_get(tokens))[: len(rows), length:]
  lengths = np.full(len(prompts), max_new_tokens, np.int32)
  for b in range(len(prompts)):
    ends = np.flatnonzero(out[b] == eos_id)
    if ends.size:
      lengths[b] = ends[0] + 1
      out[b, lengths[b] :] = PAD
  return Sampled(out, lengths, None)


def pack(
  prompts: Sequence[np.ndarray], sampled: Sampled, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(tokens [B, S+1], mask [B, S], behaviour log-probs [B, S] or None) of prompt + completion rows."""
  n = len(prompts)
  tokens = np.full((n, seq_len + 1), PAD, np.int32)
  mask = np.zeros((n, seq_len), np.uint8)
  logp = None if sampled.logprobs is None else np.zeros((n, seq_len), np.float32)
  for b, p in enumerate(prompts):
    k, length = len(p), int(sampled.lengths[b])
    if k + length > seq_len + 1:
      raise ValueError(f"a {k}-token prompt and {length} new tokens exceed train.seq_len + 1 = {seq_len + 1}")
    tokens[b, :k] = p
    tokens[b, k : k + length] = sampled.tokens[b, :length]
    mask[b, k - 1 : k - 1 + length] = 1
    if logp is not None:
      logp[b, k - 1 : k - 1 + length] = sampled.logprobs[b, :length]
  return tokens, mask, logp


def longest_prompt(tokenizer, examples: Sequence[Example]) -> int:
  return max((len(tokenizer.encode(e.prompt)) for e in examples), default=0)


def make_batch(
  model,
  logprobs_fn: Callable[[np.ndarray], np.ndarray],
  task: Task,
  tokenizer,
  examples: Sequence[Example],
  *,
  group_size: int,
  max_new_tokens: int,
  temperature: float,
  seq_len: int,
  format_weight: float,
  key: jax.Array,
) -> dict[str, np.ndarray]:
  """The arrays of one rollout batch: `group_size` completions of each example, scored by the
  task's verifier. `logprobs_fn(tokens [N, S+1]) -> [N, S]` gives the behaviour log-probs when the
  sampler does not."""
  prompts = [tokenizer.encode(e.prompt).astype(np.int32) for e in examples for _ in range(group_size)]
  sampled = sample(
    model, prompts, max_new_tokens=max_new_tokens, key=key, temperature=temperature, eos_id=tokenizer.eos_id
  )
  tokens, mask, behaviour = pack(prompts, sampled, seq_len)
  if behaviour is None:
    behaviour = np.where(mask.astype(bool), np.asarray(logprobs_fn(tokens), np.float32), 0.0).astype(np.float32)
  rewards, correct = [], []
  for b, example in enumerate(e for e in examples for _ in range(group_size)):
    text = decode_completion(tokenizer, sampled.tokens[b, : sampled.lengths[b]])
    rewards.append(task.reward(example, text, format_weight=format_weight))
    correct.append(task.correct(example, text))
  return {
    "tokens": tokens,
    "mask": mask,
    "behaviour_logp": behaviour,
    "rewards": np.asarray(rewards, np.float32),
    "correct": np.asarray(correct, np.uint8),
    "lengths": sampled.lengths.astype(np.int32),
    "groups": np.repeat(np.arange(len(examples), dtype=np.int32), group_size),
  }


def greedy_accuracy(model, task: Task, tokenizer, examples: Sequence[Example], *, max_new_tokens: int) -> float:
  """Share of `examples` the model answers right, decoding greedily."""
  if not examples:
    return float("nan")
  prompts = [tokenizer.encode(e.prompt).astype(np.int32) for e in examples]
  sampled = sample(
    model, prompts, max_new_tokens=max_new_tokens, key=jax.random.key(0), temperature=0.0, eos_id=tokenizer.eos_id
  )
  right = [
    task.correct(e, decode_completion(tokenizer, sampled.tokens[b, : sampled.lengths[b]]))
    for b, e in enumerate(examples)
  ]
  return float(np.mean(right))
