"""Times the mHC kernels against the jit-compiled reference on the local accelerator.

  PYTHONPATH=src:. python kernels/mhc/bench.py [--tokens 16384,65536] [--dims 2048,4096,7168]

The op is one connection of the model's chain without its sub-block: a layer's new streams
out = res x + post^T y and the next layer's coefficients and pre-mix h of out, from x [N, n D],
y [N, D] and the layer's coefficients, n = 4, bfloat16; forward+backward also returns dL/dx,
dL/dy and the weights' gradients from cotangents of out and h. Three ways: `merge` (the
fused kernels the model runs), `res_post` then `pre` (the separate kernels), the reference.
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


def connection_fns(n: int, tiles: tuple = ()):
  """(out, h) from (x, y, post, res, phi, alpha, bias): {"merge": ..., "res_post, pre": ..., "reference": ...}."""
  spec = api.Spec(n=n, iters=20, kind="exp", eps=1e-6, tiles=tiles)
  settings = dict(n=n, iters=20, kind="exp", eps=1e-6)
  w = 2 * n + n * n
  w_padded = 16 if w <= 16 else 32

  def coeff(post, res):
    rows = jnp.concatenate([jnp.zeros_like(post), post, res.reshape(res.shape[0], -1)], axis=1)
    return jnp.pad(rows, ((0, 0), (0, w_padded - w)))

  def merged(x, y, post, res, phi, alpha, bias):
    out, h, _ = api.merge(x, y, coeff(post, res), phi, alpha, bias, spec)
    return out, h

  def separate(x, y, post, res, phi, alpha, bias):
    out = api.res_post(x, y, coeff(post, res), spec)
    h, _, _ = api.pre(out, phi, alpha, bias, spec)
    return out, h

  def ref(x, y, post, res, phi, alpha, bias):
    out = reference.res_post(x, y, post, res)
    return out, reference.pre(out, phi, alpha, bias, **settings)[0]

  return {"merge": merged, "res_post, pre": separate, "reference": ref}


def forward_backward(fn):
  def run(primal, cotangents):
    outs, vjp = jax.vjp(fn, *primal)
    return outs, vjp(cotangents)

  return jax.jit(run)


def inputs(tokens: int, d: int, n: int):
  """((x, y, post, res, phi, alpha, bias), (dL/d out, dL/dh))."""
  keys = jax.random.split(jax.random.key(0), 7)
  w = 2 * n + n * n
  x = jax.random.normal(keys[0], (tokens, n * d), jnp.bfloat16)
  y = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
  post = 2 * jax.nn.sigmoid(jax.random.normal(keys[5], (tokens, n)))
  res = jax.nn.softmax(jax.random.normal(keys[6], (tokens, n, n)), axis=-1)
  phi = 0.02 * jax.random.normal(keys[2], (n * d, w), jnp.float32)
  alpha, bias = jnp.full((3,), 0.01, jnp.float32), jnp.zeros((w,), jnp.float32)
  g_out, g_h = jax.random.normal(keys[4], x.shape, x.dtype), jax.random.normal(keys[3], (tokens, d), jnp.bfloat16)
  return (x, y, post, res, phi, alpha, bias), (g_out, g_h)


# Bytes per token in units of D * itemsize, (kernels + glue, minimum). The minimum reads x, y and
# writes out, h forward; backward it reads x, y, dL/d out, dL/dh and writes dL/dx, dL/dy.
# merge: forward reads x and y twice (projection, then pre-mix) and writes out and h; backward
# reads out twice (<dL/dh, out_j>; dL/dphi), then x, y, dL/d out and dL/dh and writes dL/dx, dL/dy.
# res_post, pre: res_post's pass; pre reads out twice; backward: pre's two passes over out and
# dL/dphi, dL/d out written and read back by res_post's backward pass.
BYTES = {
  "merge": {"forward": lambda n: (3 * n + 3, 2 * n + 2), "forward+backward": lambda n: (8 * n + 7, 5 * n + 5)},
  "res_post, pre": {"forward": lambda n: (4 * n + 2, 2 * n + 2), "forward+backward": lambda n: (12 * n + 6, 5 * n + 5)},
}


def sweep_tiles(tokens: int, d: int) -> None:
  """Milliseconds of `merge` forward and forward+backward for each (block_tokens, chunk,
  num_warps) at 1 stage, and each setting's largest relative error against the reference."""
  primal, cotangents = inputs(tokens, d, N_STREAMS)
  want = forward_backward(connection_fns(N_STREAMS)["reference"])(primal, cotangents)
  results = []
  for bt in (4, 8, 16):
    for chunk in (64, 128, 256):
      for warps in (4, 8):
        tiles = (("block_tokens", bt), ("chunk", chunk), ("num_warps", warps), ("num_stages", 1))
        merged = connection_fns(N_STREAMS, tiles)["merge"]
        run = forward_backward(merged)
        try:
          forward_ms = 1e3 * timed(jax.jit(merged), *primal, repeats=10)
          ms = 1e3 * timed(run, primal, cotangents, repeats=10)
        except Exception as e:  # noqa: BLE001 -- a tile the compiler rejects is reported and skipped
          print(tiles, "failed:", str(e).splitlines()[0][:100])
          continue
        err = max_relative_error(run(primal, cotangents), want)
        results.append((ms, forward_ms, err, tiles))
        print(f"{ms:.3f} ms (forward {forward_ms:.3f}), max rel. err {err:.1e}", tiles, flush=True)
  for ms, forward_ms, err, tiles in sorted(results)[:5]:
    setting = ",".join(f"{k}={v}" for k, v in tiles)
    print(f"best: {ms:.3f} ms (forward {forward_ms:.3f}), max rel. err {err:.1e}: --set model.mhc_tiles={setting}")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", default="16384,65536")
  parser.add_argument("--dims", default="2048,4096,7168")
  parser.add_argument(
    "--tiles", action="store_true", help="time merge's forward+backward over tile settings at the first shape"
  )
  args = parser.parse_args()
  if args.tiles:
    return sweep_tiles(int(args.tokens.split(",")[0]), int(args.dims.split(",")[0]))
  n, s = N_STREAMS, 2  # bfloat16
  fns = connection_fns(n)
  bandwidths = copy_bandwidths()
  bandwidth = max(bandwidths.values())  # the baseline: the best the memory was seen to do
  moves = ", ".join(f"{name} {value / 1e12:.2f}" for name, value in bandwidths.items())
  print(
    f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; TB/s: {moves}; baseline {bandwidth / 1e12:.2f}"
  )
  rows = []
  for tokens in (int(t) for t in args.tokens.split(",")):
    for d in (int(v) for v in args.dims.split(",")):
      primal, cotangents = inputs(tokens, d, n)
      for name in ("forward", "forward+backward"):
        wrap = (lambda f: jax.jit(lambda p, _: f(*p))) if name == "forward" else forward_backward
        ref_fn = wrap(fns["reference"])
        try:
          t_ref, want = timed(ref_fn, primal, cotangents), ref_fn(primal, cotangents)
        except jax.errors.JaxRuntimeError as e:  # the float32 reference can exhaust device memory
          if "RESOURCE_EXHAUSTED" not in str(e):
            raise
          t_ref, want = float("nan"), None
        for kernels in BYTES:
          kernel_fn = wrap(fns[kernels])
          t_kernel = timed(kernel_fn, primal, cotangents)
          moved, minimum = (units * d * s * tokens for units in BYTES[kernels][name](n))
          err = float("nan") if want is None else max_relative_error(kernel_fn(primal, cotangents), want)
          rows.append(
            (tokens, d, name, kernels, t_ref * 1e3, t_kernel * 1e3, moved / t_kernel / bandwidth, moved / minimum, err)
          )
          print(rows[-1], flush=True)
  print(
    "\n| tokens | D | pass | kernels | reference ms | kernels ms | speed-up | HBM bandwidth (of copy) | bytes / minimum | max rel. err |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for tokens, d, name, kernels, t_ref, t_k, frac, over, err in rows:
    ref, speedup = ("out of memory", "-") if t_ref != t_ref else (f"{t_ref:.3f}", f"{t_ref / t_k:.2f}x")
    print(
      f"| {tokens} | {d} | {name} | {kernels} | {ref} | {t_k:.3f} | {speedup} | {frac:.0%} | {over:.2f} | {err:.1e} |"
    )


if __name__ == "__main__":
  main()
