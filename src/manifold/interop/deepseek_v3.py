"""Hugging Face `DeepseekV3ForCausalLM` checkpoints <-> manifold parameters.

HF stores every linear layer as [out, in], the routed experts one by one
(`mlp.experts.{e}.{gate,up,down}_proj`, as the released checkpoints do) and, with
`rope_interleave`, the RoPE channels as interleaved pairs; manifold uses [in, out],
stacked experts [E, ...] and rotate-half pairs. Interleaved pair (2i, 2i+1) becomes
rotate-half pair (i, i + d/2) by permuting the RoPE output channels of the query and
shared-key projections, which reproduces HF's rotated layout exactly.

Import holds about one layer in memory whatever the checkpoint's size: tensors are
memory-mapped from the files that `model.safetensors.index.json` names, converted one
parameter at a time (a layer's routed experts stacked) and each written to a
memory-mapped file before the next is read; orbax then writes step 0 from those files.

Supported: float32 / bfloat16 / float16 weights, FP8 weights as released (float8_e4m3fn
with a float32 `weight_scale_inv` per block, dequantised on import), default or YaRN
RoPE, SiLU, no attention biases.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from manifold.config import ConfigError, model_config, validate
from manifold.model import ModelConfig

INDEX = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}


_NUMBER, _INT = (int, float), int
# The config.json keys the import reads: (JSON type, presence). "required" keys must hold a
# value; "optional" ones may be left out, "nullable" ones also set to null (both take a default).
_SETTINGS: dict[str, tuple[Any, str]] = {
  **dict.fromkeys(
    "vocab_size hidden_size num_hidden_layers num_attention_heads qk_nope_head_dim qk_rope_head_dim "
    "intermediate_size max_position_embeddings kv_lora_rank v_head_dim".split(),
    (_INT, "required"),
  ),
  "rms_norm_eps": (_NUMBER, "required"),
  **dict.fromkeys(
    "q_lora_rank n_routed_experts n_shared_experts num_experts_per_tok moe_intermediate_size n_group topk_group".split(),
    (_INT, "nullable"),
  ),
  "first_k_dense_replace": (_INT, "optional"),
  **dict.fromkeys("rope_theta initializer_range routed_scaling_factor".split(), (_NUMBER, "optional")),
  **dict.fromkeys("norm_topk_prob rope_interleave".split(), (bool, "optional")),
  "attention_bias": (bool, "nullable"),
  **dict.fromkeys("model_type hidden_act".split(), (str, "optional")),
  **dict.fromkeys("rope_parameters rope_scaling quantization_config".split(), (dict, "nullable")),
}
_ROPE_SETTINGS = {"rope_theta": (_NUMBER, "optional"), "rope_type": (str, "optional"), "type": (str, "optional")}
_YARN_SETTINGS = {
  "original_max_position_embeddings": (_INT, "required"),
  **dict.fromkeys("factor beta_fast beta_slow mscale mscale_all_dim".split(), (_NUMBER, "nullable")),
}
_KIND_NAMES = {_INT: "an integer", _NUMBER: "a number", bool: "true or false", str: "a string", dict: "an object"}


def _check_settings(where: str, values: dict[str, Any], settings: dict[str, tuple[Any, str]]) -> None:
  """Refuses a missing required key or a value of the wrong JSON type, naming the key."""
  for key, (kind, presence) in settings.items():
    if key not in values:
      if presence == "required":
        raise ConfigError(f"--from-hf: {where} has no {key!r}; a DeepSeek-V3 config.json sets it")
      continue
    value = values[key]
    if value is None and presence == "nullable":
      continue
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
      raise ConfigError(f"--from-hf: {where} {key}={value!r}: must be {_KIND_NAMES[kind]}")


def _yarn_overrides(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
  """`model.rope_*` fields for HF's YaRN parameters, with transformers' defaults."""
  _check_settings("config.json's YaRN rope_scaling", rope, _YARN_SETTINGS)
  if rope.get("attention_factor") is not None or not rope.get("truncate", True):
    raise ConfigError(
      "--from-hf: YaRN with attention_factor or truncate=false is not supported (DeepSeek sets neither)"
    )
  mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
  if mscale_all_dim and not mscale:
    raise ConfigError("--from-hf: YaRN with mscale_all_dim but no mscale is not supported; set both, as DeepSeek does")
  original = rope["original_max_position_embeddings"]
  return {
    "rope_scaling": "yarn",
    "rope_factor": float(rope.get("factor") or hf["max_position_embeddings"] / original),
    "rope_original_max_len": int(original),
    "rope_beta_fast": float(rope.get("beta_fast") or 32.0),
    "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
    "rope_mscale": float(mscale) if mscale_all_dim else 1.0,  # transformers uses both or neither
    "rope_mscale_all_dim": float(mscale_all_dim or 0.0),
  }


def fp8_block(hf: dict[str, Any]) -> tuple[int, int] | None:
  """The [out, in] block of an FP8 checkpoint's `weight_scale_inv`s (None when not quantized)."""
  quant = hf.get("quantization_config")
  if not quant:
    return None
  if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
    raise ConfigError(
      f"--from-hf: quantization_config quant_method={quant.get('quant_method')!r} fmt={quant.get('fmt')!r} "
      "is not supported; only block-scaled fp8 e4m3 (as DeepSeek releases) dequantises, else dequantize first"
    )
  block = quant.get("weight_block_size", [128, 128])
  if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
    raise ConfigError(f"--from-hf: quantization_config weight_block_size={block!r}; expected two positive integers")
  return block[0], block[1]


