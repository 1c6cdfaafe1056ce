"""The model's hyper-parameters: one frozen dataclass, the schema of `config.model`.

Each field declares its default, its one-line doc and its check; `manifold.config`
builds the `ConfigDict` that experiments and `--config.model.x=v` overrides use from it,
and validates a loaded config back into it. Layers receive this object, never the ConfigDict.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from kernels.attention import api as attention_api
from kernels.grouped_matmul import api as grouped_api
from kernels.mhc.tiles import TILE_NAMES, parse_tiles

from manifold.schema import (
  EVEN,
  NONNEGATIVE,
  NONNEGATIVE_FLOAT,
  POSITIVE,
  POSITIVE_FLOAT,
  ConfigError,
  Section,
  field,
  one_of,
  require,
)

MAPPINGS = ("pre", "post", "res")  # the stream mappings H_pre, H_post, H_res (model.hc_mappings)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """Decoder-only transformer hyper-parameters (defaults: a small CPU model)."""

  SECTION = "model"

  vocab_size: int = field(320, ">= the tokenizer's vocabulary; the byte tokenizer has 257 ids", POSITIVE)
  d_model: int = field(256, "D, the residual width", POSITIVE)
  n_layers: int = field(4, "transformer blocks", POSITIVE)
  n_heads: int = field(4, "attention heads", POSITIVE)
  n_kv_heads: int = field(4, "gqa: key/value heads; < n_heads is grouped-query attention", POSITIVE)
  head_dim: int = field(64, "gqa: per-head width", EVEN)
  d_ff: int = field(768, "width of the dense SwiGLU FFN", POSITIVE)
  max_seq_len: int = field(256, "longest sequence the model is built for", POSITIVE)
  rope_theta: float = field(10_000.0, "RoPE base", POSITIVE_FLOAT)
  # RoPE scaling (DeepSeek-V3's YaRN, model/rope.py); the rope_* fields below act only with yarn, where
  # mscale(m) = 0.1 m ln(rope_factor) + 1
  rope_scaling: str = field("none", "none | yarn (attention=mla)", one_of("none", "yarn"))
  rope_factor: float = field(1.0, "yarn: context extension factor", POSITIVE_FLOAT)
  rope_original_max_len: int = field(4096, "yarn: the pre-training context length", POSITIVE)
  rope_beta_fast: float = field(32.0, "yarn: frequencies turning more often over that length are kept", POSITIVE_FLOAT)
  rope_beta_slow: float = field(1.0, "yarn: frequencies turning less often are divided by the factor", POSITIVE_FLOAT)
  rope_mscale: float = field(
    1.0, "yarn: cos / sin scale mscale(rope_mscale) / mscale(rope_mscale_all_dim)", NONNEGATIVE_FLOAT
  )
  rope_mscale_all_dim: float = field(0.0, "yarn: softmax scale times mscale(rope_mscale_all_dim)^2", NONNEGATIVE_FLOAT)
  norm_eps: float = field(1e-6, "RMSNorm epsilon (the mHC paper: 1e-20)", POSITIVE_FLOAT)
  init_std: float = field(0.02, "standard deviation of the normal initialisers", POSITIVE_FLOAT)
  dtype: str = field("float32", "compute dtype (parameters stay float32)", one_of("float32", "bfloat16"))
  attention: str = field("gqa", "gqa | mla (Multi-head Latent Attention)", one_of("gqa", "mla"))
  attention_impl: str = field(
    "auto",
    "auto (cuDNN flash attention on GPU in bf16 / fp16, splash on TPU, matmul on CPU) | cudnn | xla | matmul | splash",
    one_of(*attention_api.IMPLEMENTATIONS),
  )
  q_lora_rank: int = field(0, "mla: query compression rank, 0 for none", NONNEGATIVE)
  kv_lora_rank: int = field(64, "mla: rank of the cached key/value latent", POSITIVE)
  qk_nope_head_dim: int = field(32, "mla: per-head query/key width without RoPE", POSITIVE)
  qk_rope_head_dim: int = field(16, "mla: width of the RoPE key part shared by all heads", EVEN)
  v_head_dim: int = field(32, "mla: per-head value width", POSITIVE)
  ffn: str = field("dense", "dense | moe (DeepSeekMoE)", one_of("dense", "moe"))
  n_routed_experts: int = field(8, "moe: E fine-grained routed experts", POSITIVE)
  n_shared_experts: int = field(1, "moe: always-active experts", NONNEGATIVE)
  experts_per_token: int = field(2, "moe: K", POSITIVE)
  moe_d_ff: int = field(128, "moe: width of each (routed and shared) expert", POSITIVE)
  n_group: int = field(1, "moe: expert groups for group-limited routing (1: off)", POSITIVE)
  topk_group: int = field(1, "moe: groups a token may route into", POSITIVE)
  routed_scaling_factor: float = field(1.0, "moe: scale of the normalised gate weights", POSITIVE_FLOAT)
  norm_topk_prob: bool = field(True, "moe: normalise the K gate weights to sum 1 before scaling")
  first_k_dense_replace: int = field(0, "moe: the first k blocks keep a dense FFN", NONNEGATIVE)
  moe_impl: str = field(
    "auto", "auto (ragged) | ragged (tokens sorted by expert, grouped matmul) | dense (every expert on every token)",
    one_of("auto", "ragged", "dense"),
  )  # fmt: skip
  grouped_matmul_impl: str = field(
    "auto", "ragged's grouped matmul: auto (Pallas on GPU, megablox on TPU, blocked on CPU, xla elsewhere) | "
    "xla | blocked | triton | mosaic_gpu | megablox | tokamax",
    one_of(*(name for name in grouped_api.IMPLEMENTATIONS if name != "interpret")),  # interpret: the kernel tests'
  )  # fmt: skip
  expert_capacity_factor: float = field(
    2.0, "moe, expert parallel: rows a device sends another per exchange round, in even splits (N K / ep); "
    "rows past it go in more rounds (nothing is dropped); 0: one round sized for the worst case",
    NONNEGATIVE_FLOAT,
  )  # fmt: skip
  mtp_depth: int = field(0, "D multi-token-prediction modules (DeepSeek-V3), 0 for none", NONNEGATIVE)
  residual: str = field(
    "plain", "plain | hc | mhc | mhc_lite (see manifold/model/residual.py)", one_of("plain", "hc", "mhc", "mhc_lite")
  )
  streams: int = field(4, "n residual streams of hc / mhc / mhc_lite", POSITIVE)
  mhc_sinkhorn: str = field(
    "exp", "exp (mHC paper) | log (same, in the log domain) | softmax_eps (DeepSeek-V4)",
    one_of("exp", "log", "softmax_eps"),
  )  # fmt: skip
  sinkhorn_iters: int = field(20, "t_max", POSITIVE)
  mhc_alpha_init: float = field(0.01, "initial gates alpha of mhc / mhc_lite", NONNEGATIVE_FLOAT)
  hc_scale_init: float = field(0.01, "initial scales of HC's dynamic parts", NONNEGATIVE_FLOAT)
  hc_mappings: str = field(
    "pre,post,res",
    "the stream mappings hc / mhc / mhc_lite learn; the others are fixed as in the mHC paper's Table 1 "
    "(H_pre 1/n each, H_post 1, H_res I)",
  )
  mhc_impl: str = field(
    "auto", "mhc stream mixing: auto (Pallas kernels on GPU / TPU, jnp elsewhere) | pallas | xla",
    one_of("auto", "pallas", "xla"),
  )  # fmt: skip
  mhc_tiles: str = field("", f"the mHC kernels' tiles as name=value,...: {', '.join(TILE_NAMES)}")
  remat: str = field(
    "none", "what each block keeps for the backward pass: none (all) | dots (matmul outputs) | full",
    one_of("none", "dots", "full"),
  )  # fmt: skip

  def check(self) -> None:
    try:
      parse_tiles(self.mhc_tiles)
    except ValueError as e:
      raise ConfigError(f"model.mhc_tiles={self.mhc_tiles!r}: {e}") from None
    require(
      self.n_heads % self.n_kv_heads == 0,
      f"model.n_kv_heads={self.n_kv_heads}: must divide model.n_heads={self.n_heads}",
    )
    mappings = self.learned_mappings
    require(
      bool(self.hc_mappings) and set(mappings) <= set(MAPPINGS) and len(set(mappings)) == len(mappings),
      f"model.hc_mappings={self.hc_mappings!r}: name one or more of {','.join(MAPPINGS)}, comma-separated",
    )
    require(
      self.residual != "mhc_lite" or self.streams <= 6,
      f"model.streams={self.streams}: mhc_lite mixes all n! permutations; use n <= 6 (or model.residual=mhc)",
    )
    if self.ffn == "moe":
      e, k, groups = self.n_routed_experts, self.experts_per_token, self.n_group
      require(k <= e, f"model.experts_per_token={k}: must be <= model.n_routed_experts={e}")
      require(
        e % groups == 0 and (groups == 1 or e // groups >= 2),
        f"model.n_group={groups}: must divide model.n_routed_experts={e} into groups of >= 2",
      )
      require(self.topk_group <= groups, f"model.topk_group={self.topk_group}: must be <= model.n_group={groups}")
      require(
        k <= self.topk_group * (e // groups),
        f"model.experts_per_token={k}: more than the {self.topk_group} allowed groups hold",
      )
    require(
      self.rope_scaling == "none" or self.attention == "mla",
      f"model.rope_scaling={self.rope_scaling!r}: implemented for attention='mla' (DeepSeek-V3); "
      f"use model.attention=mla",
    )
    require(
      self.mhc_impl != "pallas" or (self.residual == "mhc" and self.mhc_sinkhorn in ("exp", "softmax_eps")),
      f"model.mhc_impl='pallas': the kernels fuse residual=mhc with mhc_sinkhorn exp or softmax_eps, not "
      f"residual={self.residual!r}, mhc_sinkhorn={self.mhc_sinkhorn!r}; use model.mhc_impl=auto or xla",
    )
    require(
      self.mhc_impl != "pallas" or len(mappings) == len(MAPPINGS),
      f"model.mhc_impl='pallas': the kernels learn every mapping, not only model.hc_mappings={self.hc_mappings!r}; "
      "use model.mhc_impl=auto or xla",
    )

  @property
  def learned_mappings(self) -> tuple[str, ...]:
    """The stream mappings `hc_mappings` names (the others are fixed)."""
    return tuple(self.hc_mappings.split(","))

  def is_moe_block(self, index: int) -> bool:
    """Whether block `index` has a routed MoE FFN (the first `first_k_dense_replace` stay dense)."""
    return self.ffn == "moe" and index >= self.first_k_dense_replace

  @property
  def moe_blocks(self) -> list[int]:
    """The indices of the MoE blocks, in depth order (the rows of ModelAux.expert_load)."""
    return [i for i in range(self.n_layers) if self.is_moe_block(i)]

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

  @property
  def value_head_dim(self) -> int:
    return self.v_head_dim if self.attention == "mla" else self.head_dim
