"""Model profiles from a Hugging Face config.json and from a GGUF file's tensor index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.traces.model_config import profile_from_config
from finemoe.traces.profiles import PROFILES

transformers = pytest.importorskip("transformers")


def _configs() -> dict:
    t = transformers
    gpt = t.GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    gpt["quantization_config"] = {"quant_method": "mxfp4"}
    v3 = t.DeepseekV3Config().to_dict()
    v3["quantization_config"] = {"quant_method": "fp8"}
    return {  # the published configs' fields (each model's config.json on the Hugging Face hub)
        "mixtral-8x7b": t.MixtralConfig().to_dict(),
        "qwen3-30b-a3b": t.Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                          num_key_value_heads=4, head_dim=128, num_experts=128,
                                          num_experts_per_tok=8).to_dict(),
        "qwen1.5-moe-a2.7b": t.Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                              num_experts=60, num_experts_per_tok=4).to_dict(),
        "olmoe-1b-7b": t.OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                     num_attention_heads=16, num_experts=64, num_experts_per_tok=8).to_dict(),
        "phi-3.5-moe": t.PhimoeConfig(vocab_size=32064, hidden_size=4096, intermediate_size=6400,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      num_local_experts=16, num_experts_per_tok=2).to_dict(),
        "deepseek-v2-lite": t.DeepseekV2Config(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                               moe_intermediate_size=1408, num_hidden_layers=27,
                                               num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                                               n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
                                               kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                                               v_head_dim=128, qk_nope_head_dim=128).to_dict(),
        "deepseek-v3": v3,
        "gpt-oss-20b": gpt,
    }


def tiny_configs() -> dict:
    """A small config of each architecture --model-config reads: 3 blocks (DeepSeek's first dense),
    8 experts, top-2, hidden size 64, so a plan of it runs in seconds."""
    t = transformers
    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    mla = dict(moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
               first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
               n_group=1, topk_group=1, intermediate_size=128)
    return {
        "mixtral": t.MixtralConfig(**common, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2),
        "qwen3_moe": t.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                                      num_experts=8, num_experts_per_tok=2),
        "olmoe": t.OlmoeConfig(**common, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                               eos_token_id=1),
        "phimoe": t.PhimoeConfig(**common, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
        "deepseek_v2": t.DeepseekV2Config(**common, **mla, q_lora_rank=None),
        "deepseek_v3": t.DeepseekV3Config(**common, **mla, q_lora_rank=24),
        "gpt_oss": t.GptOssConfig(**common, intermediate_size=32, head_dim=16, num_local_experts=8,
                                  num_experts_per_tok=2),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_a_config_gives_the_published_sizes(name, tmp_path):
    """Counted tensor by tensor, the dense part matches the built-in profiles, which come from the
    models' published parameter totals, to 0.1%; the geometry matches exactly."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_configs()[name]))
    got, want = profile_from_config(str(path), name), PROFILES[name]
    for field in ("num_layers", "num_experts", "top_k", "num_shared_experts", "hidden_size",
                  "expert_intermediate_size", "kv_bytes_per_token_bf16", "expert_dtype", "default_dtype"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.dense_params == pytest.approx(want.dense_params, rel=1e-3)
    assert got.moe_blocks == want.moe_blocks  # DeepSeek's leading dense blocks
    assert got.geometry().bytes_per_expert == want.geometry().bytes_per_expert


def test_config_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON config"):
        profile_from_config(str(bad))
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="not a MoE architecture"):
        profile_from_config(str(bad))
    cfg = _configs()["mixtral-8x7b"]
    del cfg["num_local_experts"]
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="needs the field 'num_local_experts'"):
        profile_from_config(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        profile_from_config(str(tmp_path / "absent.json"))


def write_gguf(path, *, blocks=3, experts=4, top_k=2, hidden=64, inter=128, leading_dense=1, qtype="Q4_0"):
    """A small GGUF, written with llama.cpp's own writer: DeepSeek-style, `leading_dense` dense
    blocks, then MoE blocks whose experts are one tensor per matrix (zero-filled quantised bytes)."""
    gguf = pytest.importorskip("gguf")
    q = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_name("tiny-moe")
    w.add_block_count(blocks)
    w.add_expert_count(experts)
    w.add_expert_used_count(top_k)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter * 2)
    w.add_expert_feed_forward_length(inter)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_leading_dense_block_count(leading_dense)
    w.add_kv_lora_rank(32)
    w.add_rope_dimension_count(16)
    w.add_tensor("token_embd.weight", np.zeros((100, hidden), dtype=np.float16))
    for b in range(blocks):
        w.add_tensor(f"blk.{b}.attn_q.weight", np.zeros((hidden, hidden), dtype=np.float16))
        if b < leading_dense:
            w.add_tensor(f"blk.{b}.ffn_up.weight", np.zeros((inter * 2, hidden), dtype=np.float16))
            continue
        for name, shape in (("gate", (experts, inter, hidden)), ("up", (experts, inter, hidden)),
                            ("down", (experts, hidden, inter))):
            raw = np.zeros((shape[0], shape[1], shape[2] // block * size), dtype=np.uint8)
            w.add_tensor(f"blk.{b}.ffn_{name}_exps.weight", raw, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_index_gives_exact_bytes(tmp_path):
    from finemoe.traces.gguf_index import read_gguf_index

    index = read_gguf_index(write_gguf(tmp_path / "m.gguf"))
    g = index.geometry()
    # Q4_0: 18 bytes per 32 weights; an expert is 3 x 64 x 128 weights
    assert g.bytes_per_expert == 3 * 64 * 128 // 32 * 18
    assert (g.num_layers, g.num_experts, g.top_k, g.hidden_size, g.expert_intermediate_size) == (2, 4, 2, 64, 128)
    f16 = 100 * 64 + 3 * 64 * 64 + 256 * 64  # embeddings, three attn_q, the dense block's ffn_up
    assert g.dense_bytes == 2 * f16
    assert index.moe_blocks == (1, 2)
    assert index.expert_tensor_regex == "ffn_(down|gate|up)_exps"
    assert g.kv_bytes_per_token == 3 * (32 + 16) * 2  # MLA latent + rope key, f16, every block
    assert index.tensor_types == {"F16": 5, "Q4_0": 6}


def test_gguf_errors_are_one_sentence(tmp_path):
    pytest.importorskip("gguf")
    from finemoe.traces.gguf_index import read_gguf_index

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        read_gguf_index(bad)
    with pytest.raises(ConfigError, match="no such file"):
        read_gguf_index(tmp_path / "absent.gguf")
