"""FineMoE's hooks planned all at once (policies/finemoe_hooks.py) are what its reference,
`FineMoE._hooks_of` (the hooks themselves, called step by step), returns: every field, bit for bit,
on random workloads with batches, every parameter set of the compiled-path tests and every variant."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from finemoe.policies.expert_maps import delta_prefix
from finemoe.policies.finemoe_hooks import delta_prefix_rows
from finemoe.sim.workload import ContinuousBatcher
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry
from tests.test_sim_compiled_prefetch import FINEMOE_PARAMS, _bound_policy

# Probabilities with ties and zeros (a top-k map's rows are mostly zero).
_VALUES = st.sampled_from([0.0, 0.0, 0.125, 0.25, 0.5, 1.0 / 3.0, 0.1, 0.7]) | st.floats(0.0, 1.0, width=32)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9), elements=_VALUES),
       st.lists(st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1.0]), min_size=9, max_size=9), st.integers(1, 9))
def test_delta_prefix_rows_selects_what_delta_prefix_selects(values, similarities, top_k):
    sim = np.array(similarities[: len(values)])
    order, count = delta_prefix_rows(values, sim, top_k)
    for i, row in enumerate(values):
        assert order[i, : count[i]].tolist() == delta_prefix(row.tolist(), float(sim[i]), top_k)


def test_delta_prefix_rows_by_hand():
    order, count = delta_prefix_rows(np.array([[0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.0, 0.0, 0.0]]),
                                     np.array([0.5, 0.0, 1.0]), 1)
    # delta 0.5: 0.6 reaches it; delta 1: all three; an all-zero row: top_k by id
    assert [order[i, : count[i]].tolist() for i in range(3)] == [[1], [2, 0, 1], [0]]


def _fields(hooks) -> list:
    return [hooks.asks, hooks.layers, hooks.experts, hooks.priority, hooks.cost_s, hooks.searches, hooks.rows,
            hooks.row_target, hooks.row_values, hooks.planned]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(2, 9), st.integers(1, 3), st.integers(1, 4), st.integers(0, 10_000),
       st.sampled_from(FINEMOE_PARAMS + [{"distance": 9}]),
       st.sampled_from(["finemoe", "finemoe-topk", "finemoe-no-delta", "finemoe-semantic", "finemoe-trajectory"]))
def test_hooks_planned_at_once_are_the_reference_hooks(L, J, K, batch, seed, params, name):
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=min(K, J)), num_requests=8,
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=seed, semantic_dim=8)
    by_req = trace.iterations_by_request
    measure = [rid for rid in sorted(by_req) if rid >= 3]
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in measure], batch).plan()
    if name in ("finemoe-semantic", "finemoe-trajectory"):
        params = {k: v for k, v in params.items() if k not in ("semantic", "trajectory")}
    policy = _bound_policy(name, params, trace, [0, 1, 2], measure)
    fast = policy._vector_hooks(steps)
    scratch = policy._scratch()
    for seqs, got in zip(steps, fast, strict=True):
        assert got is not None
        want = scratch._hooks_of(seqs, trace)
        for a, b in zip(_fields(got), _fields(want), strict=True):
            if isinstance(b, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            else:
                assert a == b


def test_a_step_whose_sequence_the_table_lacks_is_left_to_the_reference():
    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=4, top_k=2), num_requests=5,
                            prompt_tokens=(1, 3), generated_tokens=(1, 3), seed=1, semantic_dim=8)
    by_req = trace.iterations_by_request
    policy = _bound_policy("finemoe", {}, trace, [0, 1], [2, 3])  # request 4 is not prepared
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in (2, 4)], 2).plan()
    fast = policy._vector_hooks(steps)
    assert any(h is None for h in fast)
    planned = policy.planned_hooks(trace, steps, 0)  # the reference answers those steps
    assert planned.searches.shape == (len(steps), 4)


def test_the_same_steps_get_the_answer_kept_and_other_steps_their_own():
    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=4, top_k=2), num_requests=6,
                            prompt_tokens=(1, 3), generated_tokens=(1, 4), seed=2, semantic_dim=8)
    by_req = trace.iterations_by_request
    policy = _bound_policy("finemoe", {}, trace, [0, 1], [2, 3, 4, 5])
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in (2, 3, 4, 5)], 2).plan()
    first = policy.planned_hooks(trace, list(steps), 0)
    assert policy.planned_hooks(trace, list(steps), 0) is first  # (an equal list, another object)
    later = policy.planned_hooks(trace, steps[1:], 1)
    assert later is not first and np.array_equal(later.asks.step[:, 0], np.arange(1, len(steps)))
    assert np.array_equal(later.cost_s, first.cost_s[1:]) and np.array_equal(later.searches, first.searches[1:])


def test_a_sweeps_other_worker_reads_the_answer_kept_on_disk(monkeypatch, tmp_path):
    import finemoe.policies.finemoe as fm
    from finemoe.policies.memo import stored_in

    trace = synthetic_trace(tiny_geometry(num_layers=3, num_experts=4, top_k=2), num_requests=6,
                            prompt_tokens=(1, 3), generated_tokens=(1, 4), seed=2, semantic_dim=8)
    by_req = trace.iterations_by_request
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in (2, 3, 4, 5)], 2).plan()

    def worker():  # a process of its own: nothing planned in memory yet
        monkeypatch.setattr(fm, "_HOOKS", fm.OrderedDict())
        monkeypatch.setattr(fm, "_PLANNED", fm._PLANNED.empty_like())
        return _bound_policy("finemoe", {}, trace, [0, 1], [2, 3, 4, 5]).planned_hooks(trace, steps, 0)

    with stored_in(tmp_path):
        first = worker()
        assert fm._PLANNED.computed == 1
        second = worker()
    assert fm._PLANNED.computed == 0 and len(list(tmp_path.glob("finemoe-hooks-*.npz"))) == 1
    assert second is not first
    for a, b in zip(fm._planned_arrays(second).values(), fm._planned_arrays(first).values(), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                  elements=st.sampled_from([0.0, 0.5, 1.0, -0.25, np.nan]) | st.floats(-2.0, 2.0)),
       st.data())
def test_best_cosines_in_one_pass_are_what_observe_and_best_arrays_give(dot, data):
    from finemoe.policies.expert_maps import _best_cosines

    n, s = dot.shape
    inv_map = data.draw(hnp.arrays(np.float64, s, elements=st.sampled_from([0.0, 1.0, 0.3]) | st.floats(0.0, 5.0)))
    inv_query = data.draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0]) | st.floats(0.0, 5.0)))
    got = (np.zeros(n, np.int64), np.zeros(n))
    want = (np.zeros(n, np.int64), np.zeros(n))
    _best_cosines(dot, inv_map, inv_query, *got)
    cos = dot * inv_map  # `TrajectoryQuery.observe`'s two scalings, then `best_arrays`' argmax
    cos *= inv_query[:, None]
    want[0][:] = np.argmax(cos, axis=1)
    want[1][:] = cos[np.arange(n), want[0]]
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1], equal_nan=True)


def test_rows_sorted_a_chunk_at_a_time_give_the_same_hooks(monkeypatch):
    import finemoe.policies.finemoe_hooks as hooks_module

    trace = synthetic_trace(tiny_geometry(num_layers=4, num_experts=6, top_k=2), num_requests=8,
                            prompt_tokens=(1, 4), generated_tokens=(1, 6), seed=4, semantic_dim=8)
    by_req = trace.iterations_by_request
    measure = [rid for rid in sorted(by_req) if rid >= 3]
    steps = ContinuousBatcher([(rid, 0.0, by_req[rid]) for rid in measure], 3).plan()
    policy = _bound_policy("finemoe", {"distance": 1}, trace, [0, 1, 2], measure)
    whole = policy._vector_hooks(steps)
    monkeypatch.setattr(hooks_module, "_CHUNK_ELEMENTS", 13)  # two rows of six experts a chunk
    for a, b in zip(policy._vector_hooks(steps), whole, strict=True):
        for x, y in zip(_fields(a), _fields(b), strict=True):
            assert np.array_equal(x, y) if isinstance(y, np.ndarray) else x == y


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6), st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0]) |
                          st.floats(0.0, 2.0)), max_size=40), st.booleans())
def test_asks_ranked_within_their_groups_are_the_two_sorts_answer(entries, in_order):
    """One per (group, ask) at its highest priority, then by group, priority and the higher ask:
    the in-group pass gives the sorts' answer, with duplicates, ties and -0.0; groups out of order
    fall back to the sorts."""
    from finemoe.policies.finemoe_hooks import ranked_asks, ranked_asks_reference

    if in_order:
        entries = sorted(entries, key=lambda e: e[0])
    group = np.array([e[0] for e in entries], np.int64)
    ask = np.array([e[1] for e in entries], np.int64)
    prio = np.array([e[2] for e in entries], np.float64)
    fast, ref = ranked_asks(group, ask, prio), ranked_asks_reference(group, ask, prio)
    assert group[fast].tolist() == group[ref].tolist()
    assert ask[fast].tolist() == ask[ref].tolist()
    assert prio[fast].tolist() == prio[ref].tolist()


def test_asks_ranked_by_hand():
    from finemoe.policies.finemoe_hooks import ranked_asks

    # group 0: ask 5 twice (0.2 then 0.7: kept at 0.7), ask 3 at 0.7 (a tie: the higher ask first);
    # group 1: ask 1 at 0.1 and ask 2 at 0.9
    group = np.array([0, 0, 0, 1, 1], np.int64)
    ask = np.array([5, 3, 5, 1, 2], np.int64)
    prio = np.array([0.2, 0.7, 0.7, 0.1, 0.9])
    assert ranked_asks(group, ask, prio).tolist() == [2, 1, 4, 3]
