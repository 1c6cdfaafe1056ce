"""Making rollouts: sample completions of task prompts, score them, pack them into a batch
(`manifold.rl.protocol` describes its arrays); and the per-token log-probs the learner computes.

Sampling is `manifold.inference.engine.sample`: one batch of ragged prompts, each row stopping at
end-of-text, with the model's own log-probs of the sampled tokens (the behaviour log-probs).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from manifold.inference import engine
from manifold.rl.tasks import Example, Task, decode_completion

PAD = 0


def token_logprobs(model, tokens_bt1: jax.Array) -> jax.Array:
  """[B, S] log p(tokens[:, t+1] | tokens[:, :t+1]) under `model`, for [B, S+1] tokens."""
  logits, _ = model(tokens_bt1[:, :-1])  # [B, S, V] float32
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, tokens_bt1[:, 1:, None], axis=-1)[..., 0]


def seed_of(*parts: Any) -> int:
  """A 63-bit seed from the parts' text (stable across processes and machines)."""
  return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def prompt_ids(tokenizer, text: str) -> np.ndarray:
  """[1 + n] int32: the end-of-text id, then `text`'s ids. The data loader ends every training
  document with end-of-text, so a document (a warm-up example, a task prompt) always follows it."""
  return np.concatenate([np.asarray([tokenizer.eos_id], np.int32), tokenizer.encode(text).astype(np.int32)])


class Sampled(NamedTuple):
  tokens: np.ndarray  # [B, M] int32: the completion, then PAD past its length
  lengths: np.ndarray  # [B] int32: tokens through end-of-text (or M)
  logprobs: np.ndarray  # [B, M] float32: the model's own log-probs of them (0 past the length)


def sample(
  model, prompts: Sequence[np.ndarray], *, max_new_tokens: int, key: jax.Array, temperature: float, eos_id: int
) -> Sampled:
  """Continues each prompt (token ids) by up to `max_new_tokens` tokens (temperature 0: greedy),
  each row stopping after `eos_id`; row b draws with its own key, split from `key`."""
  out = engine.sample(
    model,
    [list(map(int, p)) for p in prompts],
    max_new_tokens=max_new_tokens,
    key=key,
    temperature=temperature,
    eos_id=eos_id,
    pad_id=PAD,
  )
  tokens, lengths, logprobs = jax.device_get((out.tokens, out.lengths, out.model_logprobs))
  return Sampled(np.asarray(tokens, np.int32), np.asarray(lengths, np.int32), np.asarray(logprobs, np.float32))


def pack(prompts: Sequence[np.ndarray], sampled: Sampled, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens [B, S+1], mask [B, S], behaviour log-probs [B, S]) of prompt + completion rows."""
  n = len(prompts)
  tokens = np.full((n, seq_len + 1), PAD, np.int32)
  mask = np.zeros((n, seq_len), np.uint8)
  logp = np.zeros((n, seq_len), np.float32)
  for b, p in enumerate(prompts):
    k, length = len(p), int(sampled.lengths[b])
    if k + length > seq_len + 1:
      raise ValueError(f"a {k}-token prompt and {length} new tokens exceed train.seq_len + 1 = {seq_len + 1}")
    tokens[b, :k] = p
    tokens[b, k : k + length] = sampled.tokens[b, :length]
    mask[b, k - 1 : k - 1 + length] = 1
    logp[b, k - 1 : k - 1 + length] = sampled.logprobs[b, :length]
  return tokens, mask, logp


def documents(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> tuple[list[str], list[str]]:
  """(prompts, rollouts) of `pack`ed rows [B, S+1] / [B, S], as the learner trains on them: each
  row's prompt text, and its prompt + completion text (cut at end-of-text)."""
  prompts, rollouts = [], []
  for row, on in zip(tokens, mask.astype(bool)):
    at = np.flatnonzero(on)  # targets: the completion's tokens are row[at + 1]
    prompt = tokenizer.decode(row[1 : at[0] + 1]) if at.size else ""  # after the leading end-of-text
    prompts.append(prompt)
    rollouts.append(prompt + decode_completion(tokenizer, row[at + 1]))
  return prompts, rollouts


def make_batch(
  model,
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
  task's verifier."""
  prompts = [prompt_ids(tokenizer, e.prompt) for e in examples for _ in range(group_size)]
  sampled = sample(
    model, prompts, max_new_tokens=max_new_tokens, key=key, temperature=temperature, eos_id=tokenizer.eos_id
  )
  tokens, mask, behaviour = pack(prompts, sampled, seq_len)
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
  prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
  sampled = sample(
    model, prompts, max_new_tokens=max_new_tokens, key=jax.random.key(0), temperature=0.0, eos_id=tokenizer.eos_id
  )
  right = [
    task.correct(e, decode_completion(tokenizer, sampled.tokens[b, : sampled.lengths[b]]))
    for b, e in enumerate(examples)
  ]
  return float(np.mean(right))
