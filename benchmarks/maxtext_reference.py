"""The MoE proxies side by side with MaxText, the JAX codebase a user would pick instead: the
same DeepSeek-V3-style model, with and without mHC, through `manifold`'s step and MaxText's
own trainer, on the same GPU, each run in its own process.

  python benchmarks/maxtext_reference.py                  # moe-1b-active, plain and mHC
  python benchmarks/maxtext_reference.py --models moe-27b-layers,moe-27b-layers+mhc --steps 10

Needs `maxtext` importable (the `maxtext` wheel, Python 3.12, installed with `--no-deps`, and
the packages its trainer imports: qwix, aqtp, tokamax, drjax, grain, omegaconf, pydantic, ...;
benchmarks/README.md lists the set that ran). MaxText runs `maxtext.trainers.pre_train.train`
on its synthetic data with the proxy's shape (`maxtext_overrides`) and its fastest GPU
settings: cuDNN flash attention through JAX, tokamax's Mosaic GPU grouped matmul, the
`minimal` remat policy (it has no "none"), float32 parameters and AdamW state with bfloat16
compute as `manifold`. Neither side runs multi-token prediction: MaxText's MTP layer does
not take mHC's [B, T, n, D] streams (it stops in `mhc.py` unpacking a 3-D hidden state), so
`manifold` runs with `model.mtp_depth=0` here too. Step time is the median after the warm-up
steps (MaxText's own per-step "seconds"); MaxText's memory is its compiled estimate. The
losses are in the JSON rows but not compared: MaxText's synthetic data is one fixed batch of
random tokens, which it memorises within a few steps, and `manifold`'s step alternates two.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import tempfile

from train_step import PROXIES, child_row, failure, record, stream

from manifold.cli import GPU_MEMORY_FRACTION
from manifold.results import markdown_table

MODELS = ("moe-1b-active", "moe-1b-active+mhc", "moe-27b-layers", "moe-27b-layers+mhc")
MAXTEXT_SETTINGS = (  # the same step as manifold's on one GPU, in MaxText's fastest GPU settings
  "dataset_type=synthetic", "packing=false", "enable_checkpointing=false", "enable_tensorboard=false", "hardware=gpu",
  "skip_jax_distributed_system=true", "decoder_block=deepseek", "attention_type=mla", "attention=cudnn_flash_jax",
  "megablox=false", "use_tokamax_gmm=true", "sparse_matmul=true", "capacity_factor=-1", "remat_policy=minimal",
  "dtype=bfloat16", "weight_dtype=float32", "opt_type=adamw", "learning_rate=3e-4", "enable_dropout=false",
  "logits_via_embedding=false", "mlp_activations=[silu,linear]", "routed_score_func=sigmoid", "routed_bias=true",
  "mtp_num_layers=0", "rope_type=default", "log_period=1000",
)  # fmt: skip
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+).*?Tokens/s/device: ([\d.]+).*?\bloss: ([\d.]+)")


def maxtext_overrides(cfg, batch: int, seq: int, steps: int) -> list[str]:
  """MaxText `key=value` arguments for a manifold ModelConfig's DeepSeek-V3 model (MLA,
  DeepSeekMoE, mHC with cfg.streams streams where cfg.residual is mhc)."""
  if cfg.attention != "mla" or cfg.ffn != "moe" or cfg.residual not in ("plain", "mhc"):
    raise ValueError(f"maxtext_overrides: an MLA / MoE model with a plain or mHC residual, not {cfg.residual}")
  groups = cfg.n_group > 1
  return [
    *MAXTEXT_SETTINGS,
    f"base_emb_dim={cfg.d_model}",
    f"base_num_query_heads={cfg.n_heads}",
    f"base_num_kv_heads={cfg.n_heads}",
    f"base_mlp_dim={cfg.d_ff}",
    f"base_moe_mlp_dim={cfg.moe_d_ff}",
    f"base_num_decoder_layers={cfg.n_layers}",
    f"first_num_dense_layers={cfg.first_k_dense_replace}",
    f"vocab_size={cfg.vocab_size}",
    f"num_experts={cfg.n_routed_experts}",
    f"num_experts_per_tok={cfg.experts_per_token}",
    f"shared_experts={cfg.n_shared_experts}",
    f"routed_scaling_factor={cfg.routed_scaling_factor}",
    f"norm_topk_prob={str(cfg.norm_topk_prob).lower()}",
    f"n_routing_groups={cfg.n_group if groups else -1}",
    f"topk_routing_group={cfg.topk_group if groups else -1}",
    f"q_lora_rank={cfg.q_lora_rank}",
    f"kv_lora_rank={cfg.kv_lora_rank}",
    f"qk_nope_head_dim={cfg.qk_nope_head_dim}",
    f"qk_rope_head_dim={cfg.qk_rope_head_dim}",
    f"v_head_dim={cfg.v_head_dim}",
    f"rope_max_timescale={int(cfg.rope_theta)}",
    f"normalization_layer_epsilon={cfg.norm_eps}",
    f"mhc_expansion_rate={cfg.streams if cfg.residual == 'mhc' else 1}",
    f"sinkhorn_iterations={cfg.sinkhorn_iters}",
    f"per_device_batch_size={batch}",
    f"max_target_length={seq}",
    f"steps={steps}",
  ]


def parse_maxtext_log(lines: list[str], warmup: int) -> dict:
  """Step time, tokens/s, loss, parameter count and memory estimate from MaxText's log.
  Step 0 (the compile) and the next `warmup` steps are left out of the median."""
  steps = [(int(m[1]), float(m[2]), float(m[3]), float(m[4])) for m in map(STEP_LINE.search, lines) if m]
  timed = [s for s in steps if s[0] > warmup]
  if not timed:
    raise ValueError(f"MaxText logged {len(steps)} steps, none after step {warmup}")
  seconds = [s[1] for s in timed]
  text = "\n".join(lines)
  params = re.search(r"number parameters: ([\d.]+) billion", text)
  memory = re.search(r"Total estimated memory size: ([\d.]+) GB", text)
  return {
    "params_b": float(params[1]) if params else None,
    "step_ms": 1e3 * statistics.median(seconds),
    "step_ms_min_max": [1e3 * min(seconds), 1e3 * max(seconds)],
    "tokens_per_s": statistics.median(s[2] for s in timed),
    "peak_gib": float(memory[1]) * 1e9 / 2**30 if memory else None,  # MaxText prints GB
    "final_loss": timed[-1][3],
  }


def run_maxtext(model: str, steps: int, warmup: int, extra: list[str]) -> dict:
  """MaxText's trainer on the proxy `model` in a child process; its row or {"error": ...}."""
  import maxtext

  from manifold.config import load_config
  from manifold.model import ModelConfig

  name, _, residual = model.partition("+")
  cfg = load_config(f"{PROXIES}:model={name},residual={residual or 'plain'}")
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  with tempfile.TemporaryDirectory() as out:
    model_cfg = ModelConfig.from_mapping(cfg.model)
    overrides = maxtext_overrides(model_cfg, cfg.train.batch_size, cfg.train.seq_len, 1 + warmup + steps) + extra
    command = [sys.executable, "-m", "maxtext.trainers.pre_train.train", base, f"base_output_directory={out}"]
    code, lines = stream(
      command + ["run_name=" + model.replace("+", "_"), *overrides],
      echo=lambda line: "completed step" in line or "Error" in line or "Traceback" in line,
    )
  if code:
    return failure(lines)
  try:
    row = parse_maxtext_log(lines, warmup)
  except ValueError as e:
    return {"error": str(e)}
  return {"tokens_per_step": cfg.train.batch_size * cfg.train.seq_len, "maxtext": maxtext.__version__, **row}


