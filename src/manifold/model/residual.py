"""Residual streams: Hyper-Connections (HC), manifold-constrained HC (mHC) and mHC-lite.

With `model.residual != "plain"` the embedding is widened once to n streams
[B, T, n, D], every attention and FFN sub-block ("layer") reads and writes all n
streams, and the streams are collapsed once before the final norm. A layer is

    x_{l+1}[k] = sum_j H_res[k, j] x_l[j] + H_post[k] * F(sum_j H_pre[j] x_l[j])

with per-token coefficients computed from x_l by the connection modules below. Mappings
left out of `model.hc_mappings` are fixed as in the mHC paper's component ablation (Table 1):
H_pre = 1/n for every stream, H_post = 1, H_res = I.
`Mixing.res` is H_res in that (output, input) layout; DeepSeek-V4 stores its
transpose (`comb`) and applies `comb^T`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P
from kernels.mhc import api as mhc_kernels
from kernels.mhc import reference as mhc_reference
from kernels.mhc.sinkhorn import SINKHORN_EPS
from kernels.mhc.tiles import parse_tiles

from manifold.model.config import MAPPINGS, ModelConfig
from manifold.model.layers import RMSNorm, normal, param
from manifold.model.partitioning import batch_axes, batch_ways


class Mixing(NamedTuple):
  """One layer's stream coefficients, float32."""

  pre: jax.Array  # [B, T, n]     H_pre: weights collapsing the streams into F's input
  post: jax.Array  # [B, T, n]    H_post: how much of F's output each stream receives
  res: jax.Array  # [B, T, n, n]  H_res[k, j]: weight of input stream j in output stream k
  packed: jax.Array | None = None  # [B T, W] the same rows as the Pallas kernels keep them
  streams: mhc_kernels.Streams | None = None  # [B T, n D] x as the kernels' `pre` hands it to res_post
  kernel: mhc_kernels.Spec | None = None  # set when the kernels mix this layer


def widen(x_btd: jax.Array, streams: int) -> jax.Array:
  """Copies the embedding into every stream: [B, T, D] -> [B, T, n, D]."""
  return jnp.broadcast_to(x_btd[:, :, None, :], (*x_btd.shape[:2], streams, x_btd.shape[-1]))


def pre_mix(x_btnd: jax.Array, pre_btn: jax.Array) -> jax.Array:
  """The sub-block input `sum_j H_pre[j] x[j]`: [B, T, n, D] -> [B, T, D]."""
  return jnp.einsum("btn,btnd->btd", pre_btn.astype(x_btnd.dtype), x_btnd)


def _per_shard(fn, token_args: int, token_outs: int):
  """Runs a Pallas call once per device on its own tokens under the ambient mesh (token
  arrays [N, ...] split over the batch axes, weights whole); unchanged without a mesh."""
  if batch_ways() == 1:
    return fn
  mesh, tokens = jax.sharding.get_abstract_mesh(), P(batch_axes())

  def call(*args):
    specs = tuple(tokens if i < token_args else P() for i in range(len(args)))
    out = (tokens,) * token_outs
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out if token_outs > 1 else out[0], check_vma=False)(
      *args
    )

  return call


def res_post_mix(x_btnd: jax.Array, y_btd: jax.Array, mixing: Mixing) -> jax.Array:
  """`H_res x + H_post^T y`: the layer's new streams [B, T, n, D]."""
  if mixing.kernel is not None:
    b, t, n, d = x_btnd.shape
    fused = _per_shard(functools.partial(mhc_kernels.res_post, spec=mixing.kernel), token_args=3, token_outs=1)
    return fused(mixing.streams, y_btd.reshape(b * t, d), mixing.packed).reshape(x_btnd.shape)
  dt = x_btnd.dtype
  mixed = jnp.einsum("btkj,btjd->btkd", mixing.res.astype(dt), x_btnd)  # [B, T, n, D]
  return mixed + mixing.post.astype(dt)[..., None] * y_btd[:, :, None, :]


def _kernel_mixing(packed: jax.Array, streams: mhc_kernels.Streams, spec: mhc_kernels.Spec, b: int, t: int) -> Mixing:
  """The Mixing of a connection the kernels ran: packed rows [B T, W] and the streams they read."""
  pre, post, res = (a.reshape(b, t, *a.shape[1:]) for a in mhc_kernels.unpack(packed, spec.n))
  return Mixing(pre, post, res, packed, streams, spec)


def with_fixed_mappings(mixing: Mixing, learned: tuple[str, ...]) -> Mixing:
  """`mixing` with the mappings not in `learned` fixed: H_pre = 1/n, H_post = 1, H_res = I."""
  if len(learned) == len(MAPPINGS):
    return mixing
  n = mixing.pre.shape[-1]
  pre = mixing.pre if "pre" in learned else jnp.full_like(mixing.pre, 1 / n)
  post = mixing.post if "post" in learned else jnp.ones_like(mixing.post)
  res = mixing.res if "res" in learned else jnp.broadcast_to(jnp.eye(n, dtype=mixing.res.dtype), mixing.res.shape)
  return Mixing(pre, post, res)


