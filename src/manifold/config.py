"""The configuration schema, experiment loading with overrides, and validation.

Every experiment file in `experiments/` defines `get_config(arg) -> ConfigDict`
starting from `base_config()`, so all runs share one schema. `load_config`
reads `path[:arg]` plus `--config.a.b=v` overrides (ml_collections' own parser),
and `validate` turns a bad value into one `ConfigError` line that names the
field, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags
from kernels.mhc.tiles import parse_tiles
from ml_collections import config_flags


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """Every field any run reads, with defaults suited to a small CPU run."""
  c = ml_collections.ConfigDict()
  c.model = dict(
    vocab_size=320,  # >= the tokenizer's vocabulary; the byte tokenizer has 257 ids
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=4,  # < n_heads: grouped-query attention
    head_dim=64,
    d_ff=768,
    max_seq_len=256,
    rope_theta=10_000.0,
    norm_eps=1e-6,
    init_std=0.02,
    dtype="float32",  # compute dtype: float32 | bfloat16 (parameters stay float32)
    attention_impl="auto",  # auto (cuDNN flash attention on GPU in bf16 / fp16) | cudnn | xla
    attention="gqa",  # gqa | mla (Multi-head Latent Attention)
    q_lora_rank=0,  # mla: query compression rank, 0 for none
    kv_lora_rank=64,  # mla: rank of the cached key/value latent
    qk_nope_head_dim=32,  # mla: per-head query/key width without RoPE
    qk_rope_head_dim=16,  # mla: width of the RoPE key part shared by all heads
    v_head_dim=32,  # mla: per-head value width
    ffn="dense",  # dense | moe (DeepSeekMoE)
    n_routed_experts=8,  # moe: E fine-grained routed experts
    n_shared_experts=1,  # moe: always-active experts
    experts_per_token=2,  # moe: K
    moe_d_ff=128,  # moe: width of each expert
    n_group=1,  # moe: expert groups for group-limited routing (1: off)
    topk_group=1,  # moe: groups a token may route into
    routed_scaling_factor=1.0,  # moe: scale of the normalised gate weights
    norm_topk_prob=True,  # moe: normalise the K gate weights to sum 1
    first_k_dense_replace=0,  # moe: the first k blocks keep a dense FFN
    moe_impl="ragged",  # ragged (tokens sorted by expert, grouped matmul) | dense (reference)
    grouped_matmul="auto",  # ragged's kernel: auto (fastest measured: Pallas on GPU, XLA elsewhere) | xla | triton | mosaic_gpu
    mtp_depth=0,  # D multi-token-prediction modules (DeepSeek-V3), 0 for none
    residual="plain",  # plain | hc | mhc | mhc_lite (see manifold/model/residual.py)
    streams=4,  # n residual streams for hc / mhc / mhc_lite
    mhc_sinkhorn="exp",  # exp (mHC paper) | log (same, in the log domain) | softmax_eps (DeepSeek-V4)
    sinkhorn_iters=20,  # t_max
    mhc_alpha_init=0.01,  # initial gates alpha of mhc / mhc_lite
    hc_scale_init=0.01,  # initial scales of HC's dynamic parts
    mhc_impl="auto",  # mhc mixing: auto (Pallas kernels on GPU / TPU, XLA on CPU) | pallas | xla
    mhc_tiles="",  # the mHC kernels' tiles as name=value,...: block_tokens, chunk, num_warps, num_stages
    remat="none",  # what each block keeps for the backward pass: none (all) | dots (matmul outputs) | full
  )
  c.data = dict(
    sources="stdlib",  # "stdlib" or comma-separated files / globs (.jsonl reads `jsonl_field`)
    tokenizer="byte",  # "byte" or a tokenizer.json from `manifold tokenizer train`
    jsonl_field="text",
    val_fraction=0.02,  # share of files held out for validation (split by file hash)
    cache_dir="",  # tokenized-data cache; "" means $MANIFOLD_CACHE or ~/.cache/manifold
  )
  c.train = dict(
    seed=0,
    steps=1000,
    batch_size=32,  # global, in sequences
    seq_len=256,  # <= model.max_seq_len
    microbatches=1,  # gradient accumulation: the batch runs as this many equal slices
    learning_rate=3e-3,
    warmup_steps=100,
    lr_schedule="cosine",  # cosine | step (DeepSeek: constant, then drops at lr_decay_at)
    min_lr_ratio=0.1,  # cosine decays to learning_rate * min_lr_ratio
    lr_decay_at="0.8,0.9",  # step: fractions of train.steps where the rate drops ...
    lr_decay_to="0.316,0.1",  # step: ... to these multiples of learning_rate
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    grad_clip=1.0,  # global-norm clip; 0 disables
    log_every=10,
    eval_every=200,
    checkpoint_every=200,
    keep_checkpoints=3,
    peak_tflops_per_device=0.0,  # for MFU; 0 looks the device kind up
    router_bias_rate=0.001,  # moe: gamma of auxiliary-loss-free balancing
    mtp_weight=0.3,  # lambda: the MTP loss term is lambda / D * sum_k CE_k
    balance_loss_weight=1e-4,  # moe: alpha of the sequence-wise balance loss
  )
  c.eval = dict(batch_size=32, num_batches=8)
  # Axis sizes within a slice / node (-1 takes the remaining devices); `dcn` multiplies an
  # axis across slices / nodes (see manifold/parallel/mesh.py).
  c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1, dcn=dict(data=1, fsdp=1, expert=1, tensor=1))
  c.sample = dict(prompt="def ", max_new_tokens=200, temperature=0.8, top_k=0, top_p=0.95, seed=0)
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a variant string `"tiny"` or `"size=tiny,steps=100"` against typed defaults.

  A bare first item sets the first default's key. Values take the type of their default.
  """
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  keys = list(defaults)
  for i, item in enumerate(arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      if i != 0:
        raise ConfigError(f"config argument {item!r}: only the first item may omit 'key='")
      key, value = keys[0], item
    if key not in defaults:
      raise ConfigError(f"config argument {key!r}: unknown; known: {', '.join(keys)}")
    kind = type(defaults[key])
    try:
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected {kind.__name__}") from None
  return out


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `experiments/x.py[:arg]` and applies `--config.a.b=v` overrides, then validates."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config {spec}: no such file {path!r}; pass e.g. experiments/quickstart.py[:variant]")
  cfg = _parse_flags(spec, ())
  for override in overrides:
    dotted = override.removeprefix("--config.").split("=", 1)[0]
    _get(cfg, dotted, hint=f"unknown field in {override!r}; see {path} for the fields")
  if overrides:
    cfg = _parse_flags(spec, overrides)
  validate(cfg)
  return cfg


