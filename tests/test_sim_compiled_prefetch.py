"""The compiled path for prefetching policies (sim/compiled_prefetch.py) gives the reference
engine's results, field by field: on random workloads (hypothesis) and on the real Mixtral logs,
for the policies that plan their asks, FineMoE, and every candidate schedule of the oracle (the
ensemble included); and the policies' planned asks are what their hooks return."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.policies.base import LayerRouting, PolicyContext, StepInfo
from finemoe.policies.registry import make_policy
from finemoe.sim import compiled_prefetch, search
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import CANDIDATES, offline_schedule
from finemoe.sim.run import load_trace_for, simulate_policy
from finemoe.sim.workload import ContinuousBatcher
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry
from tests.test_sim_compiled import _both, assert_same, workloads

pytestmark = pytest.mark.skipif(compiled_prefetch.numba is None, reason="numba is not importable here")
POLICIES = ["layerwise", "mixtral-offloading", "promoe", "moe-infinity"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(POLICIES, room_for_copies=True))
def test_compiled_prefetch_path_gives_the_reference_results_on_random_workloads(case):
    trace, config = case
    ref, fast = _both(trace, config)
    assert_same(ref, fast)
    g, hw = trace.geometry, config.hardware
    slots = min(config.memory.expert_cache_slots, g.num_layers * g.num_experts)
    if (config.timeline_steps == 0 and config.workload.arrival == "all" and not config.workload.online
            and slots >= g.num_experts + hw.copy_engines):
        assert fast.config["engine_path"] == "compiled"


def _both_oracle(trace, config, params: dict, planned=None):
    """(reference, compiled) results of one oracle schedule, given `planned` steps as its future
    (a clairvoyant round), and the steps the runs took (the same in both, checked)."""
    runs = []
    for compiled in (False, True):
        policy = make_policy("oracle", **params)
        policy.planned_steps = planned
        runs.append((simulate_policy(trace, config, policy, compiled=compiled), policy.observed_steps))
    (ref, taken), (fast, fast_taken) = runs
    assert fast_taken == taken
    return ref, fast, taken


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(["oracle"], room_for_copies=True), st.sampled_from(CANDIDATES))
def test_oracle_schedules_give_the_reference_results_on_random_workloads(case, params):
    trace, config = case
    ref, fast, taken = _both_oracle(trace, config, params)
    assert_same(ref, fast)
    if config.workload.arrival != "all":  # the next round: the steps it took as its whole future
        ref, fast, _ = _both_oracle(trace, config, params, taken)
        assert_same(ref, fast)


@pytest.mark.parametrize("params", [CANDIDATES[0], CANDIDATES[3], CANDIDATES[8]], ids=str)
def test_oracle_schedules_with_more_keys_than_a_victim_scan_reads(params):
    """Past `SCANNED_KEYS` keys the kernel's Belady victim comes from its heap of next uses."""
    g = tiny_geometry(num_layers=9, num_experts=128, top_k=4)
    assert g.num_layers * g.num_experts > compiled_prefetch.SCANNED_KEYS
    trace = synthetic_trace(g, num_requests=4, prompt_tokens=(2, 5), generated_tokens=(6, 12), seed=5)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=4.0, copy_engines=2)
    for slots in (140, 600):
        config = SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=slots),
                           workload=WorkloadConfig(history_fraction=0.0, max_batch=3), timeline_steps=0)
        ref, fast, _ = _both_oracle(trace, config, params)
        assert fast.config["engine_path"] == "compiled"
        assert_same(ref, fast)


def test_oracle_schedule_long_enough_to_fill_its_heap_of_next_uses():
    """A run with far more pushes than the heap holds (2 x keys + 16): `_uses_push` compacts it,
    keeping one live entry per resident, and its marks are clear again for the next compaction."""
    g = tiny_geometry(num_layers=9, num_experts=128, top_k=4)
    trace = synthetic_trace(g, num_requests=6, prompt_tokens=(2, 5), generated_tokens=(40, 60), seed=7)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=4.0, copy_engines=2)
    config = SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=600),
                       workload=WorkloadConfig(history_fraction=0.0, max_batch=3), timeline_steps=0)
    ref, fast, taken = _both_oracle(trace, config, CANDIDATES[0])
    assert fast.config["engine_path"] == "compiled"
    # every step reads at least top_k next uses a layer (one per expert it runs)
    assert len(taken) * g.num_layers * g.top_k > 2 * g.num_layers * g.num_experts + 16
    assert_same(ref, fast)


