"""The results schema's helpers: the per-request frame, the latency figures, a frame built late."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from finemoe.results import REQUEST_COLUMNS, RunResult, latency_stats, percentiles, requests_frame

ROWS = [
    {"request_id": 1, "arrival_s": 0.5, "first_token_s": 1.0, "finish_s": 3.0, "prompt_tokens": 4, "generated_tokens": 5},
    {"request_id": 0, "arrival_s": 0.0, "first_token_s": 0.25, "finish_s": 0.25, "prompt_tokens": 2, "generated_tokens": 1},
]


def test_the_frame_has_the_schema_columns_in_order_and_derives_the_times():
    frame = requests_frame(ROWS)
    assert tuple(frame.columns) == REQUEST_COLUMNS
    assert frame["ttft_s"].tolist() == [0.5, 0.25]
    assert frame["tpot_s"].iloc[0] == 0.5  # (3.0 - 1.0) / (5 - 1)
    assert np.isnan(frame["tpot_s"].iloc[1])  # one token: no time per output token
    assert frame["request_id"].dtype == np.int64


def test_a_result_given_rows_builds_the_same_frame_when_first_read():
    lazy = RunResult({}, {}, [dict(r) for r in ROWS])
    assert lazy._requests is None  # not built until read
    pd.testing.assert_frame_equal(lazy.requests, requests_frame(ROWS))
    assert lazy.requests is lazy.requests  # built once
    eager = RunResult({}, {}, requests_frame(ROWS))
    pd.testing.assert_frame_equal(eager.requests, lazy.requests)
    assert RunResult({}, {}, None).requests is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=40))
def test_percentiles_are_numpys_to_the_last_bit(values):
    expected = np.percentile(np.array(values), (50, 90, 99)).tolist()
    assert percentiles(values, (50, 90, 99)) == expected


def test_latency_stats_ignore_missing_times():
    out = latency_stats({"ttft": np.array([1.0, 3.0]), "tpot": np.array([np.nan, 2.0]), "e2e": np.array([np.nan])})
    assert out["ttft_p50_s"] == 2.0 and out["ttft_mean_s"] == 2.0
    assert out["tpot_p99_s"] == 2.0
    assert np.isnan(out["e2e_p50_s"]) and np.isnan(out["e2e_mean_s"])
