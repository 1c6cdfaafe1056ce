"""GPU time of one mHC layer's forward+backward through the Pallas kernels, kernel by kernel,
from a profiler trace: what the device spends, without the host's dispatch and the gaps between
launches that wall-clock timing of one layer (`kernels/mhc/bench.py`) includes.

  PYTHONPATH=src:. python benchmarks/mhc_profile.py [--tokens 16384] [--dim 2048]

The op is `kernels/mhc/bench.py`'s (n = 4, bfloat16, exp Sinkhorn, t_max = 20). Each Pallas
kernel's rate is its traced bytes (operands and results, `bench.kernel_bytes`) over its GPU
time; the other kernels (XLA's dL/dphi matmul and row ops) are listed by name.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
from kernels.mhc import bench
from train_step import profile


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--dim", type=int, default=2048, help="D, the width of one stream")
  parser.add_argument("--steps", type=int, default=10, help="traced layer calls")
  parser.add_argument("--form", default="merged", choices=bench.FORMS, help="the connection as bench.layer_fns runs it")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    raise SystemExit(f"mhc_profile.py times the GPU kernels; JAX sees no GPU here ({jax.default_backend()})")
  n = bench.N_STREAMS
  layer = bench.forward_backward(bench.layer_fns(n, form=args.form)[0])
  primal, cotangents = bench.inputs(args.tokens, args.dim, n)
  compiled = layer.lower(*primal, *cotangents).compile()
  run = lambda: jax.block_until_ready(compiled(*primal, *cotangents))  # noqa: E731
  for _ in range(20):  # warm the clocks
    run()
  result = profile(run, tempfile.mkdtemp(), compiled.as_text(), steps=args.steps)
  moved = bench.kernel_bytes(layer, *primal, *cotangents)
  shape = f"{args.tokens} tokens x D = {args.dim}, n = {n}, {args.form}"
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}: {shape}")
  print(f"GPU time of the layer's forward+backward: {result['gpu_ms_per_step']:.3f} ms\n")
  print("| kernel | ms | GB read + written | TB/s |")
  print("| --- | --- | --- | --- |")
  for name, ms in result["top_kernels"]:
    rate = f"{moved[name] / 1e9:.3f} | {moved[name] / ms / 1e9:.2f}" if name in moved else "- | -"
    print(f"| {name} | {ms:.3f} | {rate} |")


if __name__ == "__main__":
  main()