@st.composite
def long_workloads(draw, policies=tuple(POLICIES)):
    """Longer runs with a timeline or Poisson arrivals: the compiled path takes over mid-run, with
    the reference's copies on the wire, queued prefetches and pending pin releases as its start."""
    trace, config = draw(workloads(policies, room_for_copies=True))
    trace = synthetic_trace(trace.geometry, num_requests=draw(st.integers(2, 6)), prompt_tokens=(1, 4),
                            generated_tokens=(4, 16), seed=draw(st.integers(0, 10_000)))
    wl = WorkloadConfig(max_batch=config.workload.max_batch, history_fraction=0.4,
                        arrival=draw(st.sampled_from(["all", "poisson"])),
                        rate_rps=draw(st.sampled_from([300.0, 3000.0])))
    config = SimConfig("synthetic", config.policy, config.hardware, memory=config.memory, workload=wl,
                       seed=config.seed, timeline_steps=draw(st.integers(1, 3)))
    return trace, config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_workloads())
def test_taking_over_mid_run_gives_the_reference_results(case):
    trace, config = case
    ref, fast = _both(trace, config)
    assert_same(ref, fast)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_workloads(["oracle"]), st.sampled_from(CANDIDATES))
def test_an_oracle_schedule_taken_over_mid_run_gives_the_reference_results(case, params):
    """With what the schedule learnt before (its next uses, asks sent, layer times) as its start."""
    trace, config = case
    ref, fast, _ = _both_oracle(trace, config, params)
    assert_same(ref, fast)


def test_the_offline_schedule_is_the_same_on_both_paths(monkeypatch):
    """The ensemble (every candidate, clairvoyant rounds) picks the same run with the same numbers.
    Without the local search: its runs, and the candidates' runs it starts from, which record their
    decisions, are never the kernel's (`OraclePolicy.plays_in_kernel`), so both paths would be the
    reference."""
    monkeypatch.setattr(search, "MAX_LAYER_STEPS", 0)
    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=8, top_k=2), num_requests=5,
                            prompt_tokens=(2, 4), generated_tokens=(8, 14), seed=11)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=4.0, copy_engines=2)
    for arrival in ("all", "poisson"):
        config = SimConfig("synthetic", "oracle", hw, memory=MemoryConfig(expert_cache_slots=14),
                           workload=WorkloadConfig(history_fraction=0.0, arrival=arrival, rate_rps=2000.0),
                           timeline_steps=2)
        ref, fast = (offline_schedule(trace, config, lambda *a, c=c, **k: simulate_policy(*a, compiled=c, **k))
                     for c in (False, True))
        untimed = lambda info: [{k: v for k, v in c.items() if k != "wall_s"} for c in info["candidates"]]  # noqa: E731
        assert untimed(fast.config["policy_info"]) == untimed(ref.config["policy_info"])
        assert fast.config["policy_info"]["chosen"] == ref.config["policy_info"]["chosen"]
        fast.config["policy_info"]["candidates"] = ref.config["policy_info"]["candidates"]
        assert_same(ref, fast)


def test_it_takes_over_with_copies_on_the_wire_and_prefetches_queued(monkeypatch):
    """The start state the kernel gets is not always empty: a handover with work in flight happens."""
    seen = []
    take = compiled_prefetch.CompiledPrefetchSteps._state

    def spy(self, t):
        state = take(self, t)
        seen.append((int(state[7][compiled_prefetch.N_FLIGHT]), int(state[7][compiled_prefetch.HEAP_N])))
        return state

    monkeypatch.setattr(compiled_prefetch.CompiledPrefetchSteps, "_state", spy)
    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=8, top_k=2), num_requests=3,
                            prompt_tokens=(2, 4), generated_tokens=(12, 16), seed=5)
    hw = PRESETS["rtx3090"].with_overrides(pcie_gbps=4.0, copy_engines=1)
    for policy in [*POLICIES, "oracle"]:
        config = SimConfig("synthetic", policy, hw, memory=MemoryConfig(expert_cache_slots=12),
                           workload=WorkloadConfig(history_fraction=0.0), timeline_steps=2 if policy == "oracle" else 3)
        ref, fast = _both(trace, config)
        assert fast.config["engine_path"] == "compiled"
        assert_same(ref, fast)
    assert any(flight and queued for flight, queued in seen[:-1]), seen
    assert all(seen[-1]), seen  # the oracle's (its default schedule, conservative)


def _bound_policy(name: str, params: dict, trace, history: list[int], measure: list[int]):
    """A policy bound to a context without an engine, fitted on `history`, prepared for `measure`."""
    policy = make_policy(name, **params)
    policy.bind(PolicyContext(geometry=trace.geometry, capacity_slots=trace.geometry.num_experts, seed=0,
                              is_resident=lambda k: False, is_in_flight=lambda k: False, expert_load_s=1e-3))
    policy.fit(trace.select_requests(history))
    policy.prepare(trace, measure)
    return policy