class Connection(nnx.Module):
  """A sub-block's residual connection: `read` gives F's input and the layer's mixing."""

  def read(self, x_btnd: jax.Array) -> tuple[jax.Array, Mixing]:
    """x [B, T, n, D] -> (sum_j H_pre[j] x[j] [B, T, D], Mixing)."""
    mixing = self(x_btnd)
    return pre_mix(x_btnd, mixing.pre), mixing

  def runs_kernels(self) -> bool:
    """Whether `read` and `res_post_mix` run the Pallas kernels of kernels/mhc."""
    return False

  def fuses(self, previous: Mixing) -> bool:
    """Whether this connection has a `merge`, running the previous connection's res_post and
    this connection's read of its output as the kernels' fused pass, for `previous`."""
    return False


class HyperConnection(Connection):
  """HC (static + dynamic), Zhu et al. 2024. No constraint on H_res.

  Static parts: b_pre one-hot on stream `layer_index mod n`, b_res = I, b_post = 1.
  Dynamic parts, per stream j from its own normalised state: `s * tanh(norm(x_j) W)`,
  W zero-initialised, scales s initialised to `model.hc_scale_init`. Stream j's row of
  the dynamic residual term is its contribution to every output (H_res[:, j]).
  """

  def __init__(self, cfg: ModelConfig, *, layer_index: int, rngs: nnx.Rngs):
    n, d = cfg.streams, cfg.d_model
    one_hot = jax.nn.one_hot(layer_index % n, n)
    self.norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
    self.w_dynamic = param(rngs, jax.nn.initializers.zeros, (d, 2 + n), (None, None))
    self.scales = param(rngs, jax.nn.initializers.constant(cfg.hc_scale_init), (3,), (None,))
    self.b_pre = param(rngs, lambda *_: one_hot, (n,), (None,))
    self.b_post = param(rngs, jax.nn.initializers.ones, (n,), (None,))
    self.b_res = param(rngs, lambda *_: jnp.eye(n), (n, n), (None, None))
    self.streams = n
    self.learned = cfg.learned_mappings

  def __call__(self, x_btnd: jax.Array) -> Mixing:
    n = self.streams
    dynamic = jnp.tanh(
      jnp.einsum("btnd,de->btne", self.norm(x_btnd).astype(jnp.float32), self.w_dynamic[...])
    )  # [B, T, n, 2 + n]
    s_pre, s_post, s_res = self.scales[0], self.scales[1], self.scales[2]
    pre = self.b_pre[...] + s_pre * dynamic[..., 0]  # [B, T, n]
    post = self.b_post[...] + s_post * dynamic[..., 1]  # [B, T, n]
    res_in_out = self.b_res[...] + s_res * dynamic[..., 2 : 2 + n]  # [B, T, n_in, n_out]
    return with_fixed_mappings(Mixing(pre, post, jnp.swapaxes(res_in_out, -1, -2)), self.learned)


