"""The expert cache's decisions, driven by hand (no engine)."""

from __future__ import annotations

import pytest

from finemoe.policies.base import Policy, Prefetch
from finemoe.policies.caches import LRUOrder
from finemoe.sim.cache import ExpertCache, PolicyError
from finemoe.sim.metrics import MetricsRecorder


class Recording(Policy):
    name = "recording"

    def __init__(self, refuse_prefetch: bool = False, bad_victim=None):
        super().__init__()
        self.order = LRUOrder()
        self.calls: list = []
        self.refuse_prefetch = refuse_prefetch
        self.bad_victim = bad_victim

    def on_access(self, layer, expert, hit, now_s):
        self.calls.append(("access", (layer, expert), hit))
        if hit:
            self.order.touch((layer, expert))

    def on_loaded(self, key, now_s):
        self.calls.append(("loaded", key))
        self.order.loaded(key)

    def on_evicted(self, key, now_s):
        self.calls.append(("evicted", key))
        self.order.evicted(key)

    def choose_victim(self, evictable, for_prefetch, now_s):
        if self.bad_victim is not None:
            return self.bad_victim
        if for_prefetch is not None and self.refuse_prefetch:
            return None
        return self.order.victim(evictable)


def make(capacity=2, **kw):
    pol = Recording(**kw)
    rec = MetricsRecorder(num_layers=4)
    return ExpertCache(capacity, pol, rec, bytes_per_expert=100), pol, rec


def drain(cache, now=0.0):
    """Start and finish every copy that can start, in order; returns their keys and kinds."""
    done = []
    while (tr := cache.next_transfer(now)) is not None:
        cache.complete(tr, now)
        done.append((tr.key, tr.kind))
    return done


def test_miss_queues_demand_and_hit_is_counted_per_layer():
    cache, pol, rec = make()
    cache.set_position(0, 0)
    assert cache.access_layer(0, [1, 2], 0.0) == [1, 2]
    assert rec.misses[0] == 2 and cache.busy
    assert drain(cache) == [((0, 1), "demand"), ((0, 2), "demand")]
    assert cache.access_layer(0, [1], 0.0) is None and rec.hits[0] == 1
    assert rec.ondemand_loads == 2 and rec.bytes_h2d == 200 and not cache.busy


def test_demand_before_prefetch_and_prefetches_by_priority_deduplicated():
    cache, pol, rec = make(capacity=4)
    cache.set_position(0, 0)
    assert cache.add_prefetches([Prefetch(1.0, 0, 2, 0), Prefetch(3.0, 0, 3, 0), Prefetch(2.0, 0, 2, 0)]) == 2
    cache.access_layer(0, [5], 0.0)
    assert [k for k, _ in drain(cache)] == [(0, 5), (3, 0), (2, 0)]
    assert rec.prefetch_issued == 2 and rec.prefetch_started == 2


def test_prefetch_for_a_passed_layer_is_dropped():
    cache, pol, rec = make(capacity=4)
    cache.set_position(0, 0)
    cache.add_prefetches([Prefetch(1.0, 0, 1, 0), Prefetch(1.0, 0, 2, 0)])
    cache.set_position(0, 1)  # layer 1 has been routed without it
    assert [k for k, _ in drain(cache)] == [(2, 0)]
    assert rec.prefetch_dropped == 1
    assert cache.add_prefetches([Prefetch(1.0, 0, 1, 3)]) == 0  # already passed: not even queued


def test_prefetch_outcomes_in_time_late_and_unused():
    cache, pol, rec = make(capacity=2)
    cache.set_position(0, 0)
    cache.add_prefetches([Prefetch(2.0, 0, 1, 0), Prefetch(1.0, 0, 1, 1)])
    first = cache.next_transfer(0.0)  # (1, 0) on the wire
    cache.set_position(0, 1)
    assert cache.access_layer(1, [0, 1], 0.0) == [0, 1]  # (1,0) in flight: late; (1,1) queued: late too
    assert rec.prefetch_late == 2 and rec.ondemand_loads == 0
    cache.complete(first, 0.0)
    assert drain(cache) == [((1, 1), "demand")]
    cache.add_prefetches([Prefetch(1.0, 1, 2, 0)])
    assert drain(cache) == [((2, 0), "prefetch")]  # evicts (1, 0), the least recently loaded
    cache.access_layer(3, [0], 0.0)
    assert drain(cache) == [((3, 0), "demand")]  # evicts (1, 1); the prefetched (2, 0) stays
    cache.access_layer(2, [0], 0.0)
    assert rec.prefetch_in_time == 1 and rec.prefetch_unused_evicted == 0
    cache.add_prefetches([Prefetch(1.0, 2, 0, 7)])
    drain(cache)  # (0, 7) evicts (3, 0)
    cache.access_layer(1, [5], 0.0)
    drain(cache)  # (1, 5) evicts (2, 0), which was used: not counted
    assert rec.prefetch_unused_evicted == 0
    cache.access_layer(3, [3], 0.0)
    drain(cache)  # now (0, 7), never used, goes
    assert rec.prefetch_unused_evicted == 1


