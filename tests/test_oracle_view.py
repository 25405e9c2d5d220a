"""The engine's view of the future (sim/plan_view.py): the plan's accesses gathered with numpy equal
the plain loop's, and its vectorised `first_uses`, `first_use_arrays` and `next_use` equal plain
readings of those accesses (each expert's first access in the window, its next one after a point)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.policies.base import OracleView
from finemoe.sim.engine import iter_info
from finemoe.sim.plan_view import PlanView, plan_accesses, plan_accesses_reference
from finemoe.sim.workload import build_batcher
from finemoe.traces.synthetic import synthetic_trace, tiny_geometry


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 3), st.integers(0, 500), st.integers(1, 3))
def test_first_uses_equal_the_plain_reading_of_the_window(L, J, batch, seed, stride):
    K = min(J, 2)
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=4,
                            prompt_tokens=(1, 3), generated_tokens=(1, 5), seed=seed)
    ids = tuple(r.request_id for r in trace.requests)
    steps = build_batcher(trace, ids, [0] * len(ids), batch).plan()
    view = PlanView(L, J)
    view.rebuild(0, steps, lambda q: iter_info(trace, q.start, q.stop), trace.experts)
    rng = np.random.default_rng(seed)
    for step in range(0, len(steps) + 1, stride):
        for layer in (-1, int(rng.integers(0, L))):
            for limit in (1, 3, L * J, 10 * L * J):
                after = (step, layer)
                assert view.first_uses(after, limit) == OracleView.first_uses(view, after, limit)
                pos, keys, count, last = view.first_use_arrays(after, limit, J)
                plain_pos, plain_keys, plain_count, plain_last = OracleView.first_use_arrays(view, after, limit, J)
                assert pos.tolist() == plain_pos.tolist() and keys.tolist() == plain_keys.tolist()
                assert (count, last) == (plain_count, plain_last)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 3), st.integers(0, 500), st.integers(0, 7),
       st.floats(0.0, 0.3))
def test_the_gathered_plan_equals_the_plain_loop(L, J, batch, seed, base_step, missing):
    """Decode rows gathered in runs, prefills and batched steps by the loop, records missing (-1)
    anywhere: the same accesses in the same order, and a view built from either answers alike."""
    K = min(J, 2)
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=K), num_requests=4,
                            prompt_tokens=(1, 3), generated_tokens=(1, 5), seed=seed)
    rng = np.random.default_rng(seed)
    experts = np.where(rng.random(trace.experts.shape) < missing, -1, trace.experts)
    table = SimpleNamespace(experts=experts, position=trace.position)  # what iter_info reads
    ids = tuple(r.request_id for r in trace.requests)
    steps = build_batcher(trace, ids, [0] * len(ids), batch).plan()
    info = lambda q: iter_info(table, q.start, q.stop)  # noqa: E731
    fast = plan_accesses(base_step, steps, info, L, experts)
    plain = plan_accesses_reference(base_step, steps, info, L)
    assert all(f.dtype == np.int64 and f.tolist() == p.tolist() for f, p in zip(fast, plain, strict=True))
    view, plain_view = PlanView(L, J), PlanView(L, J)
    view.rebuild(base_step, steps, info, experts)
    plain_view.rebuild(base_step, steps, info)
    assert view.entries() == plain_view.entries()
    entries = view.entries()
    for step in range(base_step, base_step + len(steps) + 1):
        for layer in (-1, int(rng.integers(0, L))):
            here = step * L + layer
            for e in range(J):
                for lay in range(L):
                    later = [s * L + x for s, x, y in entries if (x, y) == (lay, e) and s * L + x > here]
                    assert view.next_use((lay, e), (step, layer)) == (float(later[0]) if later else float("inf"))


def test_a_shared_plan_answers_as_one_built_anew_and_a_changed_batcher_gets_its_own():
    """`rebuild_shared`: the candidate runs of one workload share a plan (built once), and the
    batcher's `plan_key` tells workloads apart (one step further, one batch size more)."""
    L, J = 3, 5
    trace = synthetic_trace(tiny_geometry(num_layers=L, num_experts=J, top_k=2), num_requests=4,
                            prompt_tokens=(1, 3), generated_tokens=(2, 5), seed=3)
    ids = tuple(r.request_id for r in trace.requests)
    info = lambda q: iter_info(trace, q.start, q.stop)  # noqa: E731
    built = []

    def shared(batcher, step=0):
        view = PlanView(L, J)
        view.rebuild_shared(("test", trace.content_hash(), batcher.plan_key()), step,
                            lambda: built.append(1) or batcher.plan(), info, trace.experts)
        return view

    first, again = shared(build_batcher(trace, ids, [0] * 4, 2)), shared(build_batcher(trace, ids, [0] * 4, 2))
    assert len(built) == 1 and again.version == 1
    anew = PlanView(L, J)
    anew.rebuild(0, build_batcher(trace, ids, [0] * 4, 2).plan(), info, trace.experts)
    for view in (first, again):
        assert all(a.tolist() == b.tolist() for a, b in zip(view.access_arrays, anew.access_arrays, strict=True))
        assert all(a.tolist() == b.tolist()
                   for a, b in zip(view.per_key_positions(), anew.per_key_positions(), strict=True))
        assert view.entries() == anew.entries()
        assert all(view.next_use((layer, e), (s, -1)) == anew.next_use((layer, e), (s, -1))
                   for layer in range(L) for e in range(J) for s in range(6))
    wider = build_batcher(trace, ids, [0] * 4, 3)
    shared(wider)
    later = build_batcher(trace, ids, [0] * 4, 2)
    later.next_step(0)
    later.finish_step()
    shared(later, step=1)
    assert len(built) == 3
