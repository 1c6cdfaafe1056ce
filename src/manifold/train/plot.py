"""The loss-curve PNG written into every run directory."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from manifold.files import atomic_path  # noqa: E402
from manifold.train.metrics import read_metrics  # noqa: E402


def loss_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
  """Training loss and validation bits per byte against step."""
  rows = read_metrics(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
  val = [(r["step"], r["val_bits_per_byte"]) for r in rows if r.get("val_bits_per_byte") is not None]
  fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(10, 3.5))
  if train:
    ax_train.plot(*zip(*train))
  ax_train.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
  if val:
    ax_val.plot(*zip(*val), marker="o")
  ax_val.set(xlabel="step", ylabel="bits per byte", title="validation")
  for ax in (ax_train, ax_val):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with atomic_path(out_path) as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)
