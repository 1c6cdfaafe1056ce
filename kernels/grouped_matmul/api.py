"""The public entry point: `gmm`, a grouped matmul with its gradient, on the
implementation chosen by name.

    y = gmm(x, w, group_sizes, implementation)  # x [M, K] sorted by group, w [G, K, N] -> [M, N]

Rows past sum(group_sizes) come out 0. The backward pass is two more grouped matmuls:
dx = gmm(dy, w^T) and dw = tgmm(x, dy) (reference.py defines both).

Implementations: `xla` (jax.lax.ragged_dot, differentiated by JAX), `blocked` (one
batched XLA matmul over row tiles of one group each: blocked.py), `triton` (Pallas Triton,
any CUDA GPU), `mosaic_gpu` (Pallas Mosaic GPU, Hopper), `megablox` (JAX's maintained TPU
kernels, `jax.experimental.pallas.ops.tpu.megablox`; interpret mode off the TPU),
`tokamax` (`tokamax.ragged_dot`, with its own kernels and gradient: Mosaic GPU on Hopper,
Pallas Triton on other GPUs, Mosaic TPU, XLA's `ragged_dot` elsewhere),
`interpret` (the Triton blocks on the CPU: tests). `auto` picks per platform (that of the
ambient mesh, else the default backend): on GPUs `GPU_DEFAULT`, what measured fastest
(kernels/grouped_matmul/bench.py), on TPUs `megablox`, on the CPU `blocked` (whose
`ragged_dot` computes every group on every row), elsewhere `xla`.

Inside a `shard_map` (expert parallelism) megablox's `pallas_call` declares an output type
without the mesh axes it varies over, which shard_map's check refuses; `_megablox` traces it
with that check off and types its output as varying over its inputs' axes, which it is.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax._src import config as jax_config

from kernels.grouped_matmul import blocked, mosaic_gpu, triton
from kernels.platform import platform

# The module: the package's `gmm` attribute is its differentiable function, which shadows it.
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

IMPLEMENTATIONS = ("auto", "xla", "blocked", "triton", "mosaic_gpu", "megablox", "tokamax", "interpret")
GPU_DEFAULT = "triton"
BLOCKED_ROWS = 128  # rows per tile of `blocked`: 3x faster than ragged_dot on a quickstart MoE layer (2-core CPU)
# Tiles (rows, K, N) and launch settings per kernel: the best of bench.py --sweep on an H100
# (gmm 448, tgmm 356 TFLOP/s on the gate/up shape); N tiles of 256 where N allows.
_TILES = {
  "triton": {
    "gmm": {"block_m": 128, "block_k": 64, "block_n": 256, "num_warps": 8, "num_stages": 3},
    "tgmm": {"block_m": 64, "block_k": 64, "block_n": 256, "num_warps": 4, "num_stages": 3},
  },
  "interpret": {
    "gmm": {"block_m": 32, "block_k": 16, "block_n": 32},
    "tgmm": {"block_m": 32, "block_k": 16, "block_n": 32},
  },
  "mosaic_gpu": {
    "gmm": {"block_m": 128, "block_k": 64, "block_n": 128},
    "tgmm": {"block_m": 128, "block_k": 128, "block_n": 128},
  },
  "megablox": {  # its default tiling; the MXU is 128 x 128 on v5p (256 x 256 on v6e)
    "gmm": {"block_m": 128, "block_k": 128, "block_n": 128},
    "tgmm": {"block_m": 128, "block_k": 128, "block_n": 128},
  },
}


def _tiles(impl: str, kernel: str, n: int) -> dict[str, int]:
  """The kernel's tiles, halving a 256-wide N tile where N is not a multiple of it (less padding)."""
  tiles = dict(_TILES[impl][kernel])
  if tiles["block_n"] == 256 and n % 256:
    tiles["block_n"] = 128
  return tiles


def resolve(implementation: str) -> str:
  """The implementation `auto` stands for on this backend; others are returned as given."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"grouped matmul implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
  if implementation == "auto":
    return {"gpu": GPU_DEFAULT, "tpu": "megablox", "cpu": "blocked"}.get(platform(), "xla")
  return implementation


def _pad(a: jax.Array, multiples: dict[int, int]) -> jax.Array:
  widths = [(0, -a.shape[i] % multiples.get(i, 1)) for i in range(a.ndim)]
  return jnp.pad(a, widths) if any(w for _, w in widths) else a


def varying(x: jax.Array) -> frozenset[str]:
  """The shard_map mesh axes along which `x` differs between devices (none outside shard_map)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX 0.10 and 0.11; else `vma`
  return manual.varying if manual is not None else aval.vma


def _same_varying(*arrays: jax.Array) -> list[jax.Array]:
  """`arrays` typed as varying over the union of their mesh axes, as a kernel's output is."""
  axes = frozenset().union(*map(varying, arrays))
  return [jax.lax.pcast(a, tuple(sorted(axes - varying(a))), to="varying") if axes - varying(a) else a for a in arrays]


