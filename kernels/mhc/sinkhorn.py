"""Projections of n x n logits onto (or near) the Birkhoff polytope of doubly stochastic matrices.

All take logits [..., n, n] and return float32 matrices M [..., n, n] in the layout
`M[j, k]` = weight of input stream j in output stream k, so each iteration normalises
the last axis (over outputs), then the second-to-last (over inputs).

`SINKHORN` holds the definitions, which JAX differentiates through every iteration.
`sinkhorn` computes the same matrices for the mHC layers: `iterate` holds the n^2
entries as separate arrays, so every step is elementwise (the Pallas kernels run it on
[bt, 1] columns), and the backward pass keeps only the logits: it reruns the
iterations, keeping each one's row and column sums, then walks them in reverse,
rebuilding each iteration's input from its output and those sums.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

SINKHORN_EPS = 1e-6  # the DeepSeek-V4 `hc_eps`
LOG_RANGE = 40.0  # exp variant: entries below e^-40 of their row's max are raised to it (see sinkhorn_exp)

Entries = tuple[tuple[jax.Array, ...], ...]  # m[j][k]: entry (j, k) of every matrix, all of one shape


def sinkhorn_exp(logits: jax.Array, iters: int) -> jax.Array:
  """The mHC paper: start from exp(logits), then `iters` alternating row/column normalisations.

  Shifting each row by its max before exp changes nothing (the first step normalises rows)
  and keeps large logits finite. Entries more than 40 nats below their row's max (a ratio
  beyond 1e17) are raised to e^-40, so no column sum underflows to zero and gradients stay
  finite at any logit scale; below that range the result is exactly the paper's.
  """
  x = logits.astype(jnp.float32)
  m = jnp.exp(jnp.maximum(x - jnp.max(x, axis=-1, keepdims=True), -LOG_RANGE))
  for _ in range(iters):
    m = m / jnp.sum(m, axis=-1, keepdims=True)
    m = m / jnp.sum(m, axis=-2, keepdims=True)
  return m


def sinkhorn_log(logits: jax.Array, iters: int) -> jax.Array:
  """`sinkhorn_exp` computed in the log domain (logsumexp): the same matrix, stable at any scale."""
  log_m = logits.astype(jnp.float32)
  for _ in range(iters):
    log_m = log_m - jax.nn.logsumexp(log_m, axis=-1, keepdims=True)
    log_m = log_m - jax.nn.logsumexp(log_m, axis=-2, keepdims=True)
  return jnp.exp(log_m)


def sinkhorn_softmax_eps(logits: jax.Array, iters: int, eps: float = SINKHORN_EPS) -> jax.Array:
  """DeepSeek-V4: `softmax(logits, -1) + eps`, one column normalisation, then `iters - 1`
  alternating row/column normalisations, each sum padded by `eps`."""
  m = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
  m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
  return m


SINKHORN = {"exp": sinkhorn_exp, "log": sinkhorn_log, "softmax_eps": sinkhorn_softmax_eps}


def _sum(values) -> jax.Array:
  return functools.reduce(jnp.add, values)


def _softmax(row: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  top = functools.reduce(jnp.maximum, row)
  e = [jnp.exp(v - top) for v in row]
  total = _sum(e)
  return tuple(v / total for v in e)


def _start(logits: Entries, kind: str) -> Entries:
  """The positive matrix the iterations start from: exp of the row-shifted logits (exp), or
  their row softmax + eps (softmax_eps)."""
  if kind == "softmax_eps":
    return tuple(tuple(p + SINKHORN_EPS for p in _softmax(row)) for row in logits)
  tops = [functools.reduce(jnp.maximum, row) for row in logits]
  return tuple(tuple(jnp.exp(jnp.maximum(v - top, -LOG_RANGE)) for v in row) for row, top in zip(logits, tops))


def _rows(m: Entries, eps: float) -> tuple[Entries, tuple[jax.Array, ...]]:
  """Each row divided by its sum + eps (times its reciprocal: n divisions, not n^2); also
  returns those divisors."""
  sums = tuple(_sum(row) + eps for row in m)
  return tuple(tuple(v * (1.0 / s) for v in row) for row, s in zip(m, sums)), sums


def _cols(m: Entries, eps: float) -> tuple[Entries, tuple[jax.Array, ...]]:
  """Each column divided by its sum + eps; also returns those divisors."""
  sums = tuple(_sum(column) + eps for column in zip(*m))
  inverses = [1.0 / s for s in sums]
  return tuple(tuple(v * i for v, i in zip(row, inverses)) for row in m), sums


def _rows_backward(out: Entries, g: Entries, sums) -> Entries:
  """Cotangent of `_rows`' input from that of its output `out = m / sums`."""
  dots = [_sum(gv * v for gv, v in zip(g_row, row)) for g_row, row in zip(g, out)]
  return tuple(tuple((gv - d) / s for gv in g_row) for g_row, d, s in zip(g, dots, sums))