def _hook_lists(policy, trace, step: int, seqs) -> list[list]:
    """What the policy's hooks return for one step: its start, then each layer's routing."""
    info = StepInfo(step, 0.0, seqs, trace)
    return [list(policy.on_step_start(info))] + [list(policy.on_layer_routed(LayerRouting(info, layer, 0.0, trace)))
                                                 for layer in range(trace.geometry.num_layers)]


FINEMOE_PARAMS = [{}, {"distance": 1}, {"cache": "lru"}, {"cache": "lfu"}, {"search_s": 1e-3}, {"search_s": 0.0},
                  {"search_charge": "none"}, {"delta": False}, {"semantic": False}, {"trajectory": False},
                  {"search_s": 2e-5, "search_token_s": 1e-5}]


@st.composite
def finemoe_workloads(draw, long=False):
    """A random workload of FineMoE with some of its parameters: a trace with semantic keys, at
    least two layers (so a trajectory phase runs), maybe a timeline (a handover mid-run)."""
    trace, config = draw(long_workloads(["layerwise"]) if long else workloads(["layerwise"], room_for_copies=True))
    g = trace.geometry
    g = tiny_geometry(num_layers=max(2, g.num_layers), num_experts=g.num_experts, top_k=g.top_k)
    trace = synthetic_trace(g, num_requests=draw(st.integers(3, 7)), prompt_tokens=(1, 4),
                            generated_tokens=(4, 16) if long else (1, 10), seed=draw(st.integers(0, 10_000)),
                            semantic_dim=8)
    slots = max(config.memory.expert_cache_slots, g.num_experts + config.hardware.copy_engines)
    arrival = "poisson" if config.workload.arrival == "file" else config.workload.arrival  # (another trace)
    wl = WorkloadConfig(max_batch=config.workload.max_batch, history_fraction=0.5, arrival=arrival,
                        rate_rps=config.workload.rate_rps or 300.0)
    return trace, SimConfig("synthetic", "finemoe", config.hardware, memory=MemoryConfig(expert_cache_slots=slots),
                            workload=wl, seed=config.seed, timeline_steps=config.timeline_steps)


def _both_finemoe(trace, config, params: dict):
    return tuple(simulate_policy(trace, config, make_policy("finemoe", **params), compiled=c) for c in (False, True))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(finemoe_workloads(), st.sampled_from(FINEMOE_PARAMS))
def test_finemoe_gives_the_reference_results_on_random_workloads(case, params):
    """Its asks waiting for their search (release events), its p x freq (or LRU, LFU) victims with
    the step's predictions protected, its search thread's stats: every field as the reference's."""
    trace, config = case
    ref, fast = _both_finemoe(trace, config, params)
    assert_same(ref, fast)
    wl = config.workload
    if config.timeline_steps == 0 and wl.arrival == "all" and not wl.online:
        assert fast.config["engine_path"] == "compiled"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(finemoe_workloads(long=True), st.sampled_from(FINEMOE_PARAMS))
def test_finemoe_taken_over_mid_run_gives_the_reference_results(case, params):
    trace, config = case
    ref, fast = _both_finemoe(trace, config, params)
    assert_same(ref, fast)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(2, 8), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000),
       st.sampled_from(FINEMOE_PARAMS))
def test_finemoe_planned_hooks_are_what_its_hooks_return(L, J, K, batch, seed, params):
    """`planned_hooks` (the hooks called on a copy, remembered per step) gives the asks the live
    hooks return, step by step, and the same count of searches answered from the table."""
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=min(K, J)), num_requests=7,
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=seed, semantic_dim=8)
    by_req = trace.iterations_by_request
    measure = [rid for rid in sorted(by_req) if rid >= 3]
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in measure], batch).plan()

    policy, hooked = (_bound_policy("finemoe", params, trace, [0, 1, 2], measure) for _ in range(2))
    assert policy.plans_asks()
    first = 3
    planned = policy.planned_hooks(trace, steps, first)
    for s, seqs in enumerate(steps):
        for h, want in enumerate(_hook_lists(hooked, trace, first + s, seqs)):
            assert planned.asks.prefetches(s, h) == want  # priorities compared exactly
    assert planned.planned == hooked.searches_planned
    assert int(planned.searches.sum()) == hooked.searches


def _mixtral(path, policy: str, gpu_mem: str, history: float = 0.0, seed: int = 0):
    """(trace, configuration) of the real Mixtral logs on the RTX 3090 preset at `gpu_mem`."""
    from finemoe.sim.memory import parse_size

    config = SimConfig(str(path), policy, PRESETS["rtx3090"], memory=MemoryConfig(gpu_mem_bytes=parse_size(gpu_mem)),
                       seed=seed, workload=WorkloadConfig(history_fraction=history))
    return load_trace_for(config), config


