"""Property tests of trace format v1: valid traces round-trip exactly; corruption is a TraceError.

"Corruption is rejected" is stated as: reading a damaged file either raises TraceError or returns
exactly the trace that was written (a flipped bit in, say, the writer's version string changes
nothing). Any other exception, or a silently different trace, fails.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finemoe.errors import TraceError
from finemoe.traces.io import CHECKSUM_KEY, METADATA_KEY, read_trace, trace_to_table, write_trace
from finemoe.traces.schema import MISSING_EXPERT, RequestInfo, Trace
from finemoe.traces.synthetic import tiny_geometry

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def traces(draw) -> Trace:
    """Any valid trace: small geometry, 1-3 requests (each with a row), optional arrays, gaps."""
    J = draw(st.integers(2, 9))
    K = draw(st.integers(1, min(J, 3)))
    L = draw(st.integers(1, 4))
    g = tiny_geometry(L, J, K)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    requests, rid, its, pos = [], [], [], []
    for r in range(draw(st.integers(1, 3))):
        prefill = draw(st.booleans())
        p_len = draw(st.integers(0, 4))
        g_len = draw(st.integers(0 if prefill and p_len else 1, 4))  # a request listed without rows is invalid
        requests.append(RequestInfo(r * 7 + 1, p_len, g_len, prefill, label=f"r{r}", split=draw(st.sampled_from(["", "history", "measure"]))))
        rows = ([(0, p) for p in range(p_len)] if prefill else []) + [(i, p_len + i - 1) for i in range(1, g_len + 1)]
        for it, p in rows:
            rid.append(r * 7 + 1)
            its.append(it)
            pos.append(p)
    n = len(rid)
    experts = np.argsort(rng.random((n, L, J)), axis=2)[:, :, :K].astype(np.int16)
    weights = rng.random((n, L, K)).astype(np.float16)
    gaps = rng.random((n, L)) < draw(st.sampled_from([0.0, 0.2]))
    experts[gaps] = MISSING_EXPERT
    weights[gaps] = 0
    probs = rng.random((n, L, J)).astype(np.float16) if draw(st.booleans()) else None
    semantic = rng.normal(size=(n, draw(st.integers(1, 5)))).astype(np.float16) if draw(st.booleans()) else None
    spec = None
    if draw(st.booleans()):
        spec = np.argsort(rng.random((n, L, J)), axis=2)[:, :, :K].astype(np.int16)
        spec[:, -1] = MISSING_EXPERT
    return Trace(
        geometry=g,
        requests=tuple(requests),
        request_id=np.asarray(rid, np.int32),
        iteration=np.asarray(its, np.int32),
        position=np.asarray(pos, np.int32),
        experts=experts,
        weights=weights,
        router_probs=probs,
        semantic_key=semantic,
        spec_experts=spec,
        spec_weights=None if spec is None else rng.random((n, L, K)).astype(np.float16),
        metadata={"source": {"kind": "hypothesis"}, "note": draw(st.text(max_size=5))},
    )


def assert_same(a: Trace, b: Trace) -> None:
    assert a.geometry == b.geometry
    assert a.requests == b.requests
    assert a.metadata == b.metadata
    for name in ("request_id", "iteration", "position", "experts", "weights", "router_probs",
                 "semantic_key", "spec_experts", "spec_weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x.view(np.uint16) if x.dtype == np.float16 else x,
                                          y.view(np.uint16) if y.dtype == np.float16 else y, err_msg=name)


def _write_raw(table: pa.Table, path) -> None:
    """Bypass write_trace's validation: what a buggy or foreign writer could produce."""
    pq.write_table(table, path)


def _meta(table: pa.Table) -> dict:
    return json.loads(table.schema.metadata[METADATA_KEY])


def _with_meta(table: pa.Table, meta: dict, *, fix_checksum: bool) -> pa.Table:
    import hashlib

    payload = json.dumps(meta).encode()
    md = dict(table.schema.metadata)
    md[METADATA_KEY] = payload
    if fix_checksum:
        md[CHECKSUM_KEY] = hashlib.sha256(payload).hexdigest().encode()
    return table.replace_schema_metadata(md)


# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(traces())
def test_any_valid_trace_round_trips_exactly(tmp_path, trace):
    path = write_trace(trace, tmp_path / "t.parquet")
    assert_same(read_trace(path), trace)
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