def _cols_backward(out: Entries, g: Entries, sums) -> Entries:
  """Cotangent of `_cols`' input from that of its output `out = m / sums`."""
  dots = [_sum(gv * v for gv, v in zip(g_col, col)) for g_col, col in zip(zip(*g), zip(*out))]
  return tuple(tuple((gv - d) / s for gv, d, s in zip(g_row, dots, sums)) for g_row in g)


def _eps(kind: str) -> float:
  return SINKHORN_EPS if kind == "softmax_eps" else 0.0


def iterate(logits: Entries, iters: int, kind: str) -> Entries:
  """`SINKHORN[kind]` (exp or softmax_eps) entry by entry: logits[j][k] -> M[j][k]."""
  eps, m = _eps(kind), _start(logits, kind)
  if kind == "softmax_eps":
    m, iters = _cols(m, eps)[0], iters - 1
  return jax.lax.fori_loop(0, iters, lambda _, m: _cols(_rows(m, eps)[0], eps)[0], m)


def _entries(a: jax.Array) -> Entries:
  """[..., n, n] -> m[j][k], each [N] (the leading axes flattened)."""
  n = a.shape[-1]
  columns = a.reshape(-1, n * n).astype(jnp.float32).T  # [n n, N]
  return tuple(tuple(columns[j * n + k] for k in range(n)) for j in range(n))


def _stacked(m: Entries, shape) -> jax.Array:
  return jnp.stack([v for row in m for v in row], axis=-1).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _recomputed(logits: jax.Array, iters: int, kind: str) -> jax.Array:
  return _stacked(iterate(_entries(logits), iters, kind), logits.shape)


def _recomputed_forward(logits, iters, kind):
  return _recomputed(logits, iters, kind), logits


def _recomputed_backward(iters: int, kind: str, logits: jax.Array, g_out: jax.Array):
  x, eps = _entries(logits), _eps(kind)
  m0 = _start(x, kind)
  m, loops = m0, iters
  if kind == "softmax_eps":
    m, first_sums = _cols(m0, eps)
    loops -= 1
  m1 = m

  def forward(m, _):
    r, row_sums = _rows(m, eps)
    m, col_sums = _cols(r, eps)
    return m, (row_sums, col_sums)

  m, sums = jax.lax.scan(forward, m, None, length=loops)

  def backward(carry, sums):
    m, g = carry  # the iteration's output and its cotangent
    row_sums, col_sums = sums
    r = tuple(tuple(v * s for v, s in zip(row, col_sums)) for row in m)  # the row step's output
    g = _rows_backward(r, _cols_backward(m, g, col_sums), row_sums)
    return (tuple(tuple(v * s for v in row) for row, s in zip(r, row_sums)), g), None

  (_, g), _ = jax.lax.scan(backward, (m, _entries(g_out)), sums, reverse=True)
  if kind == "softmax_eps":
    g = _cols_backward(m1, g, first_sums)
    p = [_softmax(row) for row in x]
    dots = [_sum(gv * pv for gv, pv in zip(g_row, p_row)) for g_row, p_row in zip(g, p)]
    g_x = tuple(tuple(pv * (gv - d) for gv, pv in zip(g_row, p_row)) for g_row, p_row, d in zip(g, p, dots))
  else:  # through exp, the clamp, and the row max (JAX's rule: shared equally by ties)
    g_x = []
    for g_row, m_row, x_row in zip(g, m0, x):
      top = functools.reduce(jnp.maximum, x_row)
      g_e = [jnp.where(xv - top > -LOG_RANGE, gv * mv, 0.0) for gv, mv, xv in zip(g_row, m_row, x_row)]
      ties = [(xv == top).astype(jnp.float32) for xv in x_row]
      g_top = -_sum(g_e) / _sum(ties)
      g_x.append(tuple(ge + t * g_top for ge, t in zip(g_e, ties)))
  return (_stacked(g_x, logits.shape).astype(logits.dtype),)


_recomputed.defvjp(_recomputed_forward, _recomputed_backward)


def sinkhorn(logits: jax.Array, iters: int, kind: str) -> jax.Array:
  """`SINKHORN[kind](logits, iters)`; exp and softmax_eps through `iterate`, with a backward
  pass that recomputes the iterations from the logits (log: differentiated by JAX)."""
  if kind == "log":
    return sinkhorn_log(logits, iters)
  return _recomputed(logits, iters, kind)


@functools.cache
def permutation_matrices(n: int) -> np.ndarray:
  """All n! permutation matrices [n!, n, n] (float32), in lexicographic order."""
  perms = list(itertools.permutations(range(n)))
  out = np.zeros((len(perms), n, n), np.float32)
  for p, perm in enumerate(perms):
    out[p, np.arange(n), perm] = 1.0
  return out


def birkhoff_combination(logits: jax.Array, perms: jax.Array) -> jax.Array:
  """mHC-lite: softmax(logits [..., n!]) weights a convex combination of `perms` [n!, n, n];
  exactly doubly stochastic by construction."""
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.einsum("...p,pjk->...jk", weights, perms)
