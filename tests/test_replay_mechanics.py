"""The replayer's mechanics, with no machine's speed in them: a replay on a modelled clock (copies
and compute taking the simulator's cost-model durations, `ReplayOptions(timing="modelled")`) must
make exactly the simulator's decisions and produce its times. Whatever differs is a difference of
step logic (access order, pins, prefetch queueing, the order experts are computed in, waits), not
of timing. Wall-clock agreement is measured by `finemoe validate`, never asserted in a test."""

from __future__ import annotations

from dataclasses import replace

import pytest

from finemoe.policies.base import PolicyContext
from finemoe.policies.registry import make_policy
from finemoe.replay.executor import ReplayOptions, replay
from finemoe.replay.modelled import ModelledMachine
from finemoe.sim.cache import ExpertCache
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.costs import CostModel, to_ticks
from finemoe.sim.hardware import HardwareSpec
from finemoe.sim.metrics import MetricsRecorder
from finemoe.sim.run import simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

HW = HardwareSpec("test-cpu", 16 * 10**9, 5e11, 10.0, 8.0, transfer_latency_s=50e-6, copy_engines=1,
                  compute_efficiency=0.5, memory_efficiency=0.5, pcie_efficiency=1.0, kernel_launch_s=20e-6)
# A CPU-like profile: two copy engines, a hand-off delay, copies and compute slowing each other, and
# host work per miss (what `finemoe calibrate` measures on a CPU).
HW_CPU_LIKE = replace(HW, copy_engines=2, copy_start_delay_s=30e-6, compute_copy_slowdown=1.3,
                      copy_compute_slowdown=1.2, miss_overhead_s=7e-6)
# Every count and time the simulator reports for a run; stall is a sum of floats (compared approximately).
EXACT = ("steps", "tokens", "layer_steps", "requests", "hits", "misses", "ondemand_loads", "bytes_h2d",
         "prefetch_issued", "prefetch_started", "prefetch_in_time", "prefetch_late", "prefetch_dropped",
         "prefetch_unused_evicted")
TIMES = ("makespan_s", "tpot_p50_s", "tpot_mean_s", "ttft_p50_s", "e2e_p50_s", "stall_s")


def geometry():
    h, i = 64, 128
    return tiny_geometry(num_layers=4, num_experts=8, hidden_size=h, expert_intermediate_size=i, dtype="float32",
                         bytes_per_expert=3 * h * i * 4, dense_bytes=4 * h * h * 4 * 2, kv_bytes_per_token=4 * 2 * h * 4)


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace(geometry(), num_requests=6, prompt_tokens=6, generated_tokens=10, seed=3)


def config(policy: str, slots: int, max_batch: int, hw: HardwareSpec = HW) -> SimConfig:
    return SimConfig(trace_path="synthetic", policy=policy, hardware=hw,
                     memory=MemoryConfig(expert_cache_slots=slots), workload=WorkloadConfig(max_batch=max_batch))


def assert_same_run(rep, sim) -> None:
    for key in EXACT:
        assert rep.summary.get(key) == sim.summary.get(key), key
    for key in TIMES:
        assert rep.summary[key] == pytest.approx(sim.summary[key], rel=1e-9, abs=1e-15), key


@pytest.mark.parametrize("policy", ["lru", "lfu", "mixtral-offloading", "finemoe"])
@pytest.mark.parametrize("slots, max_batch", [(12, 1), (12, 2), (20, 1), (4, 2)])
def test_a_modelled_replay_is_the_simulation(trace, policy, slots, max_batch):
    """Hit counts, on-demand loads, prefetches (in time, late, dropped) and every latency metric
    equal the simulator's; (4, 2): a cache of one batch layer, where loads wait for pins."""
    cfg = config(policy, slots, max_batch)
    rep = replay(trace, cfg, ReplayOptions(timing="modelled"))
    sim = simulate(trace, cfg)
    assert rep.config["engine"] == "replay" and rep.config["replay"]["timing"] == "modelled"
    assert_same_run(rep, sim)
    if policy in ("mixtral-offloading", "finemoe"):
        assert rep.summary["prefetch_in_time"] > 0  # the prefetch path was exercised
    else:
        assert rep.summary["prefetch_issued"] == 0 and rep.summary["misses"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "finemoe", "moe-infinity", "layerwise"])