def model_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """`config.model` fields for an HF DeepSeek-V3 `config.json`."""
  if hf.get("model_type") != "deepseek_v3":
    raise ConfigError(f"--from-hf: model_type={hf.get('model_type')!r}; only 'deepseek_v3' checkpoints convert")
  _check_settings("config.json", hf, _SETTINGS)
  fp8_block(hf)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  _check_settings("config.json's RoPE parameters", rope, _ROPE_SETTINGS)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "yarn"):
    raise ConfigError(f"--from-hf: RoPE scaling {rope_type!r} is not implemented; default RoPE and 'yarn' convert")
  if hf.get("attention_bias") or hf.get("hidden_act", "silu") != "silu":
    raise ConfigError("--from-hf: attention biases and activations other than silu are not supported")
  moe = bool(hf.get("n_routed_experts"))
  return {
    "vocab_size": hf["vocab_size"],
    "d_model": hf["hidden_size"],
    "n_layers": hf["num_hidden_layers"],
    "n_heads": hf["num_attention_heads"],
    "n_kv_heads": hf["num_attention_heads"],
    "head_dim": hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"],
    "d_ff": hf["intermediate_size"],
    "max_seq_len": hf["max_position_embeddings"],
    "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
    **(_yarn_overrides(hf, rope) if rope_type == "yarn" else {"rope_scaling": "none"}),
    "norm_eps": hf["rms_norm_eps"],
    "init_std": hf.get("initializer_range", 0.02),
    "attention": "mla",
    "q_lora_rank": hf.get("q_lora_rank") or 0,
    "kv_lora_rank": hf["kv_lora_rank"],
    "qk_nope_head_dim": hf["qk_nope_head_dim"],
    "qk_rope_head_dim": hf["qk_rope_head_dim"],
    "v_head_dim": hf["v_head_dim"],
    "ffn": "moe" if moe else "dense",
    "n_routed_experts": hf.get("n_routed_experts") or 1,
    "n_shared_experts": hf.get("n_shared_experts") or 0,
    "experts_per_token": hf.get("num_experts_per_tok") or 1,
    "moe_d_ff": hf.get("moe_intermediate_size") or hf["intermediate_size"],
    "n_group": hf.get("n_group") or 1,
    "topk_group": hf.get("topk_group") or 1,
    "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
    "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
    "first_k_dense_replace": hf.get("first_k_dense_replace", 0) if moe else hf["num_hidden_layers"],
    "residual": "plain",
    "mtp_depth": 0,  # transformers' DeepseekV3ForCausalLM drops the MTP layers' weights
  }


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """float32 `weight * scale_inv`, one scale per [block] tile (edge tiles partial).

  weight: [O, I] float8_e4m3fn; scale_inv: [ceil(O / bo), ceil(I / bi)] -> [O, I].
  """
  (bo, bi), (o, i) = block, weight.shape
  if scale_inv.shape != (math.ceil(o / bo), math.ceil(i / bi)):
    raise ValueError(f"scale_inv is {scale_inv.shape}, expected one per {bo} x {bi} block of {weight.shape}")
  out = np.array(weight, np.float32)  # [O, I]
  scale = np.repeat(np.asarray(scale_inv, np.float32), bi, axis=1)[:, :i]  # [O / bo, I]
  for r in range(scale.shape[0]):
    out[r * bo : (r + 1) * bo] *= scale[r]
  return out