def test_finemoe_on_top_k_maps_gives_the_reference_results_on_the_real_mixtral_logs(mixtral_trace_path):
    for gpu_mem in ("12G", "48G"):
        trace, config = _mixtral(mixtral_trace_path, "finemoe-topk", gpu_mem, history=0.5)
        ref = simulate_policy(trace, config, make_policy("finemoe-topk"), compiled=False)
        fast = simulate_policy(trace, config, make_policy("finemoe-topk"), compiled=True)
        assert fast.config["engine_path"] == "compiled" and fast.summary["prefetch_issued"] > 0
        assert_same(ref, fast)


def test_oracle_schedules_give_the_reference_results_on_the_real_mixtral_logs(mixtral_trace_path):
    for gpu_mem in ("12G", "48G"):
        trace, config = _mixtral(mixtral_trace_path, "oracle", gpu_mem)
        for params in CANDIDATES[::3]:
            ref, fast, _ = _both_oracle(trace, config, params)
            assert fast.config["engine_path"] == "compiled"
            assert_same(ref, fast)


def test_layerwise_gives_the_reference_results_on_the_real_mixtral_logs(mixtral_trace_path):
    for gpu_mem in ("12G", "24G", "48G"):
        for seed in (0, 3):
            ref, fast = _both(*_mixtral(mixtral_trace_path, "layerwise", gpu_mem, seed=seed))
            assert fast.config["engine_path"] == "compiled"
            assert_same(ref, fast)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 8), st.integers(1, 3), st.integers(1, 4), st.integers(0, 10_000),
       st.sampled_from(POLICIES))
def test_planned_asks_are_what_the_hooks_return(L, J, K, batch, seed, policy_name):
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=min(K, J)), num_requests=6,
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=seed)
    by_req = trace.iterations_by_request
    measure = [rid for rid in sorted(by_req) if rid >= 2]
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in measure], batch).plan()
    params = {"epochs": 5} if policy_name == "promoe" else {}
    policy, hooked = (_bound_policy(policy_name, params, trace, [0, 1], measure) for _ in range(2))
    assert policy.plans_asks()
    first = 5
    asks = policy.planned_asks(trace, steps, first)
    assert asks.lo.shape == (len(steps), L + 1)
    for s, seqs in enumerate(steps):
        for h, want in enumerate(_hook_lists(hooked, trace, first + s, seqs)):
            assert asks.prefetches(s, h) == want  # priorities compared exactly
    assert asks.wants_step == (policy_name != "mixtral-offloading")  # the others have a step hook
    assert policy.describe() == hooked.describe()  # the same counts of planned predictions


def test_outside_its_rules_the_reference_runs():
    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=6, top_k=2), num_requests=3, seed=1)

    def path(policy="layerwise", slots=12, **hw):
        config = SimConfig("synthetic", policy, PRESETS["rtx3090"].with_overrides(**hw),
                           memory=MemoryConfig(expert_cache_slots=slots), timeline_steps=0)
        return simulate_policy(trace, config, make_policy(policy), compiled=True).config["engine_path"]

    assert path() == "compiled"
    assert path(policy="mixtral-offloading") == "compiled"
    assert path(slots=7) == "reference"  # a layer's 6 experts beside 2 copies on the wire need 8 slots
    assert path(policy="oracle") == "compiled"
    assert path(copy_compute_slowdown=2.0) == "reference"  # copies stretch the compute



@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(finemoe_workloads(long=True), st.sampled_from(FINEMOE_PARAMS), st.sampled_from(CANDIDATES))
def test_a_kernel_resumed_for_a_roomier_unpin_queue_gives_the_reference_results(case, params, candidate):
    """With a one-entry unpin queue the kernel returns at nearly every step for more room and is
    called again from that step: FineMoE, an oracle candidate and a planned prefetcher still give
    the reference's results, field by field."""
    trace, config = case
    grown = []
    grow = compiled_prefetch.roomier_unpins

    def spy(u_t, u_k, st_, room):
        grown.append(room)
        return grow(u_t, u_k, st_, room)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled_prefetch, "UNPIN_ROOM", 1)
        mp.setattr(compiled_prefetch, "roomier_unpins", spy)
        assert_same(*_both_finemoe(trace, config, params))
        assert_same(*_both_oracle(trace, replace(config, policy="oracle"), candidate)[:2])
        assert_same(*_both(trace, replace(config, policy="layerwise")))
    if config.timeline_steps == 0 and config.workload.arrival == "all":
        assert grown
