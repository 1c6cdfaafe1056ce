"""Checking untrusted island updates: screening a round's outer gradients and combining the kept ones.

An island of a store run may be faulty or malicious; everything it publishes is signed, so the round's
leader knows whose delta is whose, but a valid signature says nothing about the numbers. Before the
outer step the leader screens the round's deltas (each one a fragment: a list of float32 arrays):

  norm bound    island k is rejected if ||delta_k|| > max_norm_ratio x the median of the OTHER islands'
                norms (leave-one-out, so it works with 2 islands: a delta scaled x100 shows as ratio 100);
  cosine bound  island k is rejected if cos(delta_k, coordinate-wise median of all deltas) < min_cosine;
                it needs 3 deltas (with 2 it cannot tell which one is bad), below that it is skipped and
                `Screen.note` says so.

and combines the kept ones with `aggregate`: the token-weighted `mean` (the DiLoCo outer gradient), or
the unweighted coordinate-wise `trimmed_mean` / `median`, which bound what one island can do even when
it passes the screen. Everything is plain numpy, float32 accumulation.

Honest numbers, measured with the screen off on real store runs of experiments/islands.py:tiny, 3 islands
on CPU (`manifold islands ... --config.islands.max_norm_ratio=0 --config.islands.min_cosine=-1`, every
round's numbers from membership.jsonl's "screen"; 1740 island-rounds, no outlier):

  H=4, 2 fragments, float32, 120 steps (60 rounds)                  ratio 0.83-1.19   cosine 0.68-0.98 (median 0.92)
  H=2, 1 fragment, int4, 240 steps (120 rounds; the store tests')   ratio 0.82-1.24   cosine 0.74-0.98 (median 0.95)
  H=4, 2 fragments, int4 + error feedback, 800 steps (400 rounds)   ratio 0.81-1.30   cosine 0.69-0.98 (median 0.92)

Defaults (IslandsConfig): max_norm_ratio 10, 7.7x the largest honest ratio (a delta scaled x100 shows as
~100); min_cosine 0, 0.68 below the smallest honest cosine (an honest delta pulls the median its way, so
its cosine to it stays positive even where the islands share no direction). Limits: with 3 islands an
honest-sized sign-flipped delta is rejected while the honest cosines are above ~0.75 (common direction +
noise: the flipped one is then at ~-0.3 or below); where they are lower it lies near the median, and
moves a mean by at most its own size / n. trimmed_mean drops floor(trim x n) values at each end: with
3 islands and trim 0.25 none (it is the unweighted mean); use median there.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Mapping, Sequence

import numpy as np

AGGREGATES = ("mean", "trimmed_mean", "median")
COSINE_MIN_DELTAS = 3  # the cosine bound needs this many deltas: with 2 the median is their mean

Delta = Sequence[np.ndarray]  # one island's outer gradient of a fragment: float32 arrays, the fragment's leaves


@dataclasses.dataclass(frozen=True)
class Screen:
  """What `screen` found: the islands kept (in the given order), those rejected with a one-line reason,
  each island's numbers, and `note` (a line when a bound could not be applied, else "")."""

  kept: list
  rejected: dict
  norms: dict  # island -> global L2 norm of its delta
  ratios: dict  # island -> norm / median of the others' norms (None with one island, inf over a zero median)
  cosines: dict  # island -> cosine to the coordinate-wise median (None: fewer than 3 deltas, or a zero vector)
  note: str = ""

  def numbers(self) -> dict[str, dict[str, float | None]]:
    """{str(island): {norm, ratio, cosine}} as JSON-safe floats (None where undefined or infinite)."""

    def safe(x):
      return None if x is None or not math.isfinite(x) else float(x)

    return {
      str(k): {"norm": safe(self.norms[k]), "ratio": safe(self.ratios[k]), "cosine": safe(self.cosines[k])}
      for k in self.norms
    }


def global_norm(delta: Delta) -> float:
  """L2 norm over every array of `delta` (accumulated in float64)."""
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in delta))


def _dot(a: Delta, b: Delta) -> float:
  return sum(float(np.dot(np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64))) for x, y in zip(a, b))


def cosine(a: Delta, b: Delta) -> float | None:
  """Cosine similarity of two deltas over all their arrays; None if either is all zeros."""
  na, nb = global_norm(a), global_norm(b)
  if na == 0 or nb == 0:
    return None
  return _dot(a, b) / (na * nb)