class HFTensors(Mapping[str, np.ndarray]):
  """The tensors of an HF checkpoint's safetensors files, read on access as float32.

  Each access memory-maps the tensor's bytes at the offsets in its file's header (numpy
  has no float8 type, so safetensors' numpy reader cannot return FP8 weights); FP8
  weights come back dequantised and their `*_scale_inv` tensors are not listed.
  """

  def __init__(self, where: dict[str, tuple[str, int, dict[str, Any]]], block: tuple[int, int] | None):
    self._where, self._block = where, block  # name -> (file, data offset, header entry)
    self._names = [n for n in where if not (n.endswith("_scale_inv") and n.removesuffix("_scale_inv") in where)]

  def raw(self, name: str) -> np.ndarray:
    """The stored tensor, memory-mapped (float8 stays float8)."""
    path, offset, entry = self._where[name]
    if entry["dtype"] not in _DTYPES:
      raise ConfigError(f"--from-hf: {name!r} has dtype {entry['dtype']}; supported: {', '.join(_DTYPES)}")
    return np.memmap(path, _DTYPES[entry["dtype"]], "r", offset + entry["data_offsets"][0], tuple(entry["shape"]))

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self.raw(name)
    if tensor.dtype != ml_dtypes.float8_e4m3fn:
      return np.asarray(tensor, np.float32)
    if self._block is None:
      raise ConfigError(f"--from-hf: {name!r} is float8 but config.json has no quantization_config (quant_method fp8)")
    if name + "_scale_inv" not in self._where:
      raise ConfigError(f"--from-hf: {name!r} is float8 but {name + '_scale_inv'!r} is missing from the checkpoint")
    try:
      return dequantize_fp8(tensor, self.raw(name + "_scale_inv"), self._block)
    except ValueError as e:
      raise ConfigError(f"--from-hf: {name!r}: {e}") from None

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self) -> int:
    return len(self._names)

  def __contains__(self, name: object) -> bool:
    return name in self._where


def _deinterleave(n: int) -> np.ndarray:
  """Channel order taking interleaved RoPE pairs (2i, 2i+1) to rotate-half pairs (i, i + n/2)."""
  return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


KeyPath = tuple[str | int, ...]  # e.g. ("params", "blocks", 0, "attn", "wkv_a")


