"""Model profiles: figures a reader can check by hand from the published configs."""

from __future__ import annotations

import pytest

from finemoe.errors import ConfigError
from finemoe.traces.profiles import PROFILES, get_profile


def test_mixtral_8x7b_sizes_match_hand_arithmetic():
    g = get_profile("mixtral-8x7b").geometry()
    # 3 matrices of 4096 x 14336, 2 bytes each
    assert g.bytes_per_expert == 3 * 4096 * 14336 * 2 == 352_321_536
    assert (g.num_layers, g.num_experts, g.top_k, g.num_shared_experts) == (32, 8, 2, 0)
    # 32 layers x (K and V) x 8 KV heads x 128 dims x 2 bytes
    assert g.kv_bytes_per_token == 131_072
    # 46.7B parameters, 45.1B of them in routed experts: 1.6B dense parameters, bf16
    assert g.dense_bytes == 2 * (46_702_792_704 - 45_097_156_608) == 3_211_272_192
    assert g.total_expert_bytes == 90_194_313_216  # ~90 GB: why Mixtral does not fit a 24 GB card


def test_other_profiles_pin_hand_checkable_figures():
    assert get_profile("qwen1.5-moe-a2.7b").geometry().bytes_per_expert == 3 * 2048 * 1408 * 2 == 17_301_504
    # DeepSeek-V3 stores FP8 weights: one byte per parameter, 58 MoE layers of 256 experts, top-8
    v3 = get_profile("deepseek-v3").geometry()
    assert v3.bytes_per_expert == 3 * 7168 * 2048 == 44_040_192
    assert (v3.num_layers, v3.num_experts, v3.top_k, v3.num_shared_experts) == (58, 256, 8, 1)
    # GPT-OSS experts are MXFP4: 4.25 bits per parameter (4-bit values + one 8-bit scale per 32)
    assert get_profile("gpt-oss-20b").geometry().bytes_per_expert == 3 * 2880 * 2880 * 17 // 32 == 13_219_200
    # bf16 -> fp8 halves expert bytes
    assert get_profile("mixtral-8x7b").geometry("fp8").bytes_per_expert == 176_160_768


def test_every_profile_is_self_consistent():
    for name, profile in PROFILES.items():
        g = profile.geometry()
        assert g.model_name == name
        assert 0 < g.top_k <= g.num_experts
        assert g.dense_bytes > 0 and g.bytes_per_expert > 0 and g.kv_bytes_per_token > 0
        # experts dominate an MoE model's weights
        assert g.total_expert_bytes > g.dense_bytes, name


def test_profile_lookup_is_case_insensitive_and_unknown_names_are_clear():
    assert get_profile("Mixtral-8x7B").name == "mixtral-8x7b"
    with pytest.raises(ConfigError, match="unknown model profile 'gpt-5'.*mixtral-8x7b"):
        get_profile("gpt-5")
    with pytest.raises(ConfigError, match="unknown dtype"):
        get_profile("mixtral-8x7b").geometry("bf17")
