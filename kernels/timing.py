"""Wall-clock timing for the kernels' benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, *args, repeats: int = 20) -> float:
  """Median seconds of `fn(*args)` after two warm-up calls, synchronised on the result."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)
