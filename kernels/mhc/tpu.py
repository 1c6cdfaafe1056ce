"""The TPU implementation: Pallas on Mosaic. A block of `block_tokens` tokens holds their
whole n D-wide rows in VMEM (Pallas double-buffers the copies from HBM); the bodies walk
them in 512-lane chunks, and `pre_forward` pre-mixes in the same kernel (its second pass over
the block reads VMEM). Token blocks are independent ("parallel": split over both
TensorCores of a v4 / v5p chip)."""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu

from kernels.mhc.calls import KERNELS, Backend, Tile


def backend(*, interpret: bool = False, block_tokens: int = 16, chunk: int = 512) -> Backend:
  """One tile for every kernel."""
  params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=64 * 2**20)
  tiles = (Tile(block_tokens, chunk, params),) * len(KERNELS)
  return Backend(name="tpu", tiles=tiles, interpret=interpret, mix_in_pre=True)  # the pre-mix reads x from VMEM
