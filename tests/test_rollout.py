"""The decoding engine: ragged batches, per-row stops, and the log-probabilities it reports."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from manifold.inference import engine
from manifold.inference.engine import sample
from manifold.inference.sampling import filtered_logits
from manifold.model import ModelConfig, Transformer

GQA = ModelConfig(
  vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64, init_std=0.1,
)  # fmt: skip
MLA_MOE_MHC = dataclasses.replace(
  GQA, attention="mla", q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
  ffn="moe", n_routed_experts=4, experts_per_token=2, moe_d_ff=16, first_k_dense_replace=1,
  residual="mhc", streams=2, mtp_depth=1,
)  # fmt: skip
PROMPTS = [[5, 17, 3], [9, 1, 40, 22, 8, 30, 2, 11], [13], [60, 0, 4, 4, 19, 27]]  # lengths 3, 8, 1, 6
# Most calls share a few compiled programs (4 prompts of <= 8 tokens, 9 to 16 new tokens: engine.bucket)
SAMPLING = dict(temperature=0.7, top_k=20, top_p=0.8)


@functools.cache  # sampling reads a model and never changes it
def model_of(cfg):
  return Transformer(cfg, rngs=nnx.Rngs(params=0))


def on_host(out: engine.Completions) -> engine.Completions:
  return engine.Completions(*map(np.asarray, out))


def full_forward_logprobs(model, prompts, out):
  """log-softmax of one cache-free forward pass over each prompt + completion (right-padded:
  causal, so the padding is never seen): [B, N, V] at the positions that predict the completion."""
  seqs = [list(p) + out.tokens[b, : out.lengths[b]].tolist() for b, p in enumerate(prompts)]
  batch = np.array([s + [0] * (model.cfg.max_seq_len - len(s)) for s in seqs], np.int32)
  logits = np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, batch))  # [B, T, V]
  n = out.tokens.shape[1]
  return np.asarray(
    jax.nn.log_softmax(np.stack([logits[b, len(p) - 1 : len(p) - 1 + n] for b, p in enumerate(prompts)]))
  )


def logprob_of(logprobs_bnv, out):
  """[B, N] log-probabilities of the sampled tokens, 0 past each row's length."""
  lp = np.take_along_axis(logprobs_bnv, out.tokens[..., None], -1)[..., 0]
  return np.where(np.arange(lp.shape[1])[None] < out.lengths[:, None], lp, 0.0)


def test_logprobs_equal_a_full_forward_over_the_sampled_sequence():
  """Temperature 1 without filters: both log-probs are the model's own (plain residual, GQA)."""
  model = model_of(GQA)
  out = on_host(sample(model, PROMPTS, max_new_tokens=[10, 16, 12, 9], key=jax.random.key(0)))
  assert out.lengths.tolist() == [10, 16, 12, 9]
  expected = logprob_of(full_forward_logprobs(model, PROMPTS, out), out)
  np.testing.assert_allclose(out.logprobs, expected, atol=1e-5)
  np.testing.assert_allclose(out.model_logprobs, expected, atol=1e-5)


def test_filtered_logprobs_equal_a_full_forward_with_mla_moe_and_mhc():
  """Temperature and top-k / top-p: `logprobs` under the filtered distribution sampled from,
  `model_logprobs` the model's own."""
  model = model_of(MLA_MOE_MHC)
  out = on_host(sample(model, PROMPTS, max_new_tokens=[10, 16, 12, 9], key=jax.random.key(1), **SAMPLING))
  logprobs = full_forward_logprobs(model, PROMPTS, out)  # [B, N, V]
  policy = jax.jit(jax.vmap(lambda lp: jax.nn.log_softmax(filtered_logits(lp, **SAMPLING))))(logprobs)
  np.testing.assert_allclose(out.model_logprobs, logprob_of(logprobs, out), atol=1e-5)
  np.testing.assert_allclose(out.logprobs, logprob_of(np.asarray(policy), out), atol=1e-5)
  assert not np.allclose(out.logprobs, out.model_logprobs, atol=1e-3)


