"""`manifold convert --to-gguf`: a trained MLA + DeepSeekMoE run read back with gguf's own reader:
every key, every tensor's name and shape, and the values against the checkpoint."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from manifold import cli
from manifold.config import ConfigError, model_config
from manifold.interop.deepseek_v3 import params_to_hf
from manifold.interop.gguf_export import check_exportable, vocabulary
from manifold.model import ModelConfig
from manifold.train.loop import train
from manifold.train.restore import load_trained


def field(reader: gguf.GGUFReader, key: str):
  return reader.fields[key].contents()


def test_an_mla_moe_run_exports_every_key_and_tensor_llama_cpp_reads(tiny_config, tmp_path, capsys):
  cfg = tiny_config(
    "--config.model.attention=mla", "--config.model.ffn=moe", "--config.model.n_routed_experts=4",
    "--config.model.experts_per_token=2", "--config.model.first_k_dense_replace=1", "--config.train.steps=2",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=2", "--config.sample.max_new_tokens=0",
  )  # fmt: skip
  workdir, out = str(tmp_path / "run"), str(tmp_path / "model.gguf")
  train(cfg, workdir, progress=False)
  assert cli.main(["convert", "--workdir", workdir, "--to-gguf", out]) == 0
  assert "llama.cpp deepseek2" in capsys.readouterr().out
  m = model_config(cfg)
  reader = gguf.GGUFReader(out)

  a = "deepseek2."
  keys = {
    "general.architecture": "deepseek2",
    a + "block_count": m.n_layers,
    a + "context_length": m.max_seq_len,
    a + "embedding_length": m.d_model,
    a + "feed_forward_length": m.d_ff,
    a + "attention.head_count": m.n_heads,
    a + "attention.head_count_kv": 1,
    a + "attention.kv_lora_rank": m.kv_lora_rank,
    a + "attention.key_length": m.kv_lora_rank + m.qk_rope_head_dim,
    a + "attention.value_length": m.kv_lora_rank,
    a + "attention.key_length_mla": m.qk_nope_head_dim + m.qk_rope_head_dim,
    a + "attention.value_length_mla": m.v_head_dim,
    a + "rope.dimension_count": m.qk_rope_head_dim,
    a + "leading_dense_block_count": 1,
    a + "expert_count": 4,
    a + "expert_used_count": 2,
    a + "expert_shared_count": m.n_shared_experts,
    a + "expert_feed_forward_length": m.moe_d_ff,
    a + "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
    a + "vocab_size": m.vocab_size,
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.eos_token_id": 256,
  }
  for key, want in keys.items():
    assert field(reader, key) == want, key
  assert field(reader, a + "rope.freq_base") == pytest.approx(m.rope_theta)
  assert field(reader, a + "attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps)
  tokens = field(reader, "tokenizer.ggml.tokens")
  assert len(tokens) == m.vocab_size and tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ"
  assert tokens == vocabulary("byte", m.vocab_size, 256)[0]

  run = load_trained(workdir, data=False)
  hf = params_to_hf(run.state.params, run.state.extra, m)
  got = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
  h, nope, v, r = m.n_heads, m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank
  want = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
          "output.weight": hf["lm_head.weight"]}  # fmt: skip
  for i in range(m.n_layers):
    p, b = f"model.layers.{i}.", f"blk.{i}."
    kv_b = hf[p + "self_attn.kv_b_proj.weight"].reshape(h, nope + v, r)
    want |= {
      b + "attn_norm.weight": hf[p + "input_layernorm.weight"],
      b + "attn_q.weight": hf[p + "self_attn.q_proj.weight"],
      b + "attn_kv_a_mqa.weight": hf[p + "self_attn.kv_a_proj_with_mqa.weight"],
      b + "attn_kv_a_norm.weight": hf[p + "self_attn.kv_a_layernorm.weight"],
      b + "attn_k_b.weight": kv_b[:, :nope].transpose(0, 2, 1),  # [head, latent, nope]: absorbed into q
      b + "attn_v_b.weight": kv_b[:, nope:],  # [head, v, latent]
      b + "attn_output.weight": hf[p + "self_attn.o_proj.weight"],
      b + "ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
    }
    if i == 0:
      want |= {b + f"ffn_{n}.weight": hf[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")}
      continue
    want |= {
      b + "ffn_gate_inp.weight": hf[p + "mlp.gate.weight"],
      b + "exp_probs_b.bias": hf[p + "mlp.gate.e_score_correction_bias"],
      **{b + f"ffn_{n}_shexp.weight": hf[p + f"mlp.shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down")},
      **{
        b + f"ffn_{n}_exps.weight": np.stack([hf[p + f"mlp.experts.{e}.{n}_proj.weight"] for e in range(4)])
        for n in ("gate", "up", "down")
      },  # fmt: skip
    }
  assert sorted(got) == sorted(want)
  for name, array in want.items():
    np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("residual", ["hc", "mhc", "mhc_lite"])
def test_models_with_several_residual_streams_are_refused_saying_why(residual):
  cfg = ModelConfig.from_mapping({"attention": "mla", "residual": residual})
  with pytest.raises(ConfigError, match="one residual stream"):
    check_exportable(cfg)
