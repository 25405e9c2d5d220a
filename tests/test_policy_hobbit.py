"""hobbit: unimportant misses fetched at a low precision, hand-computed, and labelled lossy."""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_cache import Recording, drain

from finemoe.errors import ConfigError
from finemoe.policies.registry import make_policy
from finemoe.sim.cache import ExpertCache
from finemoe.sim.config import MemoryConfig, SimConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.run import simulate
from finemoe.traces.precision import with_expert_format
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


class LowSome(Recording):
    low_precision = "int4"

    def __init__(self):
        super().__init__()
        self.low_now: set = set()

    def fetch_low(self, key):
        return key in self.low_now


def test_a_low_copy_serves_unimportant_uses_and_is_reloaded_for_an_important_one():
    pol = LowSome()
    rec = MetricsRecorder(num_layers=1)
    cache = ExpertCache(2, pol, rec, bytes_per_expert=1600)
    cache.low_bytes = 450
    pol.low_now = {(0, 0)}
    cache.access(0, 0, 0.0)
    drain(cache)
    assert cache.low == {(0, 0)} and rec.bytes_h2d == 450 and rec.low_loads == 1
    assert cache.access(0, 0, 1.0)  # still unimportant: a hit on the low copy
    pol.low_now = set()
    assert cache.access(0, 0, 2.0) is False  # important now: a miss, reloaded in full
    drain(cache, 2.0)
    assert cache.low == set() and rec.bytes_h2d == 450 + 1600 and rec.low_upgrades == 1
    assert rec.hits[0] == 1 and rec.misses[0] == 2


def _trace(weight: float, tokens: int = 9):
    """One layer of two experts, top-1, one request whose tokens alternate between them."""
    trace = synthetic_trace(tiny_geometry(num_layers=1, num_experts=2, top_k=1), num_requests=2,
                            prompt_tokens=1, generated_tokens=tokens, seed=0)
    trace.experts[:, 0, 0] = np.arange(len(trace.experts)) % 2
    trace.weights[:, 0, 0] = weight
    return trace


def _run(trace, policy, **params):
    cfg = SimConfig("t", policy, PRESETS["rtx3090"], policy_params=params,
                    memory=MemoryConfig(expert_cache_slots=1), timeline_steps=0)
    return simulate(trace, cfg)


def test_misses_below_the_threshold_move_the_low_formats_bytes():
    g = tiny_geometry(num_layers=1, num_experts=2, top_k=1)
    low_bytes = with_expert_format(g, "int4").bytes_per_expert
    unimportant = _trace(0.1)
    lru, hob = _run(unimportant, "lru").summary, _run(unimportant, "hobbit", threshold=0.25).summary
    assert hob["misses"] == lru["misses"] == hob["ondemand_loads"]  # one slot, alternating: every use misses
    assert hob["low_loads"] == hob["ondemand_loads"] and hob["bytes_h2d"] == hob["ondemand_loads"] * low_bytes
    assert hob["stall_s"] < lru["stall_s"] and hob["tpot_p50_s"] < lru["tpot_p50_s"]
    # Gate weights above the threshold: every copy in full, the same run as LRU.
    important = _trace(0.9)
    full = _run(important, "hobbit", threshold=0.25).summary
    assert full["low_loads"] == 0 and full["bytes_h2d"] == _run(important, "lru").summary["bytes_h2d"]
    assert full["tpot_p50_s"] == _run(important, "lru").summary["tpot_p50_s"]


def test_hobbit_is_lossy_and_carries_no_bound():
    r = _run(_trace(0.1), "hobbit")
    assert r.config["policy_info"]["lossy"] == "fetches unimportant misses as int4"
    assert "bound_loads" not in r.summary  # a lossy copy can beat the lossless bounds
    assert not make_policy("lru").lossy and make_policy("hobbit").lossy
    with pytest.raises(ConfigError, match="low must be a format below 16 bits"):
        make_policy("hobbit", low="bf16")
    with pytest.raises(ConfigError, match="threshold is a gate weight"):
        make_policy("hobbit", threshold=2)


def test_replay_refuses_a_lossy_policy_in_one_sentence():
    from finemoe.replay.executor import ReplayOptions, replay

    cfg = SimConfig("t", "hobbit", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=1))
    with pytest.raises(ConfigError, match="no low-precision expert kernels"):
        replay(_trace(0.1), cfg, ReplayOptions(timing="modelled"))
