"""Memory sizes and the GPU budget split."""

from __future__ import annotations

import pytest

from finemoe.errors import ConfigError
from finemoe.sim.config import MemoryConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.memory import parse_size, plan_memory
from finemoe.traces.profiles import get_profile
from finemoe.traces.synthetic import tiny_geometry

GiB = 2**30


@pytest.mark.parametrize("text, expected", [
    ("24G", 24 * GiB), ("24GiB", 24 * GiB), ("24gib", 24 * GiB), ("24GB", 24 * 10**9), ("512M", 512 * 2**20),
    ("0.5T", 2**39), ("1.5K", 1536), ("100", 100), ("100B", 100), (" 2 MiB ", 2 * 2**20), ("1kb", 1000), (7, 7),
])
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24Q", "-1G", "", "G", "1iB", "24GiBB", "1e9", "abc", "24 G B", -5, True])
def test_parse_size_rejects_naming_the_value(text):
    with pytest.raises(ConfigError, match="invalid memory size"):
        parse_size(text)


def test_budget_splits_into_whole_expert_slots():
    g = get_profile("mixtral-8x7b").geometry()
    hw = PRESETS["a100-80gb"]
    plan = plan_memory(g, hw, MemoryConfig(), max_batch=1, longest_request_tokens=1000)
    free = hw.gpu_mem_bytes - g.dense_bytes - 1000 * g.kv_bytes_per_token - 512 * 2**20
    assert plan.expert_cache_slots == free // g.bytes_per_expert
    assert plan.kv_bytes == 1000 * g.kv_bytes_per_token and plan.source == "budget"
    assert plan.expert_cache_bytes == plan.expert_cache_slots * g.bytes_per_expert <= free


def test_budget_below_dense_plus_topk_says_what_it_needs():
    g = get_profile("mixtral-8x7b").geometry()
    with pytest.raises(ConfigError) as err:
        plan_memory(g, PRESETS["rtx3090"], MemoryConfig(gpu_mem_bytes=parse_size("2G")), max_batch=1,
                    longest_request_tokens=100)
    msg = str(err.value)
    assert "needs at least" in msg and "dense weights" in msg and "top-2 experts" in msg and "GB" in msg


def test_slots_are_capped_at_all_experts_and_can_be_set_directly():
    g = tiny_geometry()
    big = plan_memory(g, PRESETS["h200"], MemoryConfig(), max_batch=1, longest_request_tokens=10)
    assert big.expert_cache_slots == g.num_layers * g.num_experts and big.all_resident
    direct = plan_memory(g, PRESETS["h200"], MemoryConfig(expert_cache_slots=5), max_batch=1, longest_request_tokens=10)
    assert direct.expert_cache_slots == 5 and direct.source == "explicit"
    with pytest.raises(ConfigError, match="top-2"):
        plan_memory(g, PRESETS["h200"], MemoryConfig(expert_cache_slots=1), max_batch=1, longest_request_tokens=10)


def test_kv_cache_grows_with_batch_and_can_be_fixed():
    g = get_profile("mixtral-8x7b").geometry()
    hw = PRESETS["a100-80gb"]
    one = plan_memory(g, hw, MemoryConfig(), max_batch=1, longest_request_tokens=4000)
    eight = plan_memory(g, hw, MemoryConfig(), max_batch=8, longest_request_tokens=4000)
    fixed = plan_memory(g, hw, MemoryConfig(kv_tokens=0), max_batch=8, longest_request_tokens=4000)
    assert eight.kv_bytes == 8 * one.kv_bytes and eight.expert_cache_slots < one.expert_cache_slots
    assert fixed.kv_bytes == 0 and fixed.expert_cache_slots >= one.expert_cache_slots
