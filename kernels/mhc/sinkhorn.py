"""Projections of n x n logits onto (or near) the Birkhoff polytope of doubly stochastic matrices.

All take logits [..., n, n] and return float32 matrices M [..., n, n] in the layout
`M[j, k]` = weight of input stream j in output stream k, so each iteration normalises
the last axis (over outputs), then the second-to-last (over inputs).

`SINKHORN` holds the definitions, which JAX differentiates through every iteration.
Two forms compute the same matrices for the mHC layers. `iterate` holds the n^2 entries as
separate arrays, so every step is elementwise: the Pallas kernels run it on [bt, 1] columns.
`sinkhorn`, the XLA path, holds them as one [n, n, N] array, and its backward pass keeps only
the logits: it reruns the iterations, keeping each one's row and column sums, then walks them
in reverse, rebuilding each iteration's input from its output and those sums.
"""

from __future__ import annotations

import functools
import itertools
import math

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
  top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, row))  # a shift: no gradient, as jax.nn.softmax
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


def _rows(m: Entries, eps: float) -> Entries:
  """Each row divided by its sum + eps (times its reciprocal: n divisions, not n^2)."""
  inverses = [1.0 / (_sum(row) + eps) for row in m]
  return tuple(tuple(v * i for v in row) for row, i in zip(m, inverses))


def _cols(m: Entries, eps: float) -> Entries:
  """Each column divided by its sum + eps."""
  inverses = [1.0 / (_sum(column) + eps) for column in zip(*m)]
  return tuple(tuple(v * i for v, i in zip(row, inverses)) for row in m)


def _eps(kind: str) -> float:
  return SINKHORN_EPS if kind == "softmax_eps" else 0.0


def _loops(iters: int, kind: str) -> int:
  return iters - 1 if kind == "softmax_eps" else iters


def _first(logits: Entries, kind: str) -> Entries:
  """The matrix the row / column loop starts from (softmax_eps: after its first column step)."""
  m = _start(logits, kind)
  return _cols(m, SINKHORN_EPS) if kind == "softmax_eps" else m


def _step(m: Entries, eps: float) -> Entries:
  return _cols(_rows(m, eps), eps)


def iterate(logits: Entries, iters: int, kind: str) -> Entries:
  """`SINKHORN[kind]` (exp or softmax_eps) entry by entry: logits[j][k] -> M[j][k]."""
  eps = _eps(kind)
  return jax.lax.fori_loop(0, _loops(iters, kind), lambda _, m: _step(m, eps), _first(logits, kind))


def iterate_backward(logits: Entries, g: Entries, iters: int, kind: str) -> Entries:
  """dL/dlogits from dL/dM (both entry by entry) for `iterate`, holding few matrices (a kernel's
  registers): the forward iterations keep a checkpoint every `segment` ~ sqrt(iterations); the
  cotangent is then carried back one iteration at a time, each iteration's input recomputed
  from its segment's checkpoint (at t_max = 20, 55 iterations recomputed, not the 190 of
  recomputing each from the start).
  Ties of the exp start's row max share its gradient equally, as JAX's `max`."""
  eps, loops = _eps(kind), _loops(iters, kind)
  segment = max(1, math.isqrt(loops - 1) + 1)  # ceil(sqrt(loops))
  m1, g = _first(logits, kind), tuple(tuple(row) for row in g)
  m, checkpoints = m1, []  # (first iteration, its input)
  for first in range(0, loops, segment):
    checkpoints.append((first, m))
    if first + segment < loops:
      m = jax.lax.fori_loop(0, segment, lambda _, m: _step(m, eps), m)
  for first, start in reversed(checkpoints):
    length = min(segment, loops - first)

    def back(i, g, start=start, length=length):
      m = jax.lax.fori_loop(0, length - 1 - i, lambda _, m: _step(m, eps), start)  # iteration length - 1 - i's input
      return jax.vjp(lambda m: _step(m, eps), m)[1](g)[0]

    g = jax.lax.fori_loop(0, length, back, g)
  if kind == "softmax_eps":
    return jax.vjp(lambda a: _first(a, kind), logits)[1](g)[0]
  out = []  # exp: through exp, the clamp and the row max (m1 is the start matrix itself)
  for row, m_row, g_row in zip(logits, m1, g):
    top = functools.reduce(jnp.maximum, row)
    g_e = [jnp.where(v - top > -LOG_RANGE, gv * mv, 0.0) for v, mv, gv in zip(row, m_row, g_row)]
    ties = [(v == top).astype(jnp.float32) for v in row]
    share = _sum(g_e) / _sum(ties)
    out.append(tuple(ge - t * share for ge, t in zip(g_e, ties)))
  return tuple(out)


