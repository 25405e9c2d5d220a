"""Split, arrivals and continuous batching (engine-neutral)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.sim.config import WorkloadConfig
from finemoe.sim.workload import ContinuousBatcher, arrival_times, build_batcher, split_requests
from finemoe.traces.schema import Iteration
from finemoe.traces.synthetic import synthetic_trace


def test_split_is_disjoint_seeded_and_by_fraction():
    t = synthetic_trace(num_requests=10, generated_tokens=2, prompt_tokens=2)
    a = split_requests(t, WorkloadConfig(history_fraction=0.7), seed=1)
    b = split_requests(t, WorkloadConfig(history_fraction=0.7), seed=1)
    c = split_requests(t, WorkloadConfig(history_fraction=0.7), seed=2)
    assert a == b and (a.history, a.measure) != (c.history, c.measure)
    assert len(a.history) == 7 and len(a.measure) == 3 and not set(a.history) & set(a.measure)
    assert sorted(a.history + a.measure) == list(range(10)) and a.source == "seeded"


def test_online_measures_everything_with_empty_history_and_max_requests_caps():
    t = synthetic_trace(num_requests=5, generated_tokens=2, prompt_tokens=2)
    s = split_requests(t, WorkloadConfig(online=True, max_requests=3), seed=0)
    assert s.history == () and s.measure == (0, 1, 2) and s.source == "online"


def test_trace_labels_are_respected():
    t = synthetic_trace(num_requests=4, generated_tokens=2, prompt_tokens=2)
    labels = ["history", "measure", "history", "measure"]
    t.requests = tuple(dataclasses.replace(r, split=s) for r, s in zip(t.requests, labels, strict=True))
    s = split_requests(t, WorkloadConfig(), seed=0)
    assert s.history == (0, 2) and s.measure == (1, 3) and s.source == "trace"


def test_bad_fraction_is_a_config_error():
    t = synthetic_trace(num_requests=2, generated_tokens=2, prompt_tokens=2)
    with pytest.raises(ConfigError, match="history_fraction"):
        split_requests(t, WorkloadConfig(history_fraction=1.0), seed=0)


def test_arrivals():
    assert list(arrival_times(3, WorkloadConfig(), 0)) == [0, 0, 0]
    p = arrival_times(2000, WorkloadConfig(arrival="poisson", rate_rps=4.0), 0)
    assert p[0] == 0 and np.all(np.diff(p) >= 0)
    assert 1 / np.diff(p).mean() == pytest.approx(4.0, rel=0.1)
    assert np.array_equal(p, arrival_times(2000, WorkloadConfig(arrival="poisson", rate_rps=4.0), 0))
    with pytest.raises(ConfigError, match="rate_rps"):
        arrival_times(2, WorkloadConfig(arrival="poisson"), 0)
    with pytest.raises(ConfigError, match="unknown arrival"):
        arrival_times(2, WorkloadConfig(arrival="burst"), 0)


def test_arrival_file_errors_name_the_problem(tmp_path):
    f = tmp_path / "a.txt"
    with pytest.raises(ConfigError, match="not found"):
        arrival_times(1, WorkloadConfig(arrival="file", timestamps_path=str(f)), 0)
    f.write_text("0.5\nsoon\n")
    with pytest.raises(ConfigError, match="line 2"):
        arrival_times(2, WorkloadConfig(arrival="file", timestamps_path=str(f)), 0)
    f.write_text("# seconds\n0.5\n")
    with pytest.raises(ConfigError, match="holds 1 arrival times"):
        arrival_times(2, WorkloadConfig(arrival="file", timestamps_path=str(f)), 0)
    f.write_text("0.5\n0.2\n")
    with pytest.raises(ConfigError, match="non-decreasing"):
        arrival_times(2, WorkloadConfig(arrival="file", timestamps_path=str(f)), 0)


def _its(rid, n, start=0):
    return tuple(Iteration(rid, i, start + i, start + i + 1) for i in range(n))


def test_batcher_admits_in_arrival_order_up_to_max_batch():
    b = ContinuousBatcher([(0, 0.0, _its(0, 2)), (1, 0.0, _its(1, 1, 10)), (2, 5.0, _its(2, 1, 20))], max_batch=2)
    plan = b.plan()
    assert [[q.request_id for q in s] for s in plan] == [[0, 1], [0, 2]]  # the plan ignores arrival times
    assert [q.request_id for q in b.next_step(0.0)] == [0, 1]
    assert b.finish_step() == [1]
    assert [q.request_id for q in b.next_step(1.0)] == [0]  # request 2 has not arrived yet
    assert [[q.request_id for q in s] for s in b.plan(1.0)] == [[0]]
    assert b.finish_step() == [0] and b.next_arrival() == 5.0
    assert b.next_step(4.0) == ()
    assert [(q.request_id, q.iteration) for q in b.next_step(5.0)] == [(2, 0)]
    assert b.finish_step() == [2] and b.done


def test_build_batcher_uses_the_traces_iterations():
    t = synthetic_trace(num_requests=3, prompt_tokens=4, generated_tokens=3)
    b = build_batcher(t, (0, 2), [0.0, 0.0], 1)
    first = b.next_step(0.0)
    assert first[0].is_prefill and first[0].num_tokens == 4
    # The plan starts with the step just decided: 2 requests x (prefill + 3 decodes).
    assert len(b.plan()) == 8 and b.plan()[0] == first
