"""The weighted paging program (sim/weighted_min.py) against a search over every cache state, against
Belady where every fault weighs alike, by hand, and as the oracle's "tpot" candidate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.errors import ConfigError
from finemoe.policies.oracle import OraclePolicy
from finemoe.sim.belady import min_loads
from finemoe.sim.weighted_min import kept_intervals, weighted_faults_reference


def flatten(sets: list[list]) -> tuple[np.ndarray, np.ndarray, list]:
    """Positions, previous-access indices and keys of `sets`, accessed in order."""
    last: dict = {}
    pos, prev, keys = [], [], []
    for p, need in enumerate(sets):
        for k in need:
            prev.append(last.get(k, -1))
            last[k] = len(keys)
            pos.append(p)
            keys.append(k)
    return np.array(pos, dtype=np.int64), np.array(prev, dtype=np.int64), keys


def kept_of(sets, weights, capacity) -> np.ndarray:
    pos, prev, _ = flatten(sets)
    return kept_intervals(pos, prev, np.array([w for ws in weights for w in ws], dtype=float), capacity)


def fault_weight(kept: np.ndarray, weights: list[list[float]]) -> float:
    flat = [w for ws in weights for w in ws]
    return float(sum(w for w, hit in zip(flat, kept.tolist(), strict=True) if not hit))


@st.composite
def instances(draw, singletons: bool = False):
    n_keys = draw(st.integers(1, 6))
    capacity = draw(st.integers(1, n_keys + 1))
    width = 1 if singletons else min(capacity, 3)
    sets = draw(st.lists(st.lists(st.integers(0, n_keys - 1), min_size=1, max_size=width, unique=True),
                         min_size=1, max_size=10))
    weights = [draw(st.lists(st.sampled_from([0.0, 0.001, 0.25, 1.0, 3.0]), min_size=len(s), max_size=len(s)))
               for s in sets]
    return sets, weights, capacity


@settings(max_examples=300, deadline=None)
@given(instances())
def test_the_program_reaches_the_least_fault_weight(case):
    sets, weights, capacity = case
    assert fault_weight(kept_of(sets, weights, capacity), weights) == pytest.approx(
        weighted_faults_reference(sets, weights, capacity), abs=1e-9)


@settings(max_examples=300, deadline=None)
@given(instances())
def test_its_schedule_fits_the_cache(case):
    """Replaying the kept intervals: at every position its experts and those kept across it fit,
    and only an expert accessed before is a hit."""
    sets, weights, capacity = case
    pos, prev, keys = flatten(sets)
    kept = kept_of(sets, weights, capacity)
    for p in range(len(sets)):
        spanning = sum(1 for j in np.flatnonzero(kept).tolist() if pos[prev[j]] < p < pos[j])
        assert spanning + len(sets[p]) <= capacity
    assert not (kept & (prev < 0)).any()


@settings(max_examples=200, deadline=None)
@given(instances(singletons=True))
def test_with_every_fault_alike_it_loads_what_belady_loads(case):
    sets, _, capacity = case
    kept = kept_of(sets, [[1.0] for _ in sets], capacity)
    assert int((~kept).sum()) == min_loads(sets, capacity)[-1]


def test_it_keeps_the_expert_whose_miss_costs_more_not_the_one_needed_sooner():
    # a b c a b, two slots: at c one of a and b must go. Belady evicts b (needed later); when b's
    # miss weighs 5 and a's 1, the cheaper schedule evicts a.
    sets = [["a"], ["b"], ["c"], ["a"], ["b"]]
    assert kept_of(sets, [[1.0], [1.0], [1.0], [1.0], [5.0]], 2).tolist() == [False, False, False, False, True]
    assert kept_of(sets, [[1.0]] * 5, 2).tolist() == [False, False, False, True, False]


def test_a_position_needs_its_experts_together():
    # {a, b} then {c} then {a}: with two slots, c's position leaves room for one, a kept across it
    assert kept_of([["a", "b"], ["c"], ["a"]], [[1, 1], [1], [1]], 2).tolist() == [False, False, False, True]
    # {a} then {b, c} then {a}: b and c take both slots, so a cannot stay
    assert kept_of([["a"], ["b", "c"], ["a"]], [[1], [1, 1], [1]], 2).tolist() == [False] * 4


def test_edge_cases():
    assert kept_intervals(np.array([0, 1]), np.array([-1, -1]), np.ones(2), 3).tolist() == [False, False]
    assert kept_intervals(np.array([0, 1, 2, 3]), np.array([-1, 0, -1, 2]), np.ones(4), 1).tolist() == [
        False, True, False, True]
    empty = np.zeros(0, dtype=np.int64)
    assert kept_intervals(empty, empty, np.zeros(0), 2).tolist() == []


def test_tpot_victims_go_with_demand_loads_only():
    with pytest.raises(ConfigError, match="prefetch=none"):
        OraclePolicy(prefetch="aggressive", victims="tpot")
    with pytest.raises(ConfigError, match="victims must be one of"):
        OraclePolicy(prefetch="none", victims="lru")
    assert "victims" not in OraclePolicy(prefetch="none").params  # other runs' parameters unchanged