def test_pinned_experts_are_not_evicted_and_unpins_apply_at_their_time():
    cache, pol, rec = make(capacity=2)
    cache.preload([(0, 0), (0, 1)], 0.0)
    cache.pin([(0, 0), (0, 1)])
    cache.set_position(0, 0)
    cache.access_layer(0, [2], 0.0)
    assert cache.next_transfer(0.0) is None and cache.blocked
    cache.unpin((0, 1), at_s=5.0)
    assert cache.next_unpin_s() == 5.0
    assert cache.next_transfer(4.0) is None and cache.blocked
    tr = cache.next_transfer(5.0)
    assert tr.key == (0, 2) and tr.victim == (0, 1) and not cache.blocked


def test_a_release_left_from_an_earlier_step_does_not_free_a_pin_taken_again():
    cache, pol, rec = make(capacity=2)
    cache.preload([(0, 0), (0, 1)], 0.0)
    cache.pin([(0, 0)])
    cache.unpin((0, 0), at_s=1.0)  # step 0 computed it at 1.0; the release waits, lazily
    cache.pin([(0, 0), (0, 1)])  # step 1 (at 2.0) needs both again
    cache.access_layer(0, [2], 2.0)
    assert cache.next_transfer(2.0) is None and cache.blocked  # both still pinned
    cache.unpin((0, 1), at_s=3.0)
    tr = cache.next_transfer(3.0)
    assert tr.key == (0, 2) and tr.victim == (0, 1)


def test_a_batch_needing_more_experts_than_slots_completes():
    """Regression (found by hypothesis): 1 layer, 2 slots, batches of 2 routing up to 4 experts; a
    stale lazy release once freed an expert the layer had pinned again, it was evicted before its
    compute, and the engine waited for it forever."""
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.sim.run import simulate
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    trace = synthetic_trace(tiny_geometry(num_layers=1, num_experts=6, top_k=2), num_requests=3,
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=6144)
    hw = PRESETS["rtx3090"].with_overrides(copy_engines=1, copy_compute_slowdown=3.0, compute_copy_slowdown=2.0,
                                           copy_start_delay_s=3e-6, miss_overhead_s=2e-5, expert_overhead_s=1e-6,
                                           layer_overhead_s=4e-6)
    cfg = SimConfig("synthetic", "lru", hw, memory=MemoryConfig(expert_cache_slots=2),
                    workload=WorkloadConfig(max_batch=2, history_fraction=0.4, arrival="poisson", rate_rps=5000.0),
                    seed=6144, timeline_steps=1000)
    assert 0.0 < simulate(trace, cfg).summary["hit_rate"] < 1.0


def test_refused_prefetch_is_dropped_and_bad_victims_are_policy_errors():
    cache, pol, rec = make(capacity=1, refuse_prefetch=True)
    cache.preload([(0, 0)], 0.0)
    cache.add_prefetches([Prefetch(1.0, 0, 1, 1)])
    assert cache.next_transfer(0.0) is None and rec.prefetch_dropped == 1
    cache2, _, _ = make(capacity=1, bad_victim=(3, 3))
    cache2.preload([(0, 0)], 0.0)
    cache2.access_layer(1, [0], 0.0)
    with pytest.raises(PolicyError, match="not evictable"):
        cache2.next_transfer(0.0)


def test_notifications_reach_the_policy_in_order():
    cache, pol, rec = make(capacity=1)
    cache.preload([(0, 0)], 0.0)
    cache.access_layer(1, [0], 0.0)
    drain(cache)
    assert pol.calls == [("loaded", (0, 0)), ("access", (1, 0), False), ("evicted", (0, 0)), ("loaded", (1, 0))]