def _megablox(kernel, *args, like: tuple[jax.Array, ...], **kwargs) -> jax.Array:
  """megablox's `kernel(*args, **kwargs)`, typed as varying over the mesh axes of `like`.
  Its `pallas_call` (JAX 0.10 / 0.11) builds its output shape without a varying-axes type, so
  it is traced with shard_map's check off (JAX's own switch; no public one exists)."""
  with jax_config._check_vma(False):
    out = kernel(*args, interpret=platform() != "tpu", **kwargs)
  return _same_varying(out, *like)[0]


def _gmm(x, w, group_sizes, impl: str, transpose_w: bool = False) -> jax.Array:
  """x [M, K], w [G, K, N] (transpose_w: [G, N, K]) -> [M, N], padding to the kernel's tiles."""
  m, n = x.shape[0], w.shape[1 if transpose_w else 2]
  tiles = _tiles(impl, "gmm", n)
  bm, bk, bn = tiles["block_m"], tiles["block_k"], tiles["block_n"]
  x_p = _pad(x, {0: bm, 1: bk})
  w_p = _pad(w, {1: bn, 2: bk} if transpose_w else {1: bk, 2: bn})
  if impl == "mosaic_gpu":
    y = mosaic_gpu.gmm(x_p, w_p, group_sizes, transpose_w=transpose_w, block_k=bk, block_n=bn)
  elif impl == "megablox":
    y = _megablox(megablox.gmm, x_p, w_p, group_sizes, x.dtype, (bm, bk, bn), transpose_rhs=transpose_w, like=(x, w))
  else:
    y = triton.gmm(x_p, w_p, group_sizes, transpose_w=transpose_w, interpret=impl == "interpret", **tiles)
  return _zero_past_groups(y[:m, :n], group_sizes)  # the kernels leave rows past the groups unwritten


def _zero_past_groups(y: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """y [M, N] with its rows past sum(group_sizes) set to 0."""
  row = jax.lax.broadcasted_iota(jnp.int32, (y.shape[0], 1), 0)
  return jnp.where(row < jnp.sum(group_sizes), y, 0)


def _tgmm(x, dy, group_sizes, impl: str) -> jax.Array:
  """x [M, K], dy [M, N] -> [G, K, N]."""
  k, n = x.shape[1], dy.shape[1]
  tiles = _tiles(impl, "tgmm", n)
  bm, bk, bn = tiles["block_m"], tiles["block_k"], tiles["block_n"]
  x_p, dy_p = _pad(x, {0: bm, 1: bk}), _pad(dy, {0: bm, 1: bn})
  if impl == "mosaic_gpu":
    dw = mosaic_gpu.tgmm(x_p, dy_p, group_sizes, block_m=bk, block_n=bn)  # its m is our K
  elif impl == "megablox":  # takes x transposed, [K, M]
    dw = _megablox(megablox.tgmm, x_p.T, dy_p, group_sizes, x.dtype, (bm, bk, bn), like=(x, dy))
  else:
    dw = triton.tgmm(x_p, dy_p, group_sizes, interpret=impl == "interpret", **tiles)
  return dw[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_gmm(x, w, group_sizes, impl: str):
  return _gmm(x, w, group_sizes, impl)


def _kernel_gmm_forward(x, w, group_sizes, impl):
  return _gmm(x, w, group_sizes, impl), (x, w, group_sizes)


def _kernel_gmm_backward(impl, saved, dy):
  x, w, group_sizes = saved
  dx = _gmm(dy, w, group_sizes, impl, transpose_w=True)
  return dx, _tgmm(x, dy, group_sizes, impl), None


_kernel_gmm.defvjp(_kernel_gmm_forward, _kernel_gmm_backward)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, implementation: str = "auto") -> jax.Array:
  """x [M, K] rows sorted by group, w [G, K, N], group_sizes [G] int32 -> [M, N] in x's
  dtype (float32 accumulation); rows past sum(group_sizes) are 0."""
  if x.dtype != w.dtype:
    raise ValueError(f"gmm: x is {x.dtype} but w is {w.dtype}; cast both to the compute dtype")
  impl = resolve(implementation)
  if impl == "xla":
    # In x's dtype (the backend accumulates bfloat16 in float32 either way): float32 outputs
    # and cotangents cost the 27B step 1.7 GiB per v5p chip (experiments/results/compile).
    return jax.lax.ragged_dot(x, w, group_sizes)
  if impl == "blocked":
    return blocked.gmm(x, w, group_sizes, BLOCKED_ROWS)
  if impl == "tokamax":
    import tokamax  # here, not at the top: importing it costs about a second, paid only by those who choose it
    from absl import flags

    if not flags.FLAGS.is_parsed():  # else tokamax parses sys.argv, this program's own flags, as absl's and fails
      flags.FLAGS.mark_as_parsed()
    return _zero_past_groups(tokamax.ragged_dot(x, w, group_sizes.astype(jnp.int32)), group_sizes)
  # Outside the custom_vjp, so that autodiff sums x's gradient over the axes it gains here.
  x, w, group_sizes = _same_varying(x, w, group_sizes.astype(jnp.int32))
  return _kernel_gmm(x, w, group_sizes, impl)
