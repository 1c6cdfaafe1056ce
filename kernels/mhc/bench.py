"""Times the mHC kernels against the jit-compiled reference on the local accelerator.

  PYTHONPATH=src:. python kernels/mhc/bench.py [--tokens 16384,65536] [--dims 2048,4096,7168]

The op is one layer's mixing without its sub-block: (h, out) = (pre-mix of x,
res-mix of x + post^T y) from x [N, n D] and y [N, D], n = 4, bfloat16; forward+backward
also returns dL/dx, dL/dy and the weights' gradients from cotangents of h and out.
Bytes: `kernel bytes` counts what the kernels and their XLA glue read and write (each
stream-sized array 2 n D bytes per token); `minimum` reads every input and writes every
output once. Bandwidth is kernel bytes over time, against the best of three measured copies
(`copy_bandwidths`: on an H200 a device-to-device copy is about 4.2 TB/s, XLA's `a * 2` 2.7).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kernels.mhc import api, reference
from kernels.timing import timed

N_STREAMS = 4


def copy_bandwidths() -> dict[str, float]:
  """Bytes per second (read + write) of three ways to move 2 GiB of bfloat16 through HBM: a
  device-to-device copy of the buffer (`device_put` without aliasing: the runtime's memcpy),
  XLA's `a * 2` (read + write) and `a + b` (two reads + write)."""
  a = jnp.ones((2**30,), jnp.bfloat16)
  b = a + 1
  return {
    "device-to-device copy": 2 * a.nbytes / timed(lambda a: jax.device_put(a, a.sharding, may_alias=False), a),
    "XLA a * 2": 2 * a.nbytes / timed(jax.jit(lambda a: a * 2), a),
    "XLA a + b": 3 * a.nbytes / timed(jax.jit(lambda a, b: a + b), a, b),
  }


def max_relative_error(got, want) -> float:
  """Largest |got - want| over max |want|, across all outputs."""
  return max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (jnp.max(jnp.abs(b)) + 1e-6))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
  )


def layer_fns(n: int, tiles: tuple = ()):
  spec = api.Spec(n=n, iters=20, kind="exp", eps=1e-6, tiles=tiles)
  settings = dict(n=n, iters=20, kind="exp", eps=1e-6)

  def kernel(x, y, phi, alpha, bias):
    h, coeff, xs = api.pre(x, phi, alpha, bias, spec)
    return h, api.res_post(xs, y, coeff, spec)

  def ref(x, y, phi, alpha, bias):
    h, _, post, res = reference.pre(x, phi, alpha, bias, **settings)
    return h, reference.res_post(x, y, post, res)

  return kernel, ref


def forward_backward(fn):
  def run(x, y, phi, alpha, bias, g_h, g_out):
    outs, vjp = jax.vjp(fn, x, y, phi, alpha, bias)
    return outs, vjp((g_h, g_out))

  return jax.jit(run)


def inputs(tokens: int, d: int, n: int):
  keys = jax.random.split(jax.random.key(0), 5)
  w = 2 * n + n * n
  x = jax.random.normal(keys[0], (tokens, n * d), jnp.bfloat16)
  y = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
  phi = 0.02 * jax.random.normal(keys[2], (n * d, w), jnp.float32)
  alpha, bias = jnp.full((3,), 0.01, jnp.float32), jnp.zeros((w,), jnp.float32)
  g_h, g_out = jax.random.normal(keys[3], (tokens, d), jnp.bfloat16), jax.random.normal(keys[4], x.shape, x.dtype)
  return (x, y, phi, alpha, bias), (g_h, g_out)


