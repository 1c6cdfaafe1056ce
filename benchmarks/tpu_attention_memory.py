"""Per-chip temporaries of one attention layer's forward and backward, compiled ahead of time for
a TPU chip on this machine (libtpu's topology description: `make libtpu`): XLA's attention,
which holds [B, N, T, T] float32 scores, against `model.attention_impl=auto` (splash attention).

  PYTHONPATH=src:. .venv/bin/python benchmarks/tpu_attention_memory.py [--topology v5p-8] [--tokens 4096]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from kernels.attention import api

from manifold.aot import parse_slice, slice_devices
from manifold.results import markdown_table

SHAPES = {  # name -> (query heads, key / value heads, query / key width, value width)
  "GQA 16 / 4 heads of 128": (16, 4, 128, 128),
  "MLA 32 heads, 192 / 128 (the mHC paper's 27B)": (32, 32, 192, 128),
}
COLUMNS = [
  ("attention", lambda r: r["shape"]),
  ("sequences x tokens", lambda r: f"{r['batch']} x {r['tokens']:,}"),
  ("XLA GiB", lambda r: f"{r['xla_gib']:.2f}"),
  ("splash GiB", lambda r: f"{r['auto_gib']:.2f}"),
  ("splash / XLA", lambda r: f"{r['auto_gib'] / r['xla_gib']:.3f}"),
]


def temporaries_gib(implementation: str, shapes, sharding) -> float:
  """GiB of temporaries XLA reserves per chip for attention's value and gradients."""

  def loss(q, k, v):
    return jnp.sum(
      api.dot_product_attention(q, k, v, is_causal=True, implementation=implementation).astype(jnp.float32)
    )

  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
  with jax.sharding.use_abstract_mesh(sharding.mesh.abstract_mesh):  # `auto` resolves for the chip
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v5p-8")
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  chip = slice_devices(parse_slice(args.topology))[0]
  one_chip = NamedSharding(Mesh(np.array([chip]), ("chip",)), PartitionSpec())
  rows = []
  for name, (heads, kv_heads, qk, v) in SHAPES.items():
    b, t = args.batch, args.tokens
    shapes = [(b, t, heads, qk), (b, t, kv_heads, qk), (b, t, kv_heads, v)]
    row = {"shape": name, "batch": b, "tokens": t}
    row.update({f"{impl}_gib": temporaries_gib(impl, shapes, one_chip) for impl in ("xla", "auto")})
    rows.append(row)
  print(f"{chip.device_kind} ({args.topology}), bfloat16, causal, forward + backward")
  print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
  main()
