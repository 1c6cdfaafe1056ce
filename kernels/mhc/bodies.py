"""The Pallas kernel bodies, shared by the GPU (Triton) and TPU (Mosaic) wrappers.

Every body sees one block of `bt` tokens: refs of x [bt, n D], y / h [bt, D] and the
per-token coefficient rows [bt, W] (W = 2n + n^2 padded to a power of two; columns:
pre 0..n-1, post n..2n-1, res 2n + k n + j for output k and input j). The streams
are walked in chunks of `bd` columns, so a chunk is a 2-D [bt, bd] tile on both
backends. Per-token scalars are [bt, 1] columns; the n x n mixing lives in n^2 such
columns, so the Sinkhorn iterations are elementwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.mhc.sinkhorn import SINKHORN_EPS, iterate, iterate_backward


def _lanes(shape) -> jax.Array:
  return jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def column(a: jax.Array, i: int) -> jax.Array:
  """Column i of a [bt, W] value as [bt, 1] (a masked row sum: no lane slicing needed)."""
  return jnp.sum(jnp.where(_lanes(a.shape) == i, a, 0.0), axis=1, keepdims=True)


def assemble(columns: dict[int, jax.Array], shape) -> jax.Array:
  """[bt, W] with column i = columns[i] ([bt, 1]) and zeros elsewhere."""
  lanes, out = _lanes(shape), jnp.zeros(shape, jnp.float32)
  for i, value in columns.items():
    out = jnp.where(lanes == i, value, out)
  return out


def _chunks(d: int, bd: int, body, carry):
  return jax.lax.fori_loop(0, d // bd, body, carry)


def _tile(ref, stream: int, d: int, chunk, bd: int):
  return ref[:, pl_ds(stream * d + chunk * bd, bd)]


def pl_ds(start, size):
  return pl.ds(pl.multiple_of(start, size), size)


def _dot(a, b, contract_b: int = 0):
  """a [bt, k] times b (contracting b's axis `contract_b`), operands in a's dtype, float32
  result; float32 operands multiply exactly (no TF32)."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((1,), (contract_b,)), ((), ()))
  return jax.lax.dot_general(a, b.astype(a.dtype), dims, precision=precision, preferred_element_type=jnp.float32)


def _sigmoid(v):
  return 1.0 / (1.0 + jnp.exp(-v))


def _sinkhorn_logits(a, n: int):
  """The Sinkhorn's logits entry by entry, [j][k] (input j, output k), from a [bt, W]."""
  return [[column(a, 2 * n + j * n + k) for k in range(n)] for j in range(n)]


def _coefficients(a, n: int, iters: int, kind: str):
  """Gated logits a [bt, W] -> coefficient rows [bt, W] (pre, post, res as documented above)."""
  out = {i: _sigmoid(column(a, i)) + (SINKHORN_EPS if kind == "softmax_eps" else 0.0) for i in range(n)}
  out.update({n + k: 2.0 * _sigmoid(column(a, n + k)) for k in range(n)})
  m = iterate(_sinkhorn_logits(a, n), iters, kind)
  out.update({2 * n + k * n + j: m[j][k] for j in range(n) for k in range(n)})  # res[k, j] = M[j, k]
  return assemble(out, a.shape)


def _coefficients_backward(a, g, n: int, iters: int, kind: str):
  """dL/da [bt, W] from the gated logits a and dL/dcoeff g [bt, W]: `_coefficients` reversed,
  the Sinkhorn's iterations recomputed from a (`iterate_backward`)."""
  gates = {i: _sigmoid(column(a, i)) for i in range(2 * n)}
  out = {i: column(g, i) * gates[i] * (1.0 - gates[i]) * (1.0 if i < n else 2.0) for i in range(2 * n)}
  g_m = [[column(g, 2 * n + k * n + j) for k in range(n)] for j in range(n)]
  g_logits = iterate_backward(_sinkhorn_logits(a, n), g_m, iters, kind)
  out.update({2 * n + j * n + k: g_logits[j][k] for j in range(n) for k in range(n)})
  return assemble(out, a.shape)


def pre_forward(x_ref, phi_ref, affine_ref, *out_refs, n, d, bd, iters, kind, eps):
  """The coefficient rows, the normalised logits (x phi) r and r, which the backward pass starts
  from; out_refs = (coeff, logits, rms), or (h, coeff, logits, rms) to pre-mix here too (the
  TPU, whose block holds its whole rows in VMEM, so the second pass reads no HBM). On the GPU
  `pre_mix` is a kernel of its own: its per-token columns then come from memory rather than from
  the projection's matrix-unit layout, and it streams x without the projection's registers."""
  *h_ref, coeff_ref, logits_ref, rms_ref = out_refs
  z, ss = _zero_projection(coeff_ref.shape)
  for j in range(n):

    def project(c, carry, j=j):
      return _project(_tile(x_ref, j, d, c, bd), phi_ref, j, d, c, bd, *carry)

    z, ss = _chunks(d, bd, project, (z, ss))
  settings = dict(n=n, d=d, iters=iters, kind=kind, eps=eps)
  coeff = _finish_coefficients(z, ss, affine_ref, coeff_ref, logits_ref, rms_ref, **settings)
  if h_ref:
    _mix(x_ref, coeff, h_ref[0], n=n, d=d, bd=bd)


def _zero_projection(shape) -> tuple[jax.Array, jax.Array]:
  """z [bt, W] and the sum of squares [bt, 1], float32 zeros."""
  return jnp.zeros(shape, jnp.float32), jnp.zeros((shape[0], 1), jnp.float32)


def _project(xc, phi_ref, j, d, c, bd, z, ss):
  """(z, ss) plus stream j's chunk c, xc [bt, bd] in the streams' dtype: z += xc phi_j,c and
  ss += sum xc^2."""
  x32 = xc.astype(jnp.float32)
  return z + _dot(xc, phi_ref[pl_ds(j * d + c * bd, bd), :]), ss + jnp.sum(x32 * x32, 1, keepdims=True)


def _finish_coefficients(z, ss, affine_ref, coeff_ref, logits_ref, rms_ref, *, n, d, iters, kind, eps):
  """From the raw projection z [bt, W] and the sum of squares [bt, 1] of a block's n D-wide rows:
  writes the coefficient rows, the logits z r and r = rsqrt(ss / (n D) + eps); returns the rows."""
  r = jax.lax.rsqrt(ss / (n * d) + eps)
  logits = z * r
  coeff = _coefficients(logits * affine_ref[0:1, :] + affine_ref[1:2, :], n, iters, kind)
  coeff_ref[...], logits_ref[...], rms_ref[...] = coeff, logits, r
  return coeff


def pre_mix(x_ref, coeff_ref, h_ref, *, n, d, bd):
  """h = sum_j pre_j x_j from the coefficient rows `pre_forward` wrote."""
  _mix(x_ref, coeff_ref[...], h_ref, n=n, d=d, bd=bd)


def _mix(x_ref, coeff, h_ref, *, n, d, bd):
  pre = [column(coeff, j) for j in range(n)]

  def step(c, _):
    h = functools.reduce(jnp.add, [pre[j] * _tile(x_ref, j, d, c, bd).astype(jnp.float32) for j in range(n)])
    h_ref[:, pl_ds(c * bd, bd)] = h.astype(h_ref.dtype)
    return 0

  _chunks(d, bd, step, 0)


def res_post_forward(x_ref, y_ref, coeff_ref, out_ref, *, n, d, bd):
  """out_k = sum_j res[k, j] x_j + post_k y, written once."""
  post, res = _post_res(coeff_ref[...], n)

  def mix(c, _):
    xs, y = _stream_tiles(x_ref, y_ref, c, n=n, d=d, bd=bd)
    for k in range(n):
      out_ref[:, pl_ds(k * d + c * bd, bd)] = _new_stream(xs, y, post, res, k).astype(out_ref.dtype)
    return 0

  _chunks(d, bd, mix, 0)


def merge_forward(x_ref, y_ref, coeff_ref, phi_ref, affine_ref, out_ref, *out_refs, n, d, bd, iters, kind, eps):
  """`res_post_forward` of one connection and `pre_forward` of the next on its output: out is
  written once and projected from the registers as it is written (as stored, in out's dtype), so
  the next connection's projection reads no streams. out_refs as `pre_forward`'s: (coeff, logits,
  rms) of the next connection, or (h, ...) to pre-mix here too (TPU: out's block is in VMEM)."""
  *h_ref, coeff_next_ref, logits_ref, rms_ref = out_refs
  post, res = _post_res(coeff_ref[...], n)

  def step(c, carry):
    xs, y = _stream_tiles(x_ref, y_ref, c, n=n, d=d, bd=bd)
    for k in range(n):
      out = _new_stream(xs, y, post, res, k).astype(out_ref.dtype)
      out_ref[:, pl_ds(k * d + c * bd, bd)] = out
      carry = _project(out, phi_ref, k, d, c, bd, *carry)
    return carry

  z, ss = _chunks(d, bd, step, _zero_projection(coeff_next_ref.shape))
  settings = dict(n=n, d=d, iters=iters, kind=kind, eps=eps)
  coeff = _finish_coefficients(z, ss, affine_ref, coeff_next_ref, logits_ref, rms_ref, **settings)
  if h_ref:
    _mix(out_ref, coeff, h_ref[0], n=n, d=d, bd=bd)


def _stream_tiles(x_ref, y_ref, c, *, n, d, bd):
  """Chunk c of the n streams and of y: float32 tiles [bt, bd]."""
  xs = [_tile(x_ref, j, d, c, bd).astype(jnp.float32) for j in range(n)]
  return xs, y_ref[:, pl_ds(c * bd, bd)].astype(jnp.float32)


def _post_res(coeff, n: int):
  """post [k] and res [k][j] as [bt, 1] columns of the coefficient rows [bt, W]."""
  post = [column(coeff, n + k) for k in range(n)]
  return post, [[column(coeff, 2 * n + k * n + j) for j in range(n)] for k in range(n)]


def _new_stream(xs, y, post, res, k: int):
  """out_k = sum_j res[k, j] x_j + post_k y on one chunk's float32 tiles [bt, bd]."""
  return functools.reduce(jnp.add, [res[k][j] * xs[j] for j in range(len(xs))]) + post[k] * y


def res_post_backward(x_ref, y_ref, coeff_ref, g_ref, gy_ref, gcoeff_ref, *, n, d, bd):
  """From g = dL/d out: g_y = sum_k post_k g_k, and the per-token g_res[k, j] = <g_k, x_j>,
  g_post_k = <g_k, y> in the coefficient columns. dL/dx (res^T g) is left to
  `pre_backward_streams`, which reads g anyway."""
  coeff = coeff_ref[...]
  post = [column(coeff, n + k) for k in range(n)]
  bt = coeff.shape[0]

  def step(c, acc):
    g_res, g_post = acc
    xs = [_tile(x_ref, j, d, c, bd).astype(jnp.float32) for j in range(n)]
    gs = [_tile(g_ref, k, d, c, bd).astype(jnp.float32) for k in range(n)]
    y = y_ref[:, pl_ds(c * bd, bd)].astype(jnp.float32)
    gy = functools.reduce(jnp.add, [post[k] * gs[k] for k in range(n)])
    gy_ref[:, pl_ds(c * bd, bd)] = gy.astype(gy_ref.dtype)
    g_res = tuple(g_res[k * n + j] + jnp.sum(gs[k] * xs[j], 1, keepdims=True) for k in range(n) for j in range(n))
    g_post = tuple(g_post[k] + jnp.sum(gs[k] * y, 1, keepdims=True) for k in range(n))
    return g_res, g_post

  zero = jnp.zeros((bt, 1), jnp.float32)
  g_res, g_post = _chunks(d, bd, step, ((zero,) * (n * n), (zero,) * n))
  columns = {n + k: g_post[k] for k in range(n)}
  columns.update({2 * n + i: g_res[i] for i in range(n * n)})
  gcoeff_ref[...] = assemble(columns, coeff.shape)


def pre_backward_reduce(x_ref, gh_ref, gpre_ref, *, n, d, bd):
  """g_pre_j = <dL/dh, x_j> per token, in the pre columns of a [bt, W] row."""
  bt, width = gpre_ref.shape

  def step(c, acc):
    gh = gh_ref[:, pl_ds(c * bd, bd)].astype(jnp.float32)
    return tuple(
      acc[j] + jnp.sum(gh * _tile(x_ref, j, d, c, bd).astype(jnp.float32), 1, keepdims=True) for j in range(n)
    )

  acc = _chunks(d, bd, step, (jnp.zeros((bt, 1), jnp.float32),) * n)
  gpre_ref[...] = assemble(dict(enumerate(acc)), (bt, width))


def pre_backward_coefficients(
  logits_ref, g_ref, g_pre_ref, coeff_ref, rms_ref, affine_ref, g_a_ref, g_z_ref, scalars_ref, *, n, nd, iters, kind
):
  """From dL/dcoeff (g: post and res columns, g_pre: pre columns) to the gated logits' dL/da,
  dL/dz for z = x phi (the raw projection; logits = z r) and the rows `pre_backward_streams`
  takes: pre in columns 0..n-1, c = -<dL/dlogits, logits> r^2 / (n D) in column n, res[k, j]
  in column n + 1 + k n + j. The gates and the Sinkhorn are recomputed from the logits."""
  logits, r, scale = logits_ref[...], rms_ref[...], affine_ref[0:1, :]
  g_a = _coefficients_backward(logits * scale + affine_ref[1:2, :], g_ref[...] + g_pre_ref[...], n, iters, kind)
  g_logits = g_a * scale
  g_a_ref[...], g_z_ref[...] = g_a, g_logits * r
  coeff = coeff_ref[...]
  scalars = {j: column(coeff, j) for j in range(n)}
  scalars[n] = -jnp.sum(g_logits * logits, 1, keepdims=True) * r * r / nd
  scalars.update({n + 1 + i: column(coeff, 2 * n + i) for i in range(n * n)})
  scalars_ref[...] = assemble(scalars, coeff.shape)


def pre_backward_streams(x_ref, gh_ref, phi_ref, gz_ref, scalars_ref, g_ref, gx_ref, *, n, d, bd):
  """dL/dx_j = sum_k res[k, j] g_k + pre_j dL/dh + (dL/dz) phi_j^T + c x_j, with g = dL/d out of
  the layer's res_post, z = x phi the raw projection and c the per-token RMS term; `scalars`
  holds pre in columns 0..n-1, c in column n and res[k, j] in column n + 1 + k n + j. The
  per-token columns are read once per block; each chunk loads its n tiles of g once, then writes
  its n tiles of dL/dx."""
  scalars, gz = scalars_ref[...], gz_ref[...].astype(x_ref.dtype)
  pre = [column(scalars, j) for j in range(n)]
  c_rms = column(scalars, n)
  res = [[column(scalars, n + 1 + k * n + j) for j in range(n)] for k in range(n)]

  def step(c, _):
    gh = gh_ref[:, pl_ds(c * bd, bd)].astype(jnp.float32)
    g = [_tile(g_ref, k, d, c, bd).astype(jnp.float32) for k in range(n)]
    for j in range(n):
      x = _tile(x_ref, j, d, c, bd).astype(jnp.float32)
      back = _dot(gz, phi_ref[pl_ds(j * d + c * bd, bd), :], contract_b=1)  # [bt, bd]
      mixed = functools.reduce(jnp.add, [res[k][j] * g[k] for k in range(n)])
      # the projection's part last: it comes in the matrix unit's layout, and one conversion of
      # the sum to the store's layout is cheaper than converting the other parts to it
      gx_ref[:, pl_ds(j * d + c * bd, bd)] = ((mixed + pre[j] * gh + c_rms * x) + back).astype(gx_ref.dtype)
    return 0

  _chunks(d, bd, step, 0)
