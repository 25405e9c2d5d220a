"""Belady's MIN compiled (sim/belady.py) against its plain definition: the same prefix counts on
random instances (sets of several keys, repeats within a set, warm starts, every capacity), and by
hand on the cases of test_bounds.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.sim.belady import min_loads, min_loads_reference


@st.composite
def instances(draw):
    keys = draw(st.lists(st.one_of(st.integers(0, 9), st.tuples(st.integers(0, 2), st.integers(0, 3))),
                         min_size=1, max_size=12, unique=True))
    sets = draw(st.lists(st.lists(st.sampled_from(keys), min_size=0, max_size=4), max_size=40))
    capacity = draw(st.integers(1, len(keys) + 2))
    start = frozenset(draw(st.lists(st.sampled_from(keys), max_size=capacity, unique=True)))
    return sets, capacity, start


@settings(max_examples=400, deadline=None)
@given(instances())
def test_compiled_min_equals_the_reference(case):
    sets, capacity, start = case
    assert min_loads(sets, capacity, start) == min_loads_reference(sets, capacity, start)


def test_compiled_min_by_hand():
    assert min_loads([["a"], ["b"], ["c"], ["a"], ["b"], ["c"]], 2) == [1, 2, 3, 3, 4, 4]
    assert min_loads([["a", "b"], ["a"]], 2, frozenset({"a"})) == [1, 1]
    assert min_loads([["a", "b"], ["a"]], 1) == [2, 2]
    assert min_loads([], 3) == []
    assert min_loads([["a", "b"], ["c"], ["a"]], 1) == [2, 3, 4]  # each position's own extra slots
    assert min_loads([["a"], [], ["a"]], 1) == [1, 1, 1]  # a position needing nothing takes no slot away