def hf_leaves(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, *, rope_interleave: bool):
  """Yields (path, float32 array) for every manifold parameter, one at a time, e.g.
  (("params", "blocks", 0, "attn", "wkv_a"), a) or (("extra", "blocks", 1, "ffn", "bias"), b)."""
  h, nope, rope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  order = _deinterleave(rope) if rope_interleave else np.arange(rope)
  head_order = np.concatenate([np.arange(nope), nope + order])  # per-head query channels
  used: set[str] = set()

  def take(name):
    if name not in tensors:
      raise ConfigError(f"--from-hf: tensor {name!r} is missing from the checkpoint")
    used.add(name)
    return np.asarray(tensors[name], np.float32)

  def linear(name):  # [out, in] -> [in, out]
    return take(name).T

  def stacked(names):  # [E, in, out], filled one expert at a time
    first = linear(names[0])
    out = np.empty((len(names), *first.shape), np.float32)
    for e, name in enumerate(names):
      out[e] = first if e == 0 else linear(name)
    return out

  yield ("params", "embed", "table"), take("model.embed_tokens.weight")
  yield ("params", "final_norm", "scale"), take("model.norm.weight")
  tied = "lm_head.weight" not in tensors
  yield ("params", "head"), take("model.embed_tokens.weight").T if tied else linear("lm_head.weight")
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    a, at = p + "self_attn.", ("params", "blocks", i, "attn")
    if cfg.q_lora_rank:
      yield at + ("wq_a",), linear(a + "q_a_proj.weight")
      yield at + ("q_norm", "scale"), take(a + "q_a_layernorm.weight")
      wq_b = linear(a + "q_b_proj.weight").reshape(cfg.q_lora_rank, h, nope + rope)
      yield at + ("wq_b",), wq_b[..., head_order]
    else:
      yield at + ("wq",), linear(a + "q_proj.weight").reshape(cfg.d_model, h, nope + rope)[..., head_order]
    wkv_a = linear(a + "kv_a_proj_with_mqa.weight")
    yield at + ("wkv_a",), np.concatenate([wkv_a[:, : cfg.kv_lora_rank], wkv_a[:, cfg.kv_lora_rank :][:, order]], 1)
    yield at + ("kv_norm", "scale"), take(a + "kv_a_layernorm.weight")
    yield at + ("wkv_b",), linear(a + "kv_b_proj.weight").reshape(cfg.kv_lora_rank, h, nope + v)
    yield at + ("wo",), linear(a + "o_proj.weight").reshape(h, v, cfg.d_model)
    yield ("params", "blocks", i, "attn_norm", "scale"), take(p + "input_layernorm.weight")
    yield ("params", "blocks", i, "ffn_norm", "scale"), take(p + "post_attention_layernorm.weight")
    m, ffn = p + "mlp.", ("params", "blocks", i, "ffn")
    if cfg.ffn == "moe" and i >= cfg.first_k_dense_replace:
      yield ffn + ("router",), linear(m + "gate.weight")
      for n in ("gate", "up", "down"):
        yield ffn + (f"w_{n}",), stacked([f"{m}experts.{e}.{n}_proj.weight" for e in range(cfg.n_routed_experts)])
      if cfg.n_shared_experts:
        for n in ("gate", "up", "down"):
          yield ffn + ("shared", f"w_{n}"), linear(f"{m}shared_experts.{n}_proj.weight")
      yield ("extra", "blocks", i, "ffn", "bias"), take(m + "gate.e_score_correction_bias")
    else:
      for n in ("gate", "up", "down"):
        yield ffn + (f"w_{n}",), linear(f"{m}{n}_proj.weight")
  mtp = f"model.layers.{cfg.n_layers}."  # transformers skips the MTP layer's weights; so does manifold
  leftover = sorted(k for k in tensors if k not in used and not k.startswith(mtp))
  if leftover:
    raise ConfigError(f"--from-hf: {len(leftover)} tensors not understood, e.g. {leftover[0]!r}")


def _nest(leaves) -> dict[str, Any]:
  tree: dict[Any, Any] = {}
  for path, leaf in leaves:
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, *, rope_interleave: bool):
  """(params, extra) pure dicts of float32 arrays in manifold's layout, all in memory."""
  tree = _nest(
    (path, np.array(leaf, np.float32, order="C"))
    for path, leaf in hf_leaves(tensors, cfg, rope_interleave=rope_interleave)
  )
  return tree["params"], tree.get("extra", {"blocks": {}})