@SETTINGS
@given(traces(), st.integers(1, 3))
def test_a_directory_of_parts_reads_as_one_trace(tmp_path, trace, parts):
    ids = [r.request_id for r in trace.requests]
    chunks = [ids[i::parts] for i in range(parts)]
    d = tmp_path / "dir"
    d.mkdir(exist_ok=True)
    for old in d.glob("*"):
        old.unlink()
    for i, chunk in enumerate(c for c in chunks if c):
        write_trace(trace.select_requests(sorted(chunk)), d / f"part-{i:03d}.parquet")
    back = read_trace(d)
    assert {r.request_id for r in back.requests} == set(ids)
    assert back.num_tokens == trace.num_tokens and back.num_missing == trace.num_missing


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(traces(), st.data())
def test_a_flipped_bit_anywhere_is_an_error_or_harmless(tmp_path, trace, data):
    path = write_trace(trace, tmp_path / "t.parquet")
    raw = bytearray(path.read_bytes())
    offset = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[offset] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path.write_bytes(bytes(raw))
    try:
        back = read_trace(path)
    except TraceError:
        return
    assert_same(back, trace)


@SETTINGS
@given(traces(), st.data())
def test_any_truncation_is_an_error(tmp_path, trace, data):
    path = write_trace(trace, tmp_path / "t.parquet")
    raw = path.read_bytes()
    path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="keep")])
    with pytest.raises(TraceError):
        read_trace(path)


@SETTINGS
@given(traces(), st.sampled_from([
    ("request_id", pa.int64()), ("iteration", pa.float64()), ("position", pa.int16()),
    ("experts", pa.list_(pa.int16())), ("experts", "int32"), ("weights", "float32"),
    ("weights", pa.string()), ("experts", "width"),
]))
def test_wrong_column_types_are_rejected(tmp_path, trace, change):
    name, new_type = change
    table = trace_to_table(trace)
    col = table.column(name)
    if new_type == "width":  # a fixed-size list of the wrong width
        flat = col.combine_chunks().flatten()
        width = col.type.list_size
        if width == 1:
            return
        keep = np.arange(len(flat)) % width != 0
        new = pa.FixedSizeListArray.from_arrays(flat.filter(pa.array(keep)), width - 1)
    elif new_type in ("int32", "float32"):
        value = pa.int32() if new_type == "int32" else pa.float32()
        new = pa.FixedSizeListArray.from_arrays(col.combine_chunks().flatten().cast(value), col.type.list_size)
    elif new_type == pa.string():
        new = pa.array(["x"] * table.num_rows)
    elif isinstance(new_type, pa.ListType):
        new = col.cast(new_type)
    else:
        new = col.cast(new_type)
    table = table.set_column(table.schema.get_field_index(name), name, new)
    _write_raw(table, tmp_path / "t.parquet")
    with pytest.raises(TraceError, match=name):
        read_trace(tmp_path / "t.parquet")


@SETTINGS
@given(traces(), st.data())
def test_out_of_range_expert_ids_are_rejected(tmp_path, trace, data):
    if trace.num_tokens == 0:
        return
    bad = data.draw(st.sampled_from([trace.geometry.num_experts, trace.geometry.num_experts + 100, -2, -32768]))
    row = data.draw(st.integers(0, trace.num_tokens - 1))
    column = data.draw(st.sampled_from(["experts", "spec_experts"] if trace.spec_experts is not None else ["experts"]))
    arr = getattr(trace, column).copy()
    arr[row, 0, 0] = bad
    table = trace_to_table(trace)
    flat = pa.array(arr.reshape(-1), pa.int16())
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.FixedSizeListArray.from_arrays(flat, arr.shape[1] * arr.shape[2]))
    _write_raw(table, tmp_path / "t.parquet")
    with pytest.raises(TraceError, match="out of range|missing"):
        read_trace(tmp_path / "t.parquet")


@SETTINGS
@given(traces(), st.data())
def test_duplicate_or_reordered_rows_are_rejected(tmp_path, trace, data):
    if trace.num_tokens < 2:
        return
    table = trace_to_table(trace)
    i = data.draw(st.integers(0, trace.num_tokens - 1))
    if data.draw(st.booleans()):
        table = pa.concat_tables([table.slice(0, i + 1), table.slice(i, 1), table.slice(i + 1)])
        match = "duplicate"
    else:
        j = data.draw(st.integers(0, trace.num_tokens - 1).filter(lambda j: j != i))
        order = list(range(trace.num_tokens))
        order[i], order[j] = order[j], order[i]
        table = table.take(order)
        match = "not sorted"
    _write_raw(table, tmp_path / "t.parquet")
    with pytest.raises(TraceError, match=match):
        read_trace(tmp_path / "t.parquet")


@SETTINGS
@given(traces(), st.sampled_from(["request_id", "iteration", "position", "experts", "weights"]))
def test_missing_required_columns_are_rejected(tmp_path, trace, column):
    table = trace_to_table(trace)
    _write_raw(table.drop_columns([column]), tmp_path / "t.parquet")
    with pytest.raises(TraceError, match=f"required column.*{column}"):
        read_trace(tmp_path / "t.parquet")


