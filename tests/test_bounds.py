"""Unit tests of the lower bounds (hand-computable cases) and of MIN against the exact optimum."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.sim import bounds
from finemoe.sim.belady import min_loads
from finemoe.sim.bounds import Link, StepCost, step_end_bounds, window_bound
from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
from finemoe.sim.exact import exact_min_loads
from finemoe.sim.hardware import PRESETS
from finemoe.sim.offline import loads
from finemoe.sim.run import position_sets, simulate
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


def test_min_loads_of_a_cyclic_sequence_by_hand():
    # a b c a b c with 2 slots: LRU misses all 6; MIN: a, b, c (evicts b: a is needed sooner),
    # a hits, b (evicts a: never needed again), c hits.
    assert min_loads([["a"], ["b"], ["c"], ["a"], ["b"], ["c"]], 2) == [1, 2, 3, 3, 4, 4]


def test_min_loads_counts_a_warm_start_and_sets_held_at_once():
    assert min_loads([["a", "b"], ["a"]], 2, frozenset({"a"})) == [1, 1]
    # One slot and the set {a, b}: MIN runs on 1 + 2 - 1 = 2 slots, as a schedule serving b
    # first and a last keeps a with one slot (2 loads, not 3).
    assert min_loads([["a", "b"], ["a"]], 1) == [2, 2]
    # The extra slots are the position's own: after {a, b} on 1 slot, c leaves room for one key, so
    # a is gone by the time it is needed again (on 2 slots throughout it would stay: [2, 3, 3]).
    assert min_loads([["a", "b"], ["c"], ["a"]], 1) == [2, 3, 4]


@pytest.mark.parametrize("seed", range(80))
def test_min_loads_equals_the_integer_program(seed):
    rng = random.Random(seed)
    single = seed % 2 == 0  # half plain paging (one key per position), where MIN is exact
    keys = list(range(rng.randint(2, 5)))
    sets = [rng.sample(keys, 1 if single else rng.randint(1, min(3, len(keys)))) for _ in range(rng.randint(1, 6))]
    cap = rng.randint(1, len(keys))
    exact = exact_min_loads(sets, cap)
    assert min_loads(sets, cap)[-1] <= exact, (sets, cap)
    if all(len(s) == 1 for s in sets):  # plain paging: MIN is the optimum
        assert min_loads(sets, cap)[-1] == exact, (sets, cap)


def _step(keys, ticks, arrival=0, rid=0):
    return StepCost(tuple(tuple(k) for k in keys), tuple(ticks), tuple(1 for _ in ticks), arrival, (rid,))


def test_step_end_bounds_by_hand():
    link = Link(latency=5, wire=100, compute_factor=1.0)
    # Two steps of one layer, 10 ticks each, each needing a new expert, 1 slot.
    steps = [_step([[(0, 0)]], [10]), _step([[(0, 1)]], [10])]
    ends, loads = step_end_bounds(steps, 1, frozenset(), link)
    assert loads == 2
    # step 0: latency + 1 wire + one expert (1) + nothing after = 106; step 1: 5 + 200 + 1 = 206
    assert ends == [106, 206]
    # Everything resident: compute only, and an arrival at 50 delays the second step.
    warm = frozenset({(0, 0), (0, 1)})
    steps[1] = _step([[(0, 1)]], [10], arrival=50)
    assert step_end_bounds(steps, 2, warm, link) == ([10, 60], 0)


def test_window_bound_by_hand():
    link = Link(latency=5, wire=100, compute_factor=1.0)
    steps = [_step([[(0, e)]], [10]) for e in range(5)]  # five new experts, 1 slot
    # MIN from cold loads 5; less the 1 slot the cache may hold when the window starts (resident or
    # on the wire): 4 copies start after it, the last lands at 5 + 4 x 100 at the earliest, then the
    # last position's expert (1 tick): 406 > the compute of 50.
    assert window_bound(steps, 1, link) == 406
    assert window_bound(steps, 10, link) == 50


@st.composite
def _step_lists(draw):
    layers = draw(st.integers(1, 3))
    keys = [(layer, e) for layer in range(layers) for e in range(draw(st.integers(1, 4)))]
    steps = []
    for _ in range(draw(st.integers(1, 8))):
        sets = [draw(st.lists(st.sampled_from([k for k in keys if k[0] == layer]), max_size=3, unique=True))
                for layer in range(layers)]
        ticks = [draw(st.integers(0, 50)) for _ in range(layers)]
        mins = [min(t, draw(st.integers(0, 20))) for t in ticks]
        steps.append(StepCost(tuple(tuple(s) for s in sets), tuple(ticks), tuple(mins), draw(st.integers(0, 300)),
                              (0,)))
    capacity = draw(st.integers(1, 6))
    start = frozenset(draw(st.lists(st.sampled_from(keys), max_size=capacity, unique=True)))
    link = Link(draw(st.integers(0, 20)), draw(st.integers(1, 60)), draw(st.sampled_from([1.0, 0.7])))
    return steps, capacity, start, link


@settings(max_examples=200, deadline=None)
@given(_step_lists(), st.data())
def test_the_array_bounds_are_the_plain_loops(case, data):
    """What sweeps compute (`_step_ends`, `_window` over shared position arrays) is the plain loops'
    `step_end_bounds` and `window_bound`, step list for step list."""
    steps, capacity, start, link = case
    pos = bounds._Positions.of(steps)
    assert bounds._step_ends(steps, pos, capacity, start, link) == step_end_bounds(steps, capacity, start, link)
    first = data.draw(st.integers(0, len(steps)))
    stop = data.draw(st.integers(first, len(steps)))
    assert bounds._window(pos, first, stop, capacity, link) == window_bound(steps[first:stop], capacity, link)


def test_remembered_bounds_are_the_bounds_computed_afresh():
    """A sweep's policies share one budget's bounds (`bounds_for`): what it hands back, the first time
    and the next, equals a fresh computation, and a different budget or start state gets its own."""
    from dataclasses import replace

    from finemoe.sim import run
    from finemoe.sim.config import MemoryConfig, SimConfig, WorkloadConfig
    from finemoe.sim.hardware import PRESETS
    from finemoe.traces.synthetic import synthetic_trace, tiny_geometry

    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=4, top_k=2), num_requests=5,
                            prompt_tokens=(1, 3), generated_tokens=(2, 5), seed=4)
    config = SimConfig("synthetic", "lru", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=3),
                       workload=WorkloadConfig(history_fraction=0.4))
    run._BOUNDS.clear()
    first = run.bounds_for(trace, config, frozenset())
    assert first == run.compute_bounds(trace, config, frozenset())
    assert run.bounds_for(trace, replace(config, policy="finemoe"), frozenset()) == first
    first["bound_loads"] = -1  # a caller's copy: the remembered bounds stay as they were
    assert run.bounds_for(trace, config, frozenset()) == run.compute_bounds(trace, config, frozenset())
    wider = replace(config, memory=MemoryConfig(expert_cache_slots=6))
    assert run.bounds_for(trace, wider, frozenset()) == run.compute_bounds(trace, wider, frozenset())
    assert run.bounds_for(trace, wider, frozenset()) != run.bounds_for(trace, config, frozenset())
    warm = frozenset({(0, 0), (1, 1)})
    assert run.bounds_for(trace, config, warm) == run.compute_bounds(trace, config, warm)


@pytest.mark.parametrize("seed", range(6))
def test_a_runs_positions_give_its_loads_bound_and_an_optimum_no_run_beats(seed):
    """`position_sets` are the accesses the bound reads (MIN over them is the run's `bound_loads`),
    and the exact optimum over them is at or below every run's loads, the oracle's included."""
    rng = random.Random(seed)
    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=4, top_k=rng.randint(1, 2)), num_requests=3,
                            prompt_tokens=(1, 2), generated_tokens=(2, 4), seed=seed)
    slots, batch = rng.randint(2, 6), rng.randint(1, 2)

    def config(policy: str) -> SimConfig:
        return SimConfig("synthetic", policy, PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=slots),
                         workload=WorkloadConfig(max_batch=batch, history_fraction=0.4), seed=seed,
                         timeline_steps=0)

    sets = position_sets(trace, config("lru"))
    oracle = simulate(trace, config("oracle"))
    assert oracle.summary["bound_loads"] == min_loads(sets, slots)[-1]
    exact = exact_min_loads(sets, slots)
    assert oracle.summary["bound_loads"] <= exact <= oracle.config["policy_info"]["best_loads"]
    for policy in ("lru", "lfu", "layerwise", "promoe", "moe-infinity", "finemoe"):
        assert loads(simulate(trace, config(policy))) >= exact, policy


def test_planned_step_costs_are_computed_once_per_trace_hardware_and_batcher():
    """A sweep's budgets share one costing of the planned steps (`planned_step_costs`): the list
    handed back again is the first, equal to the steps costed afresh; other hardware gets its own."""
    from finemoe.sim.costs import CostModel
    from finemoe.sim.run import _workload

    trace = synthetic_trace(tiny_geometry(num_layers=2, num_experts=4, top_k=2), num_requests=5,
                            prompt_tokens=(1, 3), generated_tokens=(2, 5), seed=7)
    config = SimConfig("synthetic", "lru", PRESETS["rtx3090"], memory=MemoryConfig(expert_cache_slots=3),
                       workload=WorkloadConfig(history_fraction=0.4, max_batch=2))
    bounds._STEP_COSTS.clear()
    costs = CostModel(config.hardware, trace.geometry)
    first, arrival_of = bounds.planned_step_costs(trace, costs, _workload(trace, config)[3])
    again, _ = bounds.planned_step_costs(trace, costs, _workload(trace, config)[3])
    assert again is first
    batcher = _workload(trace, config)[3]
    assert list(first) == bounds.step_costs(trace, costs, batcher.plan(None), arrival_of)
    other = CostModel(PRESETS["h100"], trace.geometry)
    theirs, _ = bounds.planned_step_costs(trace, other, _workload(trace, config)[3])
    assert theirs is not first and list(theirs) == bounds.step_costs(trace, other, batcher.plan(None), arrival_of)