def screen(
  deltas: Mapping[Hashable, Delta], *, max_norm_ratio: float, min_cosine: float, names: str = "islands."
) -> Screen:
  """Screens a round's deltas {island: [arrays of the fragment]} (same shapes for every island).

  max_norm_ratio: reject k if norm_k > max_norm_ratio x median_{j != k} norm_j; 0 turns it off.
  min_cosine: reject k if cos(delta_k, median_j delta_j) < min_cosine (with >= 3 deltas); -1 turns it off.
  A delta with a NaN or an infinity is always rejected (and left out of the others' references).
  `names` prefixes the setting names in the reasons."""
  norms = {k: global_norm(deltas[k]) for k in deltas}
  broken = {k: "non-finite values (NaN or infinity)" for k, n in norms.items() if not math.isfinite(n)}
  ids = [k for k in deltas if k not in broken]  # the bounds judge the finite ones
  ratios: dict = {}
  for k in ids:
    others = [norms[j] for j in ids if j != k]
    if not others:
      ratios[k] = None
      continue
    ref = float(np.median(others))
    ratios[k] = norms[k] / ref if ref > 0 else (math.inf if norms[k] > 0 else 1.0)
  cosines: dict = {k: None for k in ids}
  note = ""
  if len(ids) >= COSINE_MIN_DELTAS:
    reference = median([deltas[k] for k in ids])
    size = global_norm(reference)
    cosines = {k: _dot(deltas[k], reference) / (norms[k] * size) if norms[k] * size > 0 else None for k in ids}
  elif min_cosine > -1 and len(ids) > 1:
    note = f"cosine bound skipped: {len(ids)} deltas (it needs {COSINE_MIN_DELTAS})"
  rejected = dict(broken)
  for k in ids:
    why = []
    ratio, cos = ratios[k], cosines[k]
    if max_norm_ratio > 0 and ratio is not None and ratio > max_norm_ratio:
      ref = norms[k] / ratio if math.isfinite(ratio) else 0.0
      why.append(
        f"norm {norms[k]:.4g} is {ratio:.4g} x the median of the others' ({ref:.4g}) > {names}max_norm_ratio="
        f"{max_norm_ratio:g}"
      )
    if min_cosine > -1 and cos is not None and cos < min_cosine:
      why.append(
        f"cosine {cos:.4f} to the coordinate-wise median of {len(ids)} deltas < {names}min_cosine={min_cosine:g}"
      )
    if why:
      rejected[k] = "; ".join(why)
  kept = [k for k in ids if k not in rejected]
  ratios.update({k: None for k in broken})
  cosines.update({k: None for k in broken})
  return Screen(kept, rejected, norms, ratios, cosines, note)


def mean(deltas: Sequence[Delta], weights: Sequence[float]) -> list[np.ndarray]:
  """Token-weighted mean: sum_k float32(w_k / sum w) * delta_k, per array, summed in float32 in the
  given order (the leader's DiLoCo outer gradient, bit for bit). `sum(weights)` must be > 0."""
  total = float(sum(weights))
  return [
    sum(np.float32(w / total) * d[j] for d, w in zip(deltas, weights)).astype(np.float32) for j in range(len(deltas[0]))
  ]


def trim_count(n: int, trim: float) -> int:
  """Values dropped from each end of n: floor(trim x n) (scipy.stats.trim_mean's convention), at
  most (n - 1) // 2 so that at least one is kept."""
  return min(int(math.floor(trim * n)), (n - 1) // 2)


def trimmed_mean(deltas: Sequence[Delta], trim: float) -> list[np.ndarray]:
  """Coordinate-wise mean of the middle values: each coordinate's n values sorted, `trim_count(n,
  trim)` dropped from each end, the rest averaged (float32); unweighted."""
  n = len(deltas)
  cut = trim_count(n, trim)
  out = []
  for j in range(len(deltas[0])):
    stacked = np.sort(np.stack([np.asarray(d[j], np.float32) for d in deltas]), axis=0)
    out.append(np.mean(stacked[cut : n - cut], axis=0, dtype=np.float32))
  return out


def median(deltas: Sequence[Delta]) -> list[np.ndarray]:
  """Coordinate-wise median (the mean of the two middle values for an even count; float32); unweighted."""
  return [
    np.median(np.stack([np.asarray(d[j], np.float32) for d in deltas]), axis=0).astype(np.float32)
    for j in range(len(deltas[0]))
  ]


def aggregate(method: str, deltas: Sequence[Delta], weights: Sequence[float], trim: float = 0.25) -> list[np.ndarray]:
  """The round's outer gradient from the kept deltas: `mean` (token-weighted by `weights`),
  `trimmed_mean` (by `trim`) or `median`; each array float32 of its leaf's shape."""
  if not deltas:
    raise ValueError("aggregate needs at least one delta")
  if method == "mean":
    return mean(deltas, weights)
  if method == "trimmed_mean":
    return trimmed_mean(deltas, trim)
  if method == "median":
    return median(deltas)
  raise ValueError(f"islands.aggregate={method!r}: one of {', '.join(AGGREGATES)}")
