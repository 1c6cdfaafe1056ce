"""The public entry points: `pre` (coefficients + pre-mix), `res_post` (res-mix + post) and
`merge` (one connection's res_post with the next one's pre, fused), each a `jax.custom_vjp`
over the Pallas kernels of the backend in use.

Per token the kernels keep only float32 rows of W = 16 or 32 numbers (coefficients,
normalised logits, r) between the passes; the backward pass recomputes the gates and
the Sinkhorn iterations from those logits in a kernel of its own (on [N, W] rows, in
registers) instead of storing per-layer copies of the n streams. It reads the streams twice:
once for dL/dpre = <dL/dh, x_j>, once to write dL/dx; dL/dphi is one matmul over the tokens.

    h, coeff, xs = pre(x, phi, alpha, bias, spec)   # x [N, n D] -> h [N, D], coeff [N, W]
    out = res_post(xs, y, coeff, spec)              # y = F(norm(h)) [N, D] -> out [N, n D]
    p, q, r = unpack(coeff, n)                  # pre [N, n], post [N, n], res [N, n, n]

A model of connections runs `pre` once, then for each following connection
`h, coeff, xs = merge(xs, y, coeff, phi, alpha, bias, spec)` (the previous res_post and this
pre: the new streams are projected as they are written, so the projection reads no streams),
and `res_post` once at the end.

`pre` also hands the streams on, as `Streams(x)`, and res_post reads them through it. The
handle's cotangent is res_post's dL/d out itself, not the res-mix's part of dL/dx: pre's
backward kernel reads dL/d out and forms res^T dL/d out while it writes dL/dx, so that part
is never written to memory as an [N, n D] array of its own.

`resolve` is the one place that turns `model.mhc_impl` (auto | pallas | xla) into an
implementation for a platform: the kernels' backend, or None for the XLA path
(reference.py). `auto` picks the kernels on GPU and TPU, the XLA path elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp

from kernels.mhc import calls, reference, tpu, triton
from kernels.platform import platform as ambient_platform

IMPLEMENTATIONS = ("auto", "pallas", "xla")
SINKHORNS = ("exp", "softmax_eps")  # the Sinkhorn variants the kernels implement
_NATIVE = {"gpu": "triton", "cuda": "triton", "tpu": "tpu"}  # platform -> kernel backend


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Spec:
  """Static settings of one mHC connection."""

  n: int  # streams
  iters: int  # Sinkhorn t_max
  kind: str  # exp | softmax_eps
  eps: float  # RMS epsilon
  implementation: str = "auto"  # auto | triton | tpu | interpret (the Triton blocks, run on the CPU)
  tiles: tuple[tuple[str, int], ...] = ()  # backend tile overrides (tiles.parse_tiles), e.g. (("block_tokens", 32),)


def resolve(implementation: str, platform: str | None = None) -> str | None:
  """'triton', 'tpu' or 'interpret' (pallas off GPU and TPU) for the kernels, or None for the
  XLA path; `platform` defaults to that of the ambient mesh, else of the default backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"mHC implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "xla":
    return None
  platform = platform or ambient_platform()
  native = _NATIVE.get(platform)
  return native if implementation == "auto" else native or "interpret"


def _backend(spec: Spec) -> calls.Backend:
  name = resolve("pallas") if spec.implementation == "auto" else spec.implementation
  make = tpu.backend if name == "tpu" else triton.backend
  tiles = dict(spec.tiles)
  unknown = set(tiles) - set(inspect.signature(make).parameters)
  if unknown:
    raise ValueError(f"mHC kernel tiles {sorted(unknown)}: the {name} backend does not take them")
  return make(interpret=name == "interpret", **tiles)  # interpret: the Triton blocks on the CPU


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Streams:
  """x [N, n D] as `pre` hands it to `res_post`. Its cotangent is dL/d out of that res_post,
  which `pre`'s backward pass mixes into dL/dx; so take it only from `pre`."""

  x: jax.Array


def unpack(coeff: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """coeff [N, W] -> (pre [N, n], post [N, n], res [N, n_out, n_in])."""
  return coeff[:, :n], coeff[:, n : 2 * n], coeff[:, 2 * n : 2 * n + n * n].reshape(-1, n, n)


def _padded(a: jax.Array, w: int) -> jax.Array:
  return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, w - a.shape[-1])])


def kernel_operands(x, phi, alpha, bias, n: int) -> tuple[jax.Array, jax.Array]:
  """phi [n D, 2n + n^2] and the gates' alpha, bias as the `pre` kernel takes them: phi padded to
  [n D, W] in x's dtype, the gate scale and shift as an [2, W] affine."""
  w = calls.width(n)
  scale, shift = reference.gate_affine(alpha, bias, n)
  affine = jnp.stack([_padded(scale, w), _padded(shift, w)])  # [2, W]
  # In x's dtype: the kernels multiply x (and dL/dz) by phi in that dtype anyway, and every block of
  # tokens reads all of phi, which for bfloat16 x moved twice the bytes of its own x block in float32.
  return _padded(phi.astype(x.dtype), w), affine


