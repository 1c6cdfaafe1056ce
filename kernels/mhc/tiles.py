"""The kernels' tile settings as `model.mhc_tiles` writes them: `name=value,...`.

Plain Python (no JAX), so that config validation can check them without importing the kernels.
"""

from __future__ import annotations

TILE_NAMES = ("block_tokens", "chunk", "num_warps", "num_stages")  # see triton.py, tpu.py


def parse_tiles(text: str) -> tuple[tuple[str, int], ...]:
  """'block_tokens=8,num_stages=1' -> (("block_tokens", 8), ("num_stages", 1)); '' -> ().

  Names: block_tokens and chunk (powers of two; both backends), num_warps (a power of
  two) and num_stages (Triton only). Raises ValueError naming the bad item.
  """
  tiles = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, _, value = item.partition("=")
    if name not in TILE_NAMES:
      raise ValueError(f"{item!r}: unknown tile; use {', '.join(TILE_NAMES)} as name=value")
    if not value.isdigit() or int(value) < 1:
      raise ValueError(f"{item!r}: the value must be a positive integer")
    if name != "num_stages" and int(value) & (int(value) - 1):
      raise ValueError(f"{item!r}: {name} must be a power of two")
    tiles.append((name, int(value)))
  return tuple(tiles)