# edit of the metadata -> what the reader says when the editor also fixed the checksum; None: the
# edit may describe another valid trace (a deliberate rewrite, not corruption), so it may read
TAMPERS = {
    "newer version": (lambda m: m.update(schema_version=2), "newer than this finemoe reads"),
    "version zero": (lambda m: m.update(schema_version=0), "invalid trace schema version"),
    "version text": (lambda m: m.update(schema_version="1"), "integer schema_version"),
    "more experts": (lambda m: m["geometry"].update(num_experts=m["geometry"]["num_experts"] + 1), None),
    "layers": (lambda m: m["geometry"].update(num_layers=m["geometry"]["num_layers"] + 1), "fixed-size list"),
    "geometry gone": (lambda m: m.pop("geometry"), "malformed geometry"),
    "float sizes": (lambda m: m["geometry"].update(top_k=float(m["geometry"]["top_k"])), "malformed geometry"),
    "request dropped": (lambda m: m["requests"].pop(), None),
    "request id text": (lambda m: m["requests"][0].update(request_id="1"), "malformed"),
    "declared missing": (lambda m: m.update(declared_missing_records=m["declared_missing_records"] + 1), "declares"),
    "metadata list": (lambda m: m.update(metadata=[1]), "JSON object"),
}
VERSION_EDITS = ("newer version", "version zero", "version text")


@SETTINGS
@given(traces(), st.sampled_from(sorted(TAMPERS)), st.booleans())
def test_tampered_metadata_is_rejected(tmp_path, trace, which, fix_checksum):
    edit, match = TAMPERS[which]
    table = trace_to_table(trace)
    meta = _meta(table)
    edit(meta)
    path = tmp_path / "t.parquet"
    _write_raw(_with_meta(table, meta, fix_checksum=fix_checksum), path)
    if not fix_checksum:  # the version is judged first, then the checksum catches every other edit
        with pytest.raises(TraceError, match=match if which in VERSION_EDITS else "checksum"):
            read_trace(path)
    elif match is not None:
        with pytest.raises(TraceError, match=match):
            read_trace(path)
    else:
        try:
            back = read_trace(path)
        except TraceError:
            return
        assert back.geometry.to_dict() == meta["geometry"]
        assert len(back.requests) == len(meta["requests"])


def test_metadata_not_json_or_absent_is_rejected(tmp_path, small_trace):
    table = trace_to_table(small_trace)
    _write_raw(table.replace_schema_metadata({METADATA_KEY: b"{not json"}), tmp_path / "a.parquet")
    with pytest.raises(TraceError, match="not valid JSON"):
        read_trace(tmp_path / "a.parquet")
    _write_raw(table.replace_schema_metadata({}), tmp_path / "b.parquet")
    with pytest.raises(TraceError, match="not a finemoe trace"):
        read_trace(tmp_path / "b.parquet")


def test_files_without_checksums_still_read(tmp_path, small_trace):
    """Traces written before checksums existed (no page CRCs, no metadata digest) stay readable."""
    table = trace_to_table(small_trace)
    md = dict(table.schema.metadata)
    md.pop(CHECKSUM_KEY)
    _write_raw(table.replace_schema_metadata(md), tmp_path / "old.parquet")
    assert_same(read_trace(tmp_path / "old.parquet"), small_trace)


def test_weights_must_be_finite_and_zero_where_missing(tmp_path):
    from finemoe.traces.synthetic import synthetic_trace

    t = synthetic_trace(seed=3)
    t.weights[2, 1, 0] = np.nan
    with pytest.raises(TraceError, match="non-finite"):
        write_trace(t, tmp_path / "t.parquet")
    t = synthetic_trace(seed=3)
    t.experts[2, 1] = MISSING_EXPERT
    with pytest.raises(TraceError, match="non-zero gate weights"):
        write_trace(t, tmp_path / "t.parquet")


@SETTINGS
@given(traces(), st.booleans())
def test_statistics_of_any_valid_trace_are_bounded(trace, decode_only):
    from finemoe.traces.stats import routing_stats, summarize

    s = routing_stats(trace, decode_only=decode_only)
    top = np.log2(trace.geometry.num_experts) + 1e-9
    for values in (s.usage_entropy_bits, s.fine_entropy_per_layer_bits, s.coarse_entropy_per_layer_bits,
                   s.next_top1_entropy_bits, s.next_top1_cond_entropy_bits):
        v = values[~np.isnan(values)]
        assert ((v >= -1e-9) & (v <= top)).all()
    measured = ~np.isnan(s.next_top1_entropy_bits)
    assert (np.isnan(s.next_top1_cond_entropy_bits) == ~measured).all()
    assert (s.next_top1_cond_entropy_bits[measured] <= s.next_top1_entropy_bits[measured] + 1e-9).all()
    json.dumps(s.to_dict(), allow_nan=False)  # --json is strict JSON, whatever the trace
    assert summarize(trace)["token_rows"] == trace.num_tokens
