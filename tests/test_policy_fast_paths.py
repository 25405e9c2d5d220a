"""The policies' fast paths against the plain definitions they replace: the same answers, bit for
bit, on random inputs (ties, zeros, missing records included). The simulator's speed work must not
change a single decision; these pin that where a shortcut could drift."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_policy_finemoe import M, _bound_policy
from test_policy_support import context, trace_from_probs

from finemoe.policies.base import LayerRouting, Prefetch, Sequence, StepInfo, ranked_prefetches
from finemoe.policies.caches import LFUCounts
from finemoe.policies.expert_maps import delta_prefix
from finemoe.policies.moe_infinity import _Partial
from finemoe.policies.registry import make_policy
from finemoe.traces.synthetic import tiny_geometry


def _delta_by_numpy(row: np.ndarray, similarity: float, top_k: int) -> list[int]:
    """The delta rule as numpy states it: stable argsort, cumulative sum, left search."""
    row = np.asarray(row, dtype=np.float64)
    order = np.argsort(-row, kind="stable")
    delta = min(max(1.0 - float(similarity), 0.0), 1.0)
    cum = np.cumsum(row[order])
    total = float(cum[-1]) if cum.size else 0.0
    if total <= 0.0:
        return order[:top_k].tolist()
    n = int(np.searchsorted(cum, delta * total * (1.0 - 1e-9), side="left")) + 1
    return order[: min(max(n, top_k), row.size)].tolist()


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.floats(-0.5, 1.5), st.integers(0, 2**31 - 1))
def test_delta_prefix_on_a_list_equals_numpys_rule(width, k, similarity, seed):
    rng = np.random.default_rng(seed)
    row = rng.dirichlet(np.full(width, 0.4)).astype(np.float32)  # stored maps are float32
    row[rng.random(width) < 0.3] = 0.0  # ties at zero
    if rng.random() < 0.3:
        row[:] = np.round(row * 4) / 4  # ties elsewhere
    top_k = min(k, width)
    assert delta_prefix(row.tolist(), similarity, top_k) == _delta_by_numpy(row, similarity, top_k)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.tuples(st.integers(0, 5), st.integers(0, 7)),
                       st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 0.3333]), max_size=20),
       st.floats(0.0, 1.0))
def test_ranked_prefetches_are_in_prefetch_order(priorities, ready_s):
    got = ranked_prefetches(3, priorities, ready_s)
    expected = sorted((Prefetch(p, 3, layer, e, ready_s) for (layer, e), p in priorities.items()), reverse=True)
    assert got == expected
    assert all(p.ready_s == ready_s for p in got)


def test_router_rows_equal_nan_to_num():
    probs = np.array([[[0.5, np.nan, 0.25, 0.25], [np.inf, 0.0, -np.inf, 1.0]]], dtype=np.float16)
    trace = trace_from_probs(np.nan_to_num(probs))
    trace.router_probs[:] = probs  # missing records and overflowed values, as a foreign log may hold
    step = StepInfo(0, 0.0, (Sequence(0, 0, 0, 1),), trace)
    for layer in range(2):
        rows = LayerRouting(step, layer, 0.0, trace).router_rows(0)
        expected = np.nan_to_num(probs[:, layer].astype(np.float32))
        assert rows.dtype == np.float32 and np.array_equal(rows, expected)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 7), min_size=1, max_size=6), min_size=1, max_size=20))
def test_moe_infinity_running_norm_equals_numpys(layers_of_ids):
    partial = _Partial(np.zeros((4, 8)))
    for i, ids in enumerate(layers_of_ids):
        partial.count(i % 4, np.array(ids))
    assert partial.norm2 == float((partial.eam**2).sum())  # counts: every sum is exact
    assert math.sqrt(partial.norm2) == float(np.linalg.norm(partial.eam.reshape(-1)))


def _first_evictable_in_order(policy, evictable, for_prefetch):
    """FineMoE's victim by its definition: the first evictable of `eviction_order`, where a prefetch
    stops at the first protected expert."""
    protected = policy.protected_mask()
    for victim in policy.eviction_order():
        if for_prefetch is not None and protected[victim]:
            return None
        if evictable(victim):
            return victim
    return None


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["finemoe", "finemoe-lru", "finemoe-lfu"]))
def test_finemoe_victim_is_the_first_evictable_in_eviction_order(seed, name):
    rng = np.random.default_rng(seed)
    policy, step, measured = _bound_policy(name)
    L, J = M.shape
    keys = [(layer, e) for layer in range(L) for e in range(J)]
    for i in rng.permutation(len(keys))[: rng.integers(1, len(keys) + 1)]:
        policy.on_loaded(keys[i], 0.0)
    for _ in range(rng.integers(0, 12)):
        policy.on_access(int(rng.integers(L)), int(rng.integers(J)), True, 0.0)
    policy.on_step_start(step)
    for layer in range(int(rng.integers(0, L))):
        policy.on_layer_routed(LayerRouting(step, layer, 0.0, measured))
    resident = set(policy.eviction_order())
    for _ in range(6):
        blocked = {k for k in resident if rng.random() < 0.5}
        evictable = lambda key, blocked=blocked: key in resident and key not in blocked  # noqa: E731
        for for_prefetch in (None, Prefetch(0.5, 0, L - 1, 0)):
            assert policy.choose_victim(evictable, for_prefetch, 0.0) == _first_evictable_in_order(
                policy, evictable, for_prefetch)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["moe-infinity", "promoe"]))
def test_tracked_caches_evict_by_use_count_then_recency(seed, name):
    """MoE-Infinity's LFU and ProMoE's LRU, against counting uses and stamps by hand."""
    rng = np.random.default_rng(seed)
    g = tiny_geometry(num_layers=3, num_experts=4, top_k=2)
    policy = make_policy(name)
    policy.bind(context(g))
    freq: dict = {}
    stamp: dict = {}
    resident: set = set()
    clock = 0
    for _ in range(60):
        key = (int(rng.integers(3)), int(rng.integers(4)))
        clock += 1
        roll = rng.random()
        if roll < 0.3 and key not in resident:
            policy.on_loaded(key, 0.0)
            resident.add(key)
            stamp[key] = clock
        elif roll < 0.4 and key in resident:
            policy.on_evicted(key, 0.0)
            resident.discard(key)
        else:
            policy.on_access(*key, key in resident, 0.0)
            freq[key] = freq.get(key, 0) + 1
            if key in resident:
                stamp[key] = clock
    blocked = {k for k in resident if rng.random() < 0.3}
    candidates = [k for k in resident if k not in blocked]
    if name == "moe-infinity":
        expected = min(candidates, key=lambda k: (freq.get(k, 0), stamp[k]), default=None)
    else:
        expected = min(candidates, key=lambda k: stamp[k], default=None)
    assert policy.choose_victim(lambda k: k in resident and k not in blocked, None, 0.0) == expected


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_lfu_buckets_give_the_least_used_then_least_recent_victim(seed):
    """`LFUCounts` after every operation of a long random run (loads, evictions, touches of
    residents and of evicted experts, so buckets empty and come back), against a plain scan."""
    rng = np.random.default_rng(seed)
    lfu = LFUCounts()
    counts: dict = {}
    stamp: dict = {}
    resident: set = set()
    for clock in range(400):
        key = (int(rng.integers(3)), int(rng.integers(5)))
        roll = rng.random()
        if roll < 0.25 and key not in resident:
            lfu.loaded(key)
            counts.setdefault(key, 0)
            resident.add(key)
            stamp[key] = clock
        elif roll < 0.45 and key in resident:
            lfu.evicted(key)
            resident.discard(key)
        else:
            lfu.touch(key)
            counts[key] = counts.get(key, 0) + 1
            if key in resident:
                stamp[key] = clock
        blocked = {k for k in resident if rng.random() < 0.3}
        expected = min((k for k in resident if k not in blocked), key=lambda k: (counts[k], stamp[k]), default=None)
        assert lfu.victim(lambda k, blocked=blocked: k in resident and k not in blocked) == expected
    assert len(lfu._heap) == len(set(lfu._heap)) <= max(counts.values(), default=0) + 1  # each count once
