"""`timed`: a compiling call, then warm-up calls for the stated time, then the timed calls."""

from __future__ import annotations

import time

import jax.numpy as jnp

from kernels.timing import timed


def test_warms_up_for_the_stated_time_before_timing():
  calls = []

  def fn(x):
    calls.append(time.perf_counter())
    return x + 1

  start = time.perf_counter()
  seconds = timed(fn, jnp.zeros(4), repeats=5, warmup_s=0.05)
  timed_calls = calls[-5:]
  assert len(calls) >= 1 + 1 + 5  # the compiling call, at least one warm-up call, the timed ones
  assert timed_calls[0] - start >= 0.05  # no timed call before the warm-up time has passed
  assert 0 < seconds < timed_calls[-1] - start
