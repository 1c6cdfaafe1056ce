"""Activation memory per layer of the training step, with and without the mHC kernels,
from XLA's memory analysis of the step AOT-compiled for a v5p-8 slice (4 chips, data
parallel; per-chip bytes; `make libtpu`).

  PYTHONPATH=src:. python benchmarks/mhc_memory.py

Per-layer bytes are the temporaries of an 8-block model minus those of a 4-block model,
over 4 blocks of two layers each (attention and FFN), so fixed costs (logits, optimizer
scratch) cancel. The bound is the plain residual's per-layer bytes plus one [B, T, n, D]
tensor.
"""

from __future__ import annotations

import jax

from manifold.aot import compile_train_step, parse_slice
from manifold.config import load_config

OVERRIDES = [
  "--config.model.d_model=1024",
  "--config.model.n_heads=8",
  "--config.model.vocab_size=512",
  "--config.model.max_seq_len=1024",
  "--config.model.dtype=bfloat16",
  "--config.model.mtp_depth=0",
  "--config.train.batch_size=32",
  "--config.train.seq_len=1024",
  "--config.mesh.data=-1",
]
CHIPS = 4
RUNS = {
  "plain": ["--config.model.residual=plain"],
  "mhc, kernels": ["--config.model.residual=mhc", "--config.model.mhc_impl=auto"],
  "mhc, xla": ["--config.model.residual=mhc", "--config.model.mhc_impl=xla"],
}


def temporaries(extra: list[str], layers: int) -> int:
  cfg = load_config("experiments/quickstart.py", OVERRIDES + extra + [f"--config.model.n_layers={layers}"])
  return compile_train_step(cfg, parse_slice("v5p-8")).temp_bytes


def main() -> None:
  jax.config.update("jax_platforms", "cpu")
  cfg = load_config("experiments/quickstart.py", OVERRIDES)
  m, t = cfg.model, cfg.train
  batch = t.batch_size // CHIPS  # per chip
  stream_tensor = batch * t.seq_len * m.streams * m.d_model * 2  # one [B, T, n, D] bfloat16 tensor
  per_layer = {name: (temporaries(extra, 8) - temporaries(extra, 4)) / 8 for name, extra in RUNS.items()}
  bound = per_layer["plain"] + stream_tensor
  print(
    f"per chip: B={batch} T={t.seq_len} n={m.streams} D={m.d_model} bfloat16; one [B, T, n, D] = {stream_tensor / 2**20:.0f} MiB"
  )
  print("| residual | activation MiB per layer | within plain + one [B, T, n, D] |")
  print("| --- | --- | --- |")
  for name, value in per_layer.items():
    print(f"| {name} | {value / 2**20:.1f} | {'yes' if value <= bound else 'no'} |")


if __name__ == "__main__":
  main()
