"""The MoE proxy side by side with PyTorch: the same DeepSeek-V3-style model as a Hugging
Face `transformers` `DeepseekV3ForCausalLM` training step, on the same GPU, in one run.

  python benchmarks/hf_reference.py                      # batch 4 x 4096, as train_step.py
  python benchmarks/hf_reference.py --batch 2 --no-compile

Runs `manifold`'s step (benchmarks/train_step.py, experiments/speed_proxies.py's
moe-1b-active) and then PyTorch's, each in its own process, and prints tokens/s and the
ratio. PyTorch: bfloat16 parameters and fused AdamW (lighter than `manifold`'s float32
parameters and optimizer state with bfloat16 compute), SDPA attention, the experts on
`torch.nn.functional.grouped_mm` (`experts_implementation="grouped_mm"`), the model under
`torch.compile` unless that fails or `--no-compile`. transformers' DeepseekV3 has no
multi-token-prediction module, so its step does less work than `manifold`'s (MTP 1): the
FLOPs per token of each are printed beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

from train_step import child_row

from manifold.results import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = "experiments/speed_proxies.py:model=moe-1b-active"


def deepseek_config(cfg):
  """A transformers DeepseekV3Config with the fields of a manifold ModelConfig."""
  from transformers import DeepseekV3Config

  rope = (
    {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if "rope_parameters" in inspect.signature(DeepseekV3Config.__init__).parameters
    else {"rope_theta": cfg.rope_theta}
  )
  return DeepseekV3Config(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.d_ff,
    moe_intermediate_size=cfg.moe_d_ff,
    num_hidden_layers=cfg.n_layers,
    num_attention_heads=cfg.n_heads,
    num_key_value_heads=cfg.n_heads,
    n_shared_experts=cfg.n_shared_experts,
    n_routed_experts=cfg.n_routed_experts,
    num_experts_per_tok=cfg.experts_per_token,
    routed_scaling_factor=cfg.routed_scaling_factor,
    n_group=cfg.n_group,
    topk_group=cfg.topk_group,
    norm_topk_prob=cfg.norm_topk_prob,
    first_k_dense_replace=cfg.first_k_dense_replace,
    kv_lora_rank=cfg.kv_lora_rank,
    q_lora_rank=cfg.q_lora_rank or None,
    qk_nope_head_dim=cfg.qk_nope_head_dim,
    qk_rope_head_dim=cfg.qk_rope_head_dim,
    v_head_dim=cfg.v_head_dim,
    max_position_embeddings=cfg.max_seq_len,
    tie_word_embeddings=False,
    use_cache=False,
    **rope,
  )


def measure_torch(batch: int, steps: int, warmup: int, compile_model: bool) -> dict:
  """Times the PyTorch training step in this process."""
  import torch
  import transformers
  from transformers import DeepseekV3ForCausalLM

  from manifold.config import load_config
  from manifold.model import ModelConfig
  from manifold.model.accounting import training_flops_per_token

  cfg = load_config(PROXY)
  model_cfg = ModelConfig.from_mapping(cfg.model)
  seq = cfg.train.seq_len
  torch.manual_seed(0)
  config = deepseek_config(model_cfg)
  config._attn_implementation = "sdpa"
  model = DeepseekV3ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
  model.set_experts_implementation("grouped_mm")
  model.train()
  params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
  forward = torch.compile(model) if compile_model else model
  ids = [torch.randint(0, model_cfg.vocab_size, (batch, seq + 1), device="cuda") for _ in range(2)]

  def step(i):
    loss = forward(input_ids=ids[i % 2][:, :-1], labels=ids[i % 2][:, :-1]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  start = time.perf_counter()
  step(0)
  torch.cuda.synchronize()
  first_s = time.perf_counter() - start
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    loss = step(i)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times[warmup:])
  # the same count as manifold's, without the MTP module transformers lacks
  no_mtp = ModelConfig.from_mapping({**dict(cfg.model), "mtp_depth": 0})
  return {
    "implementation": "PyTorch transformers DeepseekV3ForCausalLM",
    "settings": f"bf16 params, fused AdamW, SDPA, grouped_mm experts, {'torch.compile' if compile_model else 'eager'}",
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "device": torch.cuda.get_device_name(),
    "params_b": params / 1e9,
    "tokens_per_step": batch * seq,
    "step_ms": 1e3 * step_s,
    "tokens_per_s": batch * seq / step_s,
    "gflop_per_token": training_flops_per_token(no_mtp, seq) / 1e9,
    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    "first_step_s": first_s,
    "final_loss": float(loss),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4, help="sequences of 4,096 per step, both sides")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--no-compile", action="store_true", help="PyTorch eager (no torch.compile)")
  parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # internal: the PyTorch row
  args = parser.parse_args()
  if args.torch_only:
    print("ROW " + json.dumps(measure_torch(args.batch, args.steps, args.warmup, not args.no_compile)), flush=True)
    return
  timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
  ours = child_row(
    [
      sys.executable,
      os.path.join(HERE, "train_step.py"),
      "--one",
      "moe-1b-active",
      *timing,
      f"--set=train.batch_size={args.batch}",
    ]
  )
  print(f"manifold: {json.dumps(ours)}", flush=True)
  theirs = child_row(
    [sys.executable, __file__, "--torch-only", "--batch", str(args.batch), *timing]
    + (["--no-compile"] if args.no_compile else [])
  )
  if "error" in theirs and not args.no_compile:  # torch.compile failed: the eager step instead
    print(f"torch.compile failed ({theirs['error']}); PyTorch eager instead", flush=True)
    theirs = child_row([sys.executable, __file__, "--torch-only", "--batch", str(args.batch), *timing, "--no-compile"])
  print(f"pytorch: {json.dumps(theirs)}", flush=True)
  columns = [
    ("implementation", lambda r: r["implementation"]),
    ("params B", lambda r: f"{r['params_b']:.2f}"),
    ("step ms", lambda r: f"{r['step_ms']:.1f}"),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("GFLOP/token", lambda r: f"{r['gflop_per_token']:.2f}"),
    ("peak GiB", lambda r: f"{r['peak_gib']:.1f}"),
  ]
  named = [{**ours, "implementation": "manifold (JAX)"}, {"implementation": "PyTorch", **theirs}]
  print(markdown_table(named, columns), end="")
  if "error" not in ours and "error" not in theirs:
    print(f"\nmanifold / PyTorch tokens/s: x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}")


if __name__ == "__main__":
  main()
