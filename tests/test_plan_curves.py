"""The plan's one pass: stack distances against brute-force caches, and the closed-form estimates
against hand-computed numbers and against the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.plan.accesses import Accesses, measured_accesses
from finemoe.plan.curves import COLD, lru_distances, min_distances, misses_at
from finemoe.plan.estimate import COPY, CPU, GPU, estimate
from finemoe.plan.strategies import STRATEGIES
from finemoe.sim.costs import CostModel
from finemoe.sim.cpu import CPU_PRESETS
from finemoe.sim.hardware import load_hardware


def lru_misses(keys, slots):
    cache: list[int] = []
    misses = 0
    for k in keys:
        if k in cache:
            cache.remove(k)
        else:
            misses += 1
            if len(cache) == slots:
                cache.pop()
        cache.insert(0, k)
    return misses


def belady_misses(keys, slots):
    cache: set[int] = set()
    misses = 0
    for i, k in enumerate(keys):
        if k in cache:
            continue
        misses += 1
        if len(cache) == slots:
            rest = keys[i + 1:]
            cache.remove(max(sorted(cache), key=lambda x, rest=rest: rest.index(x) if x in rest else len(keys)))
        cache.add(k)
    return misses


def test_hand_made_sequence():
    keys = np.array([1, 2, 3, 1, 2, 4, 1])
    assert lru_distances(keys).tolist() == [COLD, COLD, COLD, 2, 2, COLD, 2]
    # MIN with 2 slots: 1 2 | 3 evicts 2 (next use later than 1) | 1 hit | 2 miss | 4 miss | 1 hit
    assert int(misses_at(min_distances(keys), 2).sum()) == belady_misses(keys.tolist(), 2) == 5
    assert int(misses_at(lru_distances(keys), 2).sum()) == lru_misses(keys.tolist(), 2) == 7


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=60))
def test_one_pass_equals_a_cache_of_every_size(seq):
    keys = np.array(seq)
    lru, mn = lru_distances(keys), min_distances(keys)
    for slots in range(1, 11):
        assert int(misses_at(lru, slots).sum()) == lru_misses(seq, slots)
        assert int(misses_at(mn, slots).sum()) == belady_misses(seq, slots)
        assert misses_at(mn, slots).sum() <= misses_at(lru, slots).sum()  # MIN is optimal


def _costs(geometry):
    return CostModel(load_hardware("rtx3090"), geometry, CPU_PRESETS["desktop-ddr5"])


def _one_step(tokens=(1, 1)) -> Accesses:
    n = len(tokens)
    ints = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return Accesses(ints(range(n)), ints([0] * n), ints([0] * n), ints(tokens), ints([0]), np.array([True]),
                    ints([1]), ints([5]), ints([5]), 1, 8)


def test_estimate_of_one_layer_by_hand(small_trace):
    costs = _costs(small_trace.geometry)
    acc = _one_step()
    dense = costs.dense_layer_s(1, 5, 5)
    g, load, c = costs.expert_compute_s(1), costs.expert_load_s, costs.cpu_expert_s(1)
    hand = 2 * costs.activation_copy_s(1) + costs.cpu.sync_s
    assert estimate(acc, costs, np.array([GPU, GPU])).ttft_p50_s == pytest.approx(dense + 2 * g)
    # the copy crosses the link while the resident expert computes, then computes itself
    assert estimate(acc, costs, np.array([GPU, COPY])).ttft_p50_s == pytest.approx(dense + max(g, load) + g)
    # the CPU side runs beside the GPU's resident expert: hand-off, its FFN, hand-back, sync
    got = estimate(acc, costs, np.array([GPU, CPU]))
    assert got.ttft_p50_s == pytest.approx(dense + max(g, hand + c))
    assert (got.ran_gpu_resident, got.ran_gpu_copied, got.ran_cpu, got.loads) == (1, 0, 1, 0)


def test_accesses_follow_the_measured_requests(small_trace):
    acc = measured_accesses(small_trace, [2, 0])
    firsts = np.flatnonzero(acc.step_first)
    assert acc.step_request[firsts].tolist() == [2, 0]
    assert acc.step_tokens[firsts[0]] == small_trace.request(2).prompt_tokens  # the prefill step
    ex = small_trace.experts
    rows = small_trace.request_id == 2
    assert acc.tokens[acc.step_request[acc.step] == 2].sum() == int((ex[rows] >= 0).sum())


@pytest.mark.parametrize("name", [s.name for s in STRATEGIES if s.exact])
def test_placements_without_timing_choices_equal_the_simulator(name, small_trace, tmp_path):
    """Where a strategy's placement does not depend on the clock, the closed form is the engine's
    own arithmetic: the same TTFT and TPOT to rounding. Fiddler's copies (this tiny model's experts
    copy faster than the CPU computes them) share scratch slots the closed form does not queue for:
    within 10% in decode there, 25% in the prefill (many copies per layer, which also evict placed
    experts when the scratch slots run out)."""
    from finemoe.plan.planner import PlanRequest, one_pass
    from finemoe.plan.strategies import by_name
    from finemoe.sim.run import simulate
    from finemoe.sim.workload import split_requests
    from finemoe.traces.io import write_trace

    path = write_trace(small_trace, tmp_path / "t.parquet")
    s = by_name(name)
    req = PlanRequest(str(path), load_hardware("rtx3090"), CPU_PRESETS["desktop-ddr5"], 0, ())
    for slots in (8, 20, 40):
        from dataclasses import replace

        config = replace(req.config(s, 0), memory=replace(req.memory, gpu_mem_bytes=None, expert_cache_slots=slots))
        split = split_requests(small_trace, config.workload, config.seed)
        inputs = one_pass(small_trace, req, list(split.history), list(split.measure))
        got = estimate(inputs.acc, inputs.costs, s.place(inputs, slots))
        sim = simulate(small_trace, config).summary
        rel = 0.1 if got.ran_gpu_copied else 1e-6
        assert got.tpot_p50_s == pytest.approx(sim["tpot_p50_s"], rel=rel), slots
        assert got.ttft_p50_s == pytest.approx(sim["ttft_p50_s"], rel=2.5 * rel), slots
        if not got.ran_gpu_copied:  # (a prefill's copies beyond the scratch slots evict placed experts)
            assert got.ran_cpu == sim["ran_cpu"] and got.ran_gpu_resident == sim["ran_gpu_resident"]


def lfu_misses(keys, slots):
    counts, last, cache, misses = {}, {}, set(), 0
    for i, k in enumerate(keys):
        counts[k] = counts.get(k, 0) + 1
        if k not in cache:
            misses += 1
            if len(cache) == slots:
                cache.remove(min(cache, key=lambda x: (counts[x], last[x])))
            cache.add(k)
        last[k] = i
    return misses


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=50))
def test_lfu_and_per_layer_lru_in_one_pass(seq):
    from finemoe.plan.curves import lfu_distances, per_group_lru_distances

    keys = np.array(seq)
    lfu = lfu_distances(keys)
    layers = keys % 2
    per = per_group_lru_distances(keys, layers)
    for slots in range(1, 9):
        assert int(misses_at(lfu, slots).sum()) == lfu_misses(seq, slots)
        for layer in (0, 1):
            mine = [k for k in seq if k % 2 == layer]
            assert int(misses_at(per[layers == layer], slots).sum()) == lru_misses(mine, slots)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=120), st.integers(0, 3))
def test_the_compiled_passes_agree_with_the_plain_ones(values, spread):
    from finemoe.plan.curves import (
        lfu_distances,
        lfu_priority,
        lru_distances_plain,
        next_uses,
        priority_distances,
        priority_distances_plain,
    )

    keys = np.asarray(values, dtype=np.int64) * (10**spread) + 7  # sparse key values, renumbered inside
    assert lru_distances(keys).tolist() == lru_distances_plain(keys).tolist()
    belady = -next_uses(keys)
    assert priority_distances(keys, belady).tolist() == priority_distances_plain(keys, belady).tolist()
    assert lfu_distances(keys).tolist() == priority_distances_plain(keys, lfu_priority(keys)).tolist()