@pytest.mark.parametrize(
  "cfg, settings", [(GQA, {}), (MLA_MOE_MHC, SAMPLING)], ids=["plain-gqa-unfiltered", "mla-moe-mhc-mtp-filtered"]
)
def test_ragged_batch_equals_one_by_one_with_the_same_keys(cfg, settings):
  model = model_of(cfg)
  keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(7), len(PROMPTS))))  # raw [B, 2]
  limits = [10, 16, 12, 9]
  batched = on_host(sample(model, PROMPTS, max_new_tokens=limits, key=keys, **settings))
  for b, (prompt, limit) in enumerate(zip(PROMPTS, limits)):
    alone = on_host(sample(model, [prompt], max_new_tokens=limit, key=keys[b : b + 1], **settings))
    assert alone.lengths[0] == batched.lengths[b] == limit
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[b, :limit])
    np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[b, :limit], atol=1e-5)
    np.testing.assert_allclose(alone.model_logprobs[0], batched.model_logprobs[b, :limit], atol=1e-5)
  # the same batch as one array with prompt lengths (each prompt in front, anything after it)
  tokens = np.full((4, 8), 33)
  for b, p in enumerate(PROMPTS):
    tokens[b, : len(p)] = p
  from_array = sample(model, tokens, prompt_lengths=[3, 8, 1, 6], max_new_tokens=limits, key=keys, **settings)
  np.testing.assert_array_equal(from_array.tokens, batched.tokens)
  np.testing.assert_array_equal(from_array.logprobs, batched.logprobs)


def test_rows_stop_at_eos_and_pad_after_it_and_the_loop_ends_with_the_last_row(monkeypatch):
  model = model_of(GQA)
  free = on_host(sample(model, PROMPTS, max_new_tokens=12, key=jax.random.key(3), temperature=0.0))
  eos = int(free.tokens[0, 2])  # row 0 emits it at step 2 at the latest
  limits = [40, 5, 12, 5]

  def expected_length(b):
    row = free.tokens[b].tolist()
    return min(row.index(eos) + 1 if eos in row else 12, limits[b])

  steps_run = []
  original = engine.sample_token

  def counting(*args, **kwargs):  # traced once, runs once per decoding step
    jax.debug.callback(lambda: steps_run.append(1))
    return original(*args, **kwargs)

  monkeypatch.setattr(engine, "sample_token", counting)
  out = sample(model, PROMPTS, max_new_tokens=limits, key=jax.random.key(3), temperature=0.0, eos_id=eos, pad_id=59)
  out = on_host(out)
  assert out.lengths.tolist() == [expected_length(b) for b in range(4)] and out.lengths[0] <= 3
  assert out.tokens.shape == (4, 40)
  for b, n in enumerate(out.lengths):
    np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
    assert (
      (out.tokens[b, n:] == 59).all() and (out.logprobs[b, n:] == 0).all() and (out.model_logprobs[b, n:] == 0).all()
    )
    assert (out.logprobs[b, :n] < 0).all()
  jax.effects_barrier()
  assert len(steps_run) == out.lengths.max() < 40  # not the 40 (bucket 64) steps of row 0's limit


def test_top_k_one_equals_greedy():
  model = model_of(GQA)
  greedy = sample(model, PROMPTS, max_new_tokens=12, key=jax.random.key(3), temperature=0.0)
  top1 = sample(model, PROMPTS, max_new_tokens=12, key=jax.random.key(5), temperature=1.3, top_k=1)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.model_logprobs, greedy.model_logprobs, atol=1e-6)
  np.testing.assert_allclose(greedy.logprobs, greedy.model_logprobs)  # greedy reports the model's log-probs
  np.testing.assert_array_equal(top1.logprobs, 0.0)  # the filtered distribution has one token


@pytest.mark.parametrize(
  "prompts, kwargs, message",
  [
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1] * 10], {"max_new_tokens": 60}, "prompt 0 (10 tokens) + max_new_tokens (60) exceeds model.max_seq_len=64"),
    ([[1, 2]], {"max_new_tokens": [3, 4]}, "max_new_tokens: 2 limits for 1 prompts"),
    ([[1, 2]], {"temperature": -1.0}, "temperature=-1.0: must be >= 0"),
    ([[1, 2]], {"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"),
    ([[1, 2]], {"eos_id": 61}, "eos_id=61: must be an id in [0, model.vocab_size=61)"),
    ([[1, 99]], {}, "prompt 0 token 1 is 99: outside [0, model.vocab_size=61)"),
    ([[1, 2]], {"key": jax.random.split(jax.random.key(0), 3)}, "key: 3 keys for 1 prompts"),
    ([], {}, "no prompts"),
  ],
)
def test_bad_requests_fail_in_one_line_naming_the_field(prompts, kwargs, message):
  kwargs = {"max_new_tokens": 4, "key": jax.random.key(0), **kwargs}
  with pytest.raises(ValueError) as e:
    sample(model_of(GQA), prompts, **kwargs)
  assert message in str(e.value) and "\n" not in str(e.value)
