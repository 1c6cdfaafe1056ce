"""Hugging Face `DeepseekV3ForCausalLM` checkpoints <-> manifold parameters.

HF stores every linear layer as [out, in], the routed experts one by one
(`mlp.experts.{e}.{gate,up,down}_proj`, as the released checkpoints do) and, with
`rope_interleave`, the RoPE channels as interleaved pairs; manifold uses [in, out],
stacked experts [E, ...] and rotate-half pairs. Interleaved pair (2i, 2i+1) becomes
rotate-half pair (i, i + d/2) by permuting the RoPE output channels of the query and
shared-key projections, which reproduces HF's rotated layout exactly.

Supported: float16 / bfloat16 / float32 weights, default RoPE, SiLU, no attention biases.
Not supported (clear error): FP8 checkpoints (dequantize first), YaRN or other RoPE scaling.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from manifold.config import ConfigError, model_config, validate
from manifold.model import ModelConfig


def model_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """`config.model` fields for an HF DeepSeek-V3 `config.json`."""
  if hf.get("model_type") != "deepseek_v3":
    raise ConfigError(f"--from-hf: model_type={hf.get('model_type')!r}; only 'deepseek_v3' checkpoints convert")
  if hf.get("quantization_config"):
    raise ConfigError("--from-hf: the checkpoint is quantized (FP8); dequantize it to bfloat16 first")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConfigError(f"--from-hf: RoPE scaling {rope_type!r} is not implemented; only default RoPE converts")
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


def _deinterleave(n: int) -> np.ndarray:
  """Channel order taking interleaved RoPE pairs (2i, 2i+1) to rotate-half pairs (i, i + n/2)."""
  return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *, rope_interleave: bool):
  """(params, extra) pure dicts in manifold's layout from HF tensors (float32)."""
  t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  h, nope, rope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  order = _deinterleave(rope) if rope_interleave else np.arange(rope)
  head_order = np.concatenate([np.arange(nope), nope + order])  # per-head query channels

  def take(name):
    if name not in t:
      raise ConfigError(f"--from-hf: tensor {name!r} is missing from the checkpoint")
    return t.pop(name)

  def linear(name):  # [out, in] -> [in, out]
    return take(name).T

  embed = take("model.embed_tokens.weight")
  params: dict[str, Any] = {
    "embed": {"table": embed},
    "final_norm": {"scale": take("model.norm.weight")},
    "head": linear("lm_head.weight") if "lm_head.weight" in t else embed.T.copy(),  # tied: untie
    "blocks": {},
  }
  extra: dict[str, Any] = {"blocks": {}}
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    attn: dict[str, Any] = {}
    if cfg.q_lora_rank:
      attn["wq_a"] = linear(a + "q_a_proj.weight")
      attn["q_norm"] = {"scale": take(a + "q_a_layernorm.weight")}
      attn["wq_b"] = linear(a + "q_b_proj.weight").reshape(cfg.q_lora_rank, h, nope + rope)[..., head_order]
    else:
      attn["wq"] = linear(a + "q_proj.weight").reshape(cfg.d_model, h, nope + rope)[..., head_order]
    wkv_a = linear(a + "kv_a_proj_with_mqa.weight")
    attn["wkv_a"] = np.concatenate([wkv_a[:, : cfg.kv_lora_rank], wkv_a[:, cfg.kv_lora_rank :][:, order]], axis=1)
    attn["kv_norm"] = {"scale": take(a + "kv_a_layernorm.weight")}
    attn["wkv_b"] = linear(a + "kv_b_proj.weight").reshape(cfg.kv_lora_rank, h, nope + v)
    attn["wo"] = linear(a + "o_proj.weight").reshape(h, v, cfg.d_model)
    block = {
      "attn": attn,
      "attn_norm": {"scale": take(p + "input_layernorm.weight")},
      "ffn_norm": {"scale": take(p + "post_attention_layernorm.weight")},
    }
    m = p + "mlp."
    if cfg.ffn == "moe" and i >= cfg.first_k_dense_replace:
      experts = range(cfg.n_routed_experts)
      block["ffn"] = {
        "router": linear(m + "gate.weight"),
        "w_gate": np.stack([linear(f"{m}experts.{e}.gate_proj.weight") for e in experts]),
        "w_up": np.stack([linear(f"{m}experts.{e}.up_proj.weight") for e in experts]),
        "w_down": np.stack([linear(f"{m}experts.{e}.down_proj.weight") for e in experts]),
      }
      if cfg.n_shared_experts:
        block["ffn"]["shared"] = {
          f"w_{n}": linear(f"{m}shared_experts.{n}_proj.weight") for n in ("gate", "up", "down")
        }
      extra["blocks"][i] = {"ffn": {"bias": take(m + "gate.e_score_correction_bias")}}
    else:
      block["ffn"] = {f"w_{n}": linear(f"{m}{n}_proj.weight") for n in ("gate", "up", "down")}
    params["blocks"][i] = block
  leftover = sorted(k for k in t if not k.startswith(f"model.layers.{cfg.n_layers}."))  # MTP layers are skipped
  if leftover:
    raise ConfigError(f"--from-hf: {len(leftover)} tensors not understood, e.g. {leftover[0]!r}")
  return params, extra


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
    "rope_interleave": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": cfg.init_std,
    "torch_dtype": "float32",
  }


def read_hf_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, every tensor of every *.safetensors file) of an HF checkpoint folder."""
  from safetensors.numpy import load_file

  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"--from-hf {directory}: no config.json; pass a Hugging Face checkpoint folder")
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise ConfigError(f"--from-hf {directory}: no *.safetensors weights")
  with open(config_path) as f:
    config = json.load(f)
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(os.path.join(directory, name)))
  return config, tensors


def import_checkpoint(hf_dir: str, workdir: str, base_cfg) -> int:
  """Writes a manifold run directory (config.json + a step-0 checkpoint) for an HF checkpoint.

  `base_cfg` supplies everything but `model` (data, training, sampling). Returns the
  number of parameters imported.
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
  validate(cfg)
  model_cfg = model_config(cfg)
  params, extra = params_from_hf(tensors, model_cfg, rope_interleave=bool(hf.get("rope_interleave", True)))
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  if checkpointer.latest_step() is not None:
    checkpointer.close()
    raise ConfigError(f"--workdir {workdir}: already holds checkpoints; convert into a new directory")
  prepare_workdir(cfg, workdir)
  tx = make_optimizer(cfg.train)
  spec = make_state_spec(model_cfg, tx, make_mesh(cfg.mesh))
  expected = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda a: a.shape, spec.abstract.params)))
  got = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda a: a.shape, params)))
  if expected != got:
    path = next(p for p in sorted(set(expected) | set(got), key=str) if expected.get(p) != got.get(p))
    raise ConfigError(
      f"--from-hf: parameter {jax.tree_util.keystr(path)} is {got.get(path)} after conversion "
      f"but the model expects {expected.get(path)}"
    )
  params = jax.device_put(params, spec.shardings.params)
  extra = jax.device_put(extra, spec.shardings.extra) if spec.abstract.extra else spec.abstract.extra
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, extra=extra, opt_state=tx.init(params))
  checkpointer.save(0, state, {"epoch": 0, "position": 0, "seed": cfg.train.seed})
  checkpointer.wait()
  checkpointer.close()
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


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
