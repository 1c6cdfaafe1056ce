"""`manifold ledger`: per-contributor credit from one or more verified ledgers, as a table and a PNG."""

from __future__ import annotations

import os

from matplotlib.figure import Figure

from manifold.files import atomic_path


def table(rows: dict[str, dict[str, float]]) -> str:
  """The per-contributor totals (`ledger.totals`), largest credit first, with each one's share of
  the accepted FLOPs: what a reward market would pay on."""
  total = sum(r["flops"] for r in rows.values()) or 1.0
  lines = [f"{'contributor':<20} {'accepted':>9} {'rejected':>9} {'tokens':>12} {'model FLOPs':>12} {'share':>7}"]
  for key, r in sorted(rows.items(), key=lambda kv: -kv[1]["flops"]):
    lines.append(
      f"{key[:16] + '...':<20} {r['accepted']:>9d} {r['rejected']:>9d} {r['tokens']:>12d} {r['flops']:>12.3e} "
      f"{r['flops'] / total:>7.1%}"
    )
  return "\n".join(lines)


def plot(rows: dict[str, dict[str, float]], out_path: str | os.PathLike) -> None:
  """Accepted model FLOPs and accepted / rejected batches per contributor."""
  keys = sorted(rows, key=lambda k: -rows[k]["flops"])
  names = [k[:8] for k in keys]
  fig = Figure(figsize=(10, 3.5))  # no pyplot: importing this leaves a notebook's backend alone
  ax_flops, ax_count = fig.subplots(1, 2)
  ax_flops.bar(names, [rows[k]["flops"] for k in keys])
  ax_flops.set(xlabel="contributor (public key)", ylabel="accepted model FLOPs", title="credit")
  ax_count.bar(names, [rows[k]["accepted"] for k in keys], label="accepted")
  ax_count.bar(names, [rows[k]["rejected"] for k in keys], bottom=[rows[k]["accepted"] for k in keys], label="rejected")
  ax_count.set(xlabel="contributor (public key)", ylabel="contributions", title="verdicts")
  ax_count.legend()
  for ax in (ax_flops, ax_count):
    ax.grid(alpha=0.3, axis="y")
    ax.tick_params(axis="x", rotation=45)
  fig.tight_layout()
  with atomic_path(out_path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