def params_to_hf(params, extra, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF tensors (float32, per-expert layout, interleaved RoPE) from manifold pure dicts."""
  if cfg.attention != "mla" or cfg.residual != "plain":
    raise ConfigError("--to-hf: DeepSeek-V3 checkpoints need model.attention=mla and model.residual=plain")
  h, nope, rope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  inverse = np.argsort(_deinterleave(rope))
  head_inverse = np.concatenate([np.arange(nope), nope + inverse])
  np_ = lambda x: np.asarray(x, np.float32)  # noqa: E731
  out = {
    "model.embed_tokens.weight": np_(params["embed"]["table"]),
    "model.norm.weight": np_(params["final_norm"]["scale"]),
    "lm_head.weight": np_(params["head"]).T,
  }
  for i in range(cfg.n_layers):
    block, p = params["blocks"][i], f"model.layers.{i}."
    a, attn = p + "self_attn.", block["attn"]
    if cfg.q_lora_rank:
      out[a + "q_a_proj.weight"] = np_(attn["wq_a"]).T
      out[a + "q_a_layernorm.weight"] = np_(attn["q_norm"]["scale"])
      out[a + "q_b_proj.weight"] = np_(attn["wq_b"])[..., head_inverse].reshape(cfg.q_lora_rank, -1).T
    else:
      out[a + "q_proj.weight"] = np_(attn["wq"])[..., head_inverse].reshape(cfg.d_model, -1).T
    wkv_a = np_(attn["wkv_a"])
    out[a + "kv_a_proj_with_mqa.weight"] = np.concatenate(
      [wkv_a[:, : cfg.kv_lora_rank], wkv_a[:, cfg.kv_lora_rank :][:, inverse]], axis=1
    ).T
    out[a + "kv_a_layernorm.weight"] = np_(attn["kv_norm"]["scale"])
    out[a + "kv_b_proj.weight"] = np_(attn["wkv_b"]).reshape(cfg.kv_lora_rank, -1).T
    out[a + "o_proj.weight"] = np_(attn["wo"]).reshape(h * v, cfg.d_model).T
    out[p + "input_layernorm.weight"] = np_(block["attn_norm"]["scale"])
    out[p + "post_attention_layernorm.weight"] = np_(block["ffn_norm"]["scale"])
    m, ffn = p + "mlp.", block["ffn"]
    if "router" in ffn:
      out[m + "gate.weight"] = np_(ffn["router"]).T
      out[m + "gate.e_score_correction_bias"] = np_(extra["blocks"][i]["ffn"]["bias"])
      for e in range(cfg.n_routed_experts):
        for n in ("gate", "up", "down"):
          out[f"{m}experts.{e}.{n}_proj.weight"] = np_(ffn[f"w_{n}"][e]).T
      for n in ("gate", "up", "down"):
        if "shared" in ffn:
          out[f"{m}shared_experts.{n}_proj.weight"] = np_(ffn["shared"][f"w_{n}"]).T
    else:
      for n in ("gate", "up", "down"):
        out[f"{m}{n}_proj.weight"] = np_(ffn[f"w_{n}"]).T
  return {k: np.ascontiguousarray(x) for k, x in out.items()}


def _hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any]:
  """`rope_scaling` as the released V3 config spells it ({} without scaling)."""
  if cfg.rope_scaling == "none":
    return {}
  if not cfg.rope_mscale_all_dim and cfg.rope_mscale != 1:
    raise ConfigError(
      f"--to-hf: model.rope_mscale={cfg.rope_mscale} needs model.rope_mscale_all_dim > 0; transformers reads "
      "mscale only beside mscale_all_dim"
    )
  yarn = {
    "type": "yarn",
    "factor": cfg.rope_factor,
    "original_max_position_embeddings": cfg.rope_original_max_len,
    "beta_fast": cfg.rope_beta_fast,
    "beta_slow": cfg.rope_beta_slow,
    "mscale": cfg.rope_mscale,
    "mscale_all_dim": cfg.rope_mscale_all_dim,
  }
  return {"rope_scaling": yarn}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """An HF `config.json` for a manifold MLA model (RoPE written interleaved, as V3's)."""
  moe = cfg.ffn == "moe"
  return {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.d_ff,
    "moe_intermediate_size": cfg.moe_d_ff,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_heads,
    "q_lora_rank": cfg.q_lora_rank or None,
    "kv_lora_rank": cfg.kv_lora_rank,
    "qk_nope_head_dim": cfg.qk_nope_head_dim,
    "qk_rope_head_dim": cfg.qk_rope_head_dim,
    "v_head_dim": cfg.v_head_dim,
    "n_routed_experts": cfg.n_routed_experts if moe else None,
    "n_shared_experts": cfg.n_shared_experts if moe else None,
    "num_experts_per_tok": cfg.experts_per_token if moe else None,
    "n_group": cfg.n_group,
    "topk_group": cfg.topk_group,
    "routed_scaling_factor": cfg.routed_scaling_factor,
    "norm_topk_prob": cfg.norm_topk_prob,
    "first_k_dense_replace": cfg.first_k_dense_replace if moe else cfg.n_layers,
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.norm_eps,
    "rope_theta": cfg.rope_theta,
    **_hf_rope_scaling(cfg),
    "rope_interleave": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": cfg.init_std,
    "torch_dtype": "float32",
  }


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """(tensor name -> {dtype, shape, data_offsets}, offset of the data) of a safetensors file;
  a file that is empty, truncated or of another format is one ConfigError naming it."""

  def fail(reason: str):
    raise ConfigError(f"--from-hf: {path}: not a safetensors file ({reason}); download it again")

  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      fail(f"{file_size} bytes")
    (size,) = struct.unpack("<Q", head)
    if 8 + size > file_size:
      fail("its header runs past the end of the file: truncated")
    try:
      header = json.loads(f.read(size))
    except ValueError:
      fail("its header is not JSON")
  if not isinstance(header, dict) or not all(isinstance(e, dict) for e in header.values()):
    fail("its header is not a JSON object of tensor entries")
  header.pop("__metadata__", None)
  data_size = file_size - 8 - size
  ints = lambda v: isinstance(v, list) and all(type(i) is int for i in v)  # noqa: E731
  for name, entry in header.items():
    dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
    if not (isinstance(dtype, str) and ints(shape) and ints(offsets) and len(offsets) == 2):
      fail(f"the header entry of {name!r} lacks a dtype, shape or data_offsets")
    start, end = offsets
    if not 0 <= start <= end <= data_size:
      fail(f"{name!r} ends at byte {end} of {data_size} data bytes: truncated")
    expected = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else end - start
    if end - start != expected:
      fail(f"{name!r} spans {end - start} bytes, not the {expected} its dtype and shape take")
  return header, 8 + size


def read_hf_checkpoint(directory: str) -> tuple[dict[str, Any], HFTensors]:
  """(config.json, lazily read tensors) of an HF checkpoint folder.

  With `model.safetensors.index.json` the files its `weight_map` names are read, and each
  tensor must sit where the index says; any other *.safetensors file is refused. Without
  one, every *.safetensors file is read and a tensor may appear in only one of them.
  """

  def fail(message: str):
    raise ConfigError(f"--from-hf {directory}: {message}")

  def read_json(name: str):
    try:
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        return json.load(f)
    except json.JSONDecodeError as e:
      fail(f"{name} is not JSON ({e.msg} at line {e.lineno} column {e.colno}); restore the checkpoint's own {name}")
    except (OSError, UnicodeDecodeError) as e:
      fail(f"cannot read {name} ({e}); restore the checkpoint's own {name}")

  if not os.path.isdir(directory):
    fail("no such folder; pass a Hugging Face checkpoint folder (config.json + *.safetensors)")
  if not os.path.exists(os.path.join(directory, "config.json")):
    fail("no config.json; pass a Hugging Face checkpoint folder")
  config = read_json("config.json")
  if not isinstance(config, dict):
    fail(f"config.json holds a {type(config).__name__}, not an object of settings; restore the checkpoint's own")
  present = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  weight_map: dict[str, str] | None = None
  if os.path.exists(os.path.join(directory, INDEX)):
    index = read_json(INDEX)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      fail(f"{INDEX} has no weight_map")
    stray = [f for f in present if f not in set(weight_map.values())]
    if stray:
      fail(f"{stray[0]} is not in {INDEX}; move it out of the folder (or list its tensors in the index)")
    absent = sorted(set(weight_map.values()) - set(present))
    if absent:
      fail(f"{INDEX} names {absent[0]}, which is not in the folder")
  elif not present:
    fail("no *.safetensors weights")
  where: dict[str, tuple[str, int, dict[str, Any]]] = {}
  for name in sorted(set(weight_map.values())) if weight_map else present:
    header, offset = _safetensors_header(os.path.join(directory, name))
    for tensor, entry in header.items():
      if weight_map is not None and weight_map.get(tensor) != name:
        fail(f"{name} holds {tensor!r}, which {INDEX} does not map to it; regenerate the index")
      if tensor in where:
        fail(f"{tensor!r} is in both {os.path.basename(where[tensor][0])} and {name}; keep one copy")
      where[tensor] = (os.path.join(directory, name), offset, entry)
  missing = sorted(set(weight_map or ()) - set(where))
  if missing:
    fail(f"{INDEX} maps {missing[0]!r} to {weight_map[missing[0]]}, which does not hold it")
  return config, HFTensors(where, fp8_block(config))


def _dotted(path: KeyPath) -> str:
  return ".".join(map(str, path))


def _key_path(path) -> KeyPath:
  return tuple(k.key for k in path)


def _to_disk(directory: str, path: KeyPath, array: np.ndarray) -> np.ndarray:
  """A read-only memory map of `array`, written to a .npy file in `directory`."""
  file = os.path.join(directory, _dotted(path) + ".npy")
  out = np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=array.shape)
  out[...] = array
  out.flush()
  return np.load(file, mmap_mode="r")


def _save_step_zero(directory: str, state, data_state: dict[str, Any]) -> None:
  """Writes `state` (numpy leaves) as step 0 of the `Checkpointer` at `directory`, reading
  each leaf as it is written: orbax's numpy handler without its host copy, chunks of at
  most 64 MiB, and plain zarr (with OCDBT the writer's memory grew with the checkpoint)."""
  import jax
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  registry = type_handlers.create_type_handler_registry(
    (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (np.number, type_handlers.ScalarHandler()),
  )
  manager = ocp.CheckpointManager(
    directory,
    item_handlers={  # the items of manifold.train.checkpoint.Checkpointer
      "state": ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry),
      "data": ocp.JsonCheckpointHandler(),
    },
    options=ocp.CheckpointManagerOptions(create=True),
  )
  chunks = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 << 20), state)
  manager.save(
    0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state, save_args=chunks), data=ocp.args.JsonSave(data_state))
  )
  manager.wait_until_finished()
  manager.close()