def test_a_modelled_replay_follows_a_cpu_like_profile(trace, policy):
    """Two copy engines, hand-off delays, the compute/copy slowdowns and per-miss host time."""
    cfg = config(policy, 8, 2, HW_CPU_LIKE)
    rep, sim = replay(trace, cfg, ReplayOptions(timing="modelled")), simulate(trace, cfg)
    assert_same_run(rep, sim)
    assert rep.config["replay"]["copy_engines"] == 2


def test_a_modelled_replay_is_deterministic_and_allocates_nothing(trace):
    cfg = config("finemoe", 12, 2)
    a = replay(trace, cfg, ReplayOptions(timing="modelled"))
    b = replay(trace, cfg, ReplayOptions(timing="modelled"))
    assert a.summary["makespan_s"] == b.summary["makespan_s"] and a.summary["hits"] == b.summary["hits"]
    assert a.config["replay"]["weights"] is None and a.config["replay"]["lane_work_s"] == 0.0


def test_an_unknown_timing_is_refused(trace):
    from finemoe.errors import ConfigError

    with pytest.raises(ConfigError, match="timing"):
        replay(trace, config("lru", 12, 1), ReplayOptions(timing="virtual"))


# --- the modelled machine alone, on hand-computable copies ---------------------------------------


def machine(engines: int, capacity: int = 8):
    g = geometry()
    hw = replace(HW, copy_engines=engines)
    costs = CostModel(hw, g)
    rec = MetricsRecorder(g.num_layers, 0)
    policy = make_policy("lru")
    cache = ExpertCache(capacity, policy, rec, g.bytes_per_expert)
    policy.bind(PolicyContext(geometry=g, capacity_slots=capacity, seed=0, is_resident=cache.is_resident,
                              is_in_flight=cache.is_in_flight, expert_load_s=costs.expert_load_s))
    m = ModelledMachine(synthetic_trace(g, num_requests=1, prompt_tokens=2, generated_tokens=2), costs, cache, rec,
                        engines, lambda: 0)
    return m, cache, to_ticks(hw.transfer_latency_s), to_ticks(costs.wire_s(g.bytes_per_expert))


def test_one_copy_engine_serialises_two_loads():
    m, cache, latency, wire = machine(engines=1)
    assert cache.access_layer(0, [1, 2], 0.0) == [1, 2]
    m.wake()
    assert m.arriving == {(0, 1): latency + wire}  # the second waits for the engine
    m.wait_for([(0, 2)])  # the first lands, the engine takes the second at once
    assert m.t == latency + wire and m.arriving == {(0, 2): 2 * (latency + wire)}
    m.wait_for([(0, 2)])
    assert m.t == 2 * (latency + wire) and cache.is_resident((0, 2)) and m.copies == 2


def test_two_copy_engines_share_the_link():
    m, cache, latency, wire = machine(engines=2)
    cache.access_layer(0, [1, 2], 0.0)
    m.wake()
    # Both start at 0; the second's bytes cross once the first's have: the link is shared.
    assert m.arriving == {(0, 1): latency + wire, (0, 2): latency + 2 * wire}
    m.advance(latency + wire)  # events strictly before the new time are handled...
    assert not cache.is_resident((0, 1))
    m.now()  # ...and those due at it when the time is looked at
    assert cache.is_resident((0, 1)) and not cache.is_resident((0, 2))


def test_a_prefetch_waits_for_its_prediction():
    from finemoe.policies.base import Prefetch

    m, cache, latency, wire = machine(engines=1)
    m.submit([Prefetch(layer=1, expert=3, step=0, priority=1.0, ready_s=1e-3)])
    m.wake()
    assert cache.queued_prefetches() == 0 and not m.arriving  # not ready: held back
    m.idle_until(1e-3)
    m.now()
    assert m.arriving == {(1, 3): to_ticks(1e-3) + latency + wire}
