"""The model's hyper-parameters as one frozen dataclass, built from `config.model`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer hyper-parameters.

  `n_kv_heads < n_heads` gives grouped-query attention; `dtype` is the compute
  dtype (parameters are always stored in float32).
  """

  vocab_size: int = 320
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 64
  d_ff: int = 768
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = "float32"
  attention_impl: str = "auto"  # auto (cudnn on GPU in 16-bit compute) | cudnn | xla
  attention: str = "gqa"  # gqa | mla
  q_lora_rank: int = 0  # mla: query compression rank (0: none)
  kv_lora_rank: int = 64  # mla: latent rank
  qk_nope_head_dim: int = 32  # mla
  qk_rope_head_dim: int = 16  # mla: the shared RoPE key part
  v_head_dim: int = 32  # mla
  ffn: str = "dense"  # dense | moe
  n_routed_experts: int = 8  # moe: E
  n_shared_experts: int = 1  # moe
  experts_per_token: int = 2  # moe: K
  moe_d_ff: int = 128  # moe: width of each (routed and shared) expert
  n_group: int = 1  # moe: expert groups for group-limited routing (1: off)
  topk_group: int = 1  # moe: groups each token may route into
  routed_scaling_factor: float = 1.0  # moe
  norm_topk_prob: bool = True  # moe: normalise the K gate weights to sum 1 before scaling
  first_k_dense_replace: int = 0  # moe: the first k blocks keep a dense FFN
  moe_impl: str = "ragged"  # ragged (sorted grouped matmul) | dense (every expert on every token)
  grouped_matmul: str = "auto"  # ragged's kernel: auto (fastest measured on the backend) | xla | triton | mosaic_gpu
  mtp_depth: int = 0  # D multi-token-prediction modules (0: none)
  residual: str = "plain"  # plain | hc | mhc | mhc_lite
  streams: int = 4  # n, the residual streams of hc / mhc / mhc_lite
  mhc_sinkhorn: str = "exp"  # exp (paper) | log (same, log domain) | softmax_eps (DeepSeek-V4)
  sinkhorn_iters: int = 20  # t_max
  mhc_alpha_init: float = 0.01  # initial gates alpha of mhc / mhc_lite
  hc_scale_init: float = 0.01  # initial scales s of HC's dynamic parts
  mhc_impl: str = "auto"  # mhc stream mixing: auto (pallas on GPU / TPU) | pallas | xla (kernels/mhc/api.py)
  mhc_tiles: str = ""  # the mHC kernels' tiles, e.g. "block_tokens=16,num_stages=2" ("": the backend's defaults)
  remat: str = "none"  # none | dots (keep matmul outputs) | full (keep only each block's input)

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """Builds from a `ConfigDict` (or mapping) whose keys are this class's fields."""
    return cls(**dict(model_cfg))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

  @property
  def value_head_dim(self) -> int:
    return self.v_head_dim if self.attention == "mla" else self.head_dim
