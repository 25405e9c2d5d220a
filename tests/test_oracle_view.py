"""The engine's view of the future: its vectorised `first_uses` and `first_use_arrays` equal the
interface's plain ones (each expert's first access in the window, read access by access)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.policies.base import OracleView
from finemoe.sim.engine import _PlanOracle, iter_info
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
    view = _PlanOracle(L, J)
    view.rebuild(0, steps, lambda q: iter_info(trace, q.start, q.stop))
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
