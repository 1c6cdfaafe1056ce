"""Decoding speed: the engine (manifold.inference.engine.sample) beside the fixed-length
decoder that `generate` was before it, on the quickstart model (random weights) on this
machine's default device (CPU here).

  PYTHONPATH=src:. python benchmarks/rollout.py                       # batch 1, 16, 64; 32 new tokens
  PYTHONPATH=src:. python benchmarks/rollout.py --batches 1,8 --new-tokens 64 --results /tmp/rollout

Both decode the same random prompts of `--prompt-len` tokens with `manifold generate`'s
default sampling (temperature 0.8, top-p 0.95) and no end-of-sequence, so both produce
batch x new tokens; each is compiled by a first call, then timed over `--repeats` calls
(median; the two alternate). Prints one Markdown row per batch size with generated
tokens/s and the ratio, and the same ratio by process CPU time (steadier on a shared
machine); `--results DIR` also writes the rows (manifold.results).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from manifold.config import load_config
from manifold.inference.engine import sample
from manifold.inference.sampling import sample_token
from manifold.model import ModelConfig, Transformer
from manifold.results import fmt, markdown_table, write_results

CONFIG = "experiments/quickstart.py"
SAMPLING = dict(temperature=0.8, top_k=0, top_p=0.95)  # the `sample` section's defaults


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def fixed_length_generate(graphdef, state, prompt_bp, key, max_new_tokens, temperature, top_k, top_p):
  """The baseline: `generate`'s decoder before the engine (`_generate` at commit db1645f,
  body unchanged): equal-length prompts, one key for the batch, every row runs all
  `max_new_tokens` steps."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt_bp.shape
  sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model(prompt_bp, cache, 0)  # prefill: [B, P, V]
  tokens = jnp.concatenate([prompt_bp, jnp.zeros((batch, max_new_tokens), prompt_bp.dtype)], axis=1)

  def step(i, carry):
    tokens, cache, last_logits, key = carry
    key, sub = jax.random.split(key)
    position = prompt_len + i
    next_token = sample(last_logits, sub).astype(tokens.dtype)  # [B]
    tokens = tokens.at[:, position].set(next_token)
    logits, cache = model(next_token[:, None], cache, position)  # [B, 1, V]
    return tokens, cache, logits[:, 0], key

  tokens, *_ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, cache, logits[:, -1], key))
  return tokens


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float, float]]:
  """name -> (seconds of its first call, which compiles; median wall seconds and median
  process CPU seconds of `repeats` more). The timed calls alternate between the functions,
  so that a shared machine's load falls on all of them alike; CPU time, which that load
  barely moves, is the steadier comparison there."""
  first, times = {}, {name: ([], []) for name in fns}
  for name, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first[name] = time.perf_counter() - start
  for _ in range(repeats):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name][0].append(time.perf_counter() - start)
      times[name][1].append(time.process_time() - start_cpu)
  return {name: (first[name], statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in times.items()}


def measure(model: Transformer, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
  prompts = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, model.cfg.vocab_size)
  key = jax.random.key(0)

  def baseline():
    graphdef, state = nnx.split(model)
    args = (new_tokens, SAMPLING["temperature"], SAMPLING["top_k"], SAMPLING["top_p"])
    return fixed_length_generate(graphdef, state, prompts, key, *args)

  def engine():
    return sample(model, prompts, max_new_tokens=new_tokens, key=key, **SAMPLING).tokens

  times = timed({"generate": baseline, "engine": engine}, repeats)
  (base_first, base_s, base_cpu), (engine_first, engine_s, engine_cpu) = times["generate"], times["engine"]
  tokens = batch * new_tokens
  return {
    "batch": batch,
    "prompt_len": prompt_len,
    "new_tokens": new_tokens,
    "device": jax.devices()[0].device_kind,
    "generate_tokens_per_s": tokens / base_s,
    "engine_tokens_per_s": tokens / engine_s,
    "ratio": base_s / engine_s,
    "generate_cpu_s": base_cpu,
    "engine_cpu_s": engine_cpu,
    "cpu_ratio": base_cpu / engine_cpu,
    "generate_first_call_s": base_first,
    "engine_first_call_s": engine_first,
  }


COLUMNS = [
  ("batch", lambda r: str(r["batch"])),
  ("prompt + new tokens", lambda r: f"{r['prompt_len']} + {r['new_tokens']}"),
  ("generate before (tokens/s)", lambda r: fmt(r["generate_tokens_per_s"], ",.0f")),
  ("engine (tokens/s)", lambda r: fmt(r["engine_tokens_per_s"], ",.0f")),
  ("engine / generate", lambda r: fmt(r["ratio"], ".2f")),
  ("CPU s per call (generate, engine)", lambda r: f"{r['generate_cpu_s']:.3f}, {r['engine_cpu_s']:.3f}"),
  ("engine / generate by CPU time", lambda r: fmt(r["cpu_ratio"], ".2f")),
  ("first call s (generate, engine)", lambda r: f"{r['generate_first_call_s']:.1f}, {r['engine_first_call_s']:.1f}"),
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batches", default="1,16,64", help="comma list of batch sizes")
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--results", help="also write results.json / results.md here")
  args = parser.parse_args()
  cfg = ModelConfig.from_mapping(load_config(CONFIG).model)
  model = Transformer(cfg, rngs=nnx.Rngs(params=0))
  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    rows.append(measure(model, batch, args.prompt_len, args.new_tokens, args.repeats))
    print(f"batch {batch}: {rows[-1]}", flush=True)
  print(f"\n{CONFIG} (random weights), {rows[0]['device']}, median of {args.repeats} calls after the first\n")
  print(markdown_table(rows, COLUMNS))
  if args.results:
    write_results(args.results, rows, COLUMNS, key="batch")


if __name__ == "__main__":
  main()
