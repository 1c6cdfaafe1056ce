"""Times the grouped-matmul implementations on the local accelerator, against a dense
matmul doing the same FLOPs.

  PYTHONPATH=src:. python kernels/grouped_matmul/bench.py [--tokens 16384] [--impls xla,triton,mosaic_gpu,tokamax]
  PYTHONPATH=src:. python kernels/grouped_matmul/bench.py --sweep     # Triton tile sizes too

Shapes are one MoE layer of experiments/speed_proxies.py's moe-1b-active (D 2048, 32
experts of width 896, 6 per token): rows = tokens x 6, sorted into 32 groups of random
(roughly even) sizes; bfloat16. `forward` is y = gmm(x, w); `fwd+bwd` adds dx and dw.
TFLOP/s count the useful FLOPs only (2 M K N forward, 3x that with the gradients).
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp

from kernels.grouped_matmul import api, triton
from kernels.timing import timed

GROUPS, TOP_K, D, F = 32, 6, 2048, 896
SHAPES = {"gate/up  [R, D] x [G, D, 2F]": (D, 2 * F), "down     [R, F] x [G, F, D]": (F, D)}


def operands(rows: int, k: int, n: int):
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
  w = (jax.random.normal(keys[1], (GROUPS, k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
  dy = jax.random.normal(keys[2], (rows, n), jnp.bfloat16)
  sizes = jnp.bincount(jax.random.randint(keys[3], (rows,), 0, GROUPS), length=GROUPS).astype(jnp.int32)
  return x, w, dy, sizes


def measure(impl: str, rows: int, k: int, n: int) -> tuple[float, float, float]:
  """(forward s, forward + backward s, max relative error of y against xla)."""
  x, w, dy, sizes = operands(rows, k, n)
  forward = jax.jit(lambda x, w: api.gmm(x, w, sizes, impl))
  both = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(api.gmm(x, w, sizes, impl), dy).real, argnums=(0, 1)))
  want = api.gmm(x, w, sizes, "xla").astype(jnp.float32)
  err = float(jnp.max(jnp.abs(forward(x, w).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
  return timed(forward, x, w), timed(both, x, w), err


def dense_seconds(rows: int, k: int, n: int) -> tuple[float, float]:
  """A [rows, k] x [k, n] matmul: forward, and forward + both gradients."""
  x, w, dy, _ = operands(rows, k, n)
  w0 = w[0]
  both = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(x @ w, dy).real, argnums=(0, 1)))
  return timed(jax.jit(lambda x, w: x @ w), x, w0), timed(both, x, w0)


def sweep(rows: int) -> None:
  """The Triton kernels over tile sizes on the gate/up shape: gmm (forward; the input
  gradient has the same form) and tgmm (weight gradient). Tiles: rows, K, N."""
  x, w, dy, sizes = operands(rows, D, 2 * F)
  flops = 2 * rows * D * 2 * F
  for kernel, a, b in (("gmm", x, w), ("tgmm", x, dy)):
    for bm, bk, bn, warps, stages in itertools.product((64, 128), (32, 64), (128, 256), (4, 8), (3, 4)):
      tiles = {"block_m": bm, "block_k": bk, "block_n": bn, "num_warps": warps, "num_stages": stages}
      label = f"{kernel} " + " ".join(f"{k.split('_')[-1]} {v}" for k, v in tiles.items())
      try:
        seconds = timed(functools.partial(getattr(triton, kernel), **tiles), a, b, sizes)
        print(f"{label}: {flops / seconds / 1e12:.0f} TFLOP/s", flush=True)
      except Exception as e:  # noqa: BLE001 - tiles that do not fit shared memory are reported, not fatal
        print(f"{label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (rows = tokens x 6)")
  parser.add_argument("--impls", default="xla,triton,mosaic_gpu,tokamax")
  parser.add_argument("--sweep", action="store_true", help="also time Triton tile sizes")
  args = parser.parse_args()
  rows = args.tokens * TOP_K
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}; rows {rows:,}, {GROUPS} groups, bfloat16")
  print("| shape | implementation | forward ms | TFLOP/s | x dense | fwd+bwd ms | TFLOP/s | x dense | max rel err |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for label, (k, n) in SHAPES.items():
    flops = 2 * rows * k * n
    fwd0, both0 = dense_seconds(rows, k, n)
    print(
      f"| {label} | dense matmul, same FLOPs | {1e3 * fwd0:.2f} | {flops / fwd0 / 1e12:.0f} | 1.00 "
      f"| {1e3 * both0:.2f} | {3 * flops / both0 / 1e12:.0f} | 1.00 | - |",
      flush=True,
    )
    for impl in args.impls.split(","):
      try:
        fwd, both, err = measure(impl, rows, k, n)
      except Exception as e:  # noqa: BLE001 - an implementation this GPU lacks is reported, not fatal
        print(f"| {label} | {impl} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |", flush=True)
        continue
      print(
        f"| {label} | {impl} | {1e3 * fwd:.2f} | {flops / fwd / 1e12:.0f} | {fwd0 / fwd:.2f} "
        f"| {1e3 * both:.2f} | {3 * flops / both / 1e12:.0f} | {both0 / both:.2f} | {err:.1e} |",
        flush=True,
      )
  if args.sweep:
    sweep(rows)


if __name__ == "__main__":
  main()
