"""The decoding engine: batched sampling with the KV cache, for prompts of different lengths.

`sample` is the one decoder of the project (`generate`, `manifold generate` and the local
server use it). Prompts are left-padded to a common length P, so that every row's last
prompt token sits at cache slot P - 1 and each decoding step writes one slot for the whole
batch; each row has its own positions (slot minus its padding) and a key mask that hides
its padding, so a row's tokens and log-probabilities are those it gets alone (up to float
rounding in the last bits). One jitted program runs the prefill and then a
`lax.while_loop` of one token per step, which ends as soon as every row has emitted its
end-of-sequence token or its own `max_new_tokens`.

Randomness: row b draws its i-th token with `fold_in(keys[b], i)` and nothing else, so a
row sampled alone with its key gets the same tokens as in any batch. One key for the batch
stands for `jax.random.split(key, B)`.

Compiled shapes: P and the number of steps N are rounded up to a power of two (at least
`MIN_BUCKET`), so prompts and limits of many lengths share a few programs; each batch size,
sampling setting (temperature, top-k, top-p) and model has its own. End-of-sequence, pad
id, limits and keys are arguments: changing them compiles nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold.inference.sampling import filtered_logits, sample_token
from manifold.model import Transformer

MIN_BUCKET = 8


class Completions(NamedTuple):
  """What `sample` returns; N = the largest `max_new_tokens` asked for."""

  tokens: jax.Array  # [B, N] int32: row b's sampled tokens, then `pad_id` past lengths[b]
  lengths: jax.Array  # [B] int32: tokens sampled, up to and including end-of-sequence
  logprobs: jax.Array  # [B, N] float32: of each token under the distribution it was drawn from; 0 past lengths
  model_logprobs: jax.Array  # [B, N] float32: under the model's own distribution; 0 past lengths


def bucket(n: int) -> int:
  """The compiled size for `n`: the next power of two, at least MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def sample(
  model: Transformer,
  prompts: Sequence[Sequence[int]] | jax.Array | np.ndarray,
  *,
  max_new_tokens: int | Sequence[int],
  key: jax.Array,
  prompt_lengths: Sequence[int] | jax.Array | np.ndarray | None = None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
  pad_id: int = 0,
) -> Completions:
  """Continues every prompt by up to `max_new_tokens` sampled tokens, in one batch.

  prompts: lists of token ids, or an array [B, P] whose row b holds its prompt in its first
  `prompt_lengths[b]` entries (all P without `prompt_lengths`). max_new_tokens: one limit,
  or one per row. key: one key, or [B] keys (one per row; see the module doc).
  temperature 0 is greedy; `top_k == 0` and `top_p == 1` disable those filters.
  A row stops after `eos_id` (None: never) or its limit, and emits `pad_id` from there.

  `logprobs` are under the distribution sampled from: softmax(logits / temperature) after
  the top-k / top-p filters (at temperature 1 without filters, the model's own; at
  temperature 0, the model's own too). `model_logprobs` are always the model's own
  (log-softmax of the raw logits): what RL importance ratios need.
  """
  cfg = model.cfg
  tokens, lengths = _packed(prompts, prompt_lengths)
  batch = len(lengths)
  limits = _limits(max_new_tokens, batch)
  _check(cfg, tokens, lengths, limits, temperature, top_k, top_p, eos_id, pad_id)
  keys = _row_keys(key, batch)
  new = int(limits.max())
  if new == 0:
    empty = jnp.zeros((batch, 0), jnp.float32)
    return Completions(jnp.zeros((batch, 0), jnp.int32), jnp.zeros(batch, jnp.int32), empty, empty)
  width = bucket(int(lengths.max()))
  pad = width - lengths  # [B] left padding of each row
  cols = np.arange(width)[None, :] - pad[:, None]  # [B, P] index into the row's prompt, < 0 in its padding
  left = np.where(cols >= 0, np.take_along_axis(tokens, np.clip(cols, 0, None), axis=1), pad_id)
  graphdef, state = nnx.split(model)
  out = _decode(
    graphdef,
    state,
    jnp.asarray(left, jnp.int32),
    jnp.asarray(pad, jnp.int32),
    jnp.asarray(limits, jnp.int32),
    keys,
    jnp.int32(-1 if eos_id is None else eos_id),
    jnp.int32(pad_id),
    steps=bucket(new),
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
  )
  return Completions(out.tokens[:, :new], out.lengths, out.logprobs[:, :new], out.model_logprobs[:, :new])