def _sign_step_zero(cfg, workdir: str, hf_dir: str, state, data_state: dict) -> None:
  """Signs the imported step 0 with the origin {"kind": "hf", "files": {name: blake3}}."""
  from manifold.provenance import tensors
  from manifold.provenance.lineage import Lineage, key_path, load_key

  typed = validate(cfg)
  names = sorted(n for n in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, n)))
  origin = {"kind": "hf", "files": {n: tensors.file_hash(os.path.join(hf_dir, n)) for n in names}}
  lineage = Lineage(workdir, load_key(key_path(typed, workdir)), origin=origin, say=lambda _: None)
  lineage.begin(0, state, data_state)
  lineage.finish(typed.train.keep_checkpoints)
  lineage.ledger.close()


def import_checkpoint(hf_dir: str, workdir: str, base_cfg) -> int:
  """Writes a manifold run directory (config.json + a step-0 checkpoint) for an HF checkpoint.

  `base_cfg` supplies everything but `model` (data, training, sampling). Converted
  parameters go to memory-mapped files under `<workdir>/hf-import` (removed once step 0
  is written), so memory stays about one layer. Returns the number of parameters imported.
  """
  import jax

  from manifold.parallel.mesh import make_mesh
  from manifold.train.checkpoint import Checkpointer
  from manifold.train.optimizer import make_optimizer
  from manifold.train.run import prepare_workdir
  from manifold.train.state import TrainState, make_state_spec

  hf, tensors = read_hf_checkpoint(hf_dir)
  cfg = base_cfg.copy_and_resolve_references()
  cfg.model.update(model_overrides_from_hf(hf))
  cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
  try:
    validate(cfg)
  except ConfigError as e:
    raise ConfigError(f"--from-hf {hf_dir}: config.json gives {e}") from None
  model_cfg = model_config(cfg)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  checkpointer.close()
  if latest is not None:
    raise ConfigError(f"--workdir {workdir}: already holds checkpoints; convert into a new directory")
  prepare_workdir(cfg, workdir)
  abstract = make_state_spec(model_cfg, make_optimizer(cfg.train), make_mesh(cfg.mesh)).abstract
  expected = {("params", *_key_path(p)): a.shape for p, a in jax.tree_util.tree_leaves_with_path(abstract.params)} | {
    ("extra", *_key_path(p)): a.shape for p, a in jax.tree_util.tree_leaves_with_path(abstract.extra)
  }
  staging = os.path.join(workdir, "hf-import")
  os.makedirs(staging, exist_ok=True)
  try:
    written = {}
    for path, array in hf_leaves(tensors, model_cfg, rope_interleave=bool(hf.get("rope_interleave", True))):
      if expected.get(path) != array.shape:
        raise ConfigError(
          f"--from-hf: parameter {_dotted(path)} is {array.shape} after conversion "
          f"but the model expects {expected.get(path)}"
        )
      written[path] = _to_disk(staging, path, array)
    missing = sorted(map(_dotted, set(expected) - set(written)))
    if missing:
      raise ConfigError(f"--from-hf: the checkpoint gives no value for parameter {missing[0]}")

    def leaves(kind, tree):
      return jax.tree_util.tree_map_with_path(lambda p, _: written[(kind, *_key_path(p))], tree)

    state = TrainState(
      step=np.zeros((), np.int32),
      params=leaves("params", abstract.params),
      extra=leaves("extra", abstract.extra),
      # AdamW starts from zero moments and counts: broadcast zeros take no memory
      opt_state=jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), abstract.opt_state),
    )
    data_state = {"epoch": 0, "position": 0, "seed": cfg.train.seed}
    _save_step_zero(checkpointer.directory, state, data_state)
    if validate(cfg).provenance.enabled:  # step 0's manifest: the chain's origin is the HF files
      _sign_step_zero(cfg, workdir, hf_dir, state, data_state)
  finally:
    shutil.rmtree(staging)
  return sum(a.size for path, a in written.items() if path[0] == "params")


def export_checkpoint(workdir: str, out_dir: str) -> int:
  """Writes config.json + model.safetensors (HF DeepSeek-V3 layout) for the newest checkpoint of a run."""
  import jax
  from safetensors.numpy import save_file

  from manifold.train.restore import load_trained

  run = load_trained(workdir, data=False)
  model_cfg = model_config(run.cfg)
  tensors = params_to_hf(jax.device_get(run.state.params), jax.device_get(run.state.extra), model_cfg)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config(model_cfg), f, indent=2)
  return len(tensors)