def sweep_tiles(tokens: int, d: int) -> None:
  """Forward+backward milliseconds for each (block_tokens, chunk, num_warps, num_stages),
  and each setting's largest relative error against the reference's outputs and gradients."""
  primal, cotangents = inputs(tokens, d, N_STREAMS)
  want = forward_backward(layer_fns(N_STREAMS)[1])(*primal, *cotangents)
  results = []
  for bt in (8, 16, 32):
    for chunk in (256, 512):
      for warps in (4, 8):
        for stages in (1, 2, 3):
          tiles = (("block_tokens", bt), ("chunk", chunk), ("num_warps", warps), ("num_stages", stages))
          run = forward_backward(layer_fns(N_STREAMS, tiles)[0])
          try:
            ms = 1e3 * timed(run, *primal, *cotangents, repeats=10)
          except Exception as e:  # noqa: BLE001 -- a tile the compiler rejects is reported and skipped
            print(tiles, "failed:", str(e).splitlines()[0][:100])
            continue
          err = max_relative_error(run(*primal, *cotangents), want)
          results.append((ms, err, tiles))
          print(f"{ms:.3f} ms, max rel. err {err:.1e}", tiles, flush=True)
  for ms, err, tiles in sorted(results)[:5]:
    setting = ",".join(f"{k}={v}" for k, v in tiles)
    print(f"best: {ms:.3f} ms, max rel. err {err:.1e}: --set model.mhc_tiles={setting}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", default="16384,65536")
  parser.add_argument("--dims", default="2048,4096,7168")
  parser.add_argument(
    "--tiles", action="store_true", help="time forward+backward over tile settings at the first shape"
  )
  args = parser.parse_args()
  if args.tiles:
    return sweep_tiles(int(args.tokens.split(",")[0]), int(args.dims.split(",")[0]))
  n, s = N_STREAMS, 2  # bfloat16
  kernel, ref = layer_fns(n)
  bandwidths = copy_bandwidths()
  bandwidth = max(bandwidths.values())  # the baseline: the best the memory was seen to do
  moves = ", ".join(f"{name} {value / 1e12:.2f}" for name, value in bandwidths.items())
  print(
    f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; TB/s: {moves}; baseline {bandwidth / 1e12:.2f}"
  )
  rows = []
  for tokens in (int(t) for t in args.tokens.split(",")):
    for d in (int(v) for v in args.dims.split(",")):
      (x, y, phi, alpha, bias), (g_h, g_out) = inputs(tokens, d, n)
      per_token = {  # bytes per token, in units of D * itemsize
        # (kernels + glue, minimum); pre's forward reads the streams twice (projection, then
        # pre-mix), its backward twice (<dL/dh, x_j>, then dL/dx) and dL/dphi once more
        "forward": (5 * n + 3, 2 * n + 2),
        "forward+backward": (13 * n + 7, 5 * n + 5),
      }
      cases = {
        "forward": (jax.jit(kernel), jax.jit(ref), (x, y, phi, alpha, bias)),
        "forward+backward": (forward_backward(kernel), forward_backward(ref), (x, y, phi, alpha, bias, g_h, g_out)),
      }
      for name, (kernel_fn, ref_fn, fn_args) in cases.items():
        t_kernel = timed(kernel_fn, *fn_args)
        moved, minimum = (units * d * s * tokens for units in per_token[name])
        try:
          t_ref, err = timed(ref_fn, *fn_args), max_relative_error(kernel_fn(*fn_args), ref_fn(*fn_args))
        except jax.errors.JaxRuntimeError as e:  # the float32 reference can exhaust device memory
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          t_ref, err = float("nan"), float("nan")
        rows.append((tokens, d, name, t_ref * 1e3, t_kernel * 1e3, moved / t_kernel / bandwidth, moved / minimum, err))
        print(rows[-1], flush=True)
  print(
    "\n| tokens | D | pass | reference ms | kernels ms | speed-up | HBM bandwidth (of copy) | bytes / minimum | max rel. err |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for tokens, d, name, t_ref, t_k, frac, over, err in rows:
    ref, speedup = ("out of memory", "-") if t_ref != t_ref else (f"{t_ref:.3f}", f"{t_ref / t_k:.2f}x")
    print(f"| {tokens} | {d} | {name} | {ref} | {t_k:.3f} | {speedup} | {frac:.0%} | {over:.2f} | {err:.1e} |")


if __name__ == "__main__":
  main()
