"""Trace format v1: write/read round trip and the clear errors of the reader."""

from __future__ import annotations

import numpy as np
import pytest

from finemoe.errors import TraceError
from finemoe.traces.io import read_trace, write_trace
from finemoe.traces.synthetic import synthetic_trace


def test_round_trip_keeps_every_array(tmp_path, small_trace):
    path = write_trace(small_trace, tmp_path / "t.parquet")
    back = read_trace(path)
    assert back.geometry == small_trace.geometry
    assert back.requests == small_trace.requests
    for name in ("request_id", "iteration", "position", "experts", "weights", "router_probs",
                 "semantic_key", "spec_experts", "spec_weights"):
        np.testing.assert_array_equal(getattr(back, name), getattr(small_trace, name))
    assert back.content_hash() == small_trace.content_hash()


def test_content_hash_is_remembered_until_a_field_is_assigned_anew(small_trace):
    import dataclasses
    import pickle

    t = dataclasses.replace(small_trace)
    first = t.content_hash()
    assert t.content_hash() == first == t._content_hash()
    assert pickle.loads(pickle.dumps(t)).content_hash() == first
    t.experts = t.experts[::-1].copy()  # routing changed: a new object, hashed again
    assert t.content_hash() == t._content_hash() != first
    t.requests = t.requests[:1]
    assert t.content_hash() == t._content_hash()


def test_not_parquet_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("hello")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        read_trace(bad)


def test_expert_id_out_of_range_is_rejected(tmp_path):
    t = synthetic_trace(seed=1)
    t.experts[3, 1, 0] = t.geometry.num_experts
    with pytest.raises(TraceError, match="out of range"):
        write_trace(t, tmp_path / "t.parquet")
