"""Full training-step speed (forward, backward, AdamW) on this machine's first accelerator(s).

  python benchmarks/train_step.py                                   # the four proxies
  python benchmarks/train_step.py --models moe-27b-layers,moe-27b-layers+mhc   # the mHC paper's 27B layer
  python benchmarks/train_step.py --models moe-1b-active --set model.remat=dots
  python benchmarks/train_step.py --xla-flags "--xla_gpu_enable_latency_hiding_scheduler=true"
  python benchmarks/train_step.py --models moe-1b-active --devices 2 --set mesh.expert=2 --set train.batch_size=8

Each model (experiments/speed_proxies.py) runs in its own process, so that its peak
memory is its own: compile, `--warmup` steps, then `--steps` timed steps, each waited
for; the step time is their median. Model FLOPs per token are counted analytically
(manifold.model.accounting: matmuls and attention, forward x 3); MFU is against the
datasheet bf16 rate and against a bf16 8192^3 matmul timed in the same process, per
device. `--devices N` runs over the first N devices with the config's `mesh` (by default
all data-parallel; `--set mesh.expert=N` for expert parallelism). Prints one row per model
and the mHC / plain step-time ratios; `--profile` adds GPU time by kernel kind and the model
source lines behind the top kernels; `--json` writes the rows.
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
from manifold.results import markdown_table

PROXIES = "experiments/speed_proxies.py"
MODELS = ("dense-1b", "moe-1b-active", "dense-1b+mhc", "moe-1b-active+mhc")  # the default set
PAPER_LAYERS = ("moe-27b-layers", "moe-27b-layers+mhc")  # the mHC paper's 27B layer, 5 blocks


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


HLO_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}", re.M)


def kernel_key(name: str) -> str:
  """An HLO instruction or GPU kernel name as the other spells it ('.' and '-' as '_')."""
  return re.sub(r"\W", "_", name)


def _fields(text: str) -> dict[str, str]:
  """`key=value` pairs of HLO metadata or a stack-frame table row (quotes dropped)."""
  return {key: quoted or bare for key, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([\w.-]+))', text)}


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """`kernel_key(instruction) -> "file.py:line op"` from a compiled module's HLO metadata:
  `source_file`/`source_line`, or (newer XLA) the `stack_frame_id` into the module's tables."""
  tables = {}
  for section in ("FileNames", "FileLocations", "StackFrames"):
    found = re.search(rf"^{section}\n((?:\d+ .*\n)+)", hlo_text, re.M)
    tables[section] = dict(re.findall(r"^(\d+) (.*)$", found.group(1), re.M)) if found else {}

  def frame_source(frame_id: str) -> str:
    location = _fields(
      tables["FileLocations"].get(_fields(tables["StackFrames"].get(frame_id, "")).get("file_location_id", ""), "")
    )
    file = tables["FileNames"].get(location.get("file_name_id", ""), "?").strip('"')
    return f"{os.path.basename(file)}:{location.get('line', '?')}"

  sources = {}
  for name, metadata in HLO_METADATA.findall(hlo_text):
    fields = _fields(metadata)
    op = fields.get("op_name", "").rsplit("/", 1)[-1]
    if "source_file" in fields:
      sources[kernel_key(name)] = f"{os.path.basename(fields['source_file'])}:{fields.get('source_line', '?')} {op}"
    elif "stack_frame_id" in fields:
      sources[kernel_key(name)] = f"{frame_source(fields['stack_frame_id'])} {op}"
  return sources


