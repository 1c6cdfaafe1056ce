"""Continuous batching: requests decode together in a fixed set of rows ("slots") of one KV cache,
joining and leaving between steps.

`SlotDecoder(model, slots)` holds a cache of `slots` rows x `model.max_seq_len` positions.
`admit(row, prompt, ...)` prefills a prompt alone (right-padded to a power-of-two bucket, batch 1),
writes its cache into row `row` and draws the first token; `step(...)` then feeds every row's last
token at the row's own slot (`cache_index` per row: rows of different lengths decode together) and
draws each row's next token with its own key, temperature and top-p. Rows nobody uses still run
(the step's shape is fixed), rewriting one slot of their own row, which the next prefill there replaces.

A row's token i is drawn with `fold_in(key, i)` from the same distribution as `engine.sample`
draws it, and every step has the same shape whatever else is decoding, so a request gets the same
tokens alone or among others. Compiled programs: one step, and one prefill per prompt bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from manifold.inference.engine import bucket
from manifold.inference.sampling import sample_rows
from manifold.model import Transformer


class Draw(NamedTuple):
  """One drawn token per row, with the model's own log-probabilities (log-softmax of its logits)."""

  tokens: jax.Array  # [B] int32
  logprobs: jax.Array  # [B] float32: of the drawn token
  top_ids: jax.Array  # [B, K] int32: the K likeliest tokens
  top_logprobs: jax.Array  # [B, K] float32


class Prefilled(NamedTuple):
  """What admitting a prompt gives: its first drawn token, and the log-probabilities of the tokens
  of its bucket of P >= its length (position 0 has none: 0 and the top list of nothing)."""

  first: Draw  # [1]
  prompt_logprobs: jax.Array  # [P] float32: log p(prompt[t] | prompt[:t]), 0 at t = 0
  prompt_top_ids: jax.Array  # [P, K] int32: the K likeliest tokens at t (given prompt[:t])
  prompt_top_logprobs: jax.Array  # [P, K] float32


class SlotDecoder:
  """The cache and compiled programs of `slots` concurrently decoding requests."""

  def __init__(self, model: Transformer, slots: int, *, top_logprobs: int = 5):
    if slots < 1:
      raise ValueError(f"slots={slots}: must be >= 1")
    self.graphdef, self.state = nnx.split(model)
    self.slots, self.max_len = slots, model.cfg.max_seq_len
    self.vocab_size = model.cfg.vocab_size
    self.top_logprobs = min(top_logprobs, self.vocab_size)
    self.cache = jax.jit(model.init_cache, static_argnums=(0, 1))(slots, self.max_len)  # its own buffers: donated

  def admit(self, row: int, prompt: Sequence[int], *, key: jax.Array, temperature: float, top_p: float) -> Prefilled:
    """Prefills `prompt` (1 <= length < max_len) into row `row` and draws its token 0 with `key`;
    the prompt's log-probs are those of its bucket, the first `len(prompt)` of them the prompt's."""
    length = len(prompt)
    if not 0 <= row < self.slots or not 0 < length < self.max_len:
      raise ValueError(f"row {row} of {self.slots}, a {length}-token prompt for a {self.max_len}-token cache")
    width = min(bucket(length), self.max_len)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :length] = prompt
    self.cache, out = _prefill(
      self.graphdef, self.state, self.cache, np.int32(row), tokens, np.int32(length), key,
      np.float32(temperature), np.float32(top_p), k=self.top_logprobs,
    )  # fmt: skip
    return out

  def step(self, rows: np.ndarray, sampling: np.ndarray, keys: jax.Array) -> Draw:
    """Feeds each row's last token at its position and draws its next token: `rows` [3, B] int32
    holds each row's last token, its position (the row's tokens so far - 1) and the index of the
    token to draw; `sampling` [2, B] float32 its temperature and top-p; `keys` [B] its key."""
    self.cache, draw = _step(self.graphdef, self.state, self.cache, rows, sampling, keys, k=self.top_logprobs)
    return draw


def _draw(logits_bv, keys_b, index_b, temperature_b, top_p_b, k: int) -> Draw:
  step_keys = jax.vmap(jax.random.fold_in)(keys_b, index_b)
  token = sample_rows(logits_bv, step_keys, temperature_b=temperature_b, top_p_b=top_p_b).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32))
  top_logp, top_ids = jax.lax.top_k(logp, k)
  return Draw(token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_logp)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("k",), donate_argnums=(2,))
def _prefill(graphdef, state, cache, row, tokens_1p, length, key, temperature, top_p, *, k):
  model = nnx.merge(graphdef, state)
  width = tokens_1p.shape[1]
  logits, small = model(tokens_1p, model.init_cache(1, width), 0)  # [1, P, V]; right padding is never attended

  def put(big, part):
    return jax.lax.dynamic_update_slice(big, part.astype(big.dtype), (row,) + (0,) * (big.ndim - 1))

  cache = jax.tree.map(put, cache, small)
  last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)  # [1, V]
  first = _draw(last, key[None], jnp.zeros(1, jnp.int32), temperature[None], top_p[None], k)
  logp = jax.nn.log_softmax(logits[0])  # [P, V]: row t predicts token t + 1
  said = jnp.take_along_axis(logp[:-1], tokens_1p[0, 1:, None], axis=-1)[:, 0]
  top_logp, top_ids = jax.lax.top_k(logp[:-1], k)
  pad = lambda a: jnp.concatenate([jnp.zeros((1, *a.shape[1:]), a.dtype), a])  # noqa: E731
  return cache, Prefilled(first, pad(said), pad(top_ids.astype(jnp.int32)), pad(top_logp))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("k",), donate_argnums=(2,))
def _step(graphdef, state, cache, rows_3b, sampling_2b, keys_b, *, k):
  model = nnx.merge(graphdef, state)
  last_b, positions_b, index_b = rows_3b
  logits, cache = model(last_b[:, None], cache, positions_b)  # [B, 1, V]: each row at its own slot
  return cache, _draw(logits[:, 0], keys_b, index_b, sampling_2b[0], sampling_2b[1], k)