def _ms(row: dict) -> str:
  low, high = row["step_ms_min_max"]
  return f"{row['step_ms']:.1f} ({low:.1f}-{high:.1f})"


COLUMNS = [
  ("implementation, model", lambda r: f"{r['implementation']}, {r['model']}"),
  ("params B", lambda r: "-" if r.get("params_b") is None else f"{r['params_b']:.2f}"),
  ("step ms (min-max)", _ms),
  ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
  ("memory GiB", lambda r: "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"),
]


def table(rows: list[dict]) -> str:
  """The rows, then manifold over MaxText per model and each side's mHC over plain."""
  out = [markdown_table(rows, COLUMNS).rstrip()]
  done = {(r["model"], r["implementation"]): r for r in rows if "error" not in r}
  for model in dict.fromkeys(r["model"] for r in rows):
    ours, theirs = done.get((model, "manifold")), done.get((model, "MaxText"))
    if ours and theirs:
      out.append(f"\n{model}: manifold / MaxText tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")
  for implementation in ("manifold", "MaxText"):
    for (model, impl), row in done.items():
      plain = done.get((model.removesuffix("+mhc"), impl))
      if impl == implementation and model.endswith("+mhc") and plain:
        ratio = row["step_ms"] / plain["step_ms"]
        out.append(f"\n{implementation}: mHC over plain, {plain['model']}: step time x{ratio:.3f}")
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="moe-1b-active,moe-1b-active+mhc", help=f"comma list of {', '.join(MODELS)}")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--only", choices=("manifold", "MaxText"), help="run one side")
  parser.add_argument("--maxtext-set", action="append", default=[], help="MaxText key=value after ours")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args()
  if args.only != "manifold" and importlib.util.find_spec("maxtext") is None:
    parser.error(
      "maxtext is not importable: install its wheel (Python 3.12) with --no-deps and the packages benchmarks/README.md lists, or pass --only manifold"
    )
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)  # both sides, as `manifold train`
  rows = []
  for model in args.models.split(","):
    if model not in MODELS:
      parser.error(f"--models: unknown {model!r}; use {', '.join(MODELS)}")
    ours = [sys.executable, os.path.join(os.path.dirname(__file__), "train_step.py"), "--one", model]
    ours += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--set=model.mtp_depth=0"]
    for implementation in [args.only] if args.only else ["manifold", "MaxText"]:
      row = (
        child_row(ours)
        if implementation == "manifold"
        else run_maxtext(model, args.steps, args.warmup, args.maxtext_set)
      )
      record(rows, {"model": model, "implementation": implementation, **row}, f"{model} {implementation}", args.json)
  print(table(rows))


if __name__ == "__main__":
  main()
