"""The oracle's local search (sim/search.py): its three edits do what they say, it only ever adds
real runs that are better, it finds what no candidate does, and it stays off large instances."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bounds_properties import small_trace, workload

from finemoe.policies.oracle import IN_TIME, LATE, Decisions
from finemoe.policies.registry import make_policy
from finemoe.results import RunResult
from finemoe.sim import search
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import FAR
from finemoe.sim.run import simulate, simulate_policy
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def _case(L=3, J=2, K=1, requests=2, seed=0, slots=2, gbps=32.0, batch=1):
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=requests,
                            prompt_tokens=(1, 3), generated_tokens=(1, 5), seed=seed)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=gbps, copy_engines=1)
    config = SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=slots),
                       workload=WorkloadConfig(max_batch=batch, history_fraction=0.4), seed=seed, timeline_steps=0)
    return trace, config


def _run(trace, config, skip=(), keep=(), add=(), **params):
    policy = make_policy("oracle", **(params or {"prefetch": "aggressive", "lookahead_layers": FAR}))
    policy.skip_asks, policy.keep, policy.decisions = frozenset(skip), frozenset(keep), Decisions()
    policy.add_asks = frozenset(add)
    return simulate_policy(trace, config, policy), policy.decisions


def test_a_skipped_ask_is_not_sent_and_a_kept_expert_is_not_evicted_there():
    trace, config = _case(L=3, J=4, K=1, requests=3, slots=3, gbps=4.0)
    base, decided = _run(trace, config)
    assert decided.late and decided.victims
    ask, victim = decided.late[0], decided.victims[0]
    skipped, skipped_decided = _run(trace, config, skip=[ask])
    assert ask not in skipped_decided.asks + skipped_decided.late
    timed = ("tpot_mean_s", "makespan_s", "stall_s", "hit_rate", "ondemand_loads", "prefetch_late")
    assert [skipped.summary[k] for k in timed] != [base.summary[k] for k in timed]  # a late copy, gone
    _, kept_decided = _run(trace, config, keep=[victim])
    assert victim not in kept_decided.victims


def test_an_added_ask_brings_what_came_by_its_demand_load():
    trace, config = _case(L=3, J=4, K=1, requests=3, slots=3, gbps=4.0)
    base, decided = _run(trace, config, prefetch="none")
    assert base.summary["prefetch_started"] == 0 and decided.demands
    p, k = decided.demands[-1]  # a use after the first step's: its ask is sent from its step's start
    added, added_decided = _run(trace, config, add=[(p, k)], prefetch="none")
    assert added.summary["prefetch_started"] == 1
    assert (p, k) in added_decided.asks + added_decided.late and (p, k) not in added_decided.demands
    assert len(added_decided.demands) == len(decided.demands) - 1


def test_an_added_ask_may_evict_an_expert_needed_as_soon():
    """2 layers x 3 experts, top-2, 2 slots, batches of 2, 0.5 GB/s, file arrivals: cost-aware hits
    8.1% by prefetching the second layer's expert at a step's start, where every candidate hits 0%.
    Added for the second step's second layer (position 3, key 3), with the first layer's ask for
    expert 0 dropped, the ask evicts the second layer's expert 1, needed at that same layer (which
    Belady's rule refuses a prefetch), and the run hits."""
    trace = small_trace(2, 3, 2, 3, 438)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=0.5, copy_engines=3)
    config = SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=2),
                       workload=workload("file", 2, 438, len(trace.requests)), seed=438, timeline_steps=0)
    params = {"prefetch": "aggressive", "lookahead_layers": 1}
    planned = None
    for _ in range(3):  # the clairvoyant rounds (sim/offline.py)
        policy = make_policy("oracle", **params)
        policy.planned_steps, policy.decisions = planned, Decisions()
        base = simulate_policy(trace, config, policy)
        if policy.observed_steps == planned:
            break
        planned = list(policy.observed_steps)
    start = search.Start("aggressive/1", params, planned, base, policy.decisions)
    assert base.summary["hit_rate"] == 0.0 and (3, 3) in policy.decisions.demands
    edited, _ = search.run_edited(trace, config, simulate_policy, start, frozenset({("add", 3, 3), ("skip", 2, 0)}))
    assert edited.summary["hit_rate"] > 0.0 and edited.summary["tpot_mean_s"] < base.summary["tpot_mean_s"]


def _ranked(hit_rate: float) -> RunResult:
    return RunResult({}, {"hit_rate": hit_rate, "tpot_mean_s": 1.0, "makespan_s": 2.0, "ondemand_loads": 3,
                          "prefetch_started": 1}, None)


def test_a_sideways_climb_keeps_an_edit_that_makes_room_for_the_next():
    """Neither edit alone gains a hit, both together do: a sideways climb reaches it, a plain one
    does not. The search's passes run hit rate's plain climbs before its sideways ones."""
    decisions = Decisions(asks=[(2, 0)], demands=[(3, 3)])
    both = frozenset({("add", 3, 3), ("skip", 2, 0)})
    tried = []

    def run(start, edits):
        tried.append(edits)
        return _ranked(0.05 if edits == both else 0.0), decisions

    start = search.Start("c", {}, None, _ranked(0.0), decisions)
    assert search.climb(start, "hit_rate", 10, run, sideways=True) == 2 and tried[-1] == both
    tried.clear()
    search.climb(start, "hit_rate", 10, run)
    assert both not in tried and len(tried) == 2  # each edit once, neither kept
    kinds = [(p.metric, p.sideways) for p in search.PASSES]
    assert kinds.index(("hit_rate", False)) < kinds.index(("hit_rate", True))
    assert {p.metric for p in search.PASSES} == set(search.METRICS)


