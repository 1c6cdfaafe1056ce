"""`manifold convert --to-gguf OUT.gguf --workdir D`: a run's newest checkpoint as a GGUF file for
llama.cpp's `deepseek2` architecture (MLA + DeepSeekMoE, one residual stream), written with `gguf`.

The tensors are the Hugging Face DeepSeek-V3 export's (`deepseek_v3.params_to_hf`: torch layout,
interleaved RoPE), renamed by gguf's own DEEPSEEK2 name map, with what llama.cpp's converter does
to a V3 checkpoint: the routed experts stacked into one [E, out, in] tensor per projection, and
`kv_b_proj` split into `attn_k_b` (per head, transposed) and `attn_v_b` for MLA's absorbed
attention (so `head_count_kv` is 1 and the key / value lengths are the latent's). The router's
correction bias is `exp_probs_b`; MTP modules are not written (llama.cpp skips them).

The tokenizer goes in as a GPT-2 style byte-level BPE: the byte tokenizer as GPT-2's 256 byte
characters (id = byte) and no merges, a trained BPE with its vocabulary and merges; end-of-text
is the end-of-sequence token, and ids past the tokenizer's up to `model.vocab_size` are unused.

HC / mHC / mHC-lite models are refused: their n residual streams and the mixing between them have
no tensors or computation in llama.cpp's graph, so the file would run a different model.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np

from manifold.config import ConfigError, model_config
from manifold.data.tokenizer import byte_level_characters, file_path, load_tokenizer

ARCH = "deepseek2"


def vocabulary(tokenizer_spec: str, vocab_size: int, eos_id: int) -> tuple[list[str], list[int], list[str]]:
  """(tokens, token types, merges) of the run's tokenizer, padded to `vocab_size` ids."""
  if tokenizer_spec == "byte":
    tokens, merges = byte_level_characters(), []
  else:
    spec = json.loads(file_path(tokenizer_spec).read_text())
    vocab = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
      tokens[i] = text
    for added in spec.get("added_tokens", []):
      if added["id"] >= len(tokens):
        tokens += [""] * (added["id"] + 1 - len(tokens))
      tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
  if eos_id >= len(tokens):
    tokens += [""] * (eos_id + 1 - len(tokens))
  tokens[eos_id] = "<|endoftext|>"
  types = [gguf.TokenType.CONTROL if i == eos_id else gguf.TokenType.NORMAL for i in range(len(tokens))]
  for i in range(len(tokens), vocab_size):
    tokens.append(f"<|unused_{i}|>")
    types.append(gguf.TokenType.UNUSED)
  return tokens, types, merges


def gguf_tensors(hf: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
  """GGUF name -> array, from the HF DeepSeek-V3 tensors of `deepseek_v3.params_to_hf`."""
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.n_layers)

  def rename(hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
      raise ValueError(f"{hf_name}: no deepseek2 GGUF name")
    return found

  out: dict[str, np.ndarray] = {}
  for name, array in hf.items():
    if ".mlp.experts." in name:
      continue  # stacked below
    if name.endswith("e_score_correction_bias"):
      name = name.replace("e_score_correction_bias", "e_score_correction.bias")
    if name.endswith("kv_b_proj.weight"):
      h, nope, v = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
      kv_b = array.reshape(h, nope + v, cfg.kv_lora_rank)
      out[rename(name.replace("kv_b_proj", "k_b_proj"))] = np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
      out[rename(name.replace("kv_b_proj", "v_b_proj"))] = np.ascontiguousarray(kv_b[:, nope:])
      continue
    out[rename(name)] = array
  if cfg.ffn == "moe":
    for layer in range(cfg.first_k_dense_replace, cfg.n_layers):
      for proj in ("down_proj", "gate_proj", "up_proj"):
        prefix = f"model.layers.{layer}.mlp.experts."
        stacked = np.stack([hf[f"{prefix}{e}.{proj}.weight"] for e in range(cfg.n_routed_experts)])
        out[rename(f"{prefix}{proj}.weight")] = stacked
  return out


def check_exportable(cfg) -> None:
  if cfg.residual != "plain":
    raise ConfigError(
      f"--to-gguf: model.residual={cfg.residual}: llama.cpp's deepseek2 runs one residual stream; this model's "
      f"{cfg.streams} streams and their mixing (HC / mHC) have no GGUF tensors, so the file would compute another "
      "model. Export a model.residual=plain run"
    )
  if cfg.attention != "mla":
    raise ConfigError(
      "--to-gguf: llama.cpp's deepseek2 is Multi-head Latent Attention; this run has model.attention=gqa"
    )


def export_gguf(workdir: str, out_path: str) -> int:
  """Writes the newest checkpoint of the run in `workdir` to `out_path`; returns the tensor count."""
  import jax

  from manifold.interop.deepseek_v3 import params_to_hf
  from manifold.train.restore import load_trained

  run = load_trained(workdir, data=False)
  cfg = model_config(run.cfg)
  check_exportable(cfg)
  tensors = gguf_tensors(params_to_hf(jax.device_get(run.state.params), jax.device_get(run.state.extra), cfg), cfg)
  tokenizer = load_tokenizer(run.cfg.data.tokenizer)
  tokens, types, merges = vocabulary(run.cfg.data.tokenizer, cfg.vocab_size, tokenizer.eos_id)
  moe = cfg.ffn == "moe"

  writer = gguf.GGUFWriter(out_path, ARCH)
  writer.add_name(os.path.basename(os.path.normpath(workdir)))
  writer.add_file_type(gguf.LlamaFileType.ALL_F32)
  writer.add_block_count(cfg.n_layers)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(1)  # MLA's absorbed form: one latent "head" shared by all
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_leading_dense_block_count(cfg.first_k_dense_replace if moe else cfg.n_layers)
  if cfg.q_lora_rank:
    writer.add_q_lora_rank(cfg.q_lora_rank)
  writer.add_kv_lora_rank(cfg.kv_lora_rank)
  writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  writer.add_value_length(cfg.kv_lora_rank)
  writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
  writer.add_value_length_mla(cfg.v_head_dim)
  writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
  if moe:
    writer.add_expert_feed_forward_length(cfg.moe_d_ff)
    writer.add_expert_count(cfg.n_routed_experts)
    writer.add_expert_used_count(cfg.experts_per_token)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(cfg.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
  if cfg.rope_scaling == "yarn":
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(cfg.rope_factor)
    writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len)
    writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_mscale_all_dim)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_bos_token_id(tokenizer.eos_id)  # documents follow end-of-text in training
  writer.add_add_bos_token(False)
  for name, array in tensors.items():
    writer.add_tensor(name, np.ascontiguousarray(array, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return len(tensors)
