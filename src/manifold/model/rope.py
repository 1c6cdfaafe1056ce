"""Rotary position embedding (rotate-half layout), optionally with YaRN scaling (arXiv 2309.00071)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class YaRN:
  """YaRN context extension as DeepSeek-V3 applies it.

  Frequencies that turn fewer than `beta_slow` times over `original_max_len` positions are
  divided by `factor`, those turning more than `beta_fast` times are kept, with a linear
  ramp between. cos / sin are scaled by mscale(mscale) / mscale(mscale_all_dim) and the
  attention softmax scale by mscale(mscale_all_dim)^2, mscale(m) = 0.1 m ln(factor) + 1.
  """

  factor: float
  original_max_len: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0

  def inv_freq(self, dim: int, theta: float) -> np.ndarray:
    """[dim / 2] float32 inverse frequencies, blended between extrapolation and interpolation."""

    def correction_dim(rotations: float) -> float:  # the channel whose wavelength fits `rotations` turns
      return dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(self.beta_fast)), 0)
    high = min(math.ceil(correction_dim(self.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 1e-3), 0, 1)  # 1: interpolate
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    return (inv_freq / self.factor * ramp + inv_freq * (1 - ramp)).astype(np.float32)

  @property
  def cos_sin_scale(self) -> float:
    return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)

  @property
  def softmax_scale(self) -> float:
    """Multiplies the attention softmax scale 1 / sqrt(head_dim)."""
    return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_scaling(cfg) -> YaRN | None:
  """The YaRN scaling of a `ModelConfig` (None for `rope_scaling="none"`)."""
  if cfg.rope_scaling == "none":
    return None
  return YaRN(
    factor=cfg.rope_factor,
    original_max_len=cfg.rope_original_max_len,
    beta_fast=cfg.rope_beta_fast,
    beta_slow=cfg.rope_beta_slow,
    mscale=cfg.rope_mscale,
    mscale_all_dim=cfg.rope_mscale_all_dim,
  )


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float, yarn: YaRN | None = None) -> jax.Array:
  """Rotates pairs (i, i + H/2) of the last axis by position-dependent angles.

  x: [B, T, N, H] (H even); positions: [B, T] int. Computed in float32.
  """
  half = x_btnh.shape[-1] // 2
  if yarn is None:
    inv_freq, scale = theta ** (-jnp.arange(half, dtype=jnp.float32) / half), 1.0  # [H/2]
  else:
    inv_freq, scale = jnp.asarray(yarn.inv_freq(2 * half, theta)), yarn.cos_sin_scale
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = (jnp.cos(angles) * scale)[:, :, None, :]  # [B, T, 1, H/2]
  sin = (jnp.sin(angles) * scale)[:, :, None, :]
  x32 = x_btnh.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)