def _packed(prompts, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, P] int64, their prompt in front; lengths [B])."""
  if isinstance(prompts, (jax.Array, np.ndarray)):
    tokens = np.asarray(prompts)
    if tokens.ndim != 2:
      raise ValueError(f"prompts: an array of shape {tokens.shape}; pass [batch, length] tokens")
    lengths = np.full(tokens.shape[0], tokens.shape[1]) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != tokens.shape[:1] or (lengths > tokens.shape[1]).any():
      raise ValueError(
        f"prompt_lengths {lengths.tolist()}: one per row of the {tokens.shape} prompts, each <= their width"
      )
    return tokens.astype(np.int64), lengths.astype(np.int64)
  if prompt_lengths is not None:
    raise ValueError("prompt_lengths goes with an array of prompts; lists carry their own lengths")
  lengths = np.array([len(p) for p in prompts], np.int64)
  tokens = np.zeros((len(lengths), max(lengths, default=0)), np.int64)
  for row, p in zip(tokens, prompts, strict=True):  # host-side packing; decoding is batched
    row[: len(p)] = p
  return tokens, lengths


def _limits(max_new_tokens, batch: int) -> np.ndarray:
  limits = np.asarray(max_new_tokens, np.int64)
  if limits.ndim == 0:
    limits = np.full(batch, limits)
  if limits.shape != (batch,):
    raise ValueError(f"max_new_tokens: {limits.shape[0]} limits for {batch} prompts; pass one, or one per prompt")
  return limits


def _check(cfg, tokens, lengths, limits, temperature, top_k, top_p, eos_id, pad_id) -> None:
  if not len(lengths):
    raise ValueError("no prompts; pass at least one")
  vocab = f"an id in [0, model.vocab_size={cfg.vocab_size})"
  for name, value, ok, wanted in [
    ("temperature", temperature, temperature >= 0, ">= 0"),
    ("top_k", top_k, top_k >= 0, ">= 0"),
    ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
    ("max_new_tokens", int(limits.min()), limits.min() >= 0, ">= 0"),
    ("pad_id", pad_id, 0 <= pad_id < cfg.vocab_size, vocab),
    ("eos_id", eos_id, eos_id is None or 0 <= eos_id < cfg.vocab_size, vocab),
  ]:
    if not ok:
      raise ValueError(f"{name}={value}: must be {wanted}")
  if (lengths == 0).any():
    raise ValueError(f"prompt {np.argmax(lengths == 0)} is empty; generation continues at least one token")
  too_long = lengths + limits > cfg.max_seq_len
  if too_long.any():
    b = np.argmax(too_long)
    raise ValueError(
      f"prompt {b} ({lengths[b]} tokens) + max_new_tokens ({limits[b]}) exceeds model.max_seq_len={cfg.max_seq_len}; "
      "shorten the prompt or ask for fewer tokens"
    )
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  bad = valid & ((tokens < 0) | (tokens >= cfg.vocab_size))
  if bad.any():
    b, i = np.argwhere(bad)[0]
    raise ValueError(f"prompt {b} token {i} is {tokens[b, i]}: outside [0, model.vocab_size={cfg.vocab_size})")


def _row_keys(key, batch: int) -> jax.Array:
  """[B] typed keys: `key` itself if it holds one per row, else `jax.random.split(key, B)`."""
  key = jnp.asarray(key)
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 key (or keys)
  if key.ndim == 0:
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f"key: {key.shape[0]} keys for {batch} prompts; pass one key, or one per prompt")
  return key


class _Loop(NamedTuple):
  step: jax.Array  # [] the next token's index
  last: jax.Array  # [B] the token just emitted (fed to the model next)
  cache: list
  done: jax.Array  # [B] the row has emitted end-of-sequence or its limit
  out: Completions


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("steps", "temperature", "top_k", "top_p"))
def _decode(graphdef, state, prompt_bp, pad_b, limit_b, keys_b, eos_id, pad_id, *, steps, temperature, top_k, top_p):
  """Prefill of the left-padded prompts [B, P], then up to `steps` tokens per row."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_bp.shape
  cache_len = prompt_len + steps - 1  # the last token sampled is never fed back
  kv_mask = jnp.arange(cache_len)[None, :] >= pad_b[:, None]  # [B, S]: every slot but the row's padding
  positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad_b[:, None], 0)  # [B, P]
  cache = model.init_cache(batch, cache_len)
  logits, cache = model(prompt_bp, cache, 0, positions_bt=positions, kv_mask=kv_mask)  # [B, P, V]

  def emit(loop: _Loop, logits_bv) -> _Loop:
    """Samples token `loop.step` of every row still going and records it."""
    i = loop.step
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, i)
    token = sample_token(logits_bv, step_keys, temperature=temperature, top_k=top_k, top_p=top_p).astype(jnp.int32)
    model_lp = _logprob(jax.nn.log_softmax(logits_bv), token)
    policy = filtered_logits(logits_bv, temperature=temperature, top_k=top_k, top_p=top_p) if temperature else None
    policy_lp = model_lp if policy is None else _logprob(jax.nn.log_softmax(policy), token)
    live = ~loop.done
    token = jnp.where(live, token, pad_id)
    out = loop.out
    out = Completions(
      tokens=out.tokens.at[:, i].set(token),
      lengths=out.lengths + live,
      logprobs=out.logprobs.at[:, i].set(jnp.where(live, policy_lp, 0.0)),
      model_logprobs=out.model_logprobs.at[:, i].set(jnp.where(live, model_lp, 0.0)),
    )
    done = loop.done | (token == eos_id) | (i + 1 >= limit_b)
    return _Loop(i + 1, token, loop.cache, done, out)

  zeros = jnp.zeros((batch, steps), jnp.float32)
  empty = Completions(jnp.full((batch, steps), pad_id, jnp.int32), jnp.zeros(batch, jnp.int32), zeros, zeros)
  start = _Loop(jnp.int32(0), jnp.zeros(batch, jnp.int32), cache, limit_b <= 0, empty)
  loop = emit(start, logits[:, -1])

  def running(loop: _Loop):
    return (loop.step < steps) & ~jnp.all(loop.done)

  def step(loop: _Loop) -> _Loop:
    slot = prompt_len + loop.step - 1  # where the token just emitted goes
    positions = (slot - pad_b)[:, None]  # [B, 1]
    logits, cache = model(loop.last[:, None], loop.cache, slot, positions_bt=positions, kv_mask=kv_mask)
    return emit(loop._replace(cache=cache), logits[:, 0])

  return jax.lax.while_loop(running, step, loop).out


def _logprob(logprobs_bv, token_b):
  return jnp.take_along_axis(logprobs_bv, token_b[:, None], axis=-1)[:, 0]