def profile(run, logdir: str, hlo_text: str, devices: int = 1, steps: int = 3) -> dict:
  """GPU kernel time per step and device by kind, the top kernels, and the model source
  lines (from the HLO metadata of `hlo_text`) that the time goes to, from a profiler trace
  of `run()` called `steps` times (each call one waited-for training step)."""
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
  if not kernels:
    raise RuntimeError(f"no GPU kernels in the trace; processes {sorted(set(processes.values()))[:8]}")
  sources = hlo_sources(hlo_text)
  by_name, by_kind, by_source = collections.Counter(), collections.Counter(), collections.Counter()
  for e in kernels:
    ms = e.get("dur", 0) / 1e3 / steps / devices
    kind = next((k for k, pat in KERNEL_KINDS if re.search(pat, e["name"], re.I)), "other")
    hlo_op = (e.get("args") or {}).get("hlo_op", e["name"])
    by_name[e["name"][:90]] += ms
    by_kind[kind] += ms
    by_source[(kind, sources.get(kernel_key(hlo_op), sources.get(kernel_key(e["name"]), "?")))] += ms
  return {
    "gpu_ms_per_step": sum(by_kind.values()),
    "by_kind": by_kind.most_common(),
    "top_kernels": by_name.most_common(15),
    "top_sources": [[kind, source, ms] for (kind, source), ms in by_source.most_common(25)],
  }


def measure(
  model: str, overrides: list[str], steps: int, warmup: int, devices: int = 1, profile_dir: str | None = None
) -> dict:
  """Times one proxy's training step in this process over its first `devices` devices."""
  import jax
  import jax.numpy as jnp

  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.model.accounting import count_params, training_flops_per_token
  from manifold.parallel.mesh import check_fits, make_mesh
  from manifold.parallel.sharding import batch_sharding
  from manifold.train import hardware
  from manifold.train.optimizer import make_optimizer
  from manifold.train.state import make_state_spec
  from manifold.train.step import make_train_step

  name, _, residual = model.partition("+")
  cfg = load_config(f"{PROXIES}:model={name},residual={residual or 'plain'}", [f"--config.{o}" for o in overrides])
  if len(jax.devices()) < devices:
    raise SystemExit(f"--devices {devices}: this machine has {len(jax.devices())}")
  used = jax.devices()[:devices]
  device = used[0]
  mesh = make_mesh(cfg.mesh, used)
  check_fits(cfg, mesh)
  model_cfg, tx = ModelConfig.from_mapping(cfg.model), make_optimizer(cfg.train)
  spec = make_state_spec(model_cfg, tx, mesh)
  state = spec.init(jax.random.key(0))
  step = make_train_step(spec, tx, mesh, jnp.ones(model_cfg.vocab_size, jnp.float32), cfg.train)
  batch_shape = (cfg.train.batch_size, cfg.train.seq_len + 1)
  batches = [
    jax.device_put(jax.random.randint(jax.random.key(i), batch_shape, 0, model_cfg.vocab_size), batch_sharding(mesh))
    for i in range(2)
  ]

  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  print(f"{model}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    if i % 5 == 0 or i == warmup + steps - 1:
      print(f"{model}: step {i + 1}/{warmup + steps} {1e3 * times[-1]:.1f} ms", file=sys.stderr, flush=True)
  step_s = statistics.median(times[warmup:])
  tokens = cfg.train.batch_size * cfg.train.seq_len
  flops_per_token = training_flops_per_token(model_cfg, cfg.train.seq_len)
  achieved = flops_per_token * tokens / step_s / 1e12 / devices  # per device
  params = count_params(model_cfg)
  matmul = matmul_tflops()
  peak = hardware.peak_tflops(device)
  peak_bytes = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in used)
  row = {
    "model": model,
    "overrides": overrides,
    "device": device.device_kind,
    "devices": devices,
    "mesh": dict(mesh.shape),
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
    "peak_gib": peak_bytes / 2**30,  # the largest over the devices
    "compile_s": compile_s,
    "final_loss": float(metrics["loss"]),
  }
  if profile_dir:
    carried = [state]

    def one_step():
      carried[0], metrics = compiled(carried[0], batches[0])  # the state is donated: carry it on
      jax.block_until_ready(metrics)

    try:
      row["profile"] = profile(one_step, profile_dir, compiled.as_text(), devices)
    except Exception as e:  # noqa: BLE001 - a trace that cannot be read must not lose the timings
      row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
  return row


