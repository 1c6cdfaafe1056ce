"""A bounded load test of `manifold serve` on loopback: 1, 4 and 16 concurrent clients, each sending
streaming completions of fixed prompts and lengths until a fixed number of requests is done.

  PYTHONPATH=src:. python benchmarks/serve.py                          # quickstart model, float32 and int8
  PYTHONPATH=src:. python benchmarks/serve.py --workdir runs/quickstart --quantize none,int8,int4

Without `--workdir` it trains `--config` for one step in a temporary folder (decoding speed does not
depend on the weights' values). For each weight format it starts one server (`--slots` = the
largest client count) and waits for it, then per client count sends `--requests` requests (from asyncio clients, one connection each) of
`--prompt-tokens` tokens asking for `--new-tokens` tokens past end-of-text (`ignore_eos`), and
stops the server. Prints one Markdown row per (format, clients): time to first token p50 / p99,
per-request tokens/s (after the first token), aggregate tokens/s, its ratio to one client's, the
parameters' bytes as stored and the server's peak resident memory (VmHWM: the runtime and the
compiled programs dominate it for small models); `--results DIR` also writes them (manifold.results).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from manifold.results import fmt, markdown_table, write_results
from manifold.serve.server import running_server

COLUMNS = [
  ("weights", lambda r: r["quantize"]),
  ("clients", lambda r: str(r["clients"])),
  ("requests", lambda r: str(r["requests"])),
  ("TTFT p50 ms", lambda r: f"{r['ttft_p50_ms']:.0f}"),
  ("TTFT p99 ms", lambda r: f"{r['ttft_p99_ms']:.0f}"),
  ("tokens/s per request", lambda r: f"{r['request_tokens_per_s']:.1f}"),
  ("aggregate tokens/s", lambda r: f"{r['aggregate_tokens_per_s']:.1f}"),
  ("x 1 client", lambda r: fmt(r.get("speedup"), ".2f")),
  ("parameters MB", lambda r: f"{r['parameter_mb']:.2f}"),
  ("peak memory MB", lambda r: f"{r['peak_rss_mb']:.0f}"),
]


def peak_rss_mb(pid: int) -> float:
  """The process's peak resident set (VmHWM), in MB."""
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, new_tokens: int):
  """(seconds to the first token, seconds from it to the last, tokens) of one streamed completion."""
  body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.8, "top_p": 0.95,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
  began = time.perf_counter()
  first = None
  tokens = 0
  async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
      elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
        first = time.perf_counter()
  end = time.perf_counter()
  first = end if first is None else first
  return first - began, end - first, tokens


async def load(url: str, model: str, clients: int, requests: int, prompt: str, new_tokens: int) -> dict:
  """`requests` completions from `clients` concurrent clients, each sending its next when the last ends."""
  counter = itertools.count()
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

  async with httpx.AsyncClient(limits=limits) as http:
    await one_request(http, url, model, prompt, new_tokens)  # the prompt's prefill bucket compiles here

    async def client():
      done = []
      while next(counter) < requests:
        done.append(await one_request(http, url, model, prompt, new_tokens))
      return done

    began = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
    wall = time.perf_counter() - began
  ttft = sorted(r[0] for r in results)
  tokens = sum(r[2] for r in results)
  return {
    "clients": clients,
    "requests": len(results),
    "ttft_p50_ms": 1e3 * statistics.median(ttft),
    "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
    "request_tokens_per_s": statistics.median((r[2] - 1) / r[1] for r in results if r[1] > 0),
    "aggregate_tokens_per_s": tokens / wall,
  }


def trained_for_one_step(config: str, folder: str) -> str:
  workdir = os.path.join(folder, "model")
  subprocess.run([sys.executable, "-m", "manifold.cli", "train", "--config", config, "--workdir", workdir,
                  "--no-progress", "--config.train.steps=1", "--config.train.warmup_steps=0", "--config.train.checkpoint_every=1",
                  "--config.sample.max_new_tokens=0"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
  return workdir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="", help="a trained run (default: --config trained for one step)")
  parser.add_argument("--config", default="experiments/quickstart.py")
  parser.add_argument("--quantize", default="none,int8")
  parser.add_argument("--clients", default="1,4,16")
  parser.add_argument("--requests", type=int, default=32, help="completions per client count")
  parser.add_argument("--prompt-tokens", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--results", default="")
  args = parser.parse_args(argv)
  clients = [int(c) for c in args.clients.split(",")]
  prompt = ("def fibonacci(n):\n    a, b = 0, 1\n" * 8)[: args.prompt_tokens]  # byte-level: one token per byte
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    workdir = args.workdir or trained_for_one_step(args.config, folder)
    model = os.path.basename(os.path.normpath(workdir))
    for quantize in args.quantize.split(","):
      log = os.path.join(folder, f"serve-{quantize}.log")
      flags = ["--slots", str(max(clients)), "--max-queue", str(4 * max(clients)), "--quantize", quantize]
      with running_server(workdir, log, flags=flags) as (url, proc):
        base = None
        for c in clients:
          measured = asyncio.run(load(url, model, c, args.requests, prompt, args.new_tokens))
          row = {"quantize": quantize, **measured}
          base = row["aggregate_tokens_per_s"] if c == 1 else base
          row["speedup"] = row["aggregate_tokens_per_s"] / base if base else None
          row["peak_rss_mb"] = peak_rss_mb(proc.pid)
          row["parameter_mb"] = httpx.get(f"{url}/health").json()["parameter_bytes"] / 1e6
          rows.append(row)
          print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
  print(markdown_table(rows, COLUMNS))
  if args.results:
    write_results(args.results, rows, COLUMNS)
  return 0


if __name__ == "__main__":
  sys.exit(main())
