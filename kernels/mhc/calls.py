"""`pallas_call`s of the mHC kernel bodies over a grid of token blocks, for any backend.

A `Backend` (see triton.py, tpu.py) gives each kernel a `Tile`: how many tokens a block
holds, how wide a chunk of a stream is and which compiler parameters apply. Token-major
arrays [N, c] go in blocks of [bt, c] rows; weights are read whole by every block.
Token counts that the block does not divide are padded with zero rows (a copy, for
ragged shapes only) and the padding is dropped from the results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.mhc import bodies

KERNELS = (
  "pre_forward",
  "pre_mix",
  "res_post_forward",
  "res_post_backward",
  "pre_backward_reduce",
  "pre_backward_coefficients",
  "pre_backward_streams",
  "merge_forward",
)


@dataclasses.dataclass(frozen=True)
class Tile:
  block_tokens: int  # bt
  chunk: int  # bd, the widest power of two <= this that divides D is used
  compiler_params: Any = None


@dataclasses.dataclass(frozen=True)
class Backend:
  name: str
  tiles: tuple[Tile, ...]  # one per KERNELS entry
  interpret: bool = False
  mix_in_pre: bool = False  # pre_forward also pre-mixes (else the pre_mix kernel does)

  def tile(self, kernel: str) -> Tile:
    return self.tiles[KERNELS.index(kernel)]


def width(n: int) -> int:
  """Coefficient columns: 2n + n^2 rounded up to a power of two >= 16 (matrix-unit friendly)."""
  w = 2 * n + n * n
  return max(16, 1 << (w - 1).bit_length())


def chunk_width(d: int, preferred: int) -> int:
  bd = preferred
  while d % bd:
    bd //= 2
  return bd


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
  return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _rows(bt: int, cols: int) -> pl.BlockSpec:
  return pl.BlockSpec((bt, cols), lambda i: (i, 0))


def _whole(shape) -> pl.BlockSpec:
  return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _call(backend: Backend, body, inputs, outputs, static: dict):
  """Runs `body` over token blocks of its tile (where `static` holds D as d, the chunk width is
  added as bd); `inputs` are (array, token_major) pairs, `outputs`
  (shape_without_tokens..., dtype) given as (columns, dtype) for token-major results."""
  arrays, token_major = zip(*inputs)
  settings = dict(backend=backend, body=body, token_major=token_major, outputs=tuple(outputs))
  return _blocks(*arrays, **settings, static=tuple(sorted(static.items())))


@functools.partial(jax.jit, static_argnames=("backend", "body", "token_major", "outputs", "static"))
def _blocks(*arrays, backend: Backend, body, token_major, outputs, static):
  """`_call`'s pallas_call, traced and lowered once per kernel, settings and shapes, however many
  layers call it; every call then has the same kernel IR, which XLA compiles once. (Traced at
  each call, the IR carries that call's Python stack, and the backward kernels' differed from
  layer to layer.)"""
  n_tokens = next(a.shape[0] for a, major in zip(arrays, token_major) if major)
  tile = backend.tile(body.__name__)
  bt = tile.block_tokens
  static = dict(static)
  if "d" in static:  # the body walks streams of width d in chunks
    static["bd"] = chunk_width(static["d"], tile.chunk)
  padded = -(-n_tokens // bt) * bt
  args, in_specs = [], []
  for a, major in zip(arrays, token_major):
    args.append(_pad_rows(a, padded) if major else a)
    in_specs.append(_rows(bt, a.shape[1]) if major else _whole(a.shape))
  out_shape = [jax.ShapeDtypeStruct((padded, cols), dtype) for cols, dtype in outputs]
  out_specs = [_rows(bt, cols) for cols, _ in outputs]
  results = pl.pallas_call(
    functools.partial(body, **static),
    grid=(padded // bt,),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=tile.compiler_params,
    interpret=backend.interpret,
    name=f"mhc_{body.__name__}_{backend.name}",
  )(*args)
  return [r[:n_tokens] for r in results]


def pre_forward(backend: Backend, x, phi_p, affine, *, n: int, iters: int, kind: str, eps: float, alone=False):
  """x [N, n D], phi_p [n D, W], affine [2, W] -> h [N, D], coeff / logits [N, W], rms [N, 1]:
  one kernel if the backend mixes in pre_forward, else the projection then `pre_mix`; `alone`:
  the pre_forward kernel only, without h where it does not mix."""
  d, w = x.shape[1] // n, phi_p.shape[1]
  inputs = [(x, True), (phi_p, False), (affine, False)]
  return _projected(backend, bodies.pre_forward, inputs, [], x, d, w, alone, n=n, iters=iters, kind=kind, eps=eps)


def _projected(backend: Backend, body, inputs, streams_out, x, d: int, w: int, alone: bool, **static):
  """Runs a projecting body (`pre_forward`, `merge_forward`) whose first results are
  `streams_out` ((columns, dtype) each), then h [N, D] where the backend pre-mixes in the same
  kernel, the coefficient rows, logits and rms. Where it does not, `pre_mix` mixes the projected
  streams (x, or the body's first result) after it, unless `alone`."""
  mix = backend.mix_in_pre
  rows = [*streams_out] + [(d, x.dtype)] * mix + [(w, jnp.float32), (w, jnp.float32), (1, jnp.float32)]
  results = _call(backend, body, inputs, rows, dict(static, d=d))
  if mix or alone:
    return results
  *streams, coeff, logits, rms = results
  projected = streams[0] if streams else x
  return *streams, pre_mix(backend, projected, coeff, n=static["n"]), coeff, logits, rms


def pre_mix(backend: Backend, x, coeff, *, n: int):
  """x [N, n D], coeff [N, W] -> h = sum_j pre_j x_j [N, D]."""
  d = x.shape[1] // n
  (h,) = _call(backend, bodies.pre_mix, [(x, True), (coeff, True)], [(d, x.dtype)], dict(n=n, d=d))
  return h


def res_post_forward(backend: Backend, x, y, coeff, *, n: int):
  """x [N, n D], y [N, D], coeff [N, W] -> res x + post^T y [N, n D]."""
  d = y.shape[1]
  static = dict(n=n, d=d)
  (out,) = _call(backend, bodies.res_post_forward, [(x, True), (y, True), (coeff, True)], [(n * d, x.dtype)], static)
  return out


def res_post_backward(backend: Backend, x, y, coeff, g, *, n: int):
  """g = dL/d out [N, n D] -> dL/dy [N, D], dL/dcoeff [N, W] (post and res columns)."""
  d = y.shape[1]
  static = dict(n=n, d=d)
  return _call(
    backend,
    bodies.res_post_backward,
    [(x, True), (y, True), (coeff, True), (g, True)],
    [(d, y.dtype), (coeff.shape[1], jnp.float32)],
    static,
  )


def pre_backward_reduce(backend: Backend, x, gh, *, n: int, w: int):
  """-> [N, W] with <dL/dh, x_j> in the pre columns."""
  d = gh.shape[1]
  static = dict(n=n, d=d)
  (g_pre,) = _call(backend, bodies.pre_backward_reduce, [(x, True), (gh, True)], [(w, jnp.float32)], static)
  return g_pre


def pre_backward_coefficients(
  backend: Backend, logits, g_coeff, g_pre, coeff, rms, affine, *, n: int, nd: int, iters: int, kind: str
):
  """dL/dcoeff [N, W] (g_coeff's post and res columns + g_pre's pre columns) -> dL/da, dL/dz and
  the per-token rows of `pre_backward_streams`, each [N, W] (bodies.pre_backward_coefficients)."""
  w = coeff.shape[1]
  return _call(
    backend,
    bodies.pre_backward_coefficients,
    [(logits, True), (g_coeff, True), (g_pre, True), (coeff, True), (rms, True), (affine, False)],
    [(w, jnp.float32)] * 3,
    dict(n=n, nd=nd, iters=iters, kind=kind),
  )


def pre_backward_streams(backend: Backend, x, gh, phi_p, gz, scalars, g, *, n: int):
  """g = dL/d out of the layer's res_post -> dL/dx [N, n D]: the res-mix's, pre-mix's and
  projection's parts (bodies.pre_backward_streams)."""
  d = gh.shape[1]
  static = dict(n=n, d=d)
  (gx,) = _call(
    backend,
    bodies.pre_backward_streams,
    [(x, True), (gh, True), (phi_p, False), (gz, True), (scalars, True), (g, True)],
    [(n * d, x.dtype)],
    static,
  )
  return gx


def merge_forward(
  backend: Backend, x, y, coeff, phi_p, affine, *, n: int, iters: int, kind: str, eps: float, alone=False
):
  """x [N, n D], y [N, D], coeff [N, W] (this connection's), phi_p [n D, W], affine [2, W] (the
  next one's) -> out = res x + post^T y [N, n D], then the next connection's h [N, D], coeff /
  logits [N, W] and rms [N, 1] (bodies.merge_forward); `alone` as `pre_forward`'s."""
  d, w = y.shape[1], phi_p.shape[1]
  inputs = [(x, True), (y, True), (coeff, True), (phi_p, False), (affine, False)]
  settings = dict(n=n, iters=iters, kind=kind, eps=eps)
  return _projected(backend, bodies.merge_forward, inputs, [(n * d, x.dtype)], x, d, w, alone, **settings)
