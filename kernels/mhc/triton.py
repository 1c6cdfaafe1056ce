"""The GPU implementation: Pallas on Triton. A program owns `block_tokens` tokens and walks
their streams in `chunk`-wide tiles (Triton tiles are powers of two), each kernel at its own
tile; the pre-mix is a kernel of its own (`bodies.pre_forward` says why). The same blocks and
chunks run in interpret mode on the CPU (the tests)."""

from __future__ import annotations

from jax.experimental.pallas import triton as plgpu

from kernels.mhc.calls import KERNELS, Backend, Tile

# (block_tokens, chunk, num_warps, num_stages) of each kernel: the fastest of 32 settings on an
# H200 at 16,384 tokens x D = 2,048, bfloat16 (`kernels/mhc/bench.py --tiles`,
# kernels/mhc/README.md); pre_backward_streams' of 18 (`--only "pre backward streams"`);
# pre_mix's within the noise of the fastest of 24 on an H100 (`--only "pre mix"`), the same
# README; pre_backward_coefficients' (no chunks) the fastest of 6 on an H100 (`--only "pre
# backward coefficients"`); merge_forward's the fastest of 34 on an H100 (`--only "merge forward"`).
FASTEST = {
  "pre_forward": (64, 128, 4, 1),
  "pre_mix": (8, 128, 8, 1),
  "res_post_forward": (8, 128, 8, 1),
  "res_post_backward": (8, 256, 8, 1),
  "pre_backward_reduce": (32, 64, 8, 1),
  "pre_backward_coefficients": (16, 128, 4, 1),
  "pre_backward_streams": (16, 128, 8, 1),
  "merge_forward": (16, 64, 4, 3),
}


def backend(
  *,
  interpret: bool = False,
  block_tokens: int | None = None,
  chunk: int | None = None,
  num_warps: int | None = None,
  num_stages: int | None = None,
) -> Backend:
  """Each kernel at its FASTEST tile; a setting given replaces that setting in every kernel.
  Interpret mode takes the blocks and chunks, not the compiler settings."""
  tiles = []
  for kernel in KERNELS:
    bt, bd, warps, stages = FASTEST[kernel]
    params = None if interpret else plgpu.CompilerParams(num_warps=num_warps or warps, num_stages=num_stages or stages)
    tiles.append(Tile(block_tokens or bt, chunk or bd, params))
  return Backend(name="triton", tiles=tuple(tiles), interpret=interpret)
