"""Divergence checks on each step's loss, gradient norm and parameter norm (plain Python, no JAX)."""

from __future__ import annotations

import collections
import math
import statistics


class DivergenceCheck:
  """Fed every step's scalars in order; says why the run diverged, or nothing.

  A run has diverged at a step with a non-finite loss, gradient norm or parameter norm; a
  loss above `train.spike_factor` x the median loss of the previous `train.divergence_window`
  steps; a parameter norm above `train.param_norm_factor` x its median over those steps; or,
  for `train.collapse_steps` steps in a row, a gradient norm below `train.grad_norm_floor`
  while the loss did not fall. A step flagged by none of these joins the history.
  """

  def __init__(self, train_cfg):
    self.spike_factor = train_cfg.spike_factor
    self.param_norm_factor = train_cfg.param_norm_factor
    self.grad_norm_floor = train_cfg.grad_norm_floor
    self.losses = collections.deque(maxlen=train_cfg.divergence_window)
    self.param_norms = collections.deque(maxlen=train_cfg.divergence_window)
    self.collapsed = collections.deque(maxlen=train_cfg.collapse_steps)  # losses of the latest steps below the floor

  def update(self, loss: float, grad_norm: float, param_norm: float) -> str | None:
    """Why the step with these values diverged, or None."""
    values = {"loss": loss, "grad_norm": grad_norm, "param_norm": param_norm}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
      return f"non-finite {bad}"
    reason = self._outlier("loss", loss, self.losses, self.spike_factor, "train.spike_factor")
    reason = reason or self._outlier(
      "parameter norm", param_norm, self.param_norms, self.param_norm_factor, "train.param_norm_factor"
    )
    if reason:
      return reason
    if grad_norm < self.grad_norm_floor:
      self.collapsed.append(loss)
    else:
      self.collapsed.clear()
    if len(self.collapsed) == self.collapsed.maxlen and self.collapsed[-1] >= self.collapsed[0]:
      return (
        f"collapsed gradients: grad_norm below train.grad_norm_floor={self.grad_norm_floor:g} for "
        f"{len(self.collapsed)} steps while the loss did not fall ({self.collapsed[0]:.4g} -> {loss:.4g})"
      )
    self.losses.append(loss)
    self.param_norms.append(param_norm)
    return None

  def before_save(self) -> str | None:
    """Why the newest step must not be checkpointed: its gradient norm is below the floor."""
    if self.collapsed:
      return (
        f"collapsed gradients: grad_norm below train.grad_norm_floor={self.grad_norm_floor:g} "
        f"for the last {len(self.collapsed)} step(s), at a checkpoint step"
      )
    return None

  @staticmethod
  def _outlier(name: str, value: float, history, factor: float, field: str) -> str | None:
    if not factor or not history:
      return None
    median = statistics.median(history)
    if value <= factor * median:
      return None
    return f"{name} {value:.4g} > {field}={factor:g} x its median {median:.4g} over the previous {len(history)} steps"
