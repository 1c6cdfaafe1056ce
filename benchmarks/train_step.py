"""Full training-step speed (forward, backward, AdamW) on this machine's first accelerator.

  python benchmarks/train_step.py                                   # the four proxies
  python benchmarks/train_step.py --models moe-1b-active --set model.remat=dots
  python benchmarks/train_step.py --xla-flags "--xla_gpu_enable_latency_hiding_scheduler=true"

Each model (experiments/speed_proxies.py) runs in its own process, so that its peak
memory is its own: compile, `--warmup` steps, then `--steps` timed steps, each waited
for; the step time is their median. Model FLOPs per token are counted analytically
(manifold.model.accounting: matmuls and attention, forward x 3); MFU is against the
datasheet bf16 rate and against a bf16 8192^3 matmul timed in the same process. Prints
one row per model and the mHC / plain step-time ratios; `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import time

from manifold.cli import GPU_MEMORY_FRACTION

PROXIES = "experiments/speed_proxies.py"
MODELS = ("dense-1b", "moe-1b-active", "dense-1b+mhc", "moe-1b-active+mhc")


def matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
  """Median bf16 [n, n] x [n, n] rate on random data, TFLOP/s."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e12


KERNEL_KINDS = (  # (kind, pattern of GPU kernel names), first match wins
  ("attention (cuDNN)", r"cudnn|fmha|sdpa|flash"),
  ("matmul (cuBLAS / XLA)", r"gemm|nvjet|xmma|cutlass|matmul|sm90|dot"),
  ("grouped matmul (Pallas)", r"^t?gmm|ragged"),
  ("mhc (Pallas)", r"mhc|pre_|res_post"),
  ("sort", r"sort|cub::|radix"),
  ("scatter / gather", r"scatter|gather|dynamic.update|dynamic.slice"),
  ("reductions", r"reduce|reduction"),
  ("copies / transposes", r"copy|transpose|memcpy|memset|concatenate"),
  ("other fusions", r"fusion|loop_|input_|wrapped"),
)


def profile(run, logdir: str, steps: int = 3) -> dict:
  """GPU kernel time per step by kind and the top kernels, from a profiler trace of `run()`
  called `steps` times (each call one waited-for training step)."""
  import jax

  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for _ in range(steps):
      run()
  [path] = glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True)[-1:]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {
    (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
  }
  gpu = {pid for pid, name in processes.items() if "GPU" in name or "/device:" in name and "host" not in name.lower()}
  kernels = [
    e
    for e in events
    if e.get("ph") == "X" and e.get("pid") in gpu and threads.get((e["pid"], e.get("tid")), "").startswith("Stream")
  ]
  by_name, by_kind = collections.Counter(), collections.Counter()
  for e in kernels:
    ms = e.get("dur", 0) / 1e3 / steps
    by_name[e["name"][:90]] += ms
    by_kind[next((k for k, pat in KERNEL_KINDS if re.search(pat, e["name"], re.I)), "other")] += ms
  if not kernels:
    raise RuntimeError(f"no GPU kernels in the trace; processes {sorted(set(processes.values()))[:8]}")
  return {
    "gpu_ms_per_step": sum(by_kind.values()),
    "by_kind": by_kind.most_common(),
    "top_kernels": by_name.most_common(15),
  }


def measure(model: str, overrides: list[str], steps: int, warmup: int, profile_dir: str | None = None) -> dict:
  """Times one proxy's training step in this process."""
  import jax
  import jax.numpy as jnp

  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.model.accounting import count_params, training_flops_per_token
  from manifold.parallel.mesh import make_mesh
  from manifold.train import hardware
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec
  from manifold.train.step import make_train_step

  name, _, residual = model.partition("+")
  cfg = load_config(f"{PROXIES}:model={name},residual={residual or 'plain'}", [f"--config.{o}" for o in overrides])
  device = jax.devices()[0]
  cfg.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  mesh = make_mesh(cfg.mesh, [device])
  model_cfg, tx = ModelConfig.from_config(cfg.model), make_optimizer(cfg.train)
  spec = make_state_spec(model_cfg, tx, mesh)
  state = spec.init(jax.random.key(0))
  step = make_train_step(spec, tx, mesh, jnp.ones(model_cfg.vocab_size, jnp.float32), cfg.train)
  batch_shape = (cfg.train.batch_size, cfg.train.seq_len + 1)
  batches = [jax.random.randint(jax.random.key(i), batch_shape, 0, model_cfg.vocab_size) for i in range(2)]

  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times[warmup:])
  tokens = cfg.train.batch_size * cfg.train.seq_len
  flops_per_token = training_flops_per_token(model_cfg, cfg.train.seq_len)
  achieved = flops_per_token * tokens / step_s / 1e12
  params = count_params(model_cfg)
  matmul = matmul_tflops()
  peak = hardware.peak_tflops(device)
  stats = device.memory_stats() or {}
  row = {
    "model": model,
    "overrides": overrides,
    "device": device.device_kind,
    "jax": jax.__version__,
    "params_b": params["total"] / 1e9,
    "active_b": params["active"] / 1e9,
    "tokens_per_step": tokens,
    "step_ms": 1e3 * step_s,
    "step_ms_min_max": [1e3 * min(times[warmup:]), 1e3 * max(times[warmup:])],
    "tokens_per_s": tokens / step_s,
    "gflop_per_token": flops_per_token / 1e9,
    "model_tflops": achieved,
    "mfu_datasheet": achieved / peak if peak else None,
    "matmul_tflops": matmul,
    "mfu_measured": achieved / matmul,
    "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
    "compile_s": compile_s,
    "final_loss": float(metrics["loss"]),
  }
  if profile_dir:
    carried = [state]

    def one_step():
      carried[0], metrics = compiled(carried[0], batches[0])  # the state is donated: carry it on
      jax.block_until_ready(metrics)

    try:
      row["profile"] = profile(one_step, profile_dir)
    except Exception as e:  # noqa: BLE001 - a trace that cannot be read must not lose the timings
      row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
  return row