def test_decisions_keep_the_asks_whose_expert_was_in_or_coming_at_their_layer():
    d = Decisions()
    for p, k in [(3, 1), (3, 2), (3, 1), (3, 5), (4, 1)]:
        d.asked(p, k)
    assert d.pending == {3: [1, 2, 5], 4: [1]}  # an ask repeated at every hook counts once
    d.settle(3, {1: IN_TIME, 2: 0, 5: LATE}.get)
    assert d.asks == [(3, 1)] and d.late == [(3, 5)] and d.pending == {4: [1]}


def test_the_search_beats_every_candidate_where_a_policy_did():
    """3 layers x 2 experts, top-1, 2 slots, a 32 GB/s link: cost-aware kept the first layer's
    expert resident and cycled the other slot, 9 hits of 19, above every candidate's 7. The search
    reaches it by dropping prefetches, and its best run is real: the same edits give the same run."""
    trace, config = _case()
    result = simulate(trace, config)
    info = result.config["policy_info"]
    cost_aware = simulate(trace, replace(config, policy="cost-aware"))
    assert info["best_hit_rate"] >= cost_aware.summary["hit_rate"] > max(
        c["hit_rate"] for c in info["candidates"] if "edits" not in c["candidate"])
    assert "edits" in info["best_hit_rate_candidate"] and info["search_runs"] > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(2, 5), st.integers(1, 3), st.integers(0, 10_000), st.integers(0, 4),
       st.sampled_from([0.25, 4.0, 1000.0]))
def test_the_search_never_leaves_the_oracle_worse(L, J, K, seed, extra, gbps):
    K = min(K, J)
    trace, config = _case(L=L, J=J, K=K, requests=3, seed=seed, slots=K + extra, gbps=gbps)
    with_search = simulate(trace, config)
    saved, search.MAX_LAYER_STEPS = search.MAX_LAYER_STEPS, 0
    try:
        without = simulate(trace, config)
    finally:
        search.MAX_LAYER_STEPS = saved
    a, b = with_search.config["policy_info"], without.config["policy_info"]
    assert b["search_runs"] == 0
    assert search.time_rank(with_search) <= search.time_rank(without)
    assert a["best_loads"] <= b["best_loads"] and a["best_hit_rate"] >= b["best_hit_rate"]


def test_no_search_above_its_size(monkeypatch):
    trace, config = _case()
    monkeypatch.setattr(search, "MAX_LAYER_STEPS", len(trace.iterations) * trace.geometry.num_layers - 1)
    info = simulate(trace, config).config["policy_info"]
    assert info["search_runs"] == 0 and not any("edits" in c["candidate"] for c in info["candidates"])


def test_edited_and_recording_runs_are_never_the_kernels():
    trace, config = _case()
    policy = make_policy("oracle", prefetch="aggressive", lookahead_layers=FAR)
    simulate_policy(trace, config, policy)
    assert policy.plays_in_kernel == policy._compiled
    for edit in ({"skip_asks": frozenset({(1, 0)})}, {"keep": frozenset({(1, 0)})}, {"add_asks": frozenset({(1, 0)})},
                 {"decisions": Decisions()}):
        policy = make_policy("oracle", prefetch="aggressive", lookahead_layers=FAR)
        for k, v in edit.items():
            setattr(policy, k, v)
        simulate_policy(trace, config, policy)
        assert not policy.plays_in_kernel


def test_moves_come_in_each_metrics_order_and_repeat_none(monkeypatch):
    d = Decisions(asks=[(3, 1), (4, 2)], late=[(5, 0)], victims=[(3, 7), (3, 7)], demands=[(2, 4)])
    monkeypatch.setattr(search, "IN_TURN", frozenset({"hit_rate"}))
    monkeypatch.setitem(search.MOVE_ORDER, "tpot", ("late", "add", "asks", "keep"))
    monkeypatch.setitem(search.MOVE_ORDER, "loads", ("keep", "asks"))
    assert search.moves(d, "tpot") == [("skip", 5, 0), ("add", 2, 4), ("skip", 3, 1), ("skip", 4, 2), ("keep", 3, 7)]
    assert search.moves(d, "loads") == [("keep", 3, 7), ("skip", 3, 1), ("skip", 4, 2)]
    monkeypatch.setitem(search.MOVE_ORDER, "hit_rate", ("asks", "add", "late", "keep"))
    # one of each kind in turn: asks, add, late, keep, then the second ask
    assert search.moves(d, "hit_rate") == [("skip", 3, 1), ("add", 2, 4), ("skip", 5, 0), ("keep", 3, 7),
                                           ("skip", 4, 2)]
    assert set(search.MOVE_ORDER) == set(search.METRICS)
