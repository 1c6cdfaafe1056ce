"""The GPU implementation: Pallas on Triton. A program owns `block_tokens` tokens and walks
their streams in `chunk`-wide tiles (Triton tiles are powers of two). The defaults are the
fastest in the model on an H100 (benchmarks/README.md). The same blocks run in interpret
mode on the CPU (the tests)."""

from __future__ import annotations

from jax.experimental.pallas import triton as plgpu

from kernels.mhc.calls import Backend


def backend(
  *, interpret: bool = False, block_tokens: int | None = None, chunk: int = 256, num_warps: int = 4, num_stages: int = 1
) -> Backend:
  """`block_tokens` unset: 8 compiled, 16 in interpret mode (whose time grows with the blocks)."""
  return Backend(
    name="triton",
    block_tokens=block_tokens or (16 if interpret else 8),
    chunk=chunk,
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
    interpret=interpret,
  )