# The XLA path: the matrices as one array m [n, n, N] (axis 0 the input stream j, axis 1 the
# output k, the tokens last, so every step is a full-width elementwise op or a sum over a small
# leading axis). Against n^2 separate arrays its forward+backward lowers to a fifth of the
# StableHLO (225 lines against 1,088), and a 6-block mHC model's gradient compiled in 5.6 s
# instead of 21.8 s on one H200 (kernels/mhc/README.md).
_ROW, _COL = 1, 0  # a row step sums over the outputs k, a column step over the inputs j


def _to_stack(a: jax.Array) -> jax.Array:
  """[..., n, n] -> [n, n, N] float32 (the leading axes flattened into N)."""
  return jnp.moveaxis(a.reshape(-1, *a.shape[-2:]).astype(jnp.float32), 0, -1)


def _from_stack(m: jax.Array, shape, dtype) -> jax.Array:
  return jnp.moveaxis(m, -1, 0).reshape(shape).astype(dtype)


def _normalise(m: jax.Array, axis: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """m divided by its sums over `axis` + eps (times their reciprocal); also returns the divisors."""
  sums = jnp.sum(m, axis, keepdims=True) + eps
  return m * (1.0 / sums), sums


def _normalise_backward(out: jax.Array, g: jax.Array, sums: jax.Array, axis: int) -> jax.Array:
  """Cotangent of `_normalise`'s input from that of its output `out = m / sums`."""
  return (g - jnp.sum(g * out, axis, keepdims=True)) / sums


def _stack_start(x: jax.Array, kind: str) -> jax.Array:
  """`_start` on the stacked logits x [n, n, N]."""
  if kind == "softmax_eps":
    return jax.nn.softmax(x, axis=_ROW) + SINKHORN_EPS
  return jnp.exp(jnp.maximum(x - jnp.max(x, _ROW, keepdims=True), -LOG_RANGE))


def _first_steps(x: jax.Array, kind: str):
  """The start matrix, and the matrix the row / column loop starts from (softmax_eps: after its
  first column step, whose divisors come third; exp: the start itself, and None)."""
  m0 = _stack_start(x, kind)
  if kind == "softmax_eps":
    m1, sums = _normalise(m0, _COL, SINKHORN_EPS)
    return m0, m1, sums
  return m0, m0, None


def _iteration(m: jax.Array, eps: float):
  r, row_sums = _normalise(m, _ROW, eps)
  m, col_sums = _normalise(r, _COL, eps)
  return m, (row_sums, col_sums)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _recomputed(logits: jax.Array, iters: int, kind: str) -> jax.Array:
  _, m, _ = _first_steps(_to_stack(logits), kind)
  eps = _eps(kind)
  m = jax.lax.fori_loop(0, _loops(iters, kind), lambda _, m: _iteration(m, eps)[0], m)
  return _from_stack(m, logits.shape, jnp.float32)


def _recomputed_forward(logits, iters, kind):
  return _recomputed(logits, iters, kind), logits


def _recomputed_backward(iters: int, kind: str, logits: jax.Array, g_out: jax.Array):
  x, eps = _to_stack(logits), _eps(kind)
  m0, m1, first_sums = _first_steps(x, kind)
  m, sums = jax.lax.scan(lambda m, _: _iteration(m, eps), m1, None, length=_loops(iters, kind))

  def backward(carry, sums):
    m, g = carry  # the iteration's output and its cotangent
    row_sums, col_sums = sums
    r = m * col_sums  # the row step's output
    g = _normalise_backward(r, _normalise_backward(m, g, col_sums, _COL), row_sums, _ROW)
    return (r * row_sums, g), None

  (_, g), _ = jax.lax.scan(backward, (m, _to_stack(g_out)), sums, reverse=True)
  if kind == "softmax_eps":
    g = _normalise_backward(m1, g, first_sums, _COL)
    p = jax.nn.softmax(x, axis=_ROW)
    g_x = p * (g - jnp.sum(g * p, _ROW, keepdims=True))
  else:  # through exp, the clamp, and the row max (JAX's rule: shared equally by ties)
    top = jnp.max(x, _ROW, keepdims=True)
    g_e = jnp.where(x - top > -LOG_RANGE, g * m0, 0.0)
    ties = (x == top).astype(jnp.float32)
    # The ties counted as n added slices, not by a reduction: XLA:CPU at the tests'
    # --xla_backend_optimization_level=0 miscounted them inside a training step's fused backward
    # pass (inf gradients at tied entries; tests/test_sweep.py's mHC runs diverged).
    count = _sum(jax.lax.slice_in_dim(ties, k, k + 1, axis=_ROW) for k in range(ties.shape[_ROW]))
    g_x = g_e - ties * (jnp.sum(g_e, _ROW, keepdims=True) / count)
  return (_from_stack(g_x, logits.shape, logits.dtype),)


_recomputed.defvjp(_recomputed_forward, _recomputed_backward)


def sinkhorn(logits: jax.Array, iters: int, kind: str) -> jax.Array:
  """`SINKHORN[kind](logits, iters)`; exp and softmax_eps on the stacked [n, n, N] matrices, with
  a backward pass that recomputes the iterations from the logits (log: differentiated by JAX)."""
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
