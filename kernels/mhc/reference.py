"""mHC stream mixing in plain jnp: the XLA path of the model, and the specification the
Pallas kernels are tested against.

Tokens are flattened: x [N, n D] holds a token's n streams back to back (stream j at
columns j D .. j D + D - 1), exactly `[B, T, n, D]` reshaped. One layer is

    r       = 1 / sqrt(mean(x^2) + eps)                 RMS over all n D values, no weight
    logits  = (x @ phi) r                               [N, 2n + R], the division after the matmul
    a       = alpha_part * logits + bias                alpha: one gate each for pre, post, res
    pre     = sigmoid(a[:n])                 (+ 1e-6 with softmax_eps, as DeepSeek-V4)
    post    = 2 sigmoid(a[n:2n])
    res     = Sinkhorn(a[2n:] as [n_in, n_out]) transposed to [n_out, n_in]      mhc: R = n^2
            = (sum_p softmax(a[2n:])_p P_p) transposed, P_p the permutations   mhc-lite: R = n!
    h       = sum_j pre_j x_j                           the sub-block's input [N, D]
    x_next  = res @ x + post^T y                        [N, n D], y = F(norm(h)) [N, D]

All coefficient arithmetic is float32; h and x_next take x's dtype. The Sinkhorn is
`sinkhorn.sinkhorn`: its backward pass recomputes the iterations from the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.mhc.sinkhorn import SINKHORN_EPS, birkhoff_combination, permutation_matrices, sinkhorn


def gate_affine(alpha: jax.Array, bias: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Per-logit scale and shift [2n + R]: alpha[0] on pre, alpha[1] on post, alpha[2] on res."""
  res = bias.shape[0] - 2 * n
  scale = jnp.concatenate([jnp.full((n,), alpha[0]), jnp.full((n,), alpha[1]), jnp.full((res,), alpha[2])])
  return scale.astype(jnp.float32), bias.astype(jnp.float32)


def activate(a: jax.Array, n: int, iters: int, kind: str, lite: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gated logits a [N, 2n + R] -> (pre [N, n], post [N, n], res [N, n_out, n_in]), float32.
  `kind` is the Sinkhorn (exp | log | softmax_eps); `lite`: mHC-lite's combination of permutations."""
  pre = jax.nn.sigmoid(a[:, :n]) + (SINKHORN_EPS if kind == "softmax_eps" else 0.0)
  post = 2.0 * jax.nn.sigmoid(a[:, n : 2 * n])
  if lite:
    res_in_out = birkhoff_combination(a[:, 2 * n :], permutation_matrices(n))
  else:
    res_in_out = sinkhorn(a[:, 2 * n :].reshape(-1, n, n), iters, kind)
  return pre, post, jnp.swapaxes(res_in_out, -1, -2)


def project(x: jax.Array, phi: jax.Array, eps: float) -> jax.Array:
  """`RMSNorm(x) @ phi` as `(x @ phi) / rms(x)`: x [N, m], phi [m, W] -> [N, W], float32."""
  x32 = x.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [N, 1]
  return (x32 @ phi.astype(jnp.float32)) * r


def coefficients(x, phi, alpha, bias, *, n: int, iters: int, kind: str, eps: float, lite: bool = False):
  """x [N, n D], phi [n D, 2n + R] -> (pre [N, n], post [N, n], res [N, n, n]), float32."""
  scale, shift = gate_affine(alpha, bias, n)
  return activate(project(x, phi, eps) * scale + shift, n, iters, kind, lite)


def pre_mix(x: jax.Array, pre: jax.Array) -> jax.Array:
  """x [N, n D], pre [N, n] -> h = sum_j pre_j x_j [N, D] in x's dtype."""
  n = pre.shape[1]
  xs = x.reshape(x.shape[0], n, -1).astype(jnp.float32)
  return jnp.einsum("nj,njd->nd", pre, xs).astype(x.dtype)


def res_post(x: jax.Array, y: jax.Array, post: jax.Array, res: jax.Array) -> jax.Array:
  """x [N, n D], y [N, D], post [N, n], res [N, n_out, n_in] -> res x + post^T y [N, n D]."""
  n = post.shape[1]
  xs = x.reshape(x.shape[0], n, -1).astype(jnp.float32)
  out = jnp.einsum("nkj,njd->nkd", res, xs) + post[:, :, None] * y.astype(jnp.float32)[:, None, :]
  return out.reshape(x.shape).astype(x.dtype)


def pre(x, phi, alpha, bias, *, n: int, iters: int, kind: str, eps: float):
  """The fused first half: (h [N, D], pre [N, n], post [N, n], res [N, n, n])."""
  p, q, r = coefficients(x, phi, alpha, bias, n=n, iters=iters, kind=kind, eps=eps)
  return pre_mix(x, p), p, q, r