def _pre_forward(x, phi, alpha, bias, spec: Spec):
  phi_p, affine = kernel_operands(x, phi, alpha, bias, spec.n)
  h, coeff, logits, rms = calls.pre_forward(
    _backend(spec), x, phi_p, affine, n=spec.n, iters=spec.iters, kind=spec.kind, eps=spec.eps
  )
  return (h, coeff, Streams(x)), (x, phi_p, affine, alpha, bias, coeff, logits, rms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def pre(x, phi, alpha, bias, spec: Spec):
  """x [N, n D], phi [n D, 2n + n^2], alpha [3], bias [2n + n^2] -> (h [N, D], coeff [N, W],
  Streams(x))."""
  return _pre_forward(x, phi, alpha, bias, spec)[0]


def _pre_backward(spec: Spec, saved, cotangents):
  x, phi_p, affine, alpha, bias, coeff, logits, rms = saved
  g_h, g_coeff, g_streams = cotangents  # g_streams.x: dL/d out of the res_post that read the streams
  n, used = spec.n, 2 * spec.n + spec.n * spec.n
  backend = _backend(spec)
  g_pre = calls.pre_backward_reduce(backend, x, g_h, n=n, w=coeff.shape[1])  # <dL/dh, x_j> on pre
  g_a, g_z, scalars = calls.pre_backward_coefficients(
    backend, logits, g_coeff, g_pre, coeff, rms, affine, n=n, nd=x.shape[1], iters=spec.iters, kind=spec.kind
  )
  g_scale = jnp.sum(g_a[:, :used] * logits[:, :used], axis=0)
  g_alpha = jnp.stack([g_scale[:n].sum(), g_scale[n : 2 * n].sum(), g_scale[2 * n :].sum()]).astype(alpha.dtype)
  g_bias = jnp.sum(g_a[:, :used], axis=0).astype(bias.dtype)
  g_x = calls.pre_backward_streams(backend, x, g_h, phi_p, g_z, scalars, g_streams.x.astype(x.dtype), n=n)
  g_phi = jnp.einsum("tm,tw->mw", x, g_z[:, :used].astype(x.dtype), preferred_element_type=jnp.float32)
  return g_x, g_phi, g_alpha, g_bias


pre.defvjp(_pre_forward, _pre_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def res_post(xs: Streams, y, coeff, spec: Spec):
  """Streams(x [N, n D]) from `pre`, y [N, D], coeff [N, W] -> res x + post^T y [N, n D] in x's dtype."""
  return calls.res_post_forward(_backend(spec), xs.x, y, coeff, n=spec.n)


def _res_post_forward(xs, y, coeff, spec: Spec):
  return res_post(xs, y, coeff, spec), (xs.x, y, coeff)


def _res_post_backward(spec: Spec, saved, g):
  x, y, coeff = saved
  g_y, g_coeff = calls.res_post_backward(_backend(spec), x, y, coeff, g, n=spec.n)
  return Streams(g), g_y, g_coeff  # the streams' cotangent: dL/d out, mixed in pre's backward pass


res_post.defvjp(_res_post_forward, _res_post_backward)


def _merge_forward(xs: Streams, y, coeff, phi, alpha, bias, spec: Spec):
  x = xs.x
  phi_p, affine = kernel_operands(x, phi, alpha, bias, spec.n)
  out, h, coeff_next, logits, rms = calls.merge_forward(
    _backend(spec), x, y, coeff, phi_p, affine, n=spec.n, iters=spec.iters, kind=spec.kind, eps=spec.eps
  )
  return (h, coeff_next, Streams(out)), ((x, y, coeff), (out, phi_p, affine, alpha, bias, coeff_next, logits, rms))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def merge(xs: Streams, y, coeff, phi, alpha, bias, spec: Spec):
  """One connection's `res_post` and the next connection's `pre` on its output, with one kernel
  for res_post's mix and pre's projection: Streams(x [N, n D]) and coeff [N, W] of this
  connection, y [N, D] its sub-block's output, phi, alpha, bias of the next -> (h [N, D],
  coeff [N, W], Streams(out [N, n D])) of the next, equal to `pre(res_post(xs, y, coeff), phi,
  alpha, bias)`. out is projected as it is written, so the next projection reads no streams;
  the backward pass is pre's then res_post's. The cotangent of xs is dL/d out, as `res_post`
  gives it."""
  return _merge_forward(xs, y, coeff, phi, alpha, bias, spec)[0]


def _merge_backward(spec: Spec, saved, cotangents):
  res_post_saved, pre_saved = saved
  g_out, g_phi, g_alpha, g_bias = _pre_backward(spec, pre_saved, cotangents)
  g_xs, g_y, g_coeff = _res_post_backward(spec, res_post_saved, g_out)
  return g_xs, g_y, g_coeff, g_phi, g_alpha, g_bias


merge.defvjp(_merge_forward, _merge_backward)
