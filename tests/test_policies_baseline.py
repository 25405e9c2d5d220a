"""Baseline policies: LRU, LFU, layer-wise, no-offload and the oracle."""

from __future__ import annotations

import pytest

from finemoe.errors import ConfigError
from finemoe.policies.caches import LFUCounts, LRUOrder
from finemoe.policies.registry import make_policy, policy_names
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace


def sim(trace, policy, slots, **params):
    cfg = SimConfig("synthetic", policy, PRESETS["rtx3090"], policy_params=params,
                    memory=MemoryConfig(expert_cache_slots=slots), workload=WorkloadConfig(history_fraction=0.5))
    return simulate(trace, cfg)


def test_registered():
    assert {"lru", "lfu", "layerwise", "no-offload", "oracle"} <= set(policy_names())
    with pytest.raises(ConfigError, match="takes no parameters"):
        make_policy("lru", window=3)


def test_lru_order():
    o = LRUOrder()
    for k in [(0, 0), (0, 1), (0, 2)]:
        o.loaded(k)
    o.touch((0, 0))
    assert o.victim(lambda k: True) == (0, 1)
    assert o.victim(lambda k: k != (0, 1)) == (0, 2)
    o.evicted((0, 1))
    assert o.keys() == [(0, 2), (0, 0)]


def test_lfu_counts_with_lru_tie_break():
    c = LFUCounts()
    for k in [(0, 0), (0, 1), (0, 2)]:
        c.loaded(k)
    c.touch((0, 0))
    c.touch((0, 0))
    c.touch((0, 2))
    c.touch((0, 1))
    assert c.victim(lambda k: True) == (0, 2)  # (0,1) and (0,2) used once; (0,2) less recently
    assert c.keys() == [(0, 2), (0, 1), (0, 0)]  # the victim order: fewest uses, then least recent
    c.evicted((0, 2))
    c.loaded((0, 2))
    assert c.count((0, 2)) == 1  # counts survive eviction


def test_no_offload_needs_every_expert():
    t = synthetic_trace(num_requests=2)
    with pytest.raises(ConfigError, match=r"needs all 32 experts resident.*bytes"):
        sim(t, "no-offload", 8)
    r = sim(t, "no-offload", 32)
    assert r.summary["hit_rate"] == 1.0 and r.summary["bytes_h2d"] == 0


def test_layerwise_fetches_the_next_layer():
    t = synthetic_trace(num_requests=4, seed=3)
    r = sim(t, "layerwise", 16)
    s = r.summary
    assert s["prefetch_issued"] > 0 and s["prefetch_started"] > 0
    assert s["bytes_h2d"] == (s["ondemand_loads"] + s["prefetch_started"]) * t.geometry.bytes_per_expert


def test_oracle_is_labelled_a_bound_and_beats_lru():
    t = synthetic_trace(num_requests=6, seed=4)
    o = sim(t, "oracle", 8)
    lru = sim(t, "lru", 8)
    assert o.config["policy_info"]["is_oracle"] and "bound" in o.config["policy_info"]["bound"]
    assert o.config["policy_info"]["best_hit_rate"] >= lru.summary["hit_rate"]
    assert o.summary["e2e_mean_s"] <= lru.summary["e2e_mean_s"]
    with pytest.raises(ConfigError, match="lookahead_layers"):
        sim(t, "oracle", 8, lookahead_layers=0)


def test_lfu_and_lru_differ_somewhere():
    t = synthetic_trace(num_requests=6, seed=5, generated_tokens=30)
    rates = {p: sim(t, p, 10).summary["hit_rate"] for p in ("lru", "lfu")}
    assert all(0 < v < 1 for v in rates.values())