def stream(command: list[str], env: dict | None = None, echo=lambda line: True) -> tuple[int, list[str]]:
  """Runs a child process, writing the lines `echo` accepts to stderr as they come (so a slow
  compile or a hang shows); its return code and all its lines."""
  lines = []
  with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
    for line in proc.stdout:
      if echo(line) and not line.startswith("ROW "):
        sys.stderr.write(line)
      lines.append(line.rstrip("\n"))
  return proc.returncode, lines


def failure(lines: list[str]) -> dict:
  """{"error": a failed child's last non-blank line}."""
  return {"error": next((line.strip() for line in reversed(lines) if line.strip()), "no output")[:200]}


def child_row(command: list[str], env: dict | None = None) -> dict:
  """The row a `--one` child prints (`ROW {json}`), or {"error": its last line}."""
  code, lines = stream(command, env)
  found = [line[4:] for line in lines if line.startswith("ROW ")]
  if code or not found:
    return failure(lines)
  return json.loads(found[0])


def record(rows: list[dict], row: dict, label: str, json_path: str | None) -> None:
  """Adds `row`, prints it as soon as it exists, and rewrites `json_path` with all rows."""
  rows.append(row)
  print(f"{label}: {json.dumps(row)}", flush=True)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(rows, f, indent=1)


def _percent(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _label(row: dict) -> str:
  mesh = ", ".join(f"{axis} {size}" for axis, size in row.get("mesh", {}).items() if size > 1)
  return f"{row['model']} ({row['devices']} devices: {mesh})" if row.get("devices", 1) > 1 else row["model"]


COLUMNS = [
  ("model", lambda r: _label(r) if "error" not in r else r["model"]),
  ("params (active) B", lambda r: f"{r['params_b']:.2f} ({r['active_b']:.2f})"),
  ("tokens/step", lambda r: f"{r['tokens_per_step']:,}"),
  ("step ms", lambda r: f"{r['step_ms']:.1f}"),
  ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
  ("GFLOP/token", lambda r: f"{r['gflop_per_token']:.2f}"),
  ("TFLOP/s per device", lambda r: f"{r['model_tflops']:.0f}"),
  ("MFU (datasheet)", lambda r: _percent(r["mfu_datasheet"])),
  ("MFU (measured matmul)", lambda r: f"{_percent(r['mfu_measured'])} of {r['matmul_tflops']:.0f}"),
  ("peak GiB", lambda r: f"{r['peak_gib']:.1f}"),
]


def table(rows: list[dict]) -> str:
  out = [markdown_table(rows, COLUMNS).rstrip()]
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
      out.append("  by model source (HLO metadata):")
      out += [f"  {ms:8.2f} ms  {kind:24} {source}" for kind, source, ms in p["top_sources"]]
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS + PAPER_LAYERS)}")
  parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.remat=dots")
  parser.add_argument("--devices", type=int, default=1, help="run over the first N devices (mesh from --set mesh.*)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--xla-flags", default="", help="added to XLA_FLAGS of each model's process")
  parser.add_argument("--json", help="write the rows here")
  parser.add_argument("--profile", help="trace 3 more steps into this folder; print GPU time by kernel kind")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one model, print its row
  args = parser.parse_args()
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)  # as `manifold train` does
  if args.one:
    print(
      "ROW " + json.dumps(measure(args.one, args.set, args.steps, args.warmup, args.devices, args.profile)), flush=True
    )
    return
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()}
  rows = []
  for model in args.models.split(","):
    if model not in MODELS + PAPER_LAYERS:
      parser.error(f"--models: unknown {model!r}; use {', '.join(MODELS + PAPER_LAYERS)}")
    command = [sys.executable, __file__, "--one", model, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--devices", str(args.devices)]
    command += [f"--set={o}" for o in args.set]
    command += [f"--profile={args.profile}/{model}"] if args.profile else []
    record(rows, {"model": model, **child_row(command, env)}, model, args.json)
  print(table(rows))


if __name__ == "__main__":
  main()
