"""Self-speculative greedy decoding with the first MTP module as the drafter.

Each step feeds the main model two tokens at once: `next` (its own greedy choice) and
`draft` (the MTP module's guess for the token after it). If the main model's greedy
choice after `next` equals `draft`, both are kept and the main model's choice after
`draft` comes for free; otherwise only `next` is kept and the correct token replaces the
draft. Every kept token is the main model's greedy choice given the kept prefix, so the
output equals plain greedy decoding; a rejected draft's cache entries sit past the kept
prefix, are masked out, and are overwritten by the next step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.model import Transformer


def _mtp_draft(model, hidden_btd, next_tokens_bt, cache, index):
  """The depth-1 module on (h_i, Emb(t_{i+1})): draft logits [B, T, V] and its cache."""
  positions = index + jnp.broadcast_to(jnp.arange(next_tokens_bt.shape[1]), next_tokens_bt.shape)
  logits, _, cache = model.mtp_step(1, hidden_btd, next_tokens_bt, positions, cache, index)
  return logits, cache


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill(graphdef, state, prompt_bp, max_len):
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt_bp.shape[0], max_len)
  mtp_cache = model.mtp[0].block.attn.init_cache(prompt_bp.shape[0], max_len)
  logits, cache, aux = model.forward_with_aux(prompt_bp, cache, 0)
  next_token = jnp.argmax(logits[:, -1], axis=-1)  # [B]
  shifted = jnp.concatenate([prompt_bp[:, 1:], next_token[:, None]], axis=1)  # t_{i+1} for every prompt position
  draft_logits, mtp_cache = _mtp_draft(model, aux.hidden, shifted, mtp_cache, 0)
  return next_token, jnp.argmax(draft_logits[:, -1], axis=-1), cache, mtp_cache


@functools.partial(jax.jit, static_argnums=(0,))
def _verify(graphdef, state, cache, mtp_cache, index, next_token, draft):
  """Main model on [next, draft] at `index`; returns (accepted, following, new draft, caches)."""
  model = nnx.merge(graphdef, state)
  pair = jnp.stack([next_token, draft], axis=1)  # [B, 2]
  logits, cache, aux = model.forward_with_aux(pair, cache, index)
  after_next, after_draft = jnp.argmax(logits[:, 0], -1), jnp.argmax(logits[:, 1], -1)
  accepted = after_next == draft  # [B]
  following = jnp.where(accepted, after_draft, after_next)
  # the MTP inputs at index, index + 1: (h, the kept token after it); a rejection uses only the first
  mtp_tokens = jnp.stack([jnp.where(accepted, draft, after_next), after_draft], axis=1)
  draft_logits, mtp_cache = _mtp_draft(model, aux.hidden, mtp_tokens, mtp_cache, index)
  new_draft = jnp.where(accepted, jnp.argmax(draft_logits[:, 1], -1), jnp.argmax(draft_logits[:, 0], -1))
  return accepted, following, new_draft, cache, mtp_cache


def speculative_greedy(model: Transformer, prompt_1p: jax.Array, *, max_new_tokens: int) -> tuple[jax.Array, int, int]:
  """Greedy continuation of one prompt [1, P] using the MTP drafter.

  Returns (tokens [1, P + max_new_tokens], drafts accepted, drafts proposed).
  """
  if not model.cfg.mtp_depth:
    raise ValueError("speculative decoding drafts with the MTP modules; this model has model.mtp_depth=0")
  if prompt_1p.shape[0] != 1:
    raise ValueError("speculative decoding takes one prompt at a time")
  prompt_len = prompt_1p.shape[1]
  max_len = prompt_len + max_new_tokens  # a step writes [index, index + 1], and index <= max_len - 2
  if max_len > model.cfg.max_seq_len:
    raise ValueError(
      f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len={model.cfg.max_seq_len}"
    )
  graphdef, state = nnx.split(model)
  next_token, draft, cache, mtp_cache = _prefill(graphdef, state, prompt_1p, max_len)
  out = [int(t) for t in prompt_1p[0]] + [int(next_token[0])]  # `next` is kept but not yet in the cache
  index, accepted_total, proposed = prompt_len, 0, 0
  while len(out) < max_len:
    proposed_draft = draft
    accepted, following, draft, cache, mtp_cache = _verify(
      graphdef, state, cache, mtp_cache, index, next_token, proposed_draft
    )
    proposed += 1
    if bool(accepted[0]):
      accepted_total += 1
      out += [int(proposed_draft[0]), int(following[0])]
      index += 2
    else:
      out.append(int(following[0]))
      index += 1
    next_token = following
  return jnp.asarray(out[:max_len], prompt_1p.dtype)[None], accepted_total, proposed
