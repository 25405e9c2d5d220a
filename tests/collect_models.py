"""Tiny random-weight models of every supported architecture (2 layers, hidden 32), built offline."""

from __future__ import annotations

VOCAB = 264  # the byte tokenizer's 261 ids, rounded up

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=256, bos_token_id=257,
              eos_token_id=258, tie_word_embeddings=False)


def tiny_config(model_type: str):
    import transformers as tf

    if model_type.startswith("deepseek"):  # multi-head latent attention: as many KV heads as heads
        common = {**COMMON, "num_key_value_heads": COMMON["num_attention_heads"]}
        return _deepseek(tf, model_type, common)
    if model_type == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24,
                                 shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=False)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)
    if model_type == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if model_type == "phimoe":
        return tf.PhimoeConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "gpt_oss":
        return tf.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                               head_dim=8, sliding_window=16)
    raise KeyError(model_type)


def _deepseek(tf, model_type: str, common: dict):
    if model_type == "deepseek_v2":
        return tf.DeepseekV2Config(**common, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                   topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                   kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=8, routed_scaling_factor=1.0)
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                   n_group=4, topk_group=2, kv_lora_rank=16, q_lora_rank=None,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                   routed_scaling_factor=2.5, norm_topk_prob=True)
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    model.generation_config.do_sample = False
    return model.eval()