class ManifoldHyperConnection(Connection):
  """mHC (Xie et al. 2025) and mHC-lite (Yang et al. 2026).

  The n streams are flattened to [n D] and RMS-normalised (no weight); one fused
  projection phi [n D, 2n + R] gives the pre, post and residual logits, each scaled by
  its own gate alpha and shifted by a bias b:

      H_pre = sigmoid(.)  (+ eps with `mhc_sinkhorn = softmax_eps`, as DeepSeek-V4)
      H_post = 2 sigmoid(.)
      mhc:      H_res = Sinkhorn(.) over R = n^2 logits (`model.mhc_sinkhorn`: exp | log | softmax_eps)
      mhc_lite: H_res = sum_p softmax(.)_p P_p over R = n! permutation matrices (exact)

  Init: phi ~ N(0, init_std), b = 0, alpha = `model.mhc_alpha_init`. The coefficients are
  kernels/mhc/reference.py's on the tokens flattened to [B T, n D].

  With `model.mhc_impl` pallas (auto: on GPU and TPU; kernels/mhc/api.py resolves it),
  `read` and `res_post_mix` run the fused Pallas kernels of kernels/mhc (mhc with the exp
  or softmax_eps Sinkhorn, all three mappings learned); otherwise the XLA path, reference.py.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.streams
    self.lite = cfg.residual == "mhc_lite"
    res_logits = math.factorial(n) if self.lite else n * n
    width = 2 * n + res_logits
    self.phi = param(rngs, normal(cfg.init_std), (n * cfg.d_model, width), (None, None))
    self.alpha = param(rngs, jax.nn.initializers.constant(cfg.mhc_alpha_init), (3,), (None,))
    self.bias = param(rngs, jax.nn.initializers.zeros, (width,), (None,))
    self.norm_eps = cfg.norm_eps
    self.sinkhorn, self.sinkhorn_iters = cfg.mhc_sinkhorn, cfg.sinkhorn_iters
    self.learned = cfg.learned_mappings
    fusable = not self.lite and cfg.mhc_sinkhorn in mhc_kernels.SINKHORNS and len(self.learned) == len(MAPPINGS)
    self.impl = cfg.mhc_impl if fusable else "xla"
    self.tiles = parse_tiles(cfg.mhc_tiles)

  def runs_kernels(self) -> bool:
    return mhc_kernels.resolve(self.impl) is not None

  def _spec(self, n: int) -> mhc_kernels.Spec | None:
    """The kernels' settings for n streams, or None where this connection takes the XLA path."""
    implementation = mhc_kernels.resolve(self.impl)
    if implementation is None:
      return None
    return mhc_kernels.Spec(n, self.sinkhorn_iters, self.sinkhorn, self.norm_eps, implementation, self.tiles)

  def read(self, x_btnd: jax.Array) -> tuple[jax.Array, Mixing]:
    b, t, n, d = x_btnd.shape
    spec = self._spec(n)
    if spec is None:
      return super().read(x_btnd)
    fused = _per_shard(functools.partial(mhc_kernels.pre, spec=spec), token_args=1, token_outs=3)
    h, packed, streams = fused(x_btnd.reshape(b * t, n * d), self.phi[...], self.alpha[...], self.bias[...])
    return h.reshape(b, t, d), _kernel_mixing(packed, streams, spec, b, t)

  def fuses(self, previous: Mixing) -> bool:
    return previous.kernel is not None and self.runs_kernels()

  def merge(self, x_btnd: jax.Array, y_btd: jax.Array, previous: Mixing) -> tuple[jax.Array, jax.Array, Mixing]:
    """`res_post_mix(x, y, previous)` [B, T, n, D] and this connection's `read` of it, through the
    kernels' `merge` (where `fuses`): the new streams are projected as they are written."""
    b, t, n, d = x_btnd.shape
    spec = self._spec(n)
    fused = _per_shard(functools.partial(mhc_kernels.merge, spec=spec), token_args=3, token_outs=3)
    args = (previous.streams, y_btd.reshape(b * t, d), previous.packed, self.phi[...], self.alpha[...], self.bias[...])
    h, packed, streams = fused(*args)
    return streams.x.reshape(x_btnd.shape), h.reshape(b, t, d), _kernel_mixing(packed, streams, spec, b, t)

  def __call__(self, x_btnd: jax.Array) -> Mixing:
    b, t, n, d = x_btnd.shape
    pre, post, res = mhc_reference.coefficients(
      x_btnd.reshape(b * t, n * d),
      self.phi[...],
      self.alpha[...],
      self.bias[...],
      n=n,
      iters=self.sinkhorn_iters,
      kind=self.sinkhorn,
      eps=self.norm_eps,
      lite=self.lite,
    )  # [B T, n], [B T, n], [B T, n, n]
    return with_fixed_mappings(
      Mixing(pre.reshape(b, t, n), post.reshape(b, t, n), res.reshape(b, t, n, n)), self.learned
    )


class StreamHead(nnx.Module):
  """The final collapse for mHC / mHC-lite (as DeepSeek-V4's HyperHead):
  `sum_k (sigmoid(scale * RMSNorm(flat) w_k + b_k) + eps) x_k`, [B, T, n, D] -> [B, T, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.streams
    self.weight = param(rngs, normal(cfg.init_std), (n * cfg.d_model, n), (None, None))
    self.bias = param(rngs, jax.nn.initializers.zeros, (n,), (None,))
    self.scale = param(rngs, jax.nn.initializers.ones, (1,), (None,))
    self.norm_eps = cfg.norm_eps

  def __call__(self, x_btnd: jax.Array) -> jax.Array:
    b, t, n, d = x_btnd.shape
    logits = mhc_reference.project(x_btnd.reshape(b * t, n * d), self.weight[...], self.norm_eps)  # [B T, n]
    pre = jax.nn.sigmoid(logits.reshape(b, t, n) * self.scale[...] + self.bias[...]) + SINKHORN_EPS
    return pre_mix(x_btnd, pre)


def make_connection(cfg: ModelConfig, *, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
  """The connection module of sub-block `layer_index` (attention and FFN count separately)."""
  if cfg.residual == "hc":
    return HyperConnection(cfg, layer_index=layer_index, rngs=rngs)
  return ManifoldHyperConnection(cfg, rngs=rngs)


def collapse(x_btnd: jax.Array, head: StreamHead | None) -> jax.Array:
  """[B, T, n, D] -> [B, T, D]: the HC paper sums the streams; mHC uses a learned head."""
  return jnp.sum(x_btnd, axis=2) if head is None else head(x_btnd)