def _percent(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
  out = [
    "| model | params (active) B | tokens/step | step ms | tokens/s | GFLOP/token | TFLOP/s | MFU (datasheet) "
    "| MFU (measured matmul) | peak GiB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['model']} | failed: {r['error']} |")
      continue
    out.append(
      f"| {r['model']} | {r['params_b']:.2f} ({r['active_b']:.2f}) | {r['tokens_per_step']:,} | {r['step_ms']:.1f} "
      f"| {r['tokens_per_s']:,.0f} | {r['gflop_per_token']:.2f} | {r['model_tflops']:.0f} "
      f"| {_percent(r['mfu_datasheet'])} | {_percent(r['mfu_measured'])} of {r['matmul_tflops']:.0f} "
      f"| {r['peak_gib']:.1f} |"
    )
  by_model = {r["model"]: r for r in rows if "error" not in r}
  for name in ("dense-1b", "moe-1b-active"):
    if name in by_model and f"{name}+mhc" in by_model:
      ratio = by_model[f"{name}+mhc"]["step_ms"] / by_model[name]["step_ms"]
      out.append(f"\nmHC n=4 over plain, {name}: step time x{ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
  for r in rows:
    if "profile" in r:
      p = r["profile"]
      out.append(f"\n{r['model']}: GPU kernel time {p['gpu_ms_per_step']:.1f} ms per step")
      out += [f"  {ms:8.1f} ms {100 * ms / p['gpu_ms_per_step']:5.1f}%  {kind}" for kind, ms in p["by_kind"]]
      out += [f"  {ms:8.2f} ms  {name}" for name, ms in p["top_kernels"]]
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
  parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.remat=dots")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--xla-flags", default="", help="added to XLA_FLAGS of each model's process")
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--profile", help="trace 3 more steps into this folder; print GPU time by kernel kind")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print its row
  args = parser.parse_args()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)  # as `manifold train` does
  if args.one:
    print("ROW " + json.dumps(measure(args.one, args.set, args.steps, args.warmup, args.profile)), flush=True)
    return
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()}
  rows = []
  for model in args.models.split(","):
    if model not in MODELS:
      parser.error(f"--models: unknown {model!r}; use {', '.join(MODELS)}")
    command = [sys.executable, __file__, "--one", model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += [f"--set={o}" for o in args.set]
    command += [f"--profile={args.profile}/{model}"] if args.profile else []
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not found:
      print(proc.stderr[-4000:], file=sys.stderr)
      last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
      rows.append({"model": model, "error": last[:200]})
    else:
      rows.append(json.loads(found[0]))
    print(f"{model}: {json.dumps(rows[-1])}", flush=True)  # each row as soon as it exists
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
