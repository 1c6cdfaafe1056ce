"""Sorted Merkle trees over sha256 leaves: roots, and proofs that a leaf is or is not in a tree.

A leaf is `sha256(0x00 || item)` and a node `sha256(0x01 || left || right)` (the prefixes keep a
leaf from passing for a node, as in RFC 6962); an unpaired node moves up a level unchanged. The
leaves are sorted and unique, so a leaf's absence is shown by its two neighbours: consecutive
leaves of the tree, one below and one above it (or the first leaf above it, or the last below).
A proof carries its leaf's index and the tree's size, from which the verifier derives which side
each sibling is on, so a proof cannot claim another position.
"""

from __future__ import annotations

import dataclasses
import hashlib
from bisect import bisect_left
from typing import Sequence


def leaf_hash(item: bytes) -> bytes:
  return hashlib.sha256(b"\x00" + item).digest()


def _node(left: bytes, right: bytes) -> bytes:
  return hashlib.sha256(b"\x01" + left + right).digest()


@dataclasses.dataclass(frozen=True)
class Inclusion:
  """Leaf `leaf` is number `index` of a tree of `size` leaves whose path upward has `siblings`."""

  leaf: bytes
  index: int
  size: int
  siblings: tuple[bytes, ...]

  def root(self) -> bytes:
    """The root this proof leads to (compare with the tree's)."""
    if not 0 <= self.index < self.size:
      raise ValueError(f"index {self.index} outside a tree of {self.size} leaves")
    node, index, width, used = self.leaf, self.index, self.size, 0
    while width > 1:
      if index % 2 == 1:
        node = _node(self.siblings[used], node)
        used += 1
      elif index + 1 < width:
        node = _node(node, self.siblings[used])
        used += 1
      index, width = index // 2, (width + 1) // 2
    if used != len(self.siblings):
      raise ValueError("the proof has siblings its path does not use")
    return node

  def to_json(self) -> dict:
    return {
      "leaf": self.leaf.hex(),
      "index": self.index,
      "size": self.size,
      "siblings": [s.hex() for s in self.siblings],
    }

  @classmethod
  def from_json(cls, d: dict) -> Inclusion:
    return cls(
      bytes.fromhex(d["leaf"]), int(d["index"]), int(d["size"]), tuple(bytes.fromhex(s) for s in d["siblings"])
    )


class Tree:
  """The sorted Merkle tree of some leaf hashes (duplicates count once)."""

  def __init__(self, leaves: Sequence[bytes]):
    self.leaves = sorted(set(leaves))
    self.levels = [self.leaves]
    while len(self.levels[-1]) > 1:
      below = self.levels[-1]
      self.levels.append(
        [_node(*below[i : i + 2]) if i + 1 < len(below) else below[i] for i in range(0, len(below), 2)]
      )

  @property
  def root(self) -> bytes:
    """The root; sha256 of nothing for an empty tree."""
    return self.levels[-1][0] if self.leaves else hashlib.sha256(b"").digest()

  def inclusion(self, index: int) -> Inclusion:
    siblings, i = [], index
    for level in self.levels[:-1]:
      pair = i ^ 1
      if pair < len(level):
        siblings.append(level[pair])
      i //= 2
    return Inclusion(self.leaves[index], index, len(self.leaves), tuple(siblings))

  def prove(self, leaf: bytes) -> tuple[bool, list[Inclusion]]:
    """(present, proofs): the leaf's own inclusion, or that of its neighbours (one or two)."""
    at = bisect_left(self.leaves, leaf)
    if at < len(self.leaves) and self.leaves[at] == leaf:
      return True, [self.inclusion(at)]
    return False, [self.inclusion(i) for i in (at - 1, at) if 0 <= i < len(self.leaves)]


def check(leaf: bytes, present: bool, proofs: Sequence[Inclusion], root: bytes) -> bool:
  """Whether `proofs` show, against `root`, that `leaf` is (present) or is not in the tree."""
  try:
    if not proofs or any(p.root() != root for p in proofs) or len({p.size for p in proofs}) != 1:
      return False
  except (ValueError, IndexError):  # a malformed proof: an index outside the tree, too few or too many siblings
    return False
  size = proofs[0].size
  if present:
    return len(proofs) == 1 and proofs[0].leaf == leaf
  if len(proofs) == 2:
    below, above = proofs
    return below.index + 1 == above.index and below.leaf < leaf < above.leaf
  (only,) = proofs
  return (only.index == 0 and leaf < only.leaf) or (only.index == size - 1 and only.leaf < leaf)