def _parse_flags(spec: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  argv = ["manifold", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    cfg = values.config
    cfg.get("model")  # the flag defers loading errors to the first access
    return cfg
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001 -- errors raised by user config code or the flag parser
    message = str(e.__cause__ or e).strip()
    if "Traceback" in message:  # an exception raised inside the config file's get_config
      message = message.splitlines()[-1].split(": ", 1)[-1]
    raise ConfigError(f"--config {spec}: {_one_line(message)}") from None


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a config saved with `cfg.to_json()` (as written into every run directory)."""
  cfg = base_config()
  cfg.update(ml_collections.ConfigDict(json.loads(text)))
  validate(cfg)
  return cfg


def _one_line(message: str) -> str:
  return " ".join(message.split())


# --- validation ------------------------------------------------------------------

Check = tuple[Callable[[Any], bool], str]

_POS_INT: Check = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
_NONNEG_INT: Check = (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
_POS_FLOAT: Check = (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number > 0")
_NONNEG_FLOAT: Check = (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, "a finite number >= 0")
_UNIT: Check = (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a number in [0, 1]")
_OPEN_UNIT: Check = (lambda v: isinstance(v, (int, float)) and 0 < v < 1, "a number in (0, 1)")
_MESH_AXIS: Check = (lambda v: isinstance(v, int) and (v > 0 or v == -1), "a positive integer or -1")
_STR: Check = (lambda v: isinstance(v, str) and v != "", "a non-empty string")


def _floats(text: str) -> list[float] | None:
  """'0.8,0.9' -> [0.8, 0.9]; None where an item is not a number."""
  try:
    return [float(item) for item in text.split(",") if item.strip()]
  except ValueError:
    return None


def _one_of(*allowed: str) -> Check:
  return (lambda v: v in allowed, "one of " + ", ".join(repr(a) for a in allowed))


_FIELD_CHECKS: dict[str, Check] = {
  "model.vocab_size": _POS_INT,
  "model.d_model": _POS_INT,
  "model.n_layers": _POS_INT,
  "model.n_heads": _POS_INT,
  "model.n_kv_heads": _POS_INT,
  "model.head_dim": (
    lambda v: isinstance(v, int) and v > 0 and v % 2 == 0,
    "a positive even integer (RoPE rotates pairs)",
  ),
  "model.d_ff": _POS_INT,
  "model.max_seq_len": _POS_INT,
  "model.rope_theta": _POS_FLOAT,
  "model.norm_eps": _POS_FLOAT,
  "model.init_std": _POS_FLOAT,
  "model.dtype": _one_of("float32", "bfloat16"),
  "model.attention_impl": _one_of("auto", "cudnn", "xla"),
  "model.attention": _one_of("gqa", "mla"),
  "model.q_lora_rank": _NONNEG_INT,
  "model.kv_lora_rank": _POS_INT,
  "model.qk_nope_head_dim": _POS_INT,
  "model.qk_rope_head_dim": (
    lambda v: isinstance(v, int) and v > 0 and v % 2 == 0,
    "a positive even integer (RoPE rotates pairs)",
  ),
  "model.v_head_dim": _POS_INT,
  "model.ffn": _one_of("dense", "moe"),
  "model.n_routed_experts": _POS_INT,
  "model.n_shared_experts": _NONNEG_INT,
  "model.experts_per_token": _POS_INT,
  "model.moe_d_ff": _POS_INT,
  "model.n_group": _POS_INT,
  "model.topk_group": _POS_INT,
  "model.routed_scaling_factor": _POS_FLOAT,
  "model.norm_topk_prob": (lambda v: isinstance(v, bool), "true or false"),
  "model.first_k_dense_replace": _NONNEG_INT,
  "model.moe_impl": _one_of("ragged", "dense"),
  "model.grouped_matmul": _one_of("auto", "xla", "triton", "mosaic_gpu"),
  "model.mtp_depth": _NONNEG_INT,
  "model.residual": _one_of("plain", "hc", "mhc", "mhc_lite"),
  "model.streams": _POS_INT,
  "model.mhc_sinkhorn": _one_of("exp", "log", "softmax_eps"),
  "model.sinkhorn_iters": _POS_INT,
  "model.mhc_alpha_init": _NONNEG_FLOAT,
  "model.hc_scale_init": _NONNEG_FLOAT,
  "model.remat": _one_of("none", "dots", "full"),
  "model.mhc_impl": _one_of("auto", "pallas", "xla"),
  "model.mhc_tiles": (lambda v: isinstance(v, str), "a string of name=value,... ('' for the defaults)"),
  "data.sources": _STR,
  "data.tokenizer": _STR,
  "data.jsonl_field": _STR,
  "data.val_fraction": _OPEN_UNIT,
  "train.seed": _NONNEG_INT,
  "train.steps": _POS_INT,
  "train.batch_size": _POS_INT,
  "train.seq_len": _POS_INT,
  "train.microbatches": _POS_INT,
  "train.learning_rate": _POS_FLOAT,
  "train.warmup_steps": _NONNEG_INT,
  "train.lr_schedule": _one_of("cosine", "step"),
  "train.min_lr_ratio": _UNIT,
  "train.lr_decay_at": (
    lambda v: isinstance(v, str) and _floats(v) is not None and all(0 < f < 1 for f in _floats(v)),
    "comma-separated fractions in (0, 1), e.g. '0.8,0.9'",
  ),
  "train.lr_decay_to": (
    lambda v: isinstance(v, str) and _floats(v) is not None and all(0 <= f <= 1 for f in _floats(v)),
    "comma-separated multiples in [0, 1], e.g. '0.316,0.1'",
  ),
  "train.weight_decay": _NONNEG_FLOAT,
  "train.b1": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
  "train.b2": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
  "train.eps": _POS_FLOAT,
  "train.grad_clip": _NONNEG_FLOAT,
  "train.log_every": _POS_INT,
  "train.eval_every": _POS_INT,
  "train.checkpoint_every": _POS_INT,
  "train.keep_checkpoints": _POS_INT,
  "train.peak_tflops_per_device": _NONNEG_FLOAT,
  "train.router_bias_rate": _NONNEG_FLOAT,
  "train.mtp_weight": _NONNEG_FLOAT,
  "train.balance_loss_weight": _NONNEG_FLOAT,
  "eval.batch_size": _POS_INT,
  "eval.num_batches": _POS_INT,
  "mesh.data": _MESH_AXIS,
  "mesh.fsdp": _MESH_AXIS,
  "mesh.expert": _MESH_AXIS,
  "mesh.tensor": _MESH_AXIS,
  "mesh.dcn.data": _POS_INT,
  "mesh.dcn.fsdp": _POS_INT,
  "mesh.dcn.expert": _POS_INT,
  "mesh.dcn.tensor": _POS_INT,
  "sample.max_new_tokens": _NONNEG_INT,
  "sample.temperature": _NONNEG_FLOAT,
  "sample.top_k": _NONNEG_INT,
  "sample.top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
  "sample.seed": _NONNEG_INT,
}


def _get(
  cfg: ml_collections.ConfigDict, dotted: str, hint: str = "missing; build configs from manifold.config.base_config()"
) -> Any:
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"{dotted}: {hint}")
    node = node[part]
  return node


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first invalid field, its value and what is allowed."""
  for field, (is_valid, allowed) in _FIELD_CHECKS.items():
    value = _get(cfg, field)
    is_flag = field == "model.norm_topk_prob"
    _require((is_flag or not isinstance(value, bool)) and is_valid(value), f"{field}={value!r}: must be {allowed}")
  m, t = cfg.model, cfg.train
  try:
    parse_tiles(m.mhc_tiles)
  except ValueError as e:
    raise ConfigError(f"model.mhc_tiles={m.mhc_tiles!r}: {e}") from None
  _require(m.n_heads % m.n_kv_heads == 0, f"model.n_kv_heads={m.n_kv_heads}: must divide model.n_heads={m.n_heads}")
  _require(
    m.residual != "mhc_lite" or m.streams <= 6,
    f"model.streams={m.streams}: mhc_lite mixes all n! permutations; use n <= 6 (or model.residual=mhc)",
  )
  if m.ffn == "moe":
    _require(
      m.experts_per_token <= m.n_routed_experts,
      f"model.experts_per_token={m.experts_per_token}: must be <= model.n_routed_experts={m.n_routed_experts}",
    )
    _require(
      m.n_routed_experts % m.n_group == 0 and (m.n_group == 1 or m.n_routed_experts // m.n_group >= 2),
      f"model.n_group={m.n_group}: must divide model.n_routed_experts={m.n_routed_experts} into groups of >= 2",
    )
    _require(m.topk_group <= m.n_group, f"model.topk_group={m.topk_group}: must be <= model.n_group={m.n_group}")
    _require(
      m.experts_per_token <= m.topk_group * (m.n_routed_experts // m.n_group),
      f"model.experts_per_token={m.experts_per_token}: more than the {m.topk_group} allowed groups hold",
    )
  _require(
    m.mhc_impl != "pallas" or (m.residual == "mhc" and m.mhc_sinkhorn in ("exp", "softmax_eps")),
    f"model.mhc_impl='pallas': the kernels fuse residual=mhc with mhc_sinkhorn exp or softmax_eps, not "
    f"residual={m.residual!r}, mhc_sinkhorn={m.mhc_sinkhorn!r}; use model.mhc_impl=auto or xla",
  )
  _require(m.mtp_depth < t.seq_len, f"model.mtp_depth={m.mtp_depth}: must be < train.seq_len={t.seq_len}")
  _require(t.seq_len <= m.max_seq_len, f"train.seq_len={t.seq_len}: must be <= model.max_seq_len={m.max_seq_len}")
  _require(t.warmup_steps < t.steps, f"train.warmup_steps={t.warmup_steps}: must be < train.steps={t.steps}")
  _require(
    t.batch_size % t.microbatches == 0,
    f"train.microbatches={t.microbatches}: must divide train.batch_size={t.batch_size}",
  )
  _require(
    t.lr_schedule != "step" or all(f * t.steps > t.warmup_steps for f in _floats(t.lr_decay_at)),
    f"train.lr_decay_at={t.lr_decay_at!r}: every drop must come after train.warmup_steps={t.warmup_steps} "
    f"of train.steps={t.steps}",
  )
  _require(
    len(_floats(t.lr_decay_at)) == len(_floats(t.lr_decay_to)),
    f"train.lr_decay_to={t.lr_decay_to!r}: give one multiple per train.lr_decay_at={t.lr_decay_at!r} fraction",
  )
  _require(len(cfg.sample.prompt) > 0, "sample.prompt='': must be a non-empty string")
  free = [a for a in ("data", "fsdp", "expert", "tensor") if cfg.mesh[a] == -1]
  _require(len(free) <= 1, f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}")
